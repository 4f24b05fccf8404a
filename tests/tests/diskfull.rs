//! The audit store on a full disk: the gateway's database lives on a small tmpfs that the test
//! fills. Calls are refused `audit_unavailable` with the cause (fail closed), nothing reaches
//! the upstream, and once space is freed the gateway reopens its store in-process and serves
//! again, its chain intact. Needs `mount` (root): without it the test says why and skips.

use std::path::{Path, PathBuf};
use std::process::Command;

use didgate_audit::entry::{Entry, EntryKind};
use didgate_audit::{load_records, verify};
use didgate_client::{CallError, CallSpec};
use didgate_protocol::message::RefusalCode;
use didgate_tests::{Harness, alice};

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Result<Self, String> {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if out.status.success() {
            Ok(Self(at.to_path_buf()))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            std::fs::create_dir_all(&target)?;
            copy_dir(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), target)?;
        }
    }
    Ok(())
}

/// Writes `path` until the file system is full; returns the bytes written.
fn fill(path: &Path) -> anyhow::Result<u64> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    let chunk = vec![0x5au8; 64 * 1024];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => return Err(e.into()),
        }
    }
    // the last partial page, byte by byte
    while let Ok(1) = f.write(&chunk[..1]) {
        written += 1;
    }
    let _ = f.sync_all();
    Ok(written)
}

fn balance() -> CallSpec {
    CallSpec::new("payments", "GET", "/v1/balance")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_fails_closed_and_the_store_reopens_in_process() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    h.stop().await;
    // move the store onto a small tmpfs
    let store = h.gw_dir().join("store");
    let original = h.gw_dir().join("store.orig");
    std::fs::rename(&store, &original)?;
    std::fs::create_dir(&store)?;
    let _tmpfs = match Tmpfs::mount(&store, "24m") {
        Ok(t) => t,
        Err(why) => {
            println!("SKIPPED: cannot mount a tmpfs for the store ({why}); run as root");
            return Ok(());
        }
    };
    copy_dir(&original, &store)?;
    h.restart().await?;
    let a = h.client("alice", alice()).await?;
    assert_eq!(a.call(balance()).await?.status, 200);

    let filler = store.join("filler");
    let written = fill(&filler)?;
    println!("filled the store's tmpfs with {written} bytes");
    let seen = h.upstream.seen().len();
    for _ in 0..3 {
        match a.call(balance()).await {
            Err(CallError::Refused { code, reason, .. }) => {
                assert_eq!(code, RefusalCode::AuditUnavailable, "{reason}");
                println!("refused: {code}: {reason}");
                // the operator's error stays in the operator's log (issue: a full disk sent
                // `FjallError: Io(Os { code: 28, ... })` to the caller)
                assert_eq!(reason, "the audit log cannot be written");
                for internal in ["os error", "Fjall", "No space", "Io("] {
                    assert!(!reason.contains(internal), "{reason}");
                }
            }
            other => panic!("a call on a full disk was not refused: {other:?}"),
        }
    }
    assert_eq!(
        h.upstream.seen().len(),
        seen,
        "nothing reached the upstream"
    );

    // space comes back: the next call reopens the store and is served
    std::fs::remove_file(&filler)?;
    let answer = a.call(balance()).await?;
    assert_eq!(answer.status, 200);
    assert_eq!(a.call(balance()).await?.status, 200);
    a.close().await;
    drop(a);
    h.stop().await;

    let records = load_records(&h.gw_dir())?;
    let entries: Vec<Entry> = records
        .entries
        .iter()
        .map(|(_, b)| Entry::decode(b))
        .collect::<Result<_, _>>()?;
    assert!(
        entries
            .iter()
            .any(|e| e.kind == EntryKind::Executed && e.call == Some(answer.call)),
        "the call after the reopen is in the chain"
    );
    let report = verify::verify(&[records], &[]);
    assert!(report.ok(), "{:?}", report.violations);
    Ok(())
}

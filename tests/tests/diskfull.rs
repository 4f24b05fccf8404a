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

/// Stops the gateway, moves its store onto a new 24 MiB tmpfs and starts it again; returns the
/// store's path and the mount (unmounted when dropped), or `None` (the test skips) where no
/// tmpfs can be mounted, which fails under `CI=true`.
async fn store_on_tmpfs(h: &mut Harness) -> anyhow::Result<Option<(PathBuf, Tmpfs)>> {
    h.stop().await;
    let store = h.gw_dir().join("store");
    let original = h.gw_dir().join("store.orig");
    std::fs::rename(&store, &original)?;
    std::fs::create_dir(&store)?;
    let tmpfs = match Tmpfs::mount(&store, "24m") {
        Ok(t) => t,
        Err(why) => {
            anyhow::ensure!(
                std::env::var("CI").as_deref() != Ok("true"),
                "cannot mount a tmpfs for the store ({why}); CI must run this test as root"
            );
            println!("SKIPPED: cannot mount a tmpfs for the store ({why}); run as root");
            return Ok(None);
        }
    };
    copy_dir(&original, &store)?;
    h.restart().await?;
    Ok(Some((store, tmpfs)))
}

fn balance() -> CallSpec {
    CallSpec::new("payments", "GET", "/v1/balance")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_fails_closed_and_the_store_reopens_in_process() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let Some((store, _tmpfs)) = store_on_tmpfs(&mut h).await? else {
        return Ok(());
    };
    let a = h.client("alice", alice()).await?;
    assert_eq!(a.call(balance()).await?.status, 200);

    let filler = store.join("filler");
    let written = fill(&filler)?;
    println!("filled the store's tmpfs with {written} bytes");
    let seen = h.upstream.seen().len();
    // The journal's last page may still have room for a small batch (a full file system keeps
    // the pages it gave out, and a call's batch is about 2 KiB); the first call carries 6 KiB
    // of a query parameter that does not compress (the journal compresses), so its executing
    // entry cannot fit there. After that failure the store refuses every write until it
    // reopens, however small.
    let mut pad = [0u8; 3072];
    blake3::Hasher::new()
        .update(b"diskfull pad")
        .finalize_xof()
        .fill(&mut pad);
    let mut padded = balance();
    padded.query.push(("pad".into(), hex::encode(pad)));
    for call in [padded, balance(), balance()] {
        match a.call(call).await {
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

/// An upstream that holds its answer until the test says so: `arrived` gets a message when a
/// request comes in, and the answer (200, the 10 bytes `0123456789`, with a Content-Length)
/// goes out when `go` gets one.
async fn gated_upstream() -> anyhow::Result<(
    String,
    tokio::sync::mpsc::Receiver<()>,
    tokio::sync::mpsc::Sender<()>,
)> {
    use http_body_util::Full;
    use hyper::body::Bytes;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (arrived_tx, arrived) = tokio::sync::mpsc::channel(4);
    let (go, go_rx) = tokio::sync::mpsc::channel::<()>(4);
    let go_rx = std::sync::Arc::new(tokio::sync::Mutex::new(go_rx));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (arrived_tx, go_rx) = (arrived_tx.clone(), go_rx.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    let (arrived_tx, go_rx) = (arrived_tx.clone(), go_rx.clone());
                    async move {
                        let _ = arrived_tx.send(()).await;
                        let _ = go_rx.lock().await.recv().await;
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from_static(b"0123456789"),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    Ok((url, arrived, go))
}

/// The store fails between the upstream's answer and the `executed` entry (issue: the caller
/// had the whole 200 response and the chain said "interrupted by a gateway stop"). The end of
/// the body is withheld until the closing entry is durable, so the caller gets 9 of the 10
/// bytes and `audit_unavailable`; once the store takes writes again the chain records what
/// happened (`failed`, `audit_unavailable`, the status and the bytes relayed). If the gateway
/// stops before that, the next start closes the call as `abandoned` worded "outcome unknown",
/// and the verifier lists it as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closing_entry_that_cannot_be_written_withholds_the_end_and_the_record_says_so()
-> anyhow::Result<()> {
    use didgate_gateway::config::{RawUpstream, Rule};
    let (url, mut arrived, go) = gated_upstream().await?;
    let mut h = Harness::start_with(|c| {
        c.upstreams.push(RawUpstream {
            local: true,
            ..RawUpstream::new("gated", url.clone(), "payments-key")
        });
        c.rules.push(Rule {
            principals: vec![alice().did().to_string()],
            upstream: "gated".into(),
            methods: vec!["GET".into()],
            paths: vec!["/v1/**".into()],
        });
    })
    .await?;
    let Some((store, _tmpfs)) = store_on_tmpfs(&mut h).await? else {
        return Ok(());
    };
    let a = h.client("alice", alice()).await?;
    let filler = store.join("filler");

    // the disk fills while the upstream holds its answer
    let mut calls = Vec::new();
    for round in 0..2 {
        let streaming = {
            let a = &a;
            async move {
                let mut s = a
                    .call_streaming(CallSpec::new("gated", "GET", "/v1/slow"))
                    .await?;
                let status = s.status();
                let mut body = Vec::new();
                let end = loop {
                    match s.next_chunk().await {
                        Ok(Some(c)) => body.extend_from_slice(&c),
                        Ok(None) => break None,
                        Err(e) => break Some(e),
                    }
                };
                let call = s.call();
                anyhow::Ok((status, body, end, call))
            }
        };
        let gw = h
            .gateway
            .clone()
            .ok_or_else(|| anyhow::anyhow!("no gateway"))?;
        let (result, ()) = tokio::join!(streaming, async {
            let _ = arrived.recv().await;
            let _ = fill(&filler);
            // the journal's last page may still take a small entry: revoke made-up grants
            // until the store fails (it then stays failed while the disk is full)
            for _ in 0..256 {
                let grant = hex::encode(rand::random::<[u8; 16]>());
                let Ok(target) = didgate_gateway::gateway::parse_revoke(None, Some(&grant)) else {
                    break;
                };
                if gw.revoke(&target, "filling the journal").await.is_err() {
                    break;
                }
            }
            let _ = go.send(()).await;
        });
        drop(gw);
        let (status, body, end, call) = result?;
        assert_eq!(status, 200);
        assert_eq!(body, b"012345678", "round {round}: the end is withheld");
        let code = match &end {
            Some(CallError::Refused { code, .. }) => Some(*code),
            _ => None,
        };
        assert_eq!(code, Some(RefusalCode::AuditUnavailable), "{end:?}");
        calls.push(call);
        if round == 0 {
            // space comes back: the next call recovers the store and the owed close is written
            std::fs::remove_file(&filler)?;
            assert_eq!(a.call(balance()).await?.status, 200);
        }
    }
    // round 1: the gateway stops before the store recovers, then starts with space again
    h.stop().await;
    std::fs::remove_file(&filler)?;
    h.restart().await?;
    a.close().await;
    drop(a);
    h.stop().await;

    let records = load_records(&h.gw_dir())?;
    let entries: Vec<Entry> = records
        .entries
        .iter()
        .map(|(_, b)| Entry::decode(b))
        .collect::<Result<_, _>>()?;
    let closes = |call: [u8; 32]| -> Vec<&Entry> {
        entries
            .iter()
            .filter(|e| e.call == Some(call) && e.kind != EntryKind::Executing)
            .collect()
    };
    let first = closes(calls[0]);
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0].kind, EntryKind::Failed);
    assert_eq!(first[0].code.as_deref(), Some("audit_unavailable"));
    let detail = first[0].detail.as_deref().unwrap_or_default();
    assert!(
        detail.contains("answered 200") && detail.contains("9 of the 10"),
        "{detail}"
    );
    let second = closes(calls[1]);
    assert_eq!(second.len(), 1, "{second:?}");
    assert_eq!(second[0].kind, EntryKind::Abandoned);
    let detail = second[0].detail.as_deref().unwrap_or_default();
    assert!(detail.starts_with("outcome unknown"), "{detail}");
    assert!(!detail.contains("by a gateway stop"), "{detail}");
    let report = verify::verify(&[records], &[load_records(&h.chain_dir("alice"))?]);
    assert!(report.ok(), "{:?}", report.violations);
    let unknown: Vec<&str> = report
        .unknown_outcomes
        .iter()
        .filter(|u| u.chain.ends_with("gateway"))
        .map(|u| u.call.as_str())
        .collect();
    assert_eq!(unknown, vec![hex::encode(calls[1]).as_str()]);
    Ok(())
}

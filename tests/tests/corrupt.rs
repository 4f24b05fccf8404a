//! Corrupt or truncated export files and databases: a clear error and exit status 2, never a
//! panic. Randomized cases print their seed.

use std::process::Command;

use didgate_client::CallSpec;
use didgate_tests::{Harness, alice, bin};

/// xorshift64*: a tiny deterministic generator, so a failing seed replays exactly.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_exports_and_stores_are_clear_errors() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let a = h.client("alice", alice()).await?;
    for _ in 0..3 {
        a.call(CallSpec::new("payments", "GET", "/v1/balance"))
            .await?;
    }
    a.close().await;
    drop(a);
    h.stop().await;
    let export = h.dir.path().join("gw.cbor");
    let store = didgate_audit::Store::open(&h.gw_dir().join("store"), &[])?;
    didgate_audit::export::export(&store, &export)?;
    drop(store);
    let good = std::fs::read(&export)?;
    assert!(
        didgate_audit::export::read(good.as_slice(), "good")?
            .entries
            .len()
            > 5
    );

    // Every truncation and random damage: never a panic; the library says Err or decodes a
    // chain whose damage the verifier then reports.
    for cut in 0..good.len() {
        assert!(
            didgate_audit::export::read(&good[..cut], "cut").is_err(),
            "a file cut at {cut} was accepted"
        );
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64
        | 1;
    println!("corrupt-export seed: {seed}");
    let mut rng = Rng(seed);
    for _ in 0..2000 {
        let mut bad = good.clone();
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(bad.len());
            bad[i] = rng.next() as u8;
        }
        if let Ok(records) = didgate_audit::export::read(bad.as_slice(), "damaged") {
            let _ = didgate_audit::verify::verify(&[records], &[]);
        }
    }

    // The command line: exit 2 with a message for garbage, an empty file, a missing path and a
    // directory that is not a store.
    let audit = bin("didgate-audit")?;
    let garbage = h.dir.path().join("garbage.cbor");
    std::fs::write(&garbage, b"\xff\x00not cbor at all")?;
    let empty = h.dir.path().join("empty.cbor");
    std::fs::write(&empty, b"")?;
    let not_store = h.dir.path().join("not-a-store");
    std::fs::create_dir_all(&not_store)?;
    for path in [&garbage, &empty, &h.dir.path().join("missing"), &not_store] {
        let out = Command::new(&audit)
            .arg("verify")
            .arg("--gateway")
            .arg(path)
            .output()?;
        assert_eq!(
            out.status.code(),
            Some(2),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stderr.starts_with(b"didgate-audit: "),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        std::fs::read_dir(&not_store)?.next().is_none(),
        "verify must not create a store"
    );

    // A damaged database: one byte flipped in the middle of the journal (not through the
    // engine, which checksums its files) is refused with a clear error.
    let db = h.gw_dir().join("store");
    let journal = walk(&db)?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "jnl"))
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .ok_or_else(|| anyhow::anyhow!("no journal"))?;
    let mut bytes = std::fs::read(&journal)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&journal, bytes)?;
    let out = Command::new(&audit)
        .arg("verify")
        .arg("--gateway")
        .arg(h.gw_dir())
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "damaged store: {err}");
    assert!(
        err.starts_with("didgate-audit: ") && !err.contains("panicked"),
        "{err}"
    );
    Ok(())
}

fn walk(dir: &std::path::Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    Ok(out)
}

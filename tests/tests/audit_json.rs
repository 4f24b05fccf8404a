//! `didgate-audit verify --json` and `check-evidence --json` as processes: every exit path
//! (holds, violation or failed check, missing path, unreadable or malformed file, empty file,
//! a directory that is not a store, a locked store) prints exactly one JSON object on stdout,
//! with the documented exit status. The inputs are made here (a genesis-only store, a bundle
//! signed in-process): no gateway runs.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use didgate_audit::entry::{Entry, EntryKind, Role, entry_hash};
use didgate_audit::evidence::{self, Bundle};
use didgate_audit::{Chain, Store, merkle};
use didgate_protocol::message::{ChainHead, EntryRef, Receipt, Request, SignedMessage};
use didgate_protocol::{Identity, Version};
use didgate_tests::{alice, bin};
use serde_json::{Map, Value};

/// The gateway identity of the in-process chains and bundles.
fn gateway() -> Identity {
    Identity::from_seed(&[0x6a; 32])
}

fn audit<S: AsRef<OsStr>>(args: &[S]) -> anyhow::Result<Output> {
    Ok(Command::new(bin("didgate-audit")?).args(args).output()?)
}

/// Stdout as exactly one JSON object (nothing before or after it).
fn object(out: &Output) -> anyhow::Result<Map<String, Value>> {
    let stdout = std::str::from_utf8(&out.stdout)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    match serde_json::from_str::<Value>(stdout.trim()) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => anyhow::bail!("not an object: {other}\nstderr: {stderr}"),
        Err(e) => anyhow::bail!("not one JSON value ({e}): {stdout:?}\nstderr: {stderr}"),
    }
}

/// A chain of `role` holding its genesis entry only, closed (so checkpointed).
fn chain(dir: &Path, role: Role) -> anyhow::Result<()> {
    let chain = Chain::open(
        Store::open(dir, &[])?,
        Arc::new(gateway()),
        role,
        1,
        Default::default(),
    )?;
    chain.close();
    Ok(())
}

/// A valid bundle: alice's request, the gateway's receipt for it, and its `executed` entry as
/// the first entry of the gateway's tree (so an empty proof under the leaf as root).
fn bundle() -> anyhow::Result<Bundle> {
    let gw = gateway();
    let request = Request {
        v: Version::CURRENT.as_u64(),
        aud: gw.did().to_string(),
        upstream: "payments".into(),
        method: "GET".into(),
        path: "/v1/balance".into(),
        query: vec![],
        headers: vec![],
        body_len: 0,
        body_b3: *blake3::hash(b"").as_bytes(),
        nonce: [5; 16],
        time_ms: 1,
        head: ChainHead {
            chain: [3; 32],
            seq: 0,
            hash: [3; 32],
        },
    }
    .sign(&alice());
    let call = didgate_protocol::envelope::verify(&request, Request::KIND)?.digest();
    let resp_b3 = *blake3::hash(b"{}").as_bytes();
    let mut entry = Entry::new(EntryKind::Executed, 2);
    entry.call = Some(call);
    entry.status = Some(200);
    entry.resp_len = Some(2);
    entry.resp_b3 = Some(resp_b3);
    let entry = entry.encode();
    let hash = entry_hash(&entry);
    let receipt = Receipt {
        v: Version::CURRENT.as_u64(),
        call,
        grant: [1; 16],
        client: alice().did().to_string(),
        status: 200,
        resp_len: 2,
        resp_b3,
        entry: EntryRef { seq: 0, hash },
        root: Some(merkle::leaf_hash(&hash)),
        time_ms: 3,
        node_cert: None,
    }
    .sign(&gw);
    let bundle = Bundle {
        v: evidence::VERSION,
        request,
        receipt,
        entry,
        proof: vec![],
    };
    evidence::check(&bundle.encode())?;
    Ok(bundle)
}

#[test]
fn verify_json_ok_and_violation() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (gw, client) = (dir.path().join("gw"), dir.path().join("client"));
    chain(&gw, Role::Gateway)?;
    chain(&client, Role::Client)?;

    let out = audit(&[
        OsStr::new("verify"),
        "--json".as_ref(),
        "--gateway".as_ref(),
        gw.as_os_str(),
    ])?;
    let report = object(&out)?;
    assert_eq!(out.status.code(), Some(0), "{report:?}");
    assert_eq!(report["violations"], Value::Array(vec![]), "{report:?}");
    assert!(report.contains_key("chains") && !report.contains_key("error"));

    // a client chain given as a gateway: bad_genesis
    let out = audit(&[
        OsStr::new("verify"),
        "--json".as_ref(),
        "--gateway".as_ref(),
        client.as_os_str(),
    ])?;
    let report = object(&out)?;
    assert_eq!(out.status.code(), Some(1), "{report:?}");
    assert_eq!(report["violations"][0]["kind"], "bad_genesis", "{report:?}");
    Ok(())
}

#[test]
fn verify_json_errors() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let gw = dir.path().join("gw");
    chain(&gw, Role::Gateway)?;
    let (garbage, empty, plain) = (
        dir.path().join("garbage.cbor"),
        dir.path().join("empty.cbor"),
        dir.path().join("plain"),
    );
    std::fs::write(&garbage, b"\xff\x00not cbor at all")?;
    std::fs::write(&empty, b"")?;
    std::fs::create_dir(&plain)?;
    let missing = dir.path().join("missing");
    let cases = [
        (&missing, "not_found"),
        (&garbage, "malformed"),
        (&empty, "malformed"),
        (&plain, "not_a_chain"),
    ];
    for (path, kind) in cases {
        // as a gateway, and as a client beside a good gateway
        for flag in ["--gateway", "--client"] {
            let out = audit(&[
                OsStr::new("verify"),
                "--json".as_ref(),
                "--gateway".as_ref(),
                gw.as_os_str(),
                flag.as_ref(),
                path.as_os_str(),
            ])?;
            let error = object(&out)?;
            assert_eq!(out.status.code(), Some(2), "{}: {error:?}", path.display());
            assert_eq!(error["error"], kind, "{error:?}");
            assert_eq!(error["exit"], 2, "{error:?}");
            assert!(error["detail"].is_string(), "{error:?}");
        }
        // the text output stays on stderr
        let out = audit(&[OsStr::new("verify"), "--gateway".as_ref(), path.as_os_str()])?;
        assert_eq!(out.status.code(), Some(2));
        assert!(out.stdout.is_empty() && !out.stderr.is_empty());
    }

    // a store its owner holds open
    let held = Store::open(&gw, &[])?;
    let out = audit(&[
        OsStr::new("verify"),
        "--json".as_ref(),
        "--gateway".as_ref(),
        gw.as_os_str(),
    ])?;
    drop(held);
    let error = object(&out)?;
    assert_eq!(out.status.code(), Some(2), "{error:?}");
    assert_eq!(error["error"], "store", "{error:?}");
    Ok(())
}

#[test]
fn check_evidence_json_valid_and_invalid() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let good = bundle()?;
    let path = dir.path().join("call.evidence");
    std::fs::write(&path, good.encode())?;
    let out = audit(&[
        OsStr::new("check-evidence"),
        "--json".as_ref(),
        path.as_os_str(),
    ])?;
    let verdict = object(&out)?;
    assert_eq!(out.status.code(), Some(0), "{verdict:?}");
    assert_eq!(verdict["valid"], true);
    assert_eq!(verdict["verdict"]["status"], 200);

    let mut bad = good;
    bad.request = b"not a signed request".to_vec();
    std::fs::write(&path, bad.encode())?;
    let out = audit(&[
        OsStr::new("check-evidence"),
        "--json".as_ref(),
        path.as_os_str(),
    ])?;
    let verdict = object(&out)?;
    assert_eq!(out.status.code(), Some(1), "{verdict:?}");
    assert_eq!(verdict["valid"], false);
    assert_eq!(verdict["failed"], "request");
    assert!(!verdict.contains_key("exit"), "{verdict:?}");
    Ok(())
}

#[test]
fn check_evidence_json_errors() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = |name: &str, bytes: &[u8]| -> anyhow::Result<_> {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes)?;
        Ok(path)
    };
    let mut v2 = bundle()?;
    v2.v = 2;
    let cases = [
        (dir.path().join("missing"), "not_found"),
        (dir.path().to_path_buf(), "unreadable"),
        (file("empty", b"")?, "malformed"),
        (file("garbage", b"\xff\x00not cbor at all")?, "malformed"),
        (
            file("huge", &vec![0u8; evidence::MAX_BUNDLE + 1])?,
            "too_large",
        ),
        (file("v2", &v2.encode())?, "version"),
    ];
    for (path, kind) in &cases {
        let out = audit(&[
            OsStr::new("check-evidence"),
            "--json".as_ref(),
            path.as_os_str(),
        ])?;
        let error = object(&out)?;
        assert_eq!(out.status.code(), Some(2), "{}: {error:?}", path.display());
        assert_eq!(error["valid"], false, "{error:?}");
        assert_eq!(error["failed"], *kind, "{error:?}");
        assert_eq!(error["exit"], 2, "{error:?}");
        assert!(error["detail"].is_string(), "{error:?}");
        let out = audit(&[OsStr::new("check-evidence"), path.as_os_str()])?;
        assert_eq!(out.status.code(), Some(2));
        assert!(out.stdout.is_empty() && !out.stderr.is_empty());
    }

    // a usage error is clap's text on stderr, even with --json
    let out = audit(&["check-evidence", "--json", "--bogus"])?;
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    Ok(())
}

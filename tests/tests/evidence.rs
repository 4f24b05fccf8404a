//! Evidence bundles from real chains: calls through a real gateway, bundles built from the
//! stores and from export files, checked alone; every altered field is refused with the check
//! that catches it; the `evidence` and `check-evidence` commands as processes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use didgate_audit::entry::{Entry, EntryKind};
use didgate_audit::evidence::{self, Bundle, EvidenceError};
use didgate_audit::{ChainRecords, Store, export, load_records, store_dir};
use didgate_client::{CallError, CallSpec};
use didgate_protocol::message::{OpenError, RefusalCode};
use didgate_tests::{Harness, alice};

/// What the scenario leaves behind: the stopped harness, the three executed calls' IDs and
/// the ID of a refused call.
struct Scenario {
    h: Harness,
    calls: Vec<[u8; 32]>,
    refused: [u8; 32],
}

/// Three refused calls (so the second executed call's proof has several hashes), then three
/// executed calls, then the gateway is stopped.
async fn scenario() -> anyhow::Result<Scenario> {
    let mut h = Harness::start().await?;
    let a = h.client("alice", alice()).await?;
    for _ in 0..3 {
        let r = a
            .call(CallSpec::new("payments", "GET", "/v2/balance"))
            .await;
        assert!(
            matches!(
                r,
                Err(CallError::Refused {
                    code: RefusalCode::Policy,
                    ..
                })
            ),
            "{r:?}"
        );
    }
    let mut calls = Vec::new();
    for amount in 1..=3 {
        let spec = CallSpec::new("payments", "POST", "/v1/charges").body(
            format!(r#"{{"amount":{amount},"currency":"usd"}}"#)
                .as_bytes()
                .to_vec(),
        );
        let answer = a.call(spec).await?;
        assert_eq!(answer.status, 200);
        calls.push(answer.call);
    }
    a.close().await;
    drop(a);
    h.stop().await;
    // the refused calls' IDs, from alice's request entries
    let client = load_records(&h.chain_dir("alice"))?;
    let mut requests = Vec::new();
    for (_, bytes) in &client.entries {
        let e = Entry::decode(bytes)?;
        if e.kind == EntryKind::Request {
            requests.extend(e.call);
        }
    }
    let refused = *requests
        .first()
        .ok_or_else(|| anyhow::anyhow!("no request entries"))?;
    assert!(!calls.contains(&refused));
    Ok(Scenario { h, calls, refused })
}

fn refusal(bundle: &Bundle) -> anyhow::Result<EvidenceError> {
    match evidence::check(&bundle.encode()) {
        Ok(v) => anyhow::bail!("an altered bundle was accepted: {v:?}"),
        Err(e) => Ok(e),
    }
}

fn flip_last(bytes: &mut [u8]) {
    if let Some(b) = bytes.last_mut() {
        *b ^= 0x01;
    }
}

/// A small deterministic xorshift generator for the random byte flips.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evidence_of_a_real_call_holds_alone_and_every_alteration_is_refused() -> anyhow::Result<()>
{
    let s = scenario().await?;
    let h = &s.h;
    let call = s.calls[1];

    // from the two databases (records), from the gateway store directly, from export files
    let client = load_records(&h.chain_dir("alice"))?;
    let gateway = load_records(&h.gw_dir())?;
    let bundle = evidence::build(&client, &gateway, call)?;
    let other = evidence::build(&client, &gateway, s.calls[2])?;
    the_same_bundle_from_the_store_and_from_exports(h, &client, &bundle)?;
    it_holds_alone(h, &bundle)?;
    // no evidence for a refused call or an unknown one
    assert!(matches!(
        evidence::build(&client, &gateway, s.refused),
        Err(EvidenceError::NoReceipt(_))
    ));
    assert!(matches!(
        evidence::build(&client, &gateway, [7; 32]),
        Err(EvidenceError::NoRequest(_))
    ));

    altered_requests_and_receipts_are_refused(&bundle, &other)?;
    altered_entries_are_refused(&bundle, &other, &gateway)?;
    altered_proofs_are_refused(&bundle, &other)?;
    damaged_files_are_refused(&bundle)
}

/// The bundle built from the gateway store directly (its persisted subtrees) and from export
/// files is the one built from the records.
fn the_same_bundle_from_the_store_and_from_exports(
    h: &Harness,
    client: &ChainRecords,
    bundle: &Bundle,
) -> anyhow::Result<()> {
    let call = bundle_call(bundle)?;
    let exports = h.dir.path().join("exports");
    std::fs::create_dir_all(&exports)?;
    {
        let store = Store::open(&store_dir(&h.gw_dir()), &[])?;
        assert_eq!(
            &evidence::build_from_store(client, &store, call)?,
            bundle,
            "the store's persisted subtrees give the same proof as the entries"
        );
        export::export(&store, &exports.join("gateway.cbor"))?;
    }
    {
        let store = Store::open(&h.chain_dir("alice"), &[])?;
        export::export(&store, &exports.join("alice.cbor"))?;
    }
    let from_exports = evidence::build(
        &load_records(&exports.join("alice.cbor"))?,
        &load_records(&exports.join("gateway.cbor"))?,
        call,
    )?;
    assert_eq!(&from_exports, bundle);
    Ok(())
}

/// The call a bundle is evidence of, as its closing entry names it.
fn bundle_call(bundle: &Bundle) -> anyhow::Result<[u8; 32]> {
    Entry::decode(&bundle.entry)?
        .call
        .ok_or_else(|| anyhow::anyhow!("the bundle's entry names no call"))
}

/// The bundle holds alone, and says what it shows.
fn it_holds_alone(h: &Harness, bundle: &Bundle) -> anyhow::Result<()> {
    let call = bundle_call(bundle)?;
    let bytes = bundle.encode();
    let verdict = evidence::check(&bytes)?;
    assert_eq!(verdict.call, call);
    assert_eq!(verdict.client, alice().did().to_string());
    assert_eq!(verdict.gateway, h.gw_did.to_string());
    assert_eq!(
        (
            verdict.upstream.as_str(),
            verdict.method.as_str(),
            verdict.path.as_str()
        ),
        ("payments", "POST", "/v1/charges")
    );
    assert_eq!(verdict.status, 200);
    let closing = Entry::decode(&bundle.entry)?;
    assert_eq!(
        (closing.kind, closing.seq, closing.call),
        (EntryKind::Executed, verdict.seq, Some(call))
    );
    assert!(
        bundle.proof.len() >= 2,
        "proof of {} hashes at seq {}",
        bundle.proof.len(),
        verdict.seq
    );
    assert_eq!(&Bundle::decode(&bytes)?, bundle);
    Ok(())
}

/// The request and the receipt: a flipped byte, another call's, the request in the
/// receipt's place; and both of another call with this call's entry and proof.
fn altered_requests_and_receipts_are_refused(
    bundle: &Bundle,
    other: &Bundle,
) -> anyhow::Result<()> {
    let mut b = bundle.clone();
    flip_last(&mut b.request);
    let e = refusal(&b)?;
    assert!(
        matches!(e, EvidenceError::Request(OpenError::Envelope(_))),
        "{e:?}"
    );
    let mut b = bundle.clone();
    b.request[bundle.request.len() / 2] ^= 0x40;
    let e = refusal(&b)?;
    assert!(matches!(e, EvidenceError::Request(_)), "{e:?}");
    let mut b = bundle.clone();
    b.request = other.request.clone();
    let e = refusal(&b)?;
    assert!(matches!(e, EvidenceError::CallMismatch { .. }), "{e:?}");
    let mut b = bundle.clone();
    b.request = Vec::new();
    let e = refusal(&b)?;
    assert!(matches!(e, EvidenceError::Request(_)), "{e:?}");

    // receipt: a flipped byte, another call's receipt, the request in its place
    let mut b = bundle.clone();
    flip_last(&mut b.receipt);
    let e = refusal(&b)?;
    assert!(
        matches!(e, EvidenceError::Receipt(OpenError::Envelope(_))),
        "{e:?}"
    );
    let mut b = bundle.clone();
    b.receipt[bundle.receipt.len() / 2] ^= 0x40;
    let e = refusal(&b)?;
    assert!(matches!(e, EvidenceError::Receipt(_)), "{e:?}");
    let mut b = bundle.clone();
    b.receipt = other.receipt.clone();
    let e = refusal(&b)?;
    assert!(matches!(e, EvidenceError::CallMismatch { .. }), "{e:?}");
    let mut b = bundle.clone();
    b.receipt = bundle.request.clone();
    let e = refusal(&b)?;
    assert!(matches!(e, EvidenceError::Receipt(_)), "{e:?}");
    // request and receipt of the other call, with this call's entry and proof
    let mut b = bundle.clone();
    b.request = other.request.clone();
    b.receipt = other.receipt.clone();
    let e = refusal(&b)?;
    assert!(matches!(e, EvidenceError::EntryHash), "{e:?}");
    Ok(())
}

/// The closing entry: a flipped byte, another call's entry, this call's executing entry
/// (from the gateway's records), empty.
fn altered_entries_are_refused(
    bundle: &Bundle,
    other: &Bundle,
    gateway: &ChainRecords,
) -> anyhow::Result<()> {
    let call = bundle_call(bundle)?;
    let mut b = bundle.clone();
    flip_last(&mut b.entry);
    assert!(matches!(refusal(&b)?, EvidenceError::EntryHash));
    let mut b = bundle.clone();
    b.entry = other.entry.clone();
    assert!(matches!(refusal(&b)?, EvidenceError::EntryHash));
    let executing = gateway
        .entries
        .iter()
        .find(|(_, bytes)| {
            Entry::decode(bytes)
                .is_ok_and(|e| e.kind == EntryKind::Executing && e.call == Some(call))
        })
        .map(|(_, bytes)| bytes.clone())
        .ok_or_else(|| anyhow::anyhow!("no executing entry"))?;
    let mut b = bundle.clone();
    b.entry = executing;
    assert!(matches!(refusal(&b)?, EvidenceError::EntryHash));
    let mut b = bundle.clone();
    b.entry = Vec::new();
    assert!(matches!(refusal(&b)?, EvidenceError::EntryHash));
    Ok(())
}

/// The inclusion proof: each element flipped, replaced by another's, or swapped; its length
/// changed.
fn altered_proofs_are_refused(bundle: &Bundle, other: &Bundle) -> anyhow::Result<()> {
    for i in 0..bundle.proof.len() {
        for byte in [0, 17, 31] {
            let mut b = bundle.clone();
            b.proof[i][byte] ^= 0x80;
            let e = refusal(&b)?;
            assert!(matches!(e, EvidenceError::Inclusion), "element {i}: {e:?}");
        }
        let mut b = bundle.clone();
        b.proof[i] = other.proof.first().copied().unwrap_or([0; 32]);
        let e = refusal(&b)?;
        assert!(matches!(e, EvidenceError::Inclusion), "element {i}: {e:?}");
    }
    let mut b = bundle.clone();
    b.proof.swap(0, 1);
    assert!(matches!(refusal(&b)?, EvidenceError::Inclusion));
    let mut b = bundle.clone();
    b.proof.reverse();
    assert!(matches!(refusal(&b)?, EvidenceError::Inclusion));
    let n = bundle.proof.len();
    for (what, proof) in [
        ("last dropped", bundle.proof[..n - 1].to_vec()),
        ("first dropped", bundle.proof[1..].to_vec()),
        ("empty", Vec::new()),
        ("one more", [bundle.proof.clone(), vec![[0; 32]]].concat()),
        (
            "doubled",
            [bundle.proof.clone(), bundle.proof.clone()].concat(),
        ),
        ("another call's", other.proof.clone()),
    ] {
        let mut b = bundle.clone();
        b.proof = proof;
        let e = refusal(&b)?;
        if b.proof.len() == n {
            assert!(matches!(e, EvidenceError::Inclusion), "{what}: {e:?}");
        } else {
            assert!(
                matches!(e, EvidenceError::ProofLength { expected, got }
                    if expected == n && got == b.proof.len()),
                "{what}: {e:?}"
            );
        }
    }
    Ok(())
}

/// Another version, trailing bytes, truncations, garbage, an oversize file, every single-bit
/// flip and random multi-byte damage: all refused, without panic.
fn damaged_files_are_refused(bundle: &Bundle) -> anyhow::Result<()> {
    let bytes = bundle.encode();
    // version
    for v in [0, 2, u64::MAX] {
        let mut b = bundle.clone();
        b.v = v;
        let e = refusal(&b)?;
        assert!(
            matches!(e, EvidenceError::Version(got) if got == v) && e.is_undecodable(),
            "{e:?}"
        );
    }

    // trailing bytes, truncations and garbage: refused as undecodable, without panic
    let mut trailing = bytes.clone();
    trailing.push(0);
    let e = evidence::check(&trailing).err();
    assert!(
        e.as_ref().is_some_and(EvidenceError::is_undecodable),
        "{e:?}"
    );
    let mut twice = bytes.clone();
    twice.extend_from_slice(&bytes);
    assert!(evidence::check(&twice).is_err_and(|e| e.is_undecodable()));
    for len in 0..bytes.len() {
        let e = evidence::check(&bytes[..len]).err();
        assert!(
            e.as_ref().is_some_and(EvidenceError::is_undecodable),
            "{len}: {e:?}"
        );
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for len in [0usize, 1, 7, 64, 1000, 5000] {
        let garbage: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        assert!(evidence::check(&garbage).is_err_and(|e| e.is_undecodable()));
    }
    let huge = vec![0u8; evidence::MAX_BUNDLE + 1];
    assert!(matches!(
        evidence::check(&huge),
        Err(EvidenceError::TooLarge(_))
    ));

    // every single-bit flip anywhere in the file, and random multi-byte damage, is refused
    for pos in 0..bytes.len() {
        for bit in [0u8, 3, 7] {
            let mut damaged = bytes.clone();
            damaged[pos] ^= 1 << bit;
            assert!(
                evidence::check(&damaged).is_err(),
                "flipping bit {bit} of byte {pos} was accepted"
            );
        }
    }
    for _ in 0..2000 {
        let mut damaged = bytes.clone();
        for _ in 0..=(rng.next() % 4) {
            let pos = (rng.next() % damaged.len() as u64) as usize;
            damaged[pos] ^= (rng.next() % 255 + 1) as u8;
        }
        assert!(evidence::check(&damaged).is_err());
    }
    Ok(())
}

fn audit_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    exe.parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("didgate-audit"))
        .ok_or_else(|| anyhow::anyhow!("no bin dir"))
}

fn run(args: &[&str], paths: &[&Path]) -> anyhow::Result<Output> {
    let mut cmd = Command::new(audit_bin()?);
    cmd.args(args);
    for p in paths {
        cmd.arg(p);
    }
    Ok(cmd.output()?)
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evidence_and_check_evidence_commands() -> anyhow::Result<()> {
    let s = scenario().await?;
    let h = &s.h;
    let dir = h.dir.path().join("cli");
    std::fs::create_dir_all(&dir)?;
    let call = hex::encode(s.calls[1]);
    let bundle_path = dir.join("call.evidence");

    // from the databases
    let out = evidence_cmd(&h.chain_dir("alice"), &h.gw_dir(), &call, &bundle_path)?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let bytes = std::fs::read(&bundle_path)?;
    let expected = evidence::build(
        &load_records(&h.chain_dir("alice"))?,
        &load_records(&h.gw_dir())?,
        s.calls[1],
    )?;
    assert_eq!(bytes, expected.encode());

    // from export files written by `didgate-audit export`
    let gw_export = dir.join("gateway.cbor");
    let cl_export = dir.join("alice.cbor");
    let gw_dir = h.gw_dir();
    let chain_dir = h.chain_dir("alice");
    for (db, file) in [(&gw_dir, &gw_export), (&chain_dir, &cl_export)] {
        let out = run(&["export", "--db"], &[db])?;
        assert_eq!(out.status.code(), Some(2), "--out is required");
        let out = Command::new(audit_bin()?)
            .args(["export", "--db"])
            .arg(db)
            .arg("--out")
            .arg(file)
            .output()?;
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    }
    let from_exports = dir.join("from-exports.evidence");
    let out = evidence_cmd(&cl_export, &gw_export, &call, &from_exports)?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(std::fs::read(&from_exports)?, bytes);

    check_evidence_accepts(h, &bundle_path, &call)?;
    let other_receipt = evidence::build(
        &load_records(&cl_export)?,
        &load_records(&gw_export)?,
        s.calls[2],
    )?
    .receipt;
    check_evidence_refuses(&dir, &expected, other_receipt)?;
    check_evidence_cannot_read(&dir, &expected, &gw_export)?;
    evidence_fails(&dir, (&cl_export, &gw_export), &call, s.refused)
}

/// `didgate-audit evidence --client CLIENT --gateway GATEWAY --call CALL --out OUT`.
fn evidence_cmd(client: &Path, gateway: &Path, call: &str, out: &Path) -> anyhow::Result<Output> {
    Command::new(audit_bin()?)
        .args(["evidence", "--client"])
        .arg(client)
        .arg("--gateway")
        .arg(gateway)
        .args(["--call", call, "--out"])
        .arg(out)
        .output()
        .map_err(anyhow::Error::from)
}

/// check-evidence on a valid bundle: exit 0, text and JSON, naming the call and its parties.
fn check_evidence_accepts(h: &Harness, bundle_path: &Path, call: &str) -> anyhow::Result<()> {
    let out = run(&["check-evidence"], &[bundle_path])?;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.contains("verdict: OK"), "{t}");
    assert!(t.contains(call), "{t}");
    assert!(t.contains(alice().did().as_str()), "{t}");
    assert!(t.contains(h.gw_did.as_str()), "{t}");
    assert!(t.contains("POST payments /v1/charges"), "{t}");
    let out = run(&["check-evidence", "--json"], &[bundle_path])?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(json["valid"], true);
    assert_eq!(json["verdict"]["call"], call);
    assert_eq!(json["verdict"]["client"], alice().did().as_str());
    assert_eq!(json["verdict"]["status"], 200);
    Ok(())
}

/// check-evidence on a bundle whose proof is altered, or that carries another call's
/// receipt: exit 1, naming the failed check.
fn check_evidence_refuses(
    dir: &Path,
    expected: &Bundle,
    another_receipt: Vec<u8>,
) -> anyhow::Result<()> {
    let mut tampered = expected.clone();
    tampered.proof[0][0] ^= 1;
    let tampered_path = dir.join("tampered.evidence");
    std::fs::write(&tampered_path, tampered.encode())?;
    let out = run(&["check-evidence"], &[&tampered_path])?;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("verdict: INVALID, inclusion"), "{t}");
    let out = run(&["check-evidence", "--json"], &[&tampered_path])?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(json["valid"], false);
    assert_eq!(json["failed"], "inclusion");
    let mut other_receipt = expected.clone();
    other_receipt.receipt = another_receipt;
    std::fs::write(&tampered_path, other_receipt.encode())?;
    let out = run(&["check-evidence"], &[&tampered_path])?;
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("call_mismatch"), "{t}");
    Ok(())
}

/// check-evidence on what is not a bundle (garbage, trailing bytes, another version, an
/// export file, a missing file, a directory) or with no file: exit 2.
fn check_evidence_cannot_read(
    dir: &Path,
    expected: &Bundle,
    gw_export: &Path,
) -> anyhow::Result<()> {
    let bytes = expected.encode();
    let garbage = dir.join("garbage");
    std::fs::write(&garbage, b"\xff\x00not cbor at all")?;
    let mut trailing_bytes = bytes.clone();
    trailing_bytes.push(0);
    let trailing = dir.join("trailing");
    std::fs::write(&trailing, trailing_bytes)?;
    let mut v2 = expected.clone();
    v2.v = 2;
    let v2_path = dir.join("v2");
    std::fs::write(&v2_path, v2.encode())?;
    let missing = dir.join("missing");
    for (path, json) in [
        (garbage.as_path(), false),
        (&trailing, false),
        (&v2_path, true),
        (gw_export, false),
        (&missing, true),
        (dir, false),
    ] {
        let args: &[&str] = if json {
            &["check-evidence", "--json"]
        } else {
            &["check-evidence"]
        };
        let out = run(args, &[path])?;
        assert_eq!(
            out.status.code(),
            Some(2),
            "{}: {}",
            path.display(),
            text(&out)
        );
    }
    let out = run(&["check-evidence"], &[])?;
    assert_eq!(out.status.code(), Some(2));
    Ok(())
}

/// evidence: no receipt or no request for the call is exit 1; usage and I/O errors exit 2.
fn evidence_fails(
    dir: &Path,
    (cl_export, gw_export): (&Path, &Path),
    call: &str,
    refused: [u8; 32],
) -> anyhow::Result<()> {
    let nowhere = dir.join("nowhere.evidence");
    let refused = hex::encode(refused);
    let out = evidence_cmd(cl_export, gw_export, &refused, &nowhere)?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("no receipt"), "{}", text(&out));
    let out = evidence_cmd(cl_export, gw_export, &hex::encode([7u8; 32]), &nowhere)?;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(!nowhere.exists());
    for bad in [&call[..62], "zz", &format!("{call}00")] {
        let out = evidence_cmd(cl_export, gw_export, bad, &nowhere)?;
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", text(&out));
    }
    let out = evidence_cmd(cl_export, Path::new("/nonexistent/didgate"), call, &nowhere)?;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = evidence_cmd(cl_export, gw_export, call, &dir.join("no/such/dir/x"))?;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    Ok(())
}

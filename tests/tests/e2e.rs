//! End-to-end: real gateway, real upstream, real clients over QUIC on loopback, real stores.

use didgate_audit::entry::{Entry, EntryKind};
use didgate_audit::verify::ViolationKind;
use didgate_audit::{load_records, verify};
use didgate_client::low_level::{RawExchange as _, RawFinal};
use didgate_client::{CallError, CallSpec};
use didgate_protocol::Identity;
use didgate_protocol::message::RefusalCode;
use didgate_tests::{CANARY, Harness, alice, bob, files_containing};

fn refused_with(r: &Result<didgate_client::Answer, CallError>) -> Option<RefusalCode> {
    match r {
        Err(CallError::Refused { code, .. }) => Some(*code),
        _ => None,
    }
}

fn raw_code(raw: &didgate_client::low_level::RawAnswer) -> Option<RefusalCode> {
    match &raw.last {
        RawFinal::Refusal(r) => Some(r.message().code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_call_injects_key_that_never_reaches_the_client() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let a = h.client("alice", alice()).await?;
    let answer = a
        .call(CallSpec::new("payments", "GET", "/v1/echo-headers"))
        .await?;
    assert_eq!(answer.status, 200);
    let seen = h.upstream.seen();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].authorized, "the upstream got the injected key");
    assert_eq!(
        seen[0].credential_fingerprint.as_deref(),
        Some(didgate_daemon::upstream_demo::DemoUpstream::fingerprint(CANARY).as_str())
    );
    assert!(
        seen[0].idempotency_key.is_some(),
        "the grant id is passed as Idempotency-Key"
    );
    let everything = format!(
        "{:?}{}",
        answer.headers,
        String::from_utf8_lossy(&answer.body)
    );
    assert!(!everything.contains(CANARY));
    a.close().await;
    drop(a);
    h.stop().await;
    // the canary is nowhere on disk but as ciphertext in the gateway's store
    assert!(
        files_containing(h.dir.path(), CANARY.as_bytes()).is_empty(),
        "canary found on disk"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn did_outside_policy_is_refused_and_audited() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let stranger = h
        .client("stranger", Identity::from_seed(&[0x55; 32]))
        .await?;
    let r = stranger
        .call(CallSpec::new("payments", "GET", "/v1/balance"))
        .await;
    assert_eq!(refused_with(&r), Some(RefusalCode::Policy));
    // bob is known (readers) but may not charge: an individual refusal entry
    let b = h.client("bob", bob()).await?;
    let r = b
        .call(CallSpec::new("payments", "POST", "/v1/charges").body(b"{}".to_vec()))
        .await;
    assert_eq!(refused_with(&r), Some(RefusalCode::Policy));
    assert!(
        h.upstream.seen().is_empty(),
        "nothing refused reached the upstream"
    );
    for c in [stranger, b] {
        c.close().await;
    }
    h.stop().await;
    let records = load_records(&h.gw_dir())?;
    let entries: Vec<Entry> = records
        .entries
        .iter()
        .map(|(_, b)| Entry::decode(b))
        .collect::<Result<_, _>>()?;
    assert!(entries.iter().any(|e| e.kind == EntryKind::Refused
        && e.code.as_deref() == Some("policy")
        && e.subject.as_deref() == Some(bob().did().as_str())));
    assert!(
        entries.iter().any(|e| e.kind == EntryKind::Refusals
            && e.count == Some(1)
            && e.code.as_deref() == Some("policy=1")),
        "the stranger's refusal is counted at shutdown"
    );
    let report = verify::verify(
        &[records],
        &[
            load_records(&h.chain_dir("bob"))?,
            load_records(&h.chain_dir("stranger"))?,
        ],
    );
    assert!(report.ok(), "{:?}", report.violations);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_request_is_refused_also_after_restart() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let a = h.client("alice", alice()).await?;
    let spec = CallSpec::new("payments", "POST", "/v1/charges")
        .body(br#"{"amount":1,"currency":"usd"}"#.to_vec());
    let (bytes, _call) = a.sign(&spec)?;
    let first = a.send_signed(&bytes, &spec.body).await?;
    assert_eq!(raw_code(&first), None, "first use executes");
    let again = a.send_signed(&bytes, &spec.body).await?;
    assert_eq!(raw_code(&again), Some(RefusalCode::Replay));
    a.close().await;
    drop(a);
    h.restart().await?;
    let a = h.client("alice", alice()).await?;
    let after = a.send_signed(&bytes, &spec.body).await?;
    assert_eq!(
        raw_code(&after),
        Some(RefusalCode::Replay),
        "replay keys survive a restart"
    );
    assert_eq!(h.upstream.seen().len(), 1);
    a.close().await;
    h.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_signed_request_on_concurrent_streams_executes_once() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let a = std::sync::Arc::new(h.client("alice", alice()).await?);
    let spec = CallSpec::new("payments", "POST", "/v1/charges")
        .body(br#"{"amount":2,"currency":"usd"}"#.to_vec());
    let (bytes, _) = a.sign(&spec)?;
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(8));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (a, bytes, body, barrier) =
            (a.clone(), bytes.clone(), spec.body.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            a.send_signed(&bytes, &body).await
        }));
    }
    let mut executed = 0;
    let mut replays = 0;
    for t in tasks {
        match raw_code(&t.await??) {
            None => executed += 1,
            Some(RefusalCode::Replay) => replays += 1,
            Some(other) => panic!("unexpected refusal {other}"),
        }
    }
    assert_eq!((executed, replays), (1, 7));
    assert_eq!(h.upstream.seen().len(), 1, "the upstream saw the call once");
    a.close().await;
    h.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_identity_other_than_signer_is_refused() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let a = h.client("alice", alice()).await?;
    let mallory = h
        .client("mallory", Identity::from_seed(&[0x66; 32]))
        .await?;
    let (bytes, _) = a.sign(&CallSpec::new("payments", "GET", "/v1/balance"))?;
    let raw = mallory.send_signed(&bytes, b"").await?;
    assert_eq!(raw_code(&raw), Some(RefusalCode::PeerMismatch));
    assert!(h.upstream.seen().is_empty());
    for c in [a, mallory] {
        c.close().await;
    }
    h.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_canonical_paths_are_refused_before_policy() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let a = h.client("alice", alice()).await?;
    let stranger = h
        .client("stranger", Identity::from_seed(&[0x77; 32]))
        .await?;
    for path in [
        "/v1/charges/../admin",
        "/v1/charges/a%2fb",
        "/v1/charges/%2e%2e/x",
        "/v1//charges",
        "/v1/%252f",
    ] {
        let r = a.call(CallSpec::new("payments", "GET", path)).await;
        assert_eq!(refused_with(&r), Some(RefusalCode::NotCanonical), "{path}");
        // a DID with no rule gets the same answer: canonical checks come first
        let r = stranger.call(CallSpec::new("payments", "GET", path)).await;
        assert_eq!(refused_with(&r), Some(RefusalCode::NotCanonical), "{path}");
    }
    assert!(h.upstream.seen().is_empty());
    for c in [a, stranger] {
        c.close().await;
    }
    h.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_authorization_header_never_reaches_the_upstream() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let a = h.client("alice", alice()).await?;
    for (name, value) in [
        ("authorization", "Bearer attacker"),
        ("Authorization", "Basic eDp5"),
        ("proxy-authorization", "x"),
        ("cookie", "s=1"),
    ] {
        let r = a
            .call(CallSpec::new("payments", "GET", "/v1/balance").header(name, value))
            .await;
        assert_eq!(refused_with(&r), Some(RefusalCode::NotCanonical), "{name}");
    }
    assert!(
        h.upstream.seen().is_empty(),
        "no request with a caller credential reached the upstream"
    );
    // and a normal call's Authorization is the gateway's, not the caller's
    let ok = a
        .call(CallSpec::new("payments", "GET", "/v1/balance"))
        .await?;
    assert_eq!(ok.status, 200);
    assert!(h.upstream.seen().iter().all(|s| s.authorized));
    a.close().await;
    h.stop().await;
    Ok(())
}

/// Rewrites one entry through the storage engine (not raw file bytes).
fn alter_entry(
    store_dir: &std::path::Path,
    seq: u64,
    f: impl FnOnce(&mut Entry),
) -> anyhow::Result<()> {
    let db = fjall::Database::builder(store_dir).open()?;
    let entries = db.keyspace("entries", fjall::KeyspaceCreateOptions::default)?;
    let bytes = entries
        .get(seq.to_be_bytes())?
        .ok_or_else(|| anyhow::anyhow!("no entry {seq}"))?;
    let mut e = Entry::decode(&bytes)?;
    f(&mut e);
    entries.insert(seq.to_be_bytes(), e.encode())?;
    db.persist(fjall::PersistMode::SyncAll)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn altering_one_entry_in_either_chain_is_named_by_verify() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let a = h.client("alice", alice()).await?;
    for _ in 0..3 {
        a.call(CallSpec::new("payments", "GET", "/v1/balance"))
            .await?;
    }
    a.close().await;
    drop(a);
    h.stop().await;
    let gw_store = h.gw_dir().join("store");
    let cl_store = h.chain_dir("alice");
    let clean = verify::verify(&[load_records(&gw_store)?], &[load_records(&cl_store)?]);
    assert!(clean.ok(), "{:?}", clean.violations);

    // the first call's "executed" entry (after the secret's snapshot and addition): change
    // its status
    let executed = load_records(&gw_store)?
        .entries
        .iter()
        .find(|(_, b)| Entry::decode(b).is_ok_and(|e| e.kind == EntryKind::Executed))
        .map(|(seq, _)| *seq)
        .ok_or_else(|| anyhow::anyhow!("no executed entry"))?;
    alter_entry(&gw_store, executed, |e| e.status = Some(201))?;
    let report = verify::verify(&[load_records(&gw_store)?], &[load_records(&cl_store)?]);
    assert!(
        report
            .violations
            .iter()
            .any(|v| v.kind == ViolationKind::AlteredEntry
                && v.seq == Some(executed)
                && v.chain.contains("gateway")),
        "{:?}",
        report.violations
    );

    // the client's last entry (a result): only the recorded head commits to it
    let last = load_records(&cl_store)?.entries.len() as u64 - 1;
    alter_entry(&cl_store, last, |e| e.detail = Some("forged".into()))?;
    let report = verify::verify(&[load_records(&gw_store)?], &[load_records(&cl_store)?]);
    assert!(
        report
            .violations
            .iter()
            .any(|v| v.kind == ViolationKind::AlteredEntry
                && v.seq == Some(last)
                && v.chain.contains("alice")),
        "{:?}",
        report.violations
    );

    // and the command line says so with exit status 1, naming the entry
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("didgate-audit"))
        .ok_or_else(|| anyhow::anyhow!("no bin dir"))?;
    let out = std::process::Command::new(&bin)
        .args(["verify", "--gateway"])
        .arg(h.gw_dir())
        .arg("--client")
        .arg(&cl_store)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!("seq {executed}: altered_entry")),
        "{text}"
    );
    let out = std::process::Command::new(&bin)
        .args(["verify", "--gateway", "/nonexistent/didgate"])
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    Ok(())
}

#[test]
fn demo_command_ends_with_both_chains_verified() -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("didgated"))
        .ok_or_else(|| anyhow::anyhow!("no bin dir"))?;
    let dir = tempfile::tempdir()?;
    let out = std::process::Command::new(&bin)
        .arg("demo")
        .arg("--dir")
        .arg(dir.path().join("d"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("verdict: OK"), "{text}");
    assert!(text.contains("refused (replay)"), "{text}");
    assert!(dir.path().join("d/upstream/requests.jsonl").exists());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executing_entry_left_open_by_a_crash_is_abandoned_at_start() -> anyhow::Result<()> {
    use didgate_audit::entry::Role;
    use didgate_audit::store::{Chain, Store};
    use didgate_protocol::message::{ChainHead, Request, SignedMessage};

    let mut h = Harness::start().await?;
    h.stop().await;
    // What a crash between the executing entry and its close leaves: an open executing entry.
    let gw_identity = didgate_client::identity::load(&h.gw_dir().join("identity"))?;
    let chain = Chain::open(
        Store::open(&h.gw_dir().join("store"), didgate_gateway::gateway::SPACES)?,
        std::sync::Arc::new(gw_identity),
        Role::Gateway,
        0,
        Default::default(),
    )?;
    let req = Request {
        v: didgate_protocol::Version::CURRENT.as_u64(),
        aud: h.gw_did.to_string(),
        upstream: "payments".into(),
        method: "GET".into(),
        path: "/v1/balance".into(),
        query: vec![],
        headers: vec![],
        body_len: 0,
        body_b3: *blake3::hash(b"").as_bytes(),
        nonce: [9; 16],
        time_ms: didgate_client::low_level::now_ms(),
        head: ChainHead {
            chain: [7; 32],
            seq: 0,
            hash: [7; 32],
        },
    };
    let signed = req.sign(&alice());
    let call = didgate_protocol::envelope::verify(&signed, Request::KIND)?.digest();
    let mut e = Entry::new(EntryKind::Executing, 1);
    e.call = Some(call);
    e.signed = Some(signed);
    e.subject = Some(alice().did().to_string());
    e.grant = Some([1; 16]);
    e.peer_head = Some(req.head);
    chain.append_entry(e).await?;
    chain.close();
    drop(chain);
    let before = verify::verify(&[load_records(&h.gw_dir())?], &[]);
    assert!(
        before
            .violations
            .iter()
            .any(|v| v.kind == ViolationKind::UnclosedCall),
        "{:?}",
        before.violations
    );

    h.restart().await?;
    h.stop().await;
    let records = load_records(&h.gw_dir())?;
    let (_, last) = records
        .entries
        .last()
        .ok_or_else(|| anyhow::anyhow!("empty"))?;
    let last = Entry::decode(last)?;
    assert_eq!((last.kind, last.call), (EntryKind::Abandoned, Some(call)));
    let after = verify::verify(&[records], &[]);
    assert!(after.ok(), "{:?}", after.violations);
    Ok(())
}

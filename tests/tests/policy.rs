//! Cedar policy end to end: reload without restart (control socket, SIGHUP), in-flight calls
//! keep the set they started with, invalid sets are refused and the old one stays, refusals
//! name rule families, every entry records the deciding set's hash, per-policy grant TTL caps.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use didgate_audit::entry::{Entry, EntryKind};
use didgate_audit::{load_records, verify};
use didgate_client::{CallError, CallSpec};
use didgate_gateway::config::{Config, RawConfig};
use didgate_gateway::control;
use didgate_gateway::gateway::Gateway;
use didgate_gateway::policy::{PolicyError, PolicySet};
use didgate_protocol::Identity;
use didgate_protocol::frame::{self, FrameDecoder, FrameType};
use didgate_protocol::message::{
    self, ChainHead, Receipt, Refusal, RefusalCode, Request, SignedMessage,
};
use didgate_tests::{Harness, alice, bin, bob};

fn gateway(h: &Harness) -> anyhow::Result<Arc<Gateway>> {
    h.gateway
        .clone()
        .ok_or_else(|| anyhow::anyhow!("the gateway is not running"))
}

/// Writes `text` as the gateway's policy file and points gateway.toml at it (no `[[rule]]`).
fn write_policy(dir: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(dir.join("policies.cedar"), text)?;
    let path = dir.join("gateway.toml");
    let mut config = RawConfig::read(&path)?;
    if config.gateway.policy_file.is_none() {
        config.gateway.policy_file = Some("policies.cedar".into());
        config.rules.clear();
        std::fs::write(&path, toml::to_string(&config)?)?;
    }
    Ok(())
}

/// The hash a gateway in `dir` computes for its configuration as it is on disk now.
fn expected_hash(dir: &Path) -> anyhow::Result<[u8; 32]> {
    let config = Config::load(&dir.join("gateway.toml"))?;
    Ok(PolicySet::load(dir, &config)?.hash())
}

fn gateway_entries(dir: &Path) -> anyhow::Result<Vec<Entry>> {
    Ok(load_records(dir)?
        .entries
        .iter()
        .map(|(_, b)| Entry::decode(b))
        .collect::<Result<_, _>>()?)
}

fn refusal(r: &Result<didgate_client::Answer, CallError>) -> Option<(RefusalCode, String)> {
    match r {
        Err(CallError::Refused { code, reason, .. }) => Some((*code, reason.clone())),
        _ => None,
    }
}

/// alice may read; readers may GET the balance; nobody may create charges.
fn no_charges() -> String {
    format!(
        r#"
@id("alice-read")
permit (principal == Did::"{alice}", action in Action::"read", resource in Upstream::"payments");

@id("readers-balance")
permit (principal in Group::"readers", action == Action::"GET", resource)
when {{ resource.path == "/v1/balance" }};

@id("no-charges")
forbid (principal, action == Action::"POST", resource)
when {{ resource.path like "/v1/charges*" }};
"#,
        alice = alice().did()
    )
}

/// A call on a raw stream: the request frame now, the body later.
struct Pending {
    _endpoint: quinn::Endpoint,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    call: [u8; 32],
    body: Vec<u8>,
}

async fn start_call(
    h: &Harness,
    who: &Identity,
    method: &str,
    path: &str,
    body: &[u8],
) -> anyhow::Result<Pending> {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    endpoint.set_default_client_config(didgate_client::low_level::tls::client_config(
        who, &h.gw_did,
    )?);
    let conn = endpoint
        .connect(h.addr, didgate_client::low_level::tls::SERVER_NAME)?
        .await?;
    let req = Request {
        v: didgate_protocol::Version::CURRENT.as_u64(),
        aud: h.gw_did.to_string(),
        upstream: "payments".into(),
        method: method.into(),
        path: path.into(),
        query: vec![],
        headers: vec![("content-type".into(), "application/json".into())],
        body_len: body.len() as u64,
        body_b3: *blake3::hash(body).as_bytes(),
        nonce: rand_nonce(),
        time_ms: didgate_client::low_level::now_ms(),
        head: ChainHead {
            chain: [3; 32],
            seq: 0,
            hash: [3; 32],
        },
    };
    let signed = req.sign(who);
    let call = didgate_protocol::envelope::verify(&signed, Request::KIND)?.digest();
    let (mut send, recv) = conn.open_bi().await?;
    let mut out = BytesMut::new();
    frame::encode(FrameType::Request, &signed, &mut out)?;
    send.write_all(&out).await?;
    Ok(Pending {
        _endpoint: endpoint,
        send,
        recv,
        call,
        body: body.to_vec(),
    })
}

fn rand_nonce() -> [u8; 16] {
    let mut nonce = [0; 16];
    nonce.copy_from_slice(
        &blake3::hash(&didgate_client::low_level::now_ms().to_be_bytes()).as_bytes()[..16],
    );
    nonce
}

enum Final {
    Receipt(Receipt),
    Refusal(Refusal),
}

impl Pending {
    async fn finish(mut self, h: &Harness) -> anyhow::Result<Final> {
        let mut out = BytesMut::new();
        frame::encode_chunks(&self.body, &mut out);
        self.send.write_all(&out).await?;
        self.send.finish()?;
        let mut dec = FrameDecoder::new();
        loop {
            let Some(f) =
                didgate_client::low_level::wire::next_frame(&mut self.recv, &mut dec).await?
            else {
                anyhow::bail!("stream ended without an answer");
            };
            match f.kind {
                FrameType::Receipt => {
                    return Ok(Final::Receipt(
                        message::open_from::<Receipt>(&f.payload, &h.gw_did)?.into_message(),
                    ));
                }
                FrameType::Refusal => {
                    return Ok(Final::Refusal(
                        message::open_from::<Refusal>(&f.payload, &h.gw_did)?.into_message(),
                    ));
                }
                _ => {}
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_change_applies_without_restart_and_in_flight_calls_keep_their_set()
-> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let gw = gateway(&h)?;
    let rules_hash = gw.policy().hash();
    assert_eq!(
        rules_hash,
        expected_hash(&h.gw_dir())?,
        "the [[rule]] list is the policy"
    );
    let a = h.client("alice", alice()).await?;
    let stranger = h
        .client("stranger", Identity::from_seed(&[0x55; 32]))
        .await?;

    // Under the translated rules alice may charge.
    let first = a
        .call(CallSpec::new("payments", "GET", "/v1/balance"))
        .await?;
    assert_eq!(first.status, 200);

    // A charge whose request the gateway has admitted (under the rules) but whose body has
    // not arrived yet: it is in flight across the reload.
    let charge = br#"{"amount":7,"currency":"usd"}"#;
    let pending = start_call(&h, &alice(), "POST", "/v1/charges", charge).await?;
    // barrier: the gateway holds the call (its policy snapshot taken), waiting for the body
    let mut waited = 0;
    while gw.calls_in_flight() == 0 {
        anyhow::ensure!(waited < 10_000, "the call never reached the gateway");
        waited += 1;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    write_policy(&h.gw_dir(), &no_charges())?;
    let new_hash = gw.reload_policy()?;
    assert_ne!(new_hash, rules_hash);
    assert_eq!(new_hash, expected_hash(&h.gw_dir())?);
    assert_eq!(gw.policy().hash(), new_hash);

    let in_flight = pending.call;
    match pending.finish(&h).await? {
        Final::Receipt(r) => assert_eq!(r.call, in_flight),
        Final::Refusal(r) => {
            anyhow::bail!("the in-flight call was refused: {:?} {}", r.code, r.reason)
        }
    }

    // The next charge is decided by the new set: refused, naming the family, not the text.
    let r = a
        .call(CallSpec::new("payments", "POST", "/v1/charges").body(charge.to_vec()))
        .await;
    let (code, reason) = refusal(&r).ok_or_else(|| anyhow::anyhow!("not refused: {r:?}"))?;
    assert_eq!(code, RefusalCode::Policy);
    assert!(reason.contains("no-charges"), "{reason}");
    for text in [
        "forbid (",
        "like",
        "resource.path",
        "/v1/charges*",
        "Action::",
    ] {
        assert!(
            !reason.contains(text),
            "the reason shows policy text: {reason}"
        );
    }
    // default deny: no permit for bob's PUT
    let b = h.client("bob", bob()).await?;
    let r = b
        .call(CallSpec::new("payments", "PUT", "/v1/balance").body(b"{}".to_vec()))
        .await;
    let (code, reason) = refusal(&r).ok_or_else(|| anyhow::anyhow!("not refused: {r:?}"))?;
    assert_eq!(code, RefusalCode::Policy);
    assert!(reason.contains("no permit matched"), "{reason}");
    // reads still pass; a stranger is refused (and counted, not written one by one)
    assert_eq!(
        a.call(CallSpec::new("payments", "GET", "/v1/balance"))
            .await?
            .status,
        200
    );
    assert_eq!(
        b.call(CallSpec::new("payments", "GET", "/v1/balance"))
            .await?
            .status,
        200
    );
    let r = stranger
        .call(CallSpec::new("payments", "GET", "/v1/balance"))
        .await;
    assert_eq!(refusal(&r).map(|r| r.0), Some(RefusalCode::Policy));

    for c in [a, b, stranger] {
        c.close().await;
    }
    drop(gw);
    h.stop().await;

    each_entry_names_the_set_that_decided_it(&h.gw_dir(), (rules_hash, new_hash), in_flight)?;
    let report = verify::verify(&[load_records(&h.gw_dir())?], &[]);
    assert!(report.ok(), "{:?}", report.violations);
    Ok(())
}

/// Every gateway entry about a call records the hash of the policy set that decided it: the
/// rules' set (`rules_hash`) before the reload and for the call in flight across it, the new
/// one (`new_hash`) after.
fn each_entry_names_the_set_that_decided_it(
    gw_dir: &Path,
    (rules_hash, new_hash): ([u8; 32], [u8; 32]),
    in_flight: [u8; 32],
) -> anyhow::Result<()> {
    let entries = gateway_entries(gw_dir)?;
    // every entry about a call records the hash of the set that decided it
    let mut executing = Vec::new();
    for e in &entries {
        match e.kind {
            EntryKind::Executing | EntryKind::Executed | EntryKind::Failed | EntryKind::Refused => {
                assert!(
                    e.policy.is_some(),
                    "{:?} seq {} has no policy hash",
                    e.kind,
                    e.seq
                );
            }
            _ => {}
        }
        if e.kind == EntryKind::Executing {
            executing.push(e);
        }
    }
    assert_eq!(
        executing.len(),
        4,
        "balance, charge in flight, balance, balance"
    );
    assert_eq!(executing[0].policy, Some(rules_hash));
    let flight = executing
        .iter()
        .find(|e| e.call == Some(in_flight))
        .ok_or_else(|| anyhow::anyhow!("no executing entry for the in-flight call"))?;
    assert_eq!(
        flight.policy,
        Some(rules_hash),
        "the in-flight call keeps the set it started with"
    );
    let closed = entries
        .iter()
        .find(|e| e.kind == EntryKind::Executed && e.call == Some(in_flight))
        .ok_or_else(|| anyhow::anyhow!("the in-flight call was not closed"))?;
    assert_eq!(closed.policy, Some(rules_hash));
    assert!(executing[2..].iter().all(|e| e.policy == Some(new_hash)));
    let refused: Vec<_> = entries
        .iter()
        .filter(|e| e.kind == EntryKind::Refused)
        .collect();
    assert_eq!(
        refused.len(),
        2,
        "alice's charge and bob's PUT; the stranger is aggregated"
    );
    assert!(refused.iter().all(|e| e.policy == Some(new_hash)));
    assert!(
        refused[0]
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("no-charges"))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_policy_is_refused_by_reload_and_the_old_set_stays() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let gw = gateway(&h)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let socket = {
        let (gw, dir) = (gw.clone(), h.gw_dir());
        tokio::spawn(async move { control::server::serve(gw, &dir, stop_rx).await })
    };
    for _ in 0..100 {
        if control::socket_path(&h.gw_dir()).exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    write_policy(&h.gw_dir(), &no_charges())?;
    let reply = control::call(&h.gw_dir(), &control::Request::PolicyReload)
        .await
        .ok_or_else(|| anyhow::anyhow!("no daemon"))??;
    assert!(reply.ok, "{reply:?}");
    let good = gw.policy().hash();
    assert_eq!(reply.policy.as_deref(), Some(hex::encode(good).as_str()));

    let a = h.client("alice", alice()).await?;
    let charge = || CallSpec::new("payments", "POST", "/v1/charges").body(b"{}".to_vec());
    assert!(refusal(&a.call(charge()).await).is_some());

    // A policy that does not validate (unknown attribute), one that does not parse, and a
    // gateway.toml that names a missing file: each refused, the good set stays in force.
    for bad in [
        "@id(\"x\") permit (principal, action, resource) when { resource.host == \"a\" };",
        "permit (principal, action, resource",
    ] {
        std::fs::write(h.gw_dir().join("policies.cedar"), bad)?;
        let e = gw.reload_policy().expect_err("an invalid set is refused");
        assert!(
            matches!(e, PolicyError::Invalid(..) | PolicyError::Parse(..)),
            "{e}"
        );
        let reply = control::call(&h.gw_dir(), &control::Request::PolicyReload)
            .await
            .ok_or_else(|| anyhow::anyhow!("no daemon"))??;
        assert!(!reply.ok && reply.error.is_some(), "{reply:?}");
        assert_eq!(gw.policy().hash(), good);
        assert!(
            refusal(&a.call(charge()).await).is_some(),
            "still decided by the good set"
        );
        assert_eq!(
            a.call(CallSpec::new("payments", "GET", "/v1/balance"))
                .await?
                .status,
            200
        );
    }
    std::fs::remove_file(h.gw_dir().join("policies.cedar"))?;
    assert!(matches!(gw.reload_policy(), Err(PolicyError::Read(..))));
    assert_eq!(gw.policy().hash(), good);

    let status = control::call(&h.gw_dir(), &control::Request::Status)
        .await
        .ok_or_else(|| anyhow::anyhow!("no daemon"))??;
    assert_eq!(status.policy.as_deref(), Some(hex::encode(good).as_str()));

    a.close().await;
    let _ = stop_tx.send(true);
    socket.await??;
    drop(gw);
    h.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_lifetime_is_capped_per_policy() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let gw = gateway(&h)?;
    assert_eq!(gw.config().gateway().grant_ttl_secs, 10);
    write_policy(
        &h.gw_dir(),
        &format!(
            r#"
@id("charge-short") @grant_ttl_secs("2")
permit (principal == Did::"{a}", action == Action::"POST", resource);
@id("read-long") @grant_ttl_secs("3600")
permit (principal == Did::"{a}", action == Action::"GET", resource);
"#,
            a = alice().did()
        ),
    )?;
    gw.reload_policy()?;
    let a = h.client("alice", alice()).await?;
    let spec = CallSpec::new("payments", "POST", "/v1/charges")
        .header("content-type", "application/json")
        .body(br#"{"amount":1,"currency":"usd"}"#.to_vec());
    let before = didgate_client::low_level::now_ms();
    let short = a.grant(spec).await?;
    let after = didgate_client::low_level::now_ms();
    assert!(
        short.grant.expires_ms >= before + 2000 && short.grant.expires_ms <= after + 2000,
        "capped at 2 s: {} in [{before}, {after}] + 2000",
        short.grant.expires_ms
    );
    // a cap above the configured lifetime does not extend it
    let before = didgate_client::low_level::now_ms();
    let long = a
        .grant(CallSpec::new("payments", "GET", "/v1/balance"))
        .await?;
    let after = didgate_client::low_level::now_ms();
    assert!(long.grant.expires_ms >= before + 10_000 && long.grant.expires_ms <= after + 10_000);
    assert_eq!(a.execute(&short).await?.status, 200);
    a.close().await;
    drop(gw);
    h.stop().await;
    Ok(())
}

/// `didgated policy check`, and `policy reload` / SIGHUP against a real `didgated serve`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn didgated_policy_check_reload_and_sighup() -> anyhow::Result<()> {
    let didgated = bin("didgated")?;
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("gw");
    let out = Command::new(&didgated)
        .args(["init", "--listen", "127.0.0.1:0", "--data"])
        .arg(&data)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // check: the template is valid (and denies everything); an invalid file exits 2
    let out = Command::new(&didgated)
        .args(["policy", "check"])
        .arg(data.join("policies.cedar"))
        .output()?;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bad = tmp.path().join("bad.cedar");
    std::fs::write(
        &bad,
        "permit (principal, action == Action::\"FETCH\", resource);",
    )?;
    let out = Command::new(&didgated)
        .args(["policy", "check"])
        .arg(&bad)
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("FETCH"));
    // reload with no daemon is an error
    let out = Command::new(&didgated)
        .args(["policy", "reload", "--data"])
        .arg(&data)
        .output()?;
    assert_eq!(out.status.code(), Some(2));

    let mut serve = Command::new(&didgated)
        .args(["serve", "--data"])
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let status = || async {
        control::call(&data, &control::Request::Status)
            .await
            .and_then(Result::ok)
    };
    let mut started = None;
    for _ in 0..250 {
        if let Some(s) = status().await {
            started = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = started.ok_or_else(|| anyhow::anyhow!("didgated serve did not start"))?;
    assert_eq!(started.policy, Some(hex::encode(expected_hash(&data)?)));

    // SIGHUP applies a new policy file
    write_policy(&data, &no_charges())?;
    let want = hex::encode(expected_hash(&data)?);
    assert_ne!(started.policy.as_deref(), Some(want.as_str()));
    let kill = Command::new("sh")
        .args(["-c", &format!("kill -HUP {}", serve.id())])
        .status()?;
    assert!(kill.success());
    let mut seen = None;
    for _ in 0..250 {
        seen = status().await.and_then(|s| s.policy);
        if seen.as_deref() == Some(want.as_str()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        seen.as_deref(),
        Some(want.as_str()),
        "SIGHUP reloaded the policy"
    );

    // `policy reload`: an invalid file exits 2 and changes nothing; a valid one prints the hash
    std::fs::write(
        data.join("policies.cedar"),
        "forbid (principal, action, resource",
    )?;
    let out = Command::new(&didgated)
        .args(["policy", "reload", "--data"])
        .arg(&data)
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        status().await.and_then(|s| s.policy).as_deref(),
        Some(want.as_str())
    );
    std::fs::write(data.join("policies.cedar"), "")?;
    let out = Command::new(&didgated)
        .args(["policy", "reload", "--data"])
        .arg(&data)
        .output()?;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let empty = hex::encode(expected_hash(&data)?);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&empty));

    let _ = Command::new("sh")
        .args(["-c", &format!("kill -TERM {}", serve.id())])
        .status()?;
    let exit = serve.wait()?;
    assert!(exit.success(), "didgated serve exited with {exit:?}");
    let mut log = String::new();
    if let Some(mut err) = serve.stderr.take() {
        use std::io::Read;
        err.read_to_string(&mut log)?;
    }
    assert!(log.contains("SIGHUP: policy reloaded"), "{log}");
    Ok(())
}

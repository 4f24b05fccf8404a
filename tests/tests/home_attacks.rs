//! Attacks on one home's shared chain (`didgate_client::local`): each test fails while the
//! weakness it is named after is there.
//!
//! The attacker of the first three tests is a process of the home's user that does not hold
//! the identity's key (a passphrase-sealed identity it cannot open): it can rename and bind
//! files in the home (0700, its user's) and take the chain's lock, nothing more.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use didgate_audit::entry::Outcome;
use didgate_client::local::Caller;
use didgate_client::{CallError, CallSpec};
use didgate_tests::{Harness, ProxyProcess, alice, alice_home, bin, bob, results_in as results};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

const DEADLINE: Duration = Duration::from_secs(60);

async fn write_frame(s: &mut UnixStream, tag: u8, payload: &[u8]) -> anyhow::Result<()> {
    let len = u32::try_from(payload.len() + 1)?;
    s.write_all(&len.to_be_bytes()).await?;
    s.write_all(&[tag]).await?;
    s.write_all(payload).await?;
    Ok(())
}

async fn send(s: &mut UnixStream, msg: &Value) -> anyhow::Result<()> {
    write_frame(s, b'M', &serde_json::to_vec(msg)?).await
}

/// The next frame: its tag and payload.
async fn frame(s: &mut UnixStream) -> anyhow::Result<(u8, Vec<u8>)> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    anyhow::ensure!((1..=(4 << 20) + 1).contains(&len), "frame length {len}");
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await?;
    Ok((buf[0], buf[1..].to_vec()))
}

async fn recv(s: &mut UnixStream) -> anyhow::Result<Value> {
    let (tag, payload) = tokio::time::timeout(DEADLINE, frame(s))
        .await
        .map_err(|_| anyhow::anyhow!("no frame in time"))??;
    anyhow::ensure!(tag == b'M', "a byte frame where a message was expected");
    Ok(serde_json::from_slice(&payload)?)
}

fn audit_verify(gateway: &Path, client: &Path) -> anyhow::Result<(Option<i32>, String)> {
    let out = std::process::Command::new(bin("didgate-audit")?)
        .args(["verify", "--json", "--gateway"])
        .arg(gateway)
        .arg("--client")
        .arg(client)
        .output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// The owner authenticates a connection, not an operation, and the caller cannot tell the
/// owner from a relay: a keyless process of the user that swaps `chain.sock` for its own
/// socket relays the owner's challenge to a legitimate `didgate call`, forwards its signature,
/// and then sends a call of its own choosing, which the owner signs with the identity's key
/// and makes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyless_process_relays_a_callers_signature_and_makes_its_own_call() -> anyhow::Result<()>
{
    let mut h = Harness::start().await?;
    let home = alice_home(&h)?;
    let proxy = ProxyProcess::start(&home).await?;

    // the attacker moves the owner's socket aside and listens in its place
    let real = home.join("owner.sock");
    std::fs::rename(home.join("chain.sock"), &real)?;
    let fake = UnixListener::bind(home.join("chain.sock"))?;

    // the user runs an ordinary command, which holds the key
    let _victim = tokio::process::Command::new(bin("didgate")?)
        .arg("--home")
        .arg(&home)
        .args(["--json", "call", "payments", "GET", "/v1/balance"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let (mut victim, _) = tokio::time::timeout(DEADLINE, fake.accept())
        .await
        .map_err(|_| anyhow::anyhow!("the victim never connected"))??;
    let mut owner = UnixStream::connect(&real).await?;
    let hello = recv(&mut owner).await?;
    send(&mut victim, &hello).await?;
    // the victim's request (no body) and its proof, signed over the owner's challenge
    let request = recv(&mut victim).await?;
    assert_eq!(request["m"], "request", "{request}");
    let proof = recv(&mut victim).await?;
    assert_eq!(proof["m"], "proof", "{proof}");

    // the attacker's own call, on the victim's proof
    let mut hijacked = request.clone();
    hijacked["op"] = json!({
        "op": "call", "upstream": "payments", "method": "GET", "path": "/v1/hijacked",
        "query": [], "headers": [],
    });
    send(&mut owner, &hijacked).await?;
    send(&mut owner, &proof).await?;
    let answer = recv(&mut owner).await.ok();
    let ready = answer.clone().unwrap_or_default();
    let executed = h.upstream.seen().iter().any(|r| r.path == "/v1/hijacked");
    assert_eq!(
        ready["m"], "mismatch",
        "the owner took a proof made for another request"
    );
    drop(victim);
    proxy.stop().await?;
    h.stop().await;
    // (read after the owner's answer: the upstream had been reached by then)
    assert!(
        !executed,
        "the owner made a call for a process without the key: auth {ready}, answer {answer:?}"
    );
    Ok(())
}

/// A fake owner (a keyless process that took the chain's lock and bound `chain.sock`).
/// Answers every operation with `answer` (after reading the request and its body).
async fn fake_owner(home: &Path, answer: Vec<(u8, Vec<u8>)>) -> anyhow::Result<AbortOnDrop> {
    let lock = didgate_audit::Store::open(&home.join("chain"), &[])?;
    let listener = UnixListener::bind(home.join("chain.sock"))?;
    let task = tokio::spawn(async move {
        let _lock = lock;
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let hello = json!({"m": "hello", "v": 2, "pid": 1, "challenge": "00".repeat(32)});
                send(&mut s, &hello).await?;
                let request = recv(&mut s).await?;
                let mut left = request["body_len"].as_u64().unwrap_or(0);
                while left > 0 {
                    let (_, b) = frame(&mut s).await?;
                    left = left.saturating_sub(b.len() as u64);
                }
                recv(&mut s).await?; // the proof: a fake owner cannot check it anyway
                if request["op"]["op"] == "probe" {
                    return send(&mut s, &json!({"m": "ready", "pid": 1})).await;
                }
                for (tag, payload) in answer {
                    write_frame(&mut s, tag, &payload).await?;
                }
                anyhow::Ok(())
            });
        }
    });
    Ok(AbortOnDrop(task))
}

/// Stops the fake owner (and releases its lock) when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The caller "checks the receipt again", but against the call ID the owner gives it: it never
/// sees the request the owner signed. So any genuine receipt with its body passes as the answer
/// to any call, here bob's balance read as alice's POST of a charge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fake_owner_answers_a_call_with_another_clients_receipt() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let home = alice_home(&h)?;
    let bob_client = h.client("bob", bob()).await?;
    let genuine = bob_client
        .call(CallSpec::new("payments", "GET", "/v1/balance"))
        .await?;
    bob_client.close().await;

    // a request alice really signed, for another call (GET /v1/balance)
    let (alices, _) = h.signed_request(&alice(), |_| {})?;
    let head = json!({"m": "head", "request": hex::encode(&alices), "status": genuine.status, "headers": []});
    let end = json!({"m": "end", "receipt": hex::encode(&genuine.receipt_bytes)});
    let _fake = fake_owner(
        &home,
        vec![
            (b'M', serde_json::to_vec(&head)?),
            (b'B', genuine.body.clone()),
            (b'M', serde_json::to_vec(&end)?),
        ],
    )
    .await?;

    let caller = Caller::acquire(
        &home,
        alice(),
        h.addr,
        h.gw_did.clone(),
        Duration::from_secs(2),
    )
    .await?;
    assert!(!caller.is_owner());
    let mut charge = CallSpec::new("payments", "POST", "/v1/charges");
    charge.body = br#"{"amount": 100000}"#.to_vec();
    let result = caller.call(charge).await;
    h.stop().await;
    // (a caller that refuses the fake owner may make the call itself: a real answer is fine)
    assert!(
        result.as_ref().map_or(true, |a| a.call != genuine.call),
        "alice's charge was answered with bob's balance receipt: {:?}",
        result.map(|a| (a.status, String::from_utf8_lossy(&a.body).into_owned()))
    );
    Ok(())
}

/// A refusal relayed by the owner is unsigned JSON: a fake owner makes the caller report a
/// gateway refusal the gateway never signed (here a retryable `rate_limited`, which the proxy
/// tells SDKs to retry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fake_owner_forges_an_unsigned_gateway_refusal() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let home = alice_home(&h)?;
    let failed = json!({"m": "failed", "error": {
        "kind": "refused", "code": "rate_limited", "reason": "retry in 1 ms",
        "gateway_time_ms": 1, "call": null,
    }});
    let _fake = fake_owner(&home, vec![(b'M', serde_json::to_vec(&failed)?)]).await?;
    let caller = Caller::acquire(
        &home,
        alice(),
        h.addr,
        h.gw_did.clone(),
        Duration::from_secs(2),
    )
    .await?;
    let result = caller
        .call(CallSpec::new("payments", "POST", "/v1/charges"))
        .await;
    h.stop().await;
    assert!(
        !matches!(
            result,
            Err(CallError::Refused {
                gateway_time_ms: 1,
                ..
            })
        ),
        "an unsigned refusal was taken for the gateway's: {result:?}"
    );
    Ok(())
}

/// The grant result leaves the call in `pending`, so the next open closes a granted call as
/// `unknown` ("ended before its answer") although it was answered (the grant) and has not
/// executed; a grant kept across the reopen then executes, and its receipt follows a result
/// that closed the call: the auditor flags the chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopening_a_chain_closes_a_granted_call_as_unknown() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let first = h.client("granted", alice()).await?;
    let grant = first
        .grant(CallSpec::new("payments", "GET", "/v1/balance"))
        .await?;
    first.close().await;
    drop(first);

    let second = h.client("granted", alice()).await?;
    let executed = second.execute(&grant).await;
    second.close().await;
    drop(second);
    h.stop().await;
    executed?;

    let chain = h.chain_dir("granted");
    let results = results(&chain)?;
    let (code, report) = audit_verify(&h.gw_dir(), &chain)?;
    assert_eq!(code, Some(0), "results {results:?}: {report}");
    assert!(
        !results.iter().any(|(o, _)| *o == Some(Outcome::Unknown)),
        "a granted call was closed as unknown: {results:?}"
    );
    Ok(())
}

/// A body over the owner's limit: the owner answers `failed` and closes, the caller (still
/// writing) takes the broken pipe for an owner gone before the request was sent, acquires
/// again and resends, three times, and reports that the chain "changed hands three times"
/// (a local audit failure), never the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_owners_limit_is_reported_as_the_chain_changing_hands() -> anyhow::Result<()>
{
    let mut h = Harness::start().await?;
    let home = alice_home(&h)?;
    let proxy = ProxyProcess::start(&home).await?;
    let caller = Caller::acquire(
        &home,
        alice(),
        h.addr,
        h.gw_did.clone(),
        Duration::from_secs(2),
    )
    .await?;
    assert!(!caller.is_owner());
    let mut big = CallSpec::new("payments", "POST", "/v1/charges");
    big.body = vec![b'x'; (64 << 20) + 1];
    let started = Instant::now();
    let result = tokio::time::timeout(DEADLINE, caller.call(big)).await;
    proxy.stop().await?;
    h.stop().await;
    let result = result.map_err(|_| anyhow::anyhow!("no answer in {:?}", started.elapsed()))?;
    let e = result
        .err()
        .ok_or_else(|| anyhow::anyhow!("a 64 MiB + 1 body went through"))?;
    assert!(
        e.to_string().contains("bytes") && !e.to_string().contains("changed hands"),
        "{e}"
    );
    Ok(())
}

/// `didgate export`, when it holds the chain itself, does not close the calls a killed owner
/// left pending (only a client's open does): the sealed export has a request without a result,
/// which the auditor flags, although the spec says no request stays unanswered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_after_a_killed_owner_leaves_its_call_unanswered() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let home = alice_home(&h)?;
    let proxy = ProxyProcess::start(&home).await?;
    let url = format!("{}/payments/v1/slow-head", proxy.url);
    let token = proxy.token.clone();
    let held = tokio::spawn(async move {
        didgate_client::low_level::tls::install_provider();
        let r = reqwest::Client::builder()
            .no_proxy()
            .build()?
            .get(url)
            .bearer_auth(token)
            .send()
            .await;
        anyhow::Ok(r.is_ok())
    });
    let deadline = Instant::now() + DEADLINE;
    while !h.upstream.seen().iter().any(|r| r.path == "/v1/slow-head") {
        anyhow::ensure!(Instant::now() < deadline, "the held call never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    proxy.kill().await?;
    let _ = held.await;
    h.upstream.release_slow(1);

    let out_file = h.dir.path().join("after-kill.cbor");
    let out = std::process::Command::new(bin("didgate")?)
        .arg("--home")
        .arg(&home)
        .args(["export", "--out"])
        .arg(&out_file)
        .output()?;
    anyhow::ensure!(out.status.success(), "{out:?}");
    h.stop().await;
    let (code, report) = audit_verify(&h.gw_dir(), &out_file)?;
    assert_eq!(code, Some(0), "{report}");
    Ok(())
}

/// `Client::with_chain` over a clone of an open chain (cheap to clone; the bench makes fresh
/// connections this way) closes every call in `pending` as "ended before its answer", including
/// the calls in flight of the client that shares the chain in this very process: the live call's
/// receipt then follows a result that closed it, and the auditor flags the chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_a_shared_chain_closes_the_calls_in_flight_of_its_sibling()
-> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let first = std::sync::Arc::new(h.client("shared", alice()).await?);
    let held = {
        let first = first.clone();
        tokio::spawn(async move {
            first
                .call(CallSpec::new("payments", "GET", "/v1/slow-head"))
                .await
        })
    };
    let deadline = Instant::now() + DEADLINE;
    while !h.upstream.seen().iter().any(|r| r.path == "/v1/slow-head") {
        anyhow::ensure!(Instant::now() < deadline, "the held call never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let second = didgate_client::Client::with_chain(
        std::sync::Arc::new(alice()),
        first.chain().clone(),
        h.addr,
        h.gw_did.clone(),
    )?;
    h.upstream.release_slow(1);
    let answer = tokio::time::timeout(DEADLINE, held).await??;
    second.disconnect().await;
    drop(second);
    first.close().await;
    drop(first);
    h.stop().await;
    answer?;

    let chain = h.chain_dir("shared");
    let results = results(&chain)?;
    let (code, report) = audit_verify(&h.gw_dir(), &chain)?;
    assert_eq!(code, Some(0), "results {results:?}: {report}");
    Ok(())
}

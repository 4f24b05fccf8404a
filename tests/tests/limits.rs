//! Limits and egress, end to end (specs/operation.md, "Limits and egress"): rate limits that do
//! not refill (so no timing assumption), a concurrency limit held open by a gated upstream
//! route, response size limits, upstream timeouts, streaming relay, DNS answers in private
//! ranges, redirects returned as they are.

use didgate_audit::entry::{Entry, EntryKind};
use didgate_audit::{load_records, verify};
use didgate_client::{CallError, CallSpec};
use didgate_gateway::config::{RawConfig, RawUpstream, Rule};
use didgate_gateway::limits::RateLimit;
use didgate_protocol::message::RefusalCode;
use didgate_tests::{Harness, alice, answered, bob, refusal_code};

fn reason<T>(r: &Result<T, CallError>) -> String {
    match r {
        Err(CallError::Refused { reason, .. }) => reason.clone(),
        Err(e) => e.to_string(),
        Ok(_) => "ok".into(),
    }
}

fn never_refills(burst: u64) -> RateLimit {
    RateLimit {
        burst,
        per_sec: 0.0,
    }
}

fn balance() -> CallSpec {
    CallSpec::new("payments", "GET", "/v1/balance")
}

/// The gateway chain and the named client chains verify together.
fn assert_verifies(h: &Harness, clients: &[&str]) -> anyhow::Result<()> {
    let clients = clients
        .iter()
        .map(|c| load_records(&h.chain_dir(c)))
        .collect::<Result<Vec<_>, _>>()?;
    let report = verify::verify(&[load_records(&h.gw_dir())?], &clients);
    assert!(report.ok(), "{:?}", report.violations);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_did_rate_limit_refuses_after_the_burst_and_audits() -> anyhow::Result<()> {
    let mut h = Harness::start_with(|c| c.gateway.rate_per_did = never_refills(3)).await?;
    let a = h.client("alice", alice()).await?;
    let b = h.client("bob", bob()).await?;
    for _ in 0..3 {
        assert_eq!(a.call(balance()).await?.status, 200);
    }
    for _ in 0..2 {
        let r = a.call(balance()).await;
        assert_eq!(
            refusal_code(&r),
            Some(RefusalCode::RateLimited),
            "{}",
            reason(&r)
        );
        assert!(
            reason(&r).contains("rate limit of this DID"),
            "{}",
            reason(&r)
        );
    }
    // another DID has its own bucket
    for _ in 0..2 {
        assert_eq!(b.call(balance()).await?.status, 200);
    }
    assert_eq!(h.upstream.seen().len(), 5, "3 calls of alice and 2 of bob");
    for c in [a, b] {
        c.close().await;
    }
    h.stop().await;

    let entries = h.gateway_entries()?;
    let refused: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.kind == EntryKind::Refused && e.code.as_deref() == Some("rate_limited"))
        .collect();
    assert_eq!(refused.len(), 2, "each refusal to a known DID is one entry");
    assert!(
        refused
            .iter()
            .all(|e| e.subject.as_deref() == Some(alice().did().as_str()))
    );
    // a rate-limited request consumed no grant: no executing entry for its call
    let executing: Vec<_> = entries
        .iter()
        .filter(|e| e.kind == EntryKind::Executing)
        .map(|e| e.call)
        .collect();
    assert_eq!(executing.len(), 5);
    assert!(refused.iter().all(|r| !executing.contains(&r.call)));
    assert_verifies(&h, &["alice", "bob"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_upstream_rate_limit_counts_every_caller() -> anyhow::Result<()> {
    let mut h = Harness::start_with(|c| {
        c.upstreams[0].rate_per_upstream = Some(never_refills(2));
    })
    .await?;
    let a = h.client("alice", alice()).await?;
    let b = h.client("bob", bob()).await?;
    a.call(balance()).await?;
    b.call(balance()).await?;
    let r = a.call(balance()).await;
    assert_eq!(refusal_code(&r), Some(RefusalCode::RateLimited));
    assert!(reason(&r).contains("upstream payments"), "{}", reason(&r));
    assert_eq!(
        refusal_code(&b.call(balance()).await),
        Some(RefusalCode::RateLimited)
    );
    assert_eq!(h.upstream.seen().len(), 2);
    for c in [a, b] {
        c.close().await;
    }
    h.stop().await;
    assert_verifies(&h, &["alice", "bob"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_request_takes_the_token_its_execution_does_not() -> anyhow::Result<()> {
    let mut h = Harness::start_with(|c| c.gateway.rate_per_did = never_refills(1)).await?;
    let a = h.client("alice", alice()).await?;
    let grant = a.grant(balance()).await?;
    assert_eq!(a.execute(&grant).await?.status, 200);
    assert_eq!(
        refusal_code(&a.grant(balance()).await),
        Some(RefusalCode::RateLimited)
    );
    assert_eq!(
        refusal_code(&a.call(balance()).await),
        Some(RefusalCode::RateLimited)
    );
    assert_eq!(h.upstream.seen().len(), 1);
    a.close().await;
    drop(a);
    h.stop().await;
    assert_verifies(&h, &["alice"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limit_refuses_a_second_call_in_flight() -> anyhow::Result<()> {
    let mut h = Harness::start_with(|c| c.gateway.max_concurrent_per_did = 1).await?;
    let a = h.client("alice", alice()).await?;
    let b = h.client("bob", bob()).await?;
    // the first call is held open: the upstream sends event 0, then waits for a release
    let mut first = a
        .call_streaming(CallSpec::new("payments", "GET", "/v1/slow-events?n=3"))
        .await?;
    assert_eq!(first.status(), 200);
    let chunk = first.next_chunk().await?;
    assert!(chunk.is_some(), "event 0 arrived: the call is in flight");
    let r = a.call(balance()).await;
    assert_eq!(
        refusal_code(&r),
        Some(RefusalCode::RateLimited),
        "{}",
        reason(&r)
    );
    assert!(reason(&r).contains("concurrent"), "{}", reason(&r));
    // another DID is not affected
    assert_eq!(b.call(balance()).await?.status, 200);
    h.upstream.release_slow(1);
    let receipt = first.finish().await?;
    assert_eq!(receipt.status, 200);
    // the slot is given back before the receipt is sent: the next call is admitted at once
    assert_eq!(a.call(balance()).await?.status, 200);
    for c in [a, b] {
        c.close().await;
    }
    h.stop().await;
    let entries = h.gateway_entries()?;
    assert!(entries.iter().any(|e| {
        e.kind == EntryKind::Refused
            && e.code.as_deref() == Some("rate_limited")
            && e.detail
                .as_deref()
                .is_some_and(|d| d.contains("concurrent"))
    }));
    assert_verifies(&h, &["alice", "bob"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_events_reach_the_client_before_the_upstream_finishes() -> anyhow::Result<()> {
    const EVENTS: usize = 200;
    let mut h = Harness::start().await?;
    let a = h.client("alice", alice()).await?;
    let mut answer = a
        .call_streaming(CallSpec::new(
            "payments",
            "GET",
            &format!("/v1/slow-events?n={EVENTS}"),
        ))
        .await?;
    assert_eq!(answer.status(), 200);
    assert!(
        answer
            .headers()
            .iter()
            .any(|(k, v)| k == "content-type" && v == "text/event-stream")
    );
    // event 0 arrives while the upstream is still waiting for the release (it has not sent
    // event 1 yet, and will not until this test says so)
    let mut body = Vec::new();
    while !body.ends_with(b"\n\n") {
        let chunk = answer.next_chunk().await?.expect("event 0 before the end");
        body.extend_from_slice(&chunk);
    }
    assert_eq!(body, b"data: {\"i\":0}\n\n");
    assert!(answer.receipt().is_none(), "the call is not finished");
    h.upstream.release_slow(1);
    while let Some(chunk) = answer.next_chunk().await? {
        body.extend_from_slice(&chunk);
    }
    let expected: String = (0..EVENTS)
        .map(|i| format!("data: {{\"i\":{i}}}\n\n"))
        .collect();
    assert_eq!(String::from_utf8(body.clone())?, expected);
    let receipt = answer.receipt().expect("verified receipt").clone();
    assert_eq!(receipt.resp_len, body.len() as u64);
    assert_eq!(receipt.resp_b3, *blake3::hash(&body).as_bytes());
    drop(answer);
    a.close().await;
    drop(a);
    h.stop().await;
    assert_verifies(&h, &["alice"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_over_max_response_bytes_fail_the_call() -> anyhow::Result<()> {
    let mut h = Harness::start_with(|c| c.upstreams[0].max_response_bytes = Some(50)).await?;
    let a = h.client("alice", alice()).await?;
    // a declared length above the limit: refused before the head
    let r = a.call(balance()).await;
    assert_eq!(
        refusal_code(&r),
        Some(RefusalCode::ResponseTooLarge),
        "{}",
        reason(&r)
    );
    // a chunked stream crossing it: the head and what fits, then the refusal
    let mut s = a
        .call_streaming(CallSpec::new("payments", "GET", "/v1/events?n=20"))
        .await?;
    let mut relayed = 0;
    let end = loop {
        match s.next_chunk().await {
            Ok(Some(c)) => relayed += c.len(),
            other => break other,
        }
    };
    assert_eq!(
        refusal_code(&end),
        Some(RefusalCode::ResponseTooLarge),
        "{}",
        reason(&end)
    );
    assert!(relayed <= 50, "{relayed} bytes relayed");
    drop(s);
    a.close().await;
    drop(a);
    h.stop().await;
    let failed = h
        .gateway_entries()?
        .into_iter()
        .filter(|e| e.kind == EntryKind::Failed && e.code.as_deref() == Some("response_too_large"))
        .count();
    assert_eq!(failed, 2, "both calls closed as failed");
    assert_verifies(&h, &["alice"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upstream_times_out_as_upstream_failed() -> anyhow::Result<()> {
    let mut h = Harness::start_with(|c| c.gateway.upstream_timeout_secs = 1).await?;
    let a = h.client("alice", alice()).await?;
    // no response head within the timeout
    let r = a
        .call(CallSpec::new("payments", "GET", "/v1/slow-head"))
        .await;
    assert_eq!(
        refusal_code(&r),
        Some(RefusalCode::UpstreamFailed),
        "{}",
        reason(&r)
    );
    assert!(reason(&r).contains("timed out"), "{}", reason(&r));
    // the head and event 0, then nothing within the timeout
    let mut s = a
        .call_streaming(CallSpec::new("payments", "GET", "/v1/slow-events?n=3"))
        .await?;
    assert!(s.next_chunk().await?.is_some());
    let end = loop {
        match s.next_chunk().await {
            Ok(Some(_)) => {}
            other => break other,
        }
    };
    assert_eq!(
        refusal_code(&end),
        Some(RefusalCode::UpstreamFailed),
        "{}",
        reason(&end)
    );
    assert!(reason(&end).contains("timed out"), "{}", reason(&end));
    drop(s);
    a.close().await;
    drop(a);
    h.stop().await;
    let failed: Vec<Entry> = h
        .gateway_entries()?
        .into_iter()
        .filter(|e| e.kind == EntryKind::Failed)
        .collect();
    assert_eq!(failed.len(), 2);
    assert!(
        failed
            .iter()
            .all(|e| e.code.as_deref() == Some("upstream_failed")
                && e.detail.as_deref().is_some_and(|d| d.contains("timed out")))
    );
    assert_verifies(&h, &["alice"])
}

/// Adds an upstream `name` reaching the demo upstream at `base_url` (host `host`), which alice
/// may GET.
fn add_upstream(c: &mut RawConfig, name: &str, base_url: String, host: &str, local: bool) {
    c.upstreams.push(RawUpstream {
        allowed_hosts: vec![host.into()],
        allow_headers: vec!["accept".into()],
        local,
        ..RawUpstream::new(name, base_url, "payments-key")
    });
    c.rules.push(Rule {
        principals: vec![alice().did().to_string()],
        upstream: name.into(),
        methods: vec!["GET".into()],
        paths: vec!["/v1/**".into()],
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_addresses_are_refused_unless_the_upstream_is_local() -> anyhow::Result<()> {
    let mut h = Harness::start_with(|c| {
        let base = c.upstreams[0].base_url.clone();
        let named = base.replace("127.0.0.1", "localhost");
        add_upstream(c, "by-name", named.clone(), "localhost", false);
        add_upstream(c, "by-name-local", named, "localhost", true);
        add_upstream(c, "literal", base, "127.0.0.1", false);
    })
    .await?;
    let a = h.client("alice", alice()).await?;
    // `localhost` resolves to 127.0.0.1: the resolver refuses it, nothing is connected to
    let r = a.call(CallSpec::new("by-name", "GET", "/v1/balance")).await;
    assert_eq!(
        refusal_code(&r),
        Some(RefusalCode::UpstreamFailed),
        "{}",
        reason(&r)
    );
    assert!(
        reason(&r).contains("127.0.0.1") && reason(&r).contains("loopback"),
        "{}",
        reason(&r)
    );
    // an IP literal never reaches a resolver: checked against the same rule
    let r = a.call(CallSpec::new("literal", "GET", "/v1/balance")).await;
    assert_eq!(
        refusal_code(&r),
        Some(RefusalCode::UpstreamFailed),
        "{}",
        reason(&r)
    );
    assert!(
        reason(&r).contains("127.0.0.1 is refused: loopback"),
        "{}",
        reason(&r)
    );
    assert!(h.upstream.seen().is_empty(), "the upstream saw nothing");
    // the same host, marked local, is reached
    let ok = a
        .call(CallSpec::new("by-name-local", "GET", "/v1/balance"))
        .await?;
    assert_eq!(ok.status, 200);
    assert_eq!(h.upstream.seen().len(), 1);
    a.close().await;
    drop(a);
    h.stop().await;
    let failed = h
        .gateway_entries()?
        .into_iter()
        .filter(|e| e.kind == EntryKind::Failed && e.code.as_deref() == Some("upstream_failed"))
        .count();
    assert_eq!(failed, 2);
    assert_verifies(&h, &["alice"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_goes_back_to_the_caller_unfollowed() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let a = h.client("alice", alice()).await?;
    let answer = a
        .call(CallSpec::new("payments", "GET", "/v1/redirect"))
        .await?;
    assert_eq!(answer.status, 302);
    assert_eq!(answer.receipt.status, 302);
    assert!(
        answer
            .headers
            .iter()
            .any(|(k, v)| k == "location" && v == "http://127.0.0.1:1/elsewhere"),
        "{:?}",
        answer.headers
    );
    let seen = h.upstream.seen();
    assert_eq!(seen.len(), 1, "no request to the redirect target");
    assert_eq!(seen[0].path, "/v1/redirect");
    a.close().await;
    drop(a);
    h.stop().await;
    assert_verifies(&h, &["alice"])
}

/// Issue 15, item 4: a catalog request takes a token of its DID's rate like a request, and its
/// refusal is counted in the aggregate entry (on b9992ca the catalog was never limited: any
/// number of requests, each a policy evaluation per operation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_requests_are_rate_limited_and_their_refusals_counted() -> anyhow::Result<()> {
    let mut h = Harness::start_with(|c| c.gateway.rate_per_did = never_refills(3)).await?;
    let a = h.client("alice", alice()).await?;
    let gw = h
        .gateway
        .clone()
        .ok_or_else(|| anyhow::anyhow!("no gateway"))?;
    gw.flush_refusals().await?;
    let before = h.live_entries()?.len();
    for _ in 0..3 {
        assert!(!a.catalog().await?.is_empty());
    }
    let r = a.catalog().await;
    assert_eq!(
        refusal_code(&r),
        Some(RefusalCode::RateLimited),
        "{}",
        reason(&r)
    );
    // the same bucket as calls
    assert_eq!(
        refusal_code(&a.call(balance()).await),
        Some(RefusalCode::RateLimited)
    );
    gw.flush_refusals().await?;
    let new = h.live_entries()?.split_off(before);
    assert!(
        new.iter().any(|e| e.kind == EntryKind::Refusals
            && e.code
                .as_deref()
                .is_some_and(|c| c.contains("rate_limited=1"))),
        "the catalog refusal is counted: {new:?}"
    );
    a.close().await;
    drop(gw);
    h.stop().await;
    Ok(())
}

/// A QUIC connection from `from` (a loopback address) to the gateway as `who`: the handshake's
/// own outcome, so a test sees a refusal as QUIC reports it. Keep the endpoint while the
/// connection is used.
async fn connect_from(
    h: &Harness,
    from: &str,
    who: &didgate_protocol::Identity,
) -> anyhow::Result<(
    quinn::Endpoint,
    Result<quinn::Connection, quinn::ConnectionError>,
)> {
    didgate_client::low_level::tls::install_provider();
    let mut endpoint = quinn::Endpoint::client(format!("{from}:0").parse()?)?;
    endpoint.set_default_client_config(didgate_client::low_level::tls::client_config(
        who, &h.gw_did,
    )?);
    let connecting = endpoint.connect(h.addr, didgate_client::low_level::tls::SERVER_NAME)?;
    Ok((endpoint, connecting.await))
}

/// Issue 15, item 7: new connections are admitted by source address before any handshake
/// work. With every new connection validated (`retry_above_per_sec = 0`: a QUIC Retry first),
/// at most 2 open and 4 new connections per address (a bucket that never refills): the third
/// concurrent connection of 127.0.0.1 is refused (QUIC CONNECTION_REFUSED) while 127.0.0.2
/// connects; once one closes, 127.0.0.1 connects again until its 4 new connections are spent;
/// the client library says why; each refusal is counted `rate_limited` in the aggregate entry,
/// and the metrics count retried and refused connections. On b9992ca every connection was
/// accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_over_the_per_address_limits_are_refused_and_counted() -> anyhow::Result<()>
{
    let mut h = Harness::start_with(|c| {
        c.gateway.handshakes.retry_above_per_sec = 0;
        c.gateway.handshakes.max_open_per_address = 2;
        c.gateway.handshakes.rate_per_address = never_refills(4);
    })
    .await?;
    let gw = h
        .gateway
        .clone()
        .ok_or_else(|| anyhow::anyhow!("no gateway"))?;
    gw.flush_refusals().await?;
    let before = h.live_entries()?.len();
    let (e1, c1) = connect_from(&h, "127.0.0.1", &alice()).await?;
    let (e2, c2) = connect_from(&h, "127.0.0.1", &bob()).await?;
    let (c1, c2) = (c1?, c2?);
    // the client's handshake ends before the gateway's: an answer on each proves the gateway
    // counts both open
    answered(&c1).await?;
    answered(&c2).await?;
    let (_e3, c3) = connect_from(&h, "127.0.0.1", &alice()).await?;
    assert!(
        matches!(&c3, Err(e) if didgate_client::low_level::tls::is_connection_refused(e)),
        "a third open connection of one address is refused: {c3:?}"
    );
    // another address is not affected
    let (e4, c4) = connect_from(&h, "127.0.0.2", &alice()).await?;
    let c4 = c4?;
    // one closes: the address gets a place again (the gateway sees the close asynchronously;
    // a refused attempt takes no token, so polling costs nothing)
    c1.close(0u32.into(), b"bye");
    e1.wait_idle().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut refused = 1;
    let c5 = loop {
        let (e, c) = connect_from(&h, "127.0.0.1", &alice()).await?;
        match c {
            Ok(c) => break (e, c),
            Err(e) if didgate_client::low_level::tls::is_connection_refused(&e) => refused += 1,
            Err(e) => anyhow::bail!("{e}"),
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the closed connection was never released"
        );
    };
    // 127.0.0.1 has taken 3 of its 4 new connections; the library takes the last one, and
    // is refused after, with a reason
    c2.close(0u32.into(), b"bye");
    e2.wait_idle().await;
    let a = h.client("alice", alice()).await?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match a.call(balance()).await {
            Ok(answer) => {
                assert_eq!(answer.status, 200);
                break;
            }
            Err(CallError::Unreachable(why))
                if why.to_string().contains("refused the connection") =>
            {
                refused += 1;
            }
            Err(e) => anyhow::bail!("{e}"),
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the second closed connection was never released"
        );
    }
    a.close().await;
    let b = h.client("bob", bob()).await?;
    let r = b.call(balance()).await;
    assert!(
        matches!(&r, Err(CallError::Unreachable(why)) if why.to_string().contains("refused the connection")),
        "4 new connections of 127.0.0.1 are spent: {}",
        reason(&r)
    );
    refused += 1;
    let metrics = gw.metrics().render();
    let count = |outcome: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "didgate_connections_total{{outcome=\"{outcome}\"}} "
                ))
            })
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    assert_eq!(count("refused"), refused, "{metrics}");
    assert!(
        count("retried") >= 5,
        "every new connection validated: {metrics}"
    );
    gw.flush_refusals().await?;
    let new = h.live_entries()?.split_off(before);
    let expected = format!("rate_limited={refused}");
    assert!(
        new.iter()
            .any(|e| e.kind == EntryKind::Refusals && e.code.as_deref() == Some(expected.as_str())),
        "each refused connection is counted ({expected}): {new:?}"
    );
    b.close().await;
    for (e, c) in [(e4, c4), c5] {
        c.close(0u32.into(), b"bye");
        e.wait_idle().await;
    }
    drop(gw);
    h.stop().await;
    Ok(())
}

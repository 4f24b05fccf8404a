//! Policy means what it says; decoders are strict; the metrics endpoint checks `Host` (issue 18,
//! items 1 to 4, found by the outside review of b9992ca). Each test names the attack it refuses
//! and fails on b9992ca:
//!
//! - path forms that many upstream frameworks route to the handler a forbid rule names
//!   (`/v1/secret/`, `/v1/secret;`, `;jsessionid=x`, `..%3B`, `/v1/Secret`) and a
//!   method-override query (`_method=DELETE`) reached a permissive upstream while `/v1/secret` was
//!   refused;
//! - a byte string sent as an array of integers was accepted and executed;
//! - a 50 kB header value was forwarded;
//! - the metrics endpoint answered any `Host` (DNS rebinding).
//!
//! The NAT64 local-use and IPv4-translated egress ranges are unit tests of
//! `didgate_gateway::egress` (`embedded_and_translated_ranges`).

use didgate_client::CallSpec;
use didgate_client::low_level::{RawExchange as _, RawFinal};
use didgate_gateway::config::{PathCase, RawConfig, TrailingSlash};
use didgate_protocol::message::{RefusalCode, Request, SignedMessage};
use didgate_tests::{Harness, alice, refusal_code};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Alice may call anything on payments, except `/v1/secret` (an exact forbid, as a policy author
/// might write it).
fn forbid_secret(h: &Harness) -> anyhow::Result<()> {
    let alice_did = alice().did().to_string();
    h.use_policy(&format!(
        r#"
@id("alice-payments")
permit (principal == Did::"{alice_did}", action, resource in Upstream::"payments");

@id("no-secret")
forbid (principal, action, resource) when {{ resource.path == "/v1/secret" }};
"#
    ))
}

/// The payments upstream as a case-insensitive framework that folds trailing slashes.
fn folding(c: &mut RawConfig) {
    let up = &mut c.upstreams[0];
    up.path_case = PathCase::Insensitive;
    up.trailing_slash = TrailingSlash::Fold;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbid_rules_hold_against_path_forms_routed_to_the_same_handler() -> anyhow::Result<()> {
    let mut h = Harness::start_with(folding).await?;
    forbid_secret(&h)?;
    let a = h.client("alice", alice()).await?;
    let cases: &[(&str, &str, RefusalCode)] = &[
        ("exact", "/v1/secret", RefusalCode::Policy),
        // folded before policy: policy sees /v1/secret
        ("trailing slash", "/v1/secret/", RefusalCode::Policy),
        ("other case", "/v1/Secret", RefusalCode::Policy),
        ("both", "/V1/SECRET/", RefusalCode::Policy),
        // not canonical: servers strip path parameters
        (
            "empty path parameter",
            "/v1/secret;",
            RefusalCode::NotCanonical,
        ),
        (
            "session path parameter",
            "/v1/secret;jsessionid=x",
            RefusalCode::NotCanonical,
        ),
        (
            "encoded semicolon after a dot segment",
            "/v1/x/..%3B/secret",
            RefusalCode::NotCanonical,
        ),
        (
            "encoded semicolon",
            "/v1/secret%3b",
            RefusalCode::NotCanonical,
        ),
    ];
    for (name, path, code) in cases {
        let r = a.call(CallSpec::new("payments", "GET", path)).await;
        assert_eq!(refusal_code(&r), Some(*code), "{name}: {path}: {r:?}");
    }
    // a method override in the query: refused before policy
    let mut spec = CallSpec::new("payments", "GET", "/v1/balance");
    spec.query.push(("_method".into(), "DELETE".into()));
    let r = a.call(spec).await;
    assert_eq!(refusal_code(&r), Some(RefusalCode::NotCanonical), "{r:?}");
    // nothing above reached the upstream
    assert!(h.upstream.seen().is_empty(), "{:?}", h.upstream.seen());

    // the folded path is what the upstream gets (and the grant names)
    let answer = a
        .call(CallSpec::new("payments", "GET", "/V1/Balance/"))
        .await?;
    assert_eq!(answer.status, 200);
    let seen: Vec<String> = h.upstream.seen().into_iter().map(|r| r.path).collect();
    assert_eq!(seen, ["/v1/balance"]);
    let grant = a
        .grant(CallSpec::new("payments", "GET", "/v1/BALANCE"))
        .await?;
    assert_eq!(grant.grant.path, "/v1/balance");
    a.close().await;
    h.stop().await;
    Ok(())
}

#[test]
fn method_override_headers_need_the_upstreams_opt_in() -> anyhow::Result<()> {
    let toml = |opt_in: &str| {
        format!(
            r#"
[gateway]
listen = "127.0.0.1:7443"

[[upstream]]
name = "payments"
base_url = "https://api.example.com"
secret = "payments-key"
auth = {{ kind = "bearer" }}
allowed_hosts = ["api.example.com"]
allow_headers = ["content-type", "X-HTTP-Method-Override"]
{opt_in}
"#
        )
    };
    let config: RawConfig = toml::from_str(&toml(""))?;
    let e = config
        .validate()
        .expect_err("an override header without the opt-in");
    assert!(e.to_string().contains("allow_method_override"), "{e}");
    let config: RawConfig = toml::from_str(&toml("allow_method_override = true"))?;
    config.validate()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_string_sent_as_an_array_of_integers_is_refused_malformed() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let a = h.client("alice", alice()).await?;
    let (signed, _) = h.signed_request(&alice(), |_| {})?;
    // the same request, its body digest re-encoded as an array of 32 integers
    let payload = didgate_protocol::envelope::verify(&signed, Request::KIND)?
        .payload()
        .to_vec();
    let mut value: ciborium::Value = ciborium::from_reader(payload.as_slice())?;
    let map = value
        .as_map_mut()
        .ok_or_else(|| anyhow::anyhow!("a request is a map"))?;
    let mut replaced = false;
    for (k, v) in map.iter_mut() {
        if k.as_text() == Some("body_b3")
            && let Some(bytes) = v.as_bytes()
        {
            *v = ciborium::Value::Array(
                bytes
                    .iter()
                    .map(|b| ciborium::Value::Integer((*b).into()))
                    .collect(),
            );
            replaced = true;
        }
    }
    anyhow::ensure!(replaced, "no body_b3 byte string in {value:?}");
    let mut arrayed = Vec::new();
    ciborium::into_writer(&value, &mut arrayed)?;
    let forged = didgate_protocol::envelope::sign(&alice(), Request::KIND, arrayed);
    let answer = a.send_signed(&forged, b"").await?;
    let RawFinal::Refusal(r) = answer.last else {
        anyhow::bail!("executed: {:?}", answer.last);
    };
    assert_eq!(
        r.message().code,
        RefusalCode::Malformed,
        "{}",
        r.message().reason
    );
    assert!(h.upstream.seen().is_empty());
    a.close().await;
    h.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_value_over_its_limit_is_refused_not_canonical() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let a = h.client("alice", alice()).await?;
    let big = "a".repeat(50_000);
    let r = a
        .call(CallSpec::new("payments", "GET", "/v1/balance").header("content-type", &big))
        .await;
    assert_eq!(refusal_code(&r), Some(RefusalCode::NotCanonical), "{r:?}");
    let limit = "a".repeat(didgate_protocol::canonical::MAX_HEADER_VALUE + 1);
    let r = a
        .call(CallSpec::new("payments", "GET", "/v1/balance").header("content-type", &limit))
        .await;
    assert_eq!(refusal_code(&r), Some(RefusalCode::NotCanonical), "{r:?}");
    assert!(h.upstream.seen().is_empty());
    a.close().await;
    h.stop().await;
    Ok(())
}

/// The status line the metrics server answers to `GET /metrics` with this `Host`.
async fn metrics_status(addr: std::net::SocketAddr, host: &str) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut out = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        stream.read_to_end(&mut out),
    )
    .await
    .map_err(|_| anyhow::anyhow!("no answer from the metrics server"))??;
    let text = String::from_utf8_lossy(&out);
    Ok(text.lines().next().unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_refuses_a_rebound_host_name() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let gw = h
        .gateway
        .clone()
        .ok_or_else(|| anyhow::anyhow!("gateway"))?;
    let (stop, rx) = tokio::sync::watch::channel(false);
    let (addr, server) =
        didgate_gateway::metrics::start(gw.metrics().clone(), "127.0.0.1:0".parse()?, rx).await?;
    assert_eq!(
        metrics_status(addr, "evil.example").await?,
        "HTTP/1.1 403 Forbidden"
    );
    assert_eq!(
        metrics_status(addr, &format!("evil.example:{}", addr.port())).await?,
        "HTTP/1.1 403 Forbidden"
    );
    assert_eq!(
        metrics_status(addr, &addr.to_string()).await?,
        "HTTP/1.1 200 OK"
    );
    assert_eq!(
        metrics_status(addr, &format!("localhost:{}", addr.port())).await?,
        "HTTP/1.1 200 OK"
    );
    let _ = stop.send(true);
    let _ = server.await;
    drop(gw);
    h.stop().await;
    Ok(())
}

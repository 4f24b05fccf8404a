//! The local proxy (`didgate proxy`, `didgate env`) as a process, against a real gateway and the
//! real demo upstream, driven by a real HTTP client library (reqwest) and by curl: calls relay
//! with the token stripped, streaming arrives as the upstream sends it, every refusal is an
//! HTTP error with a JSON body naming its reason, and every call is in the client's chain with
//! its receipt (specs/client-tools.md, "Local proxy").

use std::path::{Path, PathBuf};
use std::process::Stdio;

use didgate_audit::entry::{Entry, EntryKind, Outcome};
use didgate_audit::{load_records, verify};
use didgate_daemon::upstream_demo::DemoUpstream;
use didgate_tests::{CANARY, Harness, ProxyProcess, alice_home, bin};
use tokio::io::AsyncReadExt;
use tokio::process::Command;

fn http() -> anyhow::Result<reqwest::Client> {
    didgate_client::low_level::tls::install_provider();
    Ok(reqwest::Client::builder().no_proxy().build()?)
}

/// The JSON error body of a refusal, checked to name `code`.
async fn refusal(resp: reqwest::Response, status: u16, code: &str) -> anyhow::Result<String> {
    assert_eq!(resp.status().as_u16(), status);
    assert_eq!(
        resp.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    let body: serde_json::Value = serde_json::from_str(&resp.text().await?)?;
    assert_eq!(body["error"]["code"], code, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "{body}");
    Ok(message.to_string())
}

/// The client chain's entries (the proxy must have stopped).
fn chain_entries(home: &Path) -> anyhow::Result<Vec<Entry>> {
    Ok(load_records(&home.join("chain"))?
        .entries
        .iter()
        .map(|(_, b)| Entry::decode(b))
        .collect::<Result<_, _>>()?)
}

/// Both chains verify together, and the client chain records `calls` calls, each with a
/// request entry before its result; returns the result outcomes in order.
fn assert_chains(h: &Harness, home: &Path, calls: usize) -> anyhow::Result<Vec<Outcome>> {
    let report = verify::verify(
        &[load_records(&h.gw_dir())?],
        &[load_records(&home.join("chain"))?],
    );
    assert!(report.ok(), "{:?}", report.violations);
    let entries = chain_entries(home)?;
    let requests = entries
        .iter()
        .filter(|e| e.kind == EntryKind::Request)
        .count();
    let results: Vec<Outcome> = entries
        .iter()
        .filter(|e| e.kind == EntryKind::Result)
        .filter_map(|e| e.outcome)
        .collect();
    assert_eq!(requests, calls, "one request entry per call");
    assert_eq!(results.len(), calls, "one result entry per call");
    Ok(results)
}

const CHARGE: &str = r#"{"amount":4200,"currency":"usd"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_relays_calls_from_an_http_client_library() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let home = alice_home(&h)?;
    let proxy = ProxyProcess::start(&home).await?;
    let http = http()?;

    let resp = http
        .get(format!("{}/payments/v1/balance", proxy.url))
        .bearer_auth(&proxy.token)
        .header("user-agent", "some-sdk/1.0")
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 200);
    let call = resp
        .headers()
        .get("didgate-call")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .expect("didgate-call header");
    assert_eq!(call.len(), 64);
    let body: serde_json::Value = serde_json::from_str(&resp.text().await?)?;
    assert!(body["available"].is_array(), "{body}");

    // a POST with a JSON body, token as x-api-key (as some SDKs send it)
    let resp = http
        .post(format!("{}/payments/v1/charges", proxy.url))
        .header("x-api-key", &proxy.token)
        .header("content-type", "application/json")
        .body(CHARGE)
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 200);
    let text = resp.text().await?;
    assert!(text.contains(r#""amount":4200"#), "{text}");

    // refused by the gateway's policy: an HTTP error naming the reason, recorded in the chain
    let resp = http
        .delete(format!("{}/payments/v1/charges/ch_1", proxy.url))
        .bearer_auth(&proxy.token)
        .send()
        .await?;
    let refused_call = resp
        .headers()
        .get("didgate-call")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .expect("a refused call is named too");
    let message = refusal(resp, 403, "policy").await?;
    assert!(message.contains("policy"), "{message}");
    // a gateway-side check on the path: not canonical
    let resp = http
        .get(format!("{}/payments/v1/a%2fb", proxy.url))
        .bearer_auth(&proxy.token)
        .send()
        .await?;
    refusal(resp, 400, "not_canonical").await?;
    // an upstream the gateway does not know
    let resp = http
        .get(format!("{}/nowhere/v1/x", proxy.url))
        .bearer_auth(&proxy.token)
        .send()
        .await?;
    refusal(resp, 404, "unknown_upstream").await?;

    // the token never reached the upstream; the gateway's key did, and only SDK noise dropped
    let seen = h.upstream.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for r in &seen {
        let dump = format!("{r:?}");
        assert!(!dump.contains(&proxy.token), "token forwarded: {dump}");
        assert!(r.authorized, "the gateway injected the API key");
        assert_eq!(
            r.credential_fingerprint.as_deref(),
            Some(DemoUpstream::fingerprint(CANARY).as_str())
        );
        assert!(!r.headers.iter().any(|(k, _)| k == "x-api-key"), "{dump}");
        assert!(
            !r.headers.iter().any(|(_, v)| v == "some-sdk/1.0"),
            "headers outside the forward list are dropped: {dump}"
        );
    }
    assert_eq!(seen[1].body_len, CHARGE.len() as u64);

    proxy.stop().await?;
    h.stop().await;
    let outcomes = assert_chains(&h, &home, 5)?;
    assert_eq!(
        outcomes,
        [
            Outcome::Receipt,
            Outcome::Receipt,
            Outcome::Refusal,
            Outcome::Refusal,
            Outcome::Refusal
        ]
    );
    // the calls named by didgate-call headers are the ones the chain records
    let results: Vec<String> = chain_entries(&home)?
        .into_iter()
        .filter(|e| e.kind == EntryKind::Result)
        .filter_map(|e| e.call)
        .map(hex::encode)
        .collect();
    assert_eq!(results[0], call);
    assert_eq!(results[2], refused_call);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_refuses_missing_or_wrong_token_foreign_host_and_origin() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let home = alice_home(&h)?;
    let proxy = ProxyProcess::start(&home).await?;
    let http = http()?;
    let url = format!("{}/payments/v1/balance", proxy.url);

    refusal(http.get(&url).send().await?, 401, "missing_token").await?;
    refusal(
        http.get(&url)
            .bearer_auth("dgp_not-the-token")
            .send()
            .await?,
        401,
        "bad_token",
    )
    .await?;
    // DNS rebinding: the page's origin resolves to 127.0.0.1, but Host names the attacker
    let resp = http
        .get(&url)
        .bearer_auth(&proxy.token)
        .header("host", "rebind.evil.example:8787")
        .send()
        .await?;
    refusal(resp, 403, "host_refused").await?;
    let resp = http
        .get(&url)
        .bearer_auth(&proxy.token)
        .header("origin", "http://127.0.0.1:8787")
        .send()
        .await?;
    refusal(resp, 403, "origin_refused").await?;
    let resp = http
        .get(format!("{}/", proxy.url))
        .bearer_auth(&proxy.token)
        .send()
        .await?;
    refusal(resp, 404, "no_upstream").await?;
    // localhost and the right token: allowed
    let local = proxy.url.replace("127.0.0.1", "localhost");
    let resp = http
        .get(format!("{local}/payments/v1/balance"))
        .bearer_auth(&proxy.token)
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 200);

    // nothing refused by the proxy was signed, sent or recorded
    assert_eq!(h.upstream.seen().len(), 1);
    proxy.stop().await?;
    h.stop().await;
    assert_eq!(assert_chains(&h, &home, 1)?, [Outcome::Receipt]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_streams_sse_events_as_they_arrive() -> anyhow::Result<()> {
    const EVENTS: usize = 100;
    let mut h = Harness::start().await?;
    let home = alice_home(&h)?;
    let proxy = ProxyProcess::start(&home).await?;
    let http = http()?;
    let mut resp = http
        .get(format!("{}/payments/v1/slow-events?n={EVENTS}", proxy.url))
        .bearer_auth(&proxy.token)
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    // event 0 reaches the HTTP client while the upstream still waits for the release: it
    // cannot have been buffered to the end
    let mut body = Vec::new();
    while !body.ends_with(b"\n\n") {
        let chunk = resp.chunk().await?.expect("event 0 before the end");
        body.extend_from_slice(&chunk);
    }
    assert_eq!(body, b"data: {\"i\":0}\n\n");
    h.upstream.release_slow(1);
    while let Some(chunk) = resp.chunk().await? {
        body.extend_from_slice(&chunk);
    }
    let expected: String = (0..EVENTS)
        .map(|i| format!("data: {{\"i\":{i}}}\n\n"))
        .collect();
    assert_eq!(String::from_utf8(body)?, expected);
    proxy.stop().await?;
    h.stop().await;
    assert_eq!(assert_chains(&h, &home, 1)?, [Outcome::Receipt]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_after_the_head_truncates_the_http_response() -> anyhow::Result<()> {
    // the head goes out, then the body grows past max_response_bytes: the gateway refuses
    // mid-stream, and the proxy must not let the HTTP client take a cut body for a whole one
    let mut h = Harness::start_with(|c| c.upstreams[0].max_response_bytes = Some(100)).await?;
    let home = alice_home(&h)?;
    let proxy = ProxyProcess::start(&home).await?;
    let resp = http()?
        .get(format!("{}/payments/v1/events?n=50", proxy.url))
        .bearer_auth(&proxy.token)
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.text().await.is_err(), "the body must end in an error");
    proxy.stop().await?;
    h.stop().await;
    assert_eq!(assert_chains(&h, &home, 1)?, [Outcome::Refusal]);
    Ok(())
}

/// curl, if installed (.ci/run installs it); the reqwest tests above are the required ones.
fn curl() -> Option<PathBuf> {
    let found = std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("SKIPPED: curl is not installed (apt-get install -y curl)");
    }
    found.then(|| PathBuf::from("curl"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_works_with_curl_including_streaming() -> anyhow::Result<()> {
    let Some(curl) = curl() else {
        return Ok(());
    };
    let mut h = Harness::start().await?;
    let home = alice_home(&h)?;
    let proxy = ProxyProcess::start(&home).await?;
    let auth = format!("Authorization: Bearer {}", proxy.token);

    let out = std::process::Command::new(&curl)
        .args(["-sS", "-H", &auth])
        .args(["-H", "content-type: application/json"])
        .args(["--data", r#"{"amount":900,"currency":"eur"}"#])
        .arg(format!("{}/payments/v1/charges", proxy.url))
        .output()?;
    assert!(out.status.success(), "{out:?}");
    let body = String::from_utf8(out.stdout)?;
    assert!(body.contains(r#""amount":900"#), "{body}");

    // no token: a 401 with a JSON body naming the reason
    let out = std::process::Command::new(&curl)
        .args(["-sS", "-w", "\n%{http_code}"])
        .arg(format!("{}/payments/v1/balance", proxy.url))
        .output()?;
    let text = String::from_utf8(out.stdout)?;
    let (json, code) = text.rsplit_once('\n').expect("status line");
    assert_eq!(code, "401");
    let v: serde_json::Value = serde_json::from_str(json)?;
    assert_eq!(v["error"]["code"], "missing_token");

    // streaming: curl -N prints event 0 before the upstream is released
    let mut child = Command::new(&curl)
        .args(["-sS", "-N", "-H", &auth])
        .arg(format!("{}/payments/v1/slow-events?n=5", proxy.url))
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut out = child.stdout.take().expect("stdout");
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !got.ends_with(b"\n\n") {
        let n = out.read(&mut buf).await?;
        assert!(n > 0, "curl ended before event 0");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, b"data: {\"i\":0}\n\n");
    h.upstream.release_slow(1);
    out.read_to_end(&mut got).await?;
    assert!(child.wait().await?.success());
    let expected: String = (0..5).map(|i| format!("data: {{\"i\":{i}}}\n\n")).collect();
    assert_eq!(String::from_utf8(got)?, expected);

    proxy.stop().await?;
    h.stop().await;
    assert_eq!(
        assert_chains(&h, &home, 2)?,
        [Outcome::Receipt, Outcome::Receipt]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_refuses_a_non_loopback_listen_address() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let home = alice_home(&h)?;
    let out = std::process::Command::new(bin("didgate")?)
        .arg("--home")
        .arg(&home)
        .args(["proxy", "--listen", "0.0.0.0:0"])
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a loopback address") && err.contains("--allow-remote"),
        "{err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_prints_base_urls_and_the_proxy_token() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let home = alice_home(&h)?;
    let env = |args: &[&str]| -> anyhow::Result<String> {
        let out = std::process::Command::new(bin("didgate")?)
            .arg("--home")
            .arg(&home)
            .arg("env")
            .args(args)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    };
    // before any proxy ran: the default address, and a token created for the proxy to use
    let before = env(&["payments", "openai/v1"])?;
    let token = std::fs::read_to_string(home.join("proxy-token"))?
        .trim()
        .to_string();
    assert_eq!(
        before,
        format!(
            "DIDGATE_PROXY_URL=http://127.0.0.1:8787\nDIDGATE_PROXY_TOKEN={token}\n\
             PAYMENTS_BASE_URL=http://127.0.0.1:8787/payments\nPAYMENTS_API_KEY={token}\n\
             OPENAI_BASE_URL=http://127.0.0.1:8787/openai/v1\nOPENAI_API_KEY={token}\n"
        )
    );
    // while the proxy runs: its address and the same token; the printed URL works
    let proxy = ProxyProcess::start(&home).await?;
    assert_eq!(proxy.token, token, "the token is kept across starts");
    let json: serde_json::Value = serde_json::from_str(&env(&["--json", "payments"])?)?;
    let base = json["PAYMENTS_BASE_URL"].as_str().unwrap_or_default();
    assert_eq!(base, format!("{}/payments", proxy.url));
    let resp = http()?
        .get(format!("{base}/v1/balance"))
        .bearer_auth(json["PAYMENTS_API_KEY"].as_str().unwrap_or_default())
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 200);
    assert!(env(&["--export", "payments"])?.starts_with("export DIDGATE_PROXY_URL="));
    // the proxy holds the chain: another process of this home calls through it (home.rs)
    let out = std::process::Command::new(bin("didgate")?)
        .arg("--home")
        .arg(&home)
        .args(["call", "payments", "GET", "/v1/balance"])
        .output()?;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(env(&["bad name"]).is_err());
    proxy.stop().await?;
    h.stop().await;
    Ok(())
}

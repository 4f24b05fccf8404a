//! The official OpenAI Python SDK (openai, pinned in tests/requirements.txt) driving the real
//! `didgate proxy` in front of a real gateway: the SDK's own retry logic must do the right thing
//! with the proxy's answers (specs/client-tools.md, "Local proxy", retry headers). A `rate_limited`
//! refusal is retried after the wait the proxy states, and the retry succeeds; an unknown
//! outcome (the call may have run) and a refusal that cannot pass on a retry are never retried,
//! although the SDK retries a 5xx by default.
//!
//! The upstream is a small OpenAI-style server (`POST /v1/chat/completions`) whose answer
//! depends on the request's `model`: `hang` waits until the test releases it, `cut` closes the
//! connection without an answer, anything else answers a chat completion. Attempts are counted
//! exactly: by the SDK's HTTP client hooks (tests/sdk/openai_calls.py), by the upstream, and
//! in both audit chains; nothing is judged by timing.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use didgate_audit::entry::{Entry, EntryKind, Outcome};
use didgate_audit::{load_records, verify};
use didgate_gateway::config::{RateLimit, RawUpstream, Rule};
use didgate_gateway::gateway::Revoke;
use didgate_protocol::Principal;
use didgate_tests::{Harness, ProxyProcess, alice, alice_home, python_with};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use tokio::sync::{Semaphore, watch};

/// The Python script the tests run (one JSON line of results on stdout).
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/sdk/openai_calls.py");

/// Longest any one step may take before the test fails (never reached when things work).
const DEADLINE: Duration = Duration::from_secs(120);

/// The OpenAI-style upstream: records `PATH MODEL` for each request it reads.
struct ChatUpstream {
    base_url: String,
    seen: watch::Receiver<Vec<String>>,
    release: Arc<Semaphore>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ChatUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const COMPLETION: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1700000000,"model":"m","choices":[{"index":0,"finish_reason":"stop","message":{"role":"assistant","content":"hello from upstream"}}],"usage":{"prompt_tokens":1,"completion_tokens":3,"total_tokens":4}}"#;

impl ChatUpstream {
    async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base_url = format!("http://{}", listener.local_addr()?);
        let (tx, seen) = watch::channel(Vec::new());
        let tx = Arc::new(tx);
        let release = Arc::new(Semaphore::new(0));
        let gate = release.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (tx, gate) = (tx.clone(), gate.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        Self::answer(req, tx.clone(), gate.clone())
                    });
                    // a `cut` ends the connection with an error: nothing to report
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self {
            base_url,
            seen,
            release,
            task,
        })
    }

    async fn answer(
        req: Request<Incoming>,
        seen: Arc<watch::Sender<Vec<String>>>,
        gate: Arc<Semaphore>,
    ) -> Result<Response<Full<Bytes>>, std::io::Error> {
        let path = req.uri().path().to_string();
        let body = req
            .into_body()
            .collect()
            .await
            .map_err(std::io::Error::other)?
            .to_bytes();
        let model = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["model"].as_str().map(str::to_string))
            .unwrap_or_default();
        seen.send_modify(|s| s.push(format!("{path} {model}")));
        match model.as_str() {
            "hang" => {
                // held until the test releases it (or the gateway gives up on it)
                if let Ok(permit) = gate.acquire().await {
                    permit.forget();
                }
            }
            // the service fails: hyper closes the connection without writing an answer
            "cut" => return Err(std::io::Error::other("cut")),
            _ => {}
        }
        if path != "/v1/chat/completions" {
            return Response::builder()
                .status(404)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(br#"{"error":"no route"}"#)))
                .map_err(std::io::Error::other);
        }
        Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(COMPLETION.as_bytes())))
            .map_err(std::io::Error::other)
    }

    /// The requests read so far, `PATH MODEL` each.
    fn seen(&self) -> Vec<String> {
        self.seen.borrow().clone()
    }

    /// Waits (bounded) until `n` requests have been read.
    async fn wait_for(&self, n: usize) -> anyhow::Result<()> {
        let mut rx = self.seen.clone();
        tokio::time::timeout(DEADLINE, rx.wait_for(|s| s.len() >= n))
            .await
            .map_err(|_| anyhow::anyhow!("the upstream never saw request {n}"))??;
        Ok(())
    }
}

/// A gateway with the `chat` upstream in front of `up`: alice may POST /v1/chat/completions
/// (and nothing else there), adjusted by `adjust`.
async fn gateway(
    up: &ChatUpstream,
    adjust: impl FnOnce(&mut RawUpstream),
) -> anyhow::Result<Harness> {
    let mut chat = RawUpstream {
        local: true,
        ..RawUpstream::new("chat", up.base_url.clone(), "payments-key")
    };
    adjust(&mut chat);
    Harness::start_with(move |c| {
        c.upstreams.push(chat);
        c.rules.push(Rule {
            principals: vec![alice().did().to_string()],
            upstream: "chat".into(),
            methods: vec!["POST".into()],
            paths: vec!["/v1/chat/completions".into()],
        });
    })
    .await
}

/// The OpenAI SDK script against a proxy.
trait RunSdk {
    fn run_sdk(&self, python: &Path, plan: &Value) -> anyhow::Result<Child>;
}

impl RunSdk for ProxyProcess {
    /// Starts the SDK script on `plan`, with the base URL of the `chat` upstream through this
    /// proxy and the proxy token as the API key (what `didgate env chat/v1` prints).
    fn run_sdk(&self, python: &Path, plan: &Value) -> anyhow::Result<Child> {
        Ok(Command::new(python)
            .arg(SCRIPT)
            .arg(plan.to_string())
            .env("OPENAI_BASE_URL", format!("{}/chat/v1", self.url))
            .env("OPENAI_API_KEY", &self.token)
            .env_remove("OPENAI_ORG_ID")
            .env_remove("OPENAI_PROJECT_ID")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?)
    }
}

/// The script's JSON line (bounded wait), its `calls` array.
async fn sdk_results(mut child: Child) -> anyhow::Result<Vec<Value>> {
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("stdout"))?;
    let mut stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow::anyhow!("stderr"))?;
    let (mut out, mut err) = (String::new(), String::new());
    let status = tokio::time::timeout(DEADLINE, async {
        let (a, b) = tokio::join!(
            stdout.read_to_string(&mut out),
            stderr.read_to_string(&mut err)
        );
        a?;
        b?;
        child.wait().await
    })
    .await
    .map_err(|_| anyhow::anyhow!("the SDK script did not finish"))??;
    anyhow::ensure!(status.success(), "SDK script: {status}\n{out}\n{err}");
    let line = out.lines().last().unwrap_or_default();
    let v: Value =
        serde_json::from_str(line).map_err(|e| anyhow::anyhow!("script output {out:?}: {e}"))?;
    println!("SDK: {v}");
    Ok(v["calls"].as_array().cloned().unwrap_or_default())
}

fn header<'a>(response: &'a Value, name: &str) -> Option<&'a str> {
    response[name].as_str()
}

/// The entries of the chain in `dir` (its writer must have stopped).
fn entries(dir: &Path) -> anyhow::Result<Vec<Entry>> {
    Ok(load_records(dir)?
        .entries
        .iter()
        .map(|(_, b)| Entry::decode(b))
        .collect::<Result<_, _>>()?)
}

/// Both chains verify together; returns the client's result outcomes, one per call (each
/// after its request entry), and the gateway's entries.
fn chains(h: &Harness, home: &Path) -> anyhow::Result<(Vec<Outcome>, Vec<Entry>)> {
    let report = verify::verify(
        &[load_records(&h.gw_dir())?],
        &[load_records(&home.join("chain"))?],
    );
    assert!(report.ok(), "{:?}", report.violations);
    let client = entries(&home.join("chain"))?;
    let requests = client
        .iter()
        .filter(|e| e.kind == EntryKind::Request)
        .count();
    let outcomes: Vec<Outcome> = client
        .iter()
        .filter(|e| e.kind == EntryKind::Result)
        .filter_map(|e| e.outcome)
        .collect();
    assert_eq!(requests, outcomes.len(), "one result per request");
    Ok((outcomes, h.gateway_entries()?))
}

fn count(entries: &[Entry], kind: EntryKind, code: Option<&str>) -> usize {
    entries
        .iter()
        .filter(|e| e.kind == kind && (code.is_none() || e.code.as_deref() == code))
        .count()
}

fn chat(model: &str) -> Value {
    json!({"api": "chat", "model": model})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_retries_a_rate_limited_call_after_the_stated_wait() -> anyhow::Result<()> {
    let Some(python) = python_with("openai")? else {
        return Ok(());
    };
    let up = ChatUpstream::start().await?;
    // one call back to back, then a token every 500 ms: the second call is refused with a
    // wait of at most 500 ms, and the retry after that wait finds a token
    let mut h = gateway(&up, |u| {
        u.rate_per_did = Some(RateLimit {
            burst: 1,
            per_sec: 2.0,
        })
    })
    .await?;
    let home = alice_home(&h)?;
    let proxy = ProxyProcess::start(&home).await?;
    let plan = json!({"max_retries": 2, "calls": [chat("m"), chat("m")]});
    let calls = sdk_results(proxy.run_sdk(&python, &plan)?).await?;
    assert_eq!(calls.len(), 2);
    for c in &calls {
        assert_eq!(c["ok"], true, "{c}");
        assert_eq!(c["content"], "hello from upstream", "{c}");
    }
    assert_eq!(calls[0]["attempts"], 1, "{}", calls[0]);
    // the second call: refused once, retried once by the SDK, and the retry succeeded
    let second = &calls[1];
    assert_eq!(second["attempts"], 2, "{second}");
    let responses = second["responses"].as_array().cloned().unwrap_or_default();
    assert_eq!(responses.len(), 2, "{second}");
    let refused = &responses[0];
    assert_eq!(refused["status"], 429, "{refused}");
    assert_eq!(header(refused, "x-should-retry"), Some("true"), "{refused}");
    let wait_ms: u64 = header(refused, "retry-after-ms")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no retry-after-ms: {refused}"))?;
    assert!((1..=500).contains(&wait_ms), "{refused}");
    assert_eq!(
        header(refused, "retry-after"),
        Some(wait_ms.div_ceil(1000).to_string().as_str()),
        "Retry-After: seconds, rounded up"
    );
    assert_eq!(
        header(refused, "didgate-call").map(str::len),
        Some(64),
        "{refused}"
    );
    assert_eq!(responses[1]["status"], 200, "{second}");
    assert_eq!(header(&responses[1], "x-should-retry"), None, "{second}");
    assert_eq!(
        up.seen(),
        ["/v1/chat/completions m", "/v1/chat/completions m"]
    );

    proxy.stop().await?;
    h.stop().await;
    // three signed calls: two executed, one refused with the wait the proxy passed on
    let (outcomes, gw) = chains(&h, &home)?;
    assert_eq!(
        outcomes,
        [Outcome::Receipt, Outcome::Refusal, Outcome::Receipt]
    );
    assert_eq!(count(&gw, EntryKind::Executing, None), 2);
    let limited: Vec<&Entry> = gw.iter().filter(|e| e.kind == EntryKind::Refused).collect();
    assert_eq!(limited.len(), 1, "{limited:?}");
    assert_eq!(limited[0].code.as_deref(), Some("rate_limited"));
    let reason = limited[0].detail.as_deref().unwrap_or_default();
    assert!(
        reason.contains(&format!("retry in {wait_ms} ms")),
        "the stated wait is the gateway's: {reason}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_never_retries_an_unknown_outcome() -> anyhow::Result<()> {
    let Some(python) = python_with("openai")? else {
        return Ok(());
    };
    let up = ChatUpstream::start().await?;
    let mut h = gateway(&up, |_| {}).await?;
    let home = alice_home(&h)?;
    let proxy = ProxyProcess::start(&home).await?;
    let plan = json!({"max_retries": 2, "calls": [chat("hang")]});
    let sdk = proxy.run_sdk(&python, &plan)?;
    // the call is executing: the grant is consumed and the upstream has the request
    up.wait_for(1).await?;
    // the connection is lost mid-call (revoking alice closes her connections at once): the
    // client cannot know whether the upstream acted, and a retry would be a second call
    let gw = h
        .gateway
        .clone()
        .ok_or_else(|| anyhow::anyhow!("no gateway"))?;
    gw.revoke(
        &Revoke::Did(Principal::Key(alice().did().clone())),
        "lost mid-call",
    )
    .await?;
    let calls = sdk_results(sdk).await?;
    assert_eq!(calls.len(), 1);
    let c = &calls[0];
    assert_eq!(c["ok"], false, "{c}");
    assert_eq!(c["attempts"], 1, "the SDK must not retry: {c}");
    let responses = c["responses"].as_array().cloned().unwrap_or_default();
    assert_eq!(responses.len(), 1, "{c}");
    assert_eq!(responses[0]["status"], 502, "{c}");
    assert_eq!(
        header(&responses[0], "x-should-retry"),
        Some("false"),
        "{c}"
    );
    assert_eq!(header(&responses[0], "retry-after"), None, "{c}");
    // the SDK's error is the proxy's answer
    assert_eq!(c["error"]["type"], "InternalServerError", "{c}");
    assert_eq!(c["error"]["status"], 502, "{c}");
    assert_eq!(c["error"]["code"], "outcome_unknown", "{c}");

    up.release.add_permits(1);
    assert_eq!(up.seen(), ["/v1/chat/completions hang"]);
    drop(gw);
    proxy.stop().await?;
    h.stop().await;
    // one call, recorded as unknown; the gateway executed it once and refused nothing (a
    // retry, even refused as revoked, would be a second signed call in both chains)
    let (outcomes, gw) = chains(&h, &home)?;
    assert_eq!(outcomes, [Outcome::Unknown]);
    assert_eq!(count(&gw, EntryKind::Executing, None), 1);
    assert_eq!(count(&gw, EntryKind::Refused, None), 0);
    assert_eq!(up.seen().len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_does_not_retry_a_refusal_that_cannot_pass() -> anyhow::Result<()> {
    let Some(python) = python_with("openai")? else {
        return Ok(());
    };
    let up = ChatUpstream::start().await?;
    let mut h = gateway(&up, |_| {}).await?;
    let home = alice_home(&h)?;
    let proxy = ProxyProcess::start(&home).await?;
    // a policy refusal (embeddings are not allowed), then an upstream that fails after the
    // grant was consumed (a 502 the SDK would retry twice without the header)
    let plan = json!({"max_retries": 2, "calls": [
        {"api": "embeddings", "model": "m"},
        chat("cut"),
    ]});
    let calls = sdk_results(proxy.run_sdk(&python, &plan)?).await?;
    assert_eq!(calls.len(), 2);
    for (c, status, code, kind) in [
        (&calls[0], 403, "policy", "PermissionDeniedError"),
        (&calls[1], 502, "upstream_failed", "InternalServerError"),
    ] {
        assert_eq!(c["ok"], false, "{c}");
        assert_eq!(c["attempts"], 1, "the SDK must not retry: {c}");
        let responses = c["responses"].as_array().cloned().unwrap_or_default();
        assert_eq!(responses.len(), 1, "{c}");
        assert_eq!(responses[0]["status"], status, "{c}");
        assert_eq!(
            header(&responses[0], "x-should-retry"),
            Some("false"),
            "{c}"
        );
        assert_eq!(header(&responses[0], "retry-after-ms"), None, "{c}");
        assert_eq!(c["error"]["type"], kind, "{c}");
        assert_eq!(c["error"]["status"], status, "{c}");
        assert_eq!(c["error"]["code"], code, "{c}");
    }
    // the policy refusal never reached the upstream; the failing call reached it once
    assert_eq!(up.seen(), ["/v1/chat/completions cut"]);

    proxy.stop().await?;
    h.stop().await;
    let (outcomes, gw) = chains(&h, &home)?;
    assert_eq!(outcomes, [Outcome::Refusal, Outcome::Refusal]);
    assert_eq!(count(&gw, EntryKind::Refused, Some("policy")), 1);
    assert_eq!(count(&gw, EntryKind::Executing, None), 1);
    assert_eq!(count(&gw, EntryKind::Failed, Some("upstream_failed")), 1);
    Ok(())
}

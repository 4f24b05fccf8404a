//! Demo upstream: a real local HTTP/1.1 server on 127.0.0.1 that imitates a
//! small payments API.
//!
//! This module owns [`DemoUpstream`], the upstream that `didgated demo` and
//! the end-to-end tests point the gateway at, and [`SeenRequest`], its record
//! of every request received. The server accepts one bearer token (the
//! API key the gateway is supposed to inject; a set of them with
//! [`DemoUpstream::start_with_keys`]) and never stores, logs or returns
//! a credential in plaintext: credentials appear only as
//! [`DemoUpstream::fingerprint`] values.

use std::convert::Infallible;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use zeroize::Zeroizing;

/// BLAKE3 `derive_key` context for credential fingerprints.
const FINGERPRINT_CONTEXT: &str = "didgate demo-upstream fingerprint v1";
/// BLAKE3 `derive_key` context for the constant-time API key comparison.
const COMPARE_CONTEXT: &str = "didgate demo-upstream key compare v1";
/// Largest request body read; anything longer is answered with 413.
const MAX_BODY: u64 = 1024 * 1024;
/// Default and maximum number of events served by `/v1/events`.
const DEFAULT_EVENTS: u64 = 3;
const MAX_EVENTS: u64 = 1000;
/// Header names whose values are credentials and are recorded as fingerprints.
const SENSITIVE_HEADERS: [&str; 4] = [
    "authorization",
    "cookie",
    "x-api-key",
    "proxy-authorization",
];

type RespBody = BoxBody<Bytes, Infallible>;

/// A running demo payments API on `127.0.0.1`.
///
/// The server task stops on [`DemoUpstream::shutdown`] or when this value is
/// dropped.
pub struct DemoUpstream {
    addr: SocketAddr,
    state: Arc<State>,
    shutdown_tx: watch::Sender<bool>,
    accept_task: JoinHandle<()>,
}

/// One request as the demo upstream received it, with credentials replaced by
/// their fingerprints.
#[derive(Debug, Clone, Serialize)]
pub struct SeenRequest {
    /// HTTP method, e.g. `GET`.
    pub method: String,
    /// Request path, without the query.
    pub path: String,
    /// Raw query string; the value of any `api_key` parameter is replaced by
    /// its fingerprint.
    pub query: Option<String>,
    /// Header names (lower case) and values, in arrival order (repeated names
    /// are grouped at their first occurrence). Values of `authorization`,
    /// `cookie`, `x-api-key` and `proxy-authorization` are replaced by the
    /// fingerprint of the whole header value.
    pub headers: Vec<(String, String)>,
    /// Fingerprint of the bearer token presented in `Authorization`, if any.
    pub credential_fingerprint: Option<String>,
    /// Whether the bearer token equalled the configured API key.
    pub authorized: bool,
    /// The `Idempotency-Key` header, if present.
    pub idempotency_key: Option<String>,
    /// Number of body bytes read (reading stops just past the 1 MiB cap).
    pub body_len: u64,
}

/// State shared by the accept loop and every connection.
struct State {
    /// Keyed hashes of the accepted API keys; the plaintext keys are not kept.
    key_hashes: Vec<blake3::Hash>,
    seen: Mutex<Vec<SeenRequest>>,
    log: Option<Mutex<File>>,
    next_charge: AtomicU64,
    /// Permits [`DemoUpstream::release_slow`] adds; each slow route waits for one.
    gate: Arc<Semaphore>,
}

impl DemoUpstream {
    /// Starts on 127.0.0.1:0. `api_key` is the only bearer token accepted. `log_path`, when
    /// given, receives one JSON line per request received (appended, flushed per line).
    pub async fn start(
        api_key: Zeroizing<String>,
        log_path: Option<PathBuf>,
    ) -> std::io::Result<Self> {
        Self::start_with_keys(vec![api_key], log_path).await
    }

    /// Like [`DemoUpstream::start`], accepting any of `api_keys` (at least one), as an API does
    /// while an old and a new key are both valid during a rotation.
    pub async fn start_with_keys(
        api_keys: Vec<Zeroizing<String>>,
        log_path: Option<PathBuf>,
    ) -> std::io::Result<Self> {
        if api_keys.is_empty() || api_keys.iter().any(|k| k.is_empty()) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "demo upstream api_key must not be empty",
            ));
        }
        let log = match log_path {
            Some(path) => Some(Mutex::new(
                OpenOptions::new().create(true).append(true).open(path)?,
            )),
            None => None,
        };
        let state = Arc::new(State {
            key_hashes: api_keys
                .iter()
                .map(|k| compare_hash(k.as_bytes()))
                .collect(),
            seen: Mutex::new(Vec::new()),
            log,
            next_charge: AtomicU64::new(1),
            gate: Arc::new(Semaphore::new(0)),
        });
        drop(api_keys);

        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let accept_task = tokio::spawn(accept_loop(listener, Arc::clone(&state), shutdown_rx));
        Ok(Self {
            addr,
            state,
            shutdown_tx,
            accept_task,
        })
    }

    /// The socket address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL of the server, `http://127.0.0.1:PORT` (no trailing slash).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Lets `n` waiting (or future) slow responses go on: `/v1/slow-events` sends its first
    /// event, then waits for one release before sending the rest; `/v1/slow-head` waits for one
    /// before answering at all. Tests use it instead of timing assumptions.
    pub fn release_slow(&self, n: usize) {
        self.state.gate.add_permits(n);
    }

    /// Every request received so far, in arrival order.
    pub fn seen(&self) -> Vec<SeenRequest> {
        lock(&self.state.seen).clone()
    }

    /// The fingerprint the log shows for a credential value: `fp:` followed by
    /// the first 16 hex characters of BLAKE3 `derive_key` under the context
    /// `didgate demo-upstream fingerprint v1`.
    pub fn fingerprint(value: &str) -> String {
        fingerprint_bytes(value.as_bytes())
    }

    /// Stops accepting and ends the server task (also on Drop). Open
    /// connections are closed as well.
    pub fn shutdown(&self) {
        self.shutdown_tx.send_replace(true);
        self.accept_task.abort();
    }
}

impl Drop for DemoUpstream {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for DemoUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DemoUpstream")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn fingerprint_bytes(value: &[u8]) -> String {
    let digest = blake3::derive_key(FINGERPRINT_CONTEXT, value);
    let mut out = String::with_capacity(3 + 16);
    out.push_str("fp:");
    for b in &digest[..8] {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

fn compare_hash(value: &[u8]) -> blake3::Hash {
    blake3::Hash::from(blake3::derive_key(COMPARE_CONTEXT, value))
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<State>,
    mut shutdown_rx: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown_rx.wait_for(|stop| *stop) => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, _peer) = match accepted {
            Ok(pair) => pair,
            Err(_) => {
                // e.g. too many open files: back off briefly, keep serving
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let state = Arc::clone(&state);
        let mut conn_shutdown = shutdown_rx.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                // dropping the connection closes it, also mid-stream
                _ = conn_shutdown.wait_for(|stop| *stop) => {}
            }
        });
    }
}

/// Outcome of reading a request body under the cap.
enum BodyRead {
    Complete(Bytes),
    TooLarge,
    Failed,
}

async fn read_body(body: &mut Incoming, len: &mut u64) -> BodyRead {
    let mut buf: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(_) => return BodyRead::Failed,
        };
        if let Ok(data) = frame.into_data() {
            *len = len.saturating_add(data.len() as u64);
            if *len > MAX_BODY {
                return BodyRead::TooLarge;
            }
            buf.extend_from_slice(&data);
        }
    }
    BodyRead::Complete(Bytes::from(buf))
}

async fn handle(state: &State, req: Request<Incoming>) -> Response<RespBody> {
    let (parts, mut body) = req.into_parts();

    let declared_len = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let mut body_len = 0u64;
    let read = if declared_len.is_some_and(|n| n > MAX_BODY) {
        BodyRead::TooLarge
    } else {
        read_body(&mut body, &mut body_len).await
    };

    let (credential_fingerprint, authorized) = check_authorization(state, &parts.headers);
    let seen = SeenRequest {
        method: parts.method.as_str().to_owned(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(redact_query),
        headers: redact_headers(&parts.headers),
        credential_fingerprint,
        authorized,
        idempotency_key: parts
            .headers
            .get("idempotency-key")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        body_len,
    };
    record(state, seen);

    let body = match read {
        BodyRead::Complete(body) => body,
        BodyRead::TooLarge => {
            return json(
                StatusCode::PAYLOAD_TOO_LARGE,
                r#"{"error":"payload_too_large"}"#,
            );
        }
        BodyRead::Failed => return json(StatusCode::BAD_REQUEST, r#"{"error":"invalid_request"}"#),
    };
    if !authorized {
        return json(StatusCode::UNAUTHORIZED, r#"{"error":"invalid_api_key"}"#);
    }
    if parts.method == Method::GET && parts.uri.path() == "/v1/slow-head" {
        // answers only once released (a dropped connection drops this future)
        match state.gate.acquire().await {
            Ok(p) => p.forget(),
            Err(_) => return not_found(),
        }
    }
    route(
        state,
        &parts.method,
        parts.uri.path(),
        parts.uri.query(),
        &parts.headers,
        &body,
    )
}

/// Returns the fingerprint of the presented bearer token and whether it is the
/// API key. More than one `Authorization` header is never authorized.
fn check_authorization(state: &State, headers: &HeaderMap) -> (Option<String>, bool) {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(first) = values.next() else {
        return (None, false);
    };
    let single = values.next().is_none();
    let raw = first.as_bytes();
    const SCHEME: &[u8] = b"bearer ";
    if raw.len() <= SCHEME.len() || !raw[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return (None, false);
    }
    let token = &raw[SCHEME.len()..];
    let fp = fingerprint_bytes(token);
    // blake3::Hash equality is constant-time
    let presented = compare_hash(token);
    let matches = state
        .key_hashes
        .iter()
        .fold(false, |any, h| any | (*h == presented));
    (Some(fp), single && matches)
}

fn redact_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(name, value)| {
            let name = name.as_str().to_owned();
            let value = if SENSITIVE_HEADERS.contains(&name.as_str()) {
                fingerprint_bytes(value.as_bytes())
            } else {
                String::from_utf8_lossy(value.as_bytes()).into_owned()
            };
            (name, value)
        })
        .collect()
}

/// Replaces the value of every `api_key` parameter with the fingerprint of its
/// form-decoded value; everything else stays byte for byte.
fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, value)) if form_decode(name) == b"api_key" => {
                format!("{name}={}", fingerprint_bytes(&form_decode(value)))
            }
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte;
/// malformed escapes are kept literally.
fn form_decode(s: &str) -> Vec<u8> {
    fn hex(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    out
}

fn record(state: &State, seen: SeenRequest) {
    if let Some(log) = &state.log
        && let Ok(mut line) = serde_json::to_vec(&seen)
    {
        line.push(b'\n');
        let mut file = lock(log);
        // the log is a demo aid: a failed write must not fail the request
        let _ = file.write_all(&line).and_then(|()| file.flush());
    }
    lock(&state.seen).push(seen);
}

fn route(
    state: &State,
    method: &Method,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response<RespBody> {
    match (method, path) {
        (&Method::GET, "/v1/balance") => json(
            StatusCode::OK,
            r#"{"object":"balance","available":[{"amount":12345,"currency":"usd"}]}"#,
        ),
        (&Method::POST, "/v1/charges") => create_charge(state, body),
        (&Method::GET, "/v1/echo-headers") => {
            let mut names = serde_json::Map::new();
            for name in headers.keys() {
                let count = headers.get_all(name).iter().count();
                names.insert(name.as_str().to_owned(), serde_json::Value::from(count));
            }
            json_value(StatusCode::OK, &serde_json::Value::Object(names))
        }
        (&Method::GET, "/v1/redirect") => {
            let mut resp = Response::new(Empty::<Bytes>::new().boxed());
            *resp.status_mut() = StatusCode::FOUND;
            resp.headers_mut().insert(
                header::LOCATION,
                HeaderValue::from_static("http://127.0.0.1:1/elsewhere"),
            );
            resp
        }
        (&Method::GET, "/v1/events") => events(query, None),
        (&Method::GET, "/v1/slow-events") => events(query, Some(state.gate.clone())),
        (&Method::GET, "/v1/slow-head") => json(StatusCode::OK, r#"{"slow":true}"#),
        (&Method::GET, p) => match p.strip_prefix("/v1/charges/") {
            Some(id) if !id.is_empty() && !id.contains('/') => json_value(
                StatusCode::OK,
                &serde_json::json!({"id": id, "object": "charge", "status": "succeeded"}),
            ),
            _ => not_found(),
        },
        _ => not_found(),
    }
}

fn create_charge(state: &State, body: &Bytes) -> Response<RespBody> {
    let parsed: Option<(serde_json::Value, String)> =
        serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| {
                let amount = v
                    .get("amount")
                    .filter(|a| a.is_u64() || a.is_i64())?
                    .clone();
                let currency = v.get("currency")?.as_str()?.to_owned();
                Some((amount, currency))
            });
    let Some((amount, currency)) = parsed else {
        return json(StatusCode::BAD_REQUEST, r#"{"error":"invalid_request"}"#);
    };
    let n = state.next_charge.fetch_add(1, Ordering::Relaxed);
    json_value(
        StatusCode::OK,
        &serde_json::json!({
            "id": format!("ch_{n}"),
            "object": "charge",
            "amount": amount,
            "currency": currency,
            "status": "succeeded",
        }),
    )
}

/// `n` server-sent events; with a `gate`, event 0 goes out at once and the rest only after the
/// gate gives a permit (or never, if the client goes away first).
fn events(query: Option<&str>, gate: Option<Arc<Semaphore>>) -> Response<RespBody> {
    let mut count = DEFAULT_EVENTS;
    for pair in query.unwrap_or("").split('&') {
        if let Some(("n", value)) = pair.split_once('=') {
            match value.parse::<u64>() {
                Ok(n) => count = n.min(MAX_EVENTS),
                Err(_) => return json(StatusCode::BAD_REQUEST, r#"{"error":"invalid_request"}"#),
            }
        }
    }
    let (tx, mut rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(8);
    tokio::spawn(async move {
        for i in 0..count {
            if i == 1
                && let Some(gate) = &gate
            {
                tokio::select! {
                    permit = gate.acquire() => match permit {
                        Ok(p) => p.forget(),
                        Err(_) => break,
                    },
                    () = tx.closed() => break,
                }
            }
            let frame = Frame::data(Bytes::from(format!("data: {{\"i\":{i}}}\n\n")));
            // the receiver is gone when the client or the server went away
            if tx.send(Ok(frame)).await.is_err() {
                break;
            }
        }
    });
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

fn not_found() -> Response<RespBody> {
    json(StatusCode::NOT_FOUND, r#"{"error":"not_found"}"#)
}

fn json_value(status: StatusCode, value: &serde_json::Value) -> Response<RespBody> {
    json(status, value.to_string())
}

fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<RespBody> {
    let mut resp = Response::new(Full::new(body.into()).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const CANARY: &str = "sk_test_CANARY_9f3b1c7e_do_not_log";

    /// Sends one HTTP/1.1 request (with `Connection: close`) and returns the
    /// status code and the raw text after the header block.
    async fn send(
        up: &DemoUpstream,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> (u16, String, String) {
        let mut stream = tokio::net::TcpStream::connect(up.addr()).await.unwrap();
        let mut req = format!(
            "{method} {target} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            up.addr()
        );
        for (name, value) in headers {
            req.push_str(&format!("{name}: {value}\r\n"));
        }
        if !body.is_empty() || method == "POST" {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await.unwrap();
        stream.write_all(body).await.unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        let text = String::from_utf8(raw).unwrap();
        let (head, rest) = text.split_once("\r\n\r\n").unwrap();
        let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
        (status, head.to_owned(), rest.to_owned())
    }

    fn bearer(key: &str) -> String {
        format!("Bearer {key}")
    }

    async fn start() -> DemoUpstream {
        DemoUpstream::start(Zeroizing::new(CANARY.to_owned()), None)
            .await
            .unwrap()
    }

    #[test]
    fn fingerprint_format() {
        let fp = DemoUpstream::fingerprint(CANARY);
        assert!(fp.starts_with("fp:"));
        assert_eq!(fp.len(), 19);
        let expected = blake3::derive_key(FINGERPRINT_CONTEXT, CANARY.as_bytes());
        let hex: String = expected[..8].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(fp, format!("fp:{hex}"));
        assert_ne!(fp, DemoUpstream::fingerprint("other"));
    }

    #[tokio::test]
    async fn right_key_is_authorized_and_fingerprinted() {
        let up = start().await;
        assert_eq!(
            up.base_url(),
            format!("http://127.0.0.1:{}", up.addr().port())
        );
        let auth = bearer(CANARY);
        let (status, head, body) = send(
            &up,
            "GET",
            "/v1/balance?api_key=sk_test_CANARY_9f3b1c7e_do_not_log&x=1",
            &[
                ("Authorization", &auth),
                ("X-Api-Key", CANARY),
                ("Idempotency-Key", "idem-1"),
            ],
            b"",
        )
        .await;
        assert_eq!(status, 200);
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/json")
        );
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["object"], "balance");
        assert_eq!(v["available"][0]["amount"], 12345);

        let seen = up.seen();
        assert_eq!(seen.len(), 1);
        let s = &seen[0];
        assert!(s.authorized);
        assert_eq!(s.method, "GET");
        assert_eq!(s.path, "/v1/balance");
        assert_eq!(
            s.credential_fingerprint.as_deref(),
            Some(DemoUpstream::fingerprint(CANARY).as_str())
        );
        assert_eq!(s.idempotency_key.as_deref(), Some("idem-1"));
        assert_eq!(
            s.query.as_deref(),
            Some(format!("api_key={}&x=1", DemoUpstream::fingerprint(CANARY)).as_str())
        );
        let names: Vec<&str> = s.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "host",
                "connection",
                "authorization",
                "x-api-key",
                "idempotency-key"
            ]
        );
        let dump = format!("{s:?}");
        assert!(!dump.contains(CANARY), "plaintext key recorded: {dump}");
        up.shutdown();
    }

    #[tokio::test]
    async fn wrong_or_missing_key_is_401() {
        let up = start().await;
        let (status, _, body) = send(
            &up,
            "GET",
            "/v1/balance",
            &[("Authorization", "Bearer sk_wrong")],
            b"",
        )
        .await;
        assert_eq!(status, 401);
        assert_eq!(body, r#"{"error":"invalid_api_key"}"#);
        let (status, _, _) = send(&up, "GET", "/v1/balance", &[], b"").await;
        assert_eq!(status, 401);
        // the key without the Bearer scheme is not accepted either
        let (status, _, _) =
            send(&up, "GET", "/v1/balance", &[("Authorization", CANARY)], b"").await;
        assert_eq!(status, 401);
        let seen = up.seen();
        assert_eq!(seen.len(), 3);
        assert!(seen.iter().all(|s| !s.authorized));
        assert_eq!(
            seen[0].credential_fingerprint.as_deref(),
            Some(DemoUpstream::fingerprint("sk_wrong").as_str())
        );
        assert_eq!(seen[1].credential_fingerprint, None);
    }

    #[tokio::test]
    async fn log_never_contains_the_key() {
        let path = std::env::temp_dir().join(format!(
            "didgate-updemo-{}-{}.log",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let up = DemoUpstream::start(Zeroizing::new(CANARY.to_owned()), Some(path.clone()))
            .await
            .unwrap();
        let auth = bearer(CANARY);
        let cookie = format!("session={CANARY}");
        let hdrs = [
            ("Authorization", auth.as_str()),
            ("Cookie", cookie.as_str()),
            ("Proxy-Authorization", auth.as_str()),
        ];
        let (status, _, body) = send(
            &up,
            "POST",
            "/v1/charges",
            &hdrs,
            br#"{"amount":500,"currency":"usd"}"#,
        )
        .await;
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["id"], "ch_1");
        assert_eq!(v["amount"], 500);
        assert_eq!(v["currency"], "usd");
        assert_eq!(v["status"], "succeeded");
        let (status, _, body) = send(&up, "GET", "/v1/echo-headers", &hdrs, b"").await;
        assert_eq!(status, 200);
        assert!(!body.contains(CANARY));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(v.get("authorization").is_some());
        let (status, _, _) = send(
            &up,
            "GET",
            &format!("/v1/charges/ch_1?api_key={CANARY}"),
            &[("Authorization", "Bearer nope")],
            b"",
        )
        .await;
        assert_eq!(status, 401);
        let (status, _, body) = send(&up, "POST", "/v1/charges", &hdrs, b"{not json").await;
        assert_eq!(status, 400);
        assert_eq!(body, r#"{"error":"invalid_request"}"#);

        let log = std::fs::read_to_string(&path).unwrap();
        assert_eq!(log.lines().count(), 4);
        assert!(!log.contains(CANARY), "key leaked into the log:\n{log}");
        assert!(log.contains(&DemoUpstream::fingerprint(CANARY)));
        for line in log.lines() {
            let _: serde_json::Value = serde_json::from_str(line).unwrap();
        }
        drop(up);
        let _ = std::fs::remove_file(&path);
    }

    #[tokio::test]
    async fn routes() {
        let up = start().await;
        let auth = bearer(CANARY);
        let h = [("Authorization", auth.as_str())];
        let (status, _, body) = send(&up, "GET", "/v1/charges/ch_42", &h, b"").await;
        assert_eq!(status, 200);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&body).unwrap(),
            serde_json::json!({"id":"ch_42","object":"charge","status":"succeeded"})
        );
        let (status, head, body) = send(&up, "GET", "/v1/redirect", &h, b"").await;
        assert_eq!(status, 302);
        assert!(head.contains("location: http://127.0.0.1:1/elsewhere"));
        assert!(body.is_empty());
        let (status, _, body) = send(&up, "GET", "/v1/nope", &h, b"").await;
        assert_eq!(status, 404);
        assert_eq!(body, r#"{"error":"not_found"}"#);
        // declared too large: refused before reading (PUT: the helper adds no
        // Content-Length of its own for an empty non-POST body)
        let too_big = (MAX_BODY + 1).to_string();
        let h413 = [
            ("Authorization", auth.as_str()),
            ("Content-Length", too_big.as_str()),
        ];
        let (status, _, body) = send(&up, "PUT", "/v1/charges", &h413, b"").await;
        assert_eq!(status, 413);
        assert_eq!(body, r#"{"error":"payload_too_large"}"#);
        let seen = up.seen();
        assert_eq!(seen.len(), 4);
    }

    #[tokio::test]
    async fn streamed_body_past_cap_is_413() {
        let up = start().await;
        let mut stream = tokio::net::TcpStream::connect(up.addr()).await.unwrap();
        let head = format!(
            "POST /v1/charges HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Authorization: Bearer {CANARY}\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let (mut rd, mut wr) = stream.into_split();
        // write the body concurrently; the server may stop reading at the cap
        let writer = tokio::spawn(async move {
            let chunk = vec![b'x'; 64 * 1024];
            let mut sent = 0u64;
            while sent <= MAX_BODY {
                let frame = [format!("{:x}\r\n", chunk.len()).as_bytes(), &chunk, b"\r\n"].concat();
                if wr.write_all(&frame).await.is_err() {
                    return;
                }
                sent += chunk.len() as u64;
            }
            let _ = wr.write_all(b"0\r\n\r\n").await;
        });
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        // stop at the first error (a reset may follow the response)
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
        }
        let _ = writer.await;
        let text = String::from_utf8_lossy(&raw);
        assert!(text.starts_with("HTTP/1.1 413"), "{text}");
        let seen = up.seen();
        assert_eq!(seen.len(), 1);
        assert!(seen[0].body_len > MAX_BODY);
        assert!(seen[0].authorized);
    }

    #[tokio::test]
    async fn sse_returns_k_events() {
        let up = start().await;
        let auth = bearer(CANARY);
        let h = [("Authorization", auth.as_str())];
        for (target, k) in [
            ("/v1/events?n=7", 7),
            ("/v1/events", 3),
            ("/v1/events?n=5000", 1000),
        ] {
            let (status, head, body) = send(&up, "GET", target, &h, b"").await;
            assert_eq!(status, 200);
            assert!(
                head.to_ascii_lowercase()
                    .contains("content-type: text/event-stream")
            );
            let events: Vec<&str> = body.matches("data: {\"i\":").collect();
            assert_eq!(events.len(), k, "{target}");
            assert!(body.contains(&format!("data: {{\"i\":{}}}\n\n", k - 1)));
        }
    }

    #[tokio::test]
    async fn slow_routes_wait_for_a_release() {
        let up = start().await;
        let auth = bearer(CANARY);
        let h = [("Authorization", auth.as_str())];
        // released beforehand: the permits are kept until a slow response takes them
        up.release_slow(2);
        let (status, _, body) = send(&up, "GET", "/v1/slow-events?n=4", &h, b"").await;
        assert_eq!(status, 200);
        assert_eq!(body.matches("data: {\"i\":").count(), 4);
        let (status, _, body) = send(&up, "GET", "/v1/slow-head", &h, b"").await;
        assert_eq!(status, 200);
        assert_eq!(body, r#"{"slow":true}"#);
    }

    #[tokio::test]
    async fn shutdown_stops_accepting() {
        let up = start().await;
        let addr = up.addr();
        up.shutdown();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }
}

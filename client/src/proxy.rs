//! The local HTTP proxy (`didgate proxy`): any HTTP client on this machine makes signed calls
//! through the gateway without holding a key (specs/client-tools.md, "Local proxy").
//!
//! Owns the proxy's listener rules (loopback only unless allowed), its local token
//! ([`ProxyToken`]), the checks every request passes before anything is signed (token, `Host`,
//! `Origin`), the mapping of `/UPSTREAM/rest/of/path?query` to a [`CallSpec`], the relay of the
//! answer as it arrives, and the JSON error bodies that name each refusal (with the retry
//! headers OpenAI-style SDKs obey: `x-should-retry`, `Retry-After`). It does not sign,
//! record or verify anything itself: every call goes through [`Caller::call_streaming`] (this
//! process's [`crate::Client`], or the process holding the home's chain), so it is in the
//! client's chain with its receipt.
//!
//! ```no_run
//! # async fn demo(client: didgate_client::Client) -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use didgate_client::proxy::{Proxy, ProxyConfig, ProxyToken};
//! let config = ProxyConfig::new("127.0.0.1:8787".parse()?, ProxyToken::generate());
//! let proxy = Proxy::bind(config).await?;
//! println!("listening on http://{}", proxy.local_addr());
//! proxy.serve(Arc::new(client.into()), std::future::pending()).await;
//! # Ok(()) }
//! ```

use std::convert::Infallible;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use zeroize::Zeroizing;

use crate::local::Caller;
use crate::{CallError, CallSpec};
use didgate_protocol::message::RefusalCode;

/// The address `didgate proxy` listens on by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8787";
/// Largest request body the proxy reads (the gateway applies its own, usually smaller, limit).
pub const DEFAULT_MAX_BODY: usize = 16 * 1024 * 1024;
/// Request headers forwarded by default (the gateway's default `allow_headers`).
pub const DEFAULT_FORWARD_HEADERS: &[&str] = &["content-type", "accept"];
/// Response header naming the call ID (64 hex digits) of every call the proxy signed.
pub const CALL_HEADER: &str = "didgate-call";
/// Token prefix, so a leaked token is recognisable.
const TOKEN_PREFIX: &str = "dgp_";

/// Why the proxy could not start, or its token could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The listen address is not loopback and remote access was not allowed.
    #[error(
        "refusing to listen on {0}: not a loopback address (any host on the network could use your DID); pass --allow-remote if you really mean it"
    )]
    NotLoopback(SocketAddr),
    /// The listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The token file could not be read or written.
    #[error("proxy token {path}: {source}")]
    TokenIo {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The token file is readable by group or others.
    #[error(
        "proxy token {path} has mode {mode:o}; run `chmod 600 {path}` (it must not be readable by others)"
    )]
    TokenPermissions {
        /// The file.
        path: String,
        /// Its mode.
        mode: u32,
    },
    /// The token file does not hold a token.
    #[error("proxy token {0} is malformed; delete it and run `didgate proxy` again")]
    TokenMalformed(String),
}

/// The proxy's local "API key": a random token any process that wants to use the proxy must
/// present (`Authorization: Bearer TOKEN` or `x-api-key: TOKEN`). It is never forwarded.
/// Compared in constant time; `Debug` does not print it.
#[derive(Clone)]
pub struct ProxyToken(Zeroizing<String>);

impl std::fmt::Debug for ProxyToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProxyToken(..)")
    }
}

impl ProxyToken {
    /// A fresh random token: `dgp_` and 64 hex digits (256 bits).
    pub fn generate() -> Self {
        let raw: [u8; 32] = rand::random();
        Self(Zeroizing::new(format!(
            "{TOKEN_PREFIX}{}",
            hex::encode(raw)
        )))
    }

    /// The token text, to print or hand to an agent.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this token (constant time).
    pub fn matches(&self, presented: &str) -> bool {
        blake3::hash(self.0.as_bytes()) == blake3::hash(presented.as_bytes())
    }

    /// Loads the token from `path`, refusing a file others can read.
    pub fn load(path: &Path) -> Result<Self, ProxyError> {
        let p = path.display().to_string();
        let io = |source| ProxyError::TokenIo {
            path: p.clone(),
            source,
        };
        let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(ProxyError::TokenPermissions { path: p, mode });
        }
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(io)?);
        let token = text.trim();
        let valid = token
            .strip_prefix(TOKEN_PREFIX)
            .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        if !valid {
            return Err(ProxyError::TokenMalformed(p));
        }
        Ok(Self(Zeroizing::new(token.to_string())))
    }

    /// Loads the token at `path`, or creates a new one there (mode 0600) if there is none.
    pub fn load_or_create(path: &Path) -> Result<Self, ProxyError> {
        match Self::load(path) {
            Err(ProxyError::TokenIo { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Self::generate().store(path, false)
            }
            other => other,
        }
    }

    /// Writes a new random token to `path` (mode 0600), replacing any token there, so every
    /// process holding the old one is refused from now on.
    pub fn rotate(path: &Path) -> Result<Self, ProxyError> {
        Self::generate().store(path, true)
    }

    fn store(self, path: &Path, replace: bool) -> Result<Self, ProxyError> {
        let p = path.display().to_string();
        let io = |source| ProxyError::TokenIo {
            path: p.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        // Written beside, then renamed: a reader never sees a partial token.
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        file.write_all(format!("{}\n", self.expose()).as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io)?;
        if !replace && path.exists() {
            let _ = std::fs::remove_file(&tmp);
            return Self::load(path);
        }
        std::fs::rename(&tmp, path).map_err(io)?;
        Ok(self)
    }
}

/// How the proxy listens and what it forwards.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// The address to listen on.
    pub listen: SocketAddr,
    /// Allow a listen address that is not loopback, and then any `Host` header. The token and
    /// the `Origin` check still apply.
    pub allow_remote: bool,
    /// The token every request must present.
    pub token: ProxyToken,
    /// Request headers (lower case) passed on to the gateway; all others are dropped, since
    /// the gateway refuses any header outside the upstream's allowlist (SDKs add their own,
    /// such as `user-agent`).
    pub forward_headers: Vec<String>,
    /// Largest request body read, bytes (413 above).
    pub max_body: usize,
}

impl ProxyConfig {
    /// Loopback-only defaults: forwards `content-type` and `accept`, bodies up to 16 MiB.
    pub fn new(listen: SocketAddr, token: ProxyToken) -> Self {
        Self {
            listen,
            allow_remote: false,
            token,
            forward_headers: DEFAULT_FORWARD_HEADERS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            max_body: DEFAULT_MAX_BODY,
        }
    }
}

/// A bound proxy listener, ready to [`Proxy::serve`].
#[derive(Debug)]
pub struct Proxy {
    listener: TcpListener,
    addr: SocketAddr,
    config: ProxyConfig,
}

type ProxyBody = BoxBody<Bytes, std::io::Error>;

impl Proxy {
    /// Binds the listener; a non-loopback address is refused unless `allow_remote`.
    pub async fn bind(config: ProxyConfig) -> Result<Self, ProxyError> {
        if !config.listen.ip().is_loopback() && !config.allow_remote {
            return Err(ProxyError::NotLoopback(config.listen));
        }
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ProxyError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| ProxyError::Bind {
            addr: config.listen,
            source,
        })?;
        Ok(Self {
            listener,
            addr,
            config,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves HTTP/1.1 until `shutdown` resolves, then stops accepting and waits for the
    /// requests in flight (their calls finish and are recorded).
    pub async fn serve(self, client: Arc<Caller>, shutdown: impl Future<Output = ()>) {
        let state = Arc::new(State {
            client,
            config: self.config,
        });
        let mut tasks = tokio::task::JoinSet::new();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                () = &mut shutdown => break,
                a = self.listener.accept() => a,
            };
            let (stream, _) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(%e, "proxy: accept failed");
                    continue;
                }
            };
            // small request/response exchanges: without this, Nagle's algorithm and the
            // client's delayed ACK hold each response back about 40 ms
            let _ = stream.set_nodelay(true);
            let state = state.clone();
            let mut stop = stop_rx.clone();
            tasks.spawn(async move {
                let service = service_fn(move |req| handle(req, state.clone()));
                let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                let mut conn = std::pin::pin!(conn);
                let ended = tokio::select! {
                    r = conn.as_mut() => Some(r),
                    _ = stop.wait_for(|s| *s) => None,
                };
                let result = match ended {
                    Some(r) => r,
                    None => {
                        // finish the request in flight, close an idle keep-alive connection
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                };
                if let Err(e) = result {
                    tracing::debug!(%e, "proxy: connection ended with an error");
                }
            });
            while tasks.try_join_next().is_some() {}
        }
        drop(self.listener);
        let _ = stop_tx.send(true);
        while tasks.join_next().await.is_some() {}
    }
}

struct State {
    client: Arc<Caller>,
    config: ProxyConfig,
}

/// Response header telling OpenAI-style SDKs (Stainless-generated: OpenAI, Anthropic, ...)
/// whether to retry a failed request: `true` or `false`, obeyed before their own status rules.
pub const SHOULD_RETRY_HEADER: &str = "x-should-retry";
/// Response header with the wait before a retry in milliseconds (read before `Retry-After` by
/// the same SDKs).
pub const RETRY_AFTER_MS_HEADER: &str = "retry-after-ms";

/// One refusal the proxy answers with: HTTP status, a stable code, and a message.
struct Refusal {
    status: StatusCode,
    code: String,
    source: &'static str,
    message: String,
    call: Option<[u8; 32]>,
    /// Sent as `x-should-retry`: whether the same request sent again may succeed and can do no
    /// harm (no grant consumed, nothing executed).
    retry: bool,
    /// How long until a retry can succeed, when known (`Retry-After`, `retry-after-ms`).
    retry_after_ms: Option<u64>,
}

impl Refusal {
    fn local(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            code: code.into(),
            source: "proxy",
            message: message.into(),
            call: None,
            retry: false,
            retry_after_ms: None,
        }
    }

    fn response(self) -> Response<ProxyBody> {
        let body = serde_json::json!({
            "error": {
                "code": self.code,
                "message": self.message,
                "type": "didgate_error",
                "source": self.source,
                "call": self.call.map(hex::encode),
            }
        });
        let mut resp = Response::new(full(body.to_string().into_bytes()));
        *resp.status_mut() = self.status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(call) = self.call
            && let Ok(v) = HeaderValue::from_str(&hex::encode(call))
        {
            resp.headers_mut().insert(CALL_HEADER, v);
        }
        resp.headers_mut().insert(
            SHOULD_RETRY_HEADER,
            HeaderValue::from_static(if self.retry { "true" } else { "false" }),
        );
        if let Some(ms) = self.retry_after_ms {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(ms.div_ceil(1000)));
            resp.headers_mut()
                .insert(RETRY_AFTER_MS_HEADER, HeaderValue::from(ms));
        }
        resp
    }
}

/// When a `rate_limited` refusal says a token will be back, as its reason states it
/// (specs/operation.md, "Limits and egress": `retry in N ms`, or `no refill`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RateWait {
    /// A token is back in this many milliseconds.
    In(u64),
    /// The bucket is never refilled: a retry cannot succeed.
    Never,
    /// Not stated (a concurrency limit, a full limiter table, a per-connection limit).
    Unknown,
}

fn rate_wait(reason: &str) -> RateWait {
    if let Some((_, rest)) = reason.split_once("retry in ") {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0
            && rest[digits..].starts_with(" ms")
            && let Ok(ms) = rest[..digits].parse()
        {
            return RateWait::In(ms);
        }
    }
    if reason.contains("(no refill)") {
        return RateWait::Never;
    }
    RateWait::Unknown
}

/// Whether an SDK may send the refused request again, and after how long: only a refusal that
/// consumed nothing and can pass later (`rate_limited`, `shutting_down`, `handover`, and a
/// `moved` the client could not follow). Never an unknown
/// outcome (the call may have executed), nor a call whose grant was consumed.
fn retry_advice(e: &CallError) -> (bool, Option<u64>) {
    match e {
        CallError::Refused {
            code: RefusalCode::RateLimited,
            reason,
            ..
        } => match rate_wait(reason) {
            RateWait::In(ms) => (true, Some(ms)),
            RateWait::Never => (false, None),
            RateWait::Unknown => (true, None),
        },
        CallError::Refused {
            code: RefusalCode::Handover,
            reason,
            ..
        } => match rate_wait(reason) {
            RateWait::In(ms) => (true, Some(ms)),
            _ => (true, None),
        },
        CallError::Refused {
            code: RefusalCode::ShuttingDown | RefusalCode::Moved,
            ..
        } => (true, None),
        _ => (false, None),
    }
}

/// The HTTP status a gateway refusal becomes.
pub fn refusal_status(code: RefusalCode) -> u16 {
    match code {
        RefusalCode::Policy
        | RefusalCode::Revoked
        | RefusalCode::PeerMismatch
        | RefusalCode::GrantExpired
        | RefusalCode::GrantInvalid => 403,
        RefusalCode::UnknownUpstream => 404,
        RefusalCode::Replay | RefusalCode::ChainFork => 409,
        RefusalCode::RateLimited => 429,
        RefusalCode::UpstreamFailed
        | RefusalCode::SecretUnavailable
        | RefusalCode::ResponseTooLarge => 502,
        RefusalCode::AuditUnavailable
        | RefusalCode::ShuttingDown
        | RefusalCode::KmsUnavailable
        | RefusalCode::ControlPlaneUnavailable
        | RefusalCode::Moved
        | RefusalCode::Handover => 503,
        _ => 400,
    }
}

fn call_refusal(e: CallError) -> Refusal {
    let call = match &e {
        CallError::Refused { call, .. } => *call,
        _ => None,
    };
    let (status, code, source) = match &e {
        CallError::Refused { code, .. } => (refusal_status(*code), code.as_str(), "gateway"),
        CallError::Unreachable(_) => (502, "gateway_unreachable", "client"),
        CallError::ConnectionLost(_) | CallError::OwnerLost { .. } => {
            (502, "outcome_unknown", "client")
        }
        CallError::InvalidAnswer(_) => (502, "invalid_answer", "client"),
        CallError::Audit(_) => (503, "local_audit_unavailable", "client"),
        CallError::VersionUnsupported { .. } => (502, "version_unsupported", "client"),
        CallError::WrongGateway { .. } => (502, "wrong_gateway", "client"),
    };
    let (retry, retry_after_ms) = retry_advice(&e);
    Refusal {
        status: StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
        code: code.to_string(),
        source,
        message: e.to_string(),
        call,
        retry,
        retry_after_ms,
    }
}

fn full(bytes: Vec<u8>) -> ProxyBody {
    Full::new(Bytes::from(bytes))
        .map_err(|never: Infallible| match never {})
        .boxed()
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<State>,
) -> Result<Response<ProxyBody>, Infallible> {
    Ok(match relay(req, &state).await {
        Ok(resp) => resp,
        Err(refusal) => refusal.response(),
    })
}

/// The `Host` header names this machine's loopback interface (any port).
fn loopback_host(value: &str) -> bool {
    let host = match value.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((h, port)) if port.is_empty() || port.starts_with(':') => h,
            _ => return false,
        },
        None => value.rsplit_once(':').map_or(value, |(h, _)| h),
    };
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The token the caller presented, from `Authorization: Bearer` or `x-api-key`.
fn presented_token(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let v = v.trim();
        if let Some((scheme, rest)) = v.split_once(' ')
            && scheme.eq_ignore_ascii_case("bearer")
        {
            return Some(rest.trim());
        }
        return Some(v);
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// Splits `/UPSTREAM/rest?query` into the upstream and the path (with its query) to call.
fn split_target(uri: &hyper::Uri) -> Option<(String, String)> {
    let path = uri.path().strip_prefix('/')?;
    let (upstream, rest) = match path.split_once('/') {
        Some((u, r)) => (u, format!("/{r}")),
        None => (path, "/".to_string()),
    };
    if upstream.is_empty() {
        return None;
    }
    let rest = match uri.query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest,
    };
    Some((upstream.to_string(), rest))
}

/// Response headers never relayed to the HTTP client (hop-by-hop, and the length, since the
/// body is re-framed).
const DROP_RESPONSE_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

async fn relay(req: Request<Incoming>, state: &State) -> Result<Response<ProxyBody>, Refusal> {
    let (parts, body) = req.into_parts();
    // A browser page (DNS rebinding, or a form posted to localhost) always sends Origin on
    // cross-origin requests; no SDK or curl does.
    if parts.headers.contains_key(header::ORIGIN) {
        return Err(Refusal::local(
            StatusCode::FORBIDDEN,
            "origin_refused",
            "requests carrying an Origin header are refused (a web page cannot use this proxy)",
        ));
    }
    if !state.config.allow_remote {
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok());
        if !host.is_some_and(loopback_host) {
            return Err(Refusal::local(
                StatusCode::FORBIDDEN,
                "host_refused",
                "the Host header must name a loopback address (127.0.0.1, [::1] or localhost)",
            ));
        }
    }
    match presented_token(&parts.headers) {
        None => {
            return Err(Refusal::local(
                StatusCode::UNAUTHORIZED,
                "missing_token",
                "no proxy token: send `Authorization: Bearer TOKEN` or `x-api-key: TOKEN` (`didgate env` prints it)",
            ));
        }
        Some(t) if !state.config.token.matches(t) => {
            return Err(Refusal::local(
                StatusCode::UNAUTHORIZED,
                "bad_token",
                "wrong proxy token (`didgate env` prints the current one)",
            ));
        }
        Some(_) => {}
    }
    let Some((upstream, path)) = split_target(&parts.uri) else {
        return Err(Refusal::local(
            StatusCode::NOT_FOUND,
            "no_upstream",
            "use /UPSTREAM/path, e.g. /payments/v1/balance",
        ));
    };
    let body = Limited::new(body, state.config.max_body)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                Refusal::local(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!(
                        "request body above the proxy's {} bytes",
                        state.config.max_body
                    ),
                )
            } else {
                Refusal::local(
                    StatusCode::BAD_REQUEST,
                    "body_unreadable",
                    format!("cannot read the request body: {e}"),
                )
            }
        })?
        .to_bytes();
    let mut spec = CallSpec::new(&upstream, parts.method.as_str(), &path).body(body.to_vec());
    for (name, value) in &parts.headers {
        if !state
            .config
            .forward_headers
            .iter()
            .any(|f| f.eq_ignore_ascii_case(name.as_str()))
        {
            continue;
        }
        let Ok(value) = value.to_str() else {
            return Err(Refusal::local(
                StatusCode::BAD_REQUEST,
                "bad_header",
                format!("header {name} is not visible ASCII"),
            ));
        };
        spec = spec.header(name.as_str(), value);
    }
    start_call(state.client.clone(), spec).await
}

/// What the call task reports once the head (or a refusal) is known.
type Started = Result<(u16, Vec<(String, String)>, [u8; 32]), Refusal>;

/// Runs the call in its own task (it outlives this function while the body streams) and
/// answers with the head, then relays body chunks as they arrive.
async fn start_call(client: Arc<Caller>, spec: CallSpec) -> Result<Response<ProxyBody>, Refusal> {
    let (head_tx, head_rx) = oneshot::channel::<Started>();
    let (body_tx, body_rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(8);
    tokio::spawn(async move {
        let mut answer = match client.call_streaming(spec).await {
            Ok(a) => a,
            Err(e) => {
                let _ = head_tx.send(Err(call_refusal(e)));
                return;
            }
        };
        let call = answer.call();
        if head_tx
            .send(Ok((answer.status(), answer.headers().to_vec(), call)))
            .is_err()
        {
            return;
        }
        loop {
            match answer.next_chunk().await {
                Ok(Some(chunk)) => {
                    if body_tx.send(Ok(Frame::data(chunk))).await.is_err() {
                        // the HTTP client went away: dropping the answer records `unknown`
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(call = %hex::encode(call), %e, "proxy: call failed mid-body");
                    let _ = body_tx
                        .send(Err(std::io::Error::other(format!("didgate: {e}"))))
                        .await;
                    return;
                }
            }
        }
    });
    let (status, headers, call) = match head_rx.await {
        Ok(started) => started?,
        Err(_) => {
            return Err(Refusal::local(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the call task ended without an answer",
            ));
        }
    };
    let stream = futures_util::stream::unfold(body_rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    for (name, value) in headers {
        if DROP_RESPONSE_HEADERS.contains(&name.as_str()) {
            continue;
        }
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            resp.headers_mut().append(n, v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(&hex::encode(call)) {
        resp.headers_mut().insert(CALL_HEADER, v);
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        for ok in [
            "127.0.0.1",
            "127.0.0.1:8787",
            "localhost:1",
            "LOCALHOST",
            "[::1]:8787",
            "[::1]",
            "127.9.9.9:80",
        ] {
            assert!(loopback_host(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8787",
            "10.0.0.1:8787",
            "[::2]:1",
            "[::1]x",
            "localhost.evil.example",
            "",
        ] {
            assert!(!loopback_host(bad), "{bad}");
        }
    }

    #[test]
    fn targets() {
        let t = |s: &str| split_target(&s.parse().expect("uri"));
        assert_eq!(
            t("/payments/v1/balance?a=1"),
            Some(("payments".into(), "/v1/balance?a=1".into()))
        );
        assert_eq!(t("/payments"), Some(("payments".into(), "/".into())));
        assert_eq!(t("/payments/"), Some(("payments".into(), "/".into())));
        assert_eq!(t("/"), None);
        assert_eq!(t("//v1"), None);
    }

    #[test]
    fn rate_waits() {
        assert_eq!(
            rate_wait("rate limit of this DID exceeded (retry in 491 ms)"),
            RateWait::In(491)
        );
        assert_eq!(
            rate_wait("rate limit of upstream chat exceeded (no refill)"),
            RateWait::Never
        );
        for unknown in [
            "too many concurrent calls for this DID (at most 2)",
            "rate limiter table is full; retry later",
            "retry in ms",
            "retry in 12 seconds",
            "retry in 99999999999999999999999 ms",
        ] {
            assert_eq!(rate_wait(unknown), RateWait::Unknown, "{unknown}");
        }
    }

    #[test]
    fn retry_headers() {
        let refused = |code, reason: &str| CallError::Refused {
            code,
            reason: reason.into(),
            gateway_time_ms: 0,
            call: Some([7; 32]),
        };
        let headers = |e| {
            let resp = call_refusal(e).response();
            let get = |n: &str| {
                resp.headers()
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            (
                resp.status().as_u16(),
                get(SHOULD_RETRY_HEADER),
                get("retry-after"),
                get(RETRY_AFTER_MS_HEADER),
            )
        };
        let s = |v: &str| Some(v.to_string());
        assert_eq!(
            headers(refused(
                RefusalCode::RateLimited,
                "rate limit of this DID on upstream chat exceeded (retry in 1001 ms)"
            )),
            (429, s("true"), s("2"), s("1001"))
        );
        assert_eq!(
            headers(refused(
                RefusalCode::RateLimited,
                "too many concurrent calls for this DID (at most 1)"
            )),
            (429, s("true"), None, None)
        );
        assert_eq!(
            headers(refused(
                RefusalCode::RateLimited,
                "rate limit of this DID exceeded (no refill)"
            )),
            (429, s("false"), None, None)
        );
        assert_eq!(
            headers(refused(RefusalCode::ShuttingDown, "draining")),
            (503, s("true"), None, None)
        );
        for (code, status) in [
            (RefusalCode::Policy, 403),
            (RefusalCode::Replay, 409),
            (RefusalCode::UpstreamFailed, 502),
            (RefusalCode::AuditUnavailable, 503),
            (RefusalCode::NotCanonical, 400),
        ] {
            assert_eq!(
                headers(refused(code, "retry in 5 ms")),
                (status, s("false"), None, None),
                "{code}"
            );
        }
        assert_eq!(
            headers(CallError::ConnectionLost(crate::Lost::Relayed(
                "reset".into()
            ))),
            (502, s("false"), None, None)
        );
        assert_eq!(
            headers(CallError::Unreachable(crate::Unreachable::Relayed(
                "down".into()
            ))),
            (502, s("false"), None, None)
        );
        let local = Refusal::local(StatusCode::UNAUTHORIZED, "bad_token", "no").response();
        assert_eq!(
            local
                .headers()
                .get(SHOULD_RETRY_HEADER)
                .and_then(|v| v.to_str().ok()),
            Some("false")
        );
    }

    #[test]
    fn token_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("proxy-token");
        let a = ProxyToken::load_or_create(&path).expect("create");
        assert_eq!(
            std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        let b = ProxyToken::load_or_create(&path).expect("load");
        assert!(a.matches(b.expose()), "a second start keeps the token");
        assert!(!a.matches("dgp_00"));
        let c = ProxyToken::rotate(&path).expect("rotate");
        assert!(!a.matches(c.expose()));
        assert!(format!("{c:?}").find(c.expose()).is_none());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(
            ProxyToken::load(&path),
            Err(ProxyError::TokenPermissions { .. })
        ));
        std::fs::write(&path, "nope\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(matches!(
            ProxyToken::load(&path),
            Err(ProxyError::TokenMalformed(_))
        ));
    }
}

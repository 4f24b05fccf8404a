//! A hostile (or merely careless) upstream: a real HTTP/1.1 server on 127.0.0.1 that sends
//! back the credential it received, in every way real servers do by accident: a debug header,
//! a redirect that keeps the query string (Python's http.server, Django's APPEND_SLASH), a JSON
//! error body, a body whose chunks cut the key in two, a gzip body sent although the request
//! asked for `identity`, a server-sent event stream, base64.
//!
//! The credential is what the request carried: the bearer token, the `Basic` pair's password,
//! or the `api_key` query parameter (percent-decoded; the raw query is what a redirect
//! reflects).

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::{Request, Response};

/// The running server.
pub struct EchoUpstream {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

/// The paths it answers, each echoing the credential its own way.
pub const ECHO_PATHS: &[&str] = &[
    "/v1/header",
    "/v1/dir",
    "/v1/error",
    "/v1/split",
    "/v1/gzip",
    "/v1/sse",
    "/v1/base64",
];

type Body = BoxBody<Bytes, Infallible>;

fn full(bytes: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(bytes.into()).boxed()
}

/// A body sent as separate chunks, with a pause between them so that they leave as separate
/// writes (the gateway must be right whatever the cut; the pause only makes a cut likely).
fn chunked(parts: Vec<Vec<u8>>) -> Body {
    let stream =
        futures_util::stream::unfold((parts.into_iter(), true), |(mut parts, first)| async move {
            let next = parts.next()?;
            if !first {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Some((
                Ok::<_, Infallible>(Frame::data(Bytes::from(next))),
                (parts, false),
            ))
        });
    StreamBody::new(stream).boxed()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (b[i], b.get(i + 1..i + 3)) {
            (b'%', Some(hex)) => {
                match u8::from_str_radix(std::str::from_utf8(hex).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            (b'+', _) => out.push(b' '),
            (c, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// (credential, the whole Authorization value, the raw query).
fn received(req: &Request<hyper::body::Incoming>) -> (String, String, String) {
    let auth = req
        .headers()
        .get("authorization")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    let query = req.uri().query().unwrap_or_default().to_string();
    let from_query = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("api_key="))
        .map(percent_decode);
    let cred = if let Some(token) = auth.strip_prefix("Bearer ") {
        token.to_string()
    } else if let Some(pair) = auth.strip_prefix("Basic ") {
        base64::engine::general_purpose::STANDARD
            .decode(pair)
            .ok()
            .and_then(|p| String::from_utf8(p).ok())
            .and_then(|p| p.split_once(':').map(|(_, pass)| pass.to_string()))
            .unwrap_or_default()
    } else {
        from_query.unwrap_or_default()
    };
    (cred, auth, query)
}

fn answer(req: &Request<hyper::body::Incoming>) -> Response<Body> {
    let (cred, auth, query) = received(req);
    let path = req.uri().path().to_string();
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut resp = Response::builder().status(200);
    let body = match path.as_str() {
        "/v1/header" => {
            resp = resp
                .header("x-debug-authorization", &auth)
                .header("x-debug-key", &cred);
            full("ok")
        }
        "/v1/dir" => {
            let to = format!("{path}/?{query}");
            resp = resp
                .status(301)
                .header("location", &to)
                .header("content-location", &to)
                .header("link", format!("<{to}>; rel=\"canonical\""))
                .header("refresh", format!("0; url={to}"));
            full(format!("Moved to {to}"))
        }
        "/v1/error" => {
            resp = resp.status(401).header("content-type", "application/json");
            let body = serde_json::json!({
                "error": {
                    "message": format!("Incorrect API key provided: {cred}."),
                    "header": auth,
                    "escaped": cred.replace('/', "\\/"),
                }
            });
            full(body.to_string())
        }
        "/v1/split" => {
            let half = cred.len() / 2;
            chunked(vec![
                format!("{{\"key\": \"{}", &cred[..half]).into_bytes(),
                format!("{}\"}}", &cred[half..]).into_bytes(),
            ])
        }
        "/v1/gzip" => {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            let _ = enc.write_all(format!("{{\"echo\": \"{cred}\"}}").as_bytes());
            resp = resp
                .header("content-encoding", "gzip")
                .header("content-type", "application/json");
            full(enc.finish().unwrap_or_default())
        }
        "/v1/sse" => {
            resp = resp.header("content-type", "text/event-stream");
            chunked(vec![
                b"data: {\"n\": 1}\n\n".to_vec(),
                format!("data: {{\"n\": 2, \"echo\": \"{cred}\"}}\n\n").into_bytes(),
                b"data: [DONE]\n\n".to_vec(),
            ])
        }
        "/v1/base64" => full(format!(
            "{} {} {}",
            b64.encode(&cred),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&cred),
            b64.encode(format!("acct:{cred}"))
        )),
        _ => {
            resp = resp.status(404);
            full("not found")
        }
    };
    resp.body(body).unwrap_or_else(|_| Response::new(full("")))
}

impl EchoUpstream {
    /// Starts the server on 127.0.0.1 (plain HTTP).
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|req: Request<_>| async move {
                        Ok::<_, Infallible>(answer(&req))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Ok(Self { addr, task })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for EchoUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The forms of `secret` a response must never hold (what the scanner is meant to catch):
/// raw, percent-encoded, JSON-escaped with `\/`, base64 and base64url, and the base64 of
/// `acct:secret`.
pub fn forms_of(secret: &str) -> Vec<Vec<u8>> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut pct = String::new();
    for b in secret.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            pct.push(b as char);
        } else {
            pct.push_str(&format!("%{b:02X}"));
        }
    }
    vec![
        secret.as_bytes().to_vec(),
        pct.into_bytes(),
        secret.replace('/', "\\/").into_bytes(),
        b64.encode(secret).into_bytes(),
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(secret)
            .into_bytes(),
        b64.encode(format!("acct:{secret}")).into_bytes(),
    ]
}

//! The upstream executor: builds the upstream request from a verified call, injects the
//! secret, and sends it with reqwest over rustls (ring). No redirect is followed; only the
//! upstream's allowed hosts are reachable; errors never carry a URL (it may hold an injected
//! query parameter).

use std::time::Duration;

use didgate_protocol::message::Request;
use reqwest::header::{HeaderName, HeaderValue};
use zeroize::Zeroizing;

use crate::config::{Auth, Upstream};

/// Why the upstream request failed. Carries no URL and no secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// The request could not be built (bad header value, host not allowed).
    #[error("cannot build the upstream request: {0}")]
    Build(String),
    /// Connecting, sending or reading failed.
    #[error("upstream request failed: {0}")]
    Send(String),
}

/// The shared HTTP client: no redirects, no proxy from the environment.
pub fn http_client(timeout: Duration) -> Result<reqwest::Client, UpstreamError> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .connect_timeout(timeout)
        .read_timeout(timeout)
        .build()
        .map_err(|e| UpstreamError::Build(e.without_url().to_string()))
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Sends the call upstream with the secret injected. The secret is borrowed and dropped
/// (zeroized) by the caller right after this returns the response head.
pub async fn send(
    http: &reqwest::Client,
    upstream: &Upstream,
    req: &Request,
    body: Vec<u8>,
    secret: Zeroizing<String>,
    idempotency_key: &str,
) -> Result<reqwest::Response, UpstreamError> {
    let mut url = Zeroizing::new(format!("{}{}", upstream.base_url, req.path));
    let mut sep = '?';
    for (k, v) in &req.query {
        url.push(sep);
        url.push_str(k);
        url.push('=');
        url.push_str(v);
        sep = '&';
    }
    if let Auth::Query { name } = &upstream.auth {
        url.push(sep);
        url.push_str(&encode_component(name));
        url.push('=');
        url.push_str(&encode_component(&secret));
    }
    let parsed =
        reqwest::Url::parse(&url).map_err(|_| UpstreamError::Build("invalid URL".into()))?;
    let host = parsed.host_str().unwrap_or_default();
    if !upstream.allowed_hosts.iter().any(|h| h == host) {
        return Err(UpstreamError::Build(format!(
            "host {host} is not allowed for this upstream"
        )));
    }
    let method = reqwest::Method::from_bytes(req.method.as_bytes())
        .map_err(|_| UpstreamError::Build("method".into()))?;
    let mut builder = http.request(method, parsed);
    for (k, v) in &req.headers {
        let name = HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| UpstreamError::Build(format!("header name {k}")))?;
        let value = HeaderValue::from_str(v)
            .map_err(|_| UpstreamError::Build(format!("header value of {k}")))?;
        builder = builder.header(name, value);
    }
    builder = builder.header("idempotency-key", idempotency_key);
    builder = match &upstream.auth {
        Auth::Bearer => builder.header(
            reqwest::header::AUTHORIZATION,
            sensitive(&Zeroizing::new(format!("Bearer {}", secret.as_str())))?,
        ),
        Auth::Basic { user } => builder.basic_auth(user, Some(secret.as_str())),
        Auth::Header { name } => {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| UpstreamError::Build("credential header name".into()))?;
            builder.header(name, sensitive(&secret)?)
        }
        Auth::Query { .. } => builder,
    };
    if !body.is_empty() {
        builder = builder.body(body);
    }
    let request = builder
        .build()
        .map_err(|e| UpstreamError::Build(e.without_url().to_string()))?;
    drop(url);
    drop(secret);
    http.execute(request)
        .await
        .map_err(|e| UpstreamError::Send(e.without_url().to_string()))
}

fn sensitive(value: &str) -> Result<HeaderValue, UpstreamError> {
    let mut h = HeaderValue::from_str(value)
        .map_err(|_| UpstreamError::Build("credential is not a valid header value".into()))?;
    h.set_sensitive(true);
    Ok(h)
}

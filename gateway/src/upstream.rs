//! The upstream executor: builds the upstream request from a verified call, injects the
//! secret, and sends it with reqwest over rustls (ring). No redirect is followed; only the
//! upstream's allowed hosts are reachable; errors never carry a URL (it may hold an injected
//! query parameter).
//!
//! Each upstream's client and its address rule are [`crate::egress`]'s. IP-literal hosts do not
//! go through a resolver: [`send`] checks them against the same rule
//! ([`crate::egress::refused_range`]).

use std::net::IpAddr;

use didgate_protocol::message::Request;
use reqwest::header::{HeaderName, HeaderValue};
use zeroize::Zeroizing;

use crate::config::{Auth, Upstream};
use crate::egress::refused_range;

/// Why the upstream request failed. Carries no URL and no secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// The request could not be built: the URL's host is not allowed.
    #[error("cannot build the upstream request: host {host} is not allowed for this upstream")]
    HostNotAllowed {
        /// The host.
        host: String,
    },
    /// The request could not be built: a part of it is not valid HTTP (`what` names it: the
    /// method, a header name or value, the credential).
    #[error("cannot build the upstream request: {what}")]
    Invalid {
        /// What is not valid.
        what: String,
    },
    /// The request could not be built by the HTTP client.
    #[error("cannot build the upstream request: {0}")]
    Build(#[source] reqwest::Error),
    /// Connecting, sending or reading failed (the text names the causes too: reqwest's own
    /// omits them).
    #[error("upstream request failed: {}", describe(.0))]
    Send(#[source] reqwest::Error),
    /// The upstream's address is not one it may be reached at (a loopback, private or other
    /// non-public address of an upstream not marked `local`).
    #[error("egress refused: address {ip} is refused: {why} (the upstream is not marked local)")]
    Egress {
        /// The address.
        ip: IpAddr,
        /// Which range it is in ([`refused_range`]).
        why: &'static str,
    },
}

impl UpstreamError {
    fn invalid(what: impl Into<String>) -> Self {
        Self::Invalid { what: what.into() }
    }
}

/// The text of an error and its sources, joined by `: ` (reqwest's own text omits the cause).
/// Callers pass errors without a URL.
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        src = s.source();
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
    // the base URL parsed at load; the path policy judged (folded as the upstream says:
    // `Upstream::policy_path`) appended to its path. A canonical path and query hold no `?`,
    // `#` or `\` (`canonical::check_path`, `check_query`), so the setters give the URL that
    // parsing the joined text would.
    let mut parsed = upstream.base_url().clone();
    let base_path = parsed.path();
    let path = format!(
        "{}{}",
        base_path.strip_suffix('/').unwrap_or(base_path),
        upstream.policy_path(&req.path)
    );
    parsed.set_path(&path);
    // the query may hold the injected secret: built in a buffer zeroized on drop
    let mut query = Zeroizing::new(String::new());
    for (k, v) in &req.query {
        if !query.is_empty() {
            query.push('&');
        }
        query.push_str(k);
        query.push('=');
        query.push_str(v);
    }
    if let Auth::Query { name } = upstream.auth() {
        // the scanner's own percent-encoding ([`crate::echo`]): the form injected is one it
        // searches for; ASCII by construction
        let encoded = |s: &str| Zeroizing::new(crate::echo::percent(s.as_bytes(), true, false));
        if !query.is_empty() {
            query.push('&');
        }
        query.push_str(&String::from_utf8_lossy(&encoded(name)));
        query.push('=');
        query.push_str(&String::from_utf8_lossy(&encoded(&secret)));
    }
    if !query.is_empty() {
        parsed.set_query(Some(&query));
    }
    let host = parsed.host_str().unwrap_or_default();
    if !upstream.allowed_hosts().iter().any(|h| h == host) {
        return Err(UpstreamError::HostNotAllowed {
            host: host.to_string(),
        });
    }
    // IP literals never reach the resolver: same rule here
    let literal = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
        .parse::<IpAddr>();
    if let Ok(ip) = literal
        && !upstream.local()
        && let Some(why) = refused_range(ip)
    {
        return Err(UpstreamError::Egress { ip, why });
    }
    let method = reqwest::Method::from_bytes(req.method.as_bytes())
        .map_err(|_| UpstreamError::invalid("method"))?;
    let mut builder = http.request(method, parsed);
    // The response is scanned for the credential ([`crate::echo`]): ask for an unencoded
    // body, whatever the caller asked (a body encoded anyway is decoded to be scanned).
    builder = builder.header(reqwest::header::ACCEPT_ENCODING, "identity");
    for (k, v) in &req.headers {
        if k.eq_ignore_ascii_case("accept-encoding") {
            continue;
        }
        let name = HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| UpstreamError::invalid(format!("header name {k}")))?;
        let value = HeaderValue::from_str(v)
            .map_err(|_| UpstreamError::invalid(format!("header value of {k}")))?;
        builder = builder.header(name, value);
    }
    builder = builder.header("idempotency-key", idempotency_key);
    builder = match upstream.auth() {
        Auth::Bearer => builder.header(
            reqwest::header::AUTHORIZATION,
            sensitive(&Zeroizing::new(format!("Bearer {}", secret.as_str())))?,
        ),
        Auth::Basic { user } => builder.basic_auth(user, Some(secret.as_str())),
        Auth::Header { name } => {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| UpstreamError::invalid("credential header name"))?;
            builder.header(name, sensitive(&secret)?)
        }
        Auth::Query { .. } => builder,
    };
    if !body.is_empty() {
        builder = builder.body(body);
    }
    let request = builder
        .build()
        .map_err(|e| UpstreamError::Build(e.without_url()))?;
    drop(query);
    drop(secret);
    http.execute(request)
        .await
        .map_err(|e| UpstreamError::Send(e.without_url()))
}

fn sensitive(value: &str) -> Result<HeaderValue, UpstreamError> {
    let mut h = HeaderValue::from_str(value)
        .map_err(|_| UpstreamError::invalid("credential is not a valid header value"))?;
    h.set_sensitive(true);
    Ok(h)
}

//! Prometheus metrics (specs/operation.md, "Events and metrics").
//!
//! Counters and one histogram kept in atomics, updated directly at the points where the
//! gateway writes its audit entries (so they cannot lag), and rendered in the Prometheus text
//! exposition format by [`Metrics::render`]. [`start`] serves them as `GET /metrics` over
//! HTTP/1.1 when `[gateway] metrics_listen` is set. Label values are bounded: upstream names
//! come from the configuration, codes from [`RefusalCode`], status classes are `1xx`..`5xx`.
//! No metric holds a DID, a path, a secret or policy text.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use didgate_protocol::message::RefusalCode;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admission::Decision;
use crate::config::Config;

/// Every refusal code, in the order of its counter; a code of a later version counts as `other`.
const CODES: [RefusalCode; 25] = RefusalCode::ALL;

/// Upper bounds of the latency histogram's buckets, seconds (`+Inf` is implicit).
pub const LATENCY_BUCKETS: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// How a consumed grant was presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Request, grant and execution in one round trip.
    Pipelined,
    /// A grant issued first, executed later.
    TwoStep,
}

/// The gateway's counters.
#[derive(Debug)]
pub struct Metrics {
    upstreams: Vec<String>,
    /// Per upstream (config order), per status class.
    calls: Vec<[AtomicU64; 5]>,
    /// Per upstream (config order): occurrences of the call's credential the response scanner
    /// redacted or refused ([`crate::echo`]).
    secret_echoes: Vec<AtomicU64>,
    /// Per [`CODES`] entry, then `other`.
    refusals: [AtomicU64; CODES.len() + 1],
    grants_issued: AtomicU64,
    /// Pipelined, two-step.
    grants_consumed: [AtomicU64; 2],
    /// DID, grant.
    revocations: [AtomicU64; 2],
    policy_reloads: AtomicU64,
    /// Non-cumulative bucket counts, then the overflow bucket.
    latency: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_sum_us: AtomicU64,
    /// New QUIC connections: accepted, retried, refused ([`HANDSHAKE_OUTCOMES`]).
    connections: [AtomicU64; 3],
    /// Names accepted in `Host` besides loopback names and IP literals (`metrics_hosts`).
    hosts: Vec<String>,
}

/// The outcomes of a new connection's admission ([`crate::admission`]), in counter order.
pub const HANDSHAKE_OUTCOMES: [&str; 3] = ["accepted", "retried", "refused"];

impl Metrics {
    /// Zeroed counters for the upstreams of `config` (the first of duplicate names counts).
    pub fn new(config: &Config) -> Self {
        let mut upstreams: Vec<String> = Vec::new();
        for u in config.upstreams() {
            if !upstreams.iter().any(|n| n == u.name()) {
                upstreams.push(u.name().to_string());
            }
        }
        Self {
            calls: upstreams.iter().map(|_| Default::default()).collect(),
            secret_echoes: upstreams.iter().map(|_| AtomicU64::new(0)).collect(),
            upstreams,
            refusals: Default::default(),
            grants_issued: AtomicU64::new(0),
            grants_consumed: Default::default(),
            revocations: Default::default(),
            policy_reloads: AtomicU64::new(0),
            latency: Default::default(),
            latency_sum_us: AtomicU64::new(0),
            connections: Default::default(),
            hosts: config.gateway().metrics_hosts.clone(),
        }
    }

    /// A new QUIC connection's admission.
    pub fn admission(&self, decision: Decision) {
        let i = match decision {
            Decision::Accept { .. } => 0,
            Decision::Retry => 1,
            Decision::Refuse(_) => 2,
        };
        self.connections[i].fetch_add(1, Relaxed);
    }

    /// An executed call: the upstream answered `status` after `latency`.
    pub fn executed(&self, upstream: &str, status: u16, latency: Duration) {
        if let Some(i) = self.upstreams.iter().position(|u| u == upstream) {
            let class = usize::from(status / 100).clamp(1, 5) - 1;
            self.calls[i][class].fetch_add(1, Relaxed);
        }
        let secs = latency.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.latency[bucket].fetch_add(1, Relaxed);
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_sum_us.fetch_add(us, Relaxed);
    }

    /// The response of a call to `upstream` held its credential `hits` times.
    pub fn secret_echo(&self, upstream: &str, hits: u64) {
        if let Some(i) = self.upstreams.iter().position(|u| u == upstream) {
            self.secret_echoes[i].fetch_add(hits, Relaxed);
        }
    }

    /// A refusal message sent with `code` (before or after a grant was consumed).
    pub fn refused(&self, code: RefusalCode) {
        let i = CODES.iter().position(|c| *c == code).unwrap_or(CODES.len());
        self.refusals[i].fetch_add(1, Relaxed);
    }

    /// A two-step grant issued.
    pub fn grant_issued(&self) {
        self.grants_issued.fetch_add(1, Relaxed);
    }

    /// A grant consumed (its `executing` entry durable).
    pub fn grant_consumed(&self, flow: Flow) {
        self.grants_consumed[usize::from(flow == Flow::TwoStep)].fetch_add(1, Relaxed);
    }

    /// A revocation of a DID (`did`) or of a grant.
    pub fn revoked(&self, did: bool) {
        self.revocations[usize::from(!did)].fetch_add(1, Relaxed);
    }

    /// A policy reload that put a new set in force.
    pub fn policy_reloaded(&self) {
        self.policy_reloads.fetch_add(1, Relaxed);
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut s = String::with_capacity(4096);
        let _ = self.write(&mut s);
        s
    }

    fn write_connections(&self, s: &mut String) -> std::fmt::Result {
        writeln!(
            s,
            "# HELP didgate_connections_total New QUIC connections, by admission outcome (accepted, retried: answered with a QUIC Retry, refused: over a per-address limit)."
        )?;
        writeln!(s, "# TYPE didgate_connections_total counter")?;
        for (outcome, n) in HANDSHAKE_OUTCOMES.iter().zip(&self.connections) {
            writeln!(
                s,
                "didgate_connections_total{{outcome=\"{outcome}\"}} {}",
                n.load(Relaxed)
            )?;
        }
        Ok(())
    }

    fn write(&self, s: &mut String) -> std::fmt::Result {
        writeln!(
            s,
            "# HELP didgate_calls_total Calls executed (the upstream answered), by upstream and HTTP status class."
        )?;
        writeln!(s, "# TYPE didgate_calls_total counter")?;
        for (name, counts) in self.upstreams.iter().zip(&self.calls) {
            for (class, n) in CLASSES.iter().zip(counts) {
                writeln!(
                    s,
                    "didgate_calls_total{{upstream=\"{}\",status_class=\"{class}\"}} {}",
                    escape(name),
                    n.load(Relaxed)
                )?;
            }
        }
        writeln!(
            s,
            "# HELP didgate_secret_echo_total Occurrences of a call's credential found in its upstream response (headers and body), by upstream."
        )?;
        writeln!(s, "# TYPE didgate_secret_echo_total counter")?;
        for (name, n) in self.upstreams.iter().zip(&self.secret_echoes) {
            writeln!(
                s,
                "didgate_secret_echo_total{{upstream=\"{}\"}} {}",
                escape(name),
                n.load(Relaxed)
            )?;
        }
        writeln!(
            s,
            "# HELP didgate_refusals_total Refusals sent, by code (before or after a grant was consumed)."
        )?;
        writeln!(s, "# TYPE didgate_refusals_total counter")?;
        let names = CODES.iter().map(|c| c.as_str()).chain(["other"]);
        for (code, n) in names.zip(&self.refusals) {
            writeln!(
                s,
                "didgate_refusals_total{{code=\"{code}\"}} {}",
                n.load(Relaxed)
            )?;
        }
        self.write_connections(s)?;
        writeln!(
            s,
            "# HELP didgate_grants_issued_total Two-step grants issued."
        )?;
        writeln!(s, "# TYPE didgate_grants_issued_total counter")?;
        writeln!(
            s,
            "didgate_grants_issued_total {}",
            self.grants_issued.load(Relaxed)
        )?;
        writeln!(
            s,
            "# HELP didgate_grants_consumed_total Grants consumed by an execution, by flow."
        )?;
        writeln!(s, "# TYPE didgate_grants_consumed_total counter")?;
        for (flow, n) in ["pipelined", "two_step"].iter().zip(&self.grants_consumed) {
            writeln!(
                s,
                "didgate_grants_consumed_total{{flow=\"{flow}\"}} {}",
                n.load(Relaxed)
            )?;
        }
        writeln!(
            s,
            "# HELP didgate_revocations_total Revocations recorded by this process, by target."
        )?;
        writeln!(s, "# TYPE didgate_revocations_total counter")?;
        for (target, n) in ["did", "grant"].iter().zip(&self.revocations) {
            writeln!(
                s,
                "didgate_revocations_total{{target=\"{target}\"}} {}",
                n.load(Relaxed)
            )?;
        }
        writeln!(
            s,
            "# HELP didgate_policy_reloads_total Policy reloads that put a new set in force."
        )?;
        writeln!(s, "# TYPE didgate_policy_reloads_total counter")?;
        writeln!(
            s,
            "didgate_policy_reloads_total {}",
            self.policy_reloads.load(Relaxed)
        )?;
        writeln!(
            s,
            "# HELP didgate_call_latency_seconds From a call's stream opening to its executed entry."
        )?;
        writeln!(s, "# TYPE didgate_call_latency_seconds histogram")?;
        let mut cumulative = 0u64;
        for (bound, n) in LATENCY_BUCKETS.iter().zip(&self.latency) {
            cumulative += n.load(Relaxed);
            writeln!(
                s,
                "didgate_call_latency_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            )?;
        }
        cumulative += self.latency[LATENCY_BUCKETS.len()].load(Relaxed);
        writeln!(
            s,
            "didgate_call_latency_seconds_bucket{{le=\"+Inf\"}} {cumulative}"
        )?;
        // microseconds as seconds, exactly
        let us = self.latency_sum_us.load(Relaxed);
        writeln!(
            s,
            "didgate_call_latency_seconds_sum {}.{:06}",
            us / 1_000_000,
            us % 1_000_000
        )?;
        writeln!(s, "didgate_call_latency_seconds_count {cumulative}")
    }
}

/// A label value, escaped (`\`, `"`, newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Binds `addr` and serves `GET /metrics` until `stop` changes. Returns the bound address
/// (useful with port 0) and the server task.
pub async fn start(
    metrics: Arc<Metrics>,
    addr: SocketAddr,
    stop: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    Ok((bound, tokio::spawn(serve(metrics, listener, stop))))
}

/// Serves `GET /metrics` on `listener` until `stop` changes; other paths get 404, other
/// methods 405.
pub async fn serve(metrics: Arc<Metrics>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            _ = stop.changed() => break,
        };
        let metrics = metrics.clone();
        let mut conn_stop = stop.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move {
                    let host = req
                        .headers()
                        .get(hyper::header::HOST)
                        .and_then(|h| h.to_str().ok());
                    if !host.is_some_and(|h| host_allowed(h, &metrics.hosts)) {
                        return Ok::<_, Infallible>(plain(
                            StatusCode::FORBIDDEN,
                            "the Host header names no loopback address, IP address or metrics_hosts entry\n",
                        ));
                    }
                    Ok(answer(&metrics, req.method(), req.uri().path()))
                }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = conn_stop.changed() => {}
            }
        });
    }
}

/// Whether a request's `Host` may be answered: a loopback name or any IP literal (a page that
/// rebinds a name of its own to this address sends that name), or a name of `hosts`; any port.
fn host_allowed(value: &str, hosts: &[String]) -> bool {
    let host = match value.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((h, port)) if port.is_empty() || port.starts_with(':') => h,
            _ => return false,
        },
        None => value.rsplit_once(':').map_or(value, |(h, _)| h),
    };
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::IpAddr>().is_ok()
        || hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
}

fn plain(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    resp
}

fn answer(metrics: &Metrics, method: &Method, path: &str) -> Response<Full<Bytes>> {
    let (status, body, kind) = match (method, path) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            metrics.render(),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET\n".to_string(),
            "text/plain",
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "metrics are at /metrics\n".to_string(),
            "text/plain",
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(kind) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_that_may_read_the_metrics() {
        let names = vec!["metrics.internal".to_string()];
        for ok in [
            "127.0.0.1:9100",
            "localhost",
            "LOCALHOST:9100",
            "[::1]:9100",
            "10.0.0.5:9100",
            "metrics.internal:9100",
            "Metrics.Internal",
        ] {
            assert!(host_allowed(ok, &names), "{ok}");
        }
        // regression (issue 18): a rebinding page's own name, or anything unparsable
        for bad in [
            "evil.example",
            "evil.example:9100",
            "localhost.evil.example",
            "metrics.internal.evil.example",
            "[::1]x",
            "",
        ] {
            assert!(!host_allowed(bad, &names), "{bad}");
        }
    }

    #[test]
    fn codes_are_distinct_and_render_is_well_formed() {
        let mut names: Vec<_> = CODES.iter().map(|c| c.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), CODES.len());

        let cfg = toml::from_str::<crate::config::RawConfig>(&crate::config::template(
            "127.0.0.1:1".parse().expect("addr"),
        ))
        .expect("template")
        .validate()
        .expect("valid");
        let mut m = Metrics::new(&cfg);
        m.upstreams = vec!["a\"b".into()];
        m.calls = vec![Default::default()];
        m.executed("a\"b", 204, Duration::from_millis(7));
        m.executed("a\"b", 503, Duration::from_secs(100));
        m.executed("unknown", 200, Duration::from_millis(1));
        m.refused(RefusalCode::Policy);
        m.grant_consumed(Flow::TwoStep);
        m.revoked(false);
        let text = m.render();
        assert!(text.contains("didgate_calls_total{upstream=\"a\\\"b\",status_class=\"2xx\"} 1"));
        assert!(text.contains("didgate_calls_total{upstream=\"a\\\"b\",status_class=\"5xx\"} 1"));
        assert!(text.contains("didgate_refusals_total{code=\"policy\"} 1"));
        assert!(text.contains("didgate_grants_consumed_total{flow=\"two_step\"} 1"));
        assert!(text.contains("didgate_revocations_total{target=\"grant\"} 1"));
        assert!(text.contains("didgate_call_latency_seconds_bucket{le=\"0.01\"} 2"));
        assert!(text.contains("didgate_call_latency_seconds_bucket{le=\"60\"} 2"));
        assert!(text.contains("didgate_call_latency_seconds_bucket{le=\"+Inf\"} 3"));
        assert!(text.contains("didgate_call_latency_seconds_count 3"));
        assert!(text.contains("didgate_call_latency_seconds_sum 100.008000"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap_or_default();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}

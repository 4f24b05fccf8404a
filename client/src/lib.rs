//! The didgate client library: identity, a pinned QUIC connection to the gateway, signed calls,
//! and the client's own audit chain.
//!
//! Owns: identity files ([`identity`]), mutual DID authentication over TLS ([`tls`], shared
//! with the gateway), async framing ([`wire`]), and [`Client`], which signs each request,
//! records it in the local chain before sending, and records the gateway's signed receipt or
//! refusal after. It never depends on the gateway crate and never holds an upstream secret.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use didgate_client::{Client, CallSpec};
//! let identity = didgate_client::identity::load("/home/me/.didgate/identity".as_ref())?;
//! let gateway = "did:key:z6MkiTBz1ymuepAQ4HEHYSF1H8quG5GLVVQR3djdX3mDooWp".parse()?;
//! let client = Client::open(identity, "/home/me/.didgate/chain".as_ref(),
//!     "127.0.0.1:7443".parse()?, gateway).await?;
//! let answer = client.call(CallSpec::new("payments", "GET", "/v1/balance")).await?;
//! println!("{} {}", answer.status, String::from_utf8_lossy(&answer.body));
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod identity;
pub mod tls;
pub mod wire;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use didgate_audit::entry::{Entry, EntryKind, Outcome, Role};
use didgate_audit::store::{Chain, CheckpointPolicy, Store, StoreError};
use didgate_protocol::frame::{self, FrameDecoder, FrameType};
use didgate_protocol::message::{
    self, Message, Receipt, Refusal, RefusalCode, Request, ResponseHead, SignedMessage,
};
use didgate_protocol::{Did, Identity, envelope};
use tokio::sync::Mutex;

/// How long a connection attempt may take before the gateway counts as unreachable.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Milliseconds since the Unix epoch by the system clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Why a call did not produce a verified answer. Each variant says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// The gateway refused the call with a signed, typed reason (recorded in the chain).
    #[error("refused by the gateway ({code}): {reason}")]
    Refused {
        /// The typed reason.
        code: RefusalCode,
        /// The gateway's explanation.
        reason: String,
        /// The gateway's clock when it refused (compare with yours on `clock_skew`).
        gateway_time_ms: u64,
    },
    /// The gateway could not be reached or authenticated (check the address and pinned DID).
    #[error("gateway unreachable: {0}")]
    Unreachable(String),
    /// The connection was lost mid-call: the outcome is unknown (recorded as such). Do not
    /// retry with a fresh signature blindly: the call may have executed.
    #[error("connection lost, outcome unknown: {0}")]
    ConnectionLost(String),
    /// The gateway's answer is not valid (bad signature, wrong call, digest mismatch).
    #[error("invalid answer from the gateway: {0}")]
    InvalidAnswer(String),
    /// The local audit chain could not be written: the call was not sent.
    #[error("local audit chain unavailable: {0}")]
    Audit(String),
}

/// What to call.
#[derive(Debug, Clone)]
pub struct CallSpec {
    /// Upstream name.
    pub upstream: String,
    /// HTTP method.
    pub method: String,
    /// Path, starting with `/`.
    pub path: String,
    /// Query parameters.
    pub query: Vec<(String, String)>,
    /// Headers (names are lower-cased when signed).
    pub headers: Vec<(String, String)>,
    /// Request body.
    pub body: Vec<u8>,
}

impl CallSpec {
    /// A call with no query, headers or body.
    pub fn new(upstream: &str, method: &str, path: &str) -> Self {
        Self {
            upstream: upstream.into(),
            method: method.to_ascii_uppercase(),
            path: path.into(),
            query: Vec::new(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_ascii_lowercase(), value.into()));
        self
    }
}

/// A verified answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The call ID.
    pub call: [u8; 32],
    /// Upstream HTTP status.
    pub status: u16,
    /// Response headers.
    pub headers: Vec<(String, String)>,
    /// Response body.
    pub body: Vec<u8>,
    /// The gateway's receipt, verified.
    pub receipt: Receipt,
    /// The receipt as signed.
    pub receipt_bytes: Vec<u8>,
}

/// The gateway's last word on one stream, unverified beyond its signature.
#[derive(Debug)]
pub enum RawFinal {
    /// A receipt (signature verified, signer = pinned gateway).
    Receipt(message::Signed<Receipt>),
    /// A refusal (signature verified, signer = pinned gateway).
    Refusal(message::Signed<Refusal>),
}

/// Everything one stream returned.
#[derive(Debug)]
pub struct RawAnswer {
    /// The response head, if any.
    pub head: Option<ResponseHead>,
    /// The body bytes.
    pub body: Vec<u8>,
    /// The final frame.
    pub last: RawFinal,
}

/// A connection to one pinned gateway, with the identity that signs and the chain that
/// records. One connection carries concurrent calls; it reconnects when lost.
pub struct Client {
    identity: Arc<Identity>,
    gateway: Did,
    addr: SocketAddr,
    endpoint: quinn::Endpoint,
    conn: Mutex<Option<quinn::Connection>>,
    chain: Chain,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("did", self.identity.did())
            .field("gateway", &self.gateway)
            .finish()
    }
}

impl Client {
    /// Opens the chain at `chain_dir` for `identity` and prepares a connection to the gateway
    /// at `addr` whose DID must be `gateway`. Connects lazily on the first call.
    pub async fn open(
        identity: Identity,
        chain_dir: &Path,
        addr: SocketAddr,
        gateway: Did,
    ) -> Result<Self, ClientError> {
        let store = Store::open(chain_dir, &[])?;
        let identity = Arc::new(identity);
        let chain = Chain::open(
            store,
            identity.clone(),
            Role::Client,
            now_ms(),
            CheckpointPolicy::default(),
        )?;
        Self::with_chain(identity, chain, addr, gateway)
    }

    /// Like [`Client::open`] with an already open chain.
    pub fn with_chain(
        identity: Arc<Identity>,
        chain: Chain,
        addr: SocketAddr,
        gateway: Did,
    ) -> Result<Self, ClientError> {
        tls::install_provider();
        let cfg =
            tls::client_config(&identity, &gateway).map_err(|e| ClientError::Tls(e.to_string()))?;
        // Bind the unspecified address of the gateway's family (loopback stays loopback).
        let ip: std::net::IpAddr = match (addr.is_ipv4(), addr.ip().is_loopback()) {
            (true, true) => std::net::Ipv4Addr::LOCALHOST.into(),
            (true, false) => std::net::Ipv4Addr::UNSPECIFIED.into(),
            (false, true) => std::net::Ipv6Addr::LOCALHOST.into(),
            (false, false) => std::net::Ipv6Addr::UNSPECIFIED.into(),
        };
        let bind = SocketAddr::new(ip, 0);
        let mut endpoint =
            quinn::Endpoint::client(bind).map_err(|e| ClientError::Tls(e.to_string()))?;
        endpoint.set_default_client_config(cfg);
        Ok(Self {
            identity,
            gateway,
            addr,
            endpoint,
            conn: Mutex::new(None),
            chain,
        })
    }

    /// This client's DID.
    pub fn did(&self) -> &Did {
        self.identity.did()
    }

    /// The local chain.
    pub fn chain(&self) -> &Chain {
        &self.chain
    }

    /// Closes the connection and the chain writer.
    pub async fn close(&self) {
        if let Some(c) = self.conn.lock().await.take() {
            c.close(0u32.into(), b"bye");
        }
        self.endpoint.close(0u32.into(), b"bye");
        self.chain.close();
    }

    async fn connection(&self) -> Result<quinn::Connection, CallError> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref()
            && c.close_reason().is_none()
        {
            return Ok(c.clone());
        }
        let connecting = self
            .endpoint
            .connect(self.addr, tls::SERVER_NAME)
            .map_err(|e| CallError::Unreachable(e.to_string()))?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| {
                CallError::Unreachable(format!("no handshake within {CONNECT_TIMEOUT:?}"))
            })?
            .map_err(|e| CallError::Unreachable(e.to_string()))?;
        *guard = Some(conn.clone());
        Ok(conn)
    }

    /// Builds and signs a request for `spec` against the current chain head, without sending
    /// or recording it. Returns the signed bytes and the call ID.
    pub fn sign(&self, spec: &CallSpec) -> Result<(Vec<u8>, [u8; 32]), CallError> {
        let head = self
            .chain
            .head()
            .map_err(|e| CallError::Audit(e.to_string()))?;
        let (path, query) = split_query(&spec.path, &spec.query);
        let req = Request {
            v: message::VERSION,
            aud: self.gateway.to_string(),
            upstream: spec.upstream.clone(),
            method: spec.method.to_ascii_uppercase(),
            path,
            query,
            headers: spec
                .headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect(),
            body_len: spec.body.len() as u64,
            body_b3: *blake3::hash(&spec.body).as_bytes(),
            nonce: rand::random(),
            time_ms: now_ms(),
            head,
        };
        let bytes = req.sign(&self.identity);
        let call = envelope::verify(&bytes, Request::KIND)
            .map_err(|e| CallError::InvalidAnswer(e.to_string()))?
            .digest();
        Ok((bytes, call))
    }

    /// Makes one call: signs, records the request durably, sends, verifies the answer, records
    /// the result. Never retries on its own.
    pub async fn call(&self, spec: CallSpec) -> Result<Answer, CallError> {
        let (bytes, call) = self.sign(&spec)?;
        let mut entry = Entry::new(EntryKind::Request, now_ms());
        entry.call = Some(call);
        entry.signed = Some(bytes.clone());
        self.chain
            .append_entry(entry)
            .await
            .map_err(|e| CallError::Audit(e.to_string()))?;
        let raw = self.send_signed(&bytes, &spec.body).await;
        let mut result = Entry::new(EntryKind::Result, now_ms());
        result.call = Some(call);
        let outcome = match raw {
            Err(e) => {
                result.outcome = Some(Outcome::Unknown);
                result.detail = Some(e.to_string());
                Err(e)
            }
            Ok(RawAnswer {
                last: RawFinal::Refusal(r),
                ..
            }) => {
                result.outcome = Some(Outcome::Refusal);
                result.peer_entry = r.message.entry;
                result.signed = Some(r.bytes.clone());
                Err(CallError::Refused {
                    code: r.message.code,
                    reason: r.message.reason.clone(),
                    gateway_time_ms: r.message.time_ms,
                })
            }
            Ok(RawAnswer {
                head,
                body,
                last: RawFinal::Receipt(r),
            }) => match check_receipt(call, head.as_ref(), &body, &r.message) {
                Ok(()) => {
                    result.outcome = Some(Outcome::Receipt);
                    result.peer_entry = Some(r.message.entry);
                    result.signed = Some(r.bytes.clone());
                    let head = head.unwrap_or(ResponseHead {
                        v: 1,
                        status: r.message.status,
                        headers: Vec::new(),
                    });
                    Ok(Answer {
                        call,
                        status: head.status,
                        headers: head.headers,
                        body,
                        receipt: r.message,
                        receipt_bytes: r.bytes,
                    })
                }
                Err(why) => {
                    result.outcome = Some(Outcome::Unknown);
                    result.detail = Some(why.clone());
                    Err(CallError::InvalidAnswer(why))
                }
            },
        };
        self.chain
            .append_entry(result)
            .await
            .map_err(|e| CallError::Audit(e.to_string()))?;
        outcome
    }

    /// Low level: sends already signed request bytes and a body on a new stream and returns
    /// what came back, checking only that the final frame is signed by the pinned gateway.
    /// Records nothing in the chain ([`Client::call`] does).
    pub async fn send_signed(&self, request: &[u8], body: &[u8]) -> Result<RawAnswer, CallError> {
        let conn = self.connection().await?;
        let lost = |e: &dyn std::fmt::Display| CallError::ConnectionLost(e.to_string());
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(&e))?;
        let mut out = BytesMut::with_capacity(request.len() + body.len() + 64);
        frame::encode(FrameType::Request, request, &mut out)
            .map_err(|e| CallError::InvalidAnswer(e.to_string()))?;
        frame::encode_chunks(body, &mut out);
        // A refused call may close our send side early; the answer still arrives.
        let _ = send.write_all(&out).await;
        let _ = send.finish();
        let mut dec = FrameDecoder::new();
        let mut head = None;
        let mut resp = Vec::new();
        loop {
            let frame = wire::next_frame(&mut recv, &mut dec)
                .await
                .map_err(|e| lost(&e))?;
            let Some(frame) = frame else {
                return Err(CallError::ConnectionLost(
                    "stream ended without a receipt".into(),
                ));
            };
            match frame.kind {
                FrameType::Head => {
                    head = Some(
                        ResponseHead::decode(&frame.payload)
                            .map_err(|e| CallError::InvalidAnswer(e.to_string()))?,
                    )
                }
                FrameType::Body => resp.extend_from_slice(&frame.payload),
                FrameType::Receipt => {
                    let r = message::open_from::<Receipt>(&frame.payload, &self.gateway)
                        .map_err(|e| CallError::InvalidAnswer(e.to_string()))?;
                    return Ok(RawAnswer {
                        head,
                        body: resp,
                        last: RawFinal::Receipt(r),
                    });
                }
                FrameType::Refusal => {
                    let r = message::open_from::<Refusal>(&frame.payload, &self.gateway)
                        .map_err(|e| CallError::InvalidAnswer(e.to_string()))?;
                    return Ok(RawAnswer {
                        head,
                        body: resp,
                        last: RawFinal::Refusal(r),
                    });
                }
                other => {
                    return Err(CallError::InvalidAnswer(format!(
                        "unexpected frame {other:?}"
                    )));
                }
            }
        }
    }
}

fn split_query(path: &str, extra: &[(String, String)]) -> (String, Vec<(String, String)>) {
    let (p, q) = match path.split_once('?') {
        Some((p, q)) => (p.to_string(), q),
        None => (path.to_string(), ""),
    };
    let mut query: Vec<(String, String)> = q
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (kv.to_string(), String::new()),
        })
        .collect();
    query.extend(extra.iter().cloned());
    (p, query)
}

fn check_receipt(
    call: [u8; 32],
    head: Option<&ResponseHead>,
    body: &[u8],
    r: &Receipt,
) -> Result<(), String> {
    if r.call != call {
        return Err("receipt is for another call".into());
    }
    if r.resp_b3 != *blake3::hash(body).as_bytes() || r.resp_len != body.len() as u64 {
        return Err("response body does not match the receipt's digest".into());
    }
    if head.is_some_and(|h| h.status != r.status) {
        return Err("status does not match the receipt".into());
    }
    Ok(())
}

/// Why a client could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The local chain could not be opened (another process holds it?).
    #[error("local chain: {0}")]
    Store(#[from] StoreError),
    /// TLS or socket setup failed.
    #[error("transport: {0}")]
    Tls(String),
}

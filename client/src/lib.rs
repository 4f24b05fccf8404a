//! The didgate client library: identity, a pinned QUIC connection to the gateway, signed calls,
//! and the client's own audit chain.
//!
//! Owns: the client's home directory ([`Home`]: identity file, pinned gateway, chains),
//! identity files ([`identity`]), and [`Client`], which signs each request, records it in the
//! local chain before sending, and records the gateway's signed receipt or refusal after. It
//! never depends on the gateway crate and never holds an upstream secret. With the `proxy`
//! feature (on by default) it also owns the local HTTP proxy ([`proxy`]); build with
//! `default-features = false` to embed only the client, without the `didgate` binary's
//! dependencies (feature `cli`).
//!
//! The whole API, in the order an agent uses it:
//!
//! | step | call |
//! | --- | --- |
//! | find the home (`DIDGATE_HOME`, else `~/.didgate`) and its pinned gateway | [`Home::from_env`], [`Home::pinned`] |
//! | load the home's identity (a sealed one with its passphrase) | [`Home::identity`], [`Home::identity_with`] |
//! | or any identity file (mode 0600, never overwritten) | [`identity::load`], [`identity::create`] |
//! | connect to the pinned gateway (lazily; reconnects after a restart) | [`Client::from_home`], [`Client::open`] |
//! | give up on an unreachable gateway sooner or later (default 2 s) | [`Client::with_connect_timeout`] |
//! | learn what this DID may call | [`Client::catalog`] |
//! | call (concurrent calls share one connection) | [`Client::call`] |
//! | grant, then execute (hold a grant briefly) | [`Client::grant`], [`Client::execute`] |
//! | stream a response as it arrives | [`Client::call_streaming`] |
//! | read the local chain | [`Client::chain`] (while open), `didgate_audit::load_records` (after [`Client::close`]) |
//! | handle an error | [`CallError`]: [`CallError::advice`], [`CallError::is_retryable`], its `source()` |
//! | share one home's chain among processes (the CLI, proxy and MCP server do) | [`local::Caller::from_home`] |
//!
//! Signed request bytes without a call, raw exchanges, and the TLS and frame I/O shared with
//! the gateway are in [`low_level`]: for tests and benchmarks, not needed by an agent.
//!
//! Runnable examples: `client/examples/` (`from_home`, `one_shot`, `agent_loop`, `streaming`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use didgate_client::{CallSpec, Home};
//! let home = Home::from_env(None)?;
//! let pin = home.pinned()?.ok_or("no gateway pinned (`didgate pin`)")?;
//! let client = didgate_client::Client::from_home(&home, home.identity(None)?, &pin).await?;
//! match client.call(CallSpec::new("payments", "GET", "/v1/balance")).await {
//!     Ok(answer) => println!("{} {}", answer.status, String::from_utf8_lossy(&answer.body)),
//!     Err(e) => eprintln!("{e}: {}", e.advice()),
//! }
//! client.close().await;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
pub mod home;
pub mod local;
pub mod low_level;
#[cfg(feature = "proxy")]
pub mod proxy;
mod raw;

/// Process hardening (no core dumps, private files) and identity files, shared with the gateway
/// ([`didgate_io`]).
pub use didgate_io::{hardening, identity};
use didgate_io::{now_ms, tls, wire};
pub use error::{AuditError, CallError, ClientError, InvalidAnswer, Lost, Unreachable};
pub use home::{Home, HomeError, Pin};
use raw::{RawAnswer, RawFinal};

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use bytes::BytesMut;
use didgate_audit::entry::{Entry, EntryKind, Outcome, Role};
use didgate_audit::store::{Append, Chain, CheckpointPolicy, Claim, ClaimRule, Store, StoreError};
use didgate_protocol::Version;
pub use didgate_protocol::catalog::Operation;
use didgate_protocol::catalog::{Catalog, CatalogRequest};
use didgate_protocol::frame::{self, FrameDecoder, FrameType};
use didgate_protocol::message::{
    self, GrantBody, Message, Receipt, Refusal, Request, ResponseHead, SignedMessage,
};
/// The DID and identity types, so an embedder needs no second crate.
pub use didgate_protocol::{Did, Identity};
use tokio::sync::Mutex;

/// How long a connection attempt may take before the gateway counts as unreachable, unless
/// set otherwise ([`Client::with_connect_timeout`]). A gateway that is down costs every call this
/// long (and an SDK that retries through the proxy, a multiple of it).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

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

/// A connection to one pinned gateway, with the identity that signs and the chain that
/// records. One connection carries concurrent calls; it reconnects when lost.
pub struct Client {
    identity: Arc<Identity>,
    gateway: Did,
    /// The address the gateway was pinned at.
    addr: SocketAddr,
    /// Where calls go now: `addr`, or this caller's home node in a cluster once a node said
    /// `moved` ([`Client::follow`]).
    target: std::sync::Mutex<SocketAddr>,
    endpoint: quinn::Endpoint,
    conn: Mutex<Option<quinn::Connection>>,
    /// Held through each handshake: `presented` is one slot, so handshakes (to the current
    /// target, or to a grant's issuer for one Execute) take turns.
    handshake: Mutex<()>,
    chain: Chain,
    /// The protocol version this client speaks (its requests' `v`, its connections' ALPN).
    version: Version,
    /// How long a connection attempt may take.
    connect_timeout: Duration,
    /// The connections' idle timeout ([`Client::with_idle_timeout`]).
    idle: Duration,
    /// What the gateway presented in the last handshake (written by the TLS verifier).
    presented: Arc<std::sync::Mutex<Option<Seen>>>,
    /// The pinned gateway DID, the newest revocation list of its nodes seen, and the node
    /// certificates already verified (shared with the TLS verifier).
    trust: Arc<didgate_io::node::GatewayTrust>,
    /// Where the newest revocation list learnt is kept (the home's), if anywhere.
    revocations_file: Option<std::path::PathBuf>,
    /// Whether the chain's store has the [`PENDING`] keyspace.
    tracks_pending: bool,
    /// The last signed refusals, by call ([`Client::take_refusal`]).
    refusals: std::sync::Mutex<std::collections::VecDeque<([u8; 32], Vec<u8>)>>,
}

/// How many `moved` refusals (or connections closed by a drained gateway before answering)
/// one call follows ([`Client::open_routed`]): a cluster whose members change under it may
/// send a caller on twice; more is a loop.
const MAX_MOVES: usize = 2;

/// How many times one call waits and follows a `moved` back to a node that already sent it
/// on ([`Client::open_routed`]): while a membership changes, a node that has not yet read the
/// change sends the caller back for a moment. The waits double from [`BOUNCE_WAIT`]: at most
/// 1.575 s in all.
const MAX_BOUNCES: u32 = 6;

/// The longest advised wait after which [`Client::call`] makes a call refused `handover` again,
/// once (a call that crossed its caller's change of home): a longer one is a handover window
/// the caller is told about.
const HANDOVER_RETRY: Duration = Duration::from_secs(1);

/// The first wait before following a `moved` back to a node that already sent the call on.
const BOUNCE_WAIT: Duration = Duration::from_millis(25);

/// How many signed refusals a client keeps for [`Client::take_refusal`].
const KEPT_REFUSALS: usize = 256;

/// The client store's keyspace of calls recorded as sent and not yet answered (key: call ID),
/// written in the same atomic batch as the request and the result entries. What a process that
/// ended mid-call leaves there is closed as `unknown` when the chain is next opened
/// ([`Client::with_chain`]), so every request of the chain gets its result entry.
pub const PENDING: &str = "pending";

/// Closes every call left pending in `chain` with an `unknown` result: call it once after
/// opening a client store, before any client uses it (a call in flight would be closed too).
/// `Ok(false)` if the store has no [`PENDING`] keyspace (opened without it).
pub fn close_pending(chain: &Chain) -> Result<bool, ClientError> {
    let left = match chain.store().scan(PENDING, &[]) {
        Ok(left) => left,
        Err(StoreError::UnknownSpace(_)) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    for (key, _) in left {
        let Ok(call) = <[u8; 32]>::try_from(key.as_slice()) else {
            continue;
        };
        let mut result = Entry::new(EntryKind::Result, now_ms());
        result.call = Some(call);
        result.outcome = Some(Outcome::Unknown);
        result.detail = Some(
            "the process that sent this call ended before its answer (closed when the chain was next opened)"
                .into(),
        );
        let claims = vec![Claim {
            space: PENDING,
            key,
            value: Vec::new(),
            rule: ClaimRule::Remove,
        }];
        chain
            .append_blocking(Append {
                entry: result,
                claims,
            })
            .map_err(ClientError::Recover)?;
        tracing::warn!(call = %hex::encode(call), "closed a call left unanswered by a process that ended mid-call");
    }
    Ok(true)
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
        let store = Store::open(chain_dir, &[PENDING])?;
        let identity = Arc::new(identity);
        let chain = Chain::open(
            store,
            identity.clone(),
            Role::Client,
            now_ms(),
            CheckpointPolicy::default(),
        )?;
        close_pending(&chain)?;
        Self::with_chain(identity, chain, addr, gateway)
    }

    /// [`Client::open`] with `home`'s chain, for the gateway `pin`. Fails if another process
    /// holds the chain: [`local::Caller::from_home`] then calls through that process.
    pub async fn from_home(
        home: &Home,
        identity: Identity,
        pin: &Pin,
    ) -> Result<Self, ClientError> {
        Self::open(identity, &home.chain_dir(), pin.addr, pin.did.clone())
            .await?
            .with_revocations_file(home.node_revocations())
    }

    /// Like [`Client::open`] with an already open chain (several clients may share one). If its
    /// store was opened with the [`PENDING`] keyspace, this client marks its calls pending until
    /// answered; whoever opens the store closes the calls a process left pending first
    /// ([`close_pending`], as [`Client::open`] does).
    pub fn with_chain(
        identity: Arc<Identity>,
        chain: Chain,
        addr: SocketAddr,
        gateway: Did,
    ) -> Result<Self, ClientError> {
        tls::install_provider();
        let tracks_pending = match chain.store().get(PENDING, b"") {
            Ok(_) => true,
            Err(StoreError::UnknownSpace(_)) => false,
            Err(e) => return Err(e.into()),
        };
        let presented = Arc::new(std::sync::Mutex::new(None));
        let trust = Arc::new(didgate_io::node::GatewayTrust::new(gateway.clone()));
        let cfg = pinned_config(&identity, &trust, Version::CURRENT, &presented)?;
        // Bind the unspecified address of the gateway's family (loopback stays loopback).
        let ip: std::net::IpAddr = match (addr.is_ipv4(), addr.ip().is_loopback()) {
            (true, true) => std::net::Ipv4Addr::LOCALHOST.into(),
            (true, false) => std::net::Ipv4Addr::UNSPECIFIED.into(),
            (false, true) => std::net::Ipv6Addr::LOCALHOST.into(),
            (false, false) => std::net::Ipv6Addr::UNSPECIFIED.into(),
        };
        let bind = SocketAddr::new(ip, 0);
        let mut endpoint = quinn::Endpoint::client(bind).map_err(ClientError::Socket)?;
        endpoint.set_default_client_config(cfg);
        Ok(Self {
            identity,
            gateway,
            addr,
            target: std::sync::Mutex::new(addr),
            endpoint,
            conn: Mutex::new(None),
            handshake: Mutex::new(()),
            chain,
            version: Version::CURRENT,
            connect_timeout: CONNECT_TIMEOUT,
            idle: tls::IDLE_TIMEOUT,
            presented,
            trust,
            revocations_file: None,
            tracks_pending,
            refusals: std::sync::Mutex::new(std::collections::VecDeque::new()),
        })
    }

    /// Takes `bytes` as the pinned gateway's list of revoked node certificates if the gateway
    /// signed it and it is newer than the one held (nodes also staple theirs in the
    /// handshake). `Ok(true)` when it replaced the one held. Takes effect from the next
    /// handshake and for every answer checked after it.
    pub fn learn_node_revocations(
        &self,
        bytes: &[u8],
    ) -> Result<bool, didgate_protocol::node::NodeCertError> {
        self.trust.learn_revocations(bytes)
    }

    /// The newest revocation list of the pinned gateway's nodes this client holds (as signed).
    pub fn node_revocations(&self) -> Option<Vec<u8>> {
        self.trust.revocations().map(|h| h.1.clone())
    }

    /// Keeps the newest revocation list learnt in `path` (read now if it exists, rewritten
    /// whenever a handshake brings a newer one): what [`Client::from_home`] does with the
    /// home's `node-revocations.cose`.
    pub fn with_revocations_file(mut self, path: std::path::PathBuf) -> Result<Self, ClientError> {
        match std::fs::read(&path) {
            Ok(bytes) => {
                // a file the pinned gateway did not sign is ignored, never trusted
                if let Err(e) = self.trust.learn_revocations(&bytes) {
                    tracing::warn!(file = %path.display(), error = %e, "node revocation list ignored");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(ClientError::Io { path, source }),
        }
        self.revocations_file = Some(path);
        Ok(self)
    }

    /// Writes the list held to the revocations file when it is newer than the file's (another
    /// process of the home may have kept a newer one: then this client takes it instead, so the
    /// file never goes back to an older list).
    fn keep_revocations(&self) {
        let (Some(path), Some(held)) = (&self.revocations_file, self.trust.revocations()) else {
            return;
        };
        if let Ok(bytes) = std::fs::read(path)
            && let Ok(kept) = didgate_protocol::node::NodeRevocations::open(&bytes, &self.gateway)
            && kept.seq >= held.0.seq
        {
            let _ = self.trust.learn_revocations(&bytes);
            return;
        }
        // a name of this process's own, then an atomic rename
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        if let Err(e) = std::fs::write(&tmp, &held.1).and_then(|()| std::fs::rename(&tmp, path)) {
            tracing::warn!(file = %path.display(), error = %e, "cannot keep the node revocation list");
        }
    }

    /// Gives up on a connection attempt after `timeout` instead of [`CONNECT_TIMEOUT`]: the
    /// call then fails with [`CallError::Unreachable`] and nothing was sent. Every call made
    /// while the gateway is down waits this long. Takes effect from the next connection.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Closes a connection after `idle` without a packet from the gateway (keep-alives go
    /// every sixth of it), instead of the transport's 30 s: how long calls on a connection to
    /// a node that died wait before they end `unknown` and the next one connects again (to
    /// the pinned address, which sends the caller to its new home in a cluster). Takes effect
    /// from the next connection.
    pub fn with_idle_timeout(mut self, idle: Duration) -> Result<Self, ClientError> {
        self.idle = idle;
        self.endpoint
            .set_default_client_config(self.quic_config(self.version)?);
        Ok(self)
    }

    /// The QUIC configuration of this client's connections in `version`.
    fn quic_config(&self, version: Version) -> Result<quinn::ClientConfig, ClientError> {
        let mut cfg = pinned_config(&self.identity, &self.trust, version, &self.presented)?;
        cfg.transport_config(Arc::new(tls::transport_idle(self.idle)));
        Ok(cfg)
    }

    /// How long a connection attempt may take ([`Client::with_connect_timeout`]).
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// The gateway's address (the one it was pinned at).
    pub fn gateway_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where this client's calls go now: the pinned address, or in a cluster this caller's
    /// home node once a node answered `moved` (remembered until it is unreachable).
    pub fn home_addr(&self) -> SocketAddr {
        self.current()
    }

    /// Speaks protocol `version` instead of [`Version::CURRENT`] (for a gateway of an older
    /// release that serves only that version). Takes effect from the next connection.
    pub fn speaking(mut self, version: Version) -> Result<Self, ClientError> {
        let cfg = self.quic_config(version)?;
        self.endpoint.set_default_client_config(cfg);
        self.version = version;
        // a connection of the old version would carry requests it refuses
        *self.conn.get_mut() = None;
        Ok(self)
    }

    /// The protocol version this client speaks.
    pub fn version(&self) -> Version {
        self.version
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

    /// Drops the current connection (the next call connects afresh): calls in flight on it
    /// end at once with [`CallError::ConnectionLost`], their outcome recorded as unknown. For a
    /// caller that knows the gateway went away, rather than waiting for the idle timeout.
    pub async fn disconnect(&self) {
        if let Some(c) = self.conn.lock().await.take() {
            c.close(0u32.into(), b"disconnect");
        }
    }

    async fn connection(&self) -> Result<quinn::Connection, CallError> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref()
            && c.close_reason().is_none()
        {
            return Ok(c.clone());
        }
        let conn = match self.connect().await {
            // a home node remembered but gone: back to the pinned address, which sends this
            // caller to its home as the cluster now sees it
            Err(CallError::Unreachable(_)) if self.current() != self.addr => {
                tracing::warn!(home = %self.current(), gateway = %self.addr, "this caller's home node is unreachable: back to the pinned address");
                self.set_target(self.addr);
                self.connect().await
            }
            other => other,
        }
        .inspect_err(|e| {
            tracing::warn!(gateway = %self.current(), error = %e, "cannot connect to the gateway");
        })?;
        *guard = Some(conn.clone());
        Ok(conn)
    }

    /// One connection attempt to the current target, bounded by the connect timeout.
    async fn connect(&self) -> Result<quinn::Connection, CallError> {
        self.connect_to(self.current()).await
    }

    /// One connection attempt to `addr`, bounded by the connect timeout.
    async fn connect_to(&self, addr: SocketAddr) -> Result<quinn::Connection, CallError> {
        let _turn = self.handshake.lock().await;
        *self
            .presented
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        // quinn instruments the connection's driver task with the span current when it is
        // created: under the first call's span, that call's span would stay open as long as the
        // connection does. The connection gets a span of its own, with no parent.
        let span = tracing::info_span!(parent: None, "connection", gateway = %addr);
        let connecting = span
            .in_scope(|| self.endpoint.connect(addr, tls::SERVER_NAME))
            .map_err(|source| CallError::Unreachable(Unreachable::Connect { addr, source }))?;
        let timeout = self.connect_timeout;
        match tokio::time::timeout(timeout, connecting).await {
            Ok(Ok(conn)) => {
                self.keep_revocations();
                Ok(conn)
            }
            Ok(Err(e)) => Err(self.connect_error(addr, e)),
            Err(_) => Err(CallError::Unreachable(Unreachable::NoHandshake {
                addr,
                timeout,
            })),
        }
    }

    /// What a failed handshake means: another DID than the pinned one, a version the gateway
    /// does not serve, its connection limits, or anything else (unreachable).
    fn connect_error(&self, addr: SocketAddr, e: quinn::ConnectionError) -> CallError {
        let presented = self
            .presented
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match presented {
            Some(Seen::Refused(presented, None)) => {
                return CallError::WrongGateway {
                    addr,
                    presented,
                    pinned: self.gateway.clone(),
                };
            }
            Some(Seen::Refused(presented, Some(source))) => {
                return CallError::Unreachable(Unreachable::NodeCertificate {
                    addr,
                    presented,
                    source,
                });
            }
            Some(Seen::Accepted) | None => {}
        }
        if tls::is_version_refusal(&e) {
            CallError::VersionUnsupported {
                offered: self.version,
            }
        } else if tls::is_connection_refused(&e) {
            CallError::Unreachable(Unreachable::TooManyConnections { addr })
        } else {
            CallError::Unreachable(Unreachable::Handshake { addr, source: e })
        }
    }

    /// Where calls go now (the pinned address, or the home node a `moved` named).
    fn current(&self) -> SocketAddr {
        *self.target.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_target(&self, addr: SocketAddr) {
        *self.target.lock().unwrap_or_else(PoisonError::into_inner) = addr;
    }

    /// Follows a signed `moved` refusal (specs/protocol.md, "Home nodes"): remembers the home
    /// node's address for this and every later call and drops the connection to the node
    /// that sent it (calls still on it finish there). `false` when the home is not an
    /// address this client can use, or is where the client already is.
    async fn follow(&self, home: &message::Home) -> bool {
        let Ok(addr) = home.addr.parse::<SocketAddr>() else {
            tracing::warn!(home = %home.addr, "a moved refusal names no usable address");
            return false;
        };
        if addr == self.current() {
            return false;
        }
        tracing::info!(home = %addr, node = %home.node, "this caller's home node: following");
        self.set_target(addr);
        self.conn.lock().await.take();
        true
    }

    /// Drops the cached connection if it is still `conn`, so the next call connects again.
    async fn forget(&self, conn: &quinn::Connection) {
        let mut guard = self.conn.lock().await;
        if guard
            .as_ref()
            .is_some_and(|c| c.stable_id() == conn.stable_id())
        {
            *guard = None;
        }
    }

    /// Builds and signs a request for `spec` against the current chain head, without sending
    /// or recording it. Returns the signed bytes and the call ID ([`low_level::RawExchange`]).
    pub(crate) fn sign_request(&self, spec: &CallSpec) -> Result<(Vec<u8>, [u8; 32]), CallError> {
        let head = self
            .chain
            .head()
            .map_err(|e| CallError::Audit(AuditError::Head(e)))?;
        let (path, query) = split_query(&spec.path, &spec.query);
        let req = Request {
            v: self.version.as_u64(),
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
        // the call ID comes with the signature: no verification of our own envelope
        Ok(req.sign_with_digest(&self.identity))
    }

    /// Makes one call: signs, records the request durably, sends, verifies the answer, records
    /// the result. It makes the call again on its own in one case only: refused `handover`
    /// with an advised wait of at most 1 s (a call in flight as its caller's
    /// home node left; the refused request claimed nothing), once, after that wait, as a new
    /// request (signed anew, recorded in the chain like any call). It never resends a call
    /// that may have executed.
    pub async fn call(&self, spec: CallSpec) -> Result<Answer, CallError> {
        match self.call_once(&spec).await {
            // the caller's home node changed while this call crossed it: the refusal claimed
            // nothing, and a request signed now passes (specs/protocol.md, "Home nodes")
            Err(e)
                if e.refusal_code() == Some(message::RefusalCode::Handover)
                    && e.retry_in().is_some_and(|w| w <= HANDOVER_RETRY) =>
            {
                tokio::time::sleep(e.retry_in().unwrap_or_default()).await;
                self.call_once(&spec).await
            }
            other => other,
        }
    }

    /// One call of [`Client::call`]: signed, recorded, sent and its result recorded.
    async fn call_once(&self, spec: &CallSpec) -> Result<Answer, CallError> {
        let (bytes, call) = self.sign_request(spec)?;
        let span = self.call_span(spec, call);
        tracing::Instrument::instrument(
            async {
                self.record_request(call, &bytes).await?;
                let raw = self
                    .exchange_raw(FrameType::Request, &bytes, &spec.body)
                    .await;
                self.finish_call(call, raw).await
            },
            span,
        )
        .await
    }

    /// The span of one call: this client's DID, the upstream and the call ID now, the outcome
    /// (`receipt`, a refusal code, `unknown`) once its result entry is written
    /// ([`Client::record_result`]).
    fn call_span(&self, spec: &CallSpec, call: [u8; 32]) -> tracing::Span {
        tracing::info_span!(
            "call",
            did = %self.identity.did(),
            upstream = %spec.upstream,
            call = %hex::encode(call),
            outcome = tracing::field::Empty,
        )
    }

    /// Two-step flow, first step: asks the gateway for a signed, single-use grant for exactly
    /// this call, without executing it. The request is recorded before it is sent and the grant
    /// after. Present it with [`Client::execute`] before it expires.
    pub async fn grant(&self, spec: CallSpec) -> Result<IssuedGrant, CallError> {
        let (bytes, call) = self.sign_request(&spec)?;
        self.record_request(call, &bytes).await?;
        let raw = self
            .exchange_raw(FrameType::GrantRequest, &bytes, &[])
            .await;
        let mut result = Entry::new(EntryKind::Result, now_ms());
        result.call = Some(call);
        let outcome = match raw {
            Ok(RawAnswer {
                last: RawFinal::Grant(g),
                ..
            }) if g.message().call == call => {
                result.outcome = Some(Outcome::Grant);
                result.signed = Some(g.bytes().to_vec());
                let (_, grant, bytes) = g.into_parts();
                Ok(IssuedGrant {
                    call,
                    grant,
                    bytes,
                    body: spec.body,
                })
            }
            other => {
                // A refusal or a lost connection: recorded as for any call.
                return Err(match self.finish_call(call, other).await {
                    Err(e) => e,
                    Ok(_) => CallError::InvalidAnswer(InvalidAnswer::Mismatch(
                        "a receipt came back for a grant request",
                    )),
                });
            }
        };
        tracing::Span::current().record("outcome", "grant");
        // a grant not (yet) executed is complete for the verifier: no longer pending
        self.chain
            .append(self.closing(result))
            .await
            .map_err(|e| CallError::Audit(AuditError::Append(e)))?;
        outcome
    }

    /// Two-step flow, second step: presents the grant once, with the body it was issued for.
    pub async fn execute(&self, grant: &IssuedGrant) -> Result<Answer, CallError> {
        let raw = self
            .exchange_raw(FrameType::Execute, &grant.bytes, &grant.body)
            .await;
        self.finish_call(grant.call, raw).await
    }

    async fn record_request(&self, call: [u8; 32], bytes: &[u8]) -> Result<(), CallError> {
        let mut entry = Entry::new(EntryKind::Request, now_ms());
        entry.call = Some(call);
        entry.signed = Some(bytes.to_vec());
        let claims = self.pending_claim(call, ClaimRule::Put);
        self.chain
            .append(Append { entry, claims })
            .await
            .map_err(|e| CallError::Audit(AuditError::Append(e)))?;
        Ok(())
    }

    /// Checks the answer to a call and records the result entry (receipt, refusal, unknown).
    async fn finish_call(
        &self,
        call: [u8; 32],
        raw: Result<RawAnswer, CallError>,
    ) -> Result<Answer, CallError> {
        let (ending, body) = match raw {
            Err(e) => (Ending::Lost(e), Vec::new()),
            Ok(RawAnswer { head, body, last }) => {
                let (len, b3) = (body.len() as u64, *blake3::hash(&body).as_bytes());
                (
                    Ending::Final {
                        head,
                        len,
                        b3,
                        last: Box::new(last),
                    },
                    body,
                )
            }
        };
        let (head, r) = self.record_result(call, ending).await?;
        let (_, receipt, receipt_bytes) = r.into_parts();
        let head = head.unwrap_or(ResponseHead {
            v: self.version.as_u64(),
            status: receipt.status,
            headers: Vec::new(),
        });
        Ok(Answer {
            call,
            status: head.status,
            headers: head.headers,
            body,
            receipt,
            receipt_bytes,
        })
    }

    /// Records the result entry for how a call ended (receipt, refusal, unknown) and returns
    /// the verified receipt with the head, or the error. The body is judged by its length and
    /// BLAKE3 digest, so a streamed body need not be kept.
    async fn record_result(
        &self,
        call: [u8; 32],
        ending: Ending,
    ) -> Result<(Option<ResponseHead>, message::Signed<Receipt>), CallError> {
        let mut result = Entry::new(EntryKind::Result, now_ms());
        result.call = Some(call);
        let (head, len, b3, last) = match ending {
            Ending::Lost(e) => (None, 0, [0; 32], Err(e)),
            Ending::Final {
                head,
                len,
                b3,
                last,
            } => (head, len, b3, Ok(*last)),
        };
        let outcome = match last {
            Err(e) => {
                result.outcome = Some(Outcome::Unknown);
                result.detail = Some(e.to_string());
                Err(e)
            }
            Ok(RawFinal::Refusal(r)) => {
                result.outcome = Some(Outcome::Refusal);
                result.peer_entry = r.message().entry;
                result.signed = Some(r.bytes().to_vec());
                self.keep_refusal(call, r.bytes());
                let refusal = r.into_message();
                Err(CallError::Refused {
                    code: refusal.code,
                    reason: refusal.reason,
                    gateway_time_ms: refusal.time_ms,
                    call: refusal.call,
                })
            }
            Ok(RawFinal::Grant(_)) => {
                result.outcome = Some(Outcome::Unknown);
                result.detail = Some("a grant came back where a receipt was expected".into());
                Err(CallError::InvalidAnswer(InvalidAnswer::Mismatch(
                    "unexpected grant",
                )))
            }
            Ok(RawFinal::Receipt(r)) => {
                match check_receipt(call, head.as_ref(), len, &b3, r.message()) {
                    Ok(()) => {
                        result.outcome = Some(Outcome::Receipt);
                        result.peer_entry = Some(r.message().entry);
                        result.signed = Some(r.bytes().to_vec());
                        Ok((head, r))
                    }
                    Err(why) => {
                        // Keep the signed answer as evidence, but do not count it as a receipt.
                        result.outcome = Some(Outcome::Unknown);
                        result.detail = Some(why.into());
                        result.signed = Some(r.bytes().to_vec());
                        Err(CallError::InvalidAnswer(InvalidAnswer::Mismatch(why)))
                    }
                }
            }
        };
        let label = match (&result.outcome, &outcome) {
            (_, Err(CallError::Refused { code, .. })) => code.as_str().to_string(),
            (Some(Outcome::Receipt), _) => "receipt".into(),
            _ => "unknown".into(),
        };
        tracing::Span::current().record("outcome", label.as_str());
        self.chain
            .append(self.closing(result))
            .await
            .map_err(|e| CallError::Audit(AuditError::Append(e)))?;
        outcome
    }

    /// The claim that marks `call` pending (`Put`, with its request) or no longer (`Remove`,
    /// with its result), when this client's store tracks pending calls.
    fn pending_claim(&self, call: [u8; 32], rule: ClaimRule) -> Vec<Claim> {
        if !self.tracks_pending {
            return Vec::new();
        }
        vec![Claim {
            space: PENDING,
            key: call.to_vec(),
            value: Vec::new(),
            rule,
        }]
    }

    /// The append of a result entry that closes its call.
    fn closing(&self, result: Entry) -> Append {
        let claims = match result.call {
            Some(call) => self.pending_claim(call, ClaimRule::Remove),
            None => Vec::new(),
        };
        Append {
            entry: result,
            claims,
        }
    }

    /// Keeps the signed refusal of `call` for [`Client::take_refusal`] (the last
    /// [`KEPT_REFUSALS`] only).
    fn keep_refusal(&self, call: [u8; 32], bytes: &[u8]) {
        let mut kept = self.refusals.lock().unwrap_or_else(PoisonError::into_inner);
        if kept.len() >= KEPT_REFUSALS {
            kept.pop_front();
        }
        kept.push_back((call, bytes.to_vec()));
    }

    /// The gateway's signed refusal of `call`, as received, if it was one of the last
    /// [`KEPT_REFUSALS`] refusals this client recorded (taken: a second call returns `None`).
    /// What the process holding a home's chain relays to the caller ([`local`]).
    pub(crate) fn take_refusal(&self, call: [u8; 32]) -> Option<Vec<u8>> {
        let mut kept = self.refusals.lock().unwrap_or_else(PoisonError::into_inner);
        let at = kept.iter().position(|(c, _)| *c == call)?;
        kept.remove(at).map(|(_, b)| b)
    }

    /// [`Client::call_streaming`] that also returns the signed request (empty if it could not
    /// be signed) and its call ID.
    pub(crate) async fn call_streaming_signed(
        &self,
        spec: CallSpec,
    ) -> (Vec<u8>, [u8; 32], Result<StreamingAnswer<'_>, CallError>) {
        let (bytes, call) = match self.sign_request(&spec) {
            Ok(signed) => signed,
            Err(e) => return (Vec::new(), [0; 32], Err(e)),
        };
        let span = self.call_span(&spec, call);
        let answer = self.stream_signed(&bytes, call, &spec.body, span).await;
        (bytes, call, answer)
    }

    /// Like [`Client::call`], but returns as soon as the response head arrives: the body is
    /// read chunk by chunk as the gateway relays it ([`StreamingAnswer::next_chunk`]), its
    /// length and BLAKE3 digest computed on the fly, and the receipt verified and recorded when
    /// the body ends. Same chain rules as `call`: the request entry is written before sending,
    /// the result entry once the terminal frame arrives (or `unknown` if the stream is lost or
    /// the answer is dropped unfinished). A refusal before the head is returned as the error.
    pub async fn call_streaming(&self, spec: CallSpec) -> Result<StreamingAnswer<'_>, CallError> {
        let (bytes, call) = self.sign_request(&spec)?;
        let span = self.call_span(&spec, call);
        self.stream_signed(&bytes, call, &spec.body, span).await
    }

    /// Records the signed request `bytes` of `call`, sends it with `body`, and returns once the
    /// head (or the refusal) came back ([`Client::call_streaming`]).
    async fn stream_signed(
        &self,
        bytes: &[u8],
        call: [u8; 32],
        body: &[u8],
        span: tracing::Span,
    ) -> Result<StreamingAnswer<'_>, CallError> {
        let started = tracing::Instrument::instrument(
            self.stream_until_head(bytes, call, body),
            span.clone(),
        )
        .await;
        started.map(|(head, recv, dec)| StreamingAnswer {
            client: self,
            call,
            head,
            recv,
            dec,
            hasher: blake3::Hasher::new(),
            len: 0,
            receipt: None,
            done: false,
            span,
        })
    }

    /// [`Client::stream_signed`] up to the response head.
    async fn stream_until_head(
        &self,
        bytes: &[u8],
        call: [u8; 32],
        body: &[u8],
    ) -> Result<(ResponseHead, quinn::RecvStream, FrameDecoder), CallError> {
        self.record_request(call, bytes).await?;
        let opened = self.open_routed(FrameType::Request, bytes, body).await;
        let (mut recv, dec, first) = match opened {
            Ok((r, d, f)) => (r, d, f.map_or_else(|| Err(lost_without_cause()), Ok)),
            Err(e) => {
                return Err(self
                    .record_result(call, Ending::Lost(e))
                    .await
                    .err()
                    .unwrap_or_else(lost_without_cause));
            }
        };
        let head = match first {
            Ok(AnswerFrame::Head(h)) => Ok(h),
            Ok(AnswerFrame::Final(last)) => {
                let ending = Ending::Final {
                    head: None,
                    len: 0,
                    b3: *blake3::hash(b"").as_bytes(),
                    last,
                };
                return Err(match self.record_result(call, ending).await {
                    Err(e) => e,
                    Ok(_) => CallError::InvalidAnswer(InvalidAnswer::Mismatch(
                        "a receipt came back without a response head",
                    )),
                });
            }
            Ok(AnswerFrame::Body(_)) => Err(CallError::InvalidAnswer(InvalidAnswer::Mismatch(
                "body before the response head",
            ))),
            Err(e) => Err(e),
        };
        let head = match head {
            Ok(h) => h,
            Err(e) => {
                recv.stop(0u32.into()).ok();
                return Err(self
                    .record_result(call, Ending::Lost(e))
                    .await
                    .err()
                    .unwrap_or_else(lost_without_cause));
            }
        };
        Ok((head, recv, dec))
    }

    /// Asks the gateway which named operations this DID may call (specs/protocol.md,
    /// "Catalog"): every upstream's operations that the policy in force allows, in the
    /// gateway's configuration order. The list is advice, not a grant: each call is still
    /// decided on its own. Not a call, so nothing is recorded in the chain.
    pub async fn catalog(&self) -> Result<Vec<Operation>, CallError> {
        self.catalog_request(None).await
    }

    /// Like [`Client::catalog`], for one upstream only.
    pub async fn catalog_of(&self, upstream: &str) -> Result<Vec<Operation>, CallError> {
        self.catalog_request(Some(upstream.to_string())).await
    }

    async fn catalog_request(&self, upstream: Option<String>) -> Result<Vec<Operation>, CallError> {
        let request = CatalogRequest {
            v: self.version.as_u64(),
            upstream,
        };
        let (mut recv, _) = self
            .open_stream(None, FrameType::CatalogRequest, &request.encode(), &[])
            .await?;
        let mut dec = FrameDecoder::new();
        let mut ops = Vec::new();
        loop {
            let frame = wire::next_frame(&mut recv, &mut dec)
                .await
                .map_err(|e| CallError::ConnectionLost(Lost::Read(e)))?;
            let Some(frame) = frame else {
                return Ok(ops);
            };
            match frame.kind {
                FrameType::Catalog => ops.extend(
                    Catalog::decode_v(&frame.payload, self.version)
                        .map_err(|e| CallError::InvalidAnswer(InvalidAnswer::Decode(e)))?
                        .operations,
                ),
                FrameType::Refusal => {
                    let r: message::Signed<Refusal> = self
                        .open_answer(&frame.payload)
                        .map_err(|e| CallError::InvalidAnswer(InvalidAnswer::Open(e)))?;
                    let r = r.into_message();
                    return Err(CallError::Refused {
                        code: r.code,
                        reason: r.reason,
                        gateway_time_ms: r.time_ms,
                        call: None,
                    });
                }
                other => {
                    return Err(CallError::InvalidAnswer(InvalidAnswer::CatalogFrame(other)));
                }
            }
        }
    }

    /// Sends a first frame of `kind`, the body and FIN ([`Client::open_stream`]) and reads the
    /// answer's first frame; a signed `moved` refusal is followed to the node it names and the
    /// same frames are sent there (the node that said `moved` claimed nothing), at most
    /// [`MAX_MOVES`] times to a node that has not sent it on yet, and at most [`MAX_BOUNCES`]
    /// times, after a doubling wait, back to one that has. A Request's `moved` names the
    /// caller's home, which every later call goes to ([`Client::follow`]); an Execute's names
    /// the node that issued the grant, which this call alone goes to, on a connection of its
    /// own (unless the client's calls go there already): the client's other calls, in flight
    /// or later, keep going where they go.
    async fn open_routed(
        &self,
        kind: FrameType,
        first: &[u8],
        body: &[u8],
    ) -> Result<(quinn::RecvStream, FrameDecoder, Option<AnswerFrame>), CallError> {
        let mut moves = 0;
        let mut bounces = 0;
        // the nodes that sent this call on
        let mut movers: Vec<SocketAddr> = Vec::new();
        // the grant's issuer, where this Execute goes instead of the current target
        let mut issuer: Option<SocketAddr> = None;
        loop {
            let (mut recv, from) = self.open_stream(issuer, kind, first, body).await?;
            let mut dec = FrameDecoder::new();
            let frame = match self.read_answer_frame(&mut recv, &mut dec).await {
                // a draining gateway closed the connection without answering: nothing was
                // claimed, so the same frames go again
                Err(e) if drained(&e) && moves < MAX_MOVES => {
                    moves += 1;
                    if issuer.take().is_none() {
                        // a home node that drained is leaving: back to the pinned address,
                        // which sends this caller to its next home
                        if self.current() == from {
                            self.set_target(self.addr);
                        }
                        self.conn.lock().await.take();
                    }
                    continue;
                }
                other => other?,
            };
            if let AnswerFrame::Final(last) = &frame
                && let RawFinal::Refusal(r) = last.as_ref()
                && r.message().code == message::RefusalCode::Moved
                && let Some(home) = &r.message().home
            {
                let back = home
                    .addr
                    .parse::<SocketAddr>()
                    .is_ok_and(|a| movers.contains(&a));
                let go = if back {
                    bounces < MAX_BOUNCES
                } else {
                    moves < MAX_MOVES
                };
                if go {
                    if back {
                        tokio::time::sleep(BOUNCE_WAIT * 2u32.pow(bounces)).await;
                        bounces += 1;
                    } else {
                        moves += 1;
                    }
                    movers.push(from);
                    let sent_on = if kind == FrameType::Execute {
                        match home.addr.parse::<SocketAddr>() {
                            // where the client's calls go already: its connection serves
                            Ok(addr) => {
                                issuer = (addr != self.current()).then_some(addr);
                                true
                            }
                            Err(_) => {
                                tracing::warn!(home = %home.addr, "a moved refusal names no usable address");
                                false
                            }
                        }
                    } else {
                        // another call of this client may have followed it there already
                        self.follow(home).await || home.addr.parse() == Ok(self.current())
                    };
                    if sent_on {
                        continue;
                    }
                }
            }
            return Ok((recv, dec, Some(frame)));
        }
    }

    /// Opens a stream and sends a first frame of `kind`, the body and FIN; returns the stream's
    /// receiving side and the gateway address it went to. The stream goes on the client's
    /// connection to its current target, or, with `to`, on a new connection to that node
    /// alone (it stays open while the returned stream is read).
    async fn open_stream(
        &self,
        to: Option<SocketAddr>,
        kind: FrameType,
        first: &[u8],
        body: &[u8],
    ) -> Result<(quinn::RecvStream, SocketAddr), CallError> {
        let (remote, (mut send, recv)) = match to {
            Some(addr) => {
                let conn = self.connect_to(addr).await?;
                let streams = conn
                    .open_bi()
                    .await
                    .map_err(|e| CallError::ConnectionLost(Lost::Stream(e)))?;
                (conn.remote_address(), streams)
            }
            None => {
                let conn = self.connection().await?;
                match conn.open_bi().await {
                    Ok(streams) => (conn.remote_address(), streams),
                    Err(_) => {
                        // The connection closed before this stream opened (the gateway
                        // restarted, or an idle timeout): nothing was sent on it, so connect
                        // again, once.
                        self.forget(&conn).await;
                        let conn = self.connection().await?;
                        let streams = conn
                            .open_bi()
                            .await
                            .map_err(|e| CallError::ConnectionLost(Lost::Stream(e)))?;
                        (conn.remote_address(), streams)
                    }
                }
            }
        };
        let mut out = BytesMut::with_capacity(first.len() + body.len() + 64);
        frame::encode(kind, first, &mut out)
            .map_err(|e| CallError::InvalidAnswer(InvalidAnswer::Encode(e)))?;
        frame::encode_chunks(body, &mut out);
        // A refused call may close our send side early; the answer still arrives.
        let _ = send.write_all(&out).await;
        let _ = send.finish();
        Ok((recv, remote))
    }

    /// Reads the next frame of an answer; a terminal frame is verified against the pinned
    /// gateway.
    async fn read_answer_frame(
        &self,
        recv: &mut quinn::RecvStream,
        dec: &mut FrameDecoder,
    ) -> Result<AnswerFrame, CallError> {
        let decode = |e| CallError::InvalidAnswer(InvalidAnswer::Decode(e));
        let open = |e| CallError::InvalidAnswer(InvalidAnswer::Open(e));
        let frame = wire::next_frame(recv, dec)
            .await
            .map_err(|e| CallError::ConnectionLost(Lost::Read(e)))?;
        let Some(frame) = frame else {
            return Err(CallError::ConnectionLost(Lost::NoReceipt));
        };
        Ok(match frame.kind {
            FrameType::Head => AnswerFrame::Head(
                ResponseHead::decode_v(&frame.payload, self.version).map_err(decode)?,
            ),
            FrameType::Body => AnswerFrame::Body(frame.payload),
            FrameType::Receipt => AnswerFrame::Final(Box::new(RawFinal::Receipt(
                self.open_answer(&frame.payload).map_err(open)?,
            ))),
            FrameType::Refusal => AnswerFrame::Final(Box::new(RawFinal::Refusal(
                self.open_answer(&frame.payload).map_err(open)?,
            ))),
            FrameType::Grant => AnswerFrame::Final(Box::new(RawFinal::Grant(
                self.open_answer(&frame.payload).map_err(open)?,
            ))),
            other => {
                return Err(CallError::InvalidAnswer(InvalidAnswer::Frame(other)));
            }
        })
    }

    /// Opens a signed answer: signed by the pinned gateway or a node it certified (valid at
    /// the answer's time, not revoked in the newest list seen), in the version this client
    /// speaks.
    fn open_answer<T: didgate_protocol::node::GatewaySigned>(
        &self,
        bytes: &[u8],
    ) -> Result<message::Signed<T>, message::OpenError> {
        let signed = message::open_full::<T>(bytes, Some(&self.gateway), |_, _| None)?;
        let m = signed.message();
        if let Err(e) =
            self.trust
                .check_signer(signed.envelope().signer(), m.node_cert(), m.signed_at_ms())
        {
            return Err(message::OpenError::Signer {
                got: Box::new(signed.envelope().signer().clone()),
                expected: Box::new(self.gateway.clone()),
            })
            .inspect_err(|_| tracing::warn!(error = %e, "an answer's signer is refused"));
        }
        if signed.message().version() != self.version.as_u64() {
            return Err(message::OpenError::Decode(
                didgate_protocol::cbor::DecodeError::Version(signed.message().version()),
            ));
        }
        Ok(signed)
    }

    /// One stream carrying a first frame of `kind` and the body; returns the answer, only its
    /// final frame's signature checked ([`low_level::RawExchange`]).
    pub(crate) async fn exchange_raw(
        &self,
        kind: FrameType,
        first: &[u8],
        body: &[u8],
    ) -> Result<RawAnswer, CallError> {
        let (mut recv, mut dec, mut next) = self.open_routed(kind, first, body).await?;
        let mut head = None;
        let mut resp = Vec::new();
        loop {
            let frame = match next.take() {
                Some(f) => f,
                None => self.read_answer_frame(&mut recv, &mut dec).await?,
            };
            match frame {
                AnswerFrame::Head(h) => head = Some(h),
                AnswerFrame::Body(b) => resp.extend_from_slice(&b),
                AnswerFrame::Final(last) => {
                    return Ok(RawAnswer {
                        head,
                        body: resp,
                        last: *last,
                    });
                }
            }
        }
    }
}

/// One frame of an answer, terminal frames verified.
enum AnswerFrame {
    Head(ResponseHead),
    Body(bytes::Bytes),
    Final(Box<RawFinal>),
}

/// How a call's answer ended, as the result entry records it.
enum Ending {
    /// No valid terminal frame (connection lost, invalid frame).
    Lost(CallError),
    /// A terminal frame after the head (if any) and a body of `len` bytes with digest `b3`.
    Final {
        head: Option<ResponseHead>,
        len: u64,
        b3: [u8; 32],
        last: Box<RawFinal>,
    },
}

/// Whether `e` is a stream cut by a gateway that closed its connection once drained
/// ([`didgate_protocol::DRAINED_CLOSE`]): its request was not claimed.
fn drained(e: &CallError) -> bool {
    matches!(
        e,
        CallError::ConnectionLost(Lost::Read(wire::WireError::Read(
            quinn::ReadError::ConnectionLost(quinn::ConnectionError::ApplicationClosed(close))
        ))) if close.error_code == didgate_protocol::DRAINED_CLOSE.into()
    )
}

fn lost_without_cause() -> CallError {
    CallError::ConnectionLost(Lost::Unknown)
}

/// A call whose response body arrives as the gateway relays it ([`Client::call_streaming`]).
///
/// Read it with [`StreamingAnswer::next_chunk`] until it returns `Ok(None)`: by then the
/// gateway's receipt has been verified against the body's length and digest (computed on the
/// fly) and recorded in the local chain. A refusal after the head (the upstream failed, the
/// response was too large) is returned as the error of `next_chunk`, recorded likewise.
/// Dropping it unfinished stops the stream and records the outcome as `unknown` (the call
/// executed, or is executing, at the gateway).
pub struct StreamingAnswer<'a> {
    client: &'a Client,
    call: [u8; 32],
    head: ResponseHead,
    recv: quinn::RecvStream,
    dec: FrameDecoder,
    hasher: blake3::Hasher,
    len: u64,
    receipt: Option<message::Signed<Receipt>>,
    done: bool,
    /// The call's span ([`Client::call_span`]).
    span: tracing::Span,
}

impl std::fmt::Debug for StreamingAnswer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamingAnswer")
            .field("call", &hex::encode(self.call))
            .field("status", &self.head.status)
            .field("len", &self.len)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl StreamingAnswer<'_> {
    /// The call ID.
    pub fn call(&self) -> [u8; 32] {
        self.call
    }

    /// Upstream HTTP status (from the unsigned head; the receipt confirms it at the end).
    pub fn status(&self) -> u16 {
        self.head.status
    }

    /// Response headers.
    pub fn headers(&self) -> &[(String, String)] {
        &self.head.headers
    }

    /// Body bytes received so far.
    pub fn received(&self) -> u64 {
        self.len
    }

    /// The next body chunk as it arrives; `Ok(None)` once the body ended and the receipt was
    /// verified and recorded. After an error or the end, returns `Ok(None)`.
    pub async fn next_chunk(&mut self) -> Result<Option<bytes::Bytes>, CallError> {
        if self.done {
            return Ok(None);
        }
        let span = self.span.clone();
        tracing::Instrument::instrument(self.read_chunk(), span).await
    }

    async fn read_chunk(&mut self) -> Result<Option<bytes::Bytes>, CallError> {
        let frame = self
            .client
            .read_answer_frame(&mut self.recv, &mut self.dec)
            .await;
        let ending = match frame {
            Ok(AnswerFrame::Body(b)) => {
                self.hasher.update(&b);
                self.len += b.len() as u64;
                return Ok(Some(b));
            }
            Ok(AnswerFrame::Head(_)) => Ending::Lost(CallError::InvalidAnswer(
                InvalidAnswer::Mismatch("a second response head"),
            )),
            Ok(AnswerFrame::Final(last)) => Ending::Final {
                head: Some(self.head.clone()),
                len: self.len,
                b3: *self.hasher.finalize().as_bytes(),
                last,
            },
            Err(e) => Ending::Lost(e),
        };
        self.done = true;
        if matches!(ending, Ending::Lost(_)) {
            self.recv.stop(0u32.into()).ok();
        }
        let (_, r) = self.client.record_result(self.call, ending).await?;
        self.receipt = Some(r);
        Ok(None)
    }

    /// The verified receipt, once [`StreamingAnswer::next_chunk`] returned `Ok(None)`.
    pub fn receipt(&self) -> Option<&Receipt> {
        self.receipt.as_ref().map(|r| r.message())
    }

    /// The receipt as signed, once verified.
    pub fn receipt_bytes(&self) -> Option<&[u8]> {
        self.receipt.as_ref().map(|r| r.bytes())
    }

    /// Reads (and discards) the rest of the body, then returns the verified receipt.
    pub async fn finish(mut self) -> Result<Receipt, CallError> {
        while self.next_chunk().await?.is_some() {}
        self.receipt
            .take()
            .map(message::Signed::into_message)
            .ok_or(CallError::InvalidAnswer(InvalidAnswer::Mismatch(
                "no receipt",
            )))
    }
}

impl Drop for StreamingAnswer<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // Abandoned mid-body: stop reading (the gateway records the call as failed, client gone)
        // and record the outcome as unknown, as for a lost connection.
        self.recv.stop(0u32.into()).ok();
        let mut result = Entry::new(EntryKind::Result, now_ms());
        result.call = Some(self.call);
        result.outcome = Some(Outcome::Unknown);
        result.detail = Some(format!(
            "streamed answer dropped by the caller after {} body bytes",
            self.len
        ));
        let chain = self.client.chain.clone();
        let append = self.client.closing(result);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = chain.append(append).await {
                    tracing::warn!(%e, "cannot record an abandoned streamed call");
                }
            });
        }
    }
}

/// A signed, single-use grant the gateway issued for one call (two-step flow).
#[derive(Debug, Clone)]
pub struct IssuedGrant {
    /// The call ID it answers.
    pub call: [u8; 32],
    /// The grant: id, subject, exact scope, expiry.
    pub grant: GrantBody,
    /// The grant as signed by the gateway.
    pub bytes: Vec<u8>,
    /// The body the request was signed over.
    pub body: Vec<u8>,
}

/// Whether `req` is the request [`Client::sign`] builds for `spec` to `gateway` in `version`
/// (its nonce, time and client head aside): what a caller checks of a request the process
/// holding its home's chain signed for it ([`local`]).
pub(crate) fn request_matches(
    req: &Request,
    spec: &CallSpec,
    gateway: &Did,
    version: Version,
) -> bool {
    let (path, query) = split_query(&spec.path, &spec.query);
    let headers_match = req.headers.len() == spec.headers.len()
        && req
            .headers
            .iter()
            .zip(&spec.headers)
            .all(|((k, v), (k2, v2))| *k == k2.to_ascii_lowercase() && v == v2);
    req.v == version.as_u64()
        && req.aud == gateway.as_str()
        && req.upstream == spec.upstream
        && req.method == spec.method.to_ascii_uppercase()
        && req.path == path
        && req.query == query
        && headers_match
        && req.body_len == spec.body.len() as u64
        && req.body_b3 == *blake3::hash(&spec.body).as_bytes()
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
    len: u64,
    b3: &[u8; 32],
    r: &Receipt,
) -> Result<(), &'static str> {
    if r.call != call {
        return Err("receipt is for another call");
    }
    if r.resp_b3 != *b3 || r.resp_len != len {
        return Err("response body does not match the receipt's digest");
    }
    if head.is_some_and(|h| h.status != r.status) {
        return Err("status does not match the receipt");
    }
    Ok(())
}

/// What a handshake's server presented, as the TLS verifier judged it.
#[derive(Debug, Clone)]
enum Seen {
    /// The pinned key, or a node certified by it.
    Accepted,
    /// Refused: another key with no node certificate (`None`), or a node certificate that does
    /// not hold.
    Refused(Did, Option<didgate_protocol::node::NodeCertError>),
}

/// The client's QUIC configuration: accepting what `trust` accepts, speaking `version`,
/// recording in `presented` what each handshake's gateway presents.
fn pinned_config(
    identity: &Identity,
    trust: &Arc<didgate_io::node::GatewayTrust>,
    version: Version,
    presented: &Arc<std::sync::Mutex<Option<Seen>>>,
) -> Result<quinn::ClientConfig, ClientError> {
    let verifier = Arc::new(RecordingPin {
        trust: trust.clone(),
        presented: presented.clone(),
    });
    tls::client_config_with_verifier(identity, version, verifier).map_err(ClientError::Tls)
}

/// Accepts the gateway only if its certificate key is the pinned DID or a node it certified
/// (as [`tls::client_config`]'s verifier does), and records what was presented, so that a
/// refusal is reported as [`CallError::WrongGateway`] naming both DIDs, or as
/// [`Unreachable::NodeCertificate`] saying why the node's certificate does not hold.
#[derive(Debug)]
struct RecordingPin {
    trust: Arc<didgate_io::node::GatewayTrust>,
    presented: Arc<std::sync::Mutex<Option<Seen>>>,
}

impl rustls::client::danger::ServerCertVerifier for RecordingPin {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use didgate_io::node::LeafError;
        // milliseconds, as certificates and revocations state times (rustls's `now` has
        // whole seconds)
        let judged = self.trust.check_leaf(end_entity.as_ref(), now_ms());
        let seen = match &judged {
            Ok(_) => Some(Seen::Accepted),
            Err(LeafError::NotPinned { presented }) => Some(Seen::Refused(presented.clone(), None)),
            Err(LeafError::Node { presented, source }) => {
                Some(Seen::Refused(presented.clone(), Some(source.clone())))
            }
            Err(_) => None,
        };
        *self
            .presented
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = seen;
        judged.map_err(tls::leaf_refused)?;
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        tls::verify_tls13_ed25519(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        vec![rustls::SignatureScheme::ED25519]
    }
}

//! The gateway's state and its per-call pipeline (specs/protocol.md, "Call processing").
//!
//! [`Gateway::open`] loads a data directory: identity, configuration, KMS, store and chain; it
//! closes executing entries a crash left open as "abandoned" and prunes expired replay keys.
//! [`serve`] accepts QUIC connections and runs one call per bidirectional stream: decisions
//! are made by plain functions over values ([`Gateway::admit`]); tokio tasks only move bytes.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use didgate_audit::entry::{Entry, EntryKind, Role};
use didgate_audit::store::{Append, AppendError, Chain, CheckpointPolicy, Claim, ClaimRule, Store};
use didgate_client::{tls, wire};
use didgate_protocol::canonical;
use didgate_protocol::frame::{self, FrameDecoder, FrameType};
use didgate_protocol::message::{
    self, EntryRef, GrantBody, Message, Receipt, Refusal, RefusalCode, Request, ResponseHead,
    Signed, SignedMessage,
};
use didgate_protocol::{Did, Identity};
use tokio::sync::watch;

use crate::config::{Config, Upstream};
use crate::kms::{Kms, LocalKms, SecretRecord};
use crate::policy::{Decision, Policy};
use crate::{now_ms, upstream};

/// Keyspace of replay keys (`c` || call ID, `n` || DID key || nonce) -> expiry (u64be ms).
pub const REPLAY: &str = "replay";
/// Keyspace of consumed grants: grant id -> call ID.
pub const GRANTS: &str = "grants";
/// Keyspace of client heads seen: signer key (32) || chain id || seq (u64be) -> hash.
pub const HEADS: &str = "heads";
/// Keyspace of secrets: name -> [`SecretRecord`].
pub const SECRETS: &str = "secrets";
/// Every keyspace of the gateway's store besides the chain's own.
pub const SPACES: &[&str] = &[REPLAY, GRANTS, HEADS, SECRETS];

/// Files of a gateway data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// The data directory at `root`.
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }
    /// `gateway.toml`.
    pub fn config(&self) -> PathBuf {
        self.root.join("gateway.toml")
    }
    /// The gateway identity (mode 0600).
    pub fn identity(&self) -> PathBuf {
        self.root.join("identity")
    }
    /// The local KMS master key (mode 0600).
    pub fn master_key(&self) -> PathBuf {
        self.root.join("master.key")
    }
    /// The store.
    pub fn store(&self) -> PathBuf {
        self.root.join("store")
    }
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Identity file.
    #[error(transparent)]
    Identity(#[from] didgate_client::identity::IdentityError),
    /// KMS.
    #[error(transparent)]
    Kms(#[from] crate::kms::KmsError),
    /// Store.
    #[error(transparent)]
    Store(#[from] didgate_audit::StoreError),
    /// Audit append at start-up.
    #[error("audit: {0}")]
    Audit(#[from] AppendError),
    /// TLS or socket.
    #[error("transport: {0}")]
    Transport(String),
}

/// Counts refusals to principals policy does not know, written as one entry per window.
#[derive(Debug, Default)]
struct Aggregate {
    counts: HashMap<RefusalCode, u64>,
    since_ms: u64,
}

/// A running gateway's state.
pub struct Gateway {
    identity: Arc<Identity>,
    config: Config,
    policy: Policy,
    chain: Chain,
    kms: Box<dyn Kms>,
    http: reqwest::Client,
    aggregate: Mutex<Aggregate>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("did", self.identity.did())
            .finish_non_exhaustive()
    }
}

/// A refusal decided before any grant was consumed.
#[derive(Debug)]
struct Refuse {
    code: RefusalCode,
    reason: String,
}

fn refuse(code: RefusalCode, reason: impl Into<String>) -> Refuse {
    Refuse {
        code,
        reason: reason.into(),
    }
}

impl Gateway {
    /// Opens the gateway in `dir`.
    pub async fn open(dir: &Path) -> Result<Self, StartError> {
        tls::install_provider();
        let d = DataDir::new(dir);
        let config = Config::load(&d.config())?;
        let identity = Arc::new(didgate_client::identity::load(&d.identity())?);
        let kms = LocalKms::load(&d.master_key())?;
        let store = Store::open(&d.store(), SPACES)?;
        let policy = CheckpointPolicy {
            every_entries: config.gateway.checkpoint_every_entries.max(1),
            every: Duration::from_secs(config.gateway.checkpoint_every_secs.max(1)),
        };
        let chain = Chain::open(store, identity.clone(), Role::Gateway, now_ms(), policy)?;
        let http = upstream::http_client(Duration::from_secs(config.gateway.upstream_timeout_secs))
            .map_err(|e| StartError::Transport(e.to_string()))?;
        let policy = Policy::new(&config.rules, &config.groups);
        let gw = Self {
            identity,
            config,
            policy,
            chain,
            kms: Box::new(kms),
            http,
            aggregate: Mutex::new(Aggregate::default()),
        };
        gw.recover().await?;
        Ok(gw)
    }

    /// The gateway's DID.
    pub fn did(&self) -> &Did {
        self.identity.did()
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The gateway's chain.
    pub fn chain(&self) -> &Chain {
        &self.chain
    }

    /// Closes executing entries left open by a crash, and prunes expired replay keys.
    async fn recover(&self) -> Result<(), StartError> {
        let mut open: HashMap<[u8; 32], u64> = HashMap::new();
        for item in self.chain.store().entries() {
            let (_, bytes) = item?;
            let Ok(e) = Entry::decode(&bytes) else {
                continue;
            };
            match (e.kind, e.call) {
                (EntryKind::Executing, Some(c)) => {
                    open.insert(c, e.seq);
                }
                (EntryKind::Executed | EntryKind::Failed | EntryKind::Abandoned, Some(c)) => {
                    open.remove(&c);
                }
                _ => {}
            }
        }
        let mut open: Vec<_> = open.into_iter().collect();
        open.sort_by_key(|(_, seq)| *seq);
        for (call, seq) in open {
            let mut e = Entry::new(EntryKind::Abandoned, now_ms());
            e.call = Some(call);
            e.detail = Some(format!("interrupted at seq {seq} by a gateway stop"));
            self.chain.append_entry(e).await?;
        }
        let now = now_ms();
        let expired: Vec<_> = self
            .chain
            .store()
            .scan(REPLAY, b"")?
            .into_iter()
            .filter(|(_, v)| {
                v.get(..8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes)
                    .is_some_and(|t| t < now)
            })
            .map(|(k, _)| (REPLAY, k))
            .collect();
        if !expired.is_empty() {
            self.chain.store().write(&[], &expired)?;
        }
        Ok(())
    }

    /// The checks before any state changes: audience, clock, canonical form, upstream, policy.
    /// Pure over its inputs.
    fn admit(&self, peer: &Did, req: &Signed<Request>, now: u64) -> Result<&Upstream, Refuse> {
        let signer = req.envelope.signer();
        let r = &req.message;
        if signer != peer {
            return Err(refuse(
                RefusalCode::PeerMismatch,
                "the request is signed by another DID than the TLS peer",
            ));
        }
        if r.aud != self.did().as_str() {
            return Err(refuse(
                RefusalCode::WrongAudience,
                "the request is addressed to another gateway",
            ));
        }
        let skew = self.config.gateway.skew_secs * 1000;
        if r.time_ms.abs_diff(now) > skew {
            return Err(refuse(
                RefusalCode::ClockSkew,
                format!(
                    "request time is outside the {}s window",
                    self.config.gateway.skew_secs
                ),
            ));
        }
        let up = self.config.upstream(&r.upstream).ok_or_else(|| {
            refuse(
                RefusalCode::UnknownUpstream,
                format!("no upstream named {:?}", r.upstream),
            )
        })?;
        let (cred_header, cred_query) = match &up.auth {
            crate::config::Auth::Header { name } => (Some(name.as_str()), None),
            crate::config::Auth::Query { name } => (None, Some(name.as_str())),
            _ => (None, None),
        };
        let not_canonical =
            |e: canonical::CanonicalError| refuse(RefusalCode::NotCanonical, e.to_string());
        canonical::check_method(&r.method).map_err(not_canonical)?;
        canonical::check_path(&r.path).map_err(not_canonical)?;
        canonical::check_query(&r.query, cred_query).map_err(not_canonical)?;
        canonical::check_headers(&r.headers, &up.allow_headers, cred_header)
            .map_err(not_canonical)?;
        if r.body_len > self.config.gateway.max_body {
            return Err(refuse(
                RefusalCode::BodyMismatch,
                "request body exceeds the limit",
            ));
        }
        if self.policy.decide(signer, &r.upstream, &r.method, &r.path) == Decision::Deny {
            return Err(refuse(
                RefusalCode::Policy,
                "no policy rule allows this DID this method and path",
            ));
        }
        Ok(up)
    }

    fn sign_refusal(
        &self,
        call: Option<[u8; 32]>,
        code: RefusalCode,
        reason: &str,
        entry: Option<EntryRef>,
    ) -> Vec<u8> {
        Refusal {
            v: message::VERSION,
            call,
            code,
            reason: reason.into(),
            time_ms: now_ms(),
            entry,
        }
        .sign(&self.identity)
    }

    /// Audits a refusal: one entry for a principal policy knows, else counted into the
    /// window's aggregate. Returns the entry when one was written.
    async fn audit_refusal(
        &self,
        req: Option<&Signed<Request>>,
        code: RefusalCode,
        reason: &str,
    ) -> Result<Option<EntryRef>, AppendError> {
        match req {
            Some(r) if self.policy.knows(r.envelope.signer()) => {
                let mut e = Entry::new(EntryKind::Refused, now_ms());
                e.call = Some(r.envelope.digest());
                e.signed = Some(r.bytes.clone());
                e.subject = Some(r.envelope.signer().to_string());
                e.peer_head = Some(r.message.head);
                e.code = Some(code.as_str().into());
                e.detail = Some(reason.into());
                Ok(Some(self.chain.append_entry(e).await?.entry))
            }
            _ => {
                let due = {
                    let mut agg = self.aggregate.lock().unwrap_or_else(|p| p.into_inner());
                    if agg.counts.is_empty() {
                        agg.since_ms = now_ms();
                    }
                    *agg.counts.entry(code).or_default() += 1;
                    now_ms().saturating_sub(agg.since_ms)
                        >= self.config.gateway.refusal_window_secs * 1000
                };
                if due {
                    self.flush_refusals().await?;
                }
                Ok(None)
            }
        }
    }

    /// Writes the aggregate refusal entry for the current window, if it counted any.
    pub async fn flush_refusals(&self) -> Result<(), AppendError> {
        let taken = {
            let mut agg = self.aggregate.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::take(&mut *agg)
        };
        if taken.counts.is_empty() {
            return Ok(());
        }
        let mut codes: Vec<_> = taken.counts.iter().collect();
        codes.sort_by_key(|(c, _)| c.as_str());
        let mut e = Entry::new(EntryKind::Refusals, now_ms());
        e.count = Some(taken.counts.values().sum());
        e.code = Some(
            codes
                .iter()
                .map(|(c, n)| format!("{c}={n}"))
                .collect::<Vec<_>>()
                .join(","),
        );
        e.detail = Some(format!(
            "refusals to principals policy does not know since {}",
            taken.since_ms
        ));
        let result = self.chain.append_entry(e).await.map(|_| ());
        if result.is_err() {
            // keep the counts for the next attempt: nothing counted is lost
            let mut agg = self.aggregate.lock().unwrap_or_else(|p| p.into_inner());
            if agg.counts.is_empty() || agg.since_ms > taken.since_ms {
                agg.since_ms = taken.since_ms;
            }
            for (c, n) in taken.counts {
                *agg.counts.entry(c).or_default() += n;
            }
        }
        result
    }

    /// Handles one stream: one call.
    async fn handle(&self, peer: Did, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
        let mut dec = FrameDecoder::new();
        let deadline = Duration::from_secs(10);
        // 1. The signed request frame.
        let first = tokio::time::timeout(deadline, wire::next_frame(&mut recv, &mut dec)).await;
        let bytes = match first {
            Ok(Ok(Some(f))) if f.kind == FrameType::Request => f.payload,
            _ => {
                let _ = self
                    .audit_refusal(None, RefusalCode::Malformed, "no request frame")
                    .await;
                return self
                    .answer_refusal(
                        &mut send,
                        None,
                        RefusalCode::Malformed,
                        "expected a request frame",
                        None,
                    )
                    .await;
            }
        };
        let req = match message::open::<Request>(&bytes) {
            Ok(r) => r,
            Err(e) => {
                let code = match e {
                    message::OpenError::Envelope(
                        didgate_protocol::envelope::EnvelopeError::Signature,
                    ) => RefusalCode::BadSignature,
                    _ => RefusalCode::Malformed,
                };
                let _ = self.audit_refusal(None, code, "bad request envelope").await;
                return self
                    .answer_refusal(&mut send, None, code, &e.to_string(), None)
                    .await;
            }
        };
        let call = req.envelope.digest();
        // 2. Checks that change no state.
        let up = match self.admit(&peer, &req, now_ms()) {
            Ok(up) => up.clone(),
            Err(r) => return self.refuse_audited(&mut send, &req, r).await,
        };
        // 3. The body, whole and capped, then its digest.
        let body = match tokio::time::timeout(
            deadline,
            read_body(&mut recv, &mut dec, req.message.body_len),
        )
        .await
        {
            Ok(Some(b)) if *blake3::hash(&b).as_bytes() == req.message.body_b3 => b,
            _ => {
                return self
                    .refuse_audited(
                        &mut send,
                        &req,
                        refuse(
                            RefusalCode::BodyMismatch,
                            "body does not match its signed length and digest",
                        ),
                    )
                    .await;
            }
        };
        // 4. One atomic batch: replay keys, consumed grant, client head, executing entry.
        let now = now_ms();
        let grant = GrantBody {
            v: message::VERSION,
            id: rand::random(),
            call,
            subject: peer.to_string(),
            upstream: req.message.upstream.clone(),
            method: req.message.method.clone(),
            path: req.message.path.clone(),
            expires_ms: now + self.config.gateway.grant_ttl_secs * 1000,
        };
        let expiry = (req.message.time_ms + self.config.gateway.skew_secs * 1000)
            .to_be_bytes()
            .to_vec();
        let head = req.message.head;
        let mut nonce_key = b"n".to_vec();
        nonce_key.extend_from_slice(peer.public_key_bytes());
        nonce_key.extend_from_slice(&req.message.nonce);
        let mut head_key = peer.public_key_bytes().to_vec();
        head_key.extend_from_slice(&head.chain);
        head_key.extend_from_slice(&head.seq.to_be_bytes());
        let claims = vec![
            Claim {
                space: REPLAY,
                key: [b"c".as_slice(), &call].concat(),
                value: expiry.clone(),
                rule: ClaimRule::Absent,
            },
            Claim {
                space: REPLAY,
                key: nonce_key,
                value: expiry,
                rule: ClaimRule::Absent,
            },
            Claim {
                space: GRANTS,
                key: grant.id.to_vec(),
                value: call.to_vec(),
                rule: ClaimRule::Absent,
            },
            Claim {
                space: HEADS,
                key: head_key,
                value: head.hash.to_vec(),
                rule: ClaimRule::AbsentOrEqual,
            },
        ];
        let mut entry = Entry::new(EntryKind::Executing, now);
        entry.call = Some(call);
        entry.signed = Some(req.bytes.clone());
        entry.subject = Some(peer.to_string());
        entry.grant = Some(grant.id);
        entry.peer_head = Some(head);
        match self.chain.append(Append { entry, claims }).await {
            Ok(_) => {}
            Err(AppendError::Conflict { index: 3 }) => {
                return self
                    .refuse_audited(
                        &mut send,
                        &req,
                        refuse(
                            RefusalCode::ChainFork,
                            "client chain head contradicts one already seen",
                        ),
                    )
                    .await;
            }
            Err(AppendError::Conflict { .. }) => {
                return self
                    .refuse_audited(
                        &mut send,
                        &req,
                        refuse(
                            RefusalCode::Replay,
                            "this request (call ID or nonce) was already seen",
                        ),
                    )
                    .await;
            }
            Err(why) => {
                tracing::error!(%why, "audit store unavailable: refusing calls");
                return self
                    .answer_refusal(
                        &mut send,
                        Some(call),
                        RefusalCode::AuditUnavailable,
                        "the audit log cannot be written",
                        None,
                    )
                    .await;
            }
        }
        // 5. The grant is consumed (durably, with its entry): execute it once, and close the
        // entry whatever happens.
        self.execute(&mut send, &req, &up, grant, body).await;
    }

    async fn execute(
        &self,
        send: &mut quinn::SendStream,
        req: &Signed<Request>,
        up: &Upstream,
        grant: GrantBody,
        body: Vec<u8>,
    ) {
        let call = grant.call;
        let secret = match self.secret(&up.secret) {
            Ok(s) => s,
            Err(why) => {
                return self
                    .close_failed(send, call, RefusalCode::SecretUnavailable, &why)
                    .await;
            }
        };
        let idem = hex::encode(grant.id);
        let resp = match upstream::send(&self.http, up, &req.message, body, secret, &idem).await {
            Ok(r) => r,
            Err(e) => {
                return self
                    .close_failed(send, call, RefusalCode::UpstreamFailed, &e.to_string())
                    .await;
            }
        };
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .filter(|(k, _)| {
                !canonical::FORBIDDEN_HEADERS.contains(&k.as_str()) && k.as_str() != "set-cookie"
            })
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let head = ResponseHead {
            v: message::VERSION,
            status,
            headers,
        };
        let mut hasher = blake3::Hasher::new();
        let mut len = 0u64;
        let mut stream = resp;
        let mut cause = None;
        if wire::write_frame(send, FrameType::Head, &head.encode())
            .await
            .is_err()
        {
            cause = Some("client gone before the response head".to_string());
        }
        while cause.is_none() {
            match stream.chunk().await {
                Ok(Some(chunk)) => {
                    hasher.update(&chunk);
                    len += chunk.len() as u64;
                    let mut out = BytesMut::new();
                    frame::encode_chunks(&chunk, &mut out);
                    if send.write_all(&out).await.is_err() {
                        cause = Some("client gone mid-stream".into());
                    }
                }
                Ok(None) => break,
                Err(e) => cause = Some(format!("upstream body: {}", e.without_url())),
            }
        }
        if let Some(cause) = cause {
            return self
                .close_failed(send, call, RefusalCode::UpstreamFailed, &cause)
                .await;
        }
        let resp_b3 = *hasher.finalize().as_bytes();
        let mut e = Entry::new(EntryKind::Executed, now_ms());
        e.call = Some(call);
        e.status = Some(status);
        e.resp_len = Some(len);
        e.resp_b3 = Some(resp_b3);
        let closing = match self.chain.append_entry(e).await {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(%e, "cannot close an executing entry");
                return self
                    .answer_refusal(
                        send,
                        Some(call),
                        RefusalCode::AuditUnavailable,
                        "the audit log cannot be written",
                        None,
                    )
                    .await;
            }
        };
        let receipt = Receipt {
            v: message::VERSION,
            call,
            grant: grant.id,
            client: req.envelope.signer().to_string(),
            status,
            resp_len: len,
            resp_b3,
            entry: closing.entry,
            root: Some(closing.root),
            time_ms: now_ms(),
        };
        let _ = wire::write_frame(send, FrameType::Receipt, &receipt.sign(&self.identity)).await;
        let _ = send.finish();
        let _ = send.stopped().await;
    }

    fn secret(&self, name: &str) -> Result<zeroize::Zeroizing<String>, String> {
        let bytes = self
            .chain
            .store()
            .get(SECRETS, name.as_bytes())
            .map_err(|e| e.to_string())?;
        let record =
            SecretRecord::decode(&bytes.ok_or_else(|| format!("secret {name} is not stored"))?)
                .map_err(|e| e.to_string())?;
        if !record.enabled {
            return Err(format!("secret {name} is disabled"));
        }
        record.open(self.kms.as_ref()).map_err(|e| e.to_string())
    }

    async fn close_failed(
        &self,
        send: &mut quinn::SendStream,
        call: [u8; 32],
        code: RefusalCode,
        cause: &str,
    ) {
        let mut e = Entry::new(EntryKind::Failed, now_ms());
        e.call = Some(call);
        e.code = Some(code.as_str().into());
        e.detail = Some(cause.into());
        match self.chain.append_entry(e).await {
            Ok(a) => {
                self.answer_refusal(send, Some(call), code, cause, Some(a.entry))
                    .await
            }
            Err(why) => {
                tracing::error!(%why, "cannot close an executing entry");
                self.answer_refusal(
                    send,
                    Some(call),
                    RefusalCode::AuditUnavailable,
                    "the audit log cannot be written",
                    None,
                )
                .await
            }
        }
    }

    async fn refuse_audited(&self, send: &mut quinn::SendStream, req: &Signed<Request>, r: Refuse) {
        let call = Some(req.envelope.digest());
        match self.audit_refusal(Some(req), r.code, &r.reason).await {
            Ok(entry) => {
                self.answer_refusal(send, call, r.code, &r.reason, entry)
                    .await
            }
            Err(_) => {
                self.answer_refusal(
                    send,
                    call,
                    RefusalCode::AuditUnavailable,
                    "the audit log cannot be written",
                    None,
                )
                .await
            }
        }
    }

    async fn answer_refusal(
        &self,
        send: &mut quinn::SendStream,
        call: Option<[u8; 32]>,
        code: RefusalCode,
        reason: &str,
        entry: Option<EntryRef>,
    ) {
        let bytes = self.sign_refusal(call, code, reason, entry);
        let _ = wire::write_frame(send, FrameType::Refusal, &bytes).await;
        let _ = send.finish();
        let _ = send.stopped().await;
    }
}

async fn read_body(
    recv: &mut quinn::RecvStream,
    dec: &mut FrameDecoder,
    expected: u64,
) -> Option<Vec<u8>> {
    let mut body = Vec::with_capacity(expected.min(1 << 20) as usize);
    loop {
        match wire::next_frame(recv, dec).await {
            Ok(Some(f)) if f.kind == FrameType::Body => {
                if body.len() as u64 + f.payload.len() as u64 > expected {
                    return None;
                }
                body.extend_from_slice(&f.payload);
            }
            Ok(None) if body.len() as u64 == expected => return Some(body),
            _ => return None,
        }
    }
}

/// Binds the gateway's QUIC endpoint on `addr`.
pub fn endpoint(gw: &Gateway, addr: SocketAddr) -> Result<quinn::Endpoint, StartError> {
    let cfg = tls::server_config(&gw.identity).map_err(|e| StartError::Transport(e.to_string()))?;
    quinn::Endpoint::server(cfg, addr).map_err(|e| StartError::Transport(e.to_string()))
}

/// Serves calls on `endpoint` until `shutdown` resolves, then drains the calls in flight,
/// writes the pending aggregate refusals, and stops the chain writer.
pub async fn serve(
    gw: Arc<Gateway>,
    endpoint: quinn::Endpoint,
    shutdown: impl Future<Output = ()>,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let tasks = tokio_util_tasks::TaskSet::default();
    let window = Duration::from_secs(gw.config.gateway.refusal_window_secs.max(1));
    let ticker = {
        let gw = gw.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(window);
            loop {
                tokio::select! {
                    _ = tick.tick() => { let _ = gw.flush_refusals().await; }
                    _ = stop.changed() => break,
                }
            }
        })
    };
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let gw = gw.clone();
                let stop = stop_rx.clone();
                tasks.spawn(async move { connection(gw, incoming, stop).await });
            }
            () = &mut shutdown => break,
        }
    }
    let _ = stop_tx.send(true);
    endpoint.set_server_config(None);
    tasks.wait().await;
    let _ = ticker.await;
    let _ = gw.flush_refusals().await;
    endpoint.close(0u32.into(), b"shutdown");
    endpoint.wait_idle().await;
    gw.chain.close();
}

async fn connection(gw: Arc<Gateway>, incoming: quinn::Incoming, mut stop: watch::Receiver<bool>) {
    let Ok(conn) = incoming.await else { return };
    let Some(peer) = tls::peer_did(&conn) else {
        conn.close(1u32.into(), b"no DID certificate");
        return;
    };
    let calls = tokio_util_tasks::TaskSet::default();
    loop {
        tokio::select! {
            stream = conn.accept_bi() => {
                let Ok((send, recv)) = stream else { break };
                let gw = gw.clone();
                let peer = peer.clone();
                calls.spawn(async move { gw.handle(peer, send, recv).await });
            }
            _ = stop.changed() => break,
        }
    }
    calls.wait().await;
    conn.close(0u32.into(), b"bye");
}

/// A minimal set of tasks to wait for at shutdown.
mod tokio_util_tasks {
    use std::future::Future;
    use std::sync::{Arc, Mutex};

    #[derive(Default, Clone)]
    pub(super) struct TaskSet {
        handles: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    }

    impl TaskSet {
        pub(super) fn spawn(&self, f: impl Future<Output = ()> + Send + 'static) {
            let mut h = self.handles.lock().unwrap_or_else(|p| p.into_inner());
            h.retain(|t| !t.is_finished());
            h.push(tokio::spawn(f));
        }

        pub(super) async fn wait(&self) {
            let all = std::mem::take(&mut *self.handles.lock().unwrap_or_else(|p| p.into_inner()));
            for h in all {
                let _ = h.await;
            }
        }
    }
}

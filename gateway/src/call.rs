//! The pure core of the call pipeline (docs/pipeline.md): one call's context ([`Call`]) and
//! every decision the gateway makes about a call before and around its atomic batch, as
//! functions over their inputs and `now`: admission ([`admit`]: peer, revocation, audience,
//! clock, upstream, canonical form, body size, policy), limits ([`limit`]), minting
//! ([`mint`]), the claims and the entry of the batch ([`request_claims`], [`request_entry`]),
//! the checks before the upstream is called ([`still_allowed`]), the closing entry, receipt
//! and refusal ([`executed_entry`], [`receipt`], [`refusal`]), and the mapping of every
//! failure to its refusal code ([`refusal_for_open`], [`request_conflict`]). No socket, no
//! store, no clock: [`crate::gateway`] reads the stream, the store and the time, and calls
//! these.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use didgate_audit::entry::{Entry, EntryKind};
use didgate_audit::store::{Appended, Claim, ClaimRule};
use didgate_protocol::message::{
    self, EntryRef, GrantBody, Home, Receipt, Refusal, RefusalCode, Request, Signed,
};
use didgate_protocol::web::DidDocument;
use didgate_protocol::{Caller, Did, Version, canonical};

use crate::config::RateLimit;
use crate::config::{Auth, Config, Upstream};
use crate::datadir::{DOCUMENTS, HEADS, REPLAY};
use crate::limits::{self, Limits, Permit, Stage, TokenBucket};
use crate::policy::{PolicySet, RequestContext};
use crate::upstreams::UpstreamSet;

/// One call, from its stream's first frame to its terminal frame: what decides it and what
/// it holds. Passed along the pipeline (never kept in a task-local), so each step says what it
/// reads.
pub(crate) struct Call {
    /// The policy set in force when the stream opened: a reload never changes the set that
    /// decides (and is recorded for) a call under way.
    pub(crate) policy: Arc<PolicySet>,
    /// The upstreams in force when the stream opened: a reload never changes the upstream a
    /// call under way reaches.
    pub(crate) upstreams: Arc<UpstreamSet>,
    /// The TLS peer.
    pub(crate) peer: Caller,
    /// The protocol version of the call's connection (its ALPN): the version its request must
    /// carry and every answer is written in.
    pub(crate) version: Version,
    /// When the stream opened (latency).
    pub(crate) started: Instant,
    /// The did:web document that admitted the caller, if it is a did:web.
    pub(crate) document: Option<Arc<DidDocument>>,
    /// The grant lifetime the policy decision allowed (`None`: the configured one).
    pub(crate) ttl_secs: Option<u64>,
    /// The call's concurrency slots ([`limit`]), given back right before its terminal frame
    /// is sent (or when the call ends).
    pub(crate) permit: Option<Permit>,
    /// The path policy judged ([`admit`]): the request's, folded as its upstream says
    /// (`path_case`, `trailing_slash`).
    pub(crate) path: Option<String>,
    /// In a cluster, the end of the caller's handover window on this node, its home: requests
    /// stamped before it are refused `handover` ([`admit`]; didgate_cluster::home).
    pub(crate) fence_ms: Option<u64>,
    /// In a cluster, the etcd revision as of which this node was the caller's home when it
    /// admitted the request: recorded in the call's `executing` or `granted` entry (amendment
    /// 2.12); `None` for a grant being executed (only its issuer can) and outside a cluster.
    pub(crate) home_rev: Option<u64>,
}

impl Call {
    /// A call of `peer` on a connection of `version`, decided by `policy`, to one of
    /// `upstreams`.
    pub(crate) fn new(
        policy: Arc<PolicySet>,
        upstreams: Arc<UpstreamSet>,
        peer: Caller,
        version: Version,
    ) -> Self {
        Self {
            policy,
            upstreams,
            peer,
            version,
            started: Instant::now(),
            fence_ms: None,
            home_rev: None,
            document: None,
            ttl_secs: None,
            permit: None,
            path: None,
        }
    }

    /// The hash of the policy set deciding the call.
    pub(crate) fn policy_hash(&self) -> [u8; 32] {
        self.policy.hash()
    }

    /// The hash of the did:web document that admitted the caller.
    pub(crate) fn did_doc(&self) -> Option<[u8; 32]> {
        self.document.as_ref().map(|d| d.hash())
    }

    /// Gives back the call's concurrency slots.
    pub(crate) fn release_permit(&mut self) {
        self.permit = None;
    }

    /// The grant lifetime: the configured one, capped by the permits that allowed the call.
    pub(crate) fn grant_ttl_secs(&self, configured: u64) -> u64 {
        self.ttl_secs.map_or(configured, |t| t.min(configured))
    }
}

/// What a caller is told when the audit log cannot be written (`audit_unavailable`): the
/// fact, never the store's error (that goes to the operator's log).
pub(crate) const AUDIT_UNAVAILABLE: &str = "the audit log cannot be written";

/// A refusal decided before any grant was consumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refuse {
    pub(crate) code: RefusalCode,
    pub(crate) reason: String,
    /// The caller's home node, with `moved` (amendment 2.11).
    pub(crate) home: Option<Home>,
}

/// A refusal with `code` and `reason`.
pub(crate) fn refuse(code: RefusalCode, reason: impl Into<String>) -> Refuse {
    Refuse {
        code,
        reason: reason.into(),
        home: None,
    }
}

/// The `moved` refusal naming the caller's home node `home`.
pub(crate) fn moved(home: Home) -> Refuse {
    Refuse {
        code: RefusalCode::Moved,
        reason: format!("this caller's home is node {} at {}", home.node, home.addr),
        home: Some(home),
    }
}

/// The refusal of a request stamped at `time_ms` inside its caller's handover window, which
/// ends at `fence_ms`, judged at `now` (amendment 2.11): the reason says when a new request
/// can pass, in the form the local proxy reads (`retry in N ms`).
pub(crate) fn handover(time_ms: u64, fence_ms: u64, now: u64) -> Option<Refuse> {
    (time_ms < fence_ms).then(|| {
        refuse(
            RefusalCode::Handover,
            format!(
                "this node became this caller's home moments ago: requests stamped before {fence_ms} ms are refused (retry in {} ms)",
                fence_ms.saturating_sub(now).max(1)
            ),
        )
    })
}

/// Whether a refusal of `req` is recorded as an entry of its own (`refused`, naming the
/// caller as subject) rather than counted in the aggregate: only when the request is signed
/// by the authenticated TLS peer and policy knows that peer. A request the peer did not sign
/// (a replay of someone else's request, a `peer_mismatch`) is counted: the log is never
/// filled in the name of a signer the peer does not hold.
pub(crate) fn recorded_individually(cx: &Call, req: &Signed<Request>) -> bool {
    req.envelope().signer() == cx.peer.key()
        && req.envelope().principal() == cx.peer.principal()
        && cx.policy.knows(cx.peer.as_str())
}

/// Call IDs remembered as refused (a repeated refusal of one is counted, not recorded again).
const RECENT_REFUSED: usize = 4096;
/// DIDs whose refusal budget is tracked at most; past it the full (idle) budgets are dropped.
const BUDGET_DIDS: usize = 10_000;

/// Bounds the refusals recorded one by one: per authenticated DID at most `per_min` a minute
/// (a token bucket: that many at once, refilled at per_min/60 a second), and one per call ID
/// (the last [`RECENT_REFUSED`] remembered). What it declines is counted in the aggregate.
#[derive(Debug)]
pub(crate) struct RefusalBudget {
    per_min: u64,
    buckets: HashMap<String, TokenBucket>,
    recent: HashSet<[u8; 32]>,
    order: VecDeque<[u8; 32]>,
}

impl RefusalBudget {
    /// A budget of `per_min` entries per DID per minute (0: no limit per DID).
    pub(crate) fn new(per_min: u64) -> Self {
        Self {
            per_min,
            buckets: HashMap::new(),
            recent: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    /// Whether a refusal of call `call` of `did` at `now_ms` may be an entry of its own; if
    /// so, it is charged.
    pub(crate) fn admit(&mut self, did: &str, call: [u8; 32], now_ms: u64) -> bool {
        if self.recent.contains(&call) {
            return false;
        }
        if self.per_min > 0 {
            if self.buckets.len() >= BUDGET_DIDS && !self.buckets.contains_key(did) {
                self.buckets.retain(|_, b| !b.is_full(now_ms));
            }
            let rate = RateLimit {
                burst: self.per_min,
                per_sec: self.per_min as f64 / 60.0,
            };
            let bucket = self
                .buckets
                .entry(did.to_string())
                .or_insert_with(|| TokenBucket::new(rate, now_ms));
            if !bucket.try_take(now_ms) {
                return false;
            }
        }
        if self.order.len() >= RECENT_REFUSED
            && let Some(old) = self.order.pop_front()
        {
            self.recent.remove(&old);
        }
        self.recent.insert(call);
        self.order.push_back(call);
        true
    }
}

/// The `revoked` keyspace key of a revoked DID.
pub(crate) fn revoked_did_key(did: &str) -> Vec<u8> {
    [b"d".as_slice(), did.as_bytes()].concat()
}

/// The `revoked` keyspace key of a revoked grant.
pub(crate) fn revoked_grant_key(id: &[u8; 16]) -> Vec<u8> {
    [b"g".as_slice(), id].concat()
}

/// What admission reads besides the call and the request: the gateway's DID, its
/// configuration, and the revocation set.
pub(crate) struct Gate<'c, 'r> {
    /// In a cluster, why this node is not (or cannot tell that it is) the caller's home now:
    /// `moved` or `control_plane_unavailable`, decided after the peer check.
    pub(crate) routed: Option<&'r Refuse>,
    /// Whether the control plane lets this node admit calls (always without `[cluster]`).
    pub(crate) control_plane: bool,
    pub(crate) did: &'c Did,
    pub(crate) config: &'c Config,
    /// The upstreams of the call ([`Call::upstreams`]).
    pub(crate) upstreams: &'c UpstreamSet,
    pub(crate) revoked: &'r HashSet<Vec<u8>>,
}

/// The checks before any state changes, in this order: the signer is the TLS peer, the node
/// may serve (its control plane answers), the request is not stamped inside its caller's
/// handover window (when `judge_time`), the DID is not revoked, the audience, the clock (when `judge_time`: not for a grant being executed,
/// whose request was judged when the grant was issued), the upstream, the canonical form, the
/// body size, and the policy set of the call at `now`. Records the grant lifetime the policy
/// allowed in `call`.
pub(crate) fn admit<'c>(
    gate: &Gate<'c, '_>,
    call: &mut Call,
    req: &Signed<Request>,
    now: u64,
    judge_time: bool,
) -> Result<Arc<Upstream>, Refuse> {
    let r = req.message();
    let peer = &call.peer;
    if req.envelope().signer() != peer.key() || req.envelope().principal() != peer.principal() {
        return Err(refuse(
            RefusalCode::PeerMismatch,
            "the request is signed by another DID than the TLS peer",
        ));
    }
    if !gate.control_plane {
        // what other nodes revoked may not have reached this one: fail closed
        return Err(refuse(
            RefusalCode::ControlPlaneUnavailable,
            "this node has not heard from its control plane within its bound",
        ));
    }
    if let Some(r) = gate.routed {
        return Err(r.clone());
    }
    if judge_time
        && let Some(fence) = call.fence_ms
        && let Some(r) = handover(r.time_ms, fence, now)
    {
        // the previous home may have claimed this request: never twice
        return Err(r);
    }
    if gate.revoked.contains(&revoked_did_key(peer.as_str())) {
        return Err(refuse(RefusalCode::Revoked, "this DID is revoked"));
    }
    if r.aud != gate.did.as_str() {
        return Err(refuse(
            RefusalCode::WrongAudience,
            "the request is addressed to another gateway",
        ));
    }
    let skew = gate.config.skew();
    if judge_time && r.time_ms.abs_diff(now) > millis(skew) {
        return Err(refuse(
            RefusalCode::ClockSkew,
            format!("request time is outside the {}s window", skew.as_secs()),
        ));
    }
    let up = gate.upstreams.get(&r.upstream).cloned().ok_or_else(|| {
        refuse(
            RefusalCode::UnknownUpstream,
            format!("no upstream named {:?}", r.upstream),
        )
    })?;
    let (cred_header, cred_query) = match up.auth() {
        Auth::Header { name } => (Some(name.as_str()), None),
        Auth::Query { name } => (None, Some(name.as_str())),
        _ => (None, None),
    };
    let not_canonical =
        |e: canonical::CanonicalError| refuse(RefusalCode::NotCanonical, e.to_string());
    canonical::check_method(&r.method).map_err(not_canonical)?;
    canonical::check_path(&r.path).map_err(not_canonical)?;
    canonical::check_query(&r.query, cred_query).map_err(not_canonical)?;
    canonical::check_headers(&r.headers, up.allow_headers(), cred_header).map_err(not_canonical)?;
    if !up.allow_method_override() {
        canonical::check_overrides(&r.query, &r.headers).map_err(not_canonical)?;
    }
    // what policy judges, the grant names and the upstream gets (the upstream's folding)
    let path = up.policy_path(&r.path);
    if r.body_len > gate.config.gateway().max_body {
        return Err(refuse(
            RefusalCode::BodyMismatch,
            "request body exceeds the limit",
        ));
    }
    let ctx = RequestContext {
        time_ms: now,
        body_len: r.body_len,
        headers: r.headers.iter().map(|(k, _)| k.clone()).collect(),
        query: r.query.iter().map(|(k, _)| k.clone()).collect(),
    };
    let decision = call
        .policy
        .decide(peer.as_str(), &r.upstream, &r.method, &path, &ctx);
    if let Some(reason) = decision.refusal_reason() {
        return Err(refuse(RefusalCode::Policy, reason));
    }
    call.ttl_secs = decision.grant_ttl(gate.config.grant_ttl().as_secs());
    call.path = Some(path.into_owned());
    Ok(up)
}

/// Rate and concurrency limits for `stage` of the call to `up` at `now_ms` of `limits`' clock
/// (specs/operation.md, "Limits and egress"): checked after policy and before the atomic
/// batch, so a refused call consumes no grant and no replay key. Takes the call's tokens; its
/// slots are held in `call` until its terminal frame.
pub(crate) fn limit(
    call: &mut Call,
    limits: &Limits,
    config: &Config,
    up: &Upstream,
    stage: Stage,
    share: f64,
    now_ms: u64,
) -> Result<(), Refuse> {
    let mut checks = limits::checks(config.gateway(), up, call.peer.as_str(), stage);
    limits::scale_upstream(&mut checks, share);
    if checks.is_empty() {
        return Ok(());
    }
    match limits.acquire(&checks, now_ms) {
        Ok(permit) => {
            call.permit = Some(permit);
            Ok(())
        }
        Err(e) => Err(refuse(RefusalCode::RateLimited, e.to_string())),
    }
}

/// The per-DID rate of a catalog request at `now_ms` of `limits`' clock: like a request's,
/// refused `rate_limited` past the DID's burst.
pub(crate) fn limit_catalog(
    call: &Call,
    limits: &Limits,
    config: &Config,
    now_ms: u64,
) -> Result<(), Refuse> {
    let checks = limits::catalog_checks(config.gateway(), call.peer.as_str());
    if checks.is_empty() {
        return Ok(());
    }
    limits
        .acquire(&checks, now_ms)
        .map(drop)
        .map_err(|e| refuse(RefusalCode::RateLimited, e.to_string()))
}

/// Checked again right before the upstream is called: a revocation that arrived while the
/// call was in flight still stops it.
pub(crate) fn still_allowed(
    revoked: &HashSet<Vec<u8>>,
    did: &Caller,
    grant: &[u8; 16],
) -> Result<(), Refuse> {
    if revoked.contains(&revoked_did_key(did.as_str())) {
        return Err(refuse(RefusalCode::Revoked, "this DID is revoked"));
    }
    if revoked.contains(&revoked_grant_key(grant)) {
        return Err(refuse(RefusalCode::Revoked, "this grant is revoked"));
    }
    Ok(())
}

/// A grant `id` for the verified request, valid from `now` for the lifetime the call allows
/// (at most `configured_ttl_secs`).
pub(crate) fn mint(
    call: &Call,
    configured_ttl_secs: u64,
    req: &Signed<Request>,
    now: u64,
    id: [u8; 16],
) -> GrantBody {
    GrantBody {
        v: call.version.as_u64(),
        id,
        call: req.envelope().digest(),
        subject: call.peer.to_string(),
        upstream: req.message().upstream.clone(),
        method: req.message().method.clone(),
        path: call
            .path
            .clone()
            .unwrap_or_else(|| req.message().path.clone()),
        expires_ms: now + call.grant_ttl_secs(configured_ttl_secs) * 1000,
        node_cert: None,
    }
}

/// A claim key that sorts by its deadline: `deadline_ms` (big-endian) || `tag` || `id`. Every
/// claim that only matters until a deadline is keyed so ([`REPLAY`], [`GRANTS`]), so that
/// pruning the expired ones is a scan of the keyspace's head, never of the live keys
/// (specs/protocol.md, "Replay and grant claims").
pub(crate) fn deadline_key(deadline_ms: u64, tag: u8, id: &[&[u8]]) -> Vec<u8> {
    let mut key = Vec::with_capacity(9 + id.iter().map(|p| p.len()).sum::<usize>());
    key.extend_from_slice(&deadline_ms.to_be_bytes());
    key.push(tag);
    for part in id {
        key.extend_from_slice(part);
    }
    key
}

/// The claims a new request makes: its (signer, nonce) unseen (index 0), its client head not
/// contradicting one seen before (index 1), and the did:web document that admitted the caller
/// kept beside the chain. The replay key lives until the request's time plus `skew` (after
/// that the request is refused `clock_skew` anyway): it is keyed by that deadline
/// ([`deadline_key`]).
///
/// One replay key is enough: two requests with one call ID have the same protected header and
/// payload (the call ID is their digest), so the same signer (`kid`; the gateway verifies with
/// the TLS peer's key, which must be the signer's) and the same nonce, and the (signer, nonce)
/// key refuses the second. The call ID stays the identity of the call's entries and grant
/// (specs/protocol.md, "Call processing", step 5).
pub(crate) fn request_claims(call: &Call, skew: Duration, req: &Signed<Request>) -> Vec<Claim> {
    let peer = &call.peer;
    let deadline = req.message().time_ms + millis(skew);
    let head = req.message().head;
    let mut head_key = peer.public_key_bytes().to_vec();
    head_key.extend_from_slice(&head.chain);
    head_key.extend_from_slice(&head.seq.to_be_bytes());
    let mut claims = vec![
        Claim {
            space: REPLAY,
            key: deadline_key(
                deadline,
                b'n',
                &[peer.public_key_bytes(), &req.message().nonce],
            ),
            value: Vec::new(),
            rule: ClaimRule::Absent,
        },
        Claim {
            space: HEADS,
            key: head_key,
            value: head.hash.to_vec(),
            rule: ClaimRule::AbsentOrEqual,
        },
    ];
    claims.extend(document_claim(call));
    claims
}

/// The claim that keeps a did:web caller's document beside the chain (keyspace `documents`),
/// written with every entry that names it in `did_doc`: executing, granted and refused
/// entries alike, so the verifier can attribute each of them (specs/audit-log.md).
pub(crate) fn document_claim(call: &Call) -> Option<Claim> {
    call.document.as_ref().map(|doc| Claim {
        space: DOCUMENTS,
        key: doc.hash().to_vec(),
        value: doc.bytes().to_vec(),
        rule: ClaimRule::AbsentOrEqual,
    })
}

/// Refuses `clock_skew` a request whose window (its time plus `skew`) closed by `now`:
/// judged again right before its claims are made, after its body was read.
pub(crate) fn still_in_window(r: &Request, skew: Duration, now: u64) -> Result<(), Refuse> {
    if now > r.time_ms + millis(skew) {
        return Err(refuse(
            RefusalCode::ClockSkew,
            format!(
                "the request's {}s window closed while its body was read",
                skew.as_secs()
            ),
        ));
    }
    Ok(())
}

/// `d` in whole milliseconds (a configured duration: whole seconds, far below `u64::MAX` ms).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The claim that consumes `grant` (pipelined or two-step execution): once only. It lives
/// until the grant's own expiry (after which the grant is refused `grant_expired` anyway).
pub(crate) fn consumed_grant_claim(grant: &GrantBody) -> Claim {
    Claim {
        space: REPLAY,
        key: deadline_key(grant.expires_ms, b'g', &[&grant.id]),
        value: grant.call.to_vec(),
        rule: ClaimRule::Absent,
    }
}

/// The key of a two-step grant's record in [`GRANTS`] (what the execution reads back): until
/// its expiry.
pub(crate) fn issued_grant_key(grant: &GrantBody) -> Vec<u8> {
    deadline_key(grant.expires_ms, b'i', &[&grant.id])
}

/// The refusal for a claim of an execution that failed (the grant was consumed before).
pub(crate) fn grant_used(_index: usize) -> Refuse {
    refuse(RefusalCode::GrantInvalid, "the grant was already used")
}

/// The refusal for a failed claim of [`request_claims`] (index 0 is the replay key, 1 the head;
/// a claim after them is the grant's: the document claim never conflicts).
pub(crate) fn request_conflict(index: usize) -> Refuse {
    match index {
        1 => refuse(
            RefusalCode::ChainFork,
            "client chain head contradicts one already seen",
        ),
        0 => refuse(
            RefusalCode::Replay,
            "this request (call ID or nonce) was already seen",
        ),
        _ => refuse(RefusalCode::GrantInvalid, "the grant id is already in use"),
    }
}

/// An entry of `kind` about a verified request at `now`: call ID, the signed request,
/// subject, client head, grant, and the policy and document that decided it.
pub(crate) fn request_entry(
    kind: EntryKind,
    call: &Call,
    req: &Signed<Request>,
    grant: [u8; 16],
    now: u64,
) -> Entry {
    let mut entry = Entry::new(kind, now);
    entry.call = Some(req.envelope().digest());
    entry.signed = Some(req.bytes().to_vec());
    entry.subject = Some(call.peer.to_string());
    entry.grant = Some(grant);
    entry.peer_head = Some(req.message().head);
    entry.policy = Some(call.policy_hash());
    entry.did_doc = call.did_doc();
    if matches!(kind, EntryKind::Executing | EntryKind::Granted) {
        entry.home_rev = call.home_rev;
    }
    entry
}

/// The refusal code for a signed request that does not open.
pub(crate) fn refusal_for_open(e: &message::OpenError) -> RefusalCode {
    use didgate_protocol::envelope::EnvelopeError;
    match e {
        message::OpenError::Envelope(EnvelopeError::Signature) => RefusalCode::BadSignature,
        message::OpenError::Envelope(EnvelopeError::UnknownKey) => RefusalCode::DidUnresolved,
        _ => RefusalCode::Malformed,
    }
}

/// Why a message of version `v` is refused on the call's connection, if it is.
pub(crate) fn version_mismatch(call: &Call, what: &str, v: u64) -> Option<String> {
    (v != call.version.as_u64()).then(|| {
        format!(
            "a version {v} {what} on a protocol version {} connection (ALPN {})",
            call.version,
            String::from_utf8_lossy(call.version.alpn())
        )
    })
}

/// What was relayed of a response.
pub(crate) struct Relayed {
    /// The upstream's status.
    pub(crate) status: u16,
    /// Body bytes relayed (decoded, redacted), the withheld last byte included.
    pub(crate) len: u64,
    /// BLAKE3 of those bytes.
    pub(crate) resp_b3: [u8; 32],
    /// The body's last byte, withheld until the closing entry is durable: sent with the
    /// receipt, never if the entry cannot be written.
    pub(crate) held: Option<u8>,
    /// Occurrences of the credential redacted (head and body).
    pub(crate) echoes: u64,
}

/// The `executed` entry of `call` at `now`: what was relayed, the policy that decided it, and
/// the secret (`id`, `version`) it used.
pub(crate) fn executed_entry(
    cx: &Call,
    call: [u8; 32],
    relayed: &Relayed,
    secret: ([u8; 16], u64),
    now: u64,
) -> Entry {
    let mut e = Entry::new(EntryKind::Executed, now);
    e.call = Some(call);
    e.status = Some(relayed.status);
    e.resp_len = Some(relayed.len);
    e.resp_b3 = Some(relayed.resp_b3);
    e.policy = Some(cx.policy_hash());
    e.secret_echo = (relayed.echoes > 0).then_some(relayed.echoes);
    e.secret_id = Some(secret.0);
    e.secret_version = Some(secret.1);
    e
}

/// The receipt of an executed call: what was relayed, and the durable `executed` entry
/// (`closing`) with the chain's root after it.
pub(crate) fn receipt(
    cx: &Call,
    req: &Signed<Request>,
    grant: &GrantBody,
    relayed: &Relayed,
    closing: Appended,
    now: u64,
) -> Receipt {
    Receipt {
        v: cx.version.as_u64(),
        call: grant.call,
        grant: grant.id,
        client: req.envelope().signer().to_string(),
        status: relayed.status,
        resp_len: relayed.len,
        resp_b3: relayed.resp_b3,
        entry: closing.entry,
        root: Some(closing.root()),
        time_ms: now,
        node_cert: None,
    }
}

/// A refusal in `version` (the connection's), naming the gateway entry that records it when
/// there is one. A code the version does not have is sent as its version 1 counterpart
/// (`kms_unavailable` as `secret_unavailable`); the entry keeps the precise code.
pub(crate) fn refusal(
    version: Version,
    call: Option<[u8; 32]>,
    code: RefusalCode,
    reason: &str,
    entry: Option<EntryRef>,
    now: u64,
) -> Refusal {
    Refusal {
        v: version.as_u64(),
        call,
        code: code.for_version(version.as_u64()),
        reason: reason.into(),
        time_ms: now,
        entry,
        node_cert: None,
        home: None,
    }
}

/// The pipeline's decisions driven with bytes and a fixed clock: no socket, no store, no
/// runtime. The store's atomic claim check is [`Claim::holds`] over a map.
#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use didgate_protocol::Identity;
    use didgate_protocol::message::{ChainHead, SignedMessage};

    use super::*;

    /// The fixed clock of every test, ms.
    const NOW: u64 = 1_800_000_000_000;

    fn gateway() -> Identity {
        Identity::from_seed(&[0x9a; 32])
    }

    fn alice() -> Identity {
        Identity::from_seed(&[0xa1; 32])
    }

    fn bob() -> Identity {
        Identity::from_seed(&[0xb0; 32])
    }

    /// A configuration with one upstream (bearer auth, `accept` allowed) and a policy that
    /// lets alice GET /v1/** and POST /v1/charges, and bob GET /v1/balance, with a rate limit
    /// of 2 calls per DID (never refilled).
    fn config() -> Config {
        let text = format!(
            r#"
[gateway]
listen = "127.0.0.1:0"
skew_secs = 30
rate_per_did = {{ burst = 2, per_sec = 0.0 }}

[[upstream]]
name = "payments"
base_url = "https://api.example.com"
secret = "payments-key"
auth = {{ kind = "bearer" }}
allowed_hosts = ["api.example.com"]
allow_headers = ["accept"]

[[rule]]
principals = ["{alice}"]
upstream = "payments"
methods = ["GET"]
paths = ["/v1/**"]

[[rule]]
principals = ["{alice}"]
upstream = "payments"
methods = ["POST"]
paths = ["/v1/charges"]

[[rule]]
principals = ["{bob}"]
upstream = "payments"
methods = ["GET"]
paths = ["/v1/balance"]
"#,
            alice = alice().did(),
            bob = bob().did()
        );
        let config: crate::config::RawConfig = toml::from_str(&text).expect("config");
        config.validate().expect("valid")
    }

    fn call_of(who: &Identity, config: &Config) -> Call {
        let policy = PolicySet::load(std::path::Path::new("/nonexistent"), config).expect("policy");
        didgate_io::tls::install_provider();
        Call::new(
            Arc::new(policy),
            Arc::new(UpstreamSet::of_config(config).expect("upstreams")),
            Caller::key_only(who.did().clone()),
            Version::CURRENT,
        )
    }

    /// A request signed by `signer`, changed by `edit` before signing.
    fn request(signer: &Identity, edit: impl FnOnce(&mut Request)) -> Signed<Request> {
        let mut r = Request {
            v: Version::CURRENT.as_u64(),
            aud: gateway().did().to_string(),
            upstream: "payments".into(),
            method: "GET".into(),
            path: "/v1/balance".into(),
            query: Vec::new(),
            headers: Vec::new(),
            body_len: 0,
            body_b3: *blake3::hash(b"").as_bytes(),
            nonce: [1; 16],
            time_ms: NOW,
            head: ChainHead {
                chain: [7; 32],
                seq: 1,
                hash: [8; 32],
            },
        };
        edit(&mut r);
        message::open::<Request>(&r.sign(signer)).expect("opens")
    }

    /// Admits `req` for `call` at `now` with `revoked`, as the gateway does.
    fn admit_at(
        config: &Config,
        cx: &mut Call,
        req: &Signed<Request>,
        now: u64,
        revoked: &HashSet<Vec<u8>>,
    ) -> Result<String, RefusalCode> {
        admit_serving(config, cx, req, now, revoked, true)
    }

    /// [`admit_at`] on a node whose control plane lets it serve (`serving`) or not.
    fn admit_serving(
        config: &Config,
        cx: &mut Call,
        req: &Signed<Request>,
        now: u64,
        revoked: &HashSet<Vec<u8>>,
        serving: bool,
    ) -> Result<String, RefusalCode> {
        let gw = gateway();
        let upstreams = cx.upstreams.clone();
        let gate = Gate {
            routed: None,
            control_plane: serving,
            did: gw.did(),
            config,
            upstreams: &upstreams,
            revoked,
        };
        admit(&gate, cx, req, now, true)
            .map(|up| up.name().to_string())
            .map_err(|r| r.code)
    }

    #[test]
    fn a_node_cut_off_from_its_control_plane_admits_nothing() {
        let config = config();
        let mut cx = call_of(&alice(), &config);
        let req = request(&alice(), |_| {});
        let none = HashSet::new();
        assert_eq!(
            admit_serving(&config, &mut cx, &req, NOW, &none, false),
            Err(RefusalCode::ControlPlaneUnavailable)
        );
        // the peer check comes first: a stranger's replay is still peer_mismatch
        let mut cx = call_of(&bob(), &config);
        assert_eq!(
            admit_serving(&config, &mut cx, &req, NOW, &none, false),
            Err(RefusalCode::PeerMismatch)
        );
    }

    #[test]
    fn a_request_stamped_inside_its_callers_handover_window_is_refused() {
        let config = config();
        let none = HashSet::new();
        let fence = NOW + 500;
        let mut cx = call_of(&alice(), &config);
        cx.fence_ms = Some(fence);
        // stamped before the window ends: the previous home may have claimed it
        let early = request(&alice(), |r| r.time_ms = fence - 1);
        assert_eq!(
            admit_at(&config, &mut cx, &early, NOW, &none),
            Err(RefusalCode::Handover)
        );
        let r = handover(fence - 1, fence, NOW).expect("refused");
        assert!(r.reason.contains("(retry in 500 ms)"), "{}", r.reason);
        // stamped at its end or after: judged as any request
        let late = request(&alice(), |r| r.time_ms = fence);
        assert_eq!(
            admit_at(&config, &mut cx, &late, NOW, &none),
            Ok("payments".into())
        );
        // a grant being executed is not judged by its request's time
        let mut cx = call_of(&alice(), &config);
        cx.fence_ms = Some(fence);
        let gw = gateway();
        let upstreams = cx.upstreams.clone();
        let gate = Gate {
            routed: None,
            control_plane: true,
            did: gw.did(),
            config: &config,
            upstreams: &upstreams,
            revoked: &none,
        };
        assert!(admit(&gate, &mut cx, &early, NOW, false).is_ok());
    }

    /// The store's claims as a map: applies `claims` atomically if all hold, else returns the
    /// index of the first that does not (what the chain writer answers).
    fn apply(
        store: &mut HashMap<(&'static str, Vec<u8>), Vec<u8>>,
        claims: &[Claim],
    ) -> Result<(), usize> {
        for (i, c) in claims.iter().enumerate() {
            if !c.holds(store.get(&(c.space, c.key.clone())).map(Vec::as_slice)) {
                return Err(i);
            }
        }
        for c in claims {
            store.insert((c.space, c.key.clone()), c.value.clone());
        }
        Ok(())
    }

    #[test]
    fn an_allowed_request_is_admitted_with_its_upstream() {
        let config = config();
        let mut cx = call_of(&alice(), &config);
        let req = request(&alice(), |_| {});
        assert_eq!(
            admit_at(&config, &mut cx, &req, NOW, &HashSet::new()),
            Ok("payments".into())
        );
        // the configured grant lifetime applies: the rules cap nothing
        let ttl = config.grant_ttl().as_secs();
        let grant = mint(&cx, ttl, &req, NOW, [3; 16]);
        assert_eq!(grant.expires_ms, NOW + ttl * 1000);
        assert_eq!(
            (grant.call, grant.subject),
            (req.envelope().digest(), alice().did().to_string())
        );
    }

    #[test]
    fn each_admission_check_refuses_with_its_code() {
        let config = config();
        let none = HashSet::new();
        let refused = |signer: &Identity, peer: &Identity, edit: fn(&mut Request)| {
            let mut cx = call_of(peer, &config);
            admit_at(&config, &mut cx, &request(signer, edit), NOW, &none)
        };
        // the TLS peer is not the signer
        assert_eq!(
            refused(&bob(), &alice(), |_| {}),
            Err(RefusalCode::PeerMismatch)
        );
        // another gateway's audience
        assert_eq!(
            refused(&alice(), &alice(), |r| r.aud = bob().did().to_string()),
            Err(RefusalCode::WrongAudience)
        );
        // the clock, each side of the window (30 s)
        assert_eq!(
            refused(&alice(), &alice(), |r| r.time_ms = NOW - 30_001),
            Err(RefusalCode::ClockSkew)
        );
        assert_eq!(
            refused(&alice(), &alice(), |r| r.time_ms = NOW + 30_001),
            Err(RefusalCode::ClockSkew)
        );
        assert!(refused(&alice(), &alice(), |r| r.time_ms = NOW - 30_000).is_ok());
        // an upstream that is not configured
        assert_eq!(
            refused(&alice(), &alice(), |r| r.upstream = "mail".into()),
            Err(RefusalCode::UnknownUpstream)
        );
        // canonical refusals, before policy: a dot segment, an encoded slash, a header not
        // allowed, the credential's own header, a lower-case method
        for edit in [
            (|r: &mut Request| r.path = "/v1/../admin".into()) as fn(&mut Request),
            |r| r.path = "/v1/a%2Fb".into(),
            |r| r.headers = vec![("x-forwarded-for".into(), "1.2.3.4".into())],
            |r| r.headers = vec![("authorization".into(), "Bearer mine".into())],
            |r| r.method = "get".into(),
        ] {
            assert_eq!(
                refused(&alice(), &alice(), edit),
                Err(RefusalCode::NotCanonical)
            );
        }
        // a body over the limit
        assert_eq!(
            refused(&alice(), &alice(), |r| r.body_len = u64::MAX),
            Err(RefusalCode::BodyMismatch)
        );
        // policy: bob may not POST, nor GET outside /v1/balance (default deny)
        assert_eq!(
            refused(&bob(), &bob(), |r| r.method = "POST".into()),
            Err(RefusalCode::Policy)
        );
        assert_eq!(
            refused(&bob(), &bob(), |r| r.path = "/v1/charges".into()),
            Err(RefusalCode::Policy)
        );
        assert!(refused(&bob(), &bob(), |_| {}).is_ok());
    }

    #[test]
    fn only_a_known_peers_own_request_is_recorded_in_its_name() {
        let config = config();
        let alices = request(&alice(), |_| {});
        // alice's own request on her connection: an entry of its own
        assert!(recorded_individually(&call_of(&alice(), &config), &alices));
        // replayed by bob (known) or by a stranger: counted, never recorded as alice's
        assert!(!recorded_individually(&call_of(&bob(), &config), &alices));
        let stranger = Identity::from_seed(&[0x55; 32]);
        assert!(!recorded_individually(
            &call_of(&stranger, &config),
            &alices
        ));
        // a stranger's own request: counted
        let own = request(&stranger, |_| {});
        assert!(!recorded_individually(&call_of(&stranger, &config), &own));
    }

    #[test]
    fn refused_entries_are_bounded_per_did_and_per_call() {
        let mut budget = RefusalBudget::new(3);
        let call = |i: u8| [i; 32];
        // a call ID refused before is counted, not recorded again
        assert!(budget.admit("did:key:a", call(1), NOW));
        assert!(!budget.admit("did:key:a", call(1), NOW));
        // three a minute per DID, at once; then one every 20 s
        assert!(budget.admit("did:key:a", call(2), NOW));
        assert!(budget.admit("did:key:a", call(3), NOW));
        assert!(!budget.admit("did:key:a", call(4), NOW));
        assert!(!budget.admit("did:key:a", call(5), NOW + 19_999));
        assert!(budget.admit("did:key:a", call(6), NOW + 20_000));
        // another DID has its own budget
        assert!(budget.admit("did:key:b", call(7), NOW));
        // no limit per DID with 0; still one per call ID
        let mut unlimited = RefusalBudget::new(0);
        assert!((0..100).all(|i| unlimited.admit("did:key:a", [i; 32], NOW)));
        assert!(!unlimited.admit("did:key:a", [0; 32], NOW));
    }

    #[test]
    fn revocation_stops_admission_and_the_call_before_the_upstream() {
        let config = config();
        let mut revoked = HashSet::new();
        let req = request(&alice(), |_| {});
        let mut cx = call_of(&alice(), &config);
        assert!(admit_at(&config, &mut cx, &req, NOW, &revoked).is_ok());
        let grant = mint(&cx, 60, &req, NOW, [4; 16]);
        assert_eq!(still_allowed(&revoked, &cx.peer, &grant.id), Ok(()));
        revoked.insert(revoked_grant_key(&grant.id));
        assert_eq!(
            still_allowed(&revoked, &cx.peer, &grant.id).map_err(|r| r.code),
            Err(RefusalCode::Revoked)
        );
        revoked.insert(revoked_did_key(alice().did().as_str()));
        assert_eq!(
            admit_at(&config, &mut cx, &req, NOW, &revoked),
            Err(RefusalCode::Revoked)
        );
        // bob is not affected
        let mut bobs = call_of(&bob(), &config);
        assert!(admit_at(&config, &mut bobs, &request(&bob(), |_| {}), NOW, &revoked).is_ok());
    }

    #[test]
    fn replays_forks_and_reused_grants_conflict_in_the_claims() {
        let config = config();
        let skew = config.skew();
        let cx = call_of(&alice(), &config);
        let mut store = HashMap::new();
        let first = request(&alice(), |_| {});
        let grant = mint(&cx, 60, &first, NOW, [5; 16]);
        let mut claims = request_claims(&cx, skew, &first);
        claims.push(consumed_grant_claim(&grant));
        assert_eq!(apply(&mut store, &claims), Ok(()));
        // the same bytes again: the same signer and nonce (one call ID is one signer and nonce)
        let again = request_claims(&cx, skew, &first);
        let conflict = apply(&mut store, &again).map_err(request_conflict);
        assert_eq!(conflict.map_err(|r| r.code), Err(RefusalCode::Replay));
        // re-signed with the same nonce: the (DID, nonce) was seen
        let same_nonce = request(&alice(), |r| r.path = "/v1/items".into());
        let conflict = apply(&mut store, &request_claims(&cx, skew, &same_nonce));
        assert_eq!(conflict, Err(0));
        assert_eq!(request_conflict(0).code, RefusalCode::Replay);
        // a new nonce with the same client head (seq 1) and another hash: a fork
        let fork = request(&alice(), |r| {
            r.nonce = [2; 16];
            r.head.hash = [9; 32];
        });
        let conflict =
            apply(&mut store, &request_claims(&cx, skew, &fork)).map_err(request_conflict);
        assert_eq!(conflict.map_err(|r| r.code), Err(RefusalCode::ChainFork));
        // the same head again with a new nonce is fine (a refused call does not advance it)
        let next = request(&alice(), |r| r.nonce = [3; 16]);
        assert_eq!(apply(&mut store, &request_claims(&cx, skew, &next)), Ok(()));
        // a grant is consumed once
        let reuse = apply(&mut store, &[consumed_grant_claim(&grant)]).map_err(grant_used);
        assert_eq!(reuse.map_err(|r| r.code), Err(RefusalCode::GrantInvalid));
        // the replay key sorts by its deadline, skew after the request's time; the consumed
        // grant's by the grant's expiry (what pruning removes as a range); one replay key per
        // request, none by call ID
        let deadline = (NOW + millis(skew)).to_be_bytes();
        assert_eq!(claims.len(), 3);
        assert_eq!(claims[0].key[..8], deadline);
        assert_eq!(claims[2].key[..8], grant.expires_ms.to_be_bytes());
        assert_eq!((claims[0].key[8], claims[2].key[8]), (b'n', b'g'));
        assert_eq!(claims[1].space, HEADS);
    }

    #[test]
    fn a_request_must_be_claimed_within_its_window() {
        let req = request(&alice(), |_| {});
        let skew = Duration::from_secs(30);
        let end = req.message().time_ms + 30 * 1000;
        assert!(still_in_window(req.message(), skew, end).is_ok());
        let late = still_in_window(req.message(), skew, end + 1).map_err(|r| r.code);
        assert_eq!(late, Err(RefusalCode::ClockSkew));
    }

    #[test]
    fn the_rate_limit_refuses_past_its_burst_and_holds_slots_in_the_call() {
        let config = config();
        let limits = Limits::default();
        let up = config.upstream("payments").expect("upstream");
        let mut results = Vec::new();
        for _ in 0..3 {
            let mut cx = call_of(&alice(), &config);
            results.push(
                limit(&mut cx, &limits, &config, up, Stage::Call, 1.0, 0).map_err(|r| r.code),
            );
        }
        assert_eq!(results, [Ok(()), Ok(()), Err(RefusalCode::RateLimited)]);
        // per DID: bob has his own bucket
        let mut bobs = call_of(&bob(), &config);
        assert!(limit(&mut bobs, &limits, &config, up, Stage::Call, 1.0, 0).is_ok());
    }

    #[test]
    fn entries_and_answers_carry_the_calls_decision() {
        let config = config();
        let mut cx = call_of(&alice(), &config);
        let req = request(&alice(), |_| {});
        let entry = request_entry(EntryKind::Executing, &cx, &req, [6; 16], NOW);
        assert_eq!(entry.policy, Some(cx.policy.hash()));
        assert_eq!(
            (entry.call, entry.grant),
            (Some(req.envelope().digest()), Some([6; 16]))
        );
        assert_eq!(entry.peer_head, Some(req.message().head));
        assert_eq!(entry.did_doc, None);
        // the connection's version decides what a request must carry
        assert_eq!(
            version_mismatch(&cx, "request", Version::CURRENT.as_u64()),
            None
        );
        cx.version = Version::V1;
        assert!(
            version_mismatch(&cx, "request", 2).is_some_and(|w| w.contains("version 2 request"))
        );
        // a bad signature and an unknown key are told apart from malformed bytes
        let mut bytes = req.bytes().to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let e = message::open::<Request>(&bytes).expect_err("altered");
        assert_eq!(refusal_for_open(&e), RefusalCode::BadSignature);
        let e = message::open::<Request>(b"not cose").expect_err("garbage");
        assert_eq!(refusal_for_open(&e), RefusalCode::Malformed);
        // the closing entry and the receipt say the same of what was relayed
        cx.version = Version::CURRENT;
        let grant = mint(&cx, 60, &req, NOW, [6; 16]);
        let relayed = Relayed {
            status: 200,
            len: 3,
            resp_b3: *blake3::hash(b"abc").as_bytes(),
            held: Some(b'c'),
            echoes: 2,
        };
        let executed = executed_entry(&cx, grant.call, &relayed, ([5; 16], 4), NOW);
        assert_eq!((executed.status, executed.resp_len), (Some(200), Some(3)));
        assert_eq!(
            (
                executed.secret_echo,
                executed.secret_id,
                executed.secret_version
            ),
            (Some(2), Some([5; 16]), Some(4))
        );
        let frontier = didgate_audit::merkle::Frontier::from_parts(1, vec![[2; 32]])
            .expect("one leaf, one peak");
        let closing = Appended {
            entry: EntryRef {
                seq: 9,
                hash: [1; 32],
            },
            frontier,
        };
        let root = closing.root();
        let r = receipt(&cx, &req, &grant, &relayed, closing.clone(), NOW + 1);
        assert_eq!(
            (r.call, r.grant, r.resp_b3, r.resp_len),
            (grant.call, grant.id, relayed.resp_b3, 3)
        );
        assert_eq!(
            (r.entry, r.root, r.client),
            (closing.entry, Some(root), alice().did().to_string())
        );
        let refused = refusal(Version::V1, None, RefusalCode::Policy, "no", None, NOW);
        assert_eq!((refused.v, refused.code), (1, RefusalCode::Policy));
    }
}

//! The gateway's state and the steps of a call (specs/protocol.md, "Call processing";
//! docs/pipeline.md).
//!
//! [`Gateway::open`] loads a data directory: identity, configuration, KMS, store and chain; it
//! closes executing entries a crash left open as "abandoned" and prunes expired replay keys.
//! The QUIC loop is [`crate::server`]; each step here reads the stream, the store, the clock
//! and the revocation set and calls the pure decisions of [`crate::call`] on the call's
//! [`Call`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use didgate_audit::entry::{Entry, EntryKind, Role};
use didgate_audit::store::{Append, AppendError, Chain, Claim, ClaimRule, Store};
use didgate_io::{tls, wire};
use didgate_protocol::canonical;
use didgate_protocol::frame::{self, FrameDecoder, FrameType};
use didgate_protocol::message::{
    self, EntryRef, GrantBody, Home, Message, RefusalCode, Request, ResponseHead, Signed,
    SignedMessage,
};
use didgate_protocol::web::DidDocument;
use didgate_protocol::{Caller, Did, Identity, Principal, Version};

use crate::call::{
    self, Call, Gate, Refuse, Relayed, refuse, request_conflict, revoked_did_key, revoked_grant_key,
};
use crate::config::{Config, EchoAction, Upstream};
use crate::didweb::WebResolver;
use crate::echo;
use crate::events::{Event, EventKind};
use crate::limits::{Limits, Stage};
use crate::metrics::{Flow, Metrics};
use crate::policy::{PolicyError, PolicySet};
use crate::secrets::{SecretError, Secrets};
use crate::upstream;
use crate::upstreams::UpstreamSet;
use didgate_io::now_ms;

pub use crate::datadir::{
    DOCUMENTS, DataDir, GRANTS, HEADS, LIFECYCLE, REPLAY, REVOKED, SECRETS, SPACES,
};

/// How often expired claims are pruned while serving.
pub const PRUNE_EVERY: Duration = Duration::from_secs(1);
/// Keys removed per batch when pruning.
const PRUNE_BATCH: usize = 10_000;

/// How far apart the clocks of a cluster's nodes may be, ms (they are expected to keep time
/// by NTP): added to the clock skew in a caller's handover window (specs/operation.md, "Home
/// nodes").
pub const NODE_CLOCK_TOLERANCE_MS: u64 = 1_000;

/// What the gateway keeps of a grant it issued, in [`GRANTS`] under
/// [`call::issued_grant_key`] (its expiry, `i`, its id).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct IssuedGrant {
    /// The signed request the grant answers.
    #[serde(with = "didgate_protocol::cbor::bytes")]
    request: Vec<u8>,
    /// Expiry, ms.
    expires_ms: u64,
}

/// What an operator revokes.
// a rare operator command: its size does not matter, boxing would only cost callers
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoke {
    /// Every call of this DID, from the next request on, including calls in flight that have
    /// not reached the upstream; its open connections are closed.
    Did(Principal),
    /// One grant (two-step flow, or a pipelined call in flight).
    Grant([u8; 16]),
}

/// Why a revocation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RevokeError {
    /// The revocation could not be written (nothing changed).
    #[error(transparent)]
    Audit(#[from] AppendError),
    /// Written and in force on this node, but not published to the cluster: the other nodes
    /// do not know it (run the command again; it is idempotent).
    #[error(
        "revoked on this node, but not published to the cluster, so other nodes still admit it (run the command again): {0}"
    )]
    Publish(#[source] didgate_cluster::ClusterError),
}

/// Why a policy reload failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReloadError {
    /// The policy does not load or compile: the one in force stays.
    #[error(transparent)]
    Policy(PolicyError),
    /// Swapped in on this node, but not published to the cluster: the other nodes keep theirs
    /// (run the reload again).
    #[error(
        "reloaded on this node, but not published to the cluster, so other nodes keep theirs (run the reload again): {0}"
    )]
    Publish(#[source] didgate_cluster::ClusterError),
    /// The upstreams do not load or validate: the ones in force stay.
    #[error(transparent)]
    Upstreams(#[from] crate::upstreams::UpstreamSetError),
    /// The reload task failed.
    #[error("reload task: {0}")]
    Task(String),
}

/// The revocation a revocation key names (`d` || DID text, `g` || grant id), if it is one.
fn revoke_key(target: &Revoke) -> Vec<u8> {
    match target {
        Revoke::Did(did) => revoked_did_key(did.as_str()),
        Revoke::Grant(id) => revoked_grant_key(id),
    }
}

fn revoke_of_key(key: &[u8]) -> Option<Revoke> {
    match key.split_first()? {
        (b'd', did) => Principal::parse(std::str::from_utf8(did).ok()?)
            .ok()
            .map(Revoke::Did),
        (b'g', id) => <[u8; 16]>::try_from(id).ok().map(Revoke::Grant),
        _ => None,
    }
}

/// Parses a revocation target: exactly one of a DID or a grant id (32 hex digits).
pub fn parse_revoke(did: Option<&str>, grant: Option<&str>) -> Result<Revoke, String> {
    match (did, grant) {
        (Some(d), None) => Principal::parse(d)
            .map(Revoke::Did)
            .map_err(|e| format!("{d}: {e}")),
        (None, Some(g)) => {
            let mut id = [0u8; 16];
            hex::decode_to_slice(g, &mut id)
                .map_err(|_| format!("{g}: a grant id is 32 hex digits"))?;
            Ok(Revoke::Grant(id))
        }
        _ => Err("name exactly one of a DID or a grant id".into()),
    }
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The policy set (specs/operation.md, "Policy").
    #[error("policy: {0}")]
    Policy(#[from] PolicyError),
    /// Identity file.
    #[error(transparent)]
    Identity(#[from] didgate_io::identity::IdentityError),
    /// KMS.
    #[error(transparent)]
    Kms(#[from] crate::kms::KmsError),
    /// Secrets (an interrupted master-key rotation that cannot be repaired, a record).
    #[error(transparent)]
    Secrets(#[from] SecretError),
    /// Store.
    #[error(transparent)]
    Store(#[from] didgate_audit::StoreError),
    /// Audit append at start-up.
    #[error("audit: {0}")]
    Audit(#[from] AppendError),
    /// The QUIC server's TLS configuration cannot be built.
    #[error("transport: {0}")]
    Tls(#[source] tls::TlsError),
    /// The UDP socket cannot be bound.
    #[error("transport: {0}")]
    Socket(#[source] std::io::Error),
    /// An upstream HTTP client cannot be built.
    #[error("transport: {0}")]
    HttpClient(#[source] crate::egress::ClientError),
    /// The did:web resolver cannot be built (its HTTP client or test roots).
    #[error("transport: {0}")]
    Resolver(#[source] crate::didweb::ResolveError),
    /// The data directory may be written by others, or its modes cannot be tightened.
    #[error("data directory: {0}")]
    DataDir(#[from] didgate_io::hardening::HardeningError),
    /// `[node]`: the node certificate or its revocation list does not hold.
    #[error("node: {0}")]
    Node(#[from] crate::node::NodeError),
    /// `[cluster]`: the control plane cannot be joined.
    #[error("cluster: {0}")]
    Cluster(#[source] didgate_cluster::ClusterError),
    /// The upstreams' HTTP clients cannot be built.
    #[error("upstreams: {0}")]
    Upstreams(#[source] crate::upstreams::UpstreamSetError),
    /// `[cluster]`: the chain is shorter than, or differs from, what the cluster saw of it.
    #[error("cluster: {0}")]
    Rewound(String),
    /// `[cluster]`: the node listens on an unspecified address (`0.0.0.0`, `[::]`), which it
    /// cannot register for peers and clients to reach.
    #[error(
        "cluster: listen {0} is not an address peers and clients can reach: give the node's own address"
    )]
    Unreachable(std::net::SocketAddr),
    /// `[cluster]`: the cluster's secrets cannot be taken (another master key).
    #[error("cluster: {0}")]
    ClusterSecrets(#[source] Box<crate::shared::JoinError>),
}

/// Counts the refusals not recorded one by one (see [`call::recorded_individually`]), written
/// as one entry per window.
#[derive(Debug, Default)]
struct Aggregate {
    counts: HashMap<RefusalCode, u64>,
    since_ms: u64,
}

/// A running gateway's state.
pub struct Gateway {
    /// The key this gateway signs with: the gateway DID's, or a node's ([`crate::node`]).
    pub(crate) identity: Arc<Identity>,
    /// The gateway DID served: what requests name in `aud` and clients pin. The identity's own
    /// DID, or the gateway DID a node's certificate names.
    served: Did,
    /// This gateway's node certificate, when it is one node of a gateway DID.
    pub(crate) node: Option<crate::node::Node>,
    /// The newest node revocation list this node holds (stapled in its TLS certificate): its
    /// `[node] revocations` file, or a newer one the cluster published.
    node_revocations: std::sync::RwLock<Option<(didgate_protocol::node::NodeRevocations, Vec<u8>)>>,
    /// The cluster's control plane once joined ([`Gateway::join_cluster`]); `[cluster]` set
    /// and not joined means no call is admitted.
    cluster: std::sync::OnceLock<Arc<didgate_cluster::ControlPlane>>,
    /// The cluster's sealed secrets as this node last saw them ([`crate::shared`]).
    pub(crate) shared: crate::shared::SharedSecrets,
    /// Held while this node exports its chain for a member ([`crate::export`]): one at a time.
    pub(crate) exporting: tokio::sync::Mutex<()>,
    /// In a cluster, this node's part of the per-upstream rate limits.
    pub(crate) shares: crate::shares::Shares,
    pub(crate) config: Config,
    /// The data directory (the policy is reloaded from it).
    dir: PathBuf,
    /// The policy set in force: a reload swaps the `Arc`; a call keeps the one it started with.
    policy: std::sync::RwLock<Arc<PolicySet>>,
    pub(crate) chain: Chain,
    pub(crate) secrets: Arc<Secrets>,
    /// The upstreams in force and their HTTP clients, each with its egress resolver
    /// ([`crate::upstreams`]): a reload swaps the `Arc`; a call keeps the one it started with.
    upstreams: std::sync::RwLock<Arc<UpstreamSet>>,
    /// Rate and concurrency limits ([`crate::limits`]).
    pub(crate) limits: Limits,
    aggregate: Mutex<Aggregate>,
    /// Held for a whole [`Gateway::flush_refusals`], so that when one returns, every refusal
    /// counted before it is durable, even if another flush (the periodic one) had taken them.
    flushing: tokio::sync::Mutex<()>,
    /// Bounds the refusals recorded one by one (per DID per minute, once per call ID).
    refusal_budget: Mutex<call::RefusalBudget>,
    /// Revocation keys ([`REVOKED`]), loaded at start and kept in step with the store.
    revoked: std::sync::RwLock<std::collections::HashSet<Vec<u8>>>,
    /// Open connections by the key their certificate proved (its did:key), each with the DID
    /// it claims: the per-DID connection limit counts what was proved, so a key a did:web's
    /// document does not list cannot take that did:web's slots.
    conns: Mutex<HashMap<String, Vec<(String, quinn::Connection)>>>,
    /// did:web callers' documents ([`crate::didweb`]).
    resolver: WebResolver,
    /// Admission of new connections by source address ([`crate::admission`]).
    pub(crate) admission: Mutex<crate::admission::Admission>,
    /// Set when [`serve`] begins to drain: new calls are refused `shutting_down`.
    pub(crate) stopping: std::sync::atomic::AtomicBool,
    /// While draining after a planned leave that handed over, until when (wall clock, ms) this
    /// node still executes the grants it issued (0: not at all).
    pub(crate) grants_until: std::sync::atomic::AtomicU64,
    /// Calls being handled, over every connection; `idle` is notified when it reaches zero.
    pub(crate) inflight: std::sync::atomic::AtomicUsize,
    pub(crate) idle: tokio::sync::Notify,
    /// Live events ([`crate::events`]): sending never blocks and ignores absent or lagging
    /// subscribers.
    events: tokio::sync::broadcast::Sender<Event>,
    /// Prometheus counters ([`crate::metrics`]).
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("did", self.identity.did())
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Opens the gateway in `dir`.
    pub async fn open(dir: &Path) -> Result<Self, StartError> {
        tls::install_provider();
        crate::datadir::private_data_dir(dir)?;
        let d = DataDir::new(dir);
        let config = Config::load(&d.config())?;
        let refusal_entries_per_min = config.gateway().refusal_entries_per_min;
        let identity = Arc::new(didgate_io::identity::load(&d.identity())?);
        let node = match config.node() {
            Some(settings) => Some(crate::node::Node::load(
                dir,
                settings,
                &identity,
                config.gateway().listen,
                now_ms(),
            )?),
            None => None,
        };
        let served = node
            .as_ref()
            .map_or_else(|| identity.did().clone(), |n| n.gateway().clone());
        let held_revocations = node.as_ref().and_then(|n| {
            let bytes = n.credentials().revocations.clone()?;
            let list = didgate_protocol::node::NodeRevocations::open(&bytes, n.gateway()).ok()?;
            Some((list, bytes))
        });
        let store = Store::open(&d.store(), SPACES)?;
        let chain = Chain::open(
            store,
            identity.clone(),
            Role::Gateway,
            now_ms(),
            config.checkpoint_policy(),
        )?;
        let secrets = {
            let (dir, chain, grace, token) = (
                dir.to_path_buf(),
                chain.clone(),
                config.secret_grace().as_secs(),
                config.token_config(dir),
            );
            // the snapshot and upkeep entries block on their appends
            tokio::task::spawn_blocking(move || Secrets::open(&dir, chain, grace, token, now_ms()))
                .await
                .map_err(|source| SecretError::Task {
                    what: "opening the secrets",
                    source,
                })??
        };
        let secrets = Arc::new(secrets);
        let upstreams = std::sync::RwLock::new(Arc::new(
            UpstreamSet::of_config(&config).map_err(StartError::Upstreams)?,
        ));
        let policy = std::sync::RwLock::new(Arc::new(PolicySet::load(dir, &config)?));
        let metrics = Arc::new(Metrics::new(&config));
        let resolver = WebResolver::new(config.did_web(), dir).map_err(StartError::Resolver)?;
        let gw = Self {
            admission: Mutex::new(crate::admission::Admission::new(
                &config.gateway().handshakes,
            )),
            resolver,
            identity,
            served,
            node_revocations: std::sync::RwLock::new(held_revocations),
            node,
            cluster: std::sync::OnceLock::new(),
            shared: Default::default(),
            exporting: tokio::sync::Mutex::new(()),
            shares: crate::shares::Shares::default(),
            config,
            dir: dir.to_path_buf(),
            policy,
            chain,
            secrets,
            upstreams,
            limits: Limits::default(),
            aggregate: Mutex::new(Aggregate::default()),
            flushing: tokio::sync::Mutex::new(()),
            refusal_budget: Mutex::new(call::RefusalBudget::new(refusal_entries_per_min)),
            revoked: Default::default(),
            conns: Mutex::new(HashMap::new()),
            stopping: Default::default(),
            grants_until: Default::default(),
            inflight: Default::default(),
            idle: tokio::sync::Notify::new(),
            events: tokio::sync::broadcast::channel(crate::events::CAPACITY).0,
            metrics,
        };
        if let Some(node) = &gw.node {
            // the checkpoints this node signs carry its certificate
            gw.chain
                .set_node_certificate(Some(node.credentials().certificate.clone()));
        }
        gw.recover().await?;
        {
            let keys = gw
                .chain
                .store()
                .scan(REVOKED, b"")?
                .into_iter()
                .map(|(k, _)| k)
                .collect();
            *gw.revoked.write().unwrap_or_else(|p| p.into_inner()) = keys;
        }
        Ok(gw)
    }

    /// The gateway DID served: what clients pin and requests name in `aud` (a node's is the
    /// gateway DID its certificate names, not its own key).
    pub fn did(&self) -> &Did {
        &self.served
    }

    /// The key this gateway signs with and owns its chain with: the gateway DID's own, or a
    /// node's.
    pub fn key(&self) -> &Did {
        self.identity.did()
    }

    /// Joins the cluster of `[cluster]` (if any) as this gateway's key serving at `addr`: a
    /// member under a lease kept alive, after which revocations are published to and watched
    /// from every node ([`crate::server::serve`] starts the watch). Without it a clustered
    /// gateway admits no call.
    pub async fn join_cluster(&self, addr: std::net::SocketAddr) -> Result<(), StartError> {
        let Some(settings) = self.config.cluster() else {
            return Ok(());
        };
        // the address registered is where `moved` sends callers and peers fetch chains
        if addr.ip().is_unspecified() {
            return Err(StartError::Unreachable(addr));
        }
        let tls = settings.tls(&self.dir).map_err(StartError::Cluster)?;
        let plane = didgate_cluster::ControlPlane::join(
            settings.clone(),
            tls,
            self.identity.did().to_string(),
            self.served.to_string(),
            addr,
        )
        .await
        .map_err(StartError::Cluster)?;
        // a cluster with no policy yet takes this node's (a single node joining a new cluster
        // keeps its own); otherwise the cluster's is swapped in by the watch
        let doc = PolicySet::document(&self.dir, &self.config)?;
        if plane
            .seed_document(&doc)
            .await
            .map_err(StartError::Cluster)?
        {
            tracing::info!(policy = %hex::encode(doc.hash()), "the cluster had no policy: seeded with this node's");
        }
        // and its upstreams, the same way
        let ups = self.upstreams().document().clone();
        if plane
            .seed_document(&ups)
            .await
            .map_err(StartError::Cluster)?
        {
            tracing::info!(upstreams = %hex::encode(didgate_cluster::Document::hash(&ups)), "the cluster had no upstreams: seeded with this node's");
        }
        // the node revocation list this node was given reaches every node
        let held = self
            .node_revocations
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some((list, bytes)) = held {
            plane
                .publish_node_revocations(list.seq, &bytes)
                .await
                .map_err(StartError::Cluster)?;
        }
        // the cluster's state before the first call (the watches started by `serve` then keep
        // it): a node must not admit what others revoked, under a policy the cluster replaced,
        // or with a certificate the cluster revoked; nor append to a chain rewound below what
        // the cluster saw of it
        let synced = match self.check_not_rewound(&plane).await {
            Ok(()) => self.sync_cluster_state(&plane).await,
            Err(e) => Err(e),
        };
        if let Err(e) = synced {
            plane.leave().await;
            return Err(e);
        }
        // the master key the cluster's secrets are wrapped under, and the secrets themselves
        if let Err(e) = self.shared.join(&plane, &self.secrets).await {
            plane.leave().await;
            return Err(StartError::ClusterSecrets(Box::new(e)));
        }
        // the callers' homes: whether another node ever served here (its chain is in the
        // registry: every node publishes a checkpoint of it there before its first call)
        // decides whether the callers this node is home to wait out a handover
        let chain = self.chain.clone();
        let own = tokio::task::spawn_blocking(move || -> Result<_, StartError> {
            chain.checkpoint()?;
            Ok(chain.store().last_checkpoint()?)
        })
        .await
        .map_err(|e| StartError::Rewound(format!("checkpointing the chain: {e}")))
        .and_then(|r| r);
        let own = match own {
            Ok(own) => own,
            Err(e) => {
                plane.leave().await;
                return Err(e);
            }
        };
        let homes = async {
            let me = &plane.settings().node;
            if let Some(cp) = own {
                plane.publish_checkpoint(&cp).await?;
            }
            // a node of this gateway, whatever its certificate's state now
            let others_served = plane.checkpoints().await?.iter().any(|(n, bytes)| {
                n != me
                    && didgate_protocol::node::open_signed::<message::Checkpoint>(
                        bytes,
                        &self.served,
                        None,
                        None,
                    )
                    .is_ok()
            });
            // the store is read on a blocking thread (the scan may pass many grant keys)
            let (store, window) = (self.chain.store().clone(), self.window_ms());
            let unmarked = tokio::task::spawn_blocking(move || unmarked_until(&store, window))
                .await
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "cannot read the replay keys: a handover waits the whole window");
                    now_ms().saturating_add(window)
                });
            plane.start_homes(window, others_served, unmarked).await
        };
        if let Err(e) = homes.await {
            plane.leave().await;
            return Err(StartError::Cluster(e));
        }
        let _ = self.cluster.set(plane);
        Ok(())
    }

    /// Refuses to serve a chain shorter than, or different from, the checkpoint of it the
    /// cluster's registry holds (`chains/NODE`): a store restored from an old backup, or a disk
    /// rewound, would otherwise fork the chain under entries peers and clients already saw. A
    /// registry checkpoint of another chain (a node name reused with a new store) is ignored.
    async fn check_not_rewound(
        &self,
        plane: &didgate_cluster::ControlPlane,
    ) -> Result<(), StartError> {
        use didgate_protocol::message::Checkpoint;
        let node = &plane.settings().node;
        let registry = plane.checkpoints().await.map_err(StartError::Cluster)?;
        let Some((_, bytes)) = registry.iter().find(|(n, _)| n == node) else {
            return Ok(());
        };
        let Ok(opened) = message::open::<Checkpoint>(bytes) else {
            tracing::warn!("the registry's checkpoint of this node does not open: not compared");
            return Ok(());
        };
        let cp = opened.message();
        if opened.envelope().signer() != self.identity.did() || cp.chain != self.chain.id() {
            return Ok(());
        }
        let (store, size) = (self.chain.store().clone(), cp.size);
        // the chain's length, and its root at the registry's size (one read of the store)
        let (held, ours) = tokio::task::spawn_blocking(move || {
            let held = store.head().ok().flatten().map_or(0, |h| h.seq + 1);
            (held, (held >= size).then(|| store.root_at(size)).flatten())
        })
        .await
        .map_err(|e| StartError::Rewound(format!("reading the chain: {e}")))?;
        if size > held {
            return Err(StartError::Rewound(format!(
                "this node's chain holds {held} entries, but the cluster saw it at {size} (chains/{node}): restored from an old backup or a rewound disk? Serving would fork the chain; restore a newer copy, or give the node a new data directory"
            )));
        }
        if ours != Some(cp.root) {
            return Err(StartError::Rewound(format!(
                "this node's chain differs, at size {size}, from the checkpoint the cluster saw (chains/{node}): serving would fork it"
            )));
        }
        Ok(())
    }

    /// Reads and applies the node revocation lists, the revocations, the current upstreams and
    /// the current policy of the cluster (in that order). A list that revokes this node's certificate refuses the
    /// start.
    async fn sync_cluster_state(
        &self,
        plane: &didgate_cluster::ControlPlane,
    ) -> Result<(), StartError> {
        for bytes in plane
            .node_revocation_lists()
            .await
            .map_err(StartError::Cluster)?
        {
            if self.apply_node_revocations(&bytes) == crate::node::Stapled::RevokesThisNode {
                return Err(StartError::Node(crate::node::NodeError::Revoked));
            }
        }
        for (key, reason) in plane.revocations().await.map_err(StartError::Cluster)? {
            self.apply_cluster_revocation(&key, &reason).await;
        }
        // tables this node refuses fail its start: it would serve others than the cluster's
        if let Some(doc) = plane
            .current_document::<didgate_cluster::UpstreamsDocument>()
            .await
            .map_err(StartError::Cluster)?
        {
            self.apply_cluster_upstreams(&doc)
                .map_err(StartError::Upstreams)?;
        }
        if let Some(doc) = plane
            .current_document::<didgate_cluster::PolicyDocument>()
            .await
            .map_err(StartError::Cluster)?
        {
            self.apply_cluster_policy(&doc);
        }
        Ok(())
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// The upstreams in force (a call takes them when its stream opens).
    pub fn upstreams(&self) -> Arc<UpstreamSet> {
        self.upstreams
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The control plane, once joined.
    pub fn cluster(&self) -> Option<&Arc<didgate_cluster::ControlPlane>> {
        self.cluster.get()
    }

    /// Whether calls may be admitted now as far as the control plane goes: always for a
    /// gateway without `[cluster]`; for a clustered one, once joined and while etcd answers
    /// its keep-alives within a third of the lease (on a monotonic clock).
    pub(crate) fn control_plane_serving(&self) -> bool {
        if self.config.cluster().is_none() {
            return true;
        }
        self.cluster.get().is_some_and(|c| c.serving())
    }

    /// The node certificate, when this gateway is one node of a gateway DID.
    pub fn node(&self) -> Option<&crate::node::Node> {
        self.node.as_ref()
    }

    /// When a node stops taking calls: its certificate's end less the longest a call may
    /// still take (the upstream timeout and 10 s), so that every receipt it signs is covered
    /// by its certificate. `None` for a single node.
    pub fn node_drain_at_ms(&self) -> Option<u64> {
        let node = self.node.as_ref()?;
        let margin = self.config.upstream_timeout().as_millis() as u64 + 10_000;
        Some(node.certificate().not_after_ms.saturating_sub(margin))
    }

    /// What this node presents in its TLS certificate now: its certificate and the newest
    /// revocation list it holds (`None` for a single node).
    pub fn node_credentials(&self) -> Option<didgate_io::node::NodeCredentials> {
        let node = self.node.as_ref()?;
        let held = self
            .node_revocations
            .read()
            .unwrap_or_else(|p| p.into_inner());
        Some(didgate_io::node::NodeCredentials {
            certificate: node.credentials().certificate.clone(),
            revocations: held.as_ref().map(|(_, b)| b.clone()),
        })
    }

    /// The newest node revocation list this node holds, opened.
    pub fn node_revocation_list(&self) -> Option<didgate_protocol::node::NodeRevocations> {
        self.node_revocations
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(l, _)| l.clone())
    }

    /// Takes a node revocation list the cluster published when its gateway signed it and it is
    /// newer than the one held ([`crate::node::Stapled`]).
    pub fn apply_node_revocations(&self, bytes: &[u8]) -> crate::node::Stapled {
        use crate::node::Stapled;
        let Some(node) = &self.node else {
            return Stapled::Older;
        };
        let Ok(list) = didgate_protocol::node::NodeRevocations::open(bytes, node.gateway()) else {
            tracing::warn!(
                "a node revocation list in the cluster not signed by this node's gateway, ignored"
            );
            return Stapled::Older;
        };
        let mut held = self
            .node_revocations
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if held.as_ref().is_some_and(|(h, _)| h.seq >= list.seq) {
            return Stapled::Older;
        }
        // revoked at any time: this node stops now (a revocation dated later, say by a gateway
        // clock ahead of this one, must not leave it signing what clients will refuse)
        let revokes_self = list.revoked_from(node.certificate().serial).is_some();
        tracing::info!(seq = list.seq, "a newer node revocation list: stapled");
        *held = Some((list, bytes.to_vec()));
        if revokes_self {
            Stapled::RevokesThisNode
        } else {
            Stapled::Newer
        }
    }

    /// The node certificate's bytes, for what this gateway signs (absent for a single node).
    fn node_cert(&self) -> Option<Vec<u8>> {
        self.node
            .as_ref()
            .map(|n| n.credentials().certificate.clone())
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The gateway's chain.
    pub fn chain(&self) -> &Chain {
        &self.chain
    }

    /// Subscribes to the live events from now on ([`crate::events`]); a receiver that falls
    /// behind by more than [`crate::events::CAPACITY`] events misses the oldest.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// The Prometheus counters ([`crate::metrics`]).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Publishes an event built by `kind`, only when someone listens; never blocks or fails.
    pub(crate) fn emit(&self, kind: impl FnOnce() -> EventKind) {
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(Event::new(now_ms(), kind()));
        }
    }

    /// The policy set in force (calls already started keep theirs).
    pub fn policy(&self) -> Arc<PolicySet> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-reads `gateway.toml` (its policy parts: `policy_file`, `entities_file`, `[groups]`,
    /// `[[rule]]`) and the policy files, validates them, and swaps the policy set atomically:
    /// calls in flight finish under the set they started with. On any error the set in force
    /// stays. Returns the new set's hash.
    pub fn reload_policy(&self) -> Result<[u8; 32], PolicyError> {
        let d = DataDir::new(&self.dir);
        let config = Config::load(&d.config())?;
        let set = Arc::new(PolicySet::load(&self.dir, &config)?);
        let hash = set.hash();
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = set;
        tracing::info!(policy = %hex::encode(hash), "policy reloaded");
        self.metrics.policy_reloaded();
        self.emit(|| EventKind::PolicyReload {
            policy: hex::encode(hash),
        });
        Ok(hash)
    }

    /// [`Gateway::reload_policy`], then, in a cluster, publishes the policy so that every node
    /// compiles it and swaps it in ([`Gateway::apply_cluster_policy`]). Blocking file reads and
    /// compilation run off the async threads.
    pub async fn reload_policy_everywhere(self: &Arc<Self>) -> Result<[u8; 32], ReloadError> {
        let gw = self.clone();
        let reloaded = tokio::task::spawn_blocking(move || {
            let hash = gw.reload_policy()?;
            let doc = match gw.cluster.get() {
                Some(_) => {
                    let config = Config::load(&DataDir::new(&gw.dir).config())?;
                    Some(PolicySet::document(&gw.dir, &config)?)
                }
                None => None,
            };
            Ok::<_, PolicyError>((hash, doc))
        })
        .await
        .map_err(|e| ReloadError::Task(e.to_string()))?;
        let (hash, doc) = reloaded.map_err(ReloadError::Policy)?;
        if let (Some(plane), Some(doc)) = (self.cluster.get(), doc) {
            plane
                .publish_document(&doc)
                .await
                .map_err(ReloadError::Publish)?;
        }
        Ok(hash)
    }

    /// Re-reads the `[[upstream]]` tables of `gateway.toml`, checks them with the rest of the
    /// configuration in force (as at start), builds their HTTP clients, and swaps the set
    /// atomically: calls in flight finish with the upstreams they started with. On any error
    /// the set in force stays. Returns the tables it put in force.
    pub fn reload_upstreams(
        &self,
    ) -> Result<didgate_cluster::UpstreamsDocument, crate::upstreams::UpstreamSetError> {
        use crate::upstreams::UpstreamSetError;
        let path = DataDir::new(&self.dir).config();
        let raw = crate::config::RawConfig::read(&path)
            .map_err(|e| UpstreamSetError::Invalid(path.display().to_string(), Box::new(e)))?;
        let doc = UpstreamSet::document_of(raw.upstreams)?;
        let set = UpstreamSet::from_document(&self.config, &doc, None)?;
        self.swap_upstreams(set);
        Ok(doc)
    }

    /// Puts `set` in force unless it is the one in force already; `true` when it swapped.
    fn swap_upstreams(&self, set: UpstreamSet) -> bool {
        let hash = set.hash();
        {
            let mut current = self.upstreams.write().unwrap_or_else(|p| p.into_inner());
            if current.hash() == hash {
                return false;
            }
            *current = Arc::new(set);
        }
        tracing::info!(upstreams = %hex::encode(hash), "upstreams swapped in");
        true
    }

    /// [`Gateway::reload_upstreams`], then, in a cluster, publishes the tables so that every
    /// node checks them and swaps them in ([`Gateway::apply_cluster_upstreams`]).
    pub async fn reload_upstreams_everywhere(self: &Arc<Self>) -> Result<[u8; 32], ReloadError> {
        let gw = self.clone();
        let doc = tokio::task::spawn_blocking(move || gw.reload_upstreams())
            .await
            .map_err(|e| ReloadError::Task(e.to_string()))??;
        // the tables this reload read, not whatever the watch may have swapped in since
        if let Some(plane) = self.cluster.get() {
            plane
                .publish_document(&doc)
                .await
                .map_err(ReloadError::Publish)?;
        }
        Ok(didgate_cluster::Document::hash(&doc))
    }

    /// Swaps in the upstreams another node published, checked with this node's own
    /// configuration (nothing happens when they are the ones in force; tables that do not
    /// validate here, such as ones lacking an upstream a `[[rule]]` of this node names, are
    /// refused, logged, and the upstreams in force stay).
    pub fn apply_cluster_upstreams(
        &self,
        doc: &didgate_cluster::UpstreamsDocument,
    ) -> Result<(), crate::upstreams::UpstreamSetError> {
        // this node's own file, as it is now, says where its secrets may go
        let own = crate::config::RawConfig::read(&DataDir::new(&self.dir).config())
            .unwrap_or_else(|_| self.config.to_raw());
        match UpstreamSet::from_document(&self.config, doc, Some(&own)) {
            Ok(set) => {
                self.swap_upstreams(set);
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "the cluster's upstreams are refused on this node: the upstreams in force stay");
                Err(e)
            }
        }
    }

    /// Swaps in a policy another node published, compiled with this node's own `[groups]`
    /// (nothing happens when it is the one in force; one that does not compile here is
    /// refused, logged, and the policy in force stays).
    pub fn apply_cluster_policy(&self, doc: &didgate_cluster::PolicyDocument) {
        let set = match PolicySet::compile(
            &doc.source,
            &doc.text,
            self.config.groups(),
            doc.entities.as_deref(),
        ) {
            Ok(set) => set,
            Err(e) => {
                tracing::error!(error = %e, "the cluster's policy does not compile on this node: the policy in force stays");
                return;
            }
        };
        let hash = set.hash();
        {
            let mut current = self.policy.write().unwrap_or_else(|p| p.into_inner());
            if current.hash() == hash {
                return;
            }
            *current = Arc::new(set);
        }
        tracing::info!(policy = %hex::encode(hash), "policy from the cluster swapped in");
        self.metrics.policy_reloaded();
        self.emit(|| EventKind::PolicyReload {
            policy: hex::encode(hash),
        });
    }

    /// The cluster's secrets as this node sees them ([`crate::shared`]).
    pub fn shared(&self) -> &crate::shared::SharedSecrets {
        &self.shared
    }

    /// The secrets (lifecycle commands from the control socket, upkeep).
    pub fn secrets(&self) -> &Arc<Secrets> {
        &self.secrets
    }

    /// Resolves once no call is being handled on any connection.
    pub(crate) async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.inflight.load(std::sync::atomic::Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// How long a stream may take to deliver its first frame, and then its body
    /// (`frame_timeout_secs`): a stalled stream is refused and freed after this.
    pub(crate) fn frame_deadline(&self) -> Duration {
        self.config.frame_timeout()
    }

    /// Streams being handled now, over every connection (each with its policy snapshot
    /// taken).
    pub fn calls_in_flight(&self) -> usize {
        self.inflight.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The latest expiry of a grant this node issued that is neither consumed nor expired at
    /// `now`, if any: a cluster node that leaves serves their execution while it drains (no
    /// other node can execute them).
    pub(crate) fn pending_grants_until(&self, now: u64) -> Option<u64> {
        let store = self.chain.store();
        let issued = match store.scan(GRANTS, &[]) {
            Ok(kvs) => kvs,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the grants issued");
                return None;
            }
        };
        issued
            .into_iter()
            .filter_map(|(key, _)| {
                let expiry = u64::from_be_bytes(key.get(..8)?.try_into().ok()?);
                let id = key.get(9..)?;
                (key.get(8) == Some(&b'i') && expiry > now).then_some((expiry, id.to_vec()))
            })
            .filter(|(expiry, id)| {
                let consumed = call::deadline_key(*expiry, b'g', &[id]);
                !matches!(store.get(REPLAY, &consumed), Ok(Some(_)))
            })
            .map(|(expiry, _)| expiry)
            .max()
    }

    /// Whether the gateway is draining (calls in flight finish, new ones are refused).
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether this draining node still executes the grants it issued now: after a planned
    /// leave that handed over, until the deadline [`serve`] set.
    pub(crate) fn executes_grants_while_draining(&self) -> bool {
        now_ms() < self.grants_until.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The request window, ms: the clock skew a request may have plus the tolerance between
    /// nodes' clocks ([`NODE_CLOCK_TOLERANCE_MS`]).
    pub(crate) fn window_ms(&self) -> u64 {
        u64::try_from(self.config.skew().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(NODE_CLOCK_TOLERANCE_MS)
    }

    /// Whether `target` is revoked on this node (by this node, or by another node of its
    /// cluster once the revocation reached it).
    pub fn revoked(&self, target: &Revoke) -> bool {
        self.is_revoked(&revoke_key(target))
    }

    /// Whether `did` is revoked (the catalog answers a revoked DID with a refusal).
    pub(crate) fn did_revoked(&self, did: &Caller) -> bool {
        self.is_revoked(&revoked_did_key(did.as_str()))
    }

    fn is_revoked(&self, key: &[u8]) -> bool {
        self.revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(key)
    }

    /// Rate and concurrency limits for `stage` of the call to `up` ([`call::limit`]).
    fn limit(&self, cx: &mut Call, up: &Upstream, stage: Stage) -> Result<(), Refuse> {
        call::limit(
            cx,
            &self.limits,
            &self.config,
            up,
            stage,
            self.upstream_share(up, stage),
            self.limits.clock_ms(),
        )
    }

    /// In a cluster, this node's share of `up`'s per-upstream limits (its demand against the
    /// other members'), counting this call into its demand when it would take a token; 1
    /// elsewhere.
    fn upstream_share(&self, up: &Upstream, stage: Stage) -> f64 {
        let Some(plane) = self.cluster() else {
            return 1.0;
        };
        let g = self.config.gateway();
        let rate = up.rate_per_upstream().unwrap_or(g.rate_per_upstream);
        let rated = rate.is_limited();
        let slots = up
            .max_concurrent_per_upstream()
            .unwrap_or(g.max_concurrent_per_upstream);
        if !rated && slots == 0 {
            return 1.0;
        }
        // no node can use more than the whole limit: demands count up to it
        let cap = if rated && rate.per_sec > 0.0 {
            rate.per_sec
        } else if rated {
            rate.burst as f64
        } else {
            slots as f64
        };
        if stage != Stage::Execute {
            self.shares.count(up.name());
        }
        let me = &plane.settings().node;
        let others: Vec<String> = plane
            .route_members()
            .into_iter()
            .filter(|m| &m.node != me)
            .map(|m| m.node)
            .collect();
        self.shares.share(up.name(), &others, cap)
    }

    /// Checked again right before the upstream is called ([`call::still_allowed`]).
    fn still_allowed(&self, did: &Caller, grant: &[u8; 16]) -> Result<(), Refuse> {
        let revoked = self.revoked.read().unwrap_or_else(|p| p.into_inner());
        call::still_allowed(&revoked, did, grant)
    }

    /// A body read that failed because a revocation closed the connection is refused as
    /// `revoked`, which is why it failed.
    fn revoked_or(&self, peer: &Caller, r: Refuse) -> Refuse {
        if self.is_revoked(&revoked_did_key(peer.as_str())) {
            refuse(RefusalCode::Revoked, "this DID was revoked during the call")
        } else {
            r
        }
    }

    /// Revokes a DID or a grant: durable and audited (a `revocation` entry written in the same
    /// batch as the revocation record), effective for the next request and for calls in flight
    /// that have not reached the upstream; a revoked DID's open connections are closed.
    /// In a cluster it is then published to every node ([`Gateway::join_cluster`]).
    pub async fn revoke(&self, target: &Revoke, reason: &str) -> Result<EntryRef, RevokeError> {
        let entry = self.revoke_here(target, reason).await?;
        match (self.cluster.get(), self.config.cluster()) {
            (Some(plane), _) => plane
                .publish_revocation(&revoke_key(target), reason)
                .await
                .map_err(RevokeError::Publish)?,
            // a cluster member not serving (`didgated revoke` with no daemon): published all
            // the same, without joining
            (None, Some(settings)) => {
                let tls = settings.tls(&self.dir).map_err(RevokeError::Publish)?;
                didgate_cluster::ControlPlane::observe(settings.clone(), tls)
                    .await
                    .map_err(RevokeError::Publish)?
                    .publish_revocation(&revoke_key(target), reason)
                    .await
                    .map_err(RevokeError::Publish)?;
            }
            (None, None) => {}
        }
        Ok(entry)
    }

    /// Applies a revocation another node published (idempotent: one this node holds is
    /// skipped); audited in this node's chain like its own.
    pub async fn apply_cluster_revocation(&self, key: &[u8], reason: &str) {
        if self.is_revoked(key) {
            return;
        }
        let Some(target) = revoke_of_key(key) else {
            tracing::warn!(key = %hex::encode(key), "an unknown revocation key in the cluster, ignored");
            return;
        };
        // in force at once (refusing early is the safe side), then recorded in this chain
        self.revoked
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_vec());
        if let Err(e) = self.revoke_here(&target, reason).await {
            // still in force here (in memory): the next start reads it from etcd again
            tracing::error!(error = %e, ?target, "cannot record a revocation of the cluster");
        }
    }

    /// The revocation, on this node only.
    async fn revoke_here(&self, target: &Revoke, reason: &str) -> Result<EntryRef, AppendError> {
        let mut entry = Entry::new(EntryKind::Revocation, now_ms());
        entry.detail = Some(reason.to_string());
        match target {
            Revoke::Did(did) => entry.subject = Some(did.to_string()),
            Revoke::Grant(id) => entry.grant = Some(*id),
        }
        let key = revoke_key(target);
        let claims = vec![Claim {
            space: REVOKED,
            key: key.clone(),
            value: reason.as_bytes().to_vec(),
            rule: ClaimRule::Put,
        }];
        let appended = self.chain.append(Append { entry, claims }).await?;
        self.revoked
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key);
        if let Revoke::Did(did) = target {
            let mut open = Vec::new();
            {
                let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
                for list in conns.values_mut() {
                    list.retain(|(claimed, c)| {
                        let hit = claimed == did.as_str();
                        if hit {
                            open.push(c.clone());
                        }
                        !hit
                    });
                }
                conns.retain(|_, list| !list.is_empty());
            }
            for conn in open {
                conn.close(REVOKED_CLOSE.into(), b"revoked");
            }
        }
        tracing::warn!(?target, reason, "revoked");
        self.metrics.revoked(matches!(target, Revoke::Did(_)));
        self.emit(|| {
            let (did, grant) = match target {
                Revoke::Did(d) => (Some(d.to_string()), None),
                Revoke::Grant(g) => (None, Some(hex::encode(g))),
            };
            EventKind::Revocation {
                did,
                grant,
                reason: reason.to_string(),
            }
        });
        Ok(appended.entry)
    }

    /// Registers an open connection of `peer`, so revoking `peer` closes it. A revoked peer may
    /// still connect: each of its calls gets a signed, audited `revoked` refusal. Returns false
    /// (and registers nothing) when `peer` already holds `max_connections_per_did` open
    /// connections.
    pub(crate) fn register(&self, peer: &Caller, conn: &quinn::Connection) -> bool {
        let max = self.config.gateway().max_connections_per_did;
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let list = conns.entry(peer.key().as_str().to_string()).or_default();
        list.retain(|(_, c)| c.close_reason().is_none());
        if max > 0 && list.len() as u64 >= max {
            return false;
        }
        list.push((peer.as_str().to_string(), conn.clone()));
        true
    }

    pub(crate) fn unregister(&self, peer: &Caller, conn: &quinn::Connection) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let key = peer.key().as_str();
        if let Some(list) = conns.get_mut(key) {
            list.retain(|(_, c)| c.stable_id() != conn.stable_id() && c.close_reason().is_none());
            if list.is_empty() {
                conns.remove(key);
            }
        }
    }

    /// Closes executing entries left open by a crash, and prunes expired replay keys.
    async fn recover(&self) -> Result<(), StartError> {
        let mut open: HashMap<[u8; 32], (u64, Option<[u8; 32]>)> = HashMap::new();
        for item in self.chain.store().entries() {
            let (_, bytes) = item?;
            let Ok(e) = Entry::decode(&bytes) else {
                continue;
            };
            match (e.kind, e.call) {
                (EntryKind::Executing, Some(c)) => {
                    open.insert(c, (e.seq, e.policy));
                }
                (EntryKind::Executed | EntryKind::Failed | EntryKind::Abandoned, Some(c)) => {
                    open.remove(&c);
                }
                _ => {}
            }
        }
        let mut open: Vec<_> = open.into_iter().collect();
        open.sort_by_key(|(_, (seq, _))| *seq);
        for (call, (seq, policy)) in open {
            let mut e = Entry::new(EntryKind::Abandoned, now_ms());
            e.call = Some(call);
            e.policy = policy;
            e.detail = Some(format!(
                "outcome unknown: no closing entry was written for the executing entry at seq {seq} before the gateway stopped (a stop, a crash or a store failure); whether the upstream acted is not recorded"
            ));
            self.chain.append_entry(e).await?;
        }
        let now = now_ms();
        self.rekey_legacy_claims(now)?;
        self.prune_claims(now)?;
        Ok(())
    }

    /// Removes the claims whose deadline is before `now` (replay keys, consumed and issued
    /// grants): a range of each keyspace's head, in batches. From then on the store refuses a
    /// claim below that deadline (`Store::remove_before`), so a replay whose original was
    /// pruned while it waited for the writer is still refused. Run at start-up and every
    /// [`PRUNE_EVERY`] while serving.
    pub fn prune_claims(&self, now: u64) -> Result<usize, didgate_audit::store::StoreError> {
        let end = now.to_be_bytes();
        let store = self.chain.store();
        let mut total = 0;
        for space in [REPLAY, GRANTS] {
            loop {
                let n = store.remove_before(space, &end, PRUNE_BATCH)?;
                total += n;
                if n < PRUNE_BATCH {
                    break;
                }
            }
        }
        Ok(total)
    }

    /// Re-keys the claims a release before this one wrote (no deadline first): replay keys
    /// by the expiry in their value, issued grants by theirs; a consumed grant by its issued
    /// grant's expiry when there is one (a two-step grant), else it is dropped (a pipelined
    /// grant is consumed in the batch that mints it and never leaves the gateway).
    fn rekey_legacy_claims(&self, now: u64) -> Result<(), didgate_audit::store::StoreError> {
        let store = self.chain.store();
        let mut puts: Vec<(&str, Vec<u8>, Vec<u8>)> = Vec::new();
        let mut removes: Vec<(&str, Vec<u8>)> = Vec::new();
        for tag in [b'c', b'n'] {
            for (key, value) in store.scan(REPLAY, &[tag])? {
                let expiry = value
                    .get(..8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes);
                if let Some(expiry) = expiry
                    && expiry >= now
                {
                    puts.push((
                        REPLAY,
                        call::deadline_key(expiry, tag, &[&key[1..]]),
                        Vec::new(),
                    ));
                }
                removes.push((REPLAY, key));
            }
        }
        let issued_expiry = |id: &[u8]| -> Result<Option<u64>, didgate_audit::store::StoreError> {
            Ok(store
                .get(GRANTS, &[b"i".as_slice(), id].concat())?
                .and_then(|b| didgate_protocol::cbor::from_slice::<IssuedGrant>(&b).ok())
                .map(|i| i.expires_ms))
        };
        for (key, value) in store.scan(GRANTS, b"c")? {
            if let Some(expiry) = issued_expiry(&key[1..])?
                && expiry >= now
            {
                puts.push((
                    REPLAY,
                    call::deadline_key(expiry, b'g', &[&key[1..]]),
                    value,
                ));
            }
            removes.push((GRANTS, key));
        }
        for (key, value) in store.scan(GRANTS, b"i")? {
            if let Some(i) = didgate_protocol::cbor::from_slice::<IssuedGrant>(&value).ok()
                && i.expires_ms >= now
            {
                puts.push((
                    GRANTS,
                    call::deadline_key(i.expires_ms, b'i', &[&key[1..]]),
                    value,
                ));
            }
            removes.push((GRANTS, key));
        }
        if !removes.is_empty() {
            tracing::info!(
                kept = puts.len(),
                dropped = removes.len() - puts.len(),
                "re-keyed the replay and grant claims of an earlier release by deadline"
            );
            for chunk in removes.chunks(PRUNE_BATCH) {
                store.write(&[], chunk)?;
            }
            store.write(&puts, &[])?;
        }
        Ok(())
    }

    /// The checks before any state changes ([`call::admit`]) at the current time; the
    /// request's own time is judged only when `judge_time` (not for a grant being executed).
    fn admit(
        &self,
        cx: &mut Call,
        req: &Signed<Request>,
        judge_time: bool,
    ) -> Result<Arc<Upstream>, Refuse> {
        let span = tracing::Span::current();
        span.record(
            "call",
            tracing::field::display(hex::encode(req.envelope().digest())),
        );
        span.record(
            "upstream",
            tracing::field::display(req.message().upstream.as_str()),
        );
        // still the home, at the time the request's clock is judged (not for a grant being
        // executed: only its issuer can)
        // one clock for the home's mark and the request's clock check
        let now = now_ms();
        let routed = if judge_time {
            self.route_caller(cx, Some((req.message().time_ms, now)))
                .err()
        } else {
            None
        };
        let revoked = self.revoked.read().unwrap_or_else(|p| p.into_inner());
        let upstreams = cx.upstreams.clone();
        let gate = Gate {
            routed: routed.as_ref(),
            control_plane: self.control_plane_serving(),
            did: &self.served,
            config: &self.config,
            upstreams: &upstreams,
            revoked: &revoked,
        };
        call::admit(&gate, cx, req, now, judge_time)
    }

    fn sign_refusal(
        &self,
        version: Version,
        call: Option<[u8; 32]>,
        code: RefusalCode,
        reason: &str,
        entry: Option<EntryRef>,
        home: Option<Home>,
    ) -> Vec<u8> {
        let mut refusal = call::refusal(version, call, code, reason, entry, now_ms());
        refusal.node_cert = self.node_cert();
        if refusal.code == RefusalCode::Moved {
            refusal.home = home;
        }
        refusal.sign(&self.identity)
    }

    /// In a cluster, where a call that opens with a frame of `kind` (payload `first`) belongs
    /// (specs/operation.md, "Home nodes"): a request or a grant request goes to its caller's
    /// home node, judged by the TLS peer's DID before anything is opened; a grant presented
    /// for execution goes to the node that signed it, if that node is a member (else it is
    /// refused here as any grant this node did not sign). `Err` with the home when the call
    /// belongs elsewhere; on this node, records the caller's handover window in `cx`.
    pub(crate) fn route(
        &self,
        cx: &mut Call,
        kind: FrameType,
        first: &[u8],
    ) -> Result<(), Result<Home, Refuse>> {
        let Some(plane) = self.cluster() else {
            return Ok(());
        };
        let moved = |m: didgate_cluster::Member| {
            Err(Ok(Home {
                node: m.key,
                addr: m.address,
            }))
        };
        match kind {
            FrameType::Request | FrameType::GrantRequest => {
                self.route_caller(cx, None).map_err(|r| match r.home {
                    Some(home) => Ok(home),
                    None => Err(r),
                })
            }
            FrameType::Execute => {
                let Ok(v) = didgate_protocol::envelope::verify(
                    first,
                    didgate_protocol::envelope::Kind::Grant,
                ) else {
                    return Ok(());
                };
                let signer = v.signer().as_str();
                if signer == self.identity.did().as_str() {
                    return Ok(());
                }
                if let Some(m) = plane.route_members().into_iter().find(|m| m.key == signer) {
                    return moved(m);
                }
                // a node that left on purpose serves its grants' execution while it drains,
                // until they expire
                let live = message::open_from::<GrantBody>(first, v.signer())
                    .is_ok_and(|g| g.message().expires_ms > now_ms());
                match plane.left_member(signer) {
                    Some(m) if live => moved(m),
                    _ => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    /// In a cluster, whether this node is the caller's home now; records the caller's
    /// handover window in `cx` ([`didgate_cluster::Route`]). Judged when the stream's first
    /// frame is read, and again at admission, at the time the request's clock is judged: a
    /// node that stopped being the home in between (a did:web's document fetched meanwhile,
    /// say) admits nothing. At admission, `stamp` is the request's time and the time it is
    /// judged at: when this node is home the request's time is remembered for the handover
    /// of a planned leave ([`didgate_cluster::ControlPlane::route_admit`]).
    pub(crate) fn route_caller(
        &self,
        cx: &mut Call,
        stamp: Option<(u64, u64)>,
    ) -> Result<(), Refuse> {
        let Some(plane) = self.cluster() else {
            return Ok(());
        };
        let (route, rev) = match stamp {
            Some((at, now)) => plane.route_admit(cx.peer.as_str(), at, now),
            None => plane.route_at(cx.peer.as_str()),
        };
        match route {
            didgate_cluster::Route::Here { fence_ms } => {
                cx.fence_ms = fence_ms;
                cx.home_rev = u64::try_from(rev).ok();
                Ok(())
            }
            didgate_cluster::Route::Moved(m) => Err(call::moved(Home {
                node: m.key,
                addr: m.address,
            })),
            didgate_cluster::Route::Unknown => Err(refuse(
                RefusalCode::ControlPlaneUnavailable,
                "this node does not know the cluster's members",
            )),
        }
    }

    /// Sends the caller to its home node: a `moved` refusal naming it, counted in the
    /// aggregate (nothing was opened or claimed in the caller's name here).
    pub(crate) async fn refuse_moved(
        &self,
        cx: &mut Call,
        send: &mut quinn::SendStream,
        home: Home,
    ) {
        // a leaving node sends callers on once its member key is gone (their next home would
        // send them back before)
        if let Some(plane) = self.cluster() {
            plane.settled().await;
        }
        let reason = call::moved(home.clone()).reason;
        self.refuse_unverified_to(cx, send, RefusalCode::Moved, &reason, Some(home))
            .await;
    }

    /// Audits a refusal: one entry for a principal policy knows, else counted into the
    /// window's aggregate. Returns the entry when one was written.
    pub(crate) async fn audit_refusal(
        &self,
        cx: &Call,
        req: Option<&Signed<Request>>,
        code: RefusalCode,
        reason: &str,
    ) -> Result<Option<EntryRef>, AppendError> {
        match req {
            Some(r)
                if call::recorded_individually(cx, r)
                    && self
                        .refusal_budget
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .admit(cx.peer.as_str(), r.envelope().digest(), now_ms()) =>
            {
                let mut e = Entry::new(EntryKind::Refused, now_ms());
                e.policy = Some(cx.policy_hash());
                e.call = Some(r.envelope().digest());
                e.signed = Some(r.bytes().to_vec());
                e.subject = Some(r.envelope().principal().to_string());
                e.did_doc = cx.did_doc();
                e.peer_head = Some(r.message().head);
                e.code = Some(code.as_str().into());
                e.detail = Some(reason.into());
                let append = Append {
                    entry: e,
                    claims: call::document_claim(cx).into_iter().collect(),
                };
                Ok(Some(self.chain.append(append).await?.entry))
            }
            _ => {
                if self.count_refusal(code) {
                    self.flush_refusals().await?;
                }
                Ok(None)
            }
        }
    }

    /// Counts a refusal into the window's aggregate entry; true when the window is due to be
    /// written (the caller writes it, or the timer of [`crate::server::serve`] does).
    pub(crate) fn count_refusal(&self, code: RefusalCode) -> bool {
        let mut agg = self.aggregate.lock().unwrap_or_else(|p| p.into_inner());
        if agg.counts.is_empty() {
            agg.since_ms = now_ms();
        }
        *agg.counts.entry(code).or_default() += 1;
        u128::from(now_ms().saturating_sub(agg.since_ms))
            >= self.config.refusal_window().as_millis()
    }

    /// Writes the aggregate refusal entry for the current window, if it counted any. When it
    /// returns, every refusal counted before the call is in a durable entry (a flush already
    /// under way, such as the periodic one, is waited for).
    pub async fn flush_refusals(&self) -> Result<(), AppendError> {
        let _flushing = self.flushing.lock().await;
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
            "refusals counted, not recorded one by one, since {} (principals policy does not know, requests not signed by the connection's peer, input refused before a signature was checked, connections over the per-DID limit, new connections over the per-address limits)",
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

    /// Refuses before any signature verified: counted in the aggregate, answered signed.
    pub(crate) async fn refuse_unverified(
        &self,
        cx: &mut Call,
        send: &mut quinn::SendStream,
        code: RefusalCode,
        reason: &str,
    ) {
        self.refuse_unverified_to(cx, send, code, reason, None)
            .await;
    }

    /// [`Gateway::refuse_unverified`], naming the caller's `home` in a `moved` refusal.
    async fn refuse_unverified_to(
        &self,
        cx: &mut Call,
        send: &mut quinn::SendStream,
        code: RefusalCode,
        reason: &str,
        home: Option<Home>,
    ) {
        let (code, reason, home) = match self.audit_refusal(cx, None, code, reason).await {
            Ok(_) => (code, reason, home),
            Err(_) => (RefusalCode::AuditUnavailable, call::AUDIT_UNAVAILABLE, None),
        };
        self.emit(|| EventKind::Refusal {
            did: Some(cx.peer.to_string()),
            code,
            reason: reason.to_string(),
            call: None,
            upstream: None,
            method: None,
            path: None,
        });
        self.send_refusal(cx, send, None, code, reason, None, home)
            .await;
    }

    /// The current document of a did:web caller, checked to list the caller's TLS key for
    /// authentication, and recorded for the call's entries; `None` for a did:key caller. A
    /// did:web that no policy names exactly is refused without a fetch.
    pub(crate) async fn web_document(
        &self,
        cx: &mut Call,
    ) -> Result<Option<Arc<DidDocument>>, Refuse> {
        let peer = &cx.peer;
        let Principal::Web(did) = peer.principal() else {
            return Ok(None);
        };
        let unresolved = |why: String| refuse(RefusalCode::DidUnresolved, why);
        // only a did:web the policy set names exactly (host, port and path) is ever fetched:
        // a caller cannot make the gateway fetch paths or ports of a named host it picks
        if !cx.policy.knows(did.as_str()) {
            return Err(unresolved(format!("no policy names {did}")));
        }
        let doc = self.resolver.resolve(did, peer.key()).await.map_err(|e| {
            // the document server's answer (its status, its errors) stays in the
            // operator's log: a caller could otherwise probe that host's paths
            tracing::info!(%did, error = %e, "a did:web document is not usable");
            unresolved(format!(
                "the DID document of {did} cannot be fetched or read (the gateway's log says why)"
            ))
        })?;
        if !doc.lists_key(peer.key()) {
            return Err(unresolved(
                "the DID document does not list this key for authentication".into(),
            ));
        }
        cx.document = Some(doc.clone());
        Ok(Some(doc))
    }

    /// Opens signed request bytes of `peer`: a did:web `kid` must name a verification method
    /// of the caller's document that holds the caller's key.
    fn open_as(
        peer: &Caller,
        doc: Option<&DidDocument>,
        bytes: &[u8],
    ) -> Result<Signed<Request>, message::OpenError> {
        message::open_full::<Request>(bytes, Some(peer.key()), |web, fragment| {
            doc.filter(|d| d.did() == web && d.authenticates(fragment, peer.key()))
                .map(|_| peer.key().clone())
        })
    }

    /// Verifies a signed request, or refuses it.
    async fn open_request(
        &self,
        cx: &mut Call,
        send: &mut quinn::SendStream,
        bytes: &[u8],
    ) -> Option<Signed<Request>> {
        let doc = match self.web_document(cx).await {
            Ok(doc) => doc,
            Err(r) => {
                self.refuse_unverified(cx, send, r.code, &r.reason).await;
                return None;
            }
        };
        let opened = Self::open_as(&cx.peer, doc.as_deref(), bytes);
        let refused = match &opened {
            Ok(r) => call::version_mismatch(cx, "request", r.message().v)
                .map(|why| (RefusalCode::Malformed, why)),
            Err(e) => Some((
                call::refusal_for_open(e),
                format!("bad request envelope: {e}"),
            )),
        };
        match (opened, refused) {
            (Ok(r), None) => Some(r),
            (_, Some((code, why))) => {
                self.refuse_unverified(cx, send, code, &why).await;
                None
            }
            (Err(_), None) => None,
        }
    }

    /// Reads the body, whole and capped, and checks it against the signed length and digest.
    /// A read cut off by a revocation of `peer` is refused `revoked`, which is why it failed.
    async fn read_checked_body(
        &self,
        peer: &Caller,
        recv: &mut quinn::RecvStream,
        dec: &mut FrameDecoder,
        req: &Request,
    ) -> Result<Vec<u8>, Refuse> {
        let deadline = self.frame_deadline();
        let failed = match tokio::time::timeout(deadline, read_body(recv, dec, req.body_len)).await
        {
            Ok(Some(b)) if *blake3::hash(&b).as_bytes() == req.body_b3 => return Ok(b),
            Err(_) => refuse(
                RefusalCode::BodyMismatch,
                format!("the body did not arrive within {}s", deadline.as_secs()),
            ),
            _ => refuse(
                RefusalCode::BodyMismatch,
                "body does not match its signed length and digest",
            ),
        };
        Err(self.revoked_or(peer, failed))
    }

    /// A fresh grant for the verified request ([`call::mint`]).
    /// A node's grant never outlives its certificate: its expiry is at most the certificate's
    /// last millisecond, and it carries the certificate.
    fn mint(&self, cx: &Call, req: &Signed<Request>) -> GrantBody {
        let mut grant = call::mint(
            cx,
            self.config.grant_ttl().as_secs(),
            req,
            now_ms(),
            rand::random(),
        );
        if let Some(node) = &self.node {
            let last = node.certificate().not_after_ms.saturating_sub(1);
            grant.expires_ms = grant.expires_ms.min(last);
            grant.node_cert = Some(node.credentials().certificate.clone());
        }
        grant
    }

    /// Appends the entry with its claims in one durable batch, or refuses: a failed claim maps
    /// to its refusal through `conflict`. Returns whether the call may proceed.
    async fn commit(
        &self,
        cx: &mut Call,
        send: &mut quinn::SendStream,
        req: &Signed<Request>,
        append: Append,
        conflict: impl Fn(usize) -> Refuse,
    ) -> bool {
        match self.chain.append(append).await {
            Ok(_) => true,
            Err(AppendError::Conflict { index }) => {
                self.refuse_audited(cx, send, req, conflict(index)).await;
                false
            }
            Err(why) => {
                // the cause (a full disk, an I/O error) is the operator's: the log has it, the
                // caller gets the fact
                tracing::error!(%why, "audit store unavailable: refusing calls");
                let reason = call::AUDIT_UNAVAILABLE.to_string();
                self.emit_refusal(cx, req, RefusalCode::AuditUnavailable, &reason);
                self.send_refusal(
                    cx,
                    send,
                    Some(req.envelope().digest()),
                    RefusalCode::AuditUnavailable,
                    &reason,
                    None,
                    None,
                )
                .await;
                false
            }
        }
    }

    /// The pipelined path: request, grant and execution in one round trip.
    pub(crate) async fn pipelined(
        &self,
        cx: &mut Call,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        mut dec: FrameDecoder,
        bytes: &[u8],
    ) {
        let Some(req) = self.open_request(cx, &mut send, bytes).await else {
            return;
        };
        let up = match self.admit(cx, &req, true) {
            Ok(up) => up,
            Err(r) => return self.refuse_audited(cx, &mut send, &req, r).await,
        };
        if let Err(r) = self.limit(cx, &up, Stage::Call) {
            return self.refuse_audited(cx, &mut send, &req, r).await;
        }
        let peer = cx.peer.clone();
        let body = match self
            .read_checked_body(&peer, &mut recv, &mut dec, req.message())
            .await
        {
            Ok(b) => b,
            Err(r) => return self.refuse_audited(cx, &mut send, &req, r).await,
        };
        // the window is judged again now that the body is read: its replay keys are pruned
        // once it closed (plus a margin), so a request must be claimed within it
        if let Err(r) = call::still_in_window(req.message(), self.config.skew(), now_ms()) {
            return self.refuse_audited(cx, &mut send, &req, r).await;
        }
        let grant = self.mint(cx, &req);
        let mut claims = call::request_claims(cx, self.config.skew(), &req);
        claims.push(call::consumed_grant_claim(&grant));
        let entry = call::request_entry(EntryKind::Executing, cx, &req, grant.id, now_ms());
        if !self
            .commit(
                cx,
                &mut send,
                &req,
                Append { entry, claims },
                request_conflict,
            )
            .await
        {
            return;
        }
        // The grant is consumed (durably, with its entry): execute it once, and close the entry
        // whatever happens.
        self.metrics.grant_consumed(Flow::Pipelined);
        self.execute(cx, &mut send, &req, &up, grant, body).await;
    }

    /// Two-step flow, first step: checks the request and returns a signed grant for its exact
    /// scope; nothing is executed.
    pub(crate) async fn issue_grant(
        &self,
        cx: &mut Call,
        mut send: quinn::SendStream,
        bytes: &[u8],
    ) {
        let Some(req) = self.open_request(cx, &mut send, bytes).await else {
            return;
        };
        let admitted = self.admit(cx, &req, true);
        if let Err(r) = admitted.and_then(|up| self.limit(cx, &up, Stage::Grant)) {
            return self.refuse_audited(cx, &mut send, &req, r).await;
        }
        let grant = self.mint(cx, &req);
        let signed = grant.sign(&self.identity);
        let mut claims = call::request_claims(cx, self.config.skew(), &req);
        let issued = IssuedGrant {
            request: req.bytes().to_vec(),
            expires_ms: grant.expires_ms,
        };
        claims.push(Claim {
            space: GRANTS,
            key: call::issued_grant_key(&grant),
            value: didgate_protocol::cbor::to_vec(&issued),
            rule: ClaimRule::Absent,
        });
        let mut entry = call::request_entry(EntryKind::Granted, cx, &req, grant.id, now_ms());
        entry.detail = Some(format!("expires at {} ms", grant.expires_ms));
        if !self
            .commit(
                cx,
                &mut send,
                &req,
                Append { entry, claims },
                request_conflict,
            )
            .await
        {
            return;
        }
        self.metrics.grant_issued();
        self.emit(|| EventKind::Grant {
            did: cx.peer.to_string(),
            grant: hex::encode(grant.id),
            call: hex::encode(grant.call),
            upstream: grant.upstream.clone(),
            method: grant.method.clone(),
            path: grant.path.clone(),
            expires_ms: grant.expires_ms,
        });
        tracing::Span::current().record("outcome", "grant");
        let _ = wire::write_frame(&mut send, FrameType::Grant, &signed).await;
        let _ = send.finish();
        let _ = send.stopped().await;
    }

    /// Two-step flow, second step: the caller presents the signed grant once, with the body.
    pub(crate) async fn execute_grant(
        &self,
        cx: &mut Call,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        mut dec: FrameDecoder,
        bytes: &[u8],
    ) {
        let grant = match message::open_from::<GrantBody>(bytes, self.identity.did()) {
            Ok(g) => g.into_message(),
            Err(_) => {
                return self
                    .refuse_unverified(
                        cx,
                        &mut send,
                        RefusalCode::GrantInvalid,
                        "not a grant signed by this gateway",
                    )
                    .await;
            }
        };
        let issued = self
            .chain
            .store()
            .get(GRANTS, &call::issued_grant_key(&grant))
            .ok()
            .flatten()
            .and_then(|b| didgate_protocol::cbor::from_slice::<IssuedGrant>(&b).ok());
        let doc = match self.web_document(cx).await {
            Ok(doc) => doc,
            Err(r) => {
                return self
                    .refuse_unverified(cx, &mut send, r.code, &r.reason)
                    .await;
            }
        };
        let peer = cx.peer.clone();
        let req = match issued.map(|i| Self::open_as(&peer, doc.as_deref(), &i.request)) {
            Some(Ok(r))
                if grant.subject == peer.as_str() && r.envelope().digest() == grant.call =>
            {
                r
            }
            _ => {
                return self
                    .refuse_unverified(
                        cx,
                        &mut send,
                        RefusalCode::GrantInvalid,
                        "the grant was not issued to this caller",
                    )
                    .await;
            }
        };
        if grant.v != cx.version.as_u64() || req.message().v != cx.version.as_u64() {
            // a grant is executed in the version it was asked for (so raising
            // min_client_version also retires the grants older clients hold)
            let why = format!(
                "a version {} grant on a protocol version {} connection",
                grant.v, cx.version
            );
            return self
                .refuse_unverified(cx, &mut send, RefusalCode::Malformed, &why)
                .await;
        }
        if now_ms() >= grant.expires_ms {
            return self
                .refuse_audited(
                    cx,
                    &mut send,
                    &req,
                    refuse(RefusalCode::GrantExpired, "the grant has expired"),
                )
                .await;
        }
        // Policy and revocation are checked again: either may have changed since the grant.
        let up = match self
            .admit(cx, &req, false)
            .and_then(|up| self.still_allowed(&peer, &grant.id).map(|()| up))
        {
            Ok(up) => up,
            Err(r) => return self.refuse_audited(cx, &mut send, &req, r).await,
        };
        if let Err(r) = self.limit(cx, &up, Stage::Execute) {
            return self.refuse_audited(cx, &mut send, &req, r).await;
        }
        let body = match self
            .read_checked_body(&peer, &mut recv, &mut dec, req.message())
            .await
        {
            Ok(b) => b,
            Err(r) => return self.refuse_audited(cx, &mut send, &req, r).await,
        };
        // judged again now that the body is read: the consumed-grant claim is pruned once the
        // grant expired (plus a margin), so it must be claimed before
        if now_ms() >= grant.expires_ms {
            let r = refuse(
                RefusalCode::GrantExpired,
                "the grant expired while its body was read",
            );
            return self.refuse_audited(cx, &mut send, &req, r).await;
        }
        let claims = vec![call::consumed_grant_claim(&grant)];
        let entry = call::request_entry(EntryKind::Executing, cx, &req, grant.id, now_ms());
        if !self
            .commit(
                cx,
                &mut send,
                &req,
                Append { entry, claims },
                call::grant_used,
            )
            .await
        {
            return;
        }
        self.metrics.grant_consumed(Flow::TwoStep);
        self.execute(cx, &mut send, &req, &up, grant, body).await;
    }

    /// Executes a consumed grant once: opens the secret, calls the upstream, relays the
    /// response ([`Gateway::relay`]), and closes the executing entry whatever happens.
    async fn execute(
        &self,
        cx: &mut Call,
        send: &mut quinn::SendStream,
        req: &Signed<Request>,
        up: &Upstream,
        grant: GrantBody,
        body: Vec<u8>,
    ) {
        let call = grant.call;
        if let Err(r) = self.still_allowed(&req.envelope().caller(), &grant.id) {
            return self.close_failed(cx, send, call, r.code, &r.reason).await;
        }
        let (used, secret) = match self.secret(up.secret()) {
            Ok(s) => s,
            Err((code, why)) => return self.close_failed(cx, send, call, code, &why).await,
        };
        // the forms of the credential the response is scanned for, zeroized with the call
        let needles = echo::Needles::new(&secret, up.auth());
        let idem = hex::encode(grant.id);
        let sent = upstream::send(
            cx.upstreams.client(up.name()),
            up,
            req.message(),
            body,
            secret,
            &idem,
        )
        .await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) => {
                return self
                    .close_failed(cx, send, call, RefusalCode::UpstreamFailed, &e.to_string())
                    .await;
            }
        };
        match self.relay(cx, send, req, up, &needles, resp).await {
            Ok(relayed) => {
                self.close_executed(cx, send, req, up, &grant, used, relayed)
                    .await;
            }
            Err(Stopped::Failed(code, cause, _)) => {
                self.close_failed(cx, send, call, code, &cause).await;
            }
            Err(Stopped::Echo(count, place)) => {
                self.echo_failed(cx, send, req, up, count, place).await;
            }
        }
    }

    /// Relays the upstream's response: the head (headers filtered and scanned for the
    /// credential), then the body as it streams, scanned and redacted, within
    /// `max_response_bytes`; the body's last byte is withheld (see [`Relayed::held`]).
    async fn relay(
        &self,
        cx: &Call,
        send: &mut quinn::SendStream,
        req: &Signed<Request>,
        up: &Upstream,
        needles: &echo::Needles,
        resp: reqwest::Response,
    ) -> Result<Relayed, Stopped> {
        // 0 = unlimited
        let max_resp = up
            .max_response_bytes()
            .unwrap_or(self.config.gateway().max_response_bytes);
        let encoding = resp.headers().get(reqwest::header::CONTENT_ENCODING);
        let decoding = echo::Decoding::for_header(encoding.map(|v| v.as_bytes())).map_err(|coding| {
            Stopped::Failed(
                RefusalCode::UpstreamFailed,
                format!(
                    "the upstream answered with content-encoding {coding:?}, which the gateway cannot scan for the credential"
                ),
                0,
            )
        })?;
        if max_resp > 0
            && decoding.is_identity()
            && resp.content_length().is_some_and(|n| n > max_resp)
        {
            return Err(Stopped::Failed(
                RefusalCode::ResponseTooLarge,
                format!("the upstream response declares more than max_response_bytes ({max_resp})"),
                0,
            ));
        }
        let status = resp.status().as_u16();
        let (names, mut values): (Vec<String>, Vec<Vec<u8>>) = resp
            .headers()
            .iter()
            .filter(|(k, _)| {
                !canonical::FORBIDDEN_HEADERS.contains(&k.as_str())
                    && k.as_str() != "set-cookie"
                    // relayed decoded
                    && (decoding.is_identity() || *k != reqwest::header::CONTENT_ENCODING)
            })
            .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
            .unzip();
        let echoes = needles.redact_all(&mut values);
        let headers = names
            .into_iter()
            .zip(values)
            .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
            .collect();
        if echoes > 0 && up.on_secret_echo() == EchoAction::Fail {
            return Err(Stopped::Echo(echoes, "a response header"));
        }
        let head = ResponseHead {
            v: cx.version.as_u64(),
            status,
            headers,
        };
        let filter = echo::BodyFilter::new(decoding, needles, max_resp);
        let body = if wire::write_frame(send, FrameType::Head, &head.encode())
            .await
            .is_err()
        {
            Err(Stopped::Failed(
                RefusalCode::UpstreamFailed,
                "client gone before the response head".into(),
                echoes,
            ))
        } else {
            relay_body(send, up, resp, filter, max_resp, status, echoes).await
        };
        let echoes = match &body {
            Ok(Relayed { echoes, .. }) | Err(Stopped::Failed(_, _, echoes)) => *echoes,
            Err(Stopped::Echo(..)) => 0,
        };
        if echoes > 0 {
            self.note_echo(req, up, req.envelope().digest(), echoes, "redacted");
        }
        body
    }

    /// Closes a call whose response was relayed: the `executed` entry (durable before the
    /// withheld end and the receipt are sent), or, if it cannot be written, the `failed` entry
    /// the chain owes and a refusal.
    #[allow(clippy::too_many_arguments)] // the call's parts, each needed once
    async fn close_executed(
        &self,
        cx: &mut Call,
        send: &mut quinn::SendStream,
        req: &Signed<Request>,
        up: &Upstream,
        grant: &GrantBody,
        used: crate::secrets::SecretUse,
        relayed: Relayed,
    ) {
        let call = grant.call;
        let e = call::executed_entry(cx, call, &relayed, (used.id, used.version), now_ms());
        let Relayed {
            status, len, held, ..
        } = relayed;
        let closing = match self.chain.append_entry(e).await {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(%e, "cannot close an executing entry");
                // What happened, for the record, once the store takes writes again: the
                // upstream answered, the caller got all but the withheld end and a refusal.
                let mut close = Entry::new(EntryKind::Failed, now_ms());
                close.call = Some(call);
                close.code = Some(RefusalCode::AuditUnavailable.as_str().into());
                close.policy = Some(cx.policy_hash());
                close.detail = Some(format!(
                    "the upstream answered {status}; the closing entry could not be written, so the caller got {} of the {len} response bytes (the end withheld) and audit_unavailable",
                    len - u64::from(held.is_some())
                ));
                self.chain.owe(close);
                let unavailable = call::AUDIT_UNAVAILABLE;
                self.emit_failed(cx, call, RefusalCode::AuditUnavailable, unavailable);
                return self
                    .send_refusal(
                        cx,
                        send,
                        Some(call),
                        RefusalCode::AuditUnavailable,
                        unavailable,
                        None,
                        None,
                    )
                    .await;
            }
        };
        let elapsed = cx.started.elapsed();
        self.metrics.executed(up.name(), status, elapsed);
        self.emit(|| EventKind::Access {
            did: req.envelope().signer().to_string(),
            upstream: up.name().to_string(),
            method: req.message().method.clone(),
            path: up.policy_path(&req.message().path).into_owned(),
            status,
            call: hex::encode(call),
            grant: hex::encode(grant.id),
            resp_len: len,
            latency_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
        });
        let mut receipt = call::receipt(cx, req, grant, &relayed, closing, now_ms());
        receipt.node_cert = self.node_cert();
        cx.release_permit();
        if let Some(last) = held {
            // the end of the body, now that its closing entry is durable
            let _ = wire::write_frame(send, FrameType::Body, &[last]).await;
        }
        tracing::Span::current().record("outcome", "receipt");
        let _ = wire::write_frame(send, FrameType::Receipt, &receipt.sign(&self.identity)).await;
        let _ = send.finish();
        let _ = send.stopped().await;
    }

    /// Counts and announces the credential found in a call's response (metrics, event).
    fn note_echo(
        &self,
        req: &Signed<Request>,
        up: &Upstream,
        call: [u8; 32],
        count: u64,
        action: &str,
    ) {
        tracing::warn!(upstream = %up.name(), count, action, "the upstream response held the call's credential");
        self.metrics.secret_echo(up.name(), count);
        self.emit(|| EventKind::SecretEcho {
            did: req.envelope().signer().to_string(),
            upstream: up.name().to_string(),
            call: hex::encode(call),
            count,
            action: action.into(),
        });
    }

    /// Fails a call whose response held the credential (`on_secret_echo = "fail"`).
    async fn echo_failed(
        &self,
        cx: &mut Call,
        send: &mut quinn::SendStream,
        req: &Signed<Request>,
        up: &Upstream,
        count: u64,
        place: &str,
    ) {
        let call = req.envelope().digest();
        self.note_echo(req, up, call, count, "failed");
        let why = format!(
            "the upstream's response echoed the call's credential in {place} ({count} occurrence(s)); this upstream fails such calls"
        );
        self.close_failed(cx, send, call, RefusalCode::UpstreamFailed, &why)
            .await
    }

    fn secret(
        &self,
        name: &str,
    ) -> Result<(crate::secrets::SecretUse, zeroize::Zeroizing<String>), (RefusalCode, String)>
    {
        // the current version, only if enabled; the use is remembered for `secret list`
        self.secrets.open_for_call(name, now_ms()).map_err(|e| {
            // the caller learns which secret and in what state, never the operator's store,
            // KMS or file errors (the log has them)
            use crate::kms::KmsError;
            use crate::secrets::SecretError;
            match e {
                SecretError::NotFound(_)
                | SecretError::Unavailable(..)
                | SecretError::Malformed(_) => (RefusalCode::SecretUnavailable, e.to_string()),
                SecretError::Kms(KmsError::Unavailable(why)) => {
                    tracing::error!(secret = name, error = %why, "the KMS is unavailable");
                    (
                        RefusalCode::KmsUnavailable,
                        format!("secret {name} cannot be opened: the gateway's KMS is unavailable"),
                    )
                }
                other => {
                    tracing::error!(secret = name, error = %other, "cannot open a secret for a call");
                    (
                        RefusalCode::SecretUnavailable,
                        format!("secret {name} cannot be opened now"),
                    )
                }
            }
        })
    }

    async fn close_failed(
        &self,
        cx: &mut Call,
        send: &mut quinn::SendStream,
        call: [u8; 32],
        code: RefusalCode,
        cause: &str,
    ) {
        let mut e = Entry::new(EntryKind::Failed, now_ms());
        e.call = Some(call);
        e.code = Some(code.as_str().into());
        e.detail = Some(cause.into());
        e.policy = Some(cx.policy_hash());
        let (code, cause, entry) = match self.chain.append_entry(e).await {
            Ok(a) => (code, cause, Some(a.entry)),
            Err(why) => {
                tracing::error!(%why, "cannot close an executing entry");
                (RefusalCode::AuditUnavailable, call::AUDIT_UNAVAILABLE, None)
            }
        };
        self.emit_failed(cx, call, code, cause);
        self.send_refusal(cx, send, Some(call), code, cause, entry, None)
            .await
    }

    async fn refuse_audited(
        &self,
        cx: &mut Call,
        send: &mut quinn::SendStream,
        req: &Signed<Request>,
        r: Refuse,
    ) {
        let call = Some(req.envelope().digest());
        // `moved` is routing, not a decision: counted, as when it is sent before the request
        // is opened
        let recorded = (r.code != RefusalCode::Moved).then_some(req);
        let audited = self.audit_refusal(cx, recorded, r.code, &r.reason).await;
        let (code, reason, entry, home) = match audited {
            Ok(entry) => (r.code, r.reason.as_str(), entry, r.home),
            Err(_) => (
                RefusalCode::AuditUnavailable,
                call::AUDIT_UNAVAILABLE,
                None,
                None,
            ),
        };
        self.emit_refusal(cx, req, code, reason);
        self.send_refusal(cx, send, call, code, reason, entry, home)
            .await
    }

    /// Publishes a [`EventKind::Refusal`] of a verified request.
    fn emit_refusal(&self, cx: &Call, req: &Signed<Request>, code: RefusalCode, reason: &str) {
        self.emit(|| EventKind::Refusal {
            did: Some(cx.peer.to_string()),
            code,
            reason: reason.to_string(),
            call: Some(hex::encode(req.envelope().digest())),
            upstream: Some(req.message().upstream.clone()),
            method: Some(req.message().method.clone()),
            path: Some(req.message().path.clone()),
        });
    }

    /// Publishes a [`EventKind::Failed`]: a call whose grant was consumed closed without a
    /// receipt.
    fn emit_failed(&self, cx: &Call, call: [u8; 32], code: RefusalCode, cause: &str) {
        self.emit(|| {
            let elapsed = cx.started.elapsed();
            EventKind::Failed {
                did: Some(cx.peer.to_string()),
                call: hex::encode(call),
                code,
                cause: cause.to_string(),
                latency_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            }
        });
    }

    /// Answers the stream with a signed refusal (naming `home` in a `moved` one) and closes
    /// it; the caller has audited the refusal already. Frees the call's concurrency permit.
    #[allow(clippy::too_many_arguments)]
    async fn send_refusal(
        &self,
        cx: &mut Call,
        send: &mut quinn::SendStream,
        call: Option<[u8; 32]>,
        code: RefusalCode,
        reason: &str,
        entry: Option<EntryRef>,
        home: Option<Home>,
    ) {
        cx.release_permit();
        self.metrics.refused(code);
        tracing::Span::current().record("outcome", code.as_str());
        let bytes = self.sign_refusal(cx.version, call, code, reason, entry, home);
        let _ = wire::write_frame(send, FrameType::Refusal, &bytes).await;
        let _ = send.finish();
        let _ = send.stopped().await;
    }
}

/// Why relaying a response stopped before its end.
enum Stopped {
    /// The call fails with this code and cause, after this many occurrences of the credential
    /// were redacted.
    Failed(RefusalCode, String, u64),
    /// The response echoed the credential (this many times, in this place) and the upstream
    /// fails such calls.
    Echo(u64, &'static str),
}

/// Relays the body as it streams: each chunk decoded, scanned, redacted and framed; the end
/// of the body is withheld (the last byte of a body whose end the gateway sees with its final
/// chunk: the declared Content-Length reached, or the end already there when the gateway looks
/// right after the chunk). The head had `status` and `echoes`.
async fn relay_body(
    send: &mut quinn::SendStream,
    up: &Upstream,
    mut stream: reqwest::Response,
    mut filter: echo::BodyFilter<'_>,
    max_resp: u64,
    status: u16,
    echoes: u64,
) -> Result<Relayed, Stopped> {
    let mut hasher = blake3::Hasher::new();
    let mut len = 0u64;
    let too_large = |len: u64| {
        format!(
            "the upstream response exceeds max_response_bytes ({max_resp}) after {len} bytes relayed"
        )
    };
    let mut ended = false;
    let mut next = None;
    let mut held: Option<u8> = None;
    // the length the upstream declared, in coded bytes: its last byte is the end
    let declared = stream.content_length();
    let mut received = 0u64;
    // a stop, with the echoes redacted so far
    let stop = |code, cause, filter: &echo::BodyFilter<'_>| {
        Err(Stopped::Failed(code, cause, echoes + filter.hits()))
    };
    while !ended {
        let got = match next.take() {
            Some(got) => got,
            None => stream.chunk().await,
        };
        let chunk = match got {
            Ok(Some(chunk)) => {
                received += chunk.len() as u64;
                if declared == Some(received) {
                    ended = true;
                } else {
                    // is the end already here? (a poll that finds nothing consumes nothing)
                    match futures_util::FutureExt::now_or_never(stream.chunk()) {
                        Some(Ok(None)) => ended = true,
                        peeked => next = peeked,
                    }
                }
                chunk
            }
            Ok(None) => {
                ended = true;
                bytes::Bytes::new()
            }
            Err(e) => {
                let why = upstream::describe(&e.without_url());
                return stop(
                    RefusalCode::UpstreamFailed,
                    format!("upstream body: {why}"),
                    &filter,
                );
            }
        };
        let mut out = match filter.push(&chunk, ended) {
            Ok(out) => out,
            Err(echo::DecodeFailure::TooLarge) => {
                return stop(RefusalCode::ResponseTooLarge, too_large(len), &filter);
            }
            Err(e) => return stop(RefusalCode::UpstreamFailed, e.to_string(), &filter),
        };
        if filter.hits() > 0 && up.on_secret_echo() == EchoAction::Fail {
            // nothing of what held it is relayed
            return Err(Stopped::Echo(echoes + filter.hits(), "the response body"));
        }
        hasher.update(&out);
        len += out.len() as u64;
        if ended {
            held = out.pop();
        }
        if out.is_empty() {
            continue;
        }
        let mut frames = BytesMut::new();
        frame::encode_chunks(&out, &mut frames);
        if send.write_all(&frames).await.is_err() {
            let cause = "client gone mid-stream".into();
            return stop(RefusalCode::UpstreamFailed, cause, &filter);
        }
    }
    Ok(Relayed {
        status,
        len,
        resp_b3: *hasher.finalize().as_bytes(),
        held,
        echoes: echoes + filter.hits(),
    })
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

/// QUIC application close code for a connection of a revoked DID.
pub const REVOKED_CLOSE: u32 = 2;
/// QUIC application close code for a connection beyond `max_connections_per_did`.
pub const CONN_LIMIT_CLOSE: u32 = 3;
pub use didgate_protocol::DRAINED_CLOSE;

/// Before when (wall clock, ms) an earlier run of this node may have admitted requests that a
/// replay of could still pass the clock check: just past the latest deadline of a request
/// replay key in `store` (the request's time plus the skew of that run; 0 for none; the
/// keyspace is pruned as the keys expire). Grant keys, behind which it may sit, are read past:
/// at most the grants consumed within the last `grant_ttl`. A store that cannot be read is
/// taken to need the whole `window` (ms) from now.
fn unmarked_until(store: &Store, window: u64) -> u64 {
    match store.last_key_where(REPLAY, |k| k.get(8) == Some(&b'n')) {
        Ok(Some(key)) => key
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, |b| u64::from_be_bytes(b).saturating_add(1)),
        Ok(None) => 0,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the replay keys: a handover waits the whole window");
            now_ms().saturating_add(window)
        }
    }
}

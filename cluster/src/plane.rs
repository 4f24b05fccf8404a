//! A node's connection to etcd (specs/operation.md, "Cluster"): its membership under a lease
//! kept alive in the background, the health that follows from the keep-alives answered, the
//! revocations it publishes and the ones it watches.
//!
//! One endpoint is used at a time, in the order configured; when a request to it fails or
//! times out, the node moves to the next (a client balancing over every endpoint kept sending
//! to a killed member: issue 23's measurements).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use tokio::sync::{Mutex, watch};

use crate::health::Health;
use crate::home::{Handover, Homes, Route};
use crate::{ClusterSettings, Document, EtcdTls, keys};

/// Why the control plane could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// etcd refused or failed a request.
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    /// No endpoint answered within the bound.
    #[error("no etcd endpoint answered within {0:?}")]
    Unreachable(Duration),
    /// A file `[cluster]` names cannot be read.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A member's value in etcd is not a member.
    #[error("member {key}: {source}")]
    Member {
        /// Its key.
        key: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// A member of the cluster as it is registered in etcd (JSON, under its lease).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// The node's name.
    pub node: String,
    /// The node's key (its did:key).
    pub key: String,
    /// The gateway DID it serves (its own key's for a node without a node certificate).
    /// Callers have homes among the members serving the same gateway ([`crate::home`]); a
    /// member registered before this field existed serves none.
    #[serde(default)]
    pub gateway: String,
    /// Where it serves (UDP).
    pub address: String,
    /// Its lease id.
    pub lease: i64,
    /// The lease's time to live, seconds: the member disappears this long after its last
    /// answered keep-alive.
    pub lease_ttl_secs: u64,
    /// When it joined (ms since the epoch).
    pub joined_ms: u64,
}

/// A node's control plane: membership, health, revocations.
pub struct ControlPlane {
    settings: ClusterSettings,
    tls: Option<etcd_client::TlsOptions>,
    health: Arc<Health>,
    /// The endpoint in use (an index into `settings.endpoints`).
    endpoint: AtomicUsize,
    client: Mutex<Option<Client>>,
    lease: AtomicI64,
    member: Member,
    stop: watch::Sender<bool>,
    /// The memberships read, for the callers' homes ([`ControlPlane::route`]); `None` until
    /// [`ControlPlane::start_homes`], and the etcd revision of the last one applied.
    homes: std::sync::Mutex<(Option<Homes>, i64)>,
    /// Set once this node withdrew from the membership ([`ControlPlane::withdraw`]): it is not
    /// registered again.
    withdrawn: std::sync::atomic::AtomicBool,
    /// Set once a withdrawal's handover is published (or failed): [`ControlPlane::settled`].
    handed_over: watch::Sender<bool>,
    /// Set while a node registered again under a new lease has not started its homes over
    /// ([`ControlPlane::restart_homes`]): its keep-alives do not count until then.
    rejoining: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("cluster", &self.settings.name)
            .field("node", &self.settings.node)
            .field("lease", &self.lease())
            .finish_non_exhaustive()
    }
}

/// Every value of `kvs` as JSON of `T`.
fn parse_all<T: serde::de::DeserializeOwned>(
    kvs: &[etcd_client::KeyValue],
) -> Result<Vec<T>, ClusterError> {
    kvs.iter()
        .map(|kv| {
            serde_json::from_slice(kv.value()).map_err(|source| ClusterError::Member {
                key: String::from_utf8_lossy(kv.key()).into_owned(),
                source,
            })
        })
        .collect()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Milliseconds on a monotonic clock (since the first call in this process): health is judged
/// on it, so a wall clock stepped back or forward neither prolongs nor cuts short the bound.
pub fn monotonic_ms() -> u64 {
    static BASE: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(std::time::Instant::now);
    u64::try_from(base.elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl ControlPlane {
    /// Joins the cluster as `key` serving at `address`: connects, grants a lease, registers
    /// the member under it, and keeps it alive in the background until [`ControlPlane::leave`].
    pub async fn join(
        settings: ClusterSettings,
        tls: Option<EtcdTls>,
        key: String,
        gateway: String,
        address: SocketAddr,
    ) -> Result<Arc<Self>, ClusterError> {
        let plane = Self::new(settings, tls, key, gateway, address.to_string());
        plane.register().await?;
        plane.health.answered(monotonic_ms());
        let stop = plane.stop.subscribe();
        tokio::spawn(plane.clone().keep_alive(stop));
        Ok(plane)
    }

    /// Connects to the cluster's etcd without joining it (no lease, no member key, no
    /// background task): to read the registry (`didgated export --cluster`). Fails when no
    /// endpoint answers.
    pub async fn observe(
        settings: ClusterSettings,
        tls: Option<EtcdTls>,
    ) -> Result<Arc<Self>, ClusterError> {
        let plane = Self::new(settings, tls, String::new(), String::new(), String::new());
        plane.client().await?;
        Ok(plane)
    }

    fn new(
        settings: ClusterSettings,
        tls: Option<EtcdTls>,
        key: String,
        gateway: String,
        address: String,
    ) -> Arc<Self> {
        let tls = tls.map(|t| {
            let mut o = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(&t.ca_pem));
            if let Some((cert, key)) = &t.identity {
                o = o.identity(etcd_client::Identity::from_pem(cert, key.as_slice()));
            }
            o
        });
        let ttl_ms = settings.lease_ttl_secs * 1000;
        let health = Arc::new(Health::new(ttl_ms, monotonic_ms()));
        let member = Member {
            node: settings.node.clone(),
            key,
            gateway,
            address,
            lease: 0,
            lease_ttl_secs: settings.lease_ttl_secs,
            joined_ms: now_ms(),
        };
        Arc::new(Self {
            settings,
            tls,
            health,
            endpoint: AtomicUsize::new(0),
            client: Mutex::new(None),
            lease: AtomicI64::new(0),
            member,
            stop: watch::channel(false).0,
            homes: std::sync::Mutex::new((None, 0)),
            withdrawn: std::sync::atomic::AtomicBool::new(false),
            handed_over: watch::channel(false).0,
            rejoining: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &ClusterSettings {
        &self.settings
    }

    /// Whether this node may serve now ([`Health::serving`] on the [`monotonic_ms`] clock).
    pub fn serving(&self) -> bool {
        self.health.serving(monotonic_ms())
    }

    /// The health record.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// The lease this node is registered under.
    pub fn lease(&self) -> i64 {
        self.lease.load(Ordering::Acquire)
    }

    /// How long one request may take before the node moves to the next endpoint.
    fn request_bound(&self) -> Duration {
        Duration::from_millis(self.health.bound_ms().max(300))
    }

    /// The client of the endpoint in use, connecting if there is none; on failure the next
    /// endpoint is tried, each once.
    async fn client(&self) -> Result<Client, ClusterError> {
        let mut held = self.client.lock().await;
        if let Some(c) = held.as_ref() {
            return Ok(c.clone());
        }
        let n = self.settings.endpoints.len();
        let bound = self.request_bound();
        // require_leader: a member cut off from the others fails requests and cancels watches
        // instead of serving a stale view (a watch there would go silent)
        let mut options = ConnectOptions::new()
            .with_connect_timeout(bound)
            .with_timeout(bound)
            .with_keep_alive(bound, bound)
            .with_require_leader(true);
        if let Some(tls) = &self.tls {
            options = options.with_tls(tls.clone());
        }
        let mut last = None;
        for _ in 0..n {
            let i = self.endpoint.load(Ordering::Acquire) % n;
            let ep = &self.settings.endpoints[i];
            match tokio::time::timeout(bound, Client::connect([ep], Some(options.clone()))).await {
                Ok(Ok(c)) => {
                    *held = Some(c.clone());
                    return Ok(c);
                }
                Ok(Err(e)) => last = Some(ClusterError::Etcd(e)),
                Err(_) => last = Some(ClusterError::Unreachable(bound)),
            }
            self.endpoint.store(i + 1, Ordering::Release);
        }
        Err(last.unwrap_or(ClusterError::Unreachable(bound)))
    }

    /// Drops the connection in use and moves to the next endpoint (after a failed request).
    async fn failed(&self) {
        let mut held = self.client.lock().await;
        if held.take().is_some() {
            self.endpoint.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Runs `f` with the client in use, within the request bound; a failure moves to the next
    /// endpoint for the next request.
    async fn with_client<T, F, Fut>(&self, f: F) -> Result<T, ClusterError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let bound = self.request_bound();
        let client = self.client().await?;
        match tokio::time::timeout(bound, f(client)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.failed().await;
                Err(ClusterError::Etcd(e))
            }
            Err(_) => {
                self.failed().await;
                Err(ClusterError::Unreachable(bound))
            }
        }
    }

    /// Grants a lease and puts this member under it.
    async fn register(&self) -> Result<(), ClusterError> {
        let ttl = i64::try_from(self.settings.lease_ttl_secs).unwrap_or(i64::MAX);
        let lease = self
            .with_client(|mut c| async move { c.lease_grant(ttl, None).await })
            .await?
            .id();
        let mut member = self.member.clone();
        member.lease = lease;
        let value = serde_json::to_vec(&member).map_err(|source| ClusterError::Member {
            key: member.node.clone(),
            source,
        })?;
        let key = keys::member(&self.settings.name, &self.settings.node);
        self.with_client(|mut c| async move {
            c.put(key, value, Some(PutOptions::new().with_lease(lease)))
                .await
        })
        .await?;
        self.lease.store(lease, Ordering::Release);
        Ok(())
    }

    /// One keep-alive of the lease: its remaining TTL (0 when it expired).
    async fn keep_alive_once(&self) -> Result<i64, ClusterError> {
        let lease = self.lease();
        self.with_client(|mut c| async move {
            let (mut keeper, mut stream) = match c.lease_keep_alive(lease).await {
                Ok(k) => k,
                // etcd-client reports an answer with TTL 0 (the lease expired or was revoked)
                // as an error: ask etcd whether the lease is still there
                Err(etcd_client::Error::LeaseKeepAliveError(e)) => {
                    let left = c.lease_time_to_live(lease, None).await?.ttl();
                    if left <= 0 {
                        return Ok(0);
                    }
                    return Err(etcd_client::Error::LeaseKeepAliveError(e));
                }
                Err(e) => return Err(e),
            };
            keeper.keep_alive().await?;
            Ok(stream.message().await?.map_or(0, |r| r.ttl()))
        })
        .await
    }

    /// The keep-alive loop: every sixth of the TTL; an answer with the lease alive marks the
    /// node healthy; an expired lease is registered again.
    async fn keep_alive(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let every = Duration::from_millis((self.settings.lease_ttl_secs * 1000 / 6).max(100));
        let mut tick = tokio::time::interval(every);
        loop {
            if *stop.borrow() {
                return;
            }
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            match self.keep_alive_once().await {
                // the members read after the keep-alive: a node that serves has a view of
                // the membership no older than its health bound ([`crate::home`])
                Ok(ttl) if ttl > 0 => {
                    let rejoined = if self.rejoining.load(Ordering::Acquire) {
                        self.restart_homes().await
                    } else {
                        Ok(())
                    };
                    match rejoined.and(self.refresh_members().await) {
                        Ok(()) => self.health.answered(monotonic_ms()),
                        Err(e) => tracing::warn!(error = %e, "cannot read the cluster's members"),
                    }
                }
                Ok(_) if self.withdrawn.load(Ordering::Acquire) => {}
                Ok(_) => match self.register_again().await {
                    Ok(()) => {
                        tracing::warn!(
                            lease = self.lease(),
                            "the cluster lease had expired: registered again"
                        );
                        self.health.answered(monotonic_ms());
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot register in the cluster again"),
                },
                Err(e) => tracing::warn!(error = %e, "cluster keep-alive unanswered"),
            }
        }
    }

    /// The members registered now.
    pub async fn members(&self) -> Result<Vec<Member>, ClusterError> {
        self.get_prefix(keys::members(&self.settings.name))
            .await?
            .into_iter()
            .map(|(key, value, _)| {
                serde_json::from_slice(&value).map_err(|source| ClusterError::Member {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    source,
                })
            })
            .collect()
    }

    /// The members registered now, the handovers of members that left on purpose, and the
    /// etcd revision of that read (one transaction: a member's delete and its handover are
    /// seen together).
    async fn members_at(&self) -> Result<(Vec<Member>, Vec<Handover>, i64), ClusterError> {
        let members = keys::members(&self.settings.name);
        let handovers = keys::handovers(&self.settings.name);
        let resp = self
            .with_client(|mut c| async move {
                c.txn(Txn::new().and_then([
                    TxnOp::get(members, Some(GetOptions::new().with_prefix())),
                    TxnOp::get(handovers, Some(GetOptions::new().with_prefix())),
                ]))
                .await
            })
            .await?;
        let rev = resp.header().map_or(0, |h| h.revision());
        let mut gets = resp.op_responses().into_iter().filter_map(|op| match op {
            etcd_client::TxnOpResponse::Get(g) => Some(g),
            _ => None,
        });
        let (Some(m), Some(h)) = (gets.next(), gets.next()) else {
            return Err(ClusterError::Unreachable(self.request_bound()));
        };
        let members: Vec<Member> = parse_all(m.kvs())?;
        // a handover that does not decode is treated as absent (its node's callers wait the
        // whole window); it never stops the read of the members
        let handovers: Vec<Handover> = h
            .kvs()
            .iter()
            .filter_map(|kv| match serde_json::from_slice(kv.value()) {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::warn!(key = %String::from_utf8_lossy(kv.key()), error = %e, "a handover that does not decode: ignored");
                    None
                }
            })
            .collect();
        Ok((members, handovers, rev))
    }

    /// The members serving this node's gateway, the handovers of those that left, and the etcd
    /// revision of that read: the nodes a caller of this gateway may have as its home.
    async fn peers_at(&self) -> Result<(Vec<Member>, Vec<Handover>, i64), ClusterError> {
        let (mut members, handovers, rev) = self.members_at().await?;
        members.retain(|m| m.gateway == self.member.gateway);
        Ok((members, handovers, rev))
    }

    /// Reads the members and applies them to the homes (a read older than the one applied is
    /// dropped).
    async fn refresh_members(&self) -> Result<(), ClusterError> {
        let (members, handovers, rev) = self.peers_at().await?;
        let mut held = self.homes.lock().unwrap_or_else(|p| p.into_inner());
        if rev >= held.1 {
            held.1 = rev;
            if let Some(h) = held.0.as_mut() {
                h.apply(members, &handovers, now_ms());
            }
        }
        Ok(())
    }

    /// Registers again after the lease expired, then starts the homes over from the members
    /// read now ([`Homes::rejoined`]): while this node was not a member, others may have
    /// claimed its callers' requests.
    async fn register_again(&self) -> Result<(), ClusterError> {
        self.register().await?;
        if self.withdrawn.load(Ordering::Acquire) {
            // withdrawn meanwhile: the new registration goes at once
            let lease = self.lease();
            self.with_client(|mut c| async move { c.lease_revoke(lease).await })
                .await?;
            return Ok(());
        }
        // until the homes start over, the keep-alives of the new lease do not count: the node
        // must not serve on the homes of its old membership
        self.rejoining.store(true, Ordering::Release);
        self.restart_homes().await
    }

    /// Starts the homes over from the members read now ([`Homes::rejoined`]), after a new
    /// lease; clears the rejoining mark. A read older than the view held is read again.
    async fn restart_homes(&self) -> Result<(), ClusterError> {
        for _ in 0..3 {
            let (members, _, rev) = self.peers_at().await?;
            // any other node's chain in the registry (of any gateway sharing the cluster: the
            // plane cannot tell whose) may have been its callers' home meanwhile; a registry
            // that cannot be read is read again at the next keep-alive (the node does not serve
            // meanwhile)
            let others_served = self
                .checkpoints()
                .await?
                .iter()
                .any(|(n, _)| n != &self.settings.node);
            let mut held = self.homes.lock().unwrap_or_else(|p| p.into_inner());
            if rev < held.1 {
                continue;
            }
            if let Some(h) = held.0.as_ref() {
                held.0 = Some(h.rejoined(members, others_served, now_ms()));
            }
            held.1 = rev;
            self.rejoining.store(false, Ordering::Release);
            return Ok(());
        }
        Err(ClusterError::Unreachable(self.request_bound()))
    }

    /// Starts keeping the callers' homes with the members registered now
    /// ([`Homes::new`]: `window_ms` is the request window, `others_served` whether another
    /// node ever served in this cluster; [`Homes::unmarked`]: `unmarked_ms`, before which an
    /// earlier run of this node may have admitted requests), then follows every change of the
    /// membership until [`ControlPlane::leave`] (besides the read after each keep-alive).
    pub async fn start_homes(
        self: &Arc<Self>,
        window_ms: u64,
        others_served: bool,
        unmarked_ms: u64,
    ) -> Result<tokio::task::JoinHandle<()>, ClusterError> {
        let (members, _, rev) = self.peers_at().await?;
        {
            let mut held = self.homes.lock().unwrap_or_else(|p| p.into_inner());
            *held = (
                Some(
                    Homes::new(
                        &self.settings.node,
                        self.settings.lease_ttl_secs * 1000,
                        window_ms,
                        members,
                        others_served,
                        now_ms(),
                    )
                    .unmarked(unmarked_ms),
                ),
                rev,
            );
        }
        // any put or delete under members/ is read again in full
        let plane = self.clone();
        let prefix = keys::members(&self.settings.name);
        let changed = Arc::new(tokio::sync::Notify::new());
        let notify = changed.clone();
        let watch = self.watch_prefix_events(prefix, move || notify.notify_one());
        let mut stop = self.stop.subscribe();
        Ok(tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = changed.notified() => {
                        if let Err(e) = plane.refresh_members().await {
                            tracing::warn!(error = %e, "cannot read the cluster's members");
                        }
                    }
                    _ = stop.changed() => break,
                }
            }
            let _ = watch.await;
        }))
    }

    /// Where a call of the caller `did` belongs now ([`Homes::route`]); [`Route::Unknown`]
    /// before [`ControlPlane::start_homes`].
    pub fn route(&self, did: &str) -> Route {
        self.route_at(did).0
    }

    /// [`ControlPlane::route`], and the etcd revision as of which this node read the members
    /// it judged by (0 before any read).
    pub fn route_at(&self, did: &str) -> (Route, i64) {
        let held = self.homes.lock().unwrap_or_else(|p| p.into_inner());
        (self.route_held(&held, did), held.1)
    }

    fn route_held(&self, held: &(Option<Homes>, i64), did: &str) -> Route {
        held.0
            .as_ref()
            .map_or(Route::Unknown, |h| h.route(did, now_ms()))
    }

    /// [`ControlPlane::route_at`] for a request of `did` stamped at `stamp_ms`, judged at
    /// admission at `now_ms` (the time the request's clock is judged against), before anything
    /// is claimed: when this node is home, the stamp is remembered for the handover of a
    /// planned leave ([`Homes::admit`]).
    pub fn route_admit(&self, did: &str, stamp_ms: u64, now_ms: u64) -> (Route, i64) {
        let mut held = self.homes.lock().unwrap_or_else(|p| p.into_inner());
        let rev = held.1;
        let route = held
            .0
            .as_mut()
            .map_or(Route::Unknown, |h| h.admit(did, stamp_ms, now_ms));
        (route, rev)
    }

    /// A member that left recently, by its key ([`Homes::left_member`]).
    pub fn left_member(&self, key: &str) -> Option<Member> {
        let held = self.homes.lock().unwrap_or_else(|p| p.into_inner());
        held.0
            .as_ref()
            .and_then(|h| h.left_member(key, now_ms()))
            .cloned()
    }

    /// The members of the current view ([`ControlPlane::route`]).
    pub fn route_members(&self) -> Vec<Member> {
        let held = self.homes.lock().unwrap_or_else(|p| p.into_inner());
        held.0
            .as_ref()
            .map_or_else(Vec::new, |h| h.members().to_vec())
    }

    /// Withdraws this node from the membership before it stops (a planned leave): it admits
    /// nothing more ([`Homes::leave`]), then deletes its member key and puts its handover
    /// ([`Handover`], on a lease of its own that outlives its fences) in one transaction, so
    /// every node, this one included, sends its callers to their new homes, which refuse only
    /// the requests stamped at or before what this node admitted. The member lease stays alive
    /// until [`ControlPlane::leave`], so the node still serves the calls in flight. If the
    /// transaction fails, the lease is revoked: the member goes without a handover, and its
    /// callers' new homes wait out the whole window. The handover says the node executes the
    /// grants it issued until `grants_until_ms` (0: not at all). `Ok(true)` when the handover
    /// was published, `Ok(false)` when the member went without one.
    pub async fn withdraw(&self, grants_until_ms: u64) -> Result<bool, ClusterError> {
        let (lease, left) = {
            let mut held = self.homes.lock().unwrap_or_else(|p| p.into_inner());
            self.withdrawn.store(true, Ordering::Release);
            // read after `withdrawn` is set: a registration again in flight either stored its
            // lease before (this handover names it) or sees `withdrawn` after (and revokes it)
            let lease = self.lease();
            let left = held
                .0
                .as_mut()
                .map(|h| (h.leave(lease, grants_until_ms, now_ms()), h.window_ms()));
            (lease, left)
        };
        let key = keys::member(&self.settings.name, &self.settings.node);
        let left_some = left.is_some();
        let handed = match left {
            Some((handover, window_ms)) => self.hand_over(&key, &handover, window_ms).await,
            None => self
                .with_client(|mut c| async move { c.delete(key, None).await })
                .await
                .map(|_| ()),
        };
        let gone = match (handed, left_some) {
            (Ok(()), handed) => Ok(handed),
            // the member key must go, or peers keep sending callers back here: with the lease
            (Err(e), _) => {
                tracing::warn!(error = %e, "cannot hand over: the member goes with its lease (its callers wait the clock window)");
                self.with_client(|mut c| async move { c.lease_revoke(lease).await })
                    .await
                    .map(|_| false)
                    .map_err(|_| e)
            }
        };
        self.handed_over.send_replace(true);
        let handed = gone?;
        // this node's own view (it sends callers on by its members without itself already)
        if let Err(e) = self.refresh_members().await {
            tracing::warn!(error = %e, "cannot read the cluster's members after leaving them");
        }
        Ok(handed)
    }

    /// Returns once this node's member key is gone, if it is withdrawing
    /// ([`ControlPlane::withdraw`]; at most ten etcd request bounds): a caller sent on before
    /// then would find its next home still sending it back here.
    pub async fn settled(&self) {
        if !self.withdrawn.load(Ordering::Acquire) {
            return;
        }
        // withdraw always says when it is done; the bound is a guard against a bug, not a wait
        let mut done = self.handed_over.subscribe();
        let _ = tokio::time::timeout(self.request_bound() * 10, done.wait_for(|d| *d)).await;
    }

    /// Deletes the member key `key` and puts `handover` in one transaction; the handover's
    /// lease lasts until its latest fence is out of the clock window (`window_ms`), its grants'
    /// deadline, and at least as long as the other nodes remember this membership (the lease
    /// TTL plus twice the window: a node whose watch lags still reads it).
    async fn hand_over(
        &self,
        key: &str,
        handover: &Handover,
        window_ms: u64,
    ) -> Result<(), ClusterError> {
        let remembered = now_ms()
            .saturating_add(self.settings.lease_ttl_secs.saturating_mul(1000))
            .saturating_add(window_ms.saturating_mul(2));
        let until = handover
            .latest()
            .saturating_add(window_ms)
            .max(handover.grants_until_ms)
            .max(remembered);
        let ttl = i64::try_from(until.saturating_sub(now_ms()).div_ceil(1000))
            .unwrap_or(i64::MAX)
            .max(1);
        let lease = self
            .with_client(|mut c| async move { c.lease_grant(ttl, None).await })
            .await?
            .id();
        let value = serde_json::to_vec(handover).map_err(|source| ClusterError::Member {
            key: key.to_string(),
            source,
        })?;
        let put = TxnOp::put(
            keys::handover(&self.settings.name, &self.settings.node),
            value,
            Some(PutOptions::new().with_lease(lease)),
        );
        let delete = TxnOp::delete(key, None);
        self.with_client(|mut c| {
            let ops = [put.clone(), delete.clone()];
            async move { c.txn(Txn::new().and_then(ops)).await }
        })
        .await?;
        Ok(())
    }

    /// Publishes this node's demand ([`crate::shares::Load`]) under its lease: it goes with
    /// the node.
    pub async fn publish_load(&self, load: &crate::shares::Load) -> Result<(), ClusterError> {
        let value = serde_json::to_vec(load).map_err(|source| ClusterError::Member {
            key: self.settings.node.clone(),
            source,
        })?;
        let key = keys::load(&self.settings.name, &self.settings.node);
        let lease = self.lease();
        self.with_client(|mut c| async move {
            c.put(key, value, Some(PutOptions::new().with_lease(lease)))
                .await
        })
        .await
        .map(|_| ())
    }

    /// Applies every other node's published demand now and each one published from then on
    /// with `apply(node, load)` ([`ControlPlane::watch_prefix`]); values that do not decode
    /// are skipped.
    pub fn watch_loads<F>(self: &Arc<Self>, apply: F) -> tokio::task::JoinHandle<()>
    where
        F: Fn(String, crate::shares::Load) + Send + Sync + 'static,
    {
        let prefix = keys::loads(&self.settings.name);
        let own = self.settings.node.clone();
        let p = prefix.clone();
        self.watch_prefix(prefix, move |k, v, _| {
            let Some(node) = k.strip_prefix(p.as_bytes()) else {
                return;
            };
            let node = String::from_utf8_lossy(node).into_owned();
            if node == own {
                return;
            }
            if let Ok(load) = serde_json::from_slice(v) {
                apply(node, load);
            }
        })
    }

    /// Publishes a revocation (the gateway's revocation key and its reason) to every node.
    pub async fn publish_revocation(&self, key: &[u8], reason: &str) -> Result<(), ClusterError> {
        self.put(
            keys::revocation(&self.settings.name, key),
            reason.as_bytes(),
        )
        .await
    }

    /// Applies every revocation in etcd now and from then on with `apply(key, reason)`, until
    /// [`ControlPlane::leave`] ([`ControlPlane::watch_prefix`]). `apply` must be idempotent.
    pub fn watch_revocations<F>(self: &Arc<Self>, apply: F) -> tokio::task::JoinHandle<()>
    where
        F: Fn(Vec<u8>, String) + Send + Sync + 'static,
    {
        let name = self.settings.name.clone();
        self.watch_prefix(keys::revocations(&name), move |key, value, _| {
            if let Some(k) = keys::revocation_key(&name, key) {
                apply(k, String::from_utf8_lossy(value).into_owned());
            }
        })
    }

    /// Every revocation in etcd now: (revocation key, reason).
    pub async fn revocations(&self) -> Result<Vec<(Vec<u8>, String)>, ClusterError> {
        let name = self.settings.name.clone();
        Ok(self
            .get_prefix(keys::revocations(&name))
            .await?
            .into_iter()
            .filter_map(|(k, v, _)| {
                Some((
                    keys::revocation_key(&name, &k)?,
                    String::from_utf8_lossy(&v).into_owned(),
                ))
            })
            .collect())
    }

    /// Every node revocation list in etcd now (COSE bytes, unchecked).
    pub async fn node_revocation_lists(&self) -> Result<Vec<Vec<u8>>, ClusterError> {
        Ok(self
            .get_prefix(keys::node_revocations(&self.settings.name))
            .await?
            .into_iter()
            .map(|(_, v, _)| v)
            .collect())
    }

    /// The cluster's current document of its kind (policy, upstreams), if one was published.
    pub async fn current_document<D: Document>(&self) -> Result<Option<D>, ClusterError> {
        let key = keys::document_current(&self.settings.name, D::KIND);
        let Some((_, hash, _)) = self.get_prefix(key).await?.into_iter().next() else {
            return Ok(None);
        };
        self.document(&String::from_utf8_lossy(&hash)).await
    }

    /// Every key under `prefix` now: (key, value, mod revision).
    async fn get_prefix(
        &self,
        prefix: String,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>, i64)>, ClusterError> {
        let resp = self
            .with_client(|mut c| async move {
                c.get(prefix, Some(GetOptions::new().with_prefix())).await
            })
            .await?;
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| (kv.key().to_vec(), kv.value().to_vec(), kv.mod_revision()))
            .collect())
    }

    /// Every key under `prefix` now, named by the rest of its key: (name, value, mod revision).
    async fn get_named(&self, prefix: String) -> Result<Vec<(String, Vec<u8>, i64)>, ClusterError> {
        let n = prefix.len();
        Ok(self
            .get_prefix(prefix)
            .await?
            .into_iter()
            .filter_map(|(k, v, rev)| {
                Some((String::from_utf8_lossy(k.get(n..)?).into_owned(), v, rev))
            })
            .collect())
    }

    /// Publishes a node revocation list (its `seq` and the COSE bytes as the gateway signed
    /// them): every node takes the one with the greatest `seq` its gateway signed
    /// ([`ControlPlane::watch_node_revocations`]). Publishing one again changes nothing.
    pub async fn publish_node_revocations(
        &self,
        seq: u64,
        bytes: &[u8],
    ) -> Result<(), ClusterError> {
        self.put(keys::node_revocation_list(&self.settings.name, seq), bytes)
            .await
    }

    /// Applies every node revocation list in etcd now and each one published from then on with
    /// `apply(bytes)`, until [`ControlPlane::leave`]; the caller checks the signature and keeps
    /// the greatest `seq`.
    pub fn watch_node_revocations<F>(self: &Arc<Self>, apply: F) -> tokio::task::JoinHandle<()>
    where
        F: Fn(Vec<u8>) + Send + Sync + 'static,
    {
        self.watch_prefix(
            keys::node_revocations(&self.settings.name),
            move |_, v, _| {
                apply(v.to_vec());
            },
        )
    }

    /// Publishes this node's latest signed checkpoint in the registry of node chains
    /// (`chains/NODE`), for the auditor and for the other nodes to witness.
    pub async fn publish_checkpoint(&self, bytes: &[u8]) -> Result<(), ClusterError> {
        self.put(keys::chain(&self.settings.name, &self.settings.node), bytes)
            .await
    }

    /// Puts one key, with no lease.
    async fn put(&self, key: String, value: &[u8]) -> Result<(), ClusterError> {
        let value = value.to_vec();
        self.with_client(|mut c| async move { c.put(key, value, None).await })
            .await
            .map(|_| ())
    }

    /// Applies every other node's latest checkpoint now and each one published from then on
    /// with `apply(node, bytes)`, until [`ControlPlane::leave`] (this node's own are skipped).
    pub fn watch_checkpoints<F>(self: &Arc<Self>, apply: F) -> tokio::task::JoinHandle<()>
    where
        F: Fn(String, Vec<u8>) + Send + Sync + 'static,
    {
        let prefix = keys::chains(&self.settings.name);
        let own = self.settings.node.clone();
        let p = prefix.clone();
        self.watch_prefix(prefix, move |k, v, _| {
            let Some(node) = k.strip_prefix(p.as_bytes()) else {
                return;
            };
            let node = String::from_utf8_lossy(node).into_owned();
            if node != own {
                apply(node, v.to_vec());
            }
        })
    }

    /// The registry of node chains: each node's name and latest signed checkpoint.
    pub async fn checkpoints(&self) -> Result<Vec<(String, Vec<u8>)>, ClusterError> {
        Ok(self
            .get_named(keys::chains(&self.settings.name))
            .await?
            .into_iter()
            .map(|(node, cp, _)| (node, cp))
            .collect())
    }

    /// Publishes `doc` as the cluster's document of its kind: stored under its hash, then
    /// named current (one transaction). Returns the hash.
    pub async fn publish_document<D: Document>(&self, doc: &D) -> Result<[u8; 32], ClusterError> {
        let (hash, ops) = self.document_puts(doc)?;
        self.with_client(|mut c| async move { c.txn(Txn::new().and_then(ops)).await })
            .await?;
        Ok(hash)
    }

    /// The document's hash and the two puts that publish it: the document under its hash, and
    /// `KIND/current` naming it.
    fn document_puts<D: Document>(&self, doc: &D) -> Result<([u8; 32], [TxnOp; 2]), ClusterError> {
        let bytes = serde_json::to_vec(doc).map_err(|source| ClusterError::Member {
            key: D::KIND.into(),
            source,
        })?;
        let hash = doc.hash();
        let name = &self.settings.name;
        Ok((
            hash,
            [
                TxnOp::put(keys::document_set(name, D::KIND, &hash), bytes, None),
                TxnOp::put(
                    keys::document_current(name, D::KIND),
                    hex::encode(hash),
                    None,
                ),
            ],
        ))
    }

    /// Publishes `doc` as the cluster's document of its kind only if the cluster has none yet
    /// (a first node, or a single node joining a new cluster, seeds it with its own).
    /// `Ok(true)` when it did.
    pub async fn seed_document<D: Document>(&self, doc: &D) -> Result<bool, ClusterError> {
        let (_, ops) = self.document_puts(doc)?;
        let current = keys::document_current(&self.settings.name, D::KIND);
        let resp = self
            .with_client(|mut c| async move {
                // only when KIND/current was never written (create revision 0)
                c.txn(
                    Txn::new()
                        .when([Compare::create_revision(
                            current.clone(),
                            CompareOp::Equal,
                            0,
                        )])
                        .and_then(ops),
                )
                .await
            })
            .await?;
        Ok(resp.succeeded())
    }

    /// Applies the cluster's current document of its kind now (if one was published) and each
    /// one published from then on, with `apply(document)`, until [`ControlPlane::leave`].
    /// Each document is applied after the previous one returned, on a blocking thread
    /// (compiling a policy or building HTTP clients is CPU work), so they take effect in
    /// publication order.
    pub fn watch_document<D, F>(self: &Arc<Self>, apply: F) -> tokio::task::JoinHandle<()>
    where
        D: Document,
        F: Fn(D) + Send + Sync + 'static,
    {
        let apply = Arc::new(apply);
        let plane = self.clone();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let current = keys::document_current(&self.settings.name, D::KIND);
        let watch = self.watch_prefix(current, move |_, v, _| {
            let _ = tx.send(String::from_utf8_lossy(v).into_owned());
        });
        tokio::spawn(async move {
            let mut next = rx.recv().await;
            while let Some(hash) = next.take() {
                match plane.document::<D>(&hash).await {
                    Ok(Some(doc)) => {
                        let apply = apply.clone();
                        let _ = tokio::task::spawn_blocking(move || apply(doc)).await;
                    }
                    Ok(None) => {
                        tracing::warn!(kind = D::KIND, %hash, "the cluster names a document it does not hold")
                    }
                    Err(e) => {
                        // read again until it is read or a newer one is named: the watch has
                        // moved past this publication and would not deliver it again
                        tracing::warn!(kind = D::KIND, error = %e, %hash, "cannot read the cluster's document: trying again");
                        match rx.try_recv() {
                            Ok(newer) => next = Some(newer),
                            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                                tokio::time::sleep(Duration::from_millis(250)).await;
                                next = Some(hash);
                            }
                            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => break,
                        }
                        continue;
                    }
                }
                next = rx.recv().await;
            }
            watch.abort();
        })
    }

    /// The document of its kind stored under `hash` (hex), if any; checked against its hash.
    async fn document<D: Document>(&self, hash: &str) -> Result<Option<D>, ClusterError> {
        let key = format!(
            "{}{hash}",
            keys::document_sets(&self.settings.name, D::KIND)
        );
        let resp = self
            .with_client(|mut c| async move { c.get(key, None).await })
            .await?;
        let Some(kv) = resp.kvs().first() else {
            return Ok(None);
        };
        let doc: D = serde_json::from_slice(kv.value()).map_err(|source| ClusterError::Member {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            source,
        })?;
        Ok((hex::encode(doc.hash()) == hash).then_some(doc))
    }

    /// Names the master key every node of the cluster wraps secrets under: `id` (the hex of
    /// this node's key id) when the cluster has none yet; returns the id the cluster names,
    /// which a node must hold (else it cannot open the cluster's secrets).
    pub async fn claim_master_key(&self, id: &str) -> Result<String, ClusterError> {
        let key = keys::master_key(&self.settings.name);
        let (k, v) = (key.clone(), id.to_string());
        let resp = self
            .with_client(|mut c| async move {
                c.txn(
                    Txn::new()
                        .when([Compare::create_revision(k.clone(), CompareOp::Equal, 0)])
                        .and_then([TxnOp::put(k.clone(), v, None)])
                        .or_else([TxnOp::get(k, None)]),
                )
                .await
            })
            .await?;
        if resp.succeeded() {
            return Ok(id.to_string());
        }
        let named = resp.op_responses().into_iter().find_map(|op| match op {
            etcd_client::TxnOpResponse::Get(g) => g
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
            _ => None,
        });
        Ok(named.unwrap_or_default())
    }

    /// Publishes a sealed secret's record (ciphertexts only) if the cluster's copy is still
    /// the one at `expected` (its mod revision as this node last saw it; 0: none). Returns the
    /// revision written, or `None` when another node changed it first.
    pub async fn publish_secret(
        &self,
        secret: &str,
        record: &[u8],
        expected: i64,
    ) -> Result<Option<i64>, ClusterError> {
        let key = keys::secret(&self.settings.name, secret);
        let value = record.to_vec();
        let resp = self
            .with_client(|mut c| async move {
                c.txn(
                    Txn::new()
                        .when([Compare::mod_revision(
                            key.clone(),
                            CompareOp::Equal,
                            expected,
                        )])
                        .and_then([TxnOp::put(key, value, None)]),
                )
                .await
            })
            .await?;
        Ok(resp
            .succeeded()
            .then(|| resp.header().map_or(0, |h| h.revision())))
    }

    /// One sealed secret's record in the cluster and its mod revision, if any.
    pub async fn secret(&self, secret: &str) -> Result<Option<(Vec<u8>, i64)>, ClusterError> {
        let key = keys::secret(&self.settings.name, secret);
        let resp = self
            .with_client(|mut c| async move { c.get(key, None).await })
            .await?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| (kv.value().to_vec(), kv.mod_revision())))
    }

    /// Every sealed secret in the cluster: (name, record, mod revision).
    pub async fn secrets(&self) -> Result<Vec<(String, Vec<u8>, i64)>, ClusterError> {
        self.get_named(keys::secrets(&self.settings.name)).await
    }

    /// Applies every sealed secret in the cluster now and each one published from then on
    /// with `apply(name, record, mod_revision)`, until [`ControlPlane::leave`].
    pub fn watch_secrets<F>(self: &Arc<Self>, apply: F) -> tokio::task::JoinHandle<()>
    where
        F: Fn(String, Vec<u8>, i64) + Send + Sync + 'static,
    {
        let prefix = keys::secrets(&self.settings.name);
        let p = prefix.clone();
        self.watch_prefix(prefix, move |k, v, rev| {
            if let Some(name) = k.strip_prefix(p.as_bytes()) {
                apply(String::from_utf8_lossy(name).into_owned(), v.to_vec(), rev);
            }
        })
    }

    /// Applies every key under `prefix` now and each put under it from then on with
    /// `apply(key, value, mod_revision)`, until [`ControlPlane::leave`]: a full read, then a watch from the
    /// revision after it; after a failure, on the next endpoint, from where it stopped (or a
    /// full read again when etcd has compacted past it). `apply` must be idempotent.
    pub fn watch_prefix<F>(
        self: &Arc<Self>,
        prefix: String,
        apply: F,
    ) -> tokio::task::JoinHandle<()>
    where
        F: Fn(&[u8], &[u8], i64) + Send + Sync + 'static,
    {
        let plane = self.clone();
        // subscribed here: a stop sent before the task first runs is still seen
        let mut stop = self.stop.subscribe();
        tokio::spawn(async move {
            let mut from = 0;
            loop {
                if *stop.borrow() {
                    return;
                }
                tokio::select! {
                    r = plane.follow(&prefix, &apply, &mut from) => {
                        if let Err(e) = r {
                            tracing::warn!(error = %e, %prefix, "cluster watch interrupted");
                        }
                    }
                    _ = stop.changed() => return,
                }
                // a pause before trying again (the next endpoint)
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stop.changed() => return,
                }
            }
        })
    }

    /// Calls `changed` once now and after every watch response with events under `prefix`
    /// (put or delete), until [`ControlPlane::leave`]; after a failure, on the next endpoint.
    fn watch_prefix_events<F>(
        self: &Arc<Self>,
        prefix: String,
        changed: F,
    ) -> tokio::task::JoinHandle<()>
    where
        F: Fn() + Send + Sync + 'static,
    {
        let plane = self.clone();
        let mut stop = self.stop.subscribe();
        tokio::spawn(async move {
            loop {
                if *stop.borrow() {
                    return;
                }
                changed();
                let p = prefix.clone();
                let watched = plane
                    .with_client(|mut c| async move {
                        c.watch(p, Some(WatchOptions::new().with_prefix())).await
                    })
                    .await;
                if let Ok(mut stream) = watched {
                    loop {
                        tokio::select! {
                            m = stream.message() => match m {
                                Ok(Some(resp)) if !resp.canceled() => {
                                    if !resp.events().is_empty() {
                                        changed();
                                    }
                                }
                                _ => break,
                            },
                            _ = stop.changed() => return,
                        }
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stop.changed() => return,
                }
            }
        })
    }

    /// One run of a watch: a full read when `from` is 0, then the watch; returns when the
    /// stream ends or fails, `from` naming the next revision to read.
    async fn follow<F>(&self, prefix: &str, apply: &F, from: &mut i64) -> Result<(), ClusterError>
    where
        F: Fn(&[u8], &[u8], i64),
    {
        if *from == 0 {
            let p = prefix.to_string();
            let resp = self
                .with_client(|mut c| async move {
                    c.get(p, Some(GetOptions::new().with_prefix())).await
                })
                .await?;
            for kv in resp.kvs() {
                apply(kv.key(), kv.value(), kv.mod_revision());
            }
            *from = resp.header().map_or(0, |h| h.revision()) + 1;
        }
        let (start, p) = (*from, prefix.to_string());
        let mut stream = self
            .with_client(|mut c| async move {
                c.watch(
                    p,
                    Some(WatchOptions::new().with_prefix().with_start_revision(start)),
                )
                .await
            })
            .await?;
        while let Some(resp) = stream.message().await? {
            if resp.compact_revision() > 0 || resp.canceled() {
                // compacted past `from`: read everything again
                *from = 0;
                return Ok(());
            }
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                *from = (*from).max(kv.mod_revision() + 1);
                if event.event_type() == EventType::Put {
                    apply(kv.key(), kv.value(), kv.mod_revision());
                }
            }
        }
        Ok(())
    }

    /// Leaves the cluster: stops the background tasks and revokes the lease (the member's key
    /// goes at once).
    pub async fn leave(&self) {
        let _ = self.stop.send(true);
        let lease = self.lease();
        if let Err(e) = self
            .with_client(|mut c| async move { c.lease_revoke(lease).await })
            .await
        {
            tracing::warn!(error = %e, "cannot revoke the cluster lease (it expires by itself)");
        }
    }
}

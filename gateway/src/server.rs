//! The QUIC loop around the pipeline: binds the endpoint ([`endpoint`]), accepts connections
//! ([`serve`]), authenticates each peer by its certificate, enforces the per-DID connection
//! limit, runs one call per bidirectional stream (its [`Call`] built here, the steps in
//! [`crate::gateway`], the decisions in [`crate::call`]), answers catalog requests, and drains
//! calls at shutdown. It moves bytes and tasks; it decides nothing.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use didgate_io::{now_ms, tls, wire};
use didgate_protocol::frame::{self, FrameDecoder, FrameType};
use didgate_protocol::message::{Message, RefusalCode};
use didgate_protocol::{Caller, Version};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::admission::Decision;
use crate::call::{Call, Refuse};
use crate::gateway::{CONN_LIMIT_CLOSE, DRAINED_CLOSE, Gateway, StartError};

/// Handles one stream: one pipelined call, one grant request, one grant execution or one
/// catalog request, decided throughout by the policy set in force when the stream opened
/// (the [`Call`] built here).
async fn handle(
    gw: Arc<Gateway>,
    peer: Caller,
    version: Version,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    // one span per stream: its DID now, the call ID, upstream and outcome as they are known
    // (`Gateway::open_request`, `Gateway::admit`, the terminal frame), so every event of the
    // call carries them
    let span = tracing::info_span!(
        "call",
        did = %peer,
        call = tracing::field::Empty,
        upstream = tracing::field::Empty,
        outcome = tracing::field::Empty,
    );
    let mut cx = Call::new(gw.policy(), gw.upstreams(), peer, version);
    // counted only once its policy snapshot is taken: a call seen in flight
    // ([`Gateway::calls_in_flight`]) is decided by the set in force before
    let _inflight = InFlight::enter(&gw);
    tracing::Instrument::instrument(handle_call(&gw, &mut cx, send, recv), span).await
}

async fn handle_call(
    gw: &Gateway,
    cx: &mut Call,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    // a cluster member draining after a planned leave reads the first frame: it still
    // executes the grants it issued
    if gw.is_stopping() && !gw.executes_grants_while_draining() {
        return refuse_stopping(gw, cx, &mut send).await;
    }
    let min = gw.config.min_client();
    if cx.version < min {
        // Said in the connection's own version, with one of its codes: the client can read
        // it and tell its user what to do.
        let why = format!(
            "this gateway serves protocol version {min} and later (min_client_version); this client speaks version {}: upgrade it",
            cx.version
        );
        return gw
            .refuse_unverified(cx, &mut send, RefusalCode::Malformed, &why)
            .await;
    }
    let mut dec = FrameDecoder::new();
    let deadline = gw.frame_deadline();
    let first = tokio::time::timeout(deadline, wire::next_frame(&mut recv, &mut dec)).await;
    let frame = match first {
        Ok(Ok(Some(f))) => f,
        Err(_) => {
            let why = format!("no complete request frame within {}s", deadline.as_secs());
            return gw
                .refuse_unverified(cx, &mut send, RefusalCode::Malformed, &why)
                .await;
        }
        _ => {
            return gw
                .refuse_unverified(
                    cx,
                    &mut send,
                    RefusalCode::Malformed,
                    "expected a request frame",
                )
                .await;
        }
    };
    match gw.route(cx, frame.kind, &frame.payload) {
        Ok(()) => {}
        Err(Ok(home)) => return gw.refuse_moved(cx, &mut send, home).await,
        Err(Err(r)) => return gw.refuse_unverified(cx, &mut send, r.code, &r.reason).await,
    }
    if gw.is_stopping() && frame.kind != FrameType::Execute {
        return refuse_stopping(gw, cx, &mut send).await;
    }
    match frame.kind {
        FrameType::Request => gw.pipelined(cx, send, recv, dec, &frame.payload).await,
        FrameType::GrantRequest => gw.issue_grant(cx, send, &frame.payload).await,
        FrameType::Execute => gw.execute_grant(cx, send, recv, dec, &frame.payload).await,
        FrameType::CatalogRequest => answer_catalog(gw, cx, send, &frame.payload).await,
        FrameType::ChainRequest => crate::export::answer(gw, cx, send, &frame.payload).await,
        _ => {
            gw.refuse_unverified(
                cx,
                &mut send,
                RefusalCode::Malformed,
                "unexpected frame type",
            )
            .await
        }
    }
}

/// Answers a stream opened while the gateway drains, at once, without reading it: a cluster
/// member (withdrawn from the members first) sends the caller to its next home; otherwise, or
/// if no other member is known, the call is refused `shutting_down`.
async fn refuse_stopping(gw: &Gateway, cx: &mut Call, send: &mut quinn::SendStream) {
    if let Err(Refuse {
        home: Some(home), ..
    }) = gw.route_caller(cx, None)
    {
        return gw.refuse_moved(cx, send, home).await;
    }
    gw.refuse_unverified(
        cx,
        send,
        RefusalCode::ShuttingDown,
        "the gateway is shutting down",
    )
    .await;
}

/// Binds the gateway's QUIC endpoint on `addr`.
pub fn endpoint(gw: &Gateway, addr: SocketAddr) -> Result<quinn::Endpoint, StartError> {
    quinn::Endpoint::server(server_config(gw)?, addr).map_err(StartError::Socket)
}

/// The QUIC server configuration: a node's leaf carries its certificate and the newest
/// revocation list it holds. A node serves version 2 only (its messages may carry a node
/// certificate a version 1 client could not check: specs/protocol.md, "Nodes"), and so does a
/// cluster member (its refusals may carry `control_plane_unavailable`).
fn server_config(gw: &Gateway) -> Result<quinn::ServerConfig, StartError> {
    let versions: &[Version] = if gw.node().is_some() || gw.config().cluster().is_some() {
        &[Version::V2]
    } else {
        &Version::ALL
    };
    match gw.node_credentials() {
        Some(creds) => tls::node_server_config(&gw.identity, &creds, versions),
        None => tls::server_config_for(&gw.identity, versions),
    }
    .map_err(StartError::Tls)
}

/// Serves calls on `endpoint` until `shutdown` resolves, then drains the calls in flight,
/// writes the pending aggregate refusals, and stops the chain writer.
pub async fn serve(
    gw: Arc<Gateway>,
    endpoint: quinn::Endpoint,
    shutdown: impl Future<Output = ()>,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let tasks = TaskTracker::new();
    let window = gw.config.refusal_window().max(Duration::from_secs(1));
    let ticker = {
        let gw = gw.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            // the first flush one window from now (an interval's first tick is immediate: a
            // flush at start-up would race with the first refusals for nothing)
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + window, window);
            let mut prune = tokio::time::interval(crate::gateway::PRUNE_EVERY);
            loop {
                tokio::select! {
                    _ = tick.tick() => { let _ = gw.flush_refusals().await; }
                    _ = prune.tick() => {
                        let g = gw.clone();
                        let pruned = tokio::task::spawn_blocking(move || g.prune_claims(now_ms())).await;
                        if let Ok(Err(e)) = pruned {
                            tracing::warn!(%e, "cannot prune expired claims");
                        }
                    }
                    _ = stop.changed() => break,
                }
            }
        })
    };
    // a chain export a stop interrupted ([`crate::export`])
    crate::export::remove_leftovers(gw.data_dir());
    let upkeep = gw.secrets.spawn_upkeep(stop_rx.clone());
    let cluster_watch = watch_cluster_revocations(&gw);
    let secrets_watch = watch_cluster_secrets(&gw);
    // the registry knows this node's chain before its first call (a node joining later
    // tells from it that this one served: didgate_cluster::home)
    if let Some(plane) = gw.cluster() {
        publish_last_checkpoint(&gw, plane, &mut None).await;
    }
    let publisher = publish_checkpoints(&gw, stop_rx.clone());
    let sharing = share_limits(&gw, stop_rx.clone());
    let witness = witness_peers(&gw);
    let revoked_self = Arc::new(tokio::sync::Notify::new());
    let _node_lists = watch_node_revocations(&gw, &endpoint, &revoked_self);
    tokio::pin!(shutdown);
    // a node drains before its certificate ends, so every receipt it signs is covered
    let expiry = async {
        match gw.node_drain_at_ms() {
            Some(at) => {
                tokio::time::sleep(Duration::from_millis(at.saturating_sub(now_ms()))).await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::pin!(expiry);
    let (done_tx, done_rx) = watch::channel(false);
    let planned = loop {
        tokio::select! {
            () = revoked_self.notified() => {
                tracing::error!("this node's certificate is revoked: no new call is taken");
                break false;
            }
            () = &mut expiry => {
                tracing::error!(
                    "the node certificate ends soon: no new call is taken (renew it with `didgated cluster certify-node` and restart)"
                );
                break false;
            }
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break false };
                spawn_connection(&gw, incoming, &tasks, (&stop_rx, &done_rx));
            }
            () = &mut shutdown => break true,
        }
    };
    let grants = withdraw(&gw, planned).await;
    gw.grants_until
        .store(grants, std::sync::atomic::Ordering::Release);
    // Drain: new calls are refused `shutting_down` (a cluster member answers `moved`), calls in
    // flight finish, then the final checkpoint is written. A cluster member still accepts
    // connections meanwhile (a caller its next home sends back for a moment, or one executing
    // a grant it issued, finds it).
    gw.stopping
        .store(true, std::sync::atomic::Ordering::Release);
    let _ = stop_tx.send(true);
    if gw.cluster().is_some() {
        accept_while_draining(&gw, &endpoint, &tasks, (&stop_rx, &done_rx), &revoked_self).await;
    } else {
        endpoint.set_server_config(None);
        drained(&gw).await;
    }
    let _ = done_tx.send(true);
    endpoint.set_server_config(None);
    tasks.close();
    tasks.wait().await;
    let _ = ticker.await;
    let _ = gw.flush_refusals().await;
    // persist the last uses of the calls just drained
    let _ = upkeep.await;
    gw.secrets.upkeep(now_ms()).await;
    endpoint.close(0u32.into(), b"shutdown");
    endpoint.wait_idle().await;
    if let Some(p) = publisher {
        let _ = p.await;
    }
    if let Some(s) = sharing {
        let _ = s.await;
    }
    if let Some(plane) = gw.cluster() {
        // the chain sealed (a checkpoint covering its last entry) and that checkpoint in the
        // registry, then the member's key goes at once (its lease revoked), and the watches
        // stop
        let chain = gw.chain.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || chain.seal()).await {
            tracing::warn!(error = %e, "cannot seal the chain before leaving the cluster");
        }
        publish_last_checkpoint(&gw, plane, &mut None).await;
        plane.leave().await;
    }
    if let Some(apply) = cluster_watch {
        let _ = apply.await;
    }
    if let Some(apply) = secrets_watch {
        let _ = apply.await;
    }
    if let Some(w) = witness {
        let _ = w.await;
    }
    gw.chain.close();
}

/// A cluster member withdraws before it drains, handing its callers over, so their new homes
/// take them (this node answers `moved` from then on) while the calls in flight here finish.
/// After a planned leave that handed over, returns until when it executes the grants it
/// issued while they are pending (no other node can; its handover tells the others so): for
/// at most as long as its peers remember it (`lease_ttl + 2 W`), and never past its
/// certificate's drain time. 0 when it executes none.
async fn withdraw(gw: &Gateway, planned: bool) -> u64 {
    let Some(plane) = gw.cluster() else {
        return 0;
    };
    let until = if planned {
        let ttl = plane.settings().lease_ttl_secs.saturating_mul(1000);
        let until = now_ms().saturating_add(ttl.saturating_add(gw.window_ms().saturating_mul(2)));
        gw.node_drain_at_ms().map_or(until, |at| until.min(at))
    } else {
        0
    };
    match plane.withdraw(until).await {
        Ok(true) => until,
        Ok(false) => 0,
        Err(e) => {
            tracing::warn!(error = %e, "cannot withdraw from the cluster's members (its lease ends it)");
            0
        }
    }
}

/// In a cluster, publishes this node's latest signed checkpoint in the registry of node
/// chains whenever it changes (checked every third of the lease TTL), until `stop`.
fn publish_checkpoints(
    gw: &Arc<Gateway>,
    mut stop: watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    let plane = gw.cluster()?.clone();
    let gw = gw.clone();
    let every = Duration::from_millis(plane.health().bound_ms().max(100));
    Some(tokio::spawn(async move {
        let mut last = None;
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => publish_last_checkpoint(&gw, &plane, &mut last).await,
                _ = stop.changed() => return,
            }
        }
    }))
}

/// How often a cluster node folds its demand on the rate-limited upstreams and publishes it
/// when it changed ([`share_limits`]).
const SHARE_EVERY: Duration = Duration::from_secs(1);

/// In a cluster, this node's part of the per-upstream rate limits (crate::shares): takes what
/// the other nodes publish, and every [`SHARE_EVERY`] publishes its own demand when it moved by
/// more than a tenth (or every 10 s while not zero), until `stop`.
fn share_limits(
    gw: &Arc<Gateway>,
    mut stop: watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    let plane = gw.cluster()?.clone();
    let g = gw.clone();
    let _watch = plane.watch_loads(move |node, load| g.shares.peer(node, load));
    let gw = gw.clone();
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(SHARE_EVERY);
        let mut last = std::time::Instant::now();
        let mut published: Option<didgate_cluster::shares::Load> = None;
        let mut unchanged = 0u32;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            let elapsed = u64::try_from(last.elapsed().as_millis()).unwrap_or(u64::MAX);
            last = std::time::Instant::now();
            let load = gw.shares.tick(elapsed);
            unchanged += 1;
            let moved = published.as_ref().is_none_or(|p| {
                p.upstreams.len() != load.upstreams.len()
                    || load.upstreams.iter().any(|(u, d)| {
                        p.upstreams
                            .get(u)
                            .is_none_or(|was| (d - was).abs() > 0.1 * was.max(1.0))
                    })
            });
            let due = unchanged >= 10 && !load.upstreams.is_empty();
            if (moved || due) && plane.publish_load(&load).await.is_ok() {
                published = Some(load);
                unchanged = 0;
            }
        }
    }))
}

/// In a cluster, appends a `witness` entry (audit-log.md, amendment 2.9) for each newer
/// checkpoint another node of this gateway publishes: signed by that node under a certificate
/// of this gateway that holds (with the revocation list held), and of a greater size than the
/// last one witnessed of that node. So no node can later present a chain shorter than, or
/// different from, what this one saw. Until the control plane is left.
fn witness_peers(gw: &Arc<Gateway>) -> Option<tokio::task::JoinHandle<()>> {
    use didgate_protocol::message::Checkpoint;
    let plane = gw.cluster()?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Vec<u8>)>();
    let _watch = plane.watch_checkpoints(move |node, bytes| {
        let _ = tx.send((node, bytes));
    });
    let gw = gw.clone();
    Some(tokio::spawn(async move {
        let mut seen: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
        while let Some((node, bytes)) = rx.recv().await {
            let list = gw.node_revocation_list();
            let opened = didgate_protocol::node::open_signed::<Checkpoint>(
                &bytes,
                gw.did(),
                None,
                list.as_ref(),
            );
            let (signed, _) = match opened {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(%node, error = %e, "a checkpoint in the registry is not one of this gateway's nodes: not witnessed");
                    continue;
                }
            };
            let (peer, size) = (signed.envelope().signer().clone(), signed.message().size);
            // a peer grown by one entry only is not witnessed again: that entry may be its own
            // witness of this node, and two idle nodes would witness each other forever
            if peer == *gw.key() || seen.get(&node).is_some_and(|last| size < last + 2) {
                continue;
            }
            let entry = match didgate_audit::entry::Entry::witness(&peer, bytes, now_ms()) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(%node, error = %e, "cannot witness a checkpoint");
                    continue;
                }
            };
            match gw.chain.append_entry(entry).await {
                Ok(_) => {
                    seen.insert(node, size);
                }
                Err(e) => tracing::warn!(%node, error = %e, "cannot write a witness entry"),
            }
        }
    }))
}

/// Publishes the store's last checkpoint if it is not `last` (then remembered there).
async fn publish_last_checkpoint(
    gw: &Arc<Gateway>,
    plane: &didgate_cluster::ControlPlane,
    last: &mut Option<Vec<u8>>,
) {
    let store = gw.chain.store().clone();
    let Ok(Ok(Some(cp))) = tokio::task::spawn_blocking(move || store.last_checkpoint()).await
    else {
        return;
    };
    if last.as_ref() == Some(&cp) {
        return;
    }
    match plane.publish_checkpoint(&cp).await {
        Ok(()) => *last = Some(cp),
        Err(e) => tracing::warn!(error = %e, "cannot publish this node's checkpoint"),
    }
}

/// A node in a cluster staples every newer node revocation list its gateway signed that the
/// cluster publishes (the endpoint's TLS configuration swapped: new handshakes carry it), and
/// stops taking calls when a list revokes its own certificate (`revoked_self` is notified).
fn watch_node_revocations(
    gw: &Arc<Gateway>,
    endpoint: &quinn::Endpoint,
    revoked_self: &Arc<tokio::sync::Notify>,
) -> Option<tokio::task::JoinHandle<()>> {
    let plane = gw.cluster()?;
    gw.node()?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let _watch = plane.watch_node_revocations(move |bytes| {
        let _ = tx.send(bytes);
    });
    let (gw, endpoint, revoked_self) = (gw.clone(), endpoint.clone(), revoked_self.clone());
    Some(tokio::spawn(async move {
        while let Some(bytes) = rx.recv().await {
            match gw.apply_node_revocations(&bytes) {
                crate::node::Stapled::Older => {}
                crate::node::Stapled::Newer => match server_config(&gw) {
                    Ok(cfg) => endpoint.set_server_config(Some(cfg)),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot staple the new node revocation list")
                    }
                },
                crate::node::Stapled::RevokesThisNode => revoked_self.notify_one(),
            }
        }
    }))
}

/// In a cluster, applies every revocation published by any node (etcd watch) to this one,
/// in order, and swaps in every policy published, until the control plane is left. `None`
/// outside a cluster.
fn watch_cluster_revocations(gw: &Arc<Gateway>) -> Option<tokio::task::JoinHandle<()>> {
    let plane = gw.cluster()?;
    // unbounded: revocations are few and written by operators; the watch must never block
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Vec<u8>, String)>();
    let _watch = plane.watch_revocations(move |key, reason| {
        let _ = tx.send((key, reason));
    });
    // the cluster's policy, swapped in as it is published, in order, off the async threads
    let policy_gw = gw.clone();
    let _policy = plane.watch_document(move |doc: didgate_cluster::PolicyDocument| {
        policy_gw.apply_cluster_policy(&doc);
    });
    // and its upstreams
    let upstreams_gw = gw.clone();
    let _upstreams = plane.watch_document(move |doc: didgate_cluster::UpstreamsDocument| {
        let _ = upstreams_gw.apply_cluster_upstreams(&doc);
    });
    let gw = gw.clone();
    Some(tokio::spawn(async move {
        while let Some((key, reason)) = rx.recv().await {
            gw.apply_cluster_revocation(&key, &reason).await;
        }
    }))
}

/// In a cluster, takes every sealed secret any node publishes (etcd watch), in order, each
/// with a `secret` entry of this node's chain ([`crate::shared`]), until the control plane is
/// left. `None` outside a cluster.
fn watch_cluster_secrets(gw: &Arc<Gateway>) -> Option<tokio::task::JoinHandle<()>> {
    let plane = gw.cluster()?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Vec<u8>, i64)>();
    let _watch = plane.watch_secrets(move |name, record, rev| {
        let _ = tx.send((name, record, rev));
    });
    let (gw, plane) = (gw.clone(), plane.clone());
    Some(tokio::spawn(async move {
        while let Some((name, record, rev)) = rx.recv().await {
            let n = name.clone();
            if let Err(e) = gw.shared.take(&plane, &gw.secrets, n, record, rev).await {
                tracing::warn!(secret = %name, error = %e, "a secret the cluster published cannot be taken");
            }
        }
    }))
}

/// Applies the admission decision ([`crate::admission`]) to a new connection: a Retry or a
/// refusal is sent here (a refusal counted `rate_limited` in the aggregate refusal entry);
/// an accepted connection comes back with its slot.
fn admit(gw: &Arc<Gateway>, incoming: quinn::Incoming) -> Option<Slot> {
    let ip = incoming.remote_address().ip();
    let decision = gw
        .admission
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .decide(
            ip,
            incoming.remote_address_validated(),
            incoming.may_retry(),
            gw.limits.clock_ms(),
        );
    gw.metrics().admission(decision);
    match decision {
        Decision::Accept { charged } => Some(Slot {
            gw: gw.clone(),
            ip,
            charged,
            established: false,
            incoming: Some(incoming),
        }),
        Decision::Retry => {
            // `may_retry` was checked; should quinn still decline, the connection is refused
            if let Err(e) = incoming.retry() {
                e.into_incoming().refuse();
            }
            None
        }
        Decision::Refuse(limit) => {
            tracing::debug!(%ip, limit = limit.key(), "new connection refused");
            incoming.refuse();
            gw.count_refusal(RefusalCode::RateLimited);
            None
        }
    }
}

/// An admitted connection's place in the per-address counts: a handshake in flight, then an
/// open connection; released when dropped.
struct Slot {
    gw: Arc<Gateway>,
    ip: std::net::IpAddr,
    charged: bool,
    established: bool,
    incoming: Option<quinn::Incoming>,
}

impl Slot {
    /// Runs the handshake; on success the slot counts an open connection until dropped.
    async fn handshake(&mut self) -> Option<quinn::Connection> {
        let incoming = self.incoming.take()?;
        let conn = incoming.await.ok();
        let mut adm = self.gw.admission.lock().unwrap_or_else(|p| p.into_inner());
        adm.handshake_ended(
            self.ip,
            self.charged,
            conn.is_some(),
            self.gw.limits.clock_ms(),
        );
        self.charged = false;
        self.established = conn.is_some();
        conn
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let now = self.gw.limits.clock_ms();
        let mut adm = self.gw.admission.lock().unwrap_or_else(|p| p.into_inner());
        if self.established {
            adm.closed(self.ip, now);
        } else if self.charged {
            adm.handshake_ended(self.ip, true, false, now);
        }
    }
}

/// Serves one connection's streams until the peer closes it or, once `stop` says the
/// gateway drains, until `done` says the drain is over ([`drained`]).
async fn connection(
    gw: Arc<Gateway>,
    mut slot: Slot,
    mut stop: watch::Receiver<bool>,
    done: watch::Receiver<bool>,
) {
    let Some(conn) = slot.handshake().await else {
        return;
    };
    let Some(peer) = tls::peer_caller(&conn) else {
        conn.close(1u32.into(), b"no DID certificate");
        return;
    };
    // rustls agreed on one of the ALPN ids the server offers (or failed the handshake)
    let Some(version) = tls::negotiated_version(&conn) else {
        conn.close(1u32.into(), b"no didgate protocol version agreed");
        return;
    };
    if !gw.register(&peer, &conn) {
        let mut cx = Call::new(gw.policy(), gw.upstreams(), peer, version);
        return refuse_connection(&gw, &mut cx, conn).await;
    }
    let calls = TaskTracker::new();
    let mut drained: Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>> = None;
    loop {
        tokio::select! {
            stream = conn.accept_bi() => {
                let Ok((send, recv)) = stream else { break };
                let gw = gw.clone();
                let peer = peer.clone();
                // while draining, `handle` answers `shutting_down` or `moved` at once (but
                // for the execution of a grant a leaving cluster member issued)
                // boxed, and made in its box: a call's future is about 8 KiB, and tokio
                // moves (copies) an unboxed future on each step of a spawn and again to
                // store its output, as an async block wrapping it did on its first poll
                calls.spawn(Box::pin(handle(gw, peer, version, send, recv)));
            }
            _ = stop.changed(), if drained.is_none() => {
                // Open connections stay up until the drain is over (no call in flight
                // anywhere, and no grant a leaving cluster member executes pending), so a
                // caller gets a typed `shutting_down` or `moved` rather than a closed
                // connection.
                let mut done = done.clone();
                drained = Some(Box::pin(async move {
                    let _ = done.wait_for(|d| *d).await;
                }));
            }
            () = async {
                match drained.as_mut() {
                    Some(d) => d.await,
                    None => std::future::pending().await,
                }
            }, if drained.is_some() => break,
        }
    }
    calls.close();
    calls.wait().await;
    gw.unregister(&peer, &conn);
    if drained.is_some() {
        // every call that claimed anything on this connection has been answered: a stream
        // still open was not, and claimed nothing (specs/protocol.md, "Transport")
        conn.close(DRAINED_CLOSE.into(), b"drained");
    } else {
        conn.close(0u32.into(), b"bye");
    }
}

/// A connection beyond `max_connections_per_did`: its first stream, if one opens within the
/// frame timeout, gets a signed `rate_limited` refusal (counted in the aggregate entry, as a
/// refusal before any signature is checked); then the connection is closed.
async fn refuse_connection(gw: &Gateway, cx: &mut Call, conn: quinn::Connection) {
    let limit = gw.config.gateway().max_connections_per_did;
    let reason = format!("too many open connections of this DID (limit {limit})");
    match tokio::time::timeout(gw.frame_deadline(), conn.accept_bi()).await {
        Ok(Ok((mut send, _recv))) => {
            gw.refuse_unverified(cx, &mut send, RefusalCode::RateLimited, &reason)
                .await;
        }
        _ => {
            let _ = gw
                .audit_refusal(cx, None, RefusalCode::RateLimited, &reason)
                .await;
        }
    }
    conn.close(CONN_LIMIT_CLOSE.into(), b"too many connections of this DID");
}

/// Admits a new connection ([`admit`]) and serves it in `tasks` ([`connection`]).
fn spawn_connection(
    gw: &Arc<Gateway>,
    incoming: quinn::Incoming,
    tasks: &TaskTracker,
    (stop, done): (&watch::Receiver<bool>, &watch::Receiver<bool>),
) {
    let Some(slot) = admit(gw, incoming) else {
        return;
    };
    let gw = gw.clone();
    let (stop, done) = (stop.clone(), done.clone());
    tasks.spawn(async move { connection(gw, slot, stop, done).await });
}

/// A cluster member's drain: connections are still accepted until [`drained`]. A revocation of
/// its own certificate meanwhile ends the execution of its grants.
async fn accept_while_draining(
    gw: &Arc<Gateway>,
    endpoint: &quinn::Endpoint,
    tasks: &TaskTracker,
    (stop, done): (&watch::Receiver<bool>, &watch::Receiver<bool>),
    revoked_self: &tokio::sync::Notify,
) {
    let idle = drained(gw);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { return };
                spawn_connection(gw, incoming, tasks, (stop, done));
            }
            () = revoked_self.notified() => {
                tracing::error!("this node's certificate is revoked: it executes no more grants");
                gw.grants_until.store(0, std::sync::atomic::Ordering::Release);
            }
            () = &mut idle => return,
        }
    }
}

/// Returns once no call is in flight and, while this node executes the grants it issued
/// ([`Gateway::executes_grants_while_draining`]), none of them is pending
/// ([`Gateway::pending_grants_until`]; checked again every 250 ms while one is).
async fn drained(gw: &Arc<Gateway>) {
    loop {
        gw.wait_idle().await;
        let deadline = gw.grants_until.load(std::sync::atomic::Ordering::Acquire);
        if deadline <= now_ms() {
            return;
        }
        let g = gw.clone();
        let pending = tokio::task::spawn_blocking(move || g.pending_grants_until(now_ms()))
            .await
            .ok()
            .flatten();
        let Some(until) = pending else { return };
        let wait = until.min(deadline).saturating_sub(now_ms()).clamp(1, 250);
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
}

/// Counts a call as in flight for the drain at shutdown, until dropped.
struct InFlight<'g>(&'g Gateway);

impl<'g> InFlight<'g> {
    fn enter(gw: &'g Gateway) -> Self {
        gw.inflight
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Self(gw)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self
            .0
            .inflight
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            self.0.idle.notify_waiters();
        }
    }
}

/// Answers a CatalogRequest frame on one stream: Catalog frames, then FIN; a refusal (signed,
/// audited like any refusal before a call) for a malformed request or a revoked DID.
async fn answer_catalog(gw: &Gateway, cx: &mut Call, mut send: quinn::SendStream, payload: &[u8]) {
    let version = cx.version;
    let request = match didgate_protocol::catalog::CatalogRequest::decode_v(payload, version) {
        Ok(r) => r,
        Err(_) => {
            return gw
                .refuse_unverified(
                    cx,
                    &mut send,
                    RefusalCode::Malformed,
                    "the catalog request does not decode (as a message of the connection's version)",
                )
                .await;
        }
    };
    if gw.did_revoked(&cx.peer) {
        return gw
            .refuse_unverified(cx, &mut send, RefusalCode::Revoked, "this DID is revoked")
            .await;
    }
    // a did:web caller's claim is checked against its document first, as for a call
    if let Err(r) = gw.web_document(cx).await {
        return gw.refuse_unverified(cx, &mut send, r.code, &r.reason).await;
    }
    // rate-limited like a request (a token of the DID's bucket), refusals counted
    if let Err(r) = crate::call::limit_catalog(cx, &gw.limits, gw.config(), gw.limits.clock_ms()) {
        return gw.refuse_unverified(cx, &mut send, r.code, &r.reason).await;
    }
    let ops = crate::catalog::allowed_operations(
        cx.upstreams.iter(),
        &cx.policy,
        cx.peer.as_str(),
        request.upstream.as_deref(),
        now_ms(),
    );
    let mut out = BytesMut::new();
    for payload in crate::catalog::encode_frames(ops, version) {
        // a single operation is bounded by validate(), so each payload fits a frame
        if frame::encode(FrameType::Catalog, &payload, &mut out).is_err() {
            tracing::warn!("catalog: an operation does not fit a frame");
        }
    }
    let _ = send.write_all(&out).await;
    let _ = send.finish();
}

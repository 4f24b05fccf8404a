//! The sealed secrets a cluster's nodes share through etcd (specs/operation.md, "Cluster",
//! "Secrets").
//!
//! Owns the rules that keep every node's copy of a secret the cluster's: the master key every
//! node must hold (its id named once in etcd; a node with another refuses to join), the first
//! node's secrets seeding a cluster that has none, a lifecycle write on one node published
//! after it is in that node's store and chain (compare-and-swap on the etcd revision this node
//! last saw, so two nodes changing one secret at once cannot both win silently), and every
//! published record taken by every node with a `secret` entry of its own chain
//! ([`crate::secrets::Secrets::apply_replica`]). Only ciphertexts and wrapped data keys enter
//! etcd; the master key never does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use didgate_cluster::{ClusterError, ControlPlane};

use crate::secrets::{SecretError, Secrets};

/// Why a secret changed on this node did not reach the cluster.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// etcd could not be written.
    #[error("changed on this node, but not published to the cluster: {0} (run it again)")]
    Etcd(#[source] ClusterError),
    /// The cluster's record could not be read: nothing was changed.
    #[error("the cluster's record cannot be read, nothing was changed: {0}")]
    Unread(#[source] ClusterError),
    /// Another node changed the secret first: its version is now in force here too.
    #[error(
        "another node changed secret {0} at the same time: the cluster's version is in force on every node, this change is not (run it again)"
    )]
    Conflict(String),
    /// The record could not be read or taken.
    #[error(transparent)]
    Secret(#[from] SecretError),
}

/// This node's view of the cluster's secrets: the etcd revision of each it last saw.
#[derive(Debug, Default)]
pub struct SharedSecrets {
    seen: Mutex<HashMap<String, i64>>,
    /// Held across every change of a secret this node makes or takes: a lifecycle command
    /// from its read of the cluster's record to its publication, and each record the watch
    /// brings, so none interleaves with another.
    changing: tokio::sync::Mutex<()>,
}

impl SharedSecrets {
    fn seen(&self, name: &str) -> i64 {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .copied()
            .unwrap_or(0)
    }

    fn saw(&self, name: &str, revision: i64) {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let r = seen.entry(name.to_string()).or_default();
        *r = (*r).max(revision);
    }

    /// Takes a record the watch brought at `revision`; records older than one already seen
    /// are skipped. A record older than the one this node holds (a rollback written to etcd,
    /// or a change of this node the cluster lost) is refused, and this node's record is
    /// published over it, so every node ends with the newer one.
    pub async fn take(
        &self,
        plane: &ControlPlane,
        secrets: &Arc<Secrets>,
        name: String,
        record: Vec<u8>,
        revision: i64,
    ) -> Result<bool, PublishError> {
        let _one = self.changing.lock().await;
        if revision < self.seen(&name) {
            return Ok(false);
        }
        let n = name.clone();
        let now = didgate_io::now_ms();
        let taken = blocking(secrets, move |s| s.apply_replica(&n, &record, now, None)).await;
        self.saw(&name, revision);
        match taken {
            Ok(changed) => Ok(changed),
            Err(SecretError::Older { .. }) => {
                tracing::warn!(secret = %name, "the cluster's record is older than this node's: publishing this node's over it");
                self.publish_over(plane, secrets, &name, revision, None)
                    .await
                    .map(|()| false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Runs the lifecycle command `op` on secret `name` as a cluster member (specs/
    /// operation.md, "Cluster", "Secrets"): takes the cluster's record first (so the command
    /// changes what every node holds), runs `op` on this node's store and chain, then publishes
    /// the result with a compare-and-swap on the revision it started from. `op` is not run
    /// (`None`) when the cluster's record cannot be read.
    pub async fn change<T, Fut>(
        &self,
        plane: &ControlPlane,
        secrets: &Arc<Secrets>,
        name: &str,
        op: impl FnOnce() -> Fut,
    ) -> (Option<T>, Result<(), PublishError>)
    where
        Fut: Future<Output = T>,
    {
        let _one = self.changing.lock().await;
        let base = match plane.secret(name).await {
            Ok(b) => b,
            Err(e) => return (None, Err(PublishError::Unread(e))),
        };
        let (base_bytes, base_rev) = base.unwrap_or_default();
        let mut floor = None;
        if !base_bytes.is_empty() {
            let (n, b) = (name.to_string(), base_bytes.clone());
            let now = didgate_io::now_ms();
            match blocking(secrets, move |s| s.apply_replica(&n, &b, now, None)).await {
                Ok(_) => floor = Secrets::newest_of(&base_bytes, secrets.key_id()),
                // this node holds a newer record the cluster lacks: it is the base, and is
                // published below
                Err(SecretError::Older { .. }) => {}
                Err(e) => return (None, Err(e.into())),
            }
            self.saw(name, base_rev);
        }
        let out = op().await;
        // nothing to publish when the command changed nothing the cluster lacks
        let n = name.to_string();
        if let Ok(Some(now)) = blocking(secrets, move |s| s.stored(&n)).await
            && !base_bytes.is_empty()
            && now == base_bytes
        {
            return (Some(out), Ok(()));
        }
        let published = self
            .publish_over(plane, secrets, name, base_rev, floor)
            .await;
        (Some(out), published)
    }

    /// Publishes `name` as this node stores it if it differs from the cluster's record at
    /// `base_rev`, with a compare-and-swap on that revision. When another node changed it
    /// since, takes the cluster's record at once (judged against `floor`, the record the
    /// change started from, rather than this node's unpublished change) and reports the
    /// conflict.
    async fn publish_over(
        &self,
        plane: &ControlPlane,
        secrets: &Arc<Secrets>,
        name: &str,
        base_rev: i64,
        floor: Option<([u8; 16], u64)>,
    ) -> Result<(), PublishError> {
        let n = name.to_string();
        let Some(record) = blocking(secrets, move |s| s.stored(&n)).await? else {
            return Ok(());
        };
        match plane
            .publish_secret(name, &record, base_rev)
            .await
            .map_err(PublishError::Etcd)?
        {
            Some(rev) => {
                self.saw(name, rev);
                Ok(())
            }
            None => {
                if let Some((record, rev)) = plane.secret(name).await.map_err(PublishError::Etcd)? {
                    let n = name.to_string();
                    let now = didgate_io::now_ms();
                    blocking(secrets, move |s| s.apply_replica(&n, &record, now, floor)).await?;
                    self.saw(name, rev);
                }
                Err(PublishError::Conflict(name.to_string()))
            }
        }
    }

    /// At join, before the first call: checks that this node holds the cluster's master key
    /// (naming it when the cluster has none), seeds the cluster with this node's secrets it
    /// lacks, then takes every secret the cluster holds.
    pub async fn join(
        &self,
        plane: &ControlPlane,
        secrets: &Arc<Secrets>,
    ) -> Result<(), JoinError> {
        let own = hex::encode(secrets.key_id());
        let named = plane.claim_master_key(&own).await?;
        if named != own {
            return Err(JoinError::MasterKey {
                node: own,
                cluster: named,
            });
        }
        let held: std::collections::HashSet<String> = plane
            .secrets()
            .await?
            .into_iter()
            .map(|(name, _, _)| name)
            .collect();
        for info in blocking(secrets, |s| s.list()).await? {
            if held.contains(&info.name) {
                continue;
            }
            let name = info.name.clone();
            let Some(record) = blocking(secrets, move |s| s.stored(&name)).await? else {
                continue;
            };
            if let Some(rev) = plane.publish_secret(&info.name, &record, 0).await? {
                tracing::info!(secret = %info.name, "the cluster lacked this node's secret: seeded");
                self.saw(&info.name, rev);
            }
        }
        for (name, record, rev) in plane.secrets().await? {
            let n = name.clone();
            let now = didgate_io::now_ms();
            let taken = blocking(secrets, move |s| s.apply_replica(&n, &record, now, None)).await;
            self.saw(&name, rev);
            match taken {
                Ok(_) => {}
                Err(SecretError::Older { .. }) => {
                    self.publish_over(plane, secrets, &name, rev, None).await?;
                }
                Err(e) => {
                    tracing::warn!(secret = %name, error = %e, "a secret in the cluster cannot be taken")
                }
            }
        }
        Ok(())
    }
}

/// Why a node could not take the cluster's secrets at join.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JoinError {
    /// The node's master key is not the one the cluster's secrets are wrapped under.
    #[error(
        "this node's master key (id {node}) is not the cluster's (id {cluster}): every node of a cluster holds the same master key (the same master.key, or the same key in each node's token)"
    )]
    MasterKey {
        /// This node's key id (hex).
        node: String,
        /// The id the cluster names (hex).
        cluster: String,
    },
    /// etcd.
    #[error(transparent)]
    Etcd(#[from] ClusterError),
    /// This node's newer record could not be published.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// The store.
    #[error(transparent)]
    Secret(#[from] SecretError),
}

/// Runs `f` on the secrets on a blocking thread.
async fn blocking<T: Send + 'static>(
    secrets: &Arc<Secrets>,
    f: impl FnOnce(&Secrets) -> Result<T, SecretError> + Send + 'static,
) -> Result<T, SecretError> {
    let s = secrets.clone();
    tokio::task::spawn_blocking(move || f(&s))
        .await
        .map_err(|source| SecretError::Task {
            what: "a secret of the cluster",
            source,
        })?
}

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

    /// Takes a record the cluster holds at `revision` (from the watch or a read); records
    /// older than one already seen are skipped. Blocks on the store: call it off the async
    /// threads.
    pub fn take(
        &self,
        secrets: &Secrets,
        name: &str,
        record: &[u8],
        revision: i64,
        now_ms: u64,
    ) -> Result<bool, SecretError> {
        if revision < self.seen(name) {
            return Ok(false);
        }
        let changed = secrets.apply_replica(name, record, now_ms)?;
        self.saw(name, revision);
        Ok(changed)
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
            match blocking(secrets, move |s| s.apply_replica(&n, &record, now)).await {
                Ok(_) => self.saw(&name, rev),
                Err(e) => {
                    tracing::warn!(secret = %name, error = %e, "a secret in the cluster cannot be taken")
                }
            }
        }
        Ok(())
    }

    /// Publishes `name` as this node now stores it, after a lifecycle write here. When
    /// another node changed it first, takes the cluster's record at once (so this node never
    /// keeps a version the others lack) and reports the conflict.
    pub async fn publish(
        &self,
        plane: &ControlPlane,
        secrets: &Arc<Secrets>,
        name: &str,
    ) -> Result<(), PublishError> {
        let n = name.to_string();
        let Some(record) = blocking(secrets, move |s| s.stored(&n)).await? else {
            // purged here: the cluster's copy (deleted) is purged by each node's own upkeep
            return Ok(());
        };
        match plane
            .publish_secret(name, &record, self.seen(name))
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
                    blocking(secrets, move |s| s.apply_replica(&n, &record, now)).await?;
                    self.saw(name, rev);
                }
                Err(PublishError::Conflict(name.to_string()))
            }
        }
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

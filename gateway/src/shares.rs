//! This node's part of each rate-limited upstream's limit in a cluster (specs/operation.md,
//! "Cluster", "Rate limits"; the arithmetic is `didgate_cluster::shares`). Owns the counts of
//! the calls this node was asked to admit to each upstream, their smoothed rate, and the rates
//! the other nodes published; [`crate::server::serve`] publishes and watches them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use didgate_cluster::shares::{Load, share, smooth};

/// What this node knows of the demand on the rate-limited upstreams.
#[derive(Debug, Default)]
pub struct Shares {
    /// Calls asked of each upstream since the last [`Shares::tick`].
    counts: Mutex<HashMap<String, u64>>,
    /// This node's smoothed demand, calls a second.
    mine: Mutex<BTreeMap<String, f64>>,
    /// What each other node published last.
    peers: Mutex<HashMap<String, Load>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shares {
    /// Counts one call asked of `upstream`.
    pub fn count(&self, upstream: &str) {
        let mut counts = lock(&self.counts);
        match counts.get_mut(upstream) {
            Some(n) => *n += 1,
            None => {
                counts.insert(upstream.to_string(), 1);
            }
        }
    }

    /// Folds the counts of the last `elapsed_ms` into this node's demand and returns it, as
    /// it is published (an upstream whose demand fell under 0.01 a second is dropped).
    pub fn tick(&self, elapsed_ms: u64) -> Load {
        let counts = std::mem::take(&mut *lock(&self.counts));
        let mut mine = lock(&self.mine);
        let names: Vec<String> = mine.keys().chain(counts.keys()).cloned().collect();
        for name in names {
            let previous = mine.get(&name).copied().unwrap_or(0.0);
            let d = smooth(
                previous,
                counts.get(&name).copied().unwrap_or(0),
                elapsed_ms,
            );
            if d < 0.01 {
                mine.remove(&name);
            } else {
                mine.insert(name, d);
            }
        }
        Load {
            upstreams: mine.clone(),
        }
    }

    /// Takes what node `node` published.
    pub fn peer(&self, node: String, load: Load) {
        lock(&self.peers).insert(node, load);
    }

    /// This node's share of `upstream`'s limit of `cap` calls a second, against the other
    /// members named `others`.
    pub fn share(&self, upstream: &str, others: &[String], cap: f64) -> f64 {
        let mine = lock(&self.mine).get(upstream).copied().unwrap_or(0.0);
        let peers = lock(&self.peers);
        share(
            mine,
            others.iter().map(|n| {
                peers
                    .get(n)
                    .and_then(|l| l.upstreams.get(upstream))
                    .copied()
                    .unwrap_or(0.0)
            }),
            cap,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_node_takes_the_larger_share() {
        let s = Shares::default();
        for _ in 0..60 {
            s.count("payments");
        }
        let load = s.tick(1000);
        assert_eq!(load.upstreams.get("payments"), Some(&30.0));
        let others = vec!["b".to_string(), "c".to_string()];
        // nobody else published: the floor of each other node only
        assert!((s.share("payments", &others, 1e6) - 31.0 / 33.0).abs() < 1e-9);
        let mut busy = Load::default();
        busy.upstreams.insert("payments".into(), 61.0);
        s.peer("b".into(), busy);
        assert!((s.share("payments", &others, 1e6) - 31.0 / 94.0).abs() < 1e-9);
        // held to the limit: b's 61 counts as 40
        assert!((s.share("payments", &others, 40.0) - 31.0 / 73.0).abs() < 1e-9);
        // an upstream nobody asked for: an even split
        assert!((s.share("other", &others, 1e6) - 1.0 / 3.0).abs() < 1e-9);
        // idle windows fade the demand out
        for _ in 0..20 {
            s.tick(1000);
        }
        assert!(s.tick(1000).upstreams.is_empty());
    }
}

//! Per-node shares of the per-upstream rate limits (specs/operation.md, "Cluster", "Rate
//! limits"). Pure over what the nodes publish: each node counts the calls it is asked to admit
//! to each rate-limited upstream, publishes the smoothed rate ([`Load`]), and takes of each
//! upstream's limit the part its demand is of everyone's ([`share`]), so the nodes together
//! admit about one limit, wherever the callers' homes are.
//!
//! A per-DID limit needs no share: a caller's calls are all judged on its home node.

use std::collections::BTreeMap;

/// The demand every node is counted with besides its own, calls a second: an idle node keeps a
/// small share, so its first calls are not refused while its demand is published.
pub const FLOOR_PER_SEC: f64 = 1.0;

/// What a node publishes: for each rate-limited upstream, the calls a second it was asked to
/// admit (admitted or not), smoothed.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Load {
    /// Upstream name -> calls a second.
    pub upstreams: BTreeMap<String, f64>,
}

/// The part of an upstream's limit a node takes: its demand `mine` against the demands
/// `others` of the other members serving the gateway (a member that published nothing counts
/// 0), each first held to `0..=cap` (no node can use more than the whole limit, `cap` calls a
/// second: so no value a peer publishes can shrink another's share below
/// `1 / (nodes x (cap + 1))`; NaN counts 0) and then plus [`FLOOR_PER_SEC`]. The shares of
/// nodes that see the same demands add up to 1.
pub fn share(mine: f64, others: impl IntoIterator<Item = f64>, cap: f64) -> f64 {
    let cap = if cap.is_finite() && cap > 0.0 {
        cap
    } else {
        0.0
    };
    let clean = |d: f64| if d > 0.0 { d.min(cap) } else { 0.0 };
    let me = clean(mine) + FLOOR_PER_SEC;
    let total = me
        + others
            .into_iter()
            .map(|d| clean(d) + FLOOR_PER_SEC)
            .sum::<f64>();
    me / total
}

/// Smooths a node's measured rate: half the last value, half the new window's (`count` calls in
/// `elapsed_ms`).
pub fn smooth(previous: f64, count: u64, elapsed_ms: u64) -> f64 {
    if elapsed_ms == 0 {
        return previous;
    }
    let rate = count as f64 * 1000.0 / elapsed_ms as f64;
    0.5 * previous + 0.5 * rate
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_follow_demand_and_add_up_to_one() {
        let demands = [30.0, 10.0, 0.0];
        let shares: Vec<f64> = (0..3)
            .map(|i| {
                let others = demands
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, d)| *d);
                share(demands[i], others, 1e6)
            })
            .collect();
        assert!((shares.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert!(
            shares[0] > 0.7 && shares[1] > 0.2 && shares[2] > 0.0,
            "{shares:?}"
        );
        // alone, a node takes the whole limit; idle nodes split it evenly
        assert_eq!(share(5.0, [], 30.0), 1.0);
        assert!((share(0.0, [0.0, 0.0], 30.0) - 1.0 / 3.0).abs() < 1e-9);
        // nonsense published by a peer counts as nothing, or as the whole limit at most
        assert!((share(0.0, [f64::NAN, -4.0], 30.0) - 1.0 / 3.0).abs() < 1e-9);
        let starved = share(0.0, [f64::INFINITY, f64::MAX, 1e300], 30.0);
        assert!((starved - 1.0 / 94.0).abs() < 1e-9, "{starved}");
        // a caller hammering its home counts as the limit, no more
        assert!((share(10_000.0, [30.0], 30.0) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn rates_are_smoothed() {
        assert_eq!(smooth(0.0, 100, 1000), 50.0);
        assert_eq!(smooth(50.0, 100, 1000), 75.0);
        assert_eq!(smooth(7.0, 5, 0), 7.0);
    }
}

//! Whether a node may serve: fail closed when its lease keep-alive goes unanswered
//! (specs/operation.md, "Cluster", "Fail closed"). Pure over `now`: the plane records each
//! answered keep-alive; the gateway asks before admitting a call.

use std::sync::atomic::{AtomicU64, Ordering};

/// A node's view of its control plane: when etcd last answered its lease keep-alive.
#[derive(Debug)]
pub struct Health {
    /// How long an unanswered keep-alive is tolerated: a third of the lease's TTL.
    bound_ms: u64,
    /// When a keep-alive was last answered with the lease alive, ms on the caller's clock (a
    /// running node's: [`crate::monotonic_ms`], never the wall clock); 0 never.
    last_ack_ms: AtomicU64,
}

impl Health {
    /// The health of a lease of `lease_ttl_ms`, answered last at `now_ms` (the join).
    pub fn new(lease_ttl_ms: u64, now_ms: u64) -> Self {
        Self {
            bound_ms: lease_ttl_ms / 3,
            last_ack_ms: AtomicU64::new(now_ms),
        }
    }

    /// How long an unanswered keep-alive is tolerated.
    pub fn bound_ms(&self) -> u64 {
        self.bound_ms
    }

    /// Records a keep-alive etcd answered at `now_ms` with the lease alive.
    pub fn answered(&self, now_ms: u64) {
        self.last_ack_ms.fetch_max(now_ms, Ordering::AcqRel);
    }

    /// When etcd last answered.
    pub fn last_answered_ms(&self) -> u64 {
        self.last_ack_ms.load(Ordering::Acquire)
    }

    /// Whether the node may serve at `now_ms`: etcd answered within the bound.
    pub fn serving(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.last_answered_ms()) <= self.bound_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_serves_while_its_keep_alives_are_answered_within_a_third_of_the_ttl() {
        let h = Health::new(9_000, 1_000);
        assert_eq!(h.bound_ms(), 3_000);
        assert!(h.serving(4_000));
        assert!(!h.serving(4_001));
        h.answered(4_500);
        assert!(h.serving(7_500));
        // an answer that arrives late never moves the time back
        h.answered(2_000);
        assert_eq!(h.last_answered_ms(), 4_500);
    }
}

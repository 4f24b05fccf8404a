//! What a run has found so far, passed explicitly to every check: the violations, warnings
//! and skipped checks in the order the checks found them, and every root a log signed (in a
//! checkpoint or a receipt), compared per size: two different ones are proof of equivocation.

use std::collections::HashMap;

use didgate_protocol::message::Digest;

use super::report::{Skipped, Violation, ViolationKind};

/// What the checks found so far, passed to each of them.
#[derive(Default)]
pub(super) struct Ctx {
    pub(super) violations: Vec<Violation>,
    /// The roots signed so far, per log and size.
    pub(super) roots: Roots,
    pub(super) warnings: Vec<Violation>,
    pub(super) skipped: Vec<Skipped>,
    /// Per gateway chain label: receipts whose root was not recomputed (the chain has gaps).
    pub(super) receipt_roots_unchecked: HashMap<String, u64>,
}

impl Ctx {
    /// Records a violation of `kind` in `chain` (at `seq`, when one entry is concerned).
    pub(super) fn flag(
        &mut self,
        chain: &str,
        seq: Option<u64>,
        kind: ViolationKind,
        detail: impl Into<String>,
    ) {
        self.violations.push(Violation {
            chain: chain.to_string(),
            seq,
            kind,
            detail: detail.into(),
        });
    }
}

/// Signed roots seen per (log DID, size): two different ones are proof of equivocation.
#[derive(Default)]
pub(super) struct Roots {
    /// log DID -> size -> (root, where it was signed)
    seen: HashMap<String, HashMap<u64, (Digest, String)>>,
}

impl Roots {
    /// Records that `log` signed `root` for `size` (in `source`), and flags a fork in `chain`
    /// when it signed another root for that size before.
    pub(super) fn record(
        &mut self,
        log: &str,
        size: u64,
        root: Digest,
        source: String,
        chain: &str,
        cx: &mut Ctx,
    ) {
        match self.seen.get(log).and_then(|sizes| sizes.get(&size)) {
            Some((other, where_)) if *other != root => cx.flag(
                chain,
                Some(size.saturating_sub(1)),
                ViolationKind::Fork,
                format!(
                    "{log} signed two roots for size {size}: {} in {where_} and {} in {source}",
                    hex::encode(other),
                    hex::encode(root)
                ),
            ),
            Some(_) => {}
            None => {
                match self.seen.get_mut(log) {
                    Some(sizes) => sizes.insert(size, (root, source)),
                    None => self
                        .seen
                        .entry(log.to_string())
                        .or_default()
                        .insert(size, (root, source)),
                };
            }
        }
    }
}

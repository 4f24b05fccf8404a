//! Witness entries (amendment 2.9; specs/audit-log.md, "Witness entries"): each `witness`
//! entry of every chain holds a peer's signed checkpoint. Owns their checks: the checkpoint
//! opens, signed by the entry's `subject` for that log (else `bad_signature`), its node
//! certificate holds (else `bad_node_certificate`), both reported in the witnessing chain; and,
//! when the witnessed chain (the given chain whose id the checkpoint names) is given, that
//! chain still has the witnessed size, head and root (else `witnessed_rewrite`, reported in
//! the witnessed chain, once per witnessing chain). A witnessed checkpoint counts for nothing
//! else: it seals nothing of the witnessed chain and is not recorded for fork detection.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use didgate_protocol::message::{Checkpoint, Digest};

use super::chain::{Chains, Checked};
use super::checkpoints::check_node_cert;
use super::findings::Ctx;
use super::report::{Skipped, ViolationKind};
use super::signatures::Sigs;
use crate::entry::{Entry, EntryKind};
use crate::nodes::SignerRule;

/// Every chain's witness entries, the gateway chains first, each in seq order.
pub(super) fn check_all((gws, cls): &Chains, sigs: &Sigs<'_>, rule: &SignerRule<'_>, cx: &mut Ctx) {
    let all: Vec<&Checked> = gws.iter().chain(cls).collect();
    // a chain given twice: the first copy is the one witnesses are held against
    let mut by_id: HashMap<Digest, usize> = HashMap::new();
    for (i, c) in all.iter().enumerate() {
        if let Some(id) = c.id {
            by_id.entry(id).or_insert(i);
        }
    }
    for w in &all {
        // per witnessed chain (by index, so the report's order is the chains' order)
        let mut found: BTreeMap<usize, Group> = BTreeMap::new();
        let witnesses = w
            .items
            .iter()
            .filter(|i| i.decoded && i.entry.kind == EntryKind::Witness);
        for item in witnesses {
            let Some(cp) = open_witness(w, &item.entry, sigs, rule, cx) else {
                continue;
            };
            let Some(&ti) = by_id.get(&cp.chain) else {
                // the witnessed chain was not given: nothing to hold the checkpoint against
                continue;
            };
            let group = found.entry(ti).or_default();
            group.judge(w, item.entry.seq, &cp, all[ti], cx);
        }
        for (ti, group) in found {
            group.report(w, all[ti], cx);
        }
    }
}

/// The checkpoint a witness entry holds, opened, if it is signed by the entry's `subject` for
/// that log (else `bad_signature`); its node certificate judged on the way.
fn open_witness<'s>(
    w: &Checked,
    e: &Entry,
    sigs: &'s Sigs<'_>,
    rule: &SignerRule<'_>,
    cx: &mut Ctx,
) -> Option<Cow<'s, Checkpoint>> {
    let seq = Some(e.seq);
    // the decoder requires both on a witness entry
    let (Some(bytes), Some(subject)) = (&e.signed, &e.subject) else {
        return None;
    };
    let opened = match sigs.open::<Checkpoint>(bytes) {
        Ok(cp) => cp,
        Err(err) => {
            cx.flag(
                &w.label,
                seq,
                ViolationKind::BadSignature,
                format!("witness entry: the checkpoint does not open: {err}"),
            );
            return None;
        }
    };
    let signer = opened.envelope.signer();
    if signer.as_str() != subject || opened.message.log != *subject {
        cx.flag(
            &w.label,
            seq,
            ViolationKind::BadSignature,
            format!(
                "witness entry: the checkpoint is signed by {signer} for the log {}, not by its subject {subject}",
                opened.message.log
            ),
        );
        return None;
    }
    let where_ = format!("{} seq {}: the witnessed checkpoint", w.label, e.seq);
    check_node_cert((&w.label, seq), &where_, signer, &opened.message, rule, cx);
    Some(opened.message)
}

/// Why a witnessed checkpoint does not hold against its chain.
enum Broken {
    /// The chain has fewer entries than the checkpoint covers (its extent).
    Shorter(u64),
    /// Its first `size` entries have another head or root.
    Differs,
}

/// The first witness of smallest size that fails against one chain.
struct Failure {
    size: u64,
    /// The witness entry's seq in the witnessing chain.
    seq: u64,
    log: String,
    time_ms: u64,
    broken: Broken,
}

/// What one witnessing chain's witnesses of one witnessed chain found.
#[derive(Default)]
struct Group {
    /// The failing witness of smallest size (the first of them among equal sizes).
    first: Option<Failure>,
    /// Witness entries that failed.
    failed: u64,
    /// Witness entries whose head and root could not be recomputed, and the first one's seq.
    skipped: u64,
    first_skipped: u64,
}

impl Group {
    /// The checkpoint of the witness entry at `seq` of `w` against the chain `t` it names: a
    /// checkpoint by another key than `t`'s owner is `bad_signature` in `w`; otherwise `t` must
    /// have `size` entries whose head and root are the checkpoint's (when its Merkle positions
    /// are known).
    fn judge(&mut self, w: &Checked, seq: u64, cp: &Checkpoint, t: &Checked, cx: &mut Ctx) {
        if let Some(owner) = &t.owner
            && owner.as_str() != cp.log
        {
            cx.flag(
                &w.label,
                Some(seq),
                ViolationKind::BadSignature,
                format!(
                    "witness entry: a checkpoint of {} signed by {}, which does not own it ({owner} does)",
                    t.label, cp.log
                ),
            );
            return;
        }
        if cp.size == 0 {
            return;
        }
        let extent = t.extent();
        let broken = if cp.size > extent {
            Broken::Shorter(extent)
        } else if t.gaps {
            if self.skipped == 0 {
                self.first_skipped = seq;
            }
            self.skipped += 1;
            return;
        } else {
            let head = t.at(cp.size - 1).map(|item| item.hash);
            if head == Some(cp.head) && t.tree.root_at(cp.size) == Some(cp.root) {
                return;
            }
            Broken::Differs
        };
        self.failed += 1;
        if self.first.as_ref().is_none_or(|f| cp.size < f.size) {
            self.first = Some(Failure {
                size: cp.size,
                seq,
                log: cp.log.clone(),
                time_ms: cp.time_ms,
                broken,
            });
        }
    }

    /// One `witnessed_rewrite` in `t` for the failing witness of smallest size (counting the
    /// others), and one skipped check for the witnesses whose roots were not recomputed.
    fn report(self, w: &Checked, t: &Checked, cx: &mut Ctx) {
        if let Some(f) = self.first {
            let (at, what) = match f.broken {
                Broken::Shorter(extent) => (extent, format!("the chain has {extent} entries")),
                Broken::Differs => (
                    f.size - 1,
                    format!("the chain's first {} entries differ from it", f.size),
                ),
            };
            let others = match self.failed {
                0 | 1 => String::new(),
                n => format!(
                    " ({n} witness entries of {} fail against this chain; this one witnessed the smallest size)",
                    w.label
                ),
            };
            cx.flag(
                &t.label,
                Some(at),
                ViolationKind::WitnessedRewrite,
                format!(
                    "{} seq {} witnessed this chain at size {} ({}'s checkpoint, time_ms {}), but {what}{others}",
                    w.label, f.seq, f.size, f.log, f.time_ms
                ),
            );
        }
        if self.skipped > 0 {
            cx.skipped.push(Skipped {
                chain: t.label.clone(),
                check: format!(
                    "{} witness entr{} of {} (from seq {}): head and root",
                    self.skipped,
                    if self.skipped == 1 { "y" } else { "ies" },
                    w.label,
                    self.first_skipped
                ),
                reason:
                    "entries are missing or out of order, so their Merkle positions are unknown"
                        .into(),
            });
        }
    }
}

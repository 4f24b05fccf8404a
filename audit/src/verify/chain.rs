//! Per chain: each stored entry hashed and decoded, then the chain's structure (key order,
//! contiguous seqs, previous-hash links, the recorded head, the genesis, the format evolution
//! rule) and its Merkle tree. Each chain is checked on its own, chains in parallel.

use std::collections::HashMap;
use std::sync::Mutex;

use didgate_protocol::cbor::DecodeError;
use didgate_protocol::message::Digest;
use didgate_protocol::{Did, Version};

use super::findings::Ctx;
use super::parallel::{par_map, par_run, par_tasks};
use super::report::{ChainRecords, ViolationKind};
use crate::entry::{Entry, EntryKind, Role, entry_hash};
use crate::merkle;

/// One stored entry, hashed and decoded (the part of [`check_links`] that needs no order).
pub(super) struct Decoded {
    hash: Digest,
    leaf: Digest,
    entry: Result<Box<Entry>, DecodeError>,
}

fn decode(bytes: &[u8]) -> Decoded {
    let hash = entry_hash(bytes);
    Decoded {
        hash,
        leaf: merkle::leaf_hash(&hash),
        // the fast path reads only the strict subset; anything else is judged by the strict
        // decoder (encoding rules and the kind's field table), never by a lenient one
        entry: Entry::decode_plain(bytes)
            .map_or_else(|| Entry::decode_strict(bytes), Ok)
            .map(Box::new),
    }
}

/// Every entry of every chain (gateway chains first) hashed and decoded, on up to `threads`
/// threads.
pub(super) fn decode_all(
    gateways: &[ChainRecords],
    clients: &[ChainRecords],
    threads: usize,
) -> Vec<Vec<Decoded>> {
    gateways
        .iter()
        .chain(clients)
        .map(|r| par_map(&r.entries, threads, |(_, bytes)| decode(bytes)))
        .collect()
}

/// The gateway chains and the client chains, checked.
pub(super) type Chains = (Vec<Checked>, Vec<Checked>);

/// Every chain's structure ([`check_links`]), each chain on its own (in parallel), their
/// violations in chain order; also each chain's Merkle leaves, for [`build_trees`].
pub(super) fn check_all(
    gateways: &[ChainRecords],
    clients: &[ChainRecords],
    decoded: Vec<Vec<Decoded>>,
    threads: usize,
    cx: &mut Ctx,
) -> (Chains, Vec<Vec<Digest>>) {
    let mut decoded = decoded.into_iter();
    let jobs: Vec<(&ChainRecords, Role, Mutex<Vec<Decoded>>)> = gateways
        .iter()
        .map(|r| (r, Role::Gateway))
        .chain(clients.iter().map(|r| (r, Role::Client)))
        .map(|(r, role)| (r, role, Mutex::new(decoded.next().unwrap_or_default())))
        .collect();
    let checked = par_tasks(jobs.len(), threads, |i| {
        let (rec, role, d) = &jobs[i];
        let d = d
            .lock()
            .map(|mut d| std::mem::take(&mut *d))
            .unwrap_or_default();
        let mut own = Ctx::default();
        let (c, l) = check_links(rec, d, *role, &mut own);
        (c, l, own.violations)
    });
    let mut leaves = Vec::with_capacity(checked.len());
    let mut gws: Vec<Checked> = Vec::with_capacity(gateways.len());
    let mut cls: Vec<Checked> = Vec::with_capacity(clients.len());
    for (i, (c, l, violations)) in checked.into_iter().enumerate() {
        cx.violations.extend(violations);
        leaves.push(l);
        if i < gateways.len() {
            gws.push(c);
        } else {
            cls.push(c);
        }
    }
    ((gws, cls), leaves)
}

/// Builds each chain's Merkle tree from its leaves, in the order [`check_all`] gave them.
pub(super) fn build_trees(chains: &mut Chains, leaves: Vec<Vec<Digest>>, threads: usize) {
    let (gws, cls) = chains;
    for (c, l) in gws.iter_mut().chain(cls.iter_mut()).zip(leaves) {
        c.tree = Tree::build(l, threads);
    }
}

/// A decoded, chain-checked entry.
pub(super) struct Item {
    /// The key it is stored under.
    pub(super) key: u64,
    /// Boxed: entries are large and are moved between the parallel and sequential steps.
    pub(super) entry: Box<Entry>,
    pub(super) hash: Digest,
    /// False for the placeholder kept where the stored bytes do not decode.
    pub(super) decoded: bool,
}

/// One chain after its structural checks: its owner and id from the genesis, its entries in
/// key order, and its Merkle tree.
pub(super) struct Checked {
    pub(super) label: String,
    pub(super) owner: Option<Did>,
    pub(super) id: Option<Digest>,
    pub(super) items: Vec<Item>,
    pub(super) tree: Tree,
    /// Index in `items` of each seq that sits at its own key (filled only when `gaps`: without
    /// gaps, seq n is `items[n]`).
    by_seq: HashMap<u64, usize>,
    /// Entries are missing or out of order: positions in the Merkle tree are unknown, so roots
    /// are not recomputed (the missing or reordered entries are reported instead).
    pub(super) gaps: bool,
}

/// Every complete subtree of a chain's Merkle tree, level by level, so the root at any size is
/// O(log n) (specs/audit-log.md, "Merkle tree").
#[derive(Default)]
pub(super) struct Tree {
    levels: Vec<Vec<Digest>>,
}

impl Tree {
    /// The tree over `leaves` (leaf hashes of the entry hashes, in key order), each level
    /// hashed on up to `threads` threads.
    fn build(leaves: Vec<Digest>, threads: usize) -> Self {
        let mut levels = vec![leaves];
        while levels.last().is_some_and(|l| l.len() > 1) {
            let next = levels
                .last()
                .map(|l| {
                    par_run(
                        l.len() / 2,
                        threads,
                        || (),
                        |_, i| merkle::node_hash(&l[2 * i], &l[2 * i + 1]),
                    )
                    .0
                })
                .unwrap_or_default();
            levels.push(next);
        }
        Self { levels }
    }

    fn size(&self) -> u64 {
        self.levels.first().map_or(0, |l| l.len() as u64)
    }

    pub(super) fn root_at(&self, size: u64) -> Option<Digest> {
        if size > self.size() {
            return None;
        }
        merkle::root_at(self, size)
    }
}

impl merkle::SubtreeSource for Tree {
    fn subtree(&self, level: u32, index: u64) -> Option<Digest> {
        self.levels
            .get(level as usize)?
            .get(usize::try_from(index).ok()?)
            .copied()
    }
}

impl Checked {
    /// The chain's extent: its highest stored key + 1 (0 when empty), not its number of
    /// entries, so that a missing entry is reported as missing, not as a truncation.
    pub(super) fn extent(&self) -> u64 {
        self.items
            .iter()
            .map(|i| i.key.saturating_add(1))
            .max()
            .unwrap_or(0)
    }

    /// The entry with this seq, if it sits at its own key.
    pub(super) fn at(&self, seq: u64) -> Option<&Item> {
        if !self.gaps {
            // every entry sits at its own key and the keys are 0.. in order
            return self.items.get(usize::try_from(seq).ok()?);
        }
        self.by_seq.get(&seq).and_then(|i| self.items.get(*i))
    }
}

/// Structure of one chain: decoding, order, links, head, genesis, versions.
/// `decoded` holds each entry of `rec` hashed and decoded; also returns the Merkle leaves.
fn check_links(
    rec: &ChainRecords,
    decoded: Vec<Decoded>,
    role: Role,
    cx: &mut Ctx,
) -> (Checked, Vec<Digest>) {
    let label = &rec.label;
    let (items, leaves) = link_items(rec, decoded, cx);
    check_head(rec, &items, cx);
    let (owner, id) = check_genesis(label, &items, role, cx);
    check_versions(label, &items, cx);
    let gaps = items
        .iter()
        .enumerate()
        .any(|(i, item)| item.key != i as u64 || item.entry.seq != item.key);
    let mut by_seq = HashMap::new();
    if gaps {
        for (i, item) in items.iter().enumerate() {
            if item.entry.seq == item.key {
                by_seq.entry(item.key).or_insert(i);
            }
        }
    }
    let checked = Checked {
        label: label.clone(),
        owner,
        id,
        items,
        tree: Tree::default(),
        by_seq,
        gaps,
    };
    (checked, leaves)
}

/// Each stored entry of `rec` in key order as an [`Item`] (a placeholder where the bytes do not
/// decode), and its Merkle leaf; flags keys that do not increase, entries that do not decode
/// and, through [`check_place`], what breaks the seqs and the links.
fn link_items(rec: &ChainRecords, decoded: Vec<Decoded>, cx: &mut Ctx) -> (Vec<Item>, Vec<Digest>) {
    let label = &rec.label;
    let mut items: Vec<Item> = Vec::with_capacity(rec.entries.len());
    let mut leaves: Vec<Digest> = Vec::with_capacity(rec.entries.len());
    let mut expected = 0u64;
    for ((key, _), d) in rec.entries.iter().zip(decoded) {
        let hash = d.hash;
        leaves.push(d.leaf);
        if let Some(prev) = items.last()
            && *key <= prev.key
        {
            // a duplicated or moved item: keys are unique and increase
            cx.flag(
                label,
                Some(*key),
                ViolationKind::ReorderedEntries,
                format!("key {key} does not increase (it follows key {})", prev.key),
            );
        }
        let entry = match d.entry {
            Ok(e) => e,
            Err(e) => {
                cx.flag(
                    label,
                    Some(*key),
                    ViolationKind::AlteredEntry,
                    format!("does not decode: {e}"),
                );
                // keep the position so later links are judged against the stored bytes
                let mut placeholder = Entry::new(EntryKind::Refusals, 0);
                placeholder.seq = *key;
                items.push(Item {
                    key: *key,
                    entry: Box::new(placeholder),
                    hash,
                    decoded: false,
                });
                expected = key.saturating_add(1);
                continue;
            }
        };
        check_place(label, *key, &entry, expected, items.last(), cx);
        expected = key.saturating_add(1);
        items.push(Item {
            key: *key,
            entry,
            hash,
            decoded: true,
        });
    }
    (items, leaves)
}

/// A decoded entry stored at `key`, after `prev` (`expected` is the key after it): its seq is
/// its key, no seq is missing before it, and it links to `prev` (entry 0: to nothing).
fn check_place(
    label: &str,
    key: u64,
    entry: &Entry,
    expected: u64,
    prev: Option<&Item>,
    cx: &mut Ctx,
) {
    if entry.seq != key {
        cx.flag(
            label,
            Some(key),
            ViolationKind::ReorderedEntries,
            format!("stored at {key} but says seq {}", entry.seq),
        );
    }
    if key > expected {
        cx.flag(
            label,
            Some(expected),
            ViolationKind::MissingEntry,
            format!("seq {expected}..{key} absent"),
        );
    }
    if let Some(prev) = prev {
        // Judge a link only between two entries that sit at their own, adjacent keys: a
        // moved entry is reported as reordered, not as its neighbour's alteration.
        let adjacent = entry.seq == key && prev.entry.seq == prev.key && prev.key + 1 == key;
        if adjacent && entry.prev != prev.hash {
            cx.flag(
                label,
                Some(prev.entry.seq),
                ViolationKind::AlteredEntry,
                format!("hash differs from what seq {key} links to"),
            );
        }
    } else if key == 0 && entry.prev != [0; 32] {
        cx.flag(
            label,
            Some(0),
            ViolationKind::BadGenesis,
            "entry 0 has a previous hash",
        );
    }
}

/// The chain's last entry against the head its store recorded as acknowledged.
fn check_head(rec: &ChainRecords, items: &[Item], cx: &mut Ctx) {
    let label = &rec.label;
    if let (Some(head), last) = (rec.head, items.last()) {
        match last {
            Some(l) if l.entry.seq == head.seq && l.hash != head.hash => cx.flag(
                label,
                Some(head.seq),
                ViolationKind::AlteredEntry,
                "hash differs from the recorded head",
            ),
            Some(l) if l.entry.seq < head.seq => cx.flag(
                label,
                Some(l.entry.seq + 1),
                ViolationKind::TruncatedChain,
                format!(
                    "ends at seq {} but the recorded head is seq {}",
                    l.entry.seq, head.seq
                ),
            ),
            Some(l) if l.entry.seq > head.seq => cx.flag(
                label,
                Some(head.seq + 1),
                ViolationKind::AlteredEntry,
                format!(
                    "entries after the recorded head (seq {}) were never acknowledged",
                    head.seq
                ),
            ),
            None => cx.flag(
                label,
                None,
                ViolationKind::TruncatedChain,
                "empty chain with a recorded head",
            ),
            _ => {}
        }
    }
}

/// The genesis: entry 0, of the owner's `role`, naming the owner's did:key. Returns the owner
/// and the chain id (the genesis's hash), when there is a genesis.
fn check_genesis(
    label: &str,
    items: &[Item],
    role: Role,
    cx: &mut Ctx,
) -> (Option<Did>, Option<Digest>) {
    match items.first() {
        Some(g) if g.entry.seq == 0 && g.entry.kind == EntryKind::Genesis => {
            if g.entry.role != Some(role) {
                cx.flag(
                    label,
                    Some(0),
                    ViolationKind::BadGenesis,
                    format!("role is {:?}, expected {role:?}", g.entry.role),
                );
            }
            match g.entry.owner.as_deref().map(Did::parse) {
                Some(Ok(did)) => (Some(did), Some(g.hash)),
                _ => {
                    cx.flag(
                        label,
                        Some(0),
                        ViolationKind::BadGenesis,
                        "owner is not a did:key",
                    );
                    (None, Some(g.hash))
                }
            }
        }
        _ => {
            cx.flag(
                label,
                Some(0),
                ViolationKind::BadGenesis,
                "no genesis entry",
            );
            (None, None)
        }
    }
}

/// The format evolution rule over one chain's entries in key order (specs/audit-log.md,
/// "Format evolution"): the chain starts at its first entry's version; a `format` entry
/// switches it to the next version, once; every other entry is of the chain's version at its
/// place. Entries that do not decode are reported as altered and skipped here.
fn check_versions(label: &str, items: &[Item], cx: &mut Ctx) {
    let mut decoded = items.iter().filter(|i| i.decoded);
    let Some(first) = decoded.next() else {
        return;
    };
    let mut current = first.entry.v;
    let mut switched_at: Option<u64> = None;
    for item in decoded {
        let e = &item.entry;
        if e.kind == EntryKind::Format {
            let next = Version::from_u64(current)
                .and_then(Version::next)
                .map(Version::as_u64);
            if let Some(at) = switched_at {
                cx.flag(
                    label,
                    Some(item.key),
                    ViolationKind::FormatViolation,
                    format!(
                        "a second switch (to version {}); the chain switched at seq {at}",
                        e.v
                    ),
                );
            } else if next != Some(e.v) {
                cx.flag(
                    label,
                    Some(item.key),
                    ViolationKind::FormatViolation,
                    format!("a switch from version {current} to version {}", e.v),
                );
            }
            switched_at.get_or_insert(item.key);
            current = e.v;
        } else if e.v != current {
            let why = match switched_at {
                Some(at) => format!(
                    "a version {} entry after the switch to version {current} at seq {at}",
                    e.v
                ),
                None => format!(
                    "a version {} entry in a version {current} chain without a switch",
                    e.v
                ),
            };
            cx.flag(label, Some(item.key), ViolationKind::FormatViolation, why);
        }
    }
}

//! The verifier: a pure function over the records of one or more gateway chains and any
//! number of client chains (specs/audit-log.md, "Verification").
//!
//! It checks each chain (decoding, contiguous seq, previous-hash links, the recorded head,
//! genesis, every embedded signature, call IDs, closure of executing entries) and every
//! cross-link between chains, and names each violation with its chain, seq and kind.

use std::collections::{HashMap, HashSet};

use didgate_protocol::Did;
use didgate_protocol::message::{
    self, ChainHead, Checkpoint, Digest, EntryRef, Receipt, Refusal, Request,
};
use serde::Serialize;

use crate::entry::{Entry, EntryKind, Outcome, Role, entry_hash};
use crate::merkle;

/// The records of one chain as read from a store or an export.
#[derive(Debug, Clone)]
pub struct ChainRecords {
    /// A label for reports (a path).
    pub label: String,
    /// (key seq, stored bytes) in key order.
    pub entries: Vec<(u64, Vec<u8>)>,
    /// The head the store recorded as acknowledged, if any.
    pub head: Option<EntryRef>,
    /// The chain owner's signed checkpoints (COSE_Sign1).
    pub checkpoints: Vec<Vec<u8>>,
}

/// The kind of a violation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ViolationKind {
    /// An entry's bytes differ from what its successor (or the recorded head) committed to,
    /// or do not decode.
    AlteredEntry,
    /// A seq is absent.
    MissingEntry,
    /// Entries are out of order (key and seq disagree).
    ReorderedEntries,
    /// The chain ends before its recorded head.
    TruncatedChain,
    /// The chain has no valid genesis, or the owner's role is wrong for its position.
    BadGenesis,
    /// An embedded signed message does not verify, or is signed by the wrong party.
    BadSignature,
    /// An entry's call ID differs from the digest of the signed message it holds.
    CallIdMismatch,
    /// An executing entry is never closed, or a close has no executing entry.
    UnclosedCall,
    /// A call is closed twice, or executed twice.
    DuplicateCall,
    /// A client request has no result entry.
    UnansweredRequest,
    /// A receipt or refusal names a gateway entry that is missing or different.
    ReceiptMismatch,
    /// The two sides disagree on a request or response digest, or status.
    DigestMismatch,
    /// A gateway entry holds a request the client's chain lacks.
    RequestNotInClientChain,
    /// A gateway entry records a client head the client's chain lacks.
    HeadNotInClientChain,
    /// Two client heads of one chain fork (same seq, different hash).
    HeadFork,
    /// The same log signed two different roots for one size (checkpoints or receipts): proof of
    /// equivocation.
    Fork,
}

/// One violation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// The chain's label.
    pub chain: String,
    /// The seq concerned, when one entry is.
    pub seq: Option<u64>,
    /// What is wrong.
    pub kind: ViolationKind,
    /// Details.
    pub detail: String,
}

impl ViolationKind {
    /// The snake_case name, as in the JSON report.
    pub fn name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    }
}

impl std::fmt::Display for ViolationKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.seq {
            Some(seq) => write!(
                f,
                "{} seq {}: {}: {}",
                self.chain, seq, self.kind, self.detail
            ),
            None => write!(f, "{}: {}: {}", self.chain, self.kind, self.detail),
        }
    }
}

/// Summary of one chain.
#[derive(Debug, Clone, Serialize)]
pub struct ChainSummary {
    /// Its label.
    pub label: String,
    /// Owner DID, from the genesis.
    pub owner: Option<String>,
    /// Chain id, hex.
    pub id: Option<String>,
    /// Number of entries.
    pub entries: u64,
    /// Calls recorded (executing for a gateway, requests for a client).
    pub calls: u64,
}

/// The verifier's report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Per chain.
    pub chains: Vec<ChainSummary>,
    /// Cross-links checked.
    pub cross_links: u64,
    /// Every violation found.
    pub violations: Vec<Violation>,
}

impl Report {
    /// True when nothing is violated.
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Executing entries by call: (gateway index, seq, signed request, client head).
type Executing = HashMap<Digest, (usize, u64, Vec<u8>, Option<ChainHead>)>;

/// A decoded, chain-checked entry.
struct Item {
    /// The key it is stored under.
    key: u64,
    entry: Entry,
    hash: Digest,
}

struct Checked {
    label: String,
    owner: Option<Did>,
    id: Option<Digest>,
    items: Vec<Item>,
    tree: Tree,
    /// Index in `items` of each seq that sits at its own key.
    by_seq: HashMap<u64, usize>,
    /// Entries are missing or out of order: positions in the Merkle tree are unknown, so roots
    /// are not recomputed (the missing or reordered entries are reported instead).
    gaps: bool,
}

/// Every complete subtree of a chain's Merkle tree, level by level, so the root at any size is
/// O(log n) (specs/audit-log.md, "Merkle tree").
#[derive(Default)]
struct Tree {
    levels: Vec<Vec<Digest>>,
}

impl Tree {
    fn build(entry_hashes: impl Iterator<Item = Digest>) -> Self {
        let mut levels = vec![
            entry_hashes
                .map(|h| merkle::leaf_hash(&h))
                .collect::<Vec<_>>(),
        ];
        while levels.last().is_some_and(|l| l.len() > 1) {
            let next = levels
                .last()
                .map(|l| {
                    l.chunks_exact(2)
                        .map(|p| merkle::node_hash(&p[0], &p[1]))
                        .collect()
                })
                .unwrap_or_default();
            levels.push(next);
        }
        Self { levels }
    }

    fn size(&self) -> u64 {
        self.levels.first().map_or(0, |l| l.len() as u64)
    }

    fn root_at(&self, size: u64) -> Option<Digest> {
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
    /// The entry with this seq, if it sits at its own key.
    fn at(&self, seq: u64) -> Option<&Item> {
        self.by_seq.get(&seq).and_then(|i| self.items.get(*i))
    }
}

struct Ctx {
    violations: Vec<Violation>,
    roots: Roots,
}

impl Ctx {
    fn flag(
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

/// Structure of one chain: decoding, order, links, head, genesis.
fn check_links(rec: &ChainRecords, role: Role, cx: &mut Ctx) -> Checked {
    let label = &rec.label;
    let mut items: Vec<Item> = Vec::with_capacity(rec.entries.len());
    let mut expected = 0u64;
    for (key, bytes) in &rec.entries {
        let hash = entry_hash(bytes);
        let entry = match Entry::decode(bytes) {
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
                    entry: placeholder,
                    hash,
                });
                expected = key.saturating_add(1);
                continue;
            }
        };
        if entry.seq != *key {
            cx.flag(
                label,
                Some(*key),
                ViolationKind::ReorderedEntries,
                format!("stored at {key} but says seq {}", entry.seq),
            );
        }
        if *key > expected {
            cx.flag(
                label,
                Some(expected),
                ViolationKind::MissingEntry,
                format!("seq {expected}..{key} absent"),
            );
        }
        if let Some(prev) = items.last() {
            // Judge a link only between two entries that sit at their own, adjacent keys: a
            // moved entry is reported as reordered, not as its neighbour's alteration.
            let adjacent = entry.seq == *key && prev.entry.seq == prev.key && prev.key + 1 == *key;
            if adjacent && entry.prev != prev.hash {
                cx.flag(
                    label,
                    Some(prev.entry.seq),
                    ViolationKind::AlteredEntry,
                    format!("hash differs from what seq {key} links to"),
                );
            }
        } else if *key == 0 && entry.prev != [0; 32] {
            cx.flag(
                label,
                Some(0),
                ViolationKind::BadGenesis,
                "entry 0 has a previous hash",
            );
        }
        expected = key.saturating_add(1);
        items.push(Item {
            key: *key,
            entry,
            hash,
        });
    }
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
    let (owner, id) = match items.first() {
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
    };
    let tree = Tree::build(items.iter().map(|i| i.hash));
    let mut by_seq = HashMap::with_capacity(items.len());
    let mut gaps = false;
    for (i, item) in items.iter().enumerate() {
        gaps |= item.key != i as u64 || item.entry.seq != item.key;
        if item.entry.seq == item.key {
            by_seq.entry(item.key).or_insert(i);
        }
    }
    Checked {
        label: label.clone(),
        owner,
        id,
        items,
        tree,
        by_seq,
        gaps,
    }
}

/// Signed roots seen per (log DID, size): two different ones are proof of equivocation.
#[derive(Default)]
struct Roots {
    seen: HashMap<(String, u64), (Digest, String)>,
}

impl Roots {
    fn record(
        &mut self,
        log: &str,
        size: u64,
        root: Digest,
        source: String,
        chain: &str,
        cx: &mut Ctx,
    ) {
        match self.seen.get(&(log.to_string(), size)) {
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
                self.seen.insert((log.to_string(), size), (root, source));
            }
        }
    }
}

/// Checks a chain's signed checkpoints against its entries and records their roots.
fn check_checkpoints(rec: &ChainRecords, c: &Checked, roots: &mut Roots, cx: &mut Ctx) {
    for (i, bytes) in rec.checkpoints.iter().enumerate() {
        let where_ = format!("{} checkpoint {i}", c.label);
        let cp = match (&c.owner, message::open::<Checkpoint>(bytes)) {
            (Some(owner), Ok(cp))
                if cp.envelope.signer() == owner && cp.message.log == owner.as_str() =>
            {
                cp.message
            }
            (_, Ok(_)) => {
                cx.flag(
                    &c.label,
                    None,
                    ViolationKind::BadSignature,
                    format!("{where_} is not signed by the chain's owner"),
                );
                continue;
            }
            (_, Err(e)) => {
                cx.flag(
                    &c.label,
                    None,
                    ViolationKind::BadSignature,
                    format!("{where_}: {e}"),
                );
                continue;
            }
        };
        roots.record(&cp.log, cp.size, cp.root, where_.clone(), &c.label, cx);
        if Some(cp.chain) != c.id {
            cx.flag(
                &c.label,
                None,
                ViolationKind::BadSignature,
                format!("{where_} names another chain"),
            );
            continue;
        }
        let last = cp.size.saturating_sub(1);
        // The chain's extent is its highest stored seq, not its number of entries: a missing
        // entry is reported as missing, not as a truncation.
        let extent = c
            .items
            .iter()
            .map(|i| i.key.saturating_add(1))
            .max()
            .unwrap_or(0);
        if cp.size > extent {
            cx.flag(
                &c.label,
                Some(extent),
                ViolationKind::TruncatedChain,
                format!(
                    "{where_} covers {} entries but the chain has {extent}",
                    cp.size
                ),
            );
        } else if !c.gaps && cp.size > 0 {
            let root = c.tree.root_at(cp.size);
            if c.at(last).is_none_or(|item| item.hash != cp.head) || root != Some(cp.root) {
                cx.flag(
                    &c.label,
                    Some(last),
                    ViolationKind::AlteredEntry,
                    format!(
                        "the chain's first {} entries differ from what {where_} signed",
                        cp.size
                    ),
                );
            }
        }
    }
}

/// Verifies gateway and client chains and their cross-links.
pub fn verify(gateways: &[ChainRecords], clients: &[ChainRecords]) -> Report {
    let mut cx = Ctx {
        violations: Vec::new(),
        roots: Roots::default(),
    };
    let gws: Vec<Checked> = gateways
        .iter()
        .map(|r| check_links(r, Role::Gateway, &mut cx))
        .collect();
    let cls: Vec<Checked> = clients
        .iter()
        .map(|r| check_links(r, Role::Client, &mut cx))
        .collect();
    for (rec, c) in gateways.iter().zip(&gws).chain(clients.iter().zip(&cls)) {
        let mut roots = std::mem::take(&mut cx.roots);
        check_checkpoints(rec, c, &mut roots, &mut cx);
        cx.roots = roots;
    }
    let gateway_dids: HashMap<Did, usize> = gws
        .iter()
        .enumerate()
        .filter_map(|(i, g)| g.owner.clone().map(|d| (d, i)))
        .collect();

    // Gateway chains: signatures, call IDs, closure; index executing entries by call.
    let mut executing: Executing = HashMap::new();
    let mut closed: HashMap<Digest, (usize, u64)> = HashMap::new();
    let mut heads_seen: HashMap<(Digest, u64), (Digest, String, u64)> = HashMap::new();
    let mut gw_calls = vec![0u64; gws.len()];
    for (gi, g) in gws.iter().enumerate() {
        let mut open: HashMap<Digest, u64> = HashMap::new();
        for item in &g.items {
            let e = &item.entry;
            let seq = Some(e.seq);
            match e.kind {
                EntryKind::Executing | EntryKind::Refused => {
                    let Some(bytes) = &e.signed else {
                        if e.kind == EntryKind::Executing {
                            cx.flag(
                                &g.label,
                                seq,
                                ViolationKind::BadSignature,
                                "executing entry without the signed request",
                            );
                        }
                        continue;
                    };
                    let req = match message::open::<Request>(bytes) {
                        Ok(r) => r,
                        Err(err) => {
                            cx.flag(
                                &g.label,
                                seq,
                                ViolationKind::BadSignature,
                                format!("embedded request: {err}"),
                            );
                            continue;
                        }
                    };
                    if e.call != Some(req.envelope.digest()) {
                        cx.flag(
                            &g.label,
                            seq,
                            ViolationKind::CallIdMismatch,
                            "call ID is not the request's digest",
                        );
                    }
                    if e.subject.as_deref() != Some(req.envelope.signer().as_str()) {
                        cx.flag(
                            &g.label,
                            seq,
                            ViolationKind::BadSignature,
                            "subject is not the request's signer",
                        );
                    }
                    if e.peer_head.as_ref() != Some(&req.message.head) {
                        cx.flag(
                            &g.label,
                            seq,
                            ViolationKind::DigestMismatch,
                            "recorded client head differs from the signed one",
                        );
                    }
                    let h = req.message.head;
                    // Only executed calls commit the gateway to a client head: a refusal may be
                    // the gateway correctly refusing a forking head.
                    let prior = match e.kind {
                        EntryKind::Executing => heads_seen.get(&(h.chain, h.seq)).cloned(),
                        _ => None,
                    };
                    match prior {
                        Some((hash, other, oseq)) if hash != h.hash => cx.flag(
                            &g.label,
                            seq,
                            ViolationKind::HeadFork,
                            format!("client head seq {} forks from the one recorded at {other} seq {oseq}", h.seq),
                        ),
                        _ if e.kind == EntryKind::Executing => {
                            heads_seen.insert((h.chain, h.seq), (h.hash, g.label.clone(), e.seq));
                        }
                        _ => {}
                    }
                    if e.kind == EntryKind::Executing {
                        gw_calls[gi] += 1;
                        let call = req.envelope.digest();
                        if executing
                            .insert(call, (gi, e.seq, bytes.clone(), Some(h)))
                            .is_some()
                        {
                            cx.flag(
                                &g.label,
                                seq,
                                ViolationKind::DuplicateCall,
                                "call executed twice",
                            );
                        }
                        open.insert(call, e.seq);
                    }
                }
                EntryKind::Executed | EntryKind::Failed | EntryKind::Abandoned => {
                    let Some(call) = e.call else {
                        cx.flag(
                            &g.label,
                            seq,
                            ViolationKind::UnclosedCall,
                            "close without a call ID",
                        );
                        continue;
                    };
                    if open.remove(&call).is_none() {
                        let kind = if closed.contains_key(&call) {
                            ViolationKind::DuplicateCall
                        } else {
                            ViolationKind::UnclosedCall
                        };
                        cx.flag(&g.label, seq, kind, "closes no open executing entry");
                    }
                    closed.insert(call, (gi, e.seq));
                }
                _ => {}
            }
        }
        for (_, s) in open {
            cx.flag(
                &g.label,
                Some(s),
                ViolationKind::UnclosedCall,
                "executing entry never closed",
            );
        }
    }

    // Client chains.
    let mut cross_links = 0u64;
    let mut client_requests: HashMap<Digest, Vec<u8>> = HashMap::new();
    let mut auds: HashMap<Digest, String> = HashMap::new();
    let mut client_calls = vec![0u64; cls.len()];
    for (ci, c) in cls.iter().enumerate() {
        let mut pending: HashMap<Digest, u64> = HashMap::new();
        for item in &c.items {
            let e = &item.entry;
            let seq = Some(e.seq);
            match e.kind {
                EntryKind::Request => {
                    client_calls[ci] += 1;
                    let Some(bytes) = &e.signed else {
                        cx.flag(
                            &c.label,
                            seq,
                            ViolationKind::BadSignature,
                            "request entry without the signed request",
                        );
                        continue;
                    };
                    let req = match (&c.owner, message::open::<Request>(bytes)) {
                        (Some(owner), Ok(r)) if r.envelope.signer() == owner => r,
                        (_, Ok(_)) => {
                            cx.flag(
                                &c.label,
                                seq,
                                ViolationKind::BadSignature,
                                "request not signed by the chain's owner",
                            );
                            continue;
                        }
                        (_, Err(err)) => {
                            cx.flag(
                                &c.label,
                                seq,
                                ViolationKind::BadSignature,
                                format!("request: {err}"),
                            );
                            continue;
                        }
                    };
                    let call = req.envelope.digest();
                    if e.call != Some(call) {
                        cx.flag(
                            &c.label,
                            seq,
                            ViolationKind::CallIdMismatch,
                            "call ID is not the request's digest",
                        );
                    }
                    if Some(req.message.head.chain) != c.id {
                        cx.flag(
                            &c.label,
                            seq,
                            ViolationKind::DigestMismatch,
                            "request names another chain",
                        );
                    }
                    pending.insert(call, e.seq);
                    client_requests.insert(call, bytes.clone());
                    auds.insert(call, req.message.aud.clone());
                }
                EntryKind::Result => {
                    let Some(call) = e.call else { continue };
                    if pending.remove(&call).is_none() {
                        cx.flag(
                            &c.label,
                            seq,
                            ViolationKind::UnansweredRequest,
                            "result without a request",
                        );
                    }
                    match (e.outcome, &e.signed) {
                        (Some(Outcome::Receipt), Some(bytes)) => {
                            cross_links += 1;
                            let aud = e.call.and_then(|c| auds.get(&c)).map(String::as_str);
                            check_receipt(
                                c,
                                e,
                                bytes,
                                aud,
                                &gws,
                                &gateway_dids,
                                &executing,
                                &mut cx,
                            );
                        }
                        (Some(Outcome::Refusal), Some(bytes)) => {
                            cross_links += 1;
                            check_refusal(c, e, bytes, &gws, &gateway_dids, &mut cx);
                        }
                        (Some(Outcome::Unknown), _) => {}
                        _ => cx.flag(
                            &c.label,
                            seq,
                            ViolationKind::BadSignature,
                            "result without its signed answer",
                        ),
                    }
                }
                _ => {}
            }
        }
        for (_, s) in pending {
            cx.flag(
                &c.label,
                Some(s),
                ViolationKind::UnansweredRequest,
                "request without a result entry",
            );
        }
    }

    // Gateway -> client links, for clients whose chains were given.
    let client_by_id: HashMap<Digest, &Checked> =
        cls.iter().filter_map(|c| c.id.map(|id| (id, c))).collect();
    let client_owners: HashSet<&Did> = cls.iter().filter_map(|c| c.owner.as_ref()).collect();
    let mut exec: Vec<_> = executing.iter().collect();
    exec.sort_by_key(|(_, (gi, s, _, _))| (*gi, *s));
    for (call, (gi, seq, bytes, head)) in exec {
        let g = &gws[*gi];
        let Some(h) = head else { continue };
        let Some(client) = client_by_id.get(&h.chain) else {
            // the client's chain was not given; it is checked only if its owner was
            if let Ok(r) = message::open::<Request>(bytes)
                && client_owners.contains(r.envelope.signer())
            {
                cx.flag(
                    &g.label,
                    Some(*seq),
                    ViolationKind::HeadNotInClientChain,
                    "names a chain id the client does not have",
                );
            }
            continue;
        };
        cross_links += 1;
        match client_requests.get(call) {
            Some(b) if b == bytes => {}
            Some(_) => cx.flag(
                &g.label,
                Some(*seq),
                ViolationKind::DigestMismatch,
                "request bytes differ from the client's",
            ),
            None => cx.flag(
                &g.label,
                Some(*seq),
                ViolationKind::RequestNotInClientChain,
                format!("{} never recorded this request", client.label),
            ),
        }
        match client.at(h.seq) {
            Some(it) if it.hash == h.hash => {}
            _ => cx.flag(
                &g.label,
                Some(*seq),
                ViolationKind::HeadNotInClientChain,
                format!("{} seq {} differs or is missing", client.label, h.seq),
            ),
        }
    }

    let mut chains = Vec::new();
    for (g, calls) in gws.iter().zip(gw_calls) {
        chains.push(summary(g, calls));
    }
    for (c, calls) in cls.iter().zip(client_calls) {
        chains.push(summary(c, calls));
    }
    Report {
        chains,
        cross_links,
        violations: cx.violations,
    }
}

fn summary(c: &Checked, calls: u64) -> ChainSummary {
    ChainSummary {
        label: c.label.clone(),
        owner: c.owner.as_ref().map(|d| d.to_string()),
        id: c.id.map(hex::encode),
        entries: c.items.len() as u64,
        calls,
    }
}

fn gateway_for<'a>(
    signer: &Did,
    gws: &'a [Checked],
    dids: &HashMap<Did, usize>,
) -> Option<&'a Checked> {
    dids.get(signer).map(|i| &gws[*i])
}

#[allow(clippy::too_many_arguments)] // the verifier's context, passed explicitly
fn check_receipt(
    c: &Checked,
    e: &Entry,
    bytes: &[u8],
    aud: Option<&str>,
    gws: &[Checked],
    dids: &HashMap<Did, usize>,
    executing: &Executing,
    cx: &mut Ctx,
) {
    let seq = Some(e.seq);
    let receipt = match message::open::<Receipt>(bytes) {
        Ok(r) => r,
        Err(err) => {
            return cx.flag(
                &c.label,
                seq,
                ViolationKind::BadSignature,
                format!("receipt: {err}"),
            );
        }
    };
    if Some(receipt.message.call) != e.call {
        cx.flag(
            &c.label,
            seq,
            ViolationKind::CallIdMismatch,
            "receipt is for another call",
        );
    }
    if aud.is_some_and(|a| a != receipt.envelope.signer().as_str()) {
        cx.flag(
            &c.label,
            seq,
            ViolationKind::BadSignature,
            "receipt signed by another gateway than the request addressed",
        );
    }
    if e.peer_entry != Some(receipt.message.entry) {
        cx.flag(
            &c.label,
            seq,
            ViolationKind::DigestMismatch,
            "recorded gateway entry differs from the receipt's",
        );
    }
    let Some(g) = gateway_for(receipt.envelope.signer(), gws, dids) else {
        if !gws.is_empty() {
            cx.flag(
                &c.label,
                seq,
                ViolationKind::BadSignature,
                "receipt signed by no given gateway",
            );
        }
        return;
    };
    let r = &receipt.message;
    match g.at(r.entry.seq) {
        Some(it) if it.hash == r.entry.hash => {
            let ge = &it.entry;
            if ge.kind != EntryKind::Executed || ge.call != Some(r.call) {
                cx.flag(
                    &c.label,
                    seq,
                    ViolationKind::ReceiptMismatch,
                    format!(
                        "{} seq {} is not this call's executed entry",
                        g.label, r.entry.seq
                    ),
                );
            } else if ge.status != Some(r.status)
                || ge.resp_b3 != Some(r.resp_b3)
                || ge.resp_len != Some(r.resp_len)
            {
                cx.flag(
                    &c.label,
                    seq,
                    ViolationKind::DigestMismatch,
                    "status or response digest differs from the gateway's entry",
                );
            }
        }
        _ => cx.flag(
            &c.label,
            seq,
            ViolationKind::ReceiptMismatch,
            format!("{} seq {} is missing or different", g.label, r.entry.seq),
        ),
    }
    if !executing.contains_key(&r.call) {
        cx.flag(
            &c.label,
            seq,
            ViolationKind::ReceiptMismatch,
            format!("{} has no executing entry for this call", g.label),
        );
    }
    if let Some(root) = r.root {
        let size = r.entry.seq + 1;
        let mut roots = std::mem::take(&mut cx.roots);
        roots.record(
            receipt.envelope.signer().as_str(),
            size,
            root,
            format!("{} seq {} (receipt)", c.label, e.seq),
            &c.label,
            cx,
        );
        cx.roots = roots;
        if !g.gaps && g.tree.root_at(size).is_some_and(|have| have != root) {
            cx.flag(
                &c.label,
                seq,
                ViolationKind::ReceiptMismatch,
                format!(
                    "the receipt's root differs from {}'s root at size {size}",
                    g.label
                ),
            );
        }
    }
}

fn check_refusal(
    c: &Checked,
    e: &Entry,
    bytes: &[u8],
    gws: &[Checked],
    dids: &HashMap<Did, usize>,
    cx: &mut Ctx,
) {
    let seq = Some(e.seq);
    let refusal = match message::open::<Refusal>(bytes) {
        Ok(r) => r,
        Err(err) => {
            return cx.flag(
                &c.label,
                seq,
                ViolationKind::BadSignature,
                format!("refusal: {err}"),
            );
        }
    };
    if refusal.message.call.is_some() && refusal.message.call != e.call {
        cx.flag(
            &c.label,
            seq,
            ViolationKind::CallIdMismatch,
            "refusal is for another call",
        );
    }
    let (Some(g), Some(at)) = (
        gateway_for(refusal.envelope.signer(), gws, dids),
        refusal.message.entry,
    ) else {
        if !gws.is_empty() && gateway_for(refusal.envelope.signer(), gws, dids).is_none() {
            cx.flag(
                &c.label,
                seq,
                ViolationKind::BadSignature,
                "refusal signed by no given gateway",
            );
        }
        return;
    };
    match g.at(at.seq) {
        Some(it) if it.hash == at.hash && it.entry.call == refusal.message.call => {}
        _ => cx.flag(
            &c.label,
            seq,
            ViolationKind::ReceiptMismatch,
            format!("{} seq {} does not record this refusal", g.label, at.seq),
        ),
    }
}

//! The verifier: a pure function over the records of one or more gateway chains and any
//! number of client chains (specs/audit-log.md, "Verification").
//!
//! It checks each chain (decoding, contiguous seq, previous-hash links, the recorded head,
//! genesis, every embedded signature, call IDs, closure of executing entries) and every
//! cross-link between chains, and names each violation with its chain, seq and kind.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use coset::{CoseSign1, TaggedCborSerializable, iana};
use didgate_protocol::cbor::DecodeError;
use didgate_protocol::envelope::{self, Kind};
use didgate_protocol::message::{
    self, ChainHead, Checkpoint, Digest, EntryRef, GrantBody, Message, OpenError, Receipt, Refusal,
    Request, SignedMessage,
};
use didgate_protocol::web::DidDocument;
use didgate_protocol::{Did, Principal, Version, WebDid};
use ed25519_dalek::{Signature, VerifyingKey};
use serde::Serialize;

use crate::entry::{Entry, EntryKind, Outcome, Role, SecretAction, entry_hash};
use crate::merkle;
use crate::receipt;

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
    /// did:web documents kept beside the chain (a gateway's: those that admitted did:web
    /// callers; entries name them by hash in `did_doc`).
    pub documents: Vec<Vec<u8>>,
    /// The export declares the chain sealed (its owner wrote a checkpoint covering its last
    /// entry before exporting it): an entry no checkpoint covers is then a violation, not a
    /// warning. False for a store read in place and for an export that copied one as it is.
    pub sealed: bool,
}

/// How strictly the verifier judges what older logs may lack.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// Report entries covered by no signed checkpoint (`unsealed_tail`) as a violation in
    /// every chain, not only in chains declared sealed.
    pub strict: bool,
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
    /// An entry names a did:web document (`did_doc`) that is not kept beside the chain, or
    /// that does not list the request's key for authentication.
    MissingDocument,
    /// The entries' versions break the format evolution rule: an entry of another version
    /// than the chain's at that point, a switch (`format` entry) to anything but the next
    /// version, or a second switch (specs/audit-log.md, "Format evolution").
    FormatViolation,
    /// After a gateway chain's secret snapshot, an `executed` entry names a secret version
    /// that no earlier `secret` entry declared, or one older than the version that was current
    /// before the call's `executing` entry (specs/audit-log.md, "Gateway chains").
    SecretMismatch,
    /// Entries at the end of a chain are covered by no checkpoint its owner signed: anyone
    /// could have truncated or edited them (a warning for chains not declared sealed, unless
    /// the verifier is strict).
    UnsealedTail,
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

/// A call whose outcome its chain records as unknown: a gateway `abandoned` entry (no closing
/// entry was written before a stop, a crash or a store failure) or a client `result` with
/// outcome `unknown` (no verified terminal frame). Not a violation: the record says what it
/// cannot know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnknownOutcome {
    /// The chain's label.
    pub chain: String,
    /// The entry that records it.
    pub seq: u64,
    /// The call ID, hex.
    pub call: String,
    /// What the entry says.
    pub detail: String,
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
    /// Findings that do not fail the verdict: an unsealed tail of a chain not declared sealed
    /// (without `strict`).
    pub warnings: Vec<Violation>,
    /// Checks that could not run, and why (a chain with missing or reordered entries has no
    /// known Merkle positions, so its checkpoint and receipt roots are not recomputed). Always
    /// accompanied by the violations that caused them; a report with any is not ok.
    pub skipped: Vec<Skipped>,
    /// Calls whose outcome a chain records as unknown, gateway chains first, in chain order.
    pub unknown_outcomes: Vec<UnknownOutcome>,
}

impl Report {
    /// True when nothing is violated and no check was skipped.
    pub fn ok(&self) -> bool {
        self.violations.is_empty() && self.skipped.is_empty()
    }
}

/// A check the verifier could not run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// The chain's label.
    pub chain: String,
    /// Which check.
    pub check: String,
    /// Why it could not run.
    pub reason: String,
}

/// What a gateway chain's `secret` entries declared (amendment 2.4), from its first snapshot
/// on: each secret's versions, and when its current version changed.
#[derive(Default)]
struct SecretLedger {
    /// Seq of the first `snapshot` entry; nothing is checked before it.
    snapshot: Option<u64>,
    /// By secret id.
    secrets: HashMap<[u8; 16], Declared>,
}

/// One secret in a [`SecretLedger`].
#[derive(Default)]
struct Declared {
    /// Every version an entry listed.
    versions: HashSet<u64>,
    /// (seq, current version) at each entry that listed it, in seq order.
    currents: Vec<(u64, Option<u64>)>,
}

impl SecretLedger {
    fn declare(&mut self, e: &Entry) {
        if e.action == Some(SecretAction::Snapshot) && self.snapshot.is_none() {
            self.snapshot = Some(e.seq);
        }
        if self.snapshot.is_none() {
            return;
        }
        for state in e.secrets.iter().flatten() {
            let d = self.secrets.entry(state.id).or_default();
            d.versions.extend(state.versions.iter().map(|v| v.version));
            d.currents.push((e.seq, state.current()));
        }
    }

    /// Checks the secret an `executed` entry names against what was declared before it, and
    /// before its call's `executing` entry at `began`.
    fn check_use(&self, e: &Entry, began: Option<u64>) -> Result<(), String> {
        let (Some(snapshot), Some(id), Some(version)) =
            (self.snapshot, e.secret_id, e.secret_version)
        else {
            return Ok(());
        };
        let named = format!("secret {} version {version}", hex::encode(id));
        let Some(Declared { currents, .. }) = self
            .secrets
            .get(&id)
            .filter(|d| d.versions.contains(&version))
        else {
            return Err(format!(
                "names {named}, which no secret entry since the snapshot at seq {snapshot} declares"
            ));
        };
        let Some(began) = began else {
            return Ok(());
        };
        // the call opened its secret after its executing entry was durable: a version
        // replaced before that entry cannot be the one it used
        let before = currents.partition_point(|(seq, _)| *seq < began);
        if let Some((at, Some(current))) = before.checked_sub(1).map(|i| currents[i])
            && version < current
        {
            return Err(format!(
                "names {named}, but version {current} was current from seq {at}, before the \
                 call's executing entry at seq {began}"
            ));
        }
        Ok(())
    }
}

/// Executing entries by call: (gateway index, seq, signed request, client head).
type Executing<'a> = HashMap<Digest, (usize, u64, &'a [u8], Option<ChainHead>)>;

/// A decoded, chain-checked entry.
struct Item {
    /// The key it is stored under.
    key: u64,
    /// Boxed: entries are large and are moved between the parallel and sequential steps.
    entry: Box<Entry>,
    hash: Digest,
    /// False for the placeholder kept where the stored bytes do not decode.
    decoded: bool,
}

struct Checked {
    label: String,
    owner: Option<Did>,
    id: Option<Digest>,
    items: Vec<Item>,
    tree: Tree,
    /// Index in `items` of each seq that sits at its own key (filled only when `gaps`: without
    /// gaps, seq n is `items[n]`).
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
        if !self.gaps {
            // every entry sits at its own key and the keys are 0.. in order
            return self.items.get(usize::try_from(seq).ok()?);
        }
        self.by_seq.get(&seq).and_then(|i| self.items.get(*i))
    }
}

#[derive(Default)]
struct Ctx {
    violations: Vec<Violation>,
    roots: Roots,
    warnings: Vec<Violation>,
    skipped: Vec<Skipped>,
    /// Per gateway chain label: receipts whose root was not recomputed (the chain has gaps).
    receipt_roots_unchecked: HashMap<String, u64>,
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
/// `decoded` holds each entry of `rec` hashed and decoded; also returns the Merkle leaves.
fn check_links(
    rec: &ChainRecords,
    decoded: Vec<Decoded>,
    role: Role,
    cx: &mut Ctx,
) -> (Checked, Vec<Digest>) {
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
            decoded: true,
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

/// Signed roots seen per (log DID, size): two different ones are proof of equivocation.
#[derive(Default)]
struct Roots {
    /// log DID -> size -> (root, where it was signed)
    seen: HashMap<String, HashMap<u64, (Digest, String)>>,
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

/// Checks a chain's signed checkpoints against its entries and records their roots. A gateway
/// keeps one chain, so its roots are judged per DID (a second chain of the same gateway is
/// equivocation too); one client DID may keep several named chains, so a client's roots are
/// judged per (DID, chain id).
#[allow(clippy::too_many_arguments)] // the verifier's context, passed explicitly
fn check_checkpoints(
    rec: &ChainRecords,
    c: &Checked,
    role: Role,
    sigs: &Sigs<'_>,
    roots: &mut Roots,
    strict: bool,
    cx: &mut Ctx,
) {
    // entries covered by the checkpoints that check out
    let mut sealed = 0u64;
    // The chain's extent is its highest stored seq, not its number of entries: a missing
    // entry is reported as missing, not as a truncation.
    let extent = c
        .items
        .iter()
        .map(|i| i.key.saturating_add(1))
        .max()
        .unwrap_or(0);
    for (i, bytes) in rec.checkpoints.iter().enumerate() {
        let where_ = format!("{} checkpoint {i}", c.label);
        let cp = match (&c.owner, sigs.open::<Checkpoint>(bytes)) {
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
        let log = match role {
            Role::Client => format!("{} (chain {})", cp.log, hex::encode(cp.chain)),
            _ => cp.log.clone(),
        };
        roots.record(&log, cp.size, cp.root, where_.clone(), &c.label, cx);
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
        } else if c.gaps && cp.size > 0 {
            cx.skipped.push(Skipped {
                chain: c.label.clone(),
                check: format!("{where_} (size {}): head and root", cp.size),
                reason:
                    "entries are missing or out of order, so their Merkle positions are unknown"
                        .into(),
            });
        } else if cp.size > 0 {
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
            } else {
                sealed = sealed.max(cp.size);
            }
        }
    }
    check_sealed(rec, c, extent, sealed, strict, cx);
}

/// Entries after the last one a valid checkpoint of the owner covers: `unsealed_tail`, a
/// violation when the chain is declared sealed or the verifier is strict, else a warning.
fn check_sealed(
    rec: &ChainRecords,
    c: &Checked,
    extent: u64,
    sealed: u64,
    strict: bool,
    cx: &mut Ctx,
) {
    if extent <= sealed || c.gaps {
        return;
    }
    let finding = Violation {
        chain: c.label.clone(),
        seq: Some(sealed),
        kind: ViolationKind::UnsealedTail,
        detail: format!(
            "entries {sealed}..{} are covered by no checkpoint signed by the chain's owner: anyone could have truncated or edited them{}",
            extent - 1,
            if rec.sealed || strict {
                ""
            } else {
                " (a warning: the chain is not declared sealed; --strict makes it a violation)"
            }
        ),
    };
    if rec.sealed || strict {
        cx.violations.push(finding);
    } else {
        cx.warnings.push(finding);
    }
}

/// Verifies gateway and client chains and their cross-links, on every core.
pub fn verify(gateways: &[ChainRecords], clients: &[ChainRecords]) -> Report {
    verify_with(gateways, clients, default_threads())
}

/// Like [`verify`], on up to `threads` threads (at least one). The report is the same for any
/// number of threads.
pub fn verify_with(gateways: &[ChainRecords], clients: &[ChainRecords], threads: usize) -> Report {
    run(gateways, clients, threads, Options::default()).0
}

/// Like [`verify`], with `options` (e.g. `strict`).
pub fn verify_opts(
    gateways: &[ChainRecords],
    clients: &[ChainRecords],
    options: Options,
) -> Report {
    run(gateways, clients, default_threads(), options).0
}

/// Like [`verify_with`], also telling where the time went (for benchmarks).
#[doc(hidden)]
pub fn verify_phases(
    gateways: &[ChainRecords],
    clients: &[ChainRecords],
    threads: usize,
) -> (Report, Phases) {
    run(gateways, clients, threads, Options::default())
}

/// Whether a gateway entry's subject names the request's signer: the signer's did:key (and
/// no document), or a did:web whose document, named by `did_doc` and kept beside the chain,
/// lists the signer's key for authentication.
fn subject_matches(
    subject: Option<&str>,
    signer: &Did,
    did_doc: Option<Digest>,
    web: &WebKeys,
) -> Result<(), (ViolationKind, &'static str)> {
    let wrong = (
        ViolationKind::BadSignature,
        "subject is not the request's signer",
    );
    match (subject, did_doc) {
        (Some(s), None) if s == signer.as_str() => Ok(()),
        (Some(s), Some(hash)) if s.starts_with("did:web:") => match web.docs.get(&hash) {
            None => Err((
                ViolationKind::MissingDocument,
                "the entry's DID document is not kept beside the chain",
            )),
            Some(d) if d.did().as_str() == s && d.lists_key(signer) => Ok(()),
            Some(_) => Err((
                ViolationKind::MissingDocument,
                "the entry's DID document does not list the request's key for its subject",
            )),
        },
        (Some(s), None) if s.starts_with("did:web:") => Err((
            ViolationKind::MissingDocument,
            "a did:web subject without its DID document hash",
        )),
        _ => Err(wrong),
    }
}

/// A client head as the gateway's fork claim keys it: signer key, chain id, seq.
type HeadKey = ([u8; 32], Digest, u64);

/// The verifier. The parallel steps (hashing and decoding entries, Merkle levels, opening each
/// distinct signed message once) only precompute what the sequential checks would compute
/// themselves; the checks and the order of the violations are those of one thread.
fn run(
    gateways: &[ChainRecords],
    clients: &[ChainRecords],
    threads: usize,
    options: Options,
) -> (Report, Phases) {
    let threads = threads.max(1);
    let started = Instant::now();
    let mut ph = Phases::default();
    let mut cx = Ctx::default();
    let t = Instant::now();
    let mut decoded = gateways
        .iter()
        .chain(clients)
        .map(|r| par_map(&r.entries, threads, |(_, bytes)| decode(bytes)))
        .collect::<Vec<_>>()
        .into_iter();
    ph.decode_hash = t.elapsed();
    let t = Instant::now();
    // every chain on its own (in parallel), then their violations in chain order
    let jobs: Vec<(&ChainRecords, Role, std::sync::Mutex<Vec<Decoded>>)> = gateways
        .iter()
        .map(|r| (r, Role::Gateway))
        .chain(clients.iter().map(|r| (r, Role::Client)))
        .map(|(r, role)| {
            (
                r,
                role,
                std::sync::Mutex::new(decoded.next().unwrap_or_default()),
            )
        })
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
    ph.chain_checks = t.elapsed();
    let t = Instant::now();
    for (c, l) in gws.iter_mut().chain(cls.iter_mut()).zip(leaves) {
        c.tree = Tree::build(l, threads);
    }
    ph.merkle = t.elapsed();
    let t = Instant::now();
    let mut sigs = Sigs {
        web: Arc::new(WebKeys::new(
            &gateways.iter().chain(clients).collect::<Vec<_>>(),
        )),
        ..Sigs::default()
    };
    let refs = gws
        .iter()
        .chain(&cls)
        .map(|c| c.items.iter().filter(|i| i.entry.signed.is_some()).count())
        .sum::<usize>()
        + gateways
            .iter()
            .chain(clients)
            .map(|r| r.checkpoints.len())
            .sum::<usize>();
    sigs.by_addr.reserve(refs);
    sigs.by_content.reserve(refs);
    sigs.blobs.reserve(refs);
    for c in gws.iter().chain(&cls) {
        for item in &c.items {
            if let Some(bytes) = &item.entry.signed {
                sigs.add(bytes);
            }
        }
    }
    for rec in gateways.iter().chain(clients) {
        for bytes in &rec.checkpoints {
            sigs.add(bytes);
        }
    }
    ph.dedupe = t.elapsed();
    let t = Instant::now();
    sigs.open_all(threads, &mut ph);
    ph.open = t.elapsed();
    let t = Instant::now();
    let dids: HashMap<Did, usize> = gws
        .iter()
        .enumerate()
        .filter_map(|(i, g)| g.owner.clone().map(|d| (d, i)))
        .collect();
    sigs.receipt_roots(&gws, &dids, threads);
    ph.receipt_roots = t.elapsed();

    let t = Instant::now();
    let roles = gateways
        .iter()
        .zip(&gws)
        .map(|p| (p, Role::Gateway))
        .chain(clients.iter().zip(&cls).map(|p| (p, Role::Client)));
    for ((rec, c), role) in roles {
        let mut roots = std::mem::take(&mut cx.roots);
        check_checkpoints(rec, c, role, &sigs, &mut roots, options.strict, &mut cx);
        cx.roots = roots;
    }
    let gateway_dids: HashMap<Did, usize> = gws
        .iter()
        .enumerate()
        .filter_map(|(i, g)| g.owner.clone().map(|d| (d, i)))
        .collect();

    // Gateway chains: signatures, call IDs, closure; index executing entries by call.
    // sized up front: at a million calls, growing these maps costs as much as using them
    let gw_entries = gws.iter().map(|g| g.items.len()).sum::<usize>() / 2;
    let mut executing: Executing = HashMap::with_capacity(gw_entries);
    let mut closed: HashMap<Digest, (usize, u64)> = HashMap::with_capacity(gw_entries);
    // keyed as the gateway's fork claim is: signer key, chain id, seq (a caller that names
    // another client's chain in its head forks nothing of that client's)
    let mut heads_seen: HashMap<HeadKey, (Digest, &str, u64)> = HashMap::with_capacity(gw_entries);
    let mut gw_calls = vec![0u64; gws.len()];
    for (gi, g) in gws.iter().enumerate() {
        let mut open: HashMap<Digest, u64> = HashMap::new();
        let mut secrets = SecretLedger::default();
        for item in &g.items {
            let e = &item.entry;
            let seq = Some(e.seq);
            match e.kind {
                EntryKind::Secret => secrets.declare(e),
                EntryKind::Executing | EntryKind::Granted | EntryKind::Refused => {
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
                    let req = match sigs.open::<Request>(bytes) {
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
                    if let Err((kind, why)) = subject_matches(
                        e.subject.as_deref(),
                        req.envelope.signer(),
                        e.did_doc,
                        &sigs.web,
                    ) {
                        cx.flag(&g.label, seq, kind, why);
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
                    let commits = matches!(e.kind, EntryKind::Executing | EntryKind::Granted);
                    let prior = if commits {
                        heads_seen
                            .get(&(*req.envelope.signer().public_key_bytes(), h.chain, h.seq))
                            .cloned()
                    } else {
                        None
                    };
                    match prior {
                        Some((hash, other, oseq)) if hash != h.hash => cx.flag(
                            &g.label,
                            seq,
                            ViolationKind::HeadFork,
                            format!("client head seq {} forks from the one recorded at {other} seq {oseq}", h.seq),
                        ),
                        _ if commits => {
                            heads_seen.insert(
                                (*req.envelope.signer().public_key_bytes(), h.chain, h.seq),
                                (h.hash, g.label.as_str(), e.seq),
                            );
                        }
                        _ => {}
                    }
                    if e.kind == EntryKind::Executing {
                        gw_calls[gi] += 1;
                        let call = req.envelope.digest();
                        if executing
                            .insert(call, (gi, e.seq, bytes.as_slice(), Some(h)))
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
                    let began = open.remove(&call);
                    if e.kind == EntryKind::Executed
                        && let Err(why) = secrets.check_use(e, began)
                    {
                        cx.flag(&g.label, seq, ViolationKind::SecretMismatch, why);
                    }
                    if began.is_none() {
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
    let cl_entries = cls.iter().map(|c| c.items.len()).sum::<usize>() / 2;
    let mut client_requests: HashMap<Digest, &[u8]> = HashMap::with_capacity(cl_entries);
    // per call: the request's `aud` and signer, which its receipt must match
    let mut auds: HashMap<Digest, (String, Did)> = HashMap::with_capacity(cl_entries);
    let mut client_calls = vec![0u64; cls.len()];
    for (ci, c) in cls.iter().enumerate() {
        let mut pending: HashMap<Digest, (u64, bool)> = HashMap::new();
        // calls made through a grant whose first answer was recorded
        let mut presented: HashSet<Digest> = HashSet::new();
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
                    let req = match (&c.owner, sigs.open::<Request>(bytes)) {
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
                    pending.insert(call, (e.seq, false));
                    client_requests.insert(call, bytes.as_slice());
                    auds.insert(
                        call,
                        (req.message.aud.clone(), req.envelope.signer().clone()),
                    );
                }
                EntryKind::Result if e.outcome == Some(Outcome::Grant) => {
                    // A grant answers the request for now; a later result closes the call.
                    let granted = e.call.and_then(|call| pending.get_mut(&call));
                    let grant = e.signed.as_deref().map(|b| sigs.open::<GrantBody>(b));
                    match (granted, grant) {
                        (Some(p), Some(Ok(g))) if !p.1 && Some(g.message.call) == e.call => {
                            p.1 = true
                        }
                        (None, _) | (Some((_, true)), _) => cx.flag(
                            &c.label,
                            seq,
                            ViolationKind::UnansweredRequest,
                            "grant without a pending request",
                        ),
                        _ => cx.flag(
                            &c.label,
                            seq,
                            ViolationKind::BadSignature,
                            "grant result without a valid signed grant for this call",
                        ),
                    }
                }
                EntryKind::Result => {
                    let Some(call) = e.call else { continue };
                    match pending.remove(&call) {
                        Some((_, granted)) => {
                            if granted {
                                presented.insert(call);
                            }
                        }
                        // a grant presented again after its call closed: the refusal it got is
                        // recorded like any answer
                        None if presented.contains(&call)
                            && e.outcome != Some(Outcome::Receipt) => {}
                        None => cx.flag(
                            &c.label,
                            seq,
                            ViolationKind::UnansweredRequest,
                            "result without a request",
                        ),
                    }
                    match (e.outcome, &e.signed) {
                        (Some(Outcome::Receipt), Some(bytes)) => {
                            cross_links += 1;
                            let asked = e.call.and_then(|c| auds.get(&c));
                            check_receipt(
                                c,
                                e,
                                bytes,
                                asked,
                                &gws,
                                &gateway_dids,
                                &executing,
                                &sigs,
                                &mut cx,
                            );
                        }
                        (Some(Outcome::Refusal), Some(bytes)) => {
                            cross_links += 1;
                            check_refusal(c, e, bytes, &gws, &gateway_dids, &sigs, &mut cx);
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
        for (_, (s, granted)) in pending {
            if granted {
                continue; // a grant not (yet) executed: nothing is missing
            }
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
            if let Ok(r) = sigs.open::<Request>(bytes)
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
    ph.cross_links = t.elapsed();
    let unknown_outcomes = unknown_outcomes(&gws, &cls);
    ph.total = started.elapsed();
    let mut skipped = cx.skipped;
    let mut unchecked: Vec<_> = cx.receipt_roots_unchecked.into_iter().collect();
    unchecked.sort();
    for (chain, n) in unchecked {
        skipped.push(Skipped {
            check: format!("the roots of {n} receipt(s) signed for this chain"),
            chain,
            reason: "entries are missing or out of order, so their Merkle positions are unknown"
                .into(),
        });
    }
    let report = Report {
        chains,
        cross_links,
        violations: cx.violations,
        warnings: cx.warnings,
        skipped,
        unknown_outcomes,
    };
    (report, ph)
}

/// The calls each chain records with an unknown outcome ([`UnknownOutcome`]).
fn unknown_outcomes(gws: &[Checked], cls: &[Checked]) -> Vec<UnknownOutcome> {
    let gateway = gws.iter().flat_map(|g| {
        g.items
            .iter()
            .filter(|i| i.decoded && i.entry.kind == EntryKind::Abandoned)
            .map(move |i| (&g.label, i))
    });
    let client = cls.iter().flat_map(|c| {
        c.items
            .iter()
            .filter(|i| {
                i.decoded
                    && i.entry.kind == EntryKind::Result
                    && i.entry.outcome == Some(Outcome::Unknown)
            })
            .map(move |i| (&c.label, i))
    });
    gateway
        .chain(client)
        .map(|(label, i)| UnknownOutcome {
            chain: label.clone(),
            seq: i.key,
            call: i.entry.call.map(hex::encode).unwrap_or_default(),
            detail: i.entry.detail.clone().unwrap_or_default(),
        })
        .collect()
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
    asked: Option<&(String, Did)>,
    gws: &[Checked],
    dids: &HashMap<Did, usize>,
    executing: &Executing<'_>,
    sigs: &Sigs<'_>,
    cx: &mut Ctx,
) {
    let seq = Some(e.seq);
    let receipt = match sigs.open::<Receipt>(bytes) {
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
    let fault = match (asked, e.call) {
        (Some((aud, signer)), Some(call)) => receipt::answers(
            &receipt.message,
            receipt.envelope.signer(),
            &call,
            signer,
            aud,
        )
        .err(),
        _ => (Some(receipt.message.call) != e.call).then_some(receipt::Fault::Call),
    };
    match fault {
        Some(receipt::Fault::Call) => cx.flag(
            &c.label,
            seq,
            ViolationKind::CallIdMismatch,
            "receipt is for another call",
        ),
        Some(receipt::Fault::Client) => cx.flag(
            &c.label,
            seq,
            ViolationKind::ReceiptMismatch,
            format!(
                "the receipt names client {}, the request is signed by {}",
                receipt.message.client,
                asked.map_or("?".into(), |(_, s)| s.to_string())
            ),
        ),
        Some(_) => cx.flag(
            &c.label,
            seq,
            ViolationKind::BadSignature,
            "receipt signed by another gateway than the request addressed",
        ),
        None => {}
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
        Some(it) if it.hash == r.entry.hash => match receipt::closed_by(r, it.key, &it.entry) {
            Ok(()) => {}
            Err(receipt::Fault::Outcome(field)) => cx.flag(
                &c.label,
                seq,
                ViolationKind::DigestMismatch,
                format!("{field} differs from the gateway's entry"),
            ),
            Err(_) => cx.flag(
                &c.label,
                seq,
                ViolationKind::ReceiptMismatch,
                format!(
                    "{} seq {} is not this call's executed entry",
                    g.label, r.entry.seq
                ),
            ),
        },
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
        let have = match (receipt.root_at, dids.get(receipt.envelope.signer())) {
            (Some((i, precomputed)), Some(gi)) if i == *gi => precomputed,
            _ => g.tree.root_at(size),
        };
        if g.gaps {
            *cx.receipt_roots_unchecked
                .entry(g.label.clone())
                .or_default() += 1;
        } else if have.is_some_and(|have| have != root) {
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
    sigs: &Sigs<'_>,
    cx: &mut Ctx,
) {
    let seq = Some(e.seq);
    let refusal = match sigs.open::<Refusal>(bytes) {
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

// ---------------------------------------------------------------------------------------------
// Performance machinery. Nothing below decides a violation: it computes, in parallel and once
// per distinct input, exactly what the checks above would compute themselves (entry hashes and
// decodings, Merkle levels, opened signed messages), and the checks read it back.

/// Below this many items a parallel map runs on the calling thread.
const MIN_CHUNK: usize = 64;

/// Maps `0..n` with `f` on up to `threads` scoped threads (dynamic chunks, results in order).
/// Each thread has its own state from `init`; the states are returned too.
fn par_run<S: Send, U: Send>(
    n: usize,
    threads: usize,
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, usize) -> U + Sync,
) -> (Vec<U>, Vec<S>) {
    if threads <= 1 || n < 2 * MIN_CHUNK {
        let mut state = init();
        let out = (0..n).map(|i| f(&mut state, i)).collect();
        return (out, vec![state]);
    }
    let chunk = (n / (threads * 32)).max(MIN_CHUNK);
    let chunks = n.div_ceil(chunk);
    let next = AtomicUsize::new(0);
    /// Per worker: the chunks it mapped (chunk index, results), and its state.
    type Done<U, S> = (Vec<(usize, Vec<U>)>, S);
    let workers: Vec<Done<U, S>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads.min(chunks))
            .map(|_| {
                scope.spawn(|| {
                    let mut state = init();
                    let mut done = Vec::new();
                    loop {
                        let c = next.fetch_add(1, Ordering::Relaxed);
                        if c >= chunks {
                            break;
                        }
                        let start = c * chunk;
                        let end = (start + chunk).min(n);
                        done.push((c, (start..end).map(|i| f(&mut state, i)).collect()));
                    }
                    (done, state)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut parts = Vec::with_capacity(chunks);
    let mut states = Vec::with_capacity(workers.len());
    for (done, state) in workers {
        parts.extend(done);
        states.push(state);
    }
    parts.sort_unstable_by_key(|(c, _)| *c);
    let mut out = Vec::with_capacity(n);
    for (_, part) in parts {
        out.extend(part);
    }
    (out, states)
}

/// Runs `f` on each of `0..n` (coarse tasks, one at a time per thread) on up to `threads`
/// threads; results in order.
fn par_tasks<U: Send>(n: usize, threads: usize, f: impl Fn(usize) -> U + Sync) -> Vec<U> {
    if threads <= 1 || n < 2 {
        return (0..n).map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let mut done: Vec<(usize, U)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads.min(n))
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break;
                        }
                        mine.push((i, f(i)));
                    }
                    mine
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    done.sort_unstable_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, u)| u).collect()
}

/// Maps `items` in order on up to `threads` threads.
fn par_map<T: Sync, U: Send>(items: &[T], threads: usize, f: impl Fn(&T) -> U + Sync) -> Vec<U> {
    par_run(items.len(), threads, || (), |_, i| f(&items[i])).0
}

/// One stored entry, hashed and decoded (the part of [`check_links`] that needs no order).
struct Decoded {
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
        entry: decode_entry_fast(bytes)
            .map_or_else(|| Entry::decode_strict(bytes), Ok)
            .map(Box::new),
    }
}

/// Where the verifier's time went (bench-only; the figures vary from run to run).
#[doc(hidden)]
#[derive(Debug, Clone, Default)]
pub struct Phases {
    /// Wall: hashing and decoding every entry.
    pub decode_hash: Duration,
    /// Wall: order, links, head and genesis of every chain.
    pub chain_checks: Duration,
    /// Wall: the Merkle levels of every chain.
    pub merkle: Duration,
    /// Wall: finding the distinct signed messages.
    pub dedupe: Duration,
    /// Wall: opening every distinct signed message (COSE, payload, Ed25519).
    pub open: Duration,
    /// Summed over threads: COSE parsing, header checks, payload decoding, digests.
    pub open_parse_cpu: Duration,
    /// Summed over threads: Ed25519 signature checks.
    pub open_sig_cpu: Duration,
    /// Summed over threads: messages the fast path did not accept, opened by the protocol
    /// crate itself for its exact verdict.
    pub open_exact_cpu: Duration,
    /// Wall: receipt roots recomputed from the gateway trees.
    pub receipt_roots: Duration,
    /// Wall: checkpoints, calls and cross-links (sequential).
    pub cross_links: Duration,
    /// Wall: everything.
    pub total: Duration,
    /// Distinct signed messages opened (each signature checked once).
    pub signatures: u64,
    /// Signed messages referenced by entries and checkpoints (before de-duplication).
    pub signed_refs: u64,
}

impl Phases {
    /// (name, duration) rows in pipeline order.
    pub fn breakdown(&self) -> Vec<(&'static str, Duration)> {
        vec![
            ("decode + hash entries", self.decode_hash),
            ("chain order, links, head, genesis", self.chain_checks),
            ("merkle trees", self.merkle),
            ("find distinct signed messages", self.dedupe),
            ("open signed messages", self.open),
            (
                "  cpu: COSE parse, payload decode, digest",
                self.open_parse_cpu,
            ),
            ("  cpu: Ed25519 checks", self.open_sig_cpu),
            ("  cpu: exact re-open of rejected ones", self.open_exact_cpu),
            ("receipt roots", self.receipt_roots),
            (
                "checkpoints, calls, cross-links (1 thread)",
                self.cross_links,
            ),
            ("total", self.total),
        ]
    }
}

/// The number of threads [`verify`] uses.
fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A signed message's payload, by kind.
enum Payload {
    Request(Request),
    Grant(GrantBody),
    Receipt(Receipt),
    Refusal(Refusal),
    Checkpoint(Checkpoint),
}

/// The signed message kinds the cache holds.
const KINDS: [Kind; 5] = [
    Kind::Request,
    Kind::Grant,
    Kind::Receipt,
    Kind::Refusal,
    Kind::Checkpoint,
];

/// A message type the cache can hand back.
trait Cached: SignedMessage + Clone {
    fn peek(p: &Payload) -> Option<&Self>;
    fn wrap(self) -> Payload;
}

macro_rules! cached {
    ($t:ty, $v:ident) => {
        impl Cached for $t {
            fn peek(p: &Payload) -> Option<&Self> {
                match p {
                    Payload::$v(m) => Some(m),
                    _ => None,
                }
            }
            fn wrap(self) -> Payload {
                Payload::$v(self)
            }
        }
    };
}
cached!(Request, Request);
cached!(GrantBody, Grant);
cached!(Receipt, Receipt);
cached!(Refusal, Refusal);
cached!(Checkpoint, Checkpoint);

/// A signed message opened once: what [`message::open`] returns, minus the bytes.
struct OpenedMsg {
    signer: Arc<Did>,
    digest: Digest,
    payload: Payload,
    /// For a receipt with a root: the index of the given gateway that signed it and that
    /// gateway's root at the receipt's size, precomputed.
    root_at: Option<(usize, Option<Digest>)>,
}

/// The envelope facts of an opened message, as [`message::Signed::envelope`] gives them.
struct EnvelopeView<'s> {
    signer: Cow<'s, Did>,
    digest: Digest,
}

impl EnvelopeView<'_> {
    fn signer(&self) -> &Did {
        &self.signer
    }
    fn digest(&self) -> Digest {
        self.digest
    }
}

/// An opened message, borrowed from the cache (or owned when it was not cached).
struct Opened<'s, T: Clone> {
    envelope: EnvelopeView<'s>,
    message: Cow<'s, T>,
    /// See [`OpenedMsg::root_at`].
    root_at: Option<(usize, Option<Digest>)>,
}

/// Opens `bytes` as a `T` with the protocol crate, the reference the cache must agree with.
fn open_exact<T: Cached>(bytes: &[u8], web: &WebKeys) -> Result<OpenedMsg, OpenError> {
    let s = message::open_with::<T>(bytes, |w, f| web.key(w, f))?;
    Ok(OpenedMsg {
        signer: Arc::new(s.envelope.signer().clone()),
        digest: s.envelope.digest(),
        payload: s.message.wrap(),
        root_at: None,
    })
}

fn open_exact_kind(
    bytes: &[u8],
    kind: Kind,
    web: &WebKeys,
) -> Option<Result<OpenedMsg, OpenError>> {
    Some(match kind {
        Kind::Request => open_exact::<Request>(bytes, web),
        Kind::Grant => open_exact::<GrantBody>(bytes, web),
        Kind::Receipt => open_exact::<Receipt>(bytes, web),
        Kind::Refusal => open_exact::<Refusal>(bytes, web),
        Kind::Checkpoint => open_exact::<Checkpoint>(bytes, web),
        _ => return None,
    })
}

/// Every signed message of the chains, opened once per distinct content, in parallel, before
/// the sequential checks; [`Sigs::open`] is a drop-in for [`message::open`].
#[derive(Default)]
struct Sigs<'a> {
    /// The distinct messages.
    blobs: Vec<&'a [u8]>,
    /// A message's length and last 16 bytes (of its signature, when well-formed) -> index in
    /// `blobs` of the first message with them; the whole message is compared on a match.
    by_content: HashMap<(usize, &'a [u8]), usize>,
    /// Address and length of every registered copy -> index in `blobs`. The copies are borrowed
    /// for `'a`, so an address cannot be reused for other bytes while this lives.
    by_addr: HashMap<(usize, usize), usize, BuildHasherDefault<AddrHasher>>,
    /// Per distinct message: its kind (from its content type) and the verdict, when its
    /// content type names a kind.
    opened: Vec<Option<(Kind, Result<OpenedMsg, OpenError>)>>,
    /// Copies registered.
    refs: u64,
    /// did:web keys from the documents kept beside the chains.
    web: Arc<WebKeys>,
}

impl<'a> Sigs<'a> {
    /// Registers a copy of a signed message.
    fn add(&mut self, bytes: &'a [u8]) {
        self.refs += 1;
        let key = (bytes.len(), tail(bytes));
        let index = match self.by_content.get(&key) {
            Some(&i) if self.blobs[i] == bytes => i,
            Some(_) => {
                // same tail, other content: kept apart, looked up by address only
                self.blobs.push(bytes);
                self.blobs.len() - 1
            }
            None => {
                self.blobs.push(bytes);
                self.by_content.insert(key, self.blobs.len() - 1);
                self.blobs.len() - 1
            }
        };
        self.by_addr
            .insert((bytes.as_ptr() as usize, bytes.len()), index);
    }

    /// Opens every distinct message on `threads` threads.
    fn open_all(&mut self, threads: usize, ph: &mut Phases) {
        let keys = Keys {
            web: self.web.clone(),
            ..Keys::default()
        };
        let web = &*self.web;
        let blobs = &self.blobs;
        let ranges: Vec<(usize, usize)> = (0..blobs.len())
            .step_by(BATCH)
            .map(|start| (start, (start + BATCH).min(blobs.len())))
            .collect();
        let done = par_map(&ranges, threads, |&(start, end)| {
            let mut local = HashMap::new();
            let mut busy = Busy::default();
            let steps: Vec<Step> = blobs[start..end]
                .iter()
                .map(|b| parse_blob(b, &keys, &mut local, &mut busy))
                .collect();
            let t = Instant::now();
            let verdicts = check_batch(&steps);
            busy.sig += t.elapsed();
            let t = Instant::now();
            let opened: Vec<_> = steps
                .into_iter()
                .zip(verdicts)
                .zip(&blobs[start..end])
                .map(|((step, ok), bytes)| match step {
                    Step::Done(r) => r,
                    Step::Check { kind, opened, .. } if ok => Some((kind, Ok(opened))),
                    // refused (or a batch with a bad one in it, re-checked singly): the protocol
                    // crate gives the exact verdict and error
                    Step::Check { kind, .. } => {
                        open_exact_kind(bytes, kind, web).map(|r| (kind, r))
                    }
                })
                .collect();
            busy.exact += t.elapsed();
            (opened, busy)
        });
        self.opened = Vec::with_capacity(blobs.len());
        for (opened, b) in done {
            self.opened.extend(opened);
            ph.open_parse_cpu += b.parse;
            ph.open_sig_cpu += b.sig;
            ph.open_exact_cpu += b.exact;
        }
        ph.signatures = self.opened.iter().filter(|o| o.is_some()).count() as u64;
        ph.signed_refs = self.refs;
    }

    fn index_of(&self, bytes: &[u8]) -> Option<usize> {
        if let Some(&i) = self.by_addr.get(&(bytes.as_ptr() as usize, bytes.len())) {
            return Some(i);
        }
        // an unregistered copy (say, a clone): find it by content
        self.by_content
            .get(&(bytes.len(), tail(bytes)))
            .copied()
            .filter(|&i| self.blobs[i] == bytes)
    }

    /// Exactly what `message::open::<T>(bytes)` returns, from the cache when it holds the
    /// message as a `T`.
    fn open<T: Cached>(&self, bytes: &[u8]) -> Result<Opened<'_, T>, OpenError> {
        let cached = self
            .index_of(bytes)
            .and_then(|i| self.opened.get(i))
            .and_then(Option::as_ref)
            .filter(|(kind, _)| *kind == T::KIND);
        if let Some((_, verdict)) = cached {
            return match verdict {
                Ok(o) => match T::peek(&o.payload) {
                    Some(m) => Ok(Opened {
                        envelope: EnvelopeView {
                            signer: Cow::Borrowed(&o.signer),
                            digest: o.digest,
                        },
                        message: Cow::Borrowed(m),
                        root_at: o.root_at,
                    }),
                    None => self.uncached(bytes),
                },
                Err(e) => Err(e.clone()),
            };
        }
        self.uncached(bytes)
    }

    fn uncached<'s, T: Cached>(&self, bytes: &[u8]) -> Result<Opened<'s, T>, OpenError> {
        let s = message::open_with::<T>(bytes, |w, f| self.web.key(w, f))?;
        Ok(Opened {
            envelope: EnvelopeView {
                signer: Cow::Owned(s.envelope.signer().clone()),
                digest: s.envelope.digest(),
            },
            message: Cow::Owned(s.message),
            root_at: None,
        })
    }

    /// Computes, on `threads` threads, each receipt's gateway root at the receipt's size (what
    /// [`check_receipt`] compares the receipt's root with).
    fn receipt_roots(&mut self, gws: &[Checked], dids: &HashMap<Did, usize>, threads: usize) {
        let jobs: Vec<(usize, usize, u64)> = self
            .opened
            .iter()
            .enumerate()
            .filter_map(|(i, o)| {
                let Some((_, Ok(m))) = o else { return None };
                let Payload::Receipt(r) = &m.payload else {
                    return None;
                };
                r.root?;
                let gi = *dids.get(&*m.signer)?;
                let g = gws.get(gi)?;
                (!g.gaps).then_some((i, gi, r.entry.seq.wrapping_add(1)))
            })
            .collect();
        let roots = par_map(&jobs, threads, |(_, gi, size)| {
            gws.get(*gi).and_then(|g| g.tree.root_at(*size))
        });
        for ((i, gi, _), root) in jobs.into_iter().zip(roots) {
            if let Some(Some((_, Ok(m)))) = self.opened.get_mut(i) {
                m.root_at = Some((gi, root));
            }
        }
    }
}

/// Hashes the (address, length) keys of [`Sigs::by_addr`]. Addresses come from the allocator,
/// not from the chains, so a fast unkeyed mix is enough.
#[derive(Default)]
struct AddrHasher(u64);

impl std::hash::Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        let x = (self.0 ^ (self.0 >> 31)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x ^ (x >> 32)
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(23) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

/// The last 16 bytes of a message (all of it if shorter).
fn tail(bytes: &[u8]) -> &[u8] {
    &bytes[bytes.len().saturating_sub(16)..]
}

/// Time one opening thread spent, by step.
#[derive(Default)]
struct Busy {
    parse: Duration,
    sig: Duration,
    exact: Duration,
}

/// Signatures checked together by one `verify_batch` call.
const BATCH: usize = 128;

/// One signed message after parsing: decided already, or waiting for its signature check.
enum Step {
    /// Opened by the protocol crate (unusual layout, or no known kind: `None`).
    Done(Option<(Kind, Result<OpenedMsg, OpenError>)>),
    /// Parsed by the fast path; valid if its signature checks.
    Check {
        kind: Kind,
        key: Arc<Key>,
        tbs: Vec<u8>,
        sig: [u8; 64],
        opened: OpenedMsg,
    },
}

/// Parses one signed message: the kind its content type names, then the same checks as
/// `envelope::verify` and `message::open` except the signature, which [`check_batch`] checks.
/// Anything the fast path does not accept is opened by the protocol crate for its exact
/// verdict.
fn parse_blob(
    bytes: &[u8],
    keys: &Keys,
    local: &mut HashMap<Vec<u8>, Option<Arc<Key>>>,
    busy: &mut Busy,
) -> Step {
    let t = Instant::now();
    let step = if let Some(parts) = parse_sign1_fast(bytes) {
        match fast_parts_plain(&parts, keys, local) {
            Some((key, tbs, opened)) => Step::Check {
                kind: parts.kind,
                key,
                tbs,
                sig: parts.signature,
                opened,
            },
            None => {
                Step::Done(open_exact_kind(bytes, parts.kind, &keys.web).map(|r| (parts.kind, r)))
            }
        }
    } else {
        let sign1 = (bytes.len() <= envelope::MAX_ENVELOPE)
            .then(|| CoseSign1::from_tagged_slice(bytes).ok())
            .flatten();
        let kind = sign1
            .as_ref()
            .and_then(|s| match &s.protected.header.content_type {
                Some(coset::ContentType::Text(tag)) => KINDS.into_iter().find(|k| k.tag() == tag),
                _ => None,
            });
        match sign1.zip(kind) {
            None => Step::Done(None),
            Some((sign1, kind)) => match fast_parts(&sign1, kind, keys, local) {
                Some((key, tbs, sig, opened)) => Step::Check {
                    kind,
                    key,
                    tbs,
                    sig,
                    opened,
                },
                None => Step::Done(open_exact_kind(bytes, kind, &keys.web).map(|r| (kind, r))),
            },
        }
    };
    busy.parse += t.elapsed();
    step
}

/// Checks the signatures of the waiting steps with ed25519-dalek's `verify_batch`; when the
/// batch fails, or a key is of small order (which `verify_strict` refuses and a batch would
/// not), each is checked alone with `verify_strict`. One verdict per step (`true` for `Done`).
///
/// A batch accepts exactly the signatures `verify_strict` accepts, except one a key's own
/// holder can make on purpose: a nonce point with a small torsion component can pass the batch
/// equation for some batches (specs/audit-log.md, "Signature checks"). Nobody else can produce
/// a signature that passes, so what a chain's signatures attribute is unchanged.
fn check_batch(steps: &[Step]) -> Vec<bool> {
    let waiting: Vec<(usize, &Arc<Key>, &[u8], Signature)> = steps
        .iter()
        .enumerate()
        .filter_map(|(i, s)| match s {
            Step::Check { key, tbs, sig, .. } => {
                Some((i, key, tbs.as_slice(), Signature::from_bytes(sig)))
            }
            Step::Done(_) => None,
        })
        .collect();
    let mut verdicts = vec![true; steps.len()];
    let weak = waiting.iter().any(|(_, k, _, _)| k.weak);
    let batch_ok = !waiting.is_empty() && !weak && {
        let msgs: Vec<&[u8]> = waiting.iter().map(|w| w.2).collect();
        let sigs: Vec<Signature> = waiting.iter().map(|w| w.3).collect();
        let vks: Vec<VerifyingKey> = waiting.iter().map(|w| w.1.vk).collect();
        ed25519_dalek::verify_batch(&msgs, &sigs, &vks).is_ok()
    };
    if !batch_ok {
        for (i, key, msg, sig) in &waiting {
            verdicts[*i] = key.vk.verify_strict(msg, sig).is_ok();
        }
    }
    verdicts
}

/// A COSE_Sign1 in the one plain layout didgate's signer writes.
struct Sign1Parts<'b> {
    /// The protected header bucket, as stored.
    protected: &'b [u8],
    kind: Kind,
    kid: &'b [u8],
    payload: &'b [u8],
    signature: [u8; 64],
}

/// Reads a COSE_Sign1 laid out exactly as `envelope::sign` writes it: tag 18, an array of
/// four; the protected header a byte string holding a map of alg (1) = EdDSA (-8), content
/// type (3) = one of the didgate tags, and a non-empty kid (4), in any order, once each; an
/// empty unprotected map; a byte-string payload; a 64-byte signature; nothing after; every
/// length in its shortest form. `None` for anything else (then coset reads it).
///
/// Everything accepted here coset reads to the same header, payload and signature, and
/// `envelope::verify`'s header checks pass on it (the tags are non-empty `type/subtype`
/// strings without surrounding spaces, as coset requires).
fn parse_sign1_fast(bytes: &[u8]) -> Option<Sign1Parts<'_>> {
    if bytes.len() > envelope::MAX_ENVELOPE || bytes.get(..2)? != [0xd2, 0x84] {
        return None;
    }
    let mut r = Cbor { b: bytes, i: 2 };
    let protected = r.bytes()?;
    if r.b.get(r.i) != Some(&0xa0) {
        return None;
    }
    r.i += 1;
    let payload = r.bytes()?;
    let signature: [u8; 64] = r.fixed()?;
    if r.i != bytes.len() {
        return None;
    }
    let mut h = Cbor { b: protected, i: 0 };
    if h.head(5)? != 3 {
        return None;
    }
    let (mut alg, mut kind, mut kid) = (false, None, None);
    for _ in 0..3 {
        match h.uint()? {
            1 if !alg && h.b.get(h.i) == Some(&0x27) => {
                h.i += 1;
                alg = true;
            }
            3 if kind.is_none() => {
                let tag = h.text()?;
                kind = Some(KINDS.into_iter().find(|k| k.tag() == tag)?);
            }
            4 if kid.is_none() => kid = Some(h.bytes().filter(|k| !k.is_empty())?),
            _ => return None,
        }
    }
    if h.i != protected.len() || !alg {
        return None;
    }
    Some(Sign1Parts {
        protected,
        kind: kind?,
        kid: kid?,
        payload,
        signature,
    })
}

/// The COSE Sig_structure for a COSE_Sign1 (RFC 9052 section 4.4), encoded as coset encodes
/// it: `["Signature1", protected, external_aad, payload]`.
fn sig_structure(protected: &[u8], aad: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(protected.len() + aad.len() + payload.len() + 32);
    out.push(0x84);
    out.push(0x6a);
    out.extend_from_slice(b"Signature1");
    for b in [protected, aad, payload] {
        let len = b.len() as u64;
        match len {
            0..=23 => out.push(0x40 | len as u8),
            24..=0xff => out.extend_from_slice(&[0x58, len as u8]),
            0x100..=0xffff => {
                out.push(0x59);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            0x1_0000..=0xffff_ffff => {
                out.push(0x5a);
                out.extend_from_slice(&(len as u32).to_be_bytes());
            }
            _ => {
                out.push(0x5b);
                out.extend_from_slice(&len.to_be_bytes());
            }
        }
        out.extend_from_slice(b);
    }
    out
}

/// [`fast_parts`] for a message [`parse_sign1_fast`] read: the key, the signed bytes and the
/// opened message; `None` if the kid names no key or the payload does not decode.
fn fast_parts_plain(
    parts: &Sign1Parts<'_>,
    keys: &Keys,
    local: &mut HashMap<Vec<u8>, Option<Arc<Key>>>,
) -> Option<(Arc<Key>, Vec<u8>, OpenedMsg)> {
    let key = match local.get(parts.kid) {
        Some(k) => k.clone(),
        None => {
            let k = keys.get(parts.kid);
            local.insert(parts.kid.to_vec(), k.clone());
            k
        }
    }?;
    let payload = decode_payload(parts.kind, parts.payload)?;
    let tbs = sig_structure(parts.protected, parts.kind.tag().as_bytes(), parts.payload);
    let opened = OpenedMsg {
        signer: key.did.clone(),
        digest: envelope::signed_digest(parts.protected, parts.payload),
        payload,
        root_at: None,
    };
    Some((key, tbs, opened))
}

/// Decodes a payload as the message of `kind` (`Message::decode`).
fn decode_payload(kind: Kind, payload: &[u8]) -> Option<Payload> {
    Some(match kind {
        Kind::Request => decode_request_fast(payload)
            .or_else(|| Request::decode(payload).ok())?
            .wrap(),
        Kind::Grant => GrantBody::decode(payload).ok()?.wrap(),
        Kind::Receipt => decode_receipt_fast(payload)
            .or_else(|| Receipt::decode(payload).ok())?
            .wrap(),
        Kind::Refusal => Refusal::decode(payload).ok()?.wrap(),
        Kind::Checkpoint => Checkpoint::decode(payload).ok()?.wrap(),
        _ => return None,
    })
}

/// The key, the signed bytes (COSE Sig_structure), the signature and the opened message.
type FastParts = (Arc<Key>, Vec<u8>, [u8; 64], OpenedMsg);

/// `envelope::verify`'s checks short of the signature, and the payload decoded: the key, the
/// signed bytes (COSE Sig_structure), the signature and the opened message. `None` when any
/// check fails.
fn fast_parts(
    sign1: &CoseSign1,
    kind: Kind,
    keys: &Keys,
    local: &mut HashMap<Vec<u8>, Option<Arc<Key>>>,
) -> Option<FastParts> {
    if !sign1.unprotected.is_empty() {
        return None;
    }
    let header = &sign1.protected.header;
    if header.alg
        != Some(coset::RegisteredLabelWithPrivate::Assigned(
            iana::Algorithm::EdDSA,
        ))
    {
        return None;
    }
    if !matches!(&header.content_type, Some(coset::ContentType::Text(t)) if t == kind.tag()) {
        return None;
    }
    if !header.crit.is_empty()
        || !header.iv.is_empty()
        || !header.partial_iv.is_empty()
        || !header.rest.is_empty()
        || !header.counter_signatures.is_empty()
    {
        return None;
    }
    let key = match local.get(&header.key_id) {
        Some(k) => k.clone(),
        None => {
            let k = keys.get(&header.key_id);
            local.insert(header.key_id.clone(), k.clone());
            k
        }
    }?;
    let payload = sign1.payload.as_deref()?;
    let sig: [u8; 64] = sign1.signature.as_slice().try_into().ok()?;
    let tbs = sign1.tbs_data(kind.tag().as_bytes());
    let protected = sign1.protected.original_data.as_deref().unwrap_or_default();
    let digest = envelope::signed_digest(protected, payload);
    let payload = decode_payload(kind, payload)?;
    let opened = OpenedMsg {
        signer: key.did.clone(),
        digest,
        payload,
        root_at: None,
    };
    Some((key, tbs, sig, opened))
}

/// Decodes an entry like [`Entry::decode`], faster, for the plain encoding the chain writer
/// produces; `None` whenever the input is anything else (the caller then uses
/// [`Entry::decode`], whose verdict and error stand).
///
/// Accepted here, and only this: one definite-length map with text keys, each a field of
/// [`Entry`] at most once; unsigned integers, byte strings and text strings in their shortest
/// definite form; null for absent options; nested `peer_head` / `peer_entry` maps likewise;
/// no tags, no trailing bytes; the required fields present and a version [`Entry::decode`]
/// accepts ([`Entry::check_version`]). Every such input is
/// one that ciborium and serde (what `Entry::decode` uses) accept, decoding to the same value:
/// they accept these forms (and more, which go to `Entry::decode`), enum names are matched by
/// serde itself, and unknown or duplicate fields are left to `Entry::decode` to refuse.
fn decode_entry_fast(bytes: &[u8]) -> Option<Entry> {
    let mut r = Cbor { b: bytes, i: 0 };
    let n = r.head(5)?;
    let mut e = Entry::new(EntryKind::Genesis, 0);
    let mut seen = 0u32;
    for _ in 0..n {
        let key = r.text()?;
        let bit = match key {
            "v" => 0,
            "seq" => 1,
            "prev" => 2,
            "time_ms" => 3,
            "kind" => 4,
            "call" => 5,
            "signed" => 6,
            "peer_head" => 7,
            "peer_entry" => 8,
            "owner" => 9,
            "role" => 10,
            "subject" => 11,
            "grant" => 12,
            "status" => 13,
            "resp_len" => 14,
            "resp_b3" => 15,
            "code" => 16,
            "detail" => 17,
            "count" => 18,
            "outcome" => 19,
            "policy" => 20,
            "did_doc" => 21,
            "root" => 22,
            "version" => 23,
            "secret_echo" => 24,
            "secret_id" => 25,
            "secret_version" => 26,
            _ => return None,
        };
        if seen & (1 << bit) != 0 {
            return None;
        }
        seen |= 1 << bit;
        // unused fields are absent, not null: the strict decoder says why
        if r.b.get(r.i) == Some(&0xf6) {
            return None;
        }
        match bit {
            0 => e.v = r.uint()?,
            1 => e.seq = r.uint()?,
            2 => e.prev = r.fixed()?,
            3 => e.time_ms = r.uint()?,
            4 => e.kind = unit_variant(r.text()?)?,
            5 => e.call = r.opt(Cbor::fixed)?,
            6 => e.signed = r.opt(|r| r.bytes().map(<[u8]>::to_vec))?,
            7 => e.peer_head = r.opt(Cbor::chain_head)?,
            8 => e.peer_entry = r.opt(Cbor::entry_ref)?,
            9 => e.owner = r.opt(Cbor::string)?,
            10 => e.role = r.opt(|r| unit_variant(r.text()?))?,
            11 => e.subject = r.opt(Cbor::string)?,
            12 => e.grant = r.opt(Cbor::fixed)?,
            13 => e.status = r.opt(|r| u16::try_from(r.uint()?).ok())?,
            14 => e.resp_len = r.opt(Cbor::uint)?,
            15 => e.resp_b3 = r.opt(Cbor::fixed)?,
            16 => e.code = r.opt(Cbor::string)?,
            17 => e.detail = r.opt(Cbor::string)?,
            18 => e.count = r.opt(Cbor::uint)?,
            19 => e.outcome = r.opt(|r| unit_variant(r.text()?))?,
            20 => e.policy = r.opt(Cbor::fixed)?,
            21 => e.did_doc = r.opt(Cbor::fixed)?,
            22 => e.root = r.opt(Cbor::fixed)?,
            // never null (Entry's `present_uint`)
            23 => e.version = Some(r.uint()?),
            24 => e.secret_echo = Some(r.uint()?),
            25 => e.secret_id = Some(r.fixed()?),
            _ => e.secret_version = Some(r.uint()?),
        }
    }
    // v, seq, prev, time_ms and kind are required; anything after the map is refused; the
    // version's own rules are the strict decoder's
    (seen & 0b11111 == 0b11111
        && r.i == bytes.len()
        && e.check_version().is_ok()
        && e.check_fields().is_ok())
    .then_some(e)
}

/// Fills a map field once: a repeated key, or a value that did not decode, is `None`.
fn once<T>(slot: &mut Option<T>, value: Option<T>) -> Option<()> {
    if slot.is_some() {
        return None;
    }
    *slot = Some(value?);
    Some(())
}

/// [`Request::decode`] for the plain encoding, under the rules of [`decode_entry_fast`]
/// (`query` and `headers` as arrays of two-text arrays); `None` for anything else.
fn decode_request_fast(bytes: &[u8]) -> Option<Request> {
    let mut r = Cbor { b: bytes, i: 0 };
    let (mut v, mut aud, mut upstream, mut method, mut path) = (None, None, None, None, None);
    let (mut query, mut headers, mut body_len, mut body_b3) = (None, None, None, None);
    let (mut nonce, mut time_ms, mut head) = (None, None, None);
    for _ in 0..r.head(5)? {
        match r.text()? {
            "v" => once(&mut v, r.uint())?,
            "aud" => once(&mut aud, r.string())?,
            "upstream" => once(&mut upstream, r.string())?,
            "method" => once(&mut method, r.string())?,
            "path" => once(&mut path, r.string())?,
            "query" => once(&mut query, r.pairs())?,
            "headers" => once(&mut headers, r.pairs())?,
            "body_len" => once(&mut body_len, r.uint())?,
            "body_b3" => once(&mut body_b3, r.fixed())?,
            "nonce" => once(&mut nonce, r.fixed())?,
            "time_ms" => once(&mut time_ms, r.uint())?,
            "head" => once(&mut head, r.chain_head())?,
            _ => return None,
        }
    }
    if r.i != bytes.len() || v.and_then(Version::from_u64).is_none() {
        return None;
    }
    Some(Request {
        v: v?,
        aud: aud?,
        upstream: upstream?,
        method: method?,
        path: path?,
        query: query?,
        headers: headers?,
        body_len: body_len?,
        body_b3: body_b3?,
        nonce: nonce?,
        time_ms: time_ms?,
        head: head?,
    })
}

/// [`Receipt::decode`] for the plain encoding, under the rules of [`decode_entry_fast`];
/// `None` for anything else.
fn decode_receipt_fast(bytes: &[u8]) -> Option<Receipt> {
    let mut r = Cbor { b: bytes, i: 0 };
    let (mut v, mut call, mut grant, mut client, mut status) = (None, None, None, None, None);
    let (mut resp_len, mut resp_b3, mut entry, mut root, mut time_ms) =
        (None, None, None, None, None);
    for _ in 0..r.head(5)? {
        match r.text()? {
            "v" => once(&mut v, r.uint())?,
            "call" => once(&mut call, r.fixed())?,
            "grant" => once(&mut grant, r.fixed())?,
            "client" => once(&mut client, r.string())?,
            "status" => once(&mut status, r.uint().and_then(|s| u16::try_from(s).ok()))?,
            "resp_len" => once(&mut resp_len, r.uint())?,
            "resp_b3" => once(&mut resp_b3, r.fixed())?,
            "entry" => once(&mut entry, r.entry_ref())?,
            "root" => once(&mut root, r.opt(Cbor::fixed))?,
            "time_ms" => once(&mut time_ms, r.uint())?,
            _ => return None,
        }
    }
    if r.i != bytes.len() || v.and_then(Version::from_u64).is_none() {
        return None;
    }
    Some(Receipt {
        v: v?,
        call: call?,
        grant: grant?,
        client: client?,
        status: status?,
        resp_len: resp_len?,
        resp_b3: resp_b3?,
        entry: entry?,
        root: root.flatten(),
        time_ms: time_ms?,
    })
}

/// A unit enum variant by its serde name, matched by serde itself.
fn unit_variant<T: serde::de::DeserializeOwned>(name: &str) -> Option<T> {
    use serde::de::IntoDeserializer;
    let d: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
        name.into_deserializer();
    T::deserialize(d).ok()
}

/// A reader of the plain CBOR subset [`decode_entry_fast`] accepts.
struct Cbor<'b> {
    b: &'b [u8],
    i: usize,
}

impl<'b> Cbor<'b> {
    /// A head of major type `major` with its argument in the shortest form; not indefinite.
    fn head(&mut self, major: u8) -> Option<u64> {
        let first = *self.b.get(self.i)?;
        if first >> 5 != major {
            return None;
        }
        let info = first & 0x1f;
        let (len, min) = match info {
            0..=23 => {
                self.i += 1;
                return Some(u64::from(info));
            }
            24 => (1, 24),
            25 => (2, 0x100),
            26 => (4, 0x1_0000),
            27 => (8, 0x1_0000_0000),
            _ => return None,
        };
        let raw = self.b.get(self.i + 1..self.i + 1 + len)?;
        let value = raw.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        if value < min {
            return None;
        }
        self.i += 1 + len;
        Some(value)
    }

    fn uint(&mut self) -> Option<u64> {
        self.head(0)
    }

    fn bytes(&mut self) -> Option<&'b [u8]> {
        let len = usize::try_from(self.head(2)?).ok()?;
        let out = self.b.get(self.i..self.i.checked_add(len)?)?;
        self.i += len;
        Some(out)
    }

    fn fixed<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes()?.try_into().ok()
    }

    /// A text string of at most 1024 bytes (read by ciborium in one piece).
    fn text(&mut self) -> Option<&'b str> {
        let len = usize::try_from(self.head(3)?).ok()?;
        if len > 1024 {
            return None;
        }
        let out = self.b.get(self.i..self.i + len)?;
        self.i += len;
        std::str::from_utf8(out).ok()
    }

    fn string(&mut self) -> Option<String> {
        self.text().map(str::to_string)
    }

    /// Null as `None`, else the value read by `f`; `None` if neither.
    fn opt<T>(&mut self, f: impl FnOnce(&mut Self) -> Option<T>) -> Option<Option<T>> {
        if self.b.get(self.i) == Some(&0xf6) {
            self.i += 1;
            return Some(None);
        }
        f(self).map(Some)
    }

    /// An array of two-text arrays (serde's `Vec<(String, String)>`).
    fn pairs(&mut self) -> Option<Vec<(String, String)>> {
        let n = self.head(4)?;
        let mut out = Vec::with_capacity(usize::try_from(n).ok()?.min(64));
        for _ in 0..n {
            if self.head(4)? != 2 {
                return None;
            }
            out.push((self.string()?, self.string()?));
        }
        Some(out)
    }

    fn chain_head(&mut self) -> Option<ChainHead> {
        let (mut chain, mut seq, mut hash) = (None, None, None);
        for _ in 0..self.head(5)? {
            match self.text()? {
                "chain" if chain.is_none() => chain = Some(self.fixed()?),
                "seq" if seq.is_none() => seq = Some(self.uint()?),
                "hash" if hash.is_none() => hash = Some(self.fixed()?),
                _ => return None,
            }
        }
        Some(ChainHead {
            chain: chain?,
            seq: seq?,
            hash: hash?,
        })
    }

    fn entry_ref(&mut self) -> Option<EntryRef> {
        let (mut seq, mut hash) = (None, None);
        for _ in 0..self.head(5)? {
            match self.text()? {
                "seq" if seq.is_none() => seq = Some(self.uint()?),
                "hash" if hash.is_none() => hash = Some(self.fixed()?),
                _ => return None,
            }
        }
        Some(EntryRef {
            seq: seq?,
            hash: hash?,
        })
    }
}

/// A signer key (from a COSE `kid`), parsed once per distinct kid.
struct Key {
    did: Arc<Did>,
    vk: VerifyingKey,
    /// Of small order: `verify_strict` refuses every signature by it.
    weak: bool,
}

impl Key {
    fn new(did: Did) -> Self {
        let vk = did.verifying_key();
        Self {
            weak: vk.is_weak(),
            vk,
            did: Arc::new(did),
        }
    }
}

/// Signer keys by COSE `kid`, shared by the opening threads (each also keeps its own map).
#[derive(Default)]
struct Keys {
    map: RwLock<HashMap<Vec<u8>, Option<Arc<Key>>>>,
    web: Arc<WebKeys>,
}

/// The did:web keys the documents kept beside the chains list for authentication: DID URL
/// (`did:web:...#fragment`) -> key, and document hash -> document. A DID URL that two
/// documents bind to different keys names no key (its signatures cannot be attributed).
#[derive(Default)]
struct WebKeys {
    by_kid: HashMap<String, Option<Did>>,
    docs: HashMap<Digest, DidDocument>,
}

impl WebKeys {
    fn new(records: &[&ChainRecords]) -> Self {
        let mut out = Self::default();
        for bytes in records.iter().flat_map(|r| &r.documents) {
            let id = serde_json::from_slice::<serde_json::Value>(bytes)
                .ok()
                .and_then(|v| v.get("id")?.as_str().map(str::to_string));
            let Some(did) = id.and_then(|id| WebDid::parse(&id).ok()) else {
                continue;
            };
            let Ok(doc) = DidDocument::parse(&did, bytes) else {
                continue;
            };
            for k in doc.authentication_keys() {
                let kid = format!("{did}#{}", k.fragment);
                out.by_kid
                    .entry(kid)
                    .and_modify(|e| {
                        if e.as_ref() != Some(&k.key) {
                            *e = None;
                        }
                    })
                    .or_insert_with(|| Some(k.key.clone()));
            }
            out.docs.insert(doc.hash(), doc);
        }
        out
    }

    /// The key a did:web DID URL names.
    fn key(&self, web: &WebDid, fragment: &str) -> Option<Did> {
        self.by_kid
            .get(&format!("{web}#{fragment}"))
            .cloned()
            .flatten()
    }
}

impl Keys {
    /// The key a `kid` names, as `envelope::verify` reads it; `None` if it names none.
    fn get(&self, kid: &[u8]) -> Option<Arc<Key>> {
        if let Ok(map) = self.map.read()
            && let Some(k) = map.get(kid)
        {
            return k.clone();
        }
        let key = std::str::from_utf8(kid)
            .ok()
            .and_then(|s| match Principal::from_key_id(s).ok()? {
                (Principal::Key(did), _) => Some(did),
                (Principal::Web(web), fragment) => self.web.key(&web, fragment),
            })
            .map(|did| Arc::new(Key::new(did)));
        match self.map.write() {
            Ok(mut map) => map.entry(kid.to_vec()).or_insert(key).clone(),
            Err(_) => key,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle::Frontier;
    use didgate_protocol::Identity;
    const VERSION: u64 = Version::CURRENT.as_u64();

    /// A chain built in memory the way the store's writer builds it.
    struct Builder {
        entries: Vec<(u64, Vec<u8>)>,
        head: EntryRef,
        id: Digest,
        frontier: Frontier,
        checkpoints: Vec<Vec<u8>>,
    }

    impl Builder {
        fn new(owner: &Identity, role: Role) -> Self {
            Self::new_at(owner, role, 1)
        }

        fn new_at(owner: &Identity, role: Role, time_ms: u64) -> Self {
            let mut g = Entry::new(EntryKind::Genesis, time_ms);
            g.owner = Some(owner.did().to_string());
            g.role = Some(role);
            let bytes = g.encode();
            let hash = entry_hash(&bytes);
            let mut frontier = Frontier::default();
            frontier.push(merkle::leaf_hash(&hash));
            Self {
                entries: vec![(0, bytes)],
                head: EntryRef { seq: 0, hash },
                id: hash,
                frontier,
                checkpoints: Vec::new(),
            }
        }

        fn chain_head(&self) -> ChainHead {
            ChainHead {
                chain: self.id,
                seq: self.head.seq,
                hash: self.head.hash,
            }
        }

        fn push(&mut self, mut e: Entry, owner: &Identity) -> EntryRef {
            e.seq = self.head.seq + 1;
            e.prev = self.head.hash;
            let bytes = e.encode();
            let hash = entry_hash(&bytes);
            self.frontier.push(merkle::leaf_hash(&hash));
            self.entries.push((e.seq, bytes));
            self.head = EntryRef { seq: e.seq, hash };
            if self.frontier.size().is_multiple_of(32) {
                let cp = Checkpoint {
                    v: VERSION,
                    log: owner.did().to_string(),
                    chain: self.id,
                    size: self.frontier.size(),
                    head: hash,
                    root: self.frontier.root(),
                    time_ms: 2,
                };
                self.checkpoints.push(cp.sign(owner));
            }
            self.head
        }

        fn records(self, label: &str) -> ChainRecords {
            ChainRecords {
                label: label.into(),
                entries: self.entries,
                head: Some(self.head),
                checkpoints: self.checkpoints,
                documents: Vec::new(),
                sealed: false,
            }
        }
    }

    /// Regression (found by the kill -9 rounds): one DID keeping two named client chains signs
    /// checkpoints of the same size with different roots; that is two chains, not a fork.
    #[test]
    fn two_named_chains_of_one_client_are_no_fork() {
        let alice = Identity::from_seed(&[0xa1; 32]);
        let mut chains = Vec::new();
        for (i, name) in ["alice-a", "alice-b"].into_iter().enumerate() {
            let mut b = Builder::new_at(&alice, Role::Client, 1 + i as u64);
            for n in 0..40 {
                let mut e = Entry::new(EntryKind::Result, 10 + n + i as u64);
                e.detail = Some(format!("{name} {n}"));
                b.push(e, &alice);
            }
            assert!(!b.checkpoints.is_empty());
            chains.push(b.records(name));
        }
        let report = verify(&[], &chains);
        assert!(
            report
                .violations
                .iter()
                .all(|v| v.kind != ViolationKind::Fork),
            "{:?}",
            report.violations
        );
        // the same chain presented twice with different checkpoints still is one
        let mut forked = chains[0].clone();
        let other = chains[1].checkpoints[0].clone();
        forked.checkpoints = vec![other];
        let report = verify(&[], &[chains[0].clone(), forked]);
        assert!(
            !report.violations.is_empty(),
            "a checkpoint of another chain is not accepted"
        );
    }

    /// A gateway and two clients after `calls` calls, written as the gateway and the client
    /// write them, with a few faults: a receipt signed by a stranger, a call never closed, an
    /// altered receipt signature (and so a broken link).
    fn chains(calls: u64) -> (Vec<ChainRecords>, Vec<ChainRecords>) {
        let gw = Identity::from_seed(&[0x9a; 32]);
        let stranger = Identity::from_seed(&[0x66; 32]);
        let ids = [Identity::from_seed(&[1; 32]), Identity::from_seed(&[2; 32])];
        let mut g = Builder::new(&gw, Role::Gateway);
        let mut cs = [
            Builder::new(&ids[0], Role::Client),
            Builder::new(&ids[1], Role::Client),
        ];
        for i in 0..calls {
            // three calls in four from the first client, so its key signs enough for a table
            let j = usize::from(i % 4 == 3);
            let req = Request {
                v: VERSION,
                aud: gw.did().to_string(),
                upstream: "payments".into(),
                method: "GET".into(),
                path: format!("/v1/items/{i}"),
                query: Vec::new(),
                headers: Vec::new(),
                body_len: 0,
                body_b3: *blake3::hash(b"").as_bytes(),
                nonce: [i as u8; 16],
                time_ms: 10 + i,
                head: cs[j].chain_head(),
            };
            let bytes = req.sign(&ids[j]);
            let call = envelope::verify(&bytes, Kind::Request)
                .expect("own request")
                .digest();
            let mut e = Entry::new(EntryKind::Request, 10 + i);
            e.call = Some(call);
            e.signed = Some(bytes.clone());
            cs[j].push(e, &ids[j]);
            let mut x = Entry::new(EntryKind::Executing, 10 + i);
            x.call = Some(call);
            x.signed = Some(bytes);
            x.subject = Some(ids[j].did().to_string());
            x.grant = Some([i as u8; 16]);
            x.peer_head = Some(req.head);
            g.push(x, &gw);
            let mut result = Entry::new(EntryKind::Result, 11 + i);
            result.call = Some(call);
            if i == 7 {
                // the gateway stopped before closing the call
                result.outcome = Some(Outcome::Unknown);
                result.detail = Some("connection lost".into());
                cs[j].push(result, &ids[j]);
                continue;
            }
            let mut d = Entry::new(EntryKind::Executed, 11 + i);
            d.call = Some(call);
            d.status = Some(200);
            d.resp_len = Some(2);
            d.resp_b3 = Some(*blake3::hash(b"{}").as_bytes());
            let at = g.push(d, &gw);
            let receipt = Receipt {
                v: VERSION,
                call,
                grant: [i as u8; 16],
                client: ids[j].did().to_string(),
                status: 200,
                resp_len: 2,
                resp_b3: *blake3::hash(b"{}").as_bytes(),
                entry: at,
                root: Some(g.frontier.root()),
                time_ms: 12 + i,
            };
            let signer = if i == 11 { &stranger } else { &gw };
            let mut signed = receipt.sign(signer);
            if i == 20 {
                let last = signed.len() - 1;
                signed[last] ^= 1;
            }
            result.outcome = Some(Outcome::Receipt);
            result.signed = Some(signed);
            result.peer_entry = Some(at);
            cs[j].push(result, &ids[j]);
        }
        let [c0, c1] = cs;
        let mut c0 = c0.records("client-0");
        if let Some((_, bytes)) = c0.entries.get_mut(40) {
            // alter a stored entry inside its signed message: it still decodes
            let at = bytes.len() - 30;
            bytes[at] ^= 0x20;
        }
        (vec![g.records("gateway")], vec![c0, c1.records("client-1")])
    }

    /// Amendment 2.4: from the snapshot on, each executed entry names a version a secret entry
    /// declared before it, and not one replaced before its call began.
    #[test]
    fn executed_entries_tie_to_declared_secret_versions() {
        use crate::entry::{SecretState, SecretStatus, VersionState};
        let gw = Identity::from_seed(&[0x9b; 32]);
        let mut g = Builder::new(&gw, Role::Gateway);
        let state = |current: u64| SecretState {
            name: "payments-key".into(),
            id: [5; 16],
            status: SecretStatus::Enabled,
            kek: [1; 8],
            versions: (1..=current)
                .map(|v| VersionState {
                    version: v,
                    fingerprint: [v as u8; 32],
                    retired_ms: (v < current).then_some(9),
                })
                .collect(),
        };
        let client = Identity::from_seed(&[0x1c; 32]);
        let mut n = 0u8;
        let mut current = [0; 32];
        let mut call = |g: &mut Builder, kind: EntryKind, id: [u8; 16], version: u64| {
            let mut e = Entry::new(kind, 10);
            if kind == EntryKind::Executing {
                n += 1;
                let req = Request {
                    v: VERSION,
                    aud: gw.did().to_string(),
                    upstream: "payments".into(),
                    method: "GET".into(),
                    path: "/v1/balance".into(),
                    query: Vec::new(),
                    headers: Vec::new(),
                    body_len: 0,
                    body_b3: *blake3::hash(b"").as_bytes(),
                    nonce: [n; 16],
                    time_ms: 10,
                    head: ChainHead {
                        chain: [0x1c; 32],
                        seq: u64::from(n),
                        hash: [n; 32],
                    },
                };
                let bytes = req.sign(&client);
                current = envelope::verify(&bytes, Kind::Request)
                    .expect("own request")
                    .digest();
                e.signed = Some(bytes);
                e.subject = Some(client.did().to_string());
                e.peer_head = Some(req.head);
            } else {
                e.secret_id = Some(id);
                e.secret_version = Some(version);
                e.status = Some(200);
                e.resp_len = Some(0);
                e.resp_b3 = Some(*blake3::hash(b"").as_bytes());
            }
            e.call = Some(current);
            g.push(e, &gw).seq
        };
        let id = [5; 16];
        // before the snapshot nothing is known, and nothing is checked
        call(&mut g, EntryKind::Executing, id, 0);
        call(&mut g, EntryKind::Executed, [6; 16], 4);
        g.push(
            Entry::secret(SecretAction::Snapshot, vec![state(1)], 10),
            &gw,
        );
        call(&mut g, EntryKind::Executing, id, 0);
        call(&mut g, EntryKind::Executed, id, 1);
        // a call that began before the rotation may use either version
        call(&mut g, EntryKind::Executing, id, 0);
        g.push(
            Entry::secret(SecretAction::Rotated, vec![state(2)], 10),
            &gw,
        );
        call(&mut g, EntryKind::Executed, id, 1);
        call(&mut g, EntryKind::Executing, id, 0);
        call(&mut g, EntryKind::Executed, id, 2);
        // violations: the replaced version, a version never declared, an unknown secret
        call(&mut g, EntryKind::Executing, id, 0);
        let stale = call(&mut g, EntryKind::Executed, id, 1);
        call(&mut g, EntryKind::Executing, id, 0);
        let future = call(&mut g, EntryKind::Executed, id, 3);
        call(&mut g, EntryKind::Executing, id, 0);
        let stranger = call(&mut g, EntryKind::Executed, [6; 16], 1);
        let report = verify(&[g.records("gateway")], &[]);
        let found: Vec<u64> = report
            .violations
            .iter()
            .filter(|v| v.kind == ViolationKind::SecretMismatch)
            .filter_map(|v| v.seq)
            .collect();
        assert_eq!(
            found,
            vec![stale, future, stranger],
            "{:#?}",
            report.violations
        );
    }

    #[test]
    fn clean_chains_verify() {
        let (gws, cls) = chains(6);
        let report = verify_with(&gws, &cls, 2);
        assert!(report.ok(), "{:?}", report.violations);
        assert_eq!(report.cross_links, 12);
    }

    #[test]
    fn one_thread_and_two_give_the_same_report() {
        let (gws, cls) = chains(160);
        let one = verify_with(&gws, &cls, 1);
        let two = verify_with(&gws, &cls, 2);
        let json = |r: &Report| serde_json::to_string(r).expect("json");
        assert_eq!(json(&one), json(&two));
        let kinds: HashSet<ViolationKind> = one.violations.iter().map(|v| v.kind).collect();
        for kind in [
            ViolationKind::BadSignature,
            ViolationKind::UnclosedCall,
            ViolationKind::AlteredEntry,
        ] {
            assert!(
                kinds.contains(&kind),
                "{kind} missing: {:?}",
                one.violations
            );
        }
        // the faulty receipt was rejected by the protocol crate's own check
        let (_, phases) = verify_phases(&gws, &cls, 2);
        assert!(phases.signatures > 300 && phases.signed_refs > phases.signatures);
    }

    /// A deterministic pseudo-random source for the decoder tests.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn digest(&mut self) -> Digest {
            let mut d = [0u8; 32];
            for b in &mut d {
                *b = self.next() as u8;
            }
            d
        }
        fn text(&mut self) -> String {
            [
                "",
                "a",
                "ok",
                "résumé",
                "interrupted at seq 4",
                "x/y?z=1",
                "🙂",
            ][self.below(7) as usize]
                .repeat(1 + self.below(3) as usize)
        }
        fn int(&mut self) -> u64 {
            [
                0,
                1,
                23,
                24,
                255,
                256,
                65535,
                65536,
                u64::from(u32::MAX),
                u64::MAX,
            ][self.below(10) as usize]
                .wrapping_add(self.below(2))
        }
    }

    fn random_entry(rng: &mut Rng) -> Entry {
        let kinds = [
            EntryKind::Genesis,
            EntryKind::Request,
            EntryKind::Result,
            EntryKind::Executing,
            EntryKind::Executed,
            EntryKind::Failed,
            EntryKind::Abandoned,
            EntryKind::Refused,
            EntryKind::Refusals,
        ];
        let mut e = Entry::new(kinds[rng.below(9) as usize], rng.int());
        e.seq = rng.int();
        e.prev = rng.digest();
        let maybe = |rng: &mut Rng| rng.below(3) == 0;
        if maybe(rng) {
            e.call = Some(rng.digest());
        }
        if maybe(rng) {
            e.signed = Some(vec![rng.next() as u8; rng.below(300) as usize]);
        }
        if maybe(rng) {
            e.peer_head = Some(ChainHead {
                chain: rng.digest(),
                seq: rng.int(),
                hash: rng.digest(),
            });
        }
        if maybe(rng) {
            e.peer_entry = Some(EntryRef {
                seq: rng.int(),
                hash: rng.digest(),
            });
        }
        if maybe(rng) {
            e.owner = Some(rng.text());
        }
        if maybe(rng) {
            e.role = Some([Role::Gateway, Role::Client][rng.below(2) as usize]);
        }
        if maybe(rng) {
            e.subject = Some(rng.text());
        }
        if maybe(rng) {
            e.grant = Some([rng.next() as u8; 16]);
        }
        if maybe(rng) {
            e.status = Some(rng.int() as u16);
        }
        if maybe(rng) {
            e.resp_len = Some(rng.int());
        }
        if maybe(rng) {
            e.resp_b3 = Some(rng.digest());
        }
        if maybe(rng) {
            e.code = Some(rng.text());
        }
        if maybe(rng) {
            e.detail = Some(rng.text());
        }
        if maybe(rng) {
            e.count = Some(rng.int());
        }
        if maybe(rng) {
            e.outcome =
                Some([Outcome::Receipt, Outcome::Refusal, Outcome::Unknown][rng.below(3) as usize]);
        }
        for field in [&mut e.policy, &mut e.did_doc, &mut e.root] {
            if rng.below(5) == 0 {
                *field = Some(rng.digest());
            }
        }
        // both versions; version 2 has the format kind and its version field
        match rng.below(4) {
            0 => e.v = 1,
            1 => {
                e.kind = EntryKind::Format;
                e.version = Some(e.v);
            }
            2 => {
                e.kind = EntryKind::Executed;
                e.secret_echo = Some(rng.int());
                if rng.below(2) == 0 {
                    e.secret_id = Some([rng.next() as u8; 16]);
                    e.secret_version = Some(rng.int());
                }
            }
            _ => {}
        }
        e
    }

    /// The fast entry decoder gives `Entry::decode`'s value on what the writer encodes, and
    /// whenever it accepts altered bytes, `Entry::decode` accepts them with the same value.
    #[test]
    fn fast_entry_decoder_agrees_with_entry_decode() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut accepted_altered = 0;
        let mut accepted_fresh = 0;
        // random fields mostly break the kinds' field tables: draw until enough pass (bounded)
        for _ in 0..400_000 {
            if accepted_fresh >= 300 {
                break;
            }
            let e = random_entry(&mut rng);
            let bytes = e.encode();
            assert_eq!(Entry::decode(&bytes), Ok(e.clone()));
            // random fields break the kinds' field tables: the fast path and the strict decoder
            // agree on which, and on the value when they accept
            let strict = Entry::decode_strict(&bytes).ok();
            assert_eq!(decode_entry_fast(&bytes), strict);
            if strict.is_none() {
                continue;
            }
            accepted_fresh += 1;
            for _ in 0..20 {
                let mut altered = bytes.clone();
                match rng.below(4) {
                    0 => {
                        let i = rng.below(altered.len() as u64) as usize;
                        altered[i] ^= 1 << rng.below(8);
                    }
                    1 => {
                        let i = rng.below(altered.len() as u64) as usize;
                        altered[i] = rng.next() as u8;
                    }
                    2 => altered.truncate(rng.below(altered.len() as u64) as usize),
                    _ => {
                        let i = rng.below(altered.len() as u64) as usize;
                        altered.insert(i, rng.next() as u8);
                    }
                }
                if let Some(fast) = decode_entry_fast(&altered) {
                    accepted_altered += 1;
                    assert_eq!(Entry::decode_strict(&altered), Ok(fast), "{altered:02x?}");
                }
            }
        }
        assert!(accepted_fresh > 100, "{accepted_fresh}");
        assert!(accepted_altered > 100, "{accepted_altered}");
        // forms the writer never produces are left to Entry::decode
        let e = random_entry(&mut rng);
        let value: ciborium::Value = ciborium::from_reader(e.encode().as_slice()).expect("cbor");
        let mut tagged = Vec::new();
        ciborium::into_writer(&ciborium::Value::Tag(55799, Box::new(value)), &mut tagged)
            .expect("encode");
        assert_eq!(decode_entry_fast(&tagged), None);
        let mut wide_v = e.encode();
        let v = e.v as u8;
        let at = wide_v
            .windows(3)
            .position(|w| w == [0x61, b'v', v])
            .expect("v");
        wide_v.splice(at + 2..at + 3, [0x18, v]);
        assert_eq!(decode_entry_fast(&wide_v), None);
    }

    /// The fast request and receipt decoders give `Message::decode`'s value on what the signer
    /// encodes, and whenever they accept altered bytes, `Message::decode` agrees.
    #[test]
    fn fast_payload_decoders_agree_with_message_decode() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let mut accepted_altered = 0;
        for n in 0..1500u64 {
            let req = Request {
                v: VERSION,
                aud: rng.text(),
                upstream: rng.text(),
                method: rng.text(),
                path: rng.text(),
                query: (0..rng.below(4))
                    .map(|_| (rng.text(), rng.text()))
                    .collect(),
                headers: (0..rng.below(3))
                    .map(|_| (rng.text(), rng.text()))
                    .collect(),
                body_len: rng.int(),
                body_b3: rng.digest(),
                nonce: [rng.next() as u8; 16],
                time_ms: rng.int(),
                head: ChainHead {
                    chain: rng.digest(),
                    seq: rng.int(),
                    hash: rng.digest(),
                },
            };
            let receipt = Receipt {
                v: VERSION,
                call: rng.digest(),
                grant: [rng.next() as u8; 16],
                client: rng.text(),
                status: rng.int() as u16,
                resp_len: rng.int(),
                resp_b3: rng.digest(),
                entry: EntryRef {
                    seq: rng.int(),
                    hash: rng.digest(),
                },
                root: (n % 2 == 0).then(|| rng.digest()),
                time_ms: rng.int(),
            };
            let (rb, cb) = (req.encode(), receipt.encode());
            assert_eq!(decode_request_fast(&rb), Some(req));
            assert_eq!(decode_receipt_fast(&cb), Some(receipt));
            for bytes in [rb, cb] {
                for _ in 0..15 {
                    let mut altered = bytes.clone();
                    let i = rng.below(altered.len() as u64) as usize;
                    match rng.below(3) {
                        0 => altered[i] ^= 1 << rng.below(8),
                        1 => altered[i] = rng.next() as u8,
                        _ => altered.truncate(i),
                    }
                    if let Some(fast) = decode_request_fast(&altered) {
                        accepted_altered += 1;
                        assert_eq!(Request::decode(&altered), Ok(fast));
                    }
                    if let Some(fast) = decode_receipt_fast(&altered) {
                        accepted_altered += 1;
                        assert_eq!(Receipt::decode(&altered), Ok(fast));
                    }
                }
            }
        }
        assert!(accepted_altered > 100, "{accepted_altered}");
    }

    /// The plain COSE reader agrees with coset on what didgate signs, on its Sig_structure, and
    /// on any altered message it still accepts.
    #[test]
    fn plain_cose_reader_agrees_with_coset() {
        let id = Identity::from_seed(&[3; 32]);
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let mut accepted_altered = 0;
        for n in 0..400usize {
            let kind = KINDS[n % KINDS.len()];
            let payload: Vec<u8> = (0..(n * 37) % 700).map(|i| (i * 7 + n) as u8).collect();
            let bytes = envelope::sign(&id, kind, payload);
            let parts = parse_sign1_fast(&bytes).expect("plain layout");
            let sign1 = CoseSign1::from_tagged_slice(&bytes).expect("coset");
            assert_eq!(parts.kind, kind);
            assert_eq!(
                Some(parts.protected),
                sign1.protected.original_data.as_deref()
            );
            assert_eq!(parts.kid, sign1.protected.header.key_id.as_slice());
            assert_eq!(Some(parts.payload), sign1.payload.as_deref());
            assert_eq!(parts.signature.as_slice(), sign1.signature.as_slice());
            assert_eq!(
                sig_structure(parts.protected, kind.tag().as_bytes(), parts.payload),
                sign1.tbs_data(kind.tag().as_bytes())
            );
            for _ in 0..20 {
                let mut altered = bytes.clone();
                let i = rng.below(altered.len() as u64) as usize;
                match rng.below(3) {
                    0 => altered[i] ^= 1 << rng.below(8),
                    1 => altered[i] = rng.next() as u8,
                    _ => altered.truncate(i),
                }
                if let Some(p) = parse_sign1_fast(&altered) {
                    accepted_altered += 1;
                    let s = CoseSign1::from_tagged_slice(&altered).expect("coset accepts it too");
                    let h = &s.protected.header;
                    assert!(s.unprotected.is_empty() && h.crit.is_empty() && h.rest.is_empty());
                    assert_eq!(
                        h.alg,
                        Some(coset::RegisteredLabelWithPrivate::Assigned(
                            iana::Algorithm::EdDSA
                        ))
                    );
                    assert_eq!(
                        h.content_type,
                        Some(coset::ContentType::Text(p.kind.tag().to_string()))
                    );
                    assert_eq!(Some(p.protected), s.protected.original_data.as_deref());
                    assert_eq!(p.kid, h.key_id.as_slice());
                    assert_eq!(Some(p.payload), s.payload.as_deref());
                    assert_eq!(p.signature.as_slice(), s.signature.as_slice());
                }
            }
        }
        assert!(accepted_altered > 100, "{accepted_altered}");
    }
}

//! The verifier's public types: the records it reads, its options, and its report (violations,
//! warnings, skipped checks, chain summaries, calls of unknown outcome) and the phase timings
//! of a run. Nothing here decides a violation; every other module of the verifier sits above
//! this one.

use std::time::Duration;

use didgate_protocol::message::EntryRef;
use serde::Serialize;

use crate::nodes::Revocations;

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

/// How the verifier judges: how strictly for what older logs may lack, and with which node
/// revocation lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// Report entries covered by no signed checkpoint (`unsealed_tail`) as a violation in
    /// every chain, not only in chains declared sealed.
    pub strict: bool,
    /// The node revocation lists of the gateways (`--node-revocations`): a node certificate
    /// revoked at a message's time fails it (`bad_node_certificate`). Without a list for a
    /// gateway, none of its nodes' certificates is revoked.
    pub revocations: Revocations,
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
    /// A receipt, refusal, grant or checkpoint carries a node certificate that does not make
    /// its signer a node of the gateway it speaks for at the message's time: signed by another
    /// key, altered, for another key, naming another gateway than the request's `aud`, not
    /// valid then, or revoked then (amendment 2.7; specs/audit-log.md, "Receipt checks").
    BadNodeCertificate,
    /// A chain is shorter than, or differs at, a size a peer witnessed: another given chain
    /// holds a `witness` entry of its owner's signed checkpoint at that size, and the chain's
    /// first entries no longer have that checkpoint's head and root (amendment 2.9;
    /// specs/audit-log.md, "Witness entries").
    WitnessedRewrite,
    /// Two nodes of a cluster claimed one caller's requests under overlapping ownership: one
    /// node's `executing` or `granted` entry names an older view of the members (`home_rev`)
    /// than another node's entry for that caller, at a time not earlier (amendment 2.12;
    /// specs/audit-log.md, "Home revisions").
    OverlappingOwnership,
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

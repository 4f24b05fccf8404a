//! Issue 23 (amendment 2.9): witness entries. Two nodes of one gateway, each owning its own
//! chain; node B appends node A's signed checkpoint as a witness entry, so A cannot present a
//! chain shorter than, or different from, what B saw (`witnessed_rewrite`), once both chains
//! are given.

use didgate_protocol::message::Message;
use didgate_protocol::node::NodeCertificate;

use super::*;
use crate::nodes::Revocations;

/// The node certificates' window: from 1 s to 1 h + 1 s.
const NOT_BEFORE: u64 = 1_000;
const NOT_AFTER: u64 = 3_601_000;

/// The size at which node A signs the checkpoint node B witnesses.
const WITNESSED: u64 = 6;

/// A gateway and its two nodes A and B, each certified.
struct Nodes {
    gateway: Identity,
    a: Identity,
    b: Identity,
    certs: [Vec<u8>; 2],
}

impl Nodes {
    fn new() -> Self {
        let gateway = Identity::from_seed(&[0x50; 32]);
        let (a, b) = (
            Identity::from_seed(&[0x51; 32]),
            Identity::from_seed(&[0x52; 32]),
        );
        let certs =
            [(&a, 1), (&b, 2)].map(|(node, serial)| certificate(&gateway, &gateway, node, serial));
        Self {
            gateway,
            a,
            b,
            certs,
        }
    }
}

/// A certificate for `node` signed by `by` in the name of `gateway`.
fn certificate(by: &Identity, gateway: &Identity, node: &Identity, serial: u64) -> Vec<u8> {
    NodeCertificate {
        v: 2,
        gateway: gateway.did().to_string(),
        node: node.did().to_string(),
        serial,
        not_before_ms: NOT_BEFORE,
        not_after_ms: NOT_AFTER,
        addr: None,
    }
    .sign(by)
}

/// A node's chain: its key owns it, its checkpoints carry its certificate.
fn node_chain(owner: &Identity, cert: &[u8]) -> Builder {
    let mut c = Builder::new_at(owner, Role::Gateway, NOT_BEFORE);
    c.checkpoint_ms = NOT_BEFORE + 1;
    c.node_cert = Some(cert.to_vec());
    c
}

/// An aggregate refusals entry, as filler.
fn filler(n: u64, note: &str) -> Entry {
    let mut e = Entry::new(EntryKind::Refusals, 1_500 + n);
    e.count = Some(n);
    e.code = Some(format!("malformed={n}"));
    e.detail = Some(note.into());
    e
}

/// Node A's chain of `len` entries (genesis included), entry `altered` (if any) written with
/// another detail: a checkpoint at size [`WITNESSED`] (when it gets there) and one at the end,
/// so the chain on its own always verifies.
fn chain_a(n: &Nodes, len: u64, altered: Option<u64>) -> Builder {
    let mut a = node_chain(&n.a, &n.certs[0]);
    for seq in 1..len {
        let note = if altered == Some(seq) {
            "rewritten"
        } else {
            "as written"
        };
        a.push(filler(seq, note), &n.a);
        if seq + 1 == WITNESSED && len > WITNESSED {
            a.checkpoint(&n.a);
        }
    }
    a.checkpoint(&n.a);
    a
}

/// Node B's chain holding `witnesses` between filler entries, sealed; returns it and the
/// witnesses' seqs.
fn chain_b(n: &Nodes, witnesses: Vec<Entry>) -> (ChainRecords, Vec<u64>) {
    let mut b = node_chain(&n.b, &n.certs[1]);
    b.push(filler(1, "before"), &n.b);
    let seqs = witnesses
        .into_iter()
        .map(|w| {
            let seq = b.push(w, &n.b).seq;
            b.push(filler(seq, "after"), &n.b);
            seq
        })
        .collect();
    b.checkpoint(&n.b);
    (b.records("node-b"), seqs)
}

/// Node B's witness of A's checkpoint `cp`, built as the gateway builds it.
fn witness(n: &Nodes, cp: &[u8]) -> Entry {
    Entry::witness(n.a.did(), cp.to_vec(), 1_600).expect("A's own checkpoint")
}

fn verified(gateways: &[ChainRecords]) -> Report {
    let options = Options {
        strict: true,
        revocations: Revocations::new(),
    };
    verify_opts(gateways, &[], options)
}

/// The (chain, seq, kind) of each violation.
fn found(report: &Report) -> Vec<(String, Option<u64>, ViolationKind)> {
    report
        .violations
        .iter()
        .map(|v| (v.chain.clone(), v.seq, v.kind))
        .collect()
}

fn one(chain: &str, seq: u64, kind: ViolationKind) -> Vec<(String, Option<u64>, ViolationKind)> {
    vec![(chain.to_string(), Some(seq), kind)]
}

#[test]
fn a_witnessed_checkpoint_of_an_intact_chain_verifies_clean() {
    let n = Nodes::new();
    let a = chain_a(&n, 10, None);
    let (b, _) = chain_b(&n, vec![witness(&n, &a.checkpoints[0])]);
    let report = verified(&[a.records("node-a"), b.clone()]);
    assert!(
        report.ok() && report.warnings.is_empty(),
        "{:#?}",
        report.violations
    );
    // the witnessed chain not given: nothing to hold the witness against, nothing reported
    let report = verified(&[b]);
    assert!(report.ok(), "{:#?}", report.violations);
}

#[test]
fn a_chain_rewritten_below_a_witnessed_size_is_reported() {
    let n = Nodes::new();
    let original = chain_a(&n, 10, None);
    let (b, seqs) = chain_b(&n, vec![witness(&n, &original.checkpoints[0])]);
    // entry 3 rewritten, the chain re-hashed and re-signed: it verifies on its own
    let rewritten = chain_a(&n, 10, Some(3)).records("node-a");
    assert!(verified(std::slice::from_ref(&rewritten)).ok());
    let report = verified(&[rewritten, b.clone()]);
    assert_eq!(
        found(&report),
        one("node-a", WITNESSED - 1, ViolationKind::WitnessedRewrite),
        "{:#?}",
        report.violations
    );
    let detail = &report.violations[0].detail;
    assert!(
        detail.contains(&format!(
            "node-b seq {} witnessed this chain at size 6",
            seqs[0]
        )),
        "{detail}"
    );
    assert_eq!(report.violations[0].kind.name(), "witnessed_rewrite");
    // a rewrite above the witnessed size is not what B saw: nothing to report
    let above = chain_a(&n, 10, Some(WITNESSED + 1)).records("node-a");
    let report = verified(&[above, b]);
    assert!(report.ok(), "{:#?}", report.violations);
}

#[test]
fn a_chain_truncated_below_a_witnessed_size_is_reported_once_per_witnessing_chain() {
    let n = Nodes::new();
    let original = chain_a(&n, 10, None);
    // B witnessed A at size 6 and at size 10 (its final checkpoint)
    let ws = original
        .checkpoints
        .iter()
        .map(|cp| witness(&n, cp))
        .collect();
    let (b, seqs) = chain_b(&n, ws);
    let truncated = chain_a(&n, 4, None).records("node-a");
    assert!(verified(std::slice::from_ref(&truncated)).ok());
    let report = verified(&[truncated, b.clone()]);
    assert_eq!(
        found(&report),
        one("node-a", 4, ViolationKind::WitnessedRewrite),
        "{:#?}",
        report.violations
    );
    let detail = &report.violations[0].detail;
    assert!(
        detail.contains(&format!(
            "node-b seq {} witnessed this chain at size 6",
            seqs[0]
        )) && detail.contains("the chain has 4 entries")
            && detail.contains("2 witness entries of node-b fail"),
        "{detail}"
    );
    // cut between the two witnessed sizes: only the larger one fails
    let shorter = chain_a(&n, 8, None).records("node-a");
    let report = verified(&[shorter, b]);
    assert_eq!(
        found(&report),
        one("node-a", 8, ViolationKind::WitnessedRewrite),
        "{:#?}",
        report.violations
    );
    assert!(report.violations[0].detail.contains("at size 10"));
}

#[test]
fn a_witness_whose_checkpoint_does_not_hold_is_a_bad_signature() {
    let n = Nodes::new();
    let a = chain_a(&n, 10, None);
    let cp = a.checkpoints[0].clone();
    let unchecked = |subject: &Identity, signed: Vec<u8>| {
        let mut e = Entry::new(EntryKind::Witness, 1_600);
        e.subject = Some(subject.did().to_string());
        e.signed = Some(signed);
        e
    };
    let mut broken = cp.clone();
    let last = broken.len() - 1;
    broken[last] ^= 1;
    // A's checkpoint in B's name, and one B signed for A's chain (B does not own it)
    let opened = Checkpoint::decode(
        envelope::verify(&cp, Kind::Checkpoint)
            .expect("A's checkpoint")
            .payload(),
    )
    .expect("checkpoint");
    let mut forged = opened.clone();
    forged.log = n.b.did().to_string();
    forged.node_cert = Some(n.certs[1].clone());
    let ws = vec![
        unchecked(&n.a, broken),
        unchecked(&n.b, cp),
        unchecked(&n.b, forged.sign(&n.b)),
    ];
    let (b, seqs) = chain_b(&n, ws);
    let report = verified(&[a.records("node-a"), b]);
    let bad = seqs
        .iter()
        .map(|s| ("node-b".to_string(), Some(*s), ViolationKind::BadSignature))
        .collect::<Vec<_>>();
    assert_eq!(found(&report), bad, "{:#?}", report.violations);
    assert!(
        report.violations[2]
            .detail
            .contains("which does not own it")
    );
}

#[test]
fn a_witnessed_checkpoint_carrying_a_bad_node_certificate_is_reported() {
    let n = Nodes::new();
    let a = chain_a(&n, 10, None);
    // A's checkpoint at size 6 again, carrying a certificate a stranger signed
    let mut cp = Checkpoint::decode(
        envelope::verify(&a.checkpoints[0], Kind::Checkpoint)
            .expect("A's checkpoint")
            .payload(),
    )
    .expect("checkpoint");
    let stranger = Identity::from_seed(&[0x5f; 32]);
    cp.node_cert = Some(certificate(&stranger, &n.gateway, &n.a, 1));
    let (b, seqs) = chain_b(&n, vec![witness(&n, &cp.sign(&n.a))]);
    let report = verified(&[a.records("node-a"), b]);
    assert_eq!(
        found(&report),
        one("node-b", seqs[0], ViolationKind::BadNodeCertificate),
        "{:#?}",
        report.violations
    );
}

#[test]
fn a_witnessed_chain_with_missing_entries_skips_the_check() {
    let n = Nodes::new();
    let a = chain_a(&n, 10, None);
    let (b, _) = chain_b(&n, vec![witness(&n, &a.checkpoints[0])]);
    let mut gapped = a.records("node-a");
    gapped.entries.remove(3);
    let report = verified(&[gapped, b]);
    assert!(
        found(&report)
            .iter()
            .all(|(_, _, k)| *k != ViolationKind::WitnessedRewrite),
        "{:#?}",
        report.violations
    );
    assert!(
        report
            .skipped
            .iter()
            .any(|s| s.chain == "node-a" && s.check.contains("1 witness entry of node-b")),
        "{:#?}",
        report.skipped
    );
    assert!(!report.ok());
}

#[test]
fn a_witness_entry_in_a_version_1_chain_does_not_decode() {
    let n = Nodes::new();
    let a = chain_a(&n, 10, None);
    // a version 1 chain: its genesis and every entry of version 1
    let mut g = Entry::new(EntryKind::Genesis, NOT_BEFORE);
    g.v = 1;
    g.owner = Some(n.b.did().to_string());
    g.role = Some(Role::Gateway);
    let bytes = g.encode();
    let hash = entry_hash(&bytes);
    let mut frontier = Frontier::default();
    frontier.push(merkle::leaf_hash(&hash));
    let mut b = Builder {
        entries: vec![(0, bytes)],
        head: EntryRef { seq: 0, hash },
        id: hash,
        frontier,
        checkpoints: Vec::new(),
        node_cert: None,
        checkpoint_ms: 2,
    };
    let mut w = witness(&n, &a.checkpoints[0]);
    w.v = 1;
    let seq = b.push(w, &n.b).seq;
    let mut after = filler(2, "after");
    after.v = 1;
    b.push(after, &n.b);
    b.checkpoint(&n.b);
    let report = verified(&[a.records("node-a"), b.records("node-b")]);
    assert_eq!(
        found(&report),
        one("node-b", seq, ViolationKind::AlteredEntry),
        "{:#?}",
        report.violations
    );
    assert!(report.violations[0].detail.contains("does not decode"));
}

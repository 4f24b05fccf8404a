//! The verifier's own tests: chains built in memory as the writers build them, verified whole.
//! (The tamper matrix is tests/tests/tamper.rs; the fast decoders' agreement tests sit beside
//! the decoders, in `crate::entry` and the protocol crate.)

use std::collections::HashSet;

use didgate_protocol::envelope::{self, Kind};
use didgate_protocol::message::{
    ChainHead, Checkpoint, Digest, EntryRef, Receipt, Request, SignedMessage,
};
use didgate_protocol::{Identity, Version};

use super::*;
use crate::entry::{Entry, EntryKind, Outcome, Role, SecretAction, entry_hash};
use crate::merkle::{self, Frontier};

mod nodes;
mod witness;

const VERSION: u64 = Version::CURRENT.as_u64();

/// A chain built in memory the way the store's writer builds it.
struct Builder {
    entries: Vec<(u64, Vec<u8>)>,
    head: EntryRef,
    id: Digest,
    frontier: Frontier,
    checkpoints: Vec<Vec<u8>>,
    /// The node certificate its checkpoints carry, and their `time_ms`.
    node_cert: Option<Vec<u8>>,
    checkpoint_ms: u64,
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
            node_cert: None,
            checkpoint_ms: 2,
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
            self.checkpoint(owner);
        }
        self.head
    }

    /// Signs a checkpoint of the head, as the writer does.
    fn checkpoint(&mut self, owner: &Identity) {
        let cp = Checkpoint {
            v: VERSION,
            log: owner.did().to_string(),
            chain: self.id,
            size: self.frontier.size(),
            head: self.head.hash,
            root: self.frontier.root(),
            time_ms: self.checkpoint_ms,
            node_cert: self.node_cert.clone(),
        };
        self.checkpoints.push(cp.sign(owner));
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
            node_cert: None,
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

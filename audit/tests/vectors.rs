//! The audit-log vectors (specs/audit-log.md, "Format evolution", "Vectors").
//!
//! Builds, deterministically, a gateway chain that crosses the switch from version 1 to
//! version 2 and variants that break the rule (`specs/vectors/format-switch.json`), gateway
//! chains with secret lifecycle entries and calls that tie, or fail to tie, to the versions
//! they declare (`specs/vectors/secret-lifecycle.json`, amendment 2.4), and the chains of two
//! nodes, one witnessing the other's checkpoint, which is intact, rewritten or truncated
//! (`specs/vectors/witness.json`, amendment 2.9); checks that the committed files are exactly
//! what this release builds (set `DIDGATE_WRITE_VECTORS=1` to rewrite them after a deliberate
//! change), and that the verifier's verdict on every chain (every case, for the witness
//! vectors) of the committed files is the one the file states.

use didgate_audit::entry::{
    Entry, EntryKind, Role, SecretAction, SecretState, SecretStatus, VersionState, entry_hash,
    sealed_fingerprint,
};
use didgate_audit::merkle::{self, Frontier};
use didgate_audit::{ChainRecords, verify};
use didgate_protocol::envelope::{self, Kind};
use didgate_protocol::message::{ChainHead, Checkpoint, Digest, EntryRef, Request, SignedMessage};
use didgate_protocol::node::NodeCertificate;
use didgate_protocol::{Identity, Version};
use serde_json::{Value, json};

const T0: u64 = 1_700_000_000_000;

fn owner() -> Identity {
    Identity::from_seed(&[0; 32])
}

/// One entry of a vector chain: its kind and version; the rest is filled deterministically.
#[derive(Clone, Copy)]
struct Spec {
    kind: EntryKind,
    v: Version,
    /// Sign a checkpoint right after this entry.
    checkpoint: bool,
}

fn spec(kind: EntryKind, v: Version) -> Spec {
    Spec {
        kind,
        v,
        checkpoint: false,
    }
}

fn sealed(mut s: Spec) -> Spec {
    s.checkpoint = true;
    s
}

/// A built chain: its entries' (seq, stored bytes), its head and its signed checkpoints.
type Built = (Vec<(u64, Vec<u8>)>, EntryRef, Vec<Vec<u8>>);

/// A built vector chain: name, description, the chain, expected violations as (seq, kind).
type BuiltCase = (&'static str, &'static str, Built, Vec<(u64, &'static str)>);

/// The chain `specs` describe.
fn build(specs: &[Spec]) -> Built {
    let owner = owner();
    let mut entries = Vec::new();
    for (seq, s) in specs.iter().enumerate() {
        let seq = seq as u64;
        let time_ms = T0 + seq * 1000;
        let mut e = match s.kind {
            EntryKind::Format => Entry::format(s.v, time_ms),
            kind => Entry::new(kind, time_ms),
        };
        e.v = s.v.as_u64();
        match s.kind {
            EntryKind::Genesis => {
                e.owner = Some(owner.did().to_string());
                e.role = Some(Role::Gateway);
            }
            EntryKind::Format => e.detail = Some("didgate 0.1.0".into()),
            EntryKind::Refusals => {
                e.count = Some(seq);
                e.code = Some(format!("malformed={seq}"));
                e.detail = Some(format!(
                    "refusals to principals policy does not know since {time_ms}"
                ));
            }
            EntryKind::Revocation => {
                e.subject = Some(Identity::from_seed(&[1; 32]).did().to_string());
                e.detail = Some(format!("revoked at seq {seq}"));
            }
            other => panic!("no vector entry of kind {other:?}"),
        }
        entries.push((e, s.checkpoint));
    }
    link(entries)
}

/// Chains `entries` as the writer does (seq, prev), signing a checkpoint (of the entry's
/// version) after each entry marked so.
fn link(entries: Vec<(Entry, bool)>) -> Built {
    link_as(&owner(), None, entries)
}

/// [`link`] for the chain of `owner`, whose version 2 checkpoints carry `node_cert`.
fn link_as(owner: &Identity, node_cert: Option<&[u8]>, entries: Vec<(Entry, bool)>) -> Built {
    let mut out = Vec::new();
    let mut checkpoints = Vec::new();
    let mut frontier = Frontier::default();
    let mut head = EntryRef {
        seq: 0,
        hash: [0; 32],
    };
    let mut id = [0; 32];
    for (seq, (mut e, checkpoint)) in entries.into_iter().enumerate() {
        let seq = seq as u64;
        e.seq = seq;
        e.prev = head.hash;
        let bytes = e.encode();
        let hash = entry_hash(&bytes);
        if seq == 0 {
            id = hash;
        }
        frontier.push(merkle::leaf_hash(&hash));
        head = EntryRef { seq, hash };
        out.push((seq, bytes));
        if checkpoint {
            let cp = Checkpoint {
                v: e.v,
                log: owner.did().to_string(),
                chain: id,
                size: frontier.size(),
                head: hash,
                root: frontier.root(),
                time_ms: e.time_ms + 1,
                // a version 1 checkpoint never carries one
                node_cert: node_cert.filter(|_| e.v >= 2).map(<[u8]>::to_vec),
            };
            checkpoints.push(cp.sign(owner));
        }
    }
    (out, head, checkpoints)
}

/// (name, description, entries, expected violations as (seq, kind)).
type Case = (
    &'static str,
    &'static str,
    Vec<Spec>,
    Vec<(u64, &'static str)>,
);

fn cases() -> Vec<Case> {
    use EntryKind::*;
    use Version::*;
    let v1_part = vec![
        spec(Genesis, V1),
        spec(Refusals, V1),
        sealed(spec(Revocation, V1)),
    ];
    let crossing = [
        v1_part.clone(),
        vec![
            sealed(spec(Format, V2)),
            spec(Refusals, V2),
            sealed(spec(Revocation, V2)),
        ],
    ]
    .concat();
    let mut v1_after_switch = crossing.clone();
    v1_after_switch[5] = sealed(spec(Revocation, V1));
    let mut second_switch = crossing.clone();
    second_switch[5] = sealed(spec(Format, V2));
    vec![
        (
            "crosses-the-switch",
            "version 1 entries, the format entry at seq 3 (checkpoint at the switch), version 2 entries",
            crossing,
            vec![],
        ),
        (
            "version-1-only",
            "a chain of the previous release, never switched",
            v1_part.clone(),
            vec![],
        ),
        (
            "version-2-only",
            "a chain created at version 2: no format entry",
            vec![
                spec(Genesis, V2),
                spec(Refusals, V2),
                sealed(spec(Revocation, V2)),
            ],
            vec![],
        ),
        (
            "version-1-after-the-switch",
            "a version 1 entry after the switch: chains never switch back",
            v1_after_switch,
            vec![(5, "format_violation")],
        ),
        (
            "second-switch",
            "a second format entry",
            second_switch,
            vec![(5, "format_violation")],
        ),
        (
            "version-2-without-a-switch",
            "a version 2 entry in a version 1 chain with no format entry before it",
            vec![
                spec(Genesis, V1),
                spec(Refusals, V2),
                sealed(spec(Revocation, V1)),
            ],
            vec![(1, "format_violation")],
        ),
        (
            "switch-to-the-same-version",
            "a format entry in a chain already at version 2",
            vec![
                spec(Genesis, V2),
                spec(Format, V2),
                sealed(spec(Revocation, V2)),
            ],
            vec![(1, "format_violation")],
        ),
    ]
}

fn vectors() -> Value {
    let owner = owner();
    let built = cases()
        .into_iter()
        .map(|(name, description, specs, expected)| (name, description, build(&specs), expected));
    json!({
        "description": "Gateway chains around the format switch from version 1 to version 2 (specs/audit-log.md, \"Format evolution\"). Each chain: its entries' stored bytes in key order, the recorded head, the signed checkpoints, and what a verifier must find. The owner is the did:key of seed 00..00 (role gateway).",
        "owner": owner.did().to_string(),
        "role": "gateway",
        "chains": chains_json(built),
    })
}

/// The JSON of built chains with their expected violations as (seq, kind).
fn chains_json(built: impl Iterator<Item = BuiltCase>) -> Vec<Value> {
    built
        .map(
            |(name, description, (entries, head, checkpoints), expected)| {
                json!({
                    "name": name,
                    "description": description,
                    "entries": entries
                        .iter()
                        .map(|(seq, bytes)| json!({"seq": seq, "bytes": hex::encode(bytes)}))
                        .collect::<Vec<_>>(),
                    "head": {"seq": head.seq, "hash": hex::encode(head.hash)},
                    "checkpoints": checkpoints.iter().map(hex::encode).collect::<Vec<_>>(),
                    "expected": {
                        "verdict": if expected.is_empty() { "ok" } else { "failed" },
                        "violations": expected
                            .iter()
                            .map(|(seq, kind)| json!({"seq": seq, "kind": kind}))
                            .collect::<Vec<_>>(),
                    },
                })
            },
        )
        .collect()
}

fn vector_path(file: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../specs/vectors")
        .join(file)
}

/// `specs/vectors/home-rev.json` (amendment 2.12): entries with and without `home_rev`, each
/// with whether a reader of this release takes it.
fn home_rev_vectors() -> Value {
    let client = Identity::from_seed(&[1; 32]);
    let entry = |kind: EntryKind, v: Version, home_rev: Option<u64>| {
        let mut e = Entry::new(kind, T0);
        e.v = v.as_u64();
        e.seq = 7;
        e.prev = [7; 32];
        match kind {
            EntryKind::Executing | EntryKind::Granted | EntryKind::Refused => {
                e.call = Some([3; 32]);
                e.signed = Some(vec![0xd2]);
                e.subject = Some(client.did().to_string());
                e.peer_head = Some(ChainHead {
                    chain: [4; 32],
                    seq: 2,
                    hash: [5; 32],
                });
                if kind == EntryKind::Refused {
                    e.code = Some("policy".into());
                } else {
                    e.grant = Some([6; 16]);
                }
                if kind == EntryKind::Granted {
                    e.detail = Some("expires at 1700000060000 ms".into());
                }
            }
            _ => {}
        }
        e.home_rev = home_rev;
        e.encode()
    };
    let case = |what: &str, bytes: Vec<u8>, decodes: bool| json!({"what": what, "bytes": hex::encode(bytes), "decodes": decodes});
    json!({
        "description": "Amendment 2.12 (specs/audit-log.md, \"Home revisions\"): entries whose home_rev (uint) a version 2 reader takes on executing and granted entries only; each with whether Entry::decode accepts it. Written by audit/tests/vectors.rs (DIDGATE_WRITE_VECTORS=1).",
        "entries": [
            case("a version 2 executing entry of a cluster node, home as of revision 4242", entry(EntryKind::Executing, Version::V2, Some(4242)), true),
            case("a version 2 granted entry with home_rev", entry(EntryKind::Granted, Version::V2, Some(17)), true),
            case("a version 2 executing entry of a node outside a cluster: no home_rev", entry(EntryKind::Executing, Version::V2, None), true),
            case("a version 1 executing entry with home_rev", entry(EntryKind::Executing, Version::V1, Some(4242)), false),
            case("a version 2 refused entry with home_rev", entry(EntryKind::Refused, Version::V2, Some(4242)), false),
        ],
    })
}

/// The vector files and what this release builds for each.
fn vector_files() -> [(&'static str, Value); 4] {
    [
        ("format-switch.json", vectors()),
        ("secret-lifecycle.json", secret_vectors()),
        ("witness.json", witness_vectors()),
        ("home-rev.json", home_rev_vectors()),
    ]
}

/// Each entry of `specs/vectors/home-rev.json` decodes, or not, as the file says, read from the
/// file alone.
#[test]
fn the_home_rev_vector_holds() {
    let text = std::fs::read_to_string(vector_path("home-rev.json")).expect("vectors");
    let file: Value = serde_json::from_str(&text).expect("json");
    let entries = file["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 5);
    for c in entries {
        let bytes = hex_field(&c["bytes"]);
        let decoded = Entry::decode(&bytes);
        assert_eq!(
            decoded.is_ok(),
            c["decodes"] == true,
            "{}: {decoded:?}",
            c["what"]
        );
        // the plain decoder agrees with the strict one, taking and refusing the same
        assert_eq!(Entry::decode_plain(&bytes), decoded.ok(), "{}", c["what"]);
    }
}

#[test]
fn committed_vectors_are_what_this_release_builds() {
    for (file, built) in vector_files() {
        let path = vector_path(file);
        if std::env::var_os("DIDGATE_WRITE_VECTORS").is_some() {
            let text = serde_json::to_string_pretty(&built).expect("json") + "\n";
            std::fs::write(&path, text).expect("write the vectors");
        }
        let committed: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("a vector file"))
                .expect("the committed vectors are JSON");
        // compared as JSON values: key order depends on serde_json's features in a workspace
        // build
        assert!(
            committed == built,
            "specs/vectors/{file} differs from what this release builds \
             (DIDGATE_WRITE_VECTORS=1 rewrites it after a deliberate change)"
        );
    }
}

fn hex_field(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().expect("a hex string")).expect("hex")
}

/// The verifier's verdict on each committed chain is the one the file states, read from the
/// file alone (as an outside verifier would).
#[test]
fn the_verifier_agrees_with_the_committed_verdicts() {
    for (file, at_least) in [("format-switch.json", 7), ("secret-lifecycle.json", 4)] {
        let text = std::fs::read_to_string(vector_path(file)).expect("vectors");
        let file: Value = serde_json::from_str(&text).expect("json");
        let chains = file["chains"].as_array().expect("chains");
        assert!(chains.len() >= at_least);
        verdicts_agree(chains);
    }
    witness_verdicts_agree();
}

/// A chain of a vector file as the verifier reads it, labelled `label`.
fn records(label: &str, c: &Value) -> ChainRecords {
    let head = &c["head"];
    ChainRecords {
        label: label.into(),
        entries: c["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .map(|e| (e["seq"].as_u64().expect("seq"), hex_field(&e["bytes"])))
            .collect(),
        head: Some(EntryRef {
            seq: head["seq"].as_u64().expect("seq"),
            hash: hex_field(&head["hash"]).try_into().expect("32 bytes"),
        }),
        checkpoints: c["checkpoints"]
            .as_array()
            .expect("checkpoints")
            .iter()
            .map(hex_field)
            .collect(),
        documents: Vec::new(),
        sealed: false,
    }
}

fn verdicts_agree(chains: &[Value]) {
    for c in chains {
        let name = c["name"].as_str().expect("name");
        let report = verify::verify(&[records(name, c)], &[]);
        let found: Vec<(Option<u64>, String)> = report
            .violations
            .iter()
            .map(|v| (v.seq, v.kind.name()))
            .collect();
        let expected: Vec<(Option<u64>, String)> = c["expected"]["violations"]
            .as_array()
            .expect("violations")
            .iter()
            .map(|v| {
                (
                    v["seq"].as_u64(),
                    v["kind"].as_str().expect("kind").to_string(),
                )
            })
            .collect();
        assert_eq!(found, expected, "{name}: {:#?}", report.violations);
        assert_eq!(
            report.ok(),
            c["expected"]["verdict"] == "ok",
            "{name}: verdict"
        );
        // every entry decodes but those the file says are altered, and every chain names the
        // switch the way the spec says: the format entry's own version
        for e in c["entries"].as_array().expect("entries") {
            let seq = e["seq"].as_u64();
            match Entry::decode(&hex_field(&e["bytes"])) {
                Ok(entry) if entry.kind == EntryKind::Format => {
                    assert_eq!(entry.version, Some(entry.v), "{name}");
                }
                Ok(_) => {}
                Err(why) => assert!(
                    expected.contains(&(seq, "altered_entry".to_string())),
                    "{name}: seq {seq:?} does not decode: {why}"
                ),
            }
        }
    }
}

/// The client whose signed requests the secret-lifecycle chains hold: seed 01..01.
fn client() -> Identity {
    Identity::from_seed(&[1; 32])
}

/// The id of the secret `payments-key` in the secret-lifecycle vectors.
const PAYMENTS: [u8; 16] = [0x5e; 16];

/// `payments-key` holding versions `1..=current` (all but `current` retired), wrapped under
/// master key `kek`, with `status`. Fingerprints are over the stand-in sealed bytes
/// `sealed v{N}`.
fn payments(current: u64, status: SecretStatus, kek: u8) -> SecretState {
    SecretState {
        name: "payments-key".into(),
        id: PAYMENTS,
        status,
        kek: [kek; 8],
        versions: (1..=current)
            .map(|v| VersionState {
                version: v,
                fingerprint: sealed_fingerprint(&PAYMENTS, v, format!("sealed v{v}").as_bytes()),
                retired_ms: (v < current).then_some(T0 + v * 1000),
            })
            .collect(),
    }
}

/// Builds secret-lifecycle chains: entries are added in order, each at `T0 + seq * 1000`.
struct Lifecycle {
    entries: Vec<(Entry, bool)>,
    calls: u8,
}

impl Lifecycle {
    fn new() -> Self {
        let mut g = Entry::new(EntryKind::Genesis, T0);
        g.owner = Some(owner().did().to_string());
        g.role = Some(Role::Gateway);
        Self {
            entries: vec![(g, false)],
            calls: 0,
        }
    }

    fn time(&self) -> u64 {
        T0 + self.entries.len() as u64 * 1000
    }

    fn secret(mut self, action: SecretAction, states: Vec<SecretState>) -> Self {
        let e = Entry::secret(action, states, self.time());
        self.entries.push((e, false));
        self
    }

    /// An executing entry of a new call (a GET by the seed 01 client); returns its call ID.
    fn executing(&mut self) -> Digest {
        self.calls += 1;
        let n = self.calls;
        let req = Request {
            v: Version::V2.as_u64(),
            aud: owner().did().to_string(),
            upstream: "payments".into(),
            method: "GET".into(),
            path: "/v1/balance".into(),
            query: Vec::new(),
            headers: Vec::new(),
            body_len: 0,
            body_b3: *blake3::hash(b"").as_bytes(),
            nonce: [n; 16],
            time_ms: self.time(),
            head: ChainHead {
                chain: [0xc1; 32],
                seq: u64::from(n) * 2,
                hash: [n; 32],
            },
        };
        let signed = req.sign(&client());
        let call = envelope::verify(&signed, Kind::Request)
            .expect("own request")
            .digest();
        let mut e = Entry::new(EntryKind::Executing, self.time());
        e.call = Some(call);
        e.signed = Some(signed);
        e.subject = Some(client().did().to_string());
        e.grant = Some([n; 16]);
        e.peer_head = Some(req.head);
        self.entries.push((e, false));
        call
    }

    /// The executed entry of `call`, naming secret `id` version `version`.
    fn executed(mut self, call: Digest, id: [u8; 16], version: u64) -> Self {
        let mut e = Entry::new(EntryKind::Executed, self.time());
        e.call = Some(call);
        e.status = Some(200);
        e.resp_len = Some(2);
        e.resp_b3 = Some(*blake3::hash(b"{}").as_bytes());
        e.secret_id = Some(id);
        e.secret_version = Some(version);
        self.entries.push((e, false));
        self
    }

    /// A call whose executing and executed entries are adjacent.
    fn call(mut self, id: [u8; 16], version: u64) -> Self {
        let call = self.executing();
        self.executed(call, id, version)
    }

    fn seq(&self) -> u64 {
        self.entries.len() as u64
    }

    fn sealed(mut self) -> Built {
        if let Some(last) = self.entries.last_mut() {
            last.1 = true;
        }
        link(self.entries)
    }
}

fn secret_vectors() -> Value {
    use SecretAction as A;
    use SecretStatus as S;
    let snapshot = || Lifecycle::new().secret(A::Snapshot, vec![payments(1, S::Enabled, 0x4b)]);
    let other = |status| SecretState {
        name: "other-key".into(),
        id: [0x0e; 16],
        status,
        kek: [0x4b; 8],
        versions: if status == S::Purged {
            Vec::new()
        } else {
            vec![VersionState {
                version: 1,
                fingerprint: sealed_fingerprint(&[0x0e; 16], 1, b"sealed v1"),
                retired_ms: None,
            }]
        },
    };
    let lifecycle = {
        let mut l = snapshot().call(PAYMENTS, 1);
        // a call that began before the rotation may still use the version it opened
        let began = l.executing();
        l.secret(A::Rotated, vec![payments(2, S::Enabled, 0x4b)])
            .executed(began, PAYMENTS, 1)
            .call(PAYMENTS, 2)
            .secret(A::Added, vec![other(S::Enabled)])
            .secret(A::Disabled, vec![other(S::Disabled)])
            .secret(A::Deleted, vec![other(S::Deleted)])
            .secret(A::Purged, vec![other(S::Purged)])
            .secret(A::KmsRotated, vec![payments(2, S::Enabled, 0x4c)])
            .call(PAYMENTS, 2)
            .sealed()
    };
    let stale = snapshot().secret(A::Rotated, vec![payments(2, S::Enabled, 0x4b)]);
    let stale_at = stale.seq() + 1;
    let undeclared = snapshot();
    let undeclared_at = undeclared.seq() + 1;
    let unknown = snapshot();
    let unknown_at = unknown.seq() + 1;
    let mut two_current = payments(2, S::Enabled, 0x4b);
    two_current.versions[0].retired_ms = None;
    let malformed = snapshot();
    let malformed_at = malformed.seq();
    let chains: Vec<BuiltCase> = vec![
        (
            "lifecycle",
            "the snapshot, calls, a rotation with a call in flight across it, another secret added, disabled, deleted and purged, a master-key rotation, and calls naming the versions declared",
            lifecycle,
            vec![],
        ),
        (
            "before-the-snapshot",
            "an executed entry before the first snapshot names a secret no entry declares: not checked",
            Lifecycle::new()
                .call([0x77; 16], 9)
                .secret(A::Snapshot, vec![payments(1, S::Enabled, 0x4b)])
                .call(PAYMENTS, 1)
                .sealed(),
            vec![],
        ),
        (
            "replaced-version",
            "a call that began after the rotation names the version the rotation retired",
            stale.call(PAYMENTS, 1).sealed(),
            vec![(stale_at, "secret_mismatch")],
        ),
        (
            "undeclared-version",
            "a call names a version no secret entry declared",
            undeclared.call(PAYMENTS, 2).sealed(),
            vec![(undeclared_at, "secret_mismatch")],
        ),
        (
            "unknown-secret",
            "a call names a secret id no secret entry declared",
            unknown.call([0x77; 16], 1).sealed(),
            vec![(unknown_at, "secret_mismatch")],
        ),
        (
            "two-current-versions",
            "a secret entry listing two versions that are not retired does not decode",
            malformed.secret(A::Rotated, vec![two_current]).sealed(),
            vec![(malformed_at, "altered_entry")],
        ),
    ];
    json!({
        "description": "Gateway chains with secret lifecycle entries (specs/audit-log.md, \"Format evolution\", amendment 2.4, and \"Gateway chains\"). Each chain: its entries' stored bytes in key order, the recorded head, the signed checkpoints, and what a verifier must find. The owner is the did:key of seed 00..00 (role gateway); the requests in executing entries are signed by the did:key of seed 01..01.",
        "owner": owner().did().to_string(),
        "role": "gateway",
        "chains": chains_json(chains.into_iter()),
    })
}

/// The gateway whose nodes write the witness vectors: seed 00..00 (it signs their
/// certificates only); its nodes A and B: seeds 0a..0a and 0b..0b.
fn nodes() -> [Identity; 2] {
    [
        Identity::from_seed(&[0x0a; 32]),
        Identity::from_seed(&[0x0b; 32]),
    ]
}

/// The node certificate of `node` (serial `serial`), valid for a day from `T0`.
fn node_certificate(node: &Identity, serial: u64) -> Vec<u8> {
    NodeCertificate {
        v: 2,
        gateway: owner().did().to_string(),
        node: node.did().to_string(),
        serial,
        not_before_ms: T0,
        not_after_ms: T0 + 86_400_000,
        addr: None,
    }
    .sign(&owner())
}

/// A node's chain as [`link_as`] builds it: a genesis of version `v` owned by `node`, then
/// `entries`, each at `T0 + seq * 1000` (and of version `v`); the last one sealed.
fn node_chain(node: &Identity, serial: u64, v: Version, entries: Vec<(Entry, bool)>) -> Built {
    let mut genesis = Entry::new(EntryKind::Genesis, T0);
    genesis.owner = Some(node.did().to_string());
    genesis.role = Some(Role::Gateway);
    let mut all = vec![(genesis, false)];
    all.extend(entries);
    let last = all.len() - 1;
    for (seq, (e, checkpoint)) in all.iter_mut().enumerate() {
        e.v = v.as_u64();
        e.time_ms = T0 + seq as u64 * 1000;
        *checkpoint |= seq == last;
    }
    link_as(node, Some(&node_certificate(node, serial)), all)
}

/// Node A's chain of `len` entries (genesis included), sealed at size 6 and at its end; entry
/// `altered` (if any) with another detail, as a rewrite re-signed by A would hold.
fn node_a(len: u64, altered: Option<u64>) -> Built {
    let entries = (1..len)
        .map(|seq| {
            let mut e = Entry::new(EntryKind::Refusals, 0);
            e.count = Some(seq);
            e.code = Some(format!("malformed={seq}"));
            e.detail = Some(
                if altered == Some(seq) {
                    "rewritten"
                } else {
                    "as written"
                }
                .into(),
            );
            (e, seq + 1 == 6)
        })
        .collect();
    node_chain(&nodes()[0], 1, Version::V2, entries)
}

/// Node B's chain of version `v`: a revocation, the witness entry `witness`, a revocation.
fn node_b(v: Version, witness: Entry) -> Built {
    let revocation = |n: u8| {
        let mut e = Entry::new(EntryKind::Revocation, 0);
        e.grant = Some([n; 16]);
        e.detail = Some("revoked".into());
        (e, false)
    };
    let entries = vec![revocation(1), (witness, false), revocation(2)];
    node_chain(&nodes()[1], 2, v, entries)
}

/// One chain of a witness case as JSON.
fn node_json(label: &str, (entries, head, checkpoints): &Built) -> Value {
    json!({
        "label": label,
        "entries": entries
            .iter()
            .map(|(seq, bytes)| json!({"seq": seq, "bytes": hex::encode(bytes)}))
            .collect::<Vec<_>>(),
        "head": {"seq": head.seq, "hash": hex::encode(head.hash)},
        "checkpoints": checkpoints.iter().map(hex::encode).collect::<Vec<_>>(),
    })
}

fn witness_vectors() -> Value {
    let [a, b] = nodes();
    let intact = node_a(10, None);
    // A's checkpoint at size 6, which B witnesses
    let seen = intact.2[0].clone();
    let witness = Entry::witness(a.did(), seen.clone(), 0).expect("A's own checkpoint");
    let mut broken = witness.clone();
    if let Some(last) = broken.signed.as_mut().and_then(|s| s.last_mut()) {
        *last ^= 1;
    }
    let mut old = witness.clone();
    old.v = 1;
    let case =
        |name: &str, description: &str, a: &Built, b: &Built, expected: &[(&str, u64, &str)]| {
            json!({
                "name": name,
                "description": description,
                "chains": [node_json("node-a", a), node_json("node-b", b)],
                "expected": {
                    "verdict": if expected.is_empty() { "ok" } else { "failed" },
                    "violations": expected
                        .iter()
                        .map(|(chain, seq, kind)| json!({"chain": chain, "seq": seq, "kind": kind}))
                        .collect::<Vec<_>>(),
                },
            })
        };
    let b_v2 = node_b(Version::V2, witness);
    let cases = vec![
        case(
            "witnessed",
            "node B's entry 2 witnesses node A's checkpoint at size 6; A's chain holds it",
            &intact,
            &b_v2,
            &[],
        ),
        case(
            "rewritten",
            "A's entry 3 rewritten, its chain re-hashed and re-signed (it verifies on its own): A's first 6 entries are not what B witnessed",
            &node_a(10, Some(3)),
            &b_v2,
            &[("node-a", 5, "witnessed_rewrite")],
        ),
        case(
            "truncated",
            "A's chain cut to 4 entries and re-sealed (it verifies on its own): shorter than the size B witnessed",
            &node_a(4, None),
            &b_v2,
            &[("node-a", 4, "witnessed_rewrite")],
        ),
        case(
            "broken-signature",
            "the checkpoint in B's witness entry with one signature bit flipped",
            &intact,
            &node_b(Version::V2, broken),
            &[("node-b", 2, "bad_signature")],
        ),
        case(
            "version-1",
            "B's chain is version 1: its witness entry (v = 1) does not decode",
            &intact,
            &node_b(Version::V1, old),
            &[("node-b", 2, "altered_entry")],
        ),
    ];
    json!({
        "description": "Witness entries (specs/audit-log.md, \"Witness entries\", amendment 2.9): two nodes of the gateway of seed 00..00, A (seed 0a..0a, node certificate serial 1) and B (seed 0b..0b, serial 2), each owning its gateway chain, whose version 2 checkpoints carry the node's certificate. Each case: both chains (entries' stored bytes in key order, the recorded head, the signed checkpoints), to verify together, and what a verifier must find. Written by audit/tests/vectors.rs (DIDGATE_WRITE_VECTORS=1).",
        "gateway": owner().did().to_string(),
        "nodes": [a.did().to_string(), b.did().to_string()],
        "witnessed_checkpoint": hex::encode(seen),
        "cases": cases,
    })
}

/// The verifier's verdict on each case of the committed witness vectors, both chains verified
/// together, is the one the file states.
fn witness_verdicts_agree() {
    let text = std::fs::read_to_string(vector_path("witness.json")).expect("vectors");
    let file: Value = serde_json::from_str(&text).expect("json");
    let cases = file["cases"].as_array().expect("cases");
    assert!(cases.len() >= 5);
    for c in cases {
        let name = c["name"].as_str().expect("name");
        let chains: Vec<ChainRecords> = c["chains"]
            .as_array()
            .expect("chains")
            .iter()
            .map(|chain| records(chain["label"].as_str().expect("label"), chain))
            .collect();
        let report = verify::verify(&chains, &[]);
        let found: Vec<Value> = report
            .violations
            .iter()
            .map(|v| json!({"chain": v.chain, "seq": v.seq, "kind": v.kind.name()}))
            .collect();
        assert_eq!(
            &Value::Array(found),
            &c["expected"]["violations"],
            "{name}: {:#?}",
            report.violations
        );
        assert_eq!(
            report.ok() && report.warnings.is_empty(),
            c["expected"]["verdict"] == "ok",
            "{name}: verdict"
        );
    }
}

//! The format-switch vectors (specs/audit-log.md, "Format evolution", "Vectors").
//!
//! Builds, deterministically, a gateway chain that crosses the switch from version 1 to
//! version 2 and variants that break the rule; checks that the committed
//! `specs/vectors/format-switch.json` is exactly what this release builds (set
//! `DIDGATE_WRITE_VECTORS=1` to rewrite it after a deliberate change), and that the verifier's
//! verdict on every chain of the committed file is the one the file states.

use didgate_audit::entry::{Entry, EntryKind, Role, entry_hash};
use didgate_audit::merkle::{self, Frontier};
use didgate_audit::{ChainRecords, verify};
use didgate_protocol::message::{Checkpoint, EntryRef, SignedMessage};
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

/// The chain `specs` describe.
fn build(specs: &[Spec]) -> Built {
    let owner = owner();
    let mut entries = Vec::new();
    let mut checkpoints = Vec::new();
    let mut frontier = Frontier::default();
    let mut head = EntryRef {
        seq: 0,
        hash: [0; 32],
    };
    let mut id = [0; 32];
    for (seq, s) in specs.iter().enumerate() {
        let seq = seq as u64;
        let time_ms = T0 + seq * 1000;
        let mut e = match s.kind {
            EntryKind::Format => Entry::format(s.v, time_ms),
            kind => Entry::new(kind, time_ms),
        };
        e.v = s.v.as_u64();
        e.seq = seq;
        e.prev = head.hash;
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
        let bytes = e.encode();
        let hash = entry_hash(&bytes);
        if seq == 0 {
            id = hash;
        }
        frontier.push(merkle::leaf_hash(&hash));
        head = EntryRef { seq, hash };
        entries.push((seq, bytes));
        if s.checkpoint {
            let cp = Checkpoint {
                v: s.v.as_u64(),
                log: owner.did().to_string(),
                chain: id,
                size: frontier.size(),
                head: hash,
                root: frontier.root(),
                time_ms: time_ms + 1,
            };
            checkpoints.push(cp.sign(&owner));
        }
    }
    (entries, head, checkpoints)
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
    let chains: Vec<Value> = cases()
        .into_iter()
        .map(|(name, description, specs, expected)| {
            let (entries, head, checkpoints) = build(&specs);
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
        })
        .collect();
    json!({
        "description": "Gateway chains around the format switch from version 1 to version 2 (specs/audit-log.md, \"Format evolution\"). Each chain: its entries' stored bytes in key order, the recorded head, the signed checkpoints, and what a verifier must find. The owner is the did:key of seed 00..00 (role gateway).",
        "owner": owner.did().to_string(),
        "role": "gateway",
        "chains": chains,
    })
}

fn vector_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs/vectors/format-switch.json")
}

#[test]
fn committed_vectors_are_what_this_release_builds() {
    let built = vectors();
    let path = vector_path();
    if std::env::var_os("DIDGATE_WRITE_VECTORS").is_some() {
        let text = serde_json::to_string_pretty(&built).expect("json") + "\n";
        std::fs::write(&path, text).expect("write the vectors");
    }
    let committed: Value = serde_json::from_str(
        &std::fs::read_to_string(&path).expect("specs/vectors/format-switch.json"),
    )
    .expect("the committed vectors are JSON");
    // compared as JSON values: key order depends on serde_json's features in a workspace build
    assert!(
        committed == built,
        "specs/vectors/format-switch.json differs from what this release builds \
         (DIDGATE_WRITE_VECTORS=1 rewrites it after a deliberate change)"
    );
}

fn hex_field(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().expect("a hex string")).expect("hex")
}

/// The verifier's verdict on each committed chain is the one the file states, read from the
/// file alone (as an outside verifier would).
#[test]
fn the_verifier_agrees_with_the_committed_verdicts() {
    let text = std::fs::read_to_string(vector_path()).expect("vectors");
    let file: Value = serde_json::from_str(&text).expect("json");
    let chains = file["chains"].as_array().expect("chains");
    assert!(chains.len() >= 7);
    for c in chains {
        let name = c["name"].as_str().expect("name");
        let head = &c["head"];
        let records = ChainRecords {
            label: name.into(),
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
        };
        let report = verify::verify(&[records], &[]);
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
        // every chain names the switch the way the spec says: the format entry's own version
        for e in c["entries"].as_array().expect("entries") {
            let entry = Entry::decode(&hex_field(&e["bytes"])).expect("every vector entry decodes");
            if entry.kind == EntryKind::Format {
                assert_eq!(entry.version, Some(entry.v), "{name}");
            }
        }
    }
}

//! The worked example of specs/audit-log.md ("Chain rules": a genesis entry) as a vector file,
//! `specs/vectors/genesis-entry.json`: the committed file is what this release's encoder
//! builds (`DIDGATE_WRITE_VECTORS=1` rewrites it after a deliberate change), the file alone
//! decodes strictly to what it says and hashes to its entry hash, and the example printed in
//! the spec equals the file. (protocol/tests/spec_examples.rs does the same for
//! specs/protocol.md.)

use std::path::{Path, PathBuf};

use didgate_audit::entry::{Entry, EntryKind, Role, entry_hash};
use didgate_protocol::{Identity, Version};
use serde_json::{Value, json};

const T0: u64 = 1_700_000_000_000;
const FILE: &str = "genesis-entry.json";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn owner() -> Identity {
    Identity::from_seed(&[0; 32])
}

/// A client chain's genesis entry of version `v`, as the writer builds it.
fn genesis(v: Version) -> Entry {
    let mut e = Entry::new(EntryKind::Genesis, T0);
    e.v = v.as_u64();
    e.owner = Some(owner().did().to_string());
    e.role = Some(Role::Client);
    e
}

fn built() -> Value {
    let entries: Vec<Value> = [Version::V1, Version::V2]
        .into_iter()
        .map(|v| {
            let bytes = genesis(v).encode();
            json!({
                "v": v.as_u64(),
                "entry": hex::encode(&bytes),
                "entry_hash": hex::encode(entry_hash(&bytes)),
            })
        })
        .collect();
    json!({
        "description": "The genesis entry of a client chain (specs/audit-log.md, \"Chain rules\"), owner the did:key of seed 00..00, time_ms 1700000000000: as a version 1 chain starts, and as this release starts a chain (v = 2). entry: its stored bytes; entry_hash: BLAKE3-derive(\"didgate 2026 audit-entry v1\") of them, which is the chain id. Written by audit/tests/spec_examples.rs (DIDGATE_WRITE_VECTORS=1).",
        "owner_seed": hex::encode([0u8; 32]),
        "owner": owner().did().as_str(),
        "role": "client",
        "time_ms": T0,
        "entries": entries,
    })
}

fn committed() -> Value {
    let text = std::fs::read_to_string(root().join("specs/vectors").join(FILE)).expect(FILE);
    serde_json::from_str(&text).expect("JSON")
}

fn hex_of(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().expect("a hex string")).expect("hex")
}

#[test]
fn the_committed_genesis_vector_is_what_this_release_builds() {
    let built = built();
    if std::env::var_os("DIDGATE_WRITE_VECTORS").is_some() {
        let text = serde_json::to_string_pretty(&built).expect("json") + "\n";
        std::fs::write(root().join("specs/vectors").join(FILE), text).expect("write");
    }
    assert!(
        committed() == built,
        "specs/vectors/{FILE} differs from what this release builds \
         (DIDGATE_WRITE_VECTORS=1 rewrites it after a deliberate change)"
    );
}

#[test]
fn the_genesis_vector_decodes_strictly_and_hashes_to_its_chain_id() {
    let file = committed();
    let seed: [u8; 32] = hex_of(&file["owner_seed"]).try_into().expect("32 bytes");
    assert_eq!(Identity::from_seed(&seed).did().as_str(), file["owner"]);
    for e in file["entries"].as_array().expect("entries") {
        let bytes = hex_of(&e["entry"]);
        let entry = Entry::decode_strict(&bytes).expect("decodes strictly");
        assert_eq!(Entry::decode(&bytes), Ok(entry.clone()));
        assert_eq!(Some(entry.v), e["v"].as_u64());
        assert_eq!(entry.kind, EntryKind::Genesis);
        assert_eq!((entry.seq, entry.prev), (0, [0; 32]));
        assert_eq!(Some(entry.time_ms), file["time_ms"].as_u64());
        assert_eq!(entry.owner.as_deref(), file["owner"].as_str());
        assert_eq!(entry.role, Some(Role::Client));
        let hash = hex_of(&e["entry_hash"]);
        assert_eq!(entry_hash(&bytes).as_slice(), hash.as_slice());
        // "Entry hash": over the stored bytes, with its own derive-key context
        let plain = blake3::derive_key("didgate 2026 audit-entry v1", &bytes);
        assert_eq!(plain.as_slice(), hash.as_slice());
    }
}

/// The lines of the fenced blocks of `spec`'s part citing the vector file, up to the next
/// heading.
fn printed_blocks(spec: &str) -> Vec<&str> {
    let cite = format!("`specs/vectors/{FILE}`");
    let at = spec.find(&cite).expect("the spec cites the vector file");
    let end = spec[at..].find("\n#").map_or(spec.len(), |i| at + i);
    let mut out = Vec::new();
    let mut inside = false;
    for line in spec[at..end].lines() {
        if line.starts_with("```") {
            inside = !inside;
        } else if inside {
            out.push(line.trim_end());
        }
    }
    out
}

#[test]
fn the_audit_log_spec_prints_exactly_the_genesis_vector() {
    let spec = std::fs::read_to_string(root().join("specs/audit-log.md")).expect("spec");
    // each block: `entry (N bytes):`, its hex lines, `entry hash (the chain id): HEX`
    let mut printed: Vec<(usize, String, String)> = Vec::new();
    for line in printed_blocks(&spec) {
        if let Some(n) = line
            .strip_prefix("entry (")
            .and_then(|r| r.strip_suffix(" bytes):"))
        {
            printed.push((n.parse().expect("a length"), String::new(), String::new()));
        } else if let Some(h) = line.strip_prefix("entry hash (the chain id): ") {
            printed.last_mut().expect("an entry first").2 = h.into();
        } else if !line.is_empty() {
            assert!(line.bytes().all(|b| b.is_ascii_hexdigit()), "{line:?}");
            printed.last_mut().expect("an entry first").1.push_str(line);
        }
    }
    let file = committed();
    let entries = file["entries"].as_array().expect("entries");
    assert_eq!(printed.len(), entries.len());
    for ((len, bytes, hash), e) in printed.iter().zip(entries) {
        assert_eq!(Some(bytes.as_str()), e["entry"].as_str());
        assert_eq!(bytes.len(), 2 * len, "the printed length");
        assert_eq!(Some(hash.as_str()), e["entry_hash"].as_str());
    }
}

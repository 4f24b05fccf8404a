//! `specs/vectors/node-certificate.json` (specs/protocol.md, "Nodes"): a node certificate of
//! the gateway of seed 00..00 for the node of seed 00..03, a revocation list, a receipt the node
//! signed carrying the certificate, and the node's TLS leaf carrying both. The committed file
//! is what this release builds (`DIDGATE_WRITE_VECTORS=1` rewrites it after a deliberate
//! change), and it holds alone, read with the real decoders and checks.

use std::path::{Path, PathBuf};

use didgate_io::node::{LeafExtensions, NodeCredentials, node_leaf};
use didgate_protocol::message::{EntryRef, Message, Receipt, SignedMessage};
use didgate_protocol::node::{self, NodeCertError, NodeCertificate, NodeRevocations, Revoked};
use didgate_protocol::{Did, Identity};
use serde_json::{Value, json};

const T0: u64 = 1_700_000_000_000;
const HOUR: u64 = 3_600_000;

fn seed(last: u8) -> [u8; 32] {
    let mut s = [0; 32];
    s[31] = last;
    s
}

fn path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs/vectors/node-certificate.json")
}

fn hex_of(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().expect("a hex string")).expect("hex")
}

fn built() -> Value {
    let gateway = Identity::from_seed(&seed(0));
    let node = Identity::from_seed(&seed(3));
    let cert = NodeCertificate {
        v: 2,
        gateway: gateway.did().to_string(),
        node: node.did().to_string(),
        serial: 7,
        not_before_ms: T0,
        not_after_ms: T0 + 24 * HOUR,
        addr: Some("127.0.0.1:4433".into()),
    };
    let cert_cose = cert.sign(&gateway);
    let list = NodeRevocations {
        v: 2,
        gateway: gateway.did().to_string(),
        seq: 1,
        time_ms: T0 + 2 * HOUR,
        revoked: vec![Revoked {
            serial: 7,
            time_ms: T0 + 2 * HOUR,
        }],
    };
    let list_cose = list.sign(&gateway);
    let receipt = Receipt {
        v: 2,
        call: [0x11; 32],
        grant: [0x22; 16],
        client: Identity::from_seed(&seed(1)).did().to_string(),
        status: 200,
        resp_len: 2,
        resp_b3: *blake3::hash(b"{}").as_bytes(),
        entry: EntryRef {
            seq: 5,
            hash: [0x33; 32],
        },
        root: Some([0x44; 32]),
        time_ms: T0 + HOUR,
        node_cert: Some(cert_cose.clone()),
    };
    let (leaf, _) = node_leaf(
        &node,
        &NodeCredentials {
            certificate: cert_cose.clone(),
            revocations: Some(list_cose.clone()),
        },
    );
    json!({
        "description": "Nodes (specs/protocol.md, \"Nodes\", amendment 2.7): the gateway of seed 00..00 certifies the node of seed 00..03 (serial 7, valid 24 hours from T0 = 1700000000000, bound to 127.0.0.1:4433), then revokes serial 7 from T0 + 2 h; the node signs a receipt at T0 + 1 h carrying its certificate (the receipt holds under the gateway: it was signed before the revocation); the node's TLS leaf carries the certificate and the list in its two extensions. Ed25519 is deterministic, so every byte is reproducible. Written by io/tests/node_vector.rs (DIDGATE_WRITE_VECTORS=1).",
        "gateway_seed": hex::encode(seed(0)),
        "gateway": gateway.did().as_str(),
        "node_seed": hex::encode(seed(3)),
        "node": node.did().as_str(),
        "certificate_payload": hex::encode(cert.encode()),
        "certificate_cose_sign1": hex::encode(&cert_cose),
        "revocations_payload": hex::encode(list.encode()),
        "revocations_cose_sign1": hex::encode(&list_cose),
        "receipt_payload": hex::encode(receipt.encode()),
        "receipt_cose_sign1": hex::encode(receipt.sign(&node)),
        "leaf_der": hex::encode(leaf.as_ref()),
        "node_cert_oid": "2.25.320112733608280063880670032677581775293.1",
        "node_revocations_oid": "2.25.320112733608280063880670032677581775293.2",
    })
}

#[test]
fn the_committed_node_vector_is_what_this_release_builds() {
    let built = built();
    if std::env::var_os("DIDGATE_WRITE_VECTORS").is_some() {
        let text = serde_json::to_string_pretty(&built).expect("json") + "\n";
        std::fs::write(path(), text).expect("write the vector");
    }
    let committed: Value =
        serde_json::from_str(&std::fs::read_to_string(path()).expect("the vector file"))
            .expect("json");
    assert!(
        committed == built,
        "specs/vectors/node-certificate.json differs from what this release builds \
         (DIDGATE_WRITE_VECTORS=1 rewrites it after a deliberate change)"
    );
}

#[test]
fn the_node_vector_holds_alone() {
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(path()).expect("the vector")).expect("json");
    let gateway = Did::parse(v["gateway"].as_str().expect("gateway")).expect("a did:key");
    let node = Did::parse(v["node"].as_str().expect("node")).expect("a did:key");
    let cert_cose = hex_of(&v["certificate_cose_sign1"]);
    let list_cose = hex_of(&v["revocations_cose_sign1"]);
    // the certificate holds in its window, for its key, under its gateway
    let cert = node::check(&cert_cose, &gateway, &node, T0 + HOUR, None).expect("holds");
    assert_eq!(cert.encode(), hex_of(&v["certificate_payload"]));
    assert_eq!(
        (cert.serial, cert.addr.as_deref()),
        (7, Some("127.0.0.1:4433"))
    );
    // the list revokes serial 7 from T0 + 2 h
    let list = NodeRevocations::open(&list_cose, &gateway).expect("the list");
    assert_eq!(list.encode(), hex_of(&v["revocations_payload"]));
    assert!(node::check(&cert_cose, &gateway, &node, T0 + HOUR, Some(&list)).is_ok());
    assert!(matches!(
        node::check(&cert_cose, &gateway, &node, T0 + 2 * HOUR, Some(&list)),
        Err(NodeCertError::Revoked { serial: 7, .. })
    ));
    // the receipt: signed by the node, certified, before the revocation
    let receipt_cose = hex_of(&v["receipt_cose_sign1"]);
    let (signed, certified) =
        node::open_signed::<Receipt>(&receipt_cose, &gateway, None, Some(&list))
            .expect("the signer rule holds");
    assert_eq!(signed.envelope().signer(), &node);
    assert_eq!(certified, Some(cert));
    assert_eq!(signed.message().encode(), hex_of(&v["receipt_payload"]));
    // the leaf: a DID certificate of the node's key with both extensions
    let leaf = hex_of(&v["leaf_der"]);
    assert_eq!(
        didgate_io::tls::did_from_cert(&leaf).expect("a DID certificate"),
        node
    );
    assert_eq!(
        didgate_io::node::leaf_extensions(&leaf).expect("extensions"),
        LeafExtensions {
            certificate: Some(cert_cose),
            revocations: Some(list_cose),
        }
    );
}

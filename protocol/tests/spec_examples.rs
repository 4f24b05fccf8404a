//! The worked examples of specs/protocol.md as vector files, and the structure of specs/.
//!
//! Each example of "Worked examples" (and the Catalog's) has its vector file under
//! `specs/vectors/`. For each, three checks: the committed file is exactly what this release
//! builds with its real encoders and signer (`DIDGATE_WRITE_VECTORS=1` rewrites it after a
//! deliberate change); the file alone holds, read with the real decoders and verifiers as an
//! outside implementation would read it (and, where the spec says how the bytes are laid out,
//! rebuilt by hand from that description); and the example printed in the spec equals the file,
//! so the two cannot drift. Then the specs themselves: every file's contents list names each of
//! its sections, and every reference `FILE.md, "Section"` in specs/, docs/ and the README names
//! a section (or a bold paragraph) of that file.

use std::path::{Path, PathBuf};

use didgate_protocol::catalog::{BodyMode, Catalog, Operation};
use didgate_protocol::envelope::{self, Kind};
use didgate_protocol::frame::{self, FrameDecoder, FrameType};
use didgate_protocol::message::{ChainHead, Message, Refusal, RefusalCode, Request, SignedMessage};
use didgate_protocol::{Did, Identity};
use serde_json::{Value, json};

const T0: u64 = 1_700_000_000_000;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn seed(last: u8) -> [u8; 32] {
    let mut s = [0; 32];
    s[31] = last;
    s
}

fn hex_of(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().expect("a hex string")).expect("hex")
}

/// The CBOR head of a byte string of `len` bytes, then the bytes (RFC 8949, major type 2).
fn bstr(bytes: &[u8]) -> Vec<u8> {
    let len = bytes.len();
    let mut out = match len {
        0..=23 => vec![0x40 | len as u8],
        24..=0xff => vec![0x58, len as u8],
        0x100..=0xffff => vec![0x59, (len >> 8) as u8, len as u8],
        _ => panic!("longer than the examples need"),
    };
    out.extend_from_slice(bytes);
    out
}

/// The parts of a COSE_Sign1 as coset parses it: protected bytes, the Sig_structure signed
/// with the kind's tag as external AAD, and the signature.
fn cose_parts(cose: &[u8], kind: Kind) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    use coset::TaggedCborSerializable;
    let sign1 = coset::CoseSign1::from_tagged_slice(cose).expect("a tagged COSE_Sign1");
    let protected = sign1
        .protected
        .original_data
        .clone()
        .expect("parsed protected bytes");
    let tbs = sign1.tbs_data(kind.tag().as_bytes());
    (protected, tbs, sign1.signature)
}

// ------------------------------------------------------------------------------------------
// Vector files: what this release builds

/// `specs/vectors/did-key.json`: the did:key of seeds 00..00, 00..01 and 00..02.
fn did_key_vector() -> Value {
    let vectors: Vec<Value> = [0u8, 1, 2]
        .into_iter()
        .map(|last| {
            let id = Identity::from_seed(&seed(last));
            let did = id.did();
            let key = did.public_key_bytes();
            let mut multicodec = vec![0xed, 0x01];
            multicodec.extend_from_slice(key);
            json!({
                "seed": hex::encode(seed(last)),
                "public_key": hex::encode(key),
                "base58_public_key": bs58::encode(key).into_string(),
                "multicodec_bytes": hex::encode(&multicodec),
                "did": did.as_str(),
                "kid": did.key_id(),
            })
        })
        .collect();
    json!({
        "description": "did:key of an Ed25519 seed (specs/protocol.md, \"Identities\", \"Worked examples\"): the public key, its base58btc text, the multicodec bytes (0xed 0x01 || key), the DID and its DID URL (the COSE kid). The DIDs, base58 keys and DID URLs are the W3C CCG vectors of specs/vectors/public/did-key-ed25519.json. Written by protocol/tests/spec_examples.rs (DIDGATE_WRITE_VECTORS=1).",
        "vectors": vectors,
    })
}

fn refusal_message() -> Refusal {
    Refusal {
        v: 1,
        call: None,
        code: RefusalCode::Policy,
        reason: "no rule".into(),
        time_ms: T0,
        entry: None,
        node_cert: None,
        home: None,
    }
}

fn request_message() -> Request {
    Request {
        v: 1,
        aud: Identity::from_seed(&seed(0)).did().to_string(),
        upstream: "payments".into(),
        method: "GET".into(),
        path: "/v1/balance".into(),
        query: vec![("limit".into(), "3".into())],
        headers: vec![("accept".into(), "application/json".into())],
        body_len: 0,
        body_b3: *blake3::hash(b"").as_bytes(),
        nonce: [0; 16],
        time_ms: T0,
        head: ChainHead {
            chain: [0x11; 32],
            seq: 0,
            hash: [0x11; 32],
        },
    }
}

fn refusal_json(r: &Refusal) -> Value {
    json!({
        "v": r.v,
        "call": r.call.map(hex::encode),
        "code": r.code.as_str(),
        "reason": r.reason,
        "time_ms": r.time_ms,
        "entry": r.entry.map(|e| json!({"seq": e.seq, "hash": hex::encode(e.hash)})),
    })
}

fn request_json(r: &Request) -> Value {
    json!({
        "v": r.v,
        "aud": r.aud,
        "upstream": r.upstream,
        "method": r.method,
        "path": r.path,
        "query": r.query,
        "headers": r.headers,
        "body_len": r.body_len,
        "body_b3": hex::encode(r.body_b3),
        "nonce": hex::encode(r.nonce),
        "time_ms": r.time_ms,
        "head": {
            "chain": hex::encode(r.head.chain),
            "seq": r.head.seq,
            "hash": hex::encode(r.head.hash),
        },
    })
}

/// The fields every signed example shares: its envelope taken apart.
fn signed_fields(
    kind: Kind,
    signer: u8,
    payload: &[u8],
    cose: &[u8],
) -> serde_json::Map<String, Value> {
    let (protected, sig_structure, signature) = cose_parts(cose, kind);
    let verified = envelope::verify(cose, kind).expect("the example verifies");
    let mut m = serde_json::Map::new();
    m.insert("signer_seed".into(), hex::encode(seed(signer)).into());
    m.insert(
        "signer".into(),
        Identity::from_seed(&seed(signer)).did().as_str().into(),
    );
    m.insert("tag".into(), kind.tag().into());
    m.insert("payload".into(), hex::encode(payload).into());
    m.insert("protected".into(), hex::encode(&protected).into());
    m.insert("sig_structure".into(), hex::encode(&sig_structure).into());
    m.insert("signature".into(), hex::encode(&signature).into());
    m.insert("cose_sign1".into(), hex::encode(cose).into());
    m.insert(
        "signed_digest".into(),
        hex::encode(verified.digest()).into(),
    );
    m
}

/// `specs/vectors/signed-refusal.json`: a refusal signed by the gateway of seed 00..00.
fn refusal_vector() -> Value {
    let refusal = refusal_message();
    let payload = refusal.encode();
    let cose = refusal.sign(&Identity::from_seed(&seed(0)));
    let mut m = serde_json::Map::new();
    m.insert(
        "description".into(),
        "A refusal signed by the gateway of seed 00..00 (specs/protocol.md, \"Worked examples\"): the message, its CBOR payload, the protected header, the Sig_structure the Ed25519 signature covers, the signature, the tagged COSE_Sign1 and its signed digest. Ed25519 is deterministic, so every byte is reproducible. Written by protocol/tests/spec_examples.rs (DIDGATE_WRITE_VECTORS=1).".into(),
    );
    m.insert("message".into(), refusal_json(&refusal));
    m.extend(signed_fields(Kind::Refusal, 0, &payload, &cose));
    Value::Object(m)
}

/// `specs/vectors/signed-request.json`: a request of the client of seed 00..01 to the gateway
/// of seed 00..00, and its Request frame.
fn request_vector() -> Value {
    let request = request_message();
    let payload = request.encode();
    let cose = request.sign(&Identity::from_seed(&seed(1)));
    let mut frame = bytes::BytesMut::new();
    frame::encode(FrameType::Request, &cose, &mut frame).expect("a frame");
    let mut m = serde_json::Map::new();
    m.insert(
        "description".into(),
        "A request signed by the client of seed 00..01 for the gateway of seed 00..00 (specs/protocol.md, \"Worked examples\"): the message, its CBOR payload, the protected header, the Sig_structure the Ed25519 signature covers, the signature, the tagged COSE_Sign1, its signed digest (the call ID, also as call_id), and the Request frame that carries it (the whole stream of the call, then FIN: the body is empty). Written by protocol/tests/spec_examples.rs (DIDGATE_WRITE_VECTORS=1).".into(),
    );
    m.insert("message".into(), request_json(&request));
    m.extend(signed_fields(Kind::Request, 1, &payload, &cose));
    let call_id = m["signed_digest"].clone();
    m.insert("call_id".into(), call_id);
    m.insert("frame".into(), hex::encode(&frame).into());
    Value::Object(m)
}

fn catalog_message() -> Catalog {
    Catalog {
        v: 2,
        operations: vec![Operation {
            upstream: "payments".into(),
            name: "create_charge".into(),
            method: "POST".into(),
            path: "/v1/charges".into(),
            description: "Create a charge".into(),
            title: Some("Create a charge".into()),
            destructive: Some(false),
            body: Some(BodyMode::Required),
            body_schema: Some(r#"{"type":"object"}"#.into()),
        }],
    }
}

/// `specs/vectors/catalog-v2.json`: a version 2 Catalog whose operation has every field.
fn catalog_vector() -> Value {
    json!({
        "description": "A version 2 Catalog (specs/protocol.md, \"Catalog\") with one operation that has every field, those of amendment 2.5 included; a version 1 decoder refuses it. Written by protocol/tests/spec_examples.rs (DIDGATE_WRITE_VECTORS=1).",
        "bytes": hex::encode(catalog_message().encode()),
    })
}

/// `specs/vectors/chain-request.json`: the ChainRequest frame a member sends for a node's
/// chain (amendment 2.10), and the first ChainPart frame of an answer.
fn chain_vector() -> Value {
    use didgate_protocol::chain::ChainRequest;
    let mut request = bytes::BytesMut::new();
    frame::encode(
        FrameType::ChainRequest,
        &ChainRequest::new().encode(),
        &mut request,
    )
    .expect("fits");
    // an export file begins with its header item: the CBOR map {"t": "header", ...}; any bytes
    // of it go in ChainPart frames unchanged
    let part_payload = [0xa1, 0x61, 0x74, 0x66, b'h', b'e', b'a', b'd', b'e', b'r'];
    let mut part = bytes::BytesMut::new();
    frame::encode(FrameType::ChainPart, &part_payload, &mut part).expect("fits");
    json!({
        "description": "The chain exchange (specs/protocol.md, \"Chain export\", amendment 2.10): the ChainRequest frame (type 0x0b) with its payload, the CBOR map {\"v\": 2}; and a ChainPart frame (type 0x0c) carrying the next bytes of the node's export file unchanged (here the first bytes of a header item). Written by protocol/tests/spec_examples.rs (DIDGATE_WRITE_VECTORS=1).",
        "request_payload": hex::encode(ChainRequest::new().encode()),
        "request_frame": hex::encode(&request),
        "part_payload": hex::encode(part_payload),
        "part_frame": hex::encode(&part),
    })
}

/// The home node score of specs/protocol.md, "Home nodes", as the spec words it.
fn home_score(node: &str, did: &str) -> [u8; 32] {
    let mut input = (node.len() as u64).to_be_bytes().to_vec();
    input.extend_from_slice(node.as_bytes());
    input.extend_from_slice(did.as_bytes());
    blake3::derive_key("didgate 2026 home node v1", &input)
}

/// The node of `nodes` with the greatest score for `did`.
fn home_of<'n>(nodes: &[&'n str], did: &str) -> &'n str {
    nodes
        .iter()
        .copied()
        .max_by_key(|n| (home_score(n, did), *n))
        .expect("a node")
}

/// A `moved` refusal the gateway of seed 00..00 signs for a caller whose home is the node of
/// seed 00..02 at 192.0.2.7:4433.
fn moved_message() -> Refusal {
    Refusal {
        v: 2,
        call: None,
        code: RefusalCode::Moved,
        reason: "this caller's home is another node".into(),
        time_ms: T0,
        entry: None,
        node_cert: None,
        home: Some(didgate_protocol::message::Home {
            node: Identity::from_seed(&seed(2)).did().to_string(),
            addr: "192.0.2.7:4433".into(),
        }),
    }
}

/// `specs/vectors/home.json`: home node scores (amendment 2.11) and a signed `moved` refusal.
fn home_vector() -> Value {
    let nodes = ["node-1", "node-2", "node-3"];
    let callers = [
        Identity::from_seed(&seed(1)).did().to_string(),
        Identity::from_seed(&seed(3)).did().to_string(),
        "did:web:agents.example.com:bot".to_string(),
    ];
    let scores: Vec<Value> = callers
        .iter()
        .flat_map(|did| {
            nodes.iter().map(
                move |n| json!({"node": n, "did": did, "score": hex::encode(home_score(n, did))}),
            )
        })
        .collect();
    let homes: Vec<Value> = callers
        .iter()
        .map(|did| {
            json!({
                "did": did,
                "home_of_all_three": home_of(&nodes, did),
                "home_of_node_1_and_node_2": home_of(&nodes[..2], did),
            })
        })
        .collect();
    let moved = moved_message();
    let cose = moved.sign(&Identity::from_seed(&seed(0)));
    json!({
        "description": "Home nodes (specs/protocol.md, \"Home nodes\", amendment 2.11): the score of each of three nodes for three callers (BLAKE3 key derivation with the context \"didgate 2026 home node v1\" over u64be(len(node)) || node || DID), the home of each caller among the three and among node-1 and node-2, and a version 2 moved Refusal the gateway of seed 00..00 signed (its CBOR payload and tagged COSE_Sign1). Written by protocol/tests/spec_examples.rs (DIDGATE_WRITE_VECTORS=1).",
        "context": "didgate 2026 home node v1",
        "scores": scores,
        "homes": homes,
        "moved_payload": hex::encode(moved.encode()),
        "moved_cose": hex::encode(&cose),
    })
}

/// The vector files of this test and what this release builds for each.
fn vector_files() -> [(&'static str, Value); 6] {
    [
        ("did-key.json", did_key_vector()),
        ("signed-refusal.json", refusal_vector()),
        ("signed-request.json", request_vector()),
        ("catalog-v2.json", catalog_vector()),
        ("chain-request.json", chain_vector()),
        ("home.json", home_vector()),
    ]
}

fn vector(file: &str) -> Value {
    serde_json::from_str(&read(&format!("specs/vectors/{file}"))).expect("a JSON vector file")
}

#[test]
fn committed_example_vectors_are_what_this_release_builds() {
    for (file, built) in vector_files() {
        let path = root().join("specs/vectors").join(file);
        if std::env::var_os("DIDGATE_WRITE_VECTORS").is_some() {
            let text = serde_json::to_string_pretty(&built).expect("json") + "\n";
            std::fs::write(&path, text).expect("write the vectors");
        }
        // compared as JSON values: key order depends on serde_json's features in a workspace
        // build
        assert!(
            vector(file) == built,
            "specs/vectors/{file} differs from what this release builds \
             (DIDGATE_WRITE_VECTORS=1 rewrites it after a deliberate change)"
        );
    }
}

// ------------------------------------------------------------------------------------------
// Vector files: read alone, as an outside implementation would

#[test]
fn the_did_key_vectors_hold_and_agree_with_the_public_ones() {
    let file = vector("did-key.json");
    let public = vector("public/did-key-ed25519.json");
    let vectors = file["vectors"].as_array().expect("vectors");
    let public = public["vectors"].as_array().expect("public vectors");
    assert_eq!(vectors.len(), public.len());
    for (v, p) in vectors.iter().zip(public) {
        assert_eq!(v["seed"], p["seed"]);
        assert_eq!(v["did"], p["did"]);
        assert_eq!(v["base58_public_key"], p["publicKeyBase58"]);
        assert_eq!(v["kid"], p["verificationMethod"]);
        let key = hex_of(&v["public_key"]);
        let did = Did::parse(v["did"].as_str().expect("did")).expect("a did:key");
        assert_eq!(did.public_key_bytes().as_slice(), key.as_slice());
        let seed: [u8; 32] = hex_of(&v["seed"]).try_into().expect("32 bytes");
        assert_eq!(Identity::from_seed(&seed).did(), &did);
        // multicodec: 0xed 0x01 then the key; the DID is "did:key:z" || base58btc of it
        let multicodec = hex_of(&v["multicodec_bytes"]);
        assert_eq!(multicodec[..2], [0xed, 0x01]);
        assert_eq!(multicodec[2..], key[..]);
        let text = v["did"].as_str().expect("did");
        let b58 = text.strip_prefix("did:key:z").expect("multibase z");
        assert_eq!(bs58::decode(b58).into_vec().expect("base58"), multicodec);
        assert_eq!(
            bs58::decode(v["base58_public_key"].as_str().expect("b58"))
                .into_vec()
                .expect("base58"),
            key
        );
        let kid = v["kid"].as_str().expect("kid");
        assert_eq!(Did::from_key_id(kid).expect("a DID URL"), did);
        assert_eq!(kid, format!("{text}#{}", &text["did:key:".len()..]));
    }
}

/// The envelope of a signed example, rebuilt by hand from specs/protocol.md ("Signed
/// envelopes") and checked with the real verifier; returns the verified payload's digest.
fn check_signed(v: &Value, kind: Kind) {
    let signer = Did::parse(v["signer"].as_str().expect("signer")).expect("a did:key");
    let seed: [u8; 32] = hex_of(&v["signer_seed"]).try_into().expect("32 bytes");
    assert_eq!(Identity::from_seed(&seed).did(), &signer);
    assert_eq!(v["tag"], kind.tag());
    let tag = kind.tag().as_bytes();
    let kid = signer.key_id();
    let (payload, protected) = (hex_of(&v["payload"]), hex_of(&v["protected"]));
    let (signature, cose) = (hex_of(&v["signature"]), hex_of(&v["cose_sign1"]));
    // "Headers": a3 01 27 03 <tstr tag> 04 <bstr kid>, in label order
    let mut header = vec![0xa3, 0x01, 0x27, 0x03, 0x78, tag.len() as u8];
    header.extend_from_slice(tag);
    header.push(0x04);
    header.extend(bstr(kid.as_bytes()));
    assert_eq!(protected, header, "protected header");
    // "Signing": Sig_structure = ["Signature1", protected, external_aad = tag, payload]
    let mut tbs = vec![0x84, 0x6a];
    tbs.extend_from_slice(b"Signature1");
    tbs.extend(bstr(&protected));
    tbs.extend(bstr(tag));
    tbs.extend(bstr(&payload));
    assert_eq!(hex_of(&v["sig_structure"]), tbs, "Sig_structure");
    let signature: [u8; 64] = signature.try_into().expect("64 bytes");
    signer
        .verifying_key()
        .verify_strict(&tbs, &ed25519_dalek::Signature::from_bytes(&signature))
        .expect("the signature verifies over the Sig_structure");
    // tag 18, [protected, {}, payload, signature]
    let mut sign1 = vec![0xd2, 0x84];
    sign1.extend(bstr(&protected));
    sign1.push(0xa0);
    sign1.extend(bstr(&payload));
    sign1.extend(bstr(&signature));
    assert_eq!(cose, sign1, "COSE_Sign1");
    // the real verifier, and "Signed digest and call ID"
    let verified = envelope::verify(&cose, kind).expect("verifies");
    assert_eq!(verified.signer(), &signer);
    assert_eq!(verified.payload(), payload.as_slice());
    let digest = hex_of(&v["signed_digest"]);
    assert_eq!(verified.digest().as_slice(), digest.as_slice());
    assert_eq!(
        envelope::signed_digest(&protected, &payload).as_slice(),
        digest.as_slice()
    );
    let mut h = blake3::Hasher::new_derive_key("didgate 2026 signed-digest v1");
    h.update(&(protected.len() as u64).to_be_bytes());
    h.update(&protected);
    h.update(&payload);
    assert_eq!(h.finalize().as_bytes().as_slice(), digest.as_slice());
    // one kind never verifies as another
    for other in [
        Kind::Request,
        Kind::Grant,
        Kind::Receipt,
        Kind::Refusal,
        Kind::Checkpoint,
    ] {
        if other != kind {
            assert!(envelope::verify(&cose, other).is_err(), "{other:?}");
        }
    }
}

#[test]
fn the_signed_refusal_vector_holds() {
    let v = vector("signed-refusal.json");
    check_signed(&v, Kind::Refusal);
    let refusal = Refusal::decode(&hex_of(&v["payload"])).expect("a refusal");
    assert_eq!(refusal_json(&refusal), v["message"]);
    assert_eq!(
        refusal.encode(),
        hex_of(&v["payload"]),
        "re-encodes to the same bytes"
    );
}

#[test]
fn the_signed_request_vector_holds() {
    let v = vector("signed-request.json");
    check_signed(&v, Kind::Request);
    let request = Request::decode(&hex_of(&v["payload"])).expect("a request");
    assert_eq!(request_json(&request), v["message"]);
    assert_eq!(
        request.encode(),
        hex_of(&v["payload"]),
        "re-encodes to the same bytes"
    );
    assert_eq!(request.aud, Identity::from_seed(&seed(0)).did().as_str());
    // the frame: type 0x01, u32be length, the envelope
    let cose = hex_of(&v["cose_sign1"]);
    let frame = hex_of(&v["frame"]);
    assert_eq!(frame[0], 0x01);
    assert_eq!(frame[1..5], (cose.len() as u32).to_be_bytes());
    assert_eq!(frame[5..], cose[..]);
    let mut decoder = FrameDecoder::new();
    decoder.push(&frame);
    let got = decoder.next_frame().expect("a frame").expect("whole");
    assert_eq!(got.kind, FrameType::Request);
    assert_eq!(got.payload.as_ref(), cose.as_slice());
    assert_eq!(decoder.next_frame(), Ok(None));
    assert_eq!(decoder.finish(), Ok(()));
}

#[test]
fn the_catalog_vector_holds_in_version_2_only() {
    let v = vector("catalog-v2.json");
    let bytes = hex_of(&v["bytes"]);
    assert_eq!(Catalog::decode(&bytes), Ok(catalog_message()));
    // the same operation in a version 1 Catalog does not decode (amendment 2.5)
    let mut v1 = catalog_message();
    v1.v = 1;
    assert!(Catalog::decode(&v1.encode()).is_err());
}

#[test]
fn the_chain_request_vector_holds_and_is_laid_out_as_the_spec_says() {
    use didgate_protocol::chain::ChainRequest;
    let v = vector("chain-request.json");
    let payload = hex_of(&v["request_payload"]);
    assert_eq!(ChainRequest::decode(&payload), Ok(ChainRequest { v: 2 }));
    // by hand: type 0x0b, u32be length, then the payload
    let mut by_hand = vec![0x0b, 0, 0, 0, payload.len() as u8];
    by_hand.extend_from_slice(&payload);
    assert_eq!(hex_of(&v["request_frame"]), by_hand);
    let mut decoder = FrameDecoder::new();
    decoder.push(&hex_of(&v["part_frame"]));
    let part = decoder.next_frame().expect("a frame").expect("whole");
    assert_eq!(part.kind, FrameType::ChainPart);
    assert_eq!(part.payload.as_ref(), hex_of(&v["part_payload"]).as_slice());
    // version 1 has no chain exchange
    assert!(ChainRequest::decode(&[0xa1, 0x61, 0x76, 0x01]).is_err());
}

#[test]
fn the_home_vector_holds() {
    let v = vector("home.json");
    // every score from its inputs, as an outside implementation computes it
    for s in v["scores"].as_array().expect("scores") {
        let (node, did) = (
            s["node"].as_str().expect("node"),
            s["did"].as_str().expect("did"),
        );
        let mut input = (node.len() as u64).to_be_bytes().to_vec();
        input.extend_from_slice(node.as_bytes());
        input.extend_from_slice(did.as_bytes());
        let key = blake3::derive_key(v["context"].as_str().expect("context"), &input);
        assert_eq!(hex_of(&s["score"]), key.to_vec(), "{node} {did}");
    }
    // the home is the greatest score
    for h in v["homes"].as_array().expect("homes") {
        let did = h["did"].as_str().expect("did");
        let best = |nodes: &[&str]| {
            v["scores"]
                .as_array()
                .expect("scores")
                .iter()
                .filter(|s| s["did"] == did && nodes.contains(&s["node"].as_str().unwrap_or("")))
                .max_by_key(|s| hex_of(&s["score"]))
                .map(|s| s["node"].as_str().unwrap_or("").to_string())
        };
        assert_eq!(
            best(&["node-1", "node-2", "node-3"]).as_deref(),
            h["home_of_all_three"].as_str()
        );
        assert_eq!(
            best(&["node-1", "node-2"]).as_deref(),
            h["home_of_node_1_and_node_2"].as_str()
        );
    }
    // the moved refusal opens under the gateway and names the home; a version 1 one would not
    let cose = hex_of(&v["moved_cose"]);
    let gateway = Identity::from_seed(&seed(0));
    let opened =
        didgate_protocol::message::open_from::<Refusal>(&cose, gateway.did()).expect("opens");
    assert_eq!(opened.message(), &moved_message());
    assert_eq!(opened.message().encode(), hex_of(&v["moved_payload"]));
    let mut v1 = moved_message();
    v1.v = 1;
    assert!(Refusal::decode(&v1.encode()).is_err());
}

// ------------------------------------------------------------------------------------------
// The spec's text equals the vector files

/// The part of `spec` about `file`: from the line that cites `specs/vectors/FILE` to the next
/// heading.
fn citing<'s>(spec: &'s str, file: &str) -> &'s str {
    let cite = format!("`specs/vectors/{file}`");
    let at = spec
        .find(&cite)
        .unwrap_or_else(|| panic!("the spec cites {cite}"));
    let start = spec[..at].rfind('\n').map_or(0, |i| i + 1);
    let end = spec[at..].find("\n#").map_or(spec.len(), |i| at + i);
    &spec[start..end]
}

/// The lines of the fenced blocks of `text`.
fn fenced(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        if line.starts_with("```") {
            inside = !inside;
        } else if inside {
            out.push(line);
        }
    }
    out
}

/// A label as a vector field name: what comes before ` (` or ` =`, lower case, words joined
/// by `_` (`signed digest` -> `signed_digest`, `call ID` -> `call_id`).
fn field_name(label: &str) -> String {
    let cut = [" (", " ="]
        .iter()
        .filter_map(|p| label.find(p))
        .min()
        .unwrap_or(label.len());
    label[..cut]
        .trim()
        .to_lowercase()
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join("_")
}

fn is_hex(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// A hex field printed in a spec block: its name, its hex, and the length its label declares
/// (`payload (61 bytes):`).
#[derive(Debug)]
struct Printed {
    name: String,
    hex: String,
    declared: Option<usize>,
}

fn declared_len(label: &str) -> Option<usize> {
    let open = label.find(" (")?;
    let rest = &label[open + 2..];
    let n = rest.strip_suffix(')').unwrap_or(rest);
    let (n, unit) = n.split_once(' ')?;
    unit.starts_with("bytes").then(|| n.parse().ok()).flatten()
}

/// The hex fields of the fenced blocks of `text`: a line `LABEL:` followed by lines of hex, or
/// `LABEL: HEX` on one line. Other lines (layouts such as `d2 84 5896 <protected> ...`) end a
/// field and are not fields.
fn printed_fields(text: &str) -> Vec<Printed> {
    let mut out: Vec<Printed> = Vec::new();
    let mut open = false;
    for line in fenced(text) {
        let line = line.trim_end();
        if is_hex(line) && open {
            if let Some(last) = out.last_mut() {
                last.hex.push_str(line);
            }
        } else if let Some(label) = line.strip_suffix(':') {
            out.push(Printed {
                name: field_name(label),
                hex: String::new(),
                declared: declared_len(label),
            });
            open = true;
        } else if let Some((label, value)) = line.rsplit_once(": ")
            && is_hex(value)
        {
            out.push(Printed {
                name: field_name(label),
                hex: value.into(),
                declared: declared_len(label),
            });
            open = false;
        } else {
            open = false;
        }
    }
    out
}

/// Checks that the fields printed in `spec`'s part about `file` are exactly `names`, each equal
/// to the vector's field of that name (and as long as its label says).
fn printed_equal_the_vector(spec: &str, file: &str, v: &Value, names: &[&str]) {
    let printed = printed_fields(citing(spec, file));
    let got: Vec<&str> = printed.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(got, names, "the fields printed for {file}");
    for p in &printed {
        assert_eq!(
            Some(p.hex.as_str()),
            v[&p.name].as_str(),
            "{file}: {} as printed in the spec",
            p.name
        );
        if let Some(n) = p.declared {
            assert_eq!(p.hex.len(), 2 * n, "{file}: {} is {n} bytes", p.name);
        }
    }
}

/// The rows `| label | `value` ... |` of the tables of `text`, each value the concatenation of
/// the cell's code spans.
fn table_rows(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.trim().strip_prefix('|')?.split('|').collect();
            let (label, value) = (cells.first()?.trim(), cells.get(1)?);
            let spans: Vec<&str> = value.split('`').skip(1).step_by(2).collect();
            (!spans.is_empty()).then(|| (field_name(label), spans.concat()))
        })
        .collect()
}

#[test]
fn the_protocol_spec_prints_exactly_its_vectors() {
    let spec = read("specs/protocol.md");
    // did:key: the table is the first vector; the other DIDs are named in the text
    let keys = vector("did-key.json");
    let part = citing(&spec, "did-key.json");
    let rows = table_rows(part);
    let names: Vec<&str> = rows.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "seed",
            "public_key",
            "base58_public_key",
            "multicodec_bytes",
            "did",
            "kid"
        ]
    );
    for (name, value) in &rows {
        assert_eq!(
            Some(value.as_str()),
            keys["vectors"][0][name].as_str(),
            "{name}"
        );
    }
    for v in keys["vectors"].as_array().expect("vectors") {
        let did = v["did"].as_str().expect("did");
        assert!(part.contains(did), "the spec names {did}");
    }
    printed_equal_the_vector(
        &spec,
        "signed-refusal.json",
        &vector("signed-refusal.json"),
        &["payload", "protected", "signature", "signed_digest"],
    );
    let request = vector("signed-request.json");
    printed_equal_the_vector(
        &spec,
        "signed-request.json",
        &request,
        &["payload", "protected", "signature", "call_id"],
    );
    // the call ID is the request's signed digest
    assert_eq!(request["call_id"], request["signed_digest"]);
}

/// CBOR diagnostic notation (RFC 8949, 8) of the maps, arrays, text strings, integers and
/// booleans a Catalog holds, as the spec prints it: `{"k": v, ...}`, `[a, b]`.
fn diagnostic(v: &ciborium::Value) -> String {
    use ciborium::Value as V;
    match v {
        V::Map(m) => {
            let items: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{}: {}", diagnostic(k), diagnostic(v)))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        V::Array(a) => {
            let items: Vec<String> = a.iter().map(diagnostic).collect();
            format!("[{}]", items.join(", "))
        }
        V::Text(t) => serde_json::to_string(t).expect("a JSON string"),
        V::Integer(i) => i128::from(*i).to_string(),
        V::Bool(b) => b.to_string(),
        other => panic!("not in a Catalog: {other:?}"),
    }
}

#[test]
fn the_catalog_example_is_its_vector_in_diagnostic_notation() {
    let spec = read("specs/protocol.md");
    let bytes = hex_of(&vector("catalog-v2.json")["bytes"]);
    let value: ciborium::Value = ciborium::from_reader(bytes.as_slice()).expect("CBOR");
    // the block's lines are wrapped after a comma: joined as they are, they are one line
    let printed: String = fenced(citing(&spec, "catalog-v2.json"))
        .iter()
        .map(|l| l.trim_end())
        .collect();
    assert_eq!(printed, diagnostic(&value));
}

// ------------------------------------------------------------------------------------------
// The structure of specs/

/// The heading anchors GitHub makes: lower case, punctuation but `-` and `_` dropped, spaces as
/// `-`, a repeated anchor numbered from 1.
fn anchor(heading: &str, seen: &mut std::collections::HashMap<String, usize>) -> String {
    let a: String = heading
        .replace('`', "")
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect();
    let n = seen.entry(a.clone()).or_default();
    let out = if *n == 0 {
        a.clone()
    } else {
        format!("{a}-{n}")
    };
    *n += 1;
    out
}

/// The headings of `text` below its title (levels 2 to 4), outside fenced blocks.
fn headings(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        if line.starts_with("```") {
            inside = !inside;
            continue;
        }
        let level = line.bytes().take_while(|&b| b == b'#').count();
        if !inside && (2..=4).contains(&level) && line.as_bytes().get(level) == Some(&b' ') {
            out.push((level, &line[level + 1..]));
        }
    }
    out
}

fn spec_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("specs"))
        .expect("specs/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_spec_lists_each_of_its_sections_in_its_contents() {
    let files = spec_files();
    assert!(files.len() >= 5, "{files:?}");
    for path in files {
        let text = std::fs::read_to_string(&path).expect("spec");
        let name = path.display();
        let start = text
            .find("\nContents:\n\n")
            .unwrap_or_else(|| panic!("{name} has a Contents: list"));
        let first = text.find("\n## ").expect("a section");
        assert!(
            start < first,
            "{name}: the contents come before the first section"
        );
        let listed: Vec<&str> = text[start + "\nContents:\n\n".len()..]
            .lines()
            .take_while(|l| !l.trim().is_empty())
            .collect();
        let mut seen = std::collections::HashMap::new();
        let expected: Vec<String> = headings(&text)
            .into_iter()
            .map(|(level, h)| {
                format!(
                    "{}- [{h}](#{})",
                    "  ".repeat(level - 2),
                    anchor(h, &mut seen)
                )
            })
            .collect();
        assert_eq!(listed, expected, "{name}: contents and sections differ");
    }
}

/// The file a reference names: `specs/X.md` or `docs/X.md` as written, else `X.md` in specs/,
/// then docs/, then the root.
fn referenced_file(before: &str, file: &str) -> Option<PathBuf> {
    let r = root();
    if before.ends_with("docs/") {
        return Some(r.join("docs").join(file));
    }
    ["specs", "docs", "."]
        .iter()
        .map(|d| r.join(d).join(file))
        .find(|p| p.exists())
}

/// Whether `name` is a section of `text`: a heading equal to it or to it followed by ` (...)`,
/// or a bold paragraph lead `**name**` or `**name.**`.
fn has_section(text: &str, name: &str) -> bool {
    headings(text).iter().any(|(_, h)| {
        let h = h.replace('`', "");
        h == name
            || h.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(" ("))
    }) || text.contains(&format!("**{name}**"))
        || text.contains(&format!("**{name}.**"))
}

/// The references `FILE.md, "A"` (also `FILE.md "A"`, `FILE.md ("A")` and `FILE.md, "A", "B"`)
/// in `text`: (file, section), the section's whitespace collapsed (it may be wrapped).
fn references(text: &str) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(".md") {
        let before = &rest[..i];
        let start = before
            .rfind(|c: char| !(c.is_ascii_lowercase() || c == '-'))
            .map_or(0, |j| j + 1);
        let file = format!("{}.md", &before[start..]);
        let mut after = &rest[i + 3..];
        rest = after;
        if start == i {
            continue;
        }
        let Some(path) = referenced_file(&before[..start], &file) else {
            continue;
        };
        after = after.strip_prefix('`').unwrap_or(after);
        after = after.strip_prefix(',').unwrap_or(after);
        after = after.trim_start_matches([' ', '\n', '(']);
        // one or more quoted sections, separated by commas
        while let Some(quoted) = after.strip_prefix('"') {
            let Some(end) = quoted.find('"') else { break };
            let name = quoted[..end]
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            out.push((path.clone(), name));
            after = &quoted[end + 1..];
            match after.strip_prefix(',') {
                Some(more) => after = more.trim_start(),
                None => break,
            }
        }
    }
    out
}

#[test]
fn references_to_spec_sections_name_existing_sections() {
    let mut sources = spec_files();
    for dir in ["docs"] {
        for e in std::fs::read_dir(root().join(dir)).expect("docs/") {
            let p = e.expect("entry").path();
            if p.extension().is_some_and(|e| e == "md") {
                sources.push(p);
            }
        }
    }
    sources.push(root().join("README.md"));
    let mut checked = 0;
    let mut broken = Vec::new();
    for source in &sources {
        let text = std::fs::read_to_string(source).expect("a markdown file");
        for (file, section) in references(&text) {
            let target = std::fs::read_to_string(&file).unwrap_or_default();
            checked += 1;
            if !has_section(&target, &section) {
                let r = root();
                let rel = |p: &Path| p.strip_prefix(&r).unwrap_or(p).display().to_string();
                broken.push(format!(
                    "{} names {}, \"{section}\"",
                    rel(source),
                    rel(&file)
                ));
            }
        }
    }
    assert!(checked > 50, "{checked} references");
    assert!(
        broken.is_empty(),
        "references to no section:\n{}",
        broken.join("\n")
    );
}

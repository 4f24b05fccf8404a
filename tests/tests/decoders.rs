//! Property tests over every decoder that reads untrusted bytes: frames, COSE_Sign1 envelopes,
//! each signed message, did:key strings, audit entries, export files, evidence bundles.
//!
//! Each decoder gets arbitrary bytes and mutations (flips, insertions, deletions, truncations,
//! splices) of valid inputs taken from a real run (a gateway, its upstream and a client on
//! loopback): it returns a value or a typed error, never panics. Encodings round-trip, and
//! a mutated signed message that still verifies says exactly what was signed. The same valid
//! inputs seed the cargo-fuzz corpus (`DIDGATE_WRITE_FUZZ_SEEDS=fuzz/corpus cargo test -p
//! didgate-tests --test decoders` rewrites it). `PROPTEST_CASES` scales every property.

use std::path::Path;
use std::sync::OnceLock;

use bytes::BytesMut;
use didgate_audit::entry::{Entry, EntryKind, Outcome, Role};
use didgate_audit::{evidence, export, load_records};
use didgate_client::CallSpec;
use didgate_client::low_level::RawExchange as _;
use didgate_protocol::envelope::{self, Kind};
use didgate_protocol::frame::{self, FrameDecoder, FrameType};
use didgate_protocol::message::{
    self, ChainHead, Checkpoint, GrantBody, Message, Receipt, Refusal, RefusalCode, Request,
    ResponseHead, SignedMessage,
};
use didgate_protocol::{Did, Identity};
use didgate_tests::{Harness, alice, bob};
use proptest::prelude::*;

/// Valid inputs from a real run, per decoder.
struct Seeds {
    frames: Vec<Vec<u8>>,
    envelopes: Vec<Vec<u8>>,
    dids: Vec<String>,
    entries: Vec<Vec<u8>>,
    export: Vec<u8>,
    evidence: Vec<u8>,
}

fn seeds() -> &'static Seeds {
    static SEEDS: OnceLock<Seeds> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let seeds = rt.block_on(real_run()).expect("a real run for the seeds");
        if let Ok(dir) = std::env::var("DIDGATE_WRITE_FUZZ_SEEDS") {
            write_corpus(Path::new(&dir), &seeds).expect("write the fuzz seeds");
        }
        seeds
    })
}

/// One executed call, one refused call and one two-step grant through a real gateway; every
/// byte string a decoder of this module reads, as the run produced it.
async fn real_run() -> anyhow::Result<Seeds> {
    let mut h = Harness::start().await?;
    let a = h.client("alice", alice()).await?;
    let b = h.client("bob", bob()).await?;
    let spec = CallSpec::new("payments", "POST", "/v1/charges")
        .header("content-type", "application/json")
        .body(br#"{"amount":5,"currency":"usd"}"#.to_vec());
    let (request, _) = a.sign(&spec)?;
    let answer = a.call(spec).await?;
    let grant = a
        .grant(CallSpec::new("payments", "GET", "/v1/balance").header("accept", "*/*"))
        .await?;
    let _ = b
        .call(CallSpec::new("payments", "POST", "/v1/charges"))
        .await;
    a.close().await;
    b.close().await;
    drop((a, b));
    h.stop().await;

    let gw = load_records(&h.gw_dir())?;
    let client = load_records(&h.chain_dir("alice"))?;
    let mut envelopes = vec![
        request.clone(),
        grant.bytes.clone(),
        answer.receipt_bytes.clone(),
    ];
    envelopes.extend(gw.checkpoints.iter().take(1).cloned());
    // the refusal bob got, as his chain recorded it
    let bob_chain = load_records(&h.chain_dir("bob"))?;
    for (_, bytes) in &bob_chain.entries {
        let e = Entry::decode(bytes)?;
        if e.outcome == Some(Outcome::Refusal)
            && let Some(signed) = e.signed
        {
            envelopes.push(signed);
        }
    }
    let mut frames = Vec::new();
    for (kind, payload) in [
        (FrameType::Request, &request),
        (FrameType::Grant, &grant.bytes),
        (FrameType::Receipt, &answer.receipt_bytes),
    ] {
        let mut out = BytesMut::new();
        frame::encode(kind, payload, &mut out)?;
        frame::encode_chunks(br#"{"amount":5}"#, &mut out);
        frames.push(out.to_vec());
    }
    let entries: Vec<Vec<u8>> = gw
        .entries
        .iter()
        .chain(client.entries.iter())
        .map(|(_, b)| b.clone())
        .collect();
    let export_path = h.dir.path().join("gateway.export");
    let store = didgate_audit::store::Store::open(&h.gw_dir().join("store"), &[])?;
    export::export(&store, &export_path)?;
    drop(store);
    let bundle = evidence::build(&client, &gw, answer.call)?;
    Ok(Seeds {
        frames,
        envelopes,
        dids: vec![
            alice().did().to_string(),
            bob().did().to_string(),
            h.gw_did.to_string(),
            alice().did().key_id(),
        ],
        entries,
        export: std::fs::read(&export_path)?,
        evidence: bundle.encode(),
    })
}

/// Writes the seeds as the cargo-fuzz corpus, one directory per target.
fn write_corpus(dir: &Path, s: &Seeds) -> std::io::Result<()> {
    let put = |target: &str, items: &[Vec<u8>]| -> std::io::Result<()> {
        let d = dir.join(target);
        std::fs::create_dir_all(&d)?;
        for (i, item) in items.iter().enumerate() {
            std::fs::write(d.join(format!("seed-{i}")), item)?;
        }
        Ok(())
    };
    put("frames", &s.frames)?;
    put("envelope", &s.envelopes)?;
    let payloads: Vec<Vec<u8>> = s
        .envelopes
        .iter()
        .filter_map(|e| envelope::parse_for_tests(e).and_then(|c| c.payload))
        .collect();
    put("messages", &[s.envelopes.clone(), payloads].concat())?;
    put(
        "did_key",
        &s.dids
            .iter()
            .map(|d| d.as_bytes().to_vec())
            .collect::<Vec<_>>(),
    )?;
    put(
        "entry",
        &s.entries.iter().take(12).cloned().collect::<Vec<_>>(),
    )?;
    put("export", std::slice::from_ref(&s.export))?;
    put("evidence", std::slice::from_ref(&s.evidence))
}

/// A mutation of a valid input.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Truncate(usize),
    Splice(usize, Vec<u8>),
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    let one = prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(i, x)| Mutation::Flip(i, x)),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..9))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<usize>(), 1..16usize).prop_map(|(i, n)| Mutation::Delete(i, n)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..9))
            .prop_map(|(i, b)| Mutation::Splice(i, b)),
    ];
    prop::collection::vec(one, 1..4)
}

fn mutate(seed: &[u8], muts: &[Mutation]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for m in muts {
        let at = |i: usize, len: usize| if len == 0 { 0 } else { i % (len + 1) };
        match m {
            Mutation::Flip(i, x) if !v.is_empty() => {
                let n = v.len();
                v[i % n] ^= x;
            }
            Mutation::Flip(..) => {}
            Mutation::Insert(i, b) => {
                let p = at(*i, v.len());
                v.splice(p..p, b.iter().copied());
            }
            Mutation::Delete(i, n) => {
                let p = at(*i, v.len());
                let end = (p + n).min(v.len());
                v.drain(p..end);
            }
            Mutation::Truncate(i) => {
                let p = at(*i, v.len());
                v.truncate(p);
            }
            Mutation::Splice(i, b) => {
                let p = at(*i, v.len());
                let end = (p + b.len()).min(v.len());
                v.splice(p..end, b.iter().copied());
            }
        }
    }
    v
}

/// Every decoder of a signed message, on bytes claimed to be one.
fn open_any(bytes: &[u8]) {
    let _ = message::open::<Request>(bytes);
    let _ = message::open::<GrantBody>(bytes);
    let _ = message::open::<Receipt>(bytes);
    let _ = message::open::<Refusal>(bytes);
    let _ = message::open::<Checkpoint>(bytes);
}

/// Every message payload decoder.
fn decode_any(bytes: &[u8]) {
    let _ = Request::decode(bytes);
    let _ = GrantBody::decode(bytes);
    let _ = Receipt::decode(bytes);
    let _ = Refusal::decode(bytes);
    let _ = Checkpoint::decode(bytes);
    let _ = ResponseHead::decode(bytes);
}

fn kinds() -> [Kind; 5] {
    [
        Kind::Request,
        Kind::Grant,
        Kind::Receipt,
        Kind::Refusal,
        Kind::Checkpoint,
    ]
}

fn frame_types() -> impl Strategy<Value = FrameType> {
    prop_oneof![
        Just(FrameType::Request),
        Just(FrameType::Body),
        Just(FrameType::Head),
        Just(FrameType::Receipt),
        Just(FrameType::Refusal),
        Just(FrameType::GrantRequest),
        Just(FrameType::Grant),
        Just(FrameType::Execute),
    ]
}

fn text() -> impl Strategy<Value = String> {
    "[ -~]{0,24}"
}

fn pairs() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec((text(), text()), 0..4)
}

fn request() -> impl Strategy<Value = Request> {
    (
        (text(), text(), text(), text()),
        (pairs(), pairs(), any::<u64>(), any::<[u8; 32]>()),
        (
            any::<[u8; 16]>(),
            any::<u64>(),
            any::<[u8; 32]>(),
            any::<u64>(),
        ),
    )
        .prop_map(
            |(
                (aud, upstream, method, path),
                (query, headers, body_len, body_b3),
                (nonce, time_ms, hash, seq),
            )| {
                Request {
                    v: 1,
                    aud,
                    upstream,
                    method,
                    path,
                    query,
                    headers,
                    body_len,
                    body_b3,
                    nonce,
                    time_ms,
                    head: ChainHead {
                        chain: hash,
                        seq,
                        hash,
                    },
                }
            },
        )
}

fn entry() -> impl Strategy<Value = Entry> {
    let kinds = prop_oneof![
        Just(EntryKind::Genesis),
        Just(EntryKind::Request),
        Just(EntryKind::Result),
        Just(EntryKind::Executing),
        Just(EntryKind::Executed),
        Just(EntryKind::Failed),
        Just(EntryKind::Abandoned),
        Just(EntryKind::Refused),
        Just(EntryKind::Refusals),
        Just(EntryKind::Granted),
        Just(EntryKind::Revocation),
    ];
    (
        (kinds, any::<u64>(), any::<[u8; 32]>(), any::<u64>()),
        (
            proptest::option::of(any::<[u8; 32]>()),
            proptest::option::of(prop::collection::vec(any::<u8>(), 0..64)),
            proptest::option::of(text()),
            proptest::option::of(any::<[u8; 16]>()),
        ),
        (
            proptest::option::of(any::<u16>()),
            proptest::option::of(text()),
            proptest::option::of(any::<u64>()),
            proptest::option::of(prop_oneof![Just(Role::Gateway), Just(Role::Client)]),
        ),
    )
        .prop_map(
            |(
                (kind, seq, prev, time_ms),
                (call, signed, subject, grant),
                (status, detail, count, role),
            )| {
                let mut e = Entry::new(kind, time_ms);
                e.seq = seq;
                e.prev = prev;
                e.call = call;
                e.signed = signed;
                e.subject = subject;
                e.grant = grant;
                e.status = status;
                e.detail = detail;
                e.count = count;
                e.role = role;
                e
            },
        )
}

// proptest's default configuration: 256 cases, or PROPTEST_CASES
proptest! {

    /// Frames of any type and payload survive encoding and any split of the byte stream.
    #[test]
    fn frames_round_trip_across_any_split(
        frames in prop::collection::vec((frame_types(), prop::collection::vec(any::<u8>(), 0..300)), 0..6),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut out = BytesMut::new();
        for (kind, payload) in &frames {
            frame::encode(*kind, payload, &mut out).expect("fits");
        }
        let bytes = out.to_vec();
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        cuts.push(bytes.len());
        cuts.sort_unstable();
        let mut dec = FrameDecoder::new();
        let mut got = Vec::new();
        let mut from = 0;
        for to in cuts {
            dec.push(&bytes[from..to]);
            from = to;
            while let Some(f) = dec.next_frame().expect("valid") {
                got.push((f.kind, f.payload.to_vec()));
            }
        }
        dec.finish().expect("complete");
        prop_assert_eq!(got, frames);
    }

    /// Mutated frame streams from the real run: frames or a typed error, never a panic; a
    /// declared length above the limit is refused before any payload is buffered.
    #[test]
    fn mutated_frames_never_panic(seed in 0..3usize, muts in mutations()) {
        let bytes = mutate(&seeds().frames[seed], &muts);
        let mut dec = FrameDecoder::new();
        dec.push(&bytes);
        loop {
            match dec.next_frame() {
                Ok(Some(f)) => prop_assert!(f.payload.len() <= frame::MAX_FRAME),
                Ok(None) => { let _ = dec.finish(); break }
                Err(_) => break,
            }
        }
    }

    /// Envelopes: sign then verify gives back the payload and signer, for every kind; the
    /// wrong kind is refused.
    #[test]
    fn envelopes_round_trip(seed in any::<[u8; 32]>(), payload in prop::collection::vec(any::<u8>(), 0..200), k in 0..5usize) {
        let id = Identity::from_seed(&seed);
        let kind = kinds()[k];
        let bytes = envelope::sign(&id, kind, payload.clone());
        let v = envelope::verify(&bytes, kind).expect("verifies");
        prop_assert_eq!(v.payload(), payload.as_slice());
        prop_assert_eq!(v.signer(), id.did());
        prop_assert!(envelope::verify(&bytes, kinds()[(k + 1) % 5]).is_err());
    }

    /// Mutated envelopes from the real run (requests, grants, receipts, refusals,
    /// checkpoints): if one still verifies, it carries exactly the signed payload and signer.
    #[test]
    fn mutated_envelopes_never_verify_as_something_else(seed in 0..5usize, muts in mutations()) {
        let seeds = seeds();
        let original = &seeds.envelopes[seed % seeds.envelopes.len()];
        let bytes = mutate(original, &muts);
        open_any(&bytes);
        for kind in kinds() {
            let before = envelope::verify(original, kind);
            if let (Ok(after), Ok(before)) = (envelope::verify(&bytes, kind), before) {
                prop_assert_eq!(after.payload(), before.payload());
                prop_assert_eq!(after.signer(), before.signer());
                prop_assert_eq!(after.digest(), before.digest());
            }
        }
    }

    /// Arbitrary bytes into every message decoder and every signed-message opener.
    #[test]
    fn message_decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        decode_any(&bytes);
        open_any(&bytes);
    }

    /// Mutated payloads of the real run's messages, into every decoder.
    #[test]
    fn mutated_messages_never_panic(seed in 0..5usize, muts in mutations()) {
        let seeds = seeds();
        let sign1 = envelope::parse_for_tests(&seeds.envelopes[seed % seeds.envelopes.len()]);
        let payload = sign1.and_then(|s| s.payload).unwrap_or_default();
        decode_any(&mutate(&payload, &muts));
    }

    /// Requests round-trip through their encoding and through signing and opening.
    #[test]
    fn requests_round_trip(req in request(), seed in any::<[u8; 32]>()) {
        prop_assert_eq!(Request::decode(&req.encode()).expect("decodes"), req.clone());
        let id = Identity::from_seed(&seed);
        let opened = message::open::<Request>(&req.sign(&id)).expect("opens");
        prop_assert_eq!(opened.message(), &req);
        prop_assert_eq!(opened.envelope().signer(), id.did());
    }

    /// Grants, receipts and refusals round-trip too.
    #[test]
    fn grants_receipts_refusals_round_trip(
        id in any::<[u8; 16]>(), call in any::<[u8; 32]>(), t in any::<u64>(), s in text(), status in any::<u16>(),
    ) {
        let g = GrantBody { v: 1, id, call, subject: s.clone(), upstream: s.clone(), method: s.clone(), path: s.clone(), expires_ms: t, node_cert: None };
        prop_assert_eq!(GrantBody::decode(&g.encode()).expect("grant"), g);
        let r = Refusal { v: 1, call: Some(call), code: RefusalCode::Policy, reason: s.clone(), time_ms: t, entry: None, node_cert: None, home: None };
        prop_assert_eq!(Refusal::decode(&r.encode()).expect("refusal"), r);
        let h = ResponseHead { v: 1, status, headers: vec![(s.clone(), s)] };
        prop_assert_eq!(ResponseHead::decode(&h.encode()).expect("head"), h);
    }

    /// did:key: every Ed25519 key round-trips through its DID and its key id.
    #[test]
    fn did_keys_round_trip(seed in any::<[u8; 32]>()) {
        let id = Identity::from_seed(&seed);
        let text = id.did().to_string();
        let parsed = Did::parse(&text).expect("parses");
        prop_assert_eq!(&parsed, id.did());
        prop_assert_eq!(parsed.to_string(), text);
        prop_assert_eq!(Did::from_key_id(&id.did().key_id()).expect("kid"), parsed);
    }

    /// Mutated DIDs and key ids: refused, or (if still valid) canonical: they print back as
    /// read, so two spellings never name one key.
    #[test]
    fn mutated_did_keys_are_refused_or_canonical(seed in 0..4usize, muts in mutations()) {
        let s = &seeds().dids[seed];
        let bytes = mutate(s.as_bytes(), &muts);
        let text = String::from_utf8_lossy(&bytes);
        if let Ok(d) = Did::parse(&text) {
            prop_assert_eq!(d.to_string(), text.to_string());
        }
        let _ = Did::from_key_id(&text);
    }

    /// Audit entries round-trip.
    #[test]
    fn entries_round_trip(e in entry()) {
        prop_assert_eq!(Entry::decode(&e.encode()).expect("decodes"), e);
    }

    /// Mutated entries of the real run's chains, and arbitrary bytes: decoded or refused.
    #[test]
    fn mutated_entries_never_panic(seed in any::<usize>(), muts in mutations(), junk in prop::collection::vec(any::<u8>(), 0..300)) {
        let seeds = seeds();
        let _ = Entry::decode(&mutate(&seeds.entries[seed % seeds.entries.len()], &muts));
        let _ = Entry::decode(&junk);
    }

    /// Mutated export files: read or refused (typed), never a panic; the real one reads back.
    #[test]
    fn mutated_exports_never_panic(muts in mutations()) {
        let seeds = seeds();
        let clean = export::read(seeds.export.as_slice(), "seed").expect("the real export reads");
        prop_assert!(!clean.entries.is_empty());
        let _ = export::read(mutate(&seeds.export, &muts).as_slice(), "mutated");
    }

    /// Mutated evidence bundles: checked or refused, never a panic; the real one holds.
    #[test]
    fn mutated_evidence_never_panics(muts in mutations()) {
        let seeds = seeds();
        prop_assert!(evidence::check(&seeds.evidence).is_ok());
        let bytes = mutate(&seeds.evidence, &muts);
        let _ = evidence::Bundle::decode(&bytes);
        let _ = evidence::check(&bytes);
    }
}

//! Criterion micro-benchmarks of the envelope work on every call: signing a request (client),
//! and verifying and decoding it (gateway), as `message::open` does. Run with
//! `cargo bench -p didgate-protocol`; figures only, no assertions.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use didgate_protocol::Identity;
use didgate_protocol::envelope::{self, Kind};
use didgate_protocol::message::{self, ChainHead, Request, SignedMessage};

const VERSION: u64 = didgate_protocol::Version::CURRENT.as_u64();

/// A GET request like the ones the call benchmark sends.
fn request(aud: &str) -> Request {
    Request {
        v: VERSION,
        aud: aud.into(),
        upstream: "bench".into(),
        method: "GET".into(),
        path: "/v1/charges/ch_bench".into(),
        query: vec![("expand".into(), "customer".into())],
        headers: vec![("accept".into(), "application/json".into())],
        body_len: 0,
        body_b3: *blake3::hash(b"").as_bytes(),
        nonce: [9; 16],
        time_ms: 1_780_000_000_000,
        head: ChainHead {
            chain: [1; 32],
            seq: 41,
            hash: [2; 32],
        },
    }
}

fn envelope_benches(c: &mut Criterion) {
    let client = Identity::from_seed(&[0xc1; 32]);
    let gateway = Identity::from_seed(&[0x9a; 32]);
    let req = request(gateway.did().as_str());
    let bytes = req.sign(&client);
    c.bench_function("envelope/sign request", |b| {
        b.iter(|| black_box(req.sign(black_box(&client))))
    });
    c.bench_function("envelope/verify request", |b| {
        b.iter(|| black_box(envelope::verify(black_box(&bytes), Kind::Request)))
    });
    c.bench_function("envelope/open request (verify + decode)", |b| {
        b.iter(|| black_box(message::open::<Request>(black_box(&bytes))))
    });
    // what the gateway does: the TLS peer's DID (key already decoded) is the likely signer
    c.bench_function("envelope/open request from the connection's peer", |b| {
        b.iter(|| {
            black_box(message::open_likely_from::<Request>(
                black_box(&bytes),
                client.did(),
            ))
        })
    });
}

criterion_group!(benches, envelope_benches);
criterion_main!(benches);

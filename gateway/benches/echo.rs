//! Criterion micro-benchmark of the response scanner (specs/operation.md, "Secret echoes"): a
//! 1 MiB response body relayed in 16 KiB chunks through the redactor, with no echo and with
//! one echo per chunk, and the same body gzip-coded and decoded first. Throughput is printed
//! per MiB, so the CPU cost per MiB is the time per iteration. Run with
//! `cargo bench -p didgate-gateway --bench echo`; figures only.

use std::hint::black_box;
use std::io::Write as _;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use didgate_gateway::config::Auth;
use didgate_gateway::echo::{Decoding, Needles, Redactor};

const KEY: &str = "sk-live-bench-0123456789abcdef0123456789ab";
const MIB: usize = 1 << 20;
const CHUNK: usize = 16 * 1024;

/// A JSON-ish 1 MiB body; with `echo`, the key once per chunk.
fn body(echo: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(MIB);
    let mut i = 0u64;
    while out.len() < MIB {
        if echo && out.len() % CHUNK < 64 && out.len() > 64 {
            out.extend_from_slice(format!("{{\"key\":\"{KEY}\"}},").as_bytes());
        }
        out.extend_from_slice(
            format!("{{\"id\":{i},\"object\":\"charge\",\"amount\":500}},").as_bytes(),
        );
        i += 1;
    }
    out.truncate(MIB);
    out
}

fn relay(needles: &Needles, body: &[u8]) -> u64 {
    let mut r = Redactor::new(needles);
    let mut n = 0;
    for chunk in body.chunks(CHUNK) {
        n += r.push(chunk).len() as u64;
    }
    n + r.finish().len() as u64
}

fn echo_benches(c: &mut Criterion) {
    let needles = Needles::new(
        KEY,
        &Auth::Basic {
            user: "acct".into(),
        },
    );
    let auth = Auth::Basic {
        user: "acct".into(),
    };
    c.bench_function("echo/build the forms of one credential (per call)", |b| {
        b.iter(|| black_box(Needles::new(black_box(KEY), &auth)))
    });
    c.bench_function(
        "echo/scan a 2 KiB response and its 10 headers (per call)",
        |b| {
            let small = &body(false)[..2048];
            let headers: Vec<Vec<u8>> = (0..10)
                .map(|i| format!("value-{i}-of-some-header; charset=utf-8").into_bytes())
                .collect();
            b.iter(|| {
                let mut values = headers.clone();
                let hits = needles.redact_all(&mut values);
                black_box(hits + relay(&needles, black_box(small)))
            })
        },
    );
    let mut g = c.benchmark_group("echo");
    g.throughput(Throughput::Bytes(MIB as u64));
    for (name, echo) in [("no echo", false), ("an echo per 16 KiB chunk", true)] {
        let b = body(echo);
        g.bench_function(
            format!(
                "scan 1 MiB in 16 KiB chunks, {name} ({} forms)",
                needles.len()
            ),
            |bench| bench.iter(|| black_box(relay(&needles, black_box(&b)))),
        );
    }
    let plain = body(true);
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(&plain).expect("gzip");
    let coded = enc.finish().expect("gzip");
    g.bench_function("gunzip and scan 1 MiB (decoded size)", |bench| {
        bench.iter(|| {
            let mut d = Decoding::for_header(Some(b"gzip")).expect("gzip");
            let mut r = Redactor::new(&needles);
            let mut n = 0;
            for chunk in coded.chunks(CHUNK) {
                n += r.push(&d.push(chunk, u64::MAX).expect("decodes")).len();
            }
            n += r.push(&d.finish().expect("complete")).len();
            black_box(n + r.finish().len())
        })
    });
    g.finish();
}

criterion_group!(benches, echo_benches);
criterion_main!(benches);

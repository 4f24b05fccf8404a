//! Criterion micro-benchmark of just-in-time secret decryption as each call does it: read the
//! sealed record from the store, unwrap its data key under the local KMS master key, open the
//! secret (AES-256-GCM-SIV). Run with `cargo bench -p didgate-gateway`; figures only.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};

fn secret_benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("gateway");
    didgate_gateway::init(&data, "127.0.0.1:0".parse().expect("addr")).expect("init");
    didgate_gateway::add_secret(&data, "bench-key", "sk-bench-0123456789abcdef").expect("add");
    let opened = didgate_gateway::admin::open_dir(&data).expect("open");
    let secrets = &opened.secrets;
    let now = didgate_gateway::now_ms();
    c.bench_function("secret/decrypt just in time (read, unwrap, open)", |b| {
        b.iter(|| {
            black_box(
                secrets
                    .open_current(black_box("bench-key"), now)
                    .expect("open"),
            )
        })
    });
}

criterion_group!(benches, secret_benches);
criterion_main!(benches);

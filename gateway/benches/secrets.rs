//! Criterion micro-benchmark of just-in-time secret decryption as each call does it: read the
//! sealed record from the store, unwrap its data key under the local KMS master key, open the
//! secret (AES-256-GCM-SIV); and one data-key unwrap under the file KMS and, when a PKCS#11
//! token is given, under a master key in the token. Run with `cargo bench -p didgate-gateway
//! --bench secrets`; figures only. The token (docs/performance.md, "The master key in a token"):
//! `SOFTHSM2_CONF` (for SoftHSM2) and `DIDGATE_BENCH_PKCS11=MODULE:TOKEN_LABEL`, the user PIN in
//! `DIDGATE_BENCH_PKCS11_PIN`; without them the token benchmark is skipped with a message.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use didgate_gateway::kms::{Kms, LocalKms};
use didgate_gateway::pkcs11::{PinSource, Token, TokenConfig};

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

/// A data key wrapped under `kms` and unwrapped, as `SealedVersion::open` does per call.
fn bench_unwrap(c: &mut Criterion, name: &str, kms: &dyn Kms) {
    let data_key = [7u8; 32];
    let aad = b"didgate kms wrap v1|bench";
    let wrapped = kms.wrap(&data_key, aad).expect("wrap");
    c.bench_function(name, |b| {
        b.iter(|| black_box(kms.unwrap(black_box(&wrapped), aad).expect("unwrap")))
    });
}

fn unwrap_benches(c: &mut Criterion) {
    bench_unwrap(c, "kms/unwrap a data key (file KMS)", &LocalKms::generate());
    let Some((module, token)) = std::env::var("DIDGATE_BENCH_PKCS11").ok().and_then(|v| {
        v.rsplit_once(':')
            .map(|(m, t)| (m.to_string(), t.to_string()))
    }) else {
        println!("SKIPPED: kms/unwrap (PKCS#11): set DIDGATE_BENCH_PKCS11=MODULE:TOKEN_LABEL");
        return;
    };
    let token = Token::new(TokenConfig {
        module: module.into(),
        token,
        key_label: "didgate-bench".into(),
        pin: PinSource::Env("DIDGATE_BENCH_PKCS11_PIN".into()),
    });
    let kms = token.generate().expect("a key in the token");
    bench_unwrap(c, "kms/unwrap a data key (PKCS#11 token, AES-GCM)", &kms);
    token.destroy(&kms.key_id()).expect("destroy");
}

criterion_group!(benches, secret_benches, unwrap_benches);
criterion_main!(benches);

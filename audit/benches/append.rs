//! Criterion micro-benchmarks of the audit chain's durable appends (each acknowledged after its
//! fsync): one entry alone, a grant consumption (the gateway's atomic batch: replay keys, client
//! head, consumed grant and the executing entry), and 64 concurrent appends sharing fsyncs
//! (group commit). Run with `cargo bench -p didgate-audit`; figures only, no assertions.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use didgate_audit::entry::{Entry, EntryKind, Role};
use didgate_audit::store::{Append, Chain, CheckpointPolicy, Claim, ClaimRule, Store};
use didgate_protocol::Identity;
use didgate_protocol::message::ChainHead;

const T0: u64 = 1_780_000_000_000;

fn chain(dir: &std::path::Path) -> Chain {
    let store = Store::open(dir, &["replay", "grants", "heads"]).expect("store");
    let owner = Arc::new(Identity::from_seed(&[0x9a; 32]));
    Chain::open(store, owner, Role::Gateway, T0, CheckpointPolicy::default()).expect("chain")
}

/// An executing entry as the gateway writes it (the signed request is about 400 bytes).
fn executing(i: u64) -> Entry {
    let mut e = Entry::new(EntryKind::Executing, T0 + i);
    e.call = Some(*blake3::hash(&i.to_be_bytes()).as_bytes());
    e.signed = Some(vec![0xa5; 400]);
    e.subject = Some("did:key:z6MkiTBz1ymuepAQ4HEHYSF1H8quG5GLVVQR3djdX3mDooWp".into());
    e.grant = Some([7; 16]);
    e.peer_head = Some(ChainHead {
        chain: [1; 32],
        seq: i,
        hash: [2; 32],
    });
    e
}

/// The claims of a pipelined call: call ID and nonce unseen, client head, grant consumed once.
fn grant_claims(i: u64) -> Vec<Claim> {
    let k = i.to_be_bytes();
    let claim = |space, prefix: &[u8], rule| Claim {
        space,
        key: [prefix, &k].concat(),
        value: k.to_vec(),
        rule,
    };
    vec![
        claim("replay", b"c", ClaimRule::Absent),
        claim("replay", b"n", ClaimRule::Absent),
        claim("heads", b"h", ClaimRule::AbsentOrEqual),
        claim("grants", b"c", ClaimRule::Absent),
    ]
}

fn append_benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let chain = chain(dir.path());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let next = Arc::new(AtomicU64::new(0));
    let mut g = c.benchmark_group("audit");
    g.sample_size(30).measurement_time(Duration::from_secs(4));
    g.bench_function("append one entry (fsync)", |b| {
        b.iter(|| {
            let i = next.fetch_add(1, Ordering::Relaxed);
            rt.block_on(chain.append_entry(executing(i)))
                .expect("append")
        })
    });
    g.bench_function("consume a grant (4 claims + entry, fsync)", |b| {
        b.iter(|| {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let append = Append {
                entry: executing(i),
                claims: grant_claims(i),
            };
            rt.block_on(chain.append(append)).expect("append")
        })
    });
    g.throughput(Throughput::Elements(64));
    g.bench_function("64 concurrent grant consumptions (group commit)", |b| {
        b.iter(|| {
            rt.block_on(async {
                let tasks: Vec<_> = (0..64)
                    .map(|_| {
                        let (chain, i) = (chain.clone(), next.fetch_add(1, Ordering::Relaxed));
                        tokio::spawn(async move {
                            chain
                                .append(Append {
                                    entry: executing(i),
                                    claims: grant_claims(i),
                                })
                                .await
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.expect("join").expect("append");
                }
            })
        })
    });
    g.finish();
    chain.close();
}

criterion_group!(benches, append_benches);
criterion_main!(benches);

//! Criterion micro-benchmark of a policy decision on the call path (`PolicySet::decide`,
//! specs/operation.md "Decisions depend on these values only"): the same caller again (the
//! decision kept per policy set), the same caller at a new time the policies do not read
//! (kept too), and a new caller every time among 2,048 (more than the 512 decisions and
//! entity sets kept: every decision is Cedar's, with its entities built). Run with
//! `cargo bench -p didgate-gateway --bench policy`; figures only.

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use didgate_gateway::policy::{Decision, PolicySet, RequestContext};
use didgate_protocol::identity::Identity;

const CALLERS: usize = 2048;

const TEXT: &str = r#"
@id("charges")
permit (principal, action == Action::"POST", resource)
when {
  resource.upstream == Upstream::"payments" &&
  resource.path like "/v1/charges*" &&
  context.body_len <= 4096 &&
  !(context.headers.contains("x-debug"))
};
@id("no-refunds")
forbid (principal, action, resource)
when { resource.path like "/v1/refunds*" };
"#;

fn context(time_ms: u64) -> RequestContext {
    RequestContext {
        time_ms,
        body_len: 120,
        headers: vec!["content-type".into(), "idempotency-key".into()],
        query: Vec::new(),
    }
}

fn decide(c: &mut Criterion) {
    let set = PolicySet::compile("bench", TEXT, &BTreeMap::new(), None).expect("valid policies");
    let callers: Vec<String> = (0..CALLERS)
        .map(|i| {
            let mut seed = [7u8; 32];
            seed[..8].copy_from_slice(&(i as u64).to_be_bytes());
            Identity::from_seed(&seed).did().to_string()
        })
        .collect();
    let allowed = |d: Decision| assert!(matches!(d, Decision::Allow { .. }), "{d:?}");
    let ctx = context(1_700_000_000_000);
    allowed(set.decide(&callers[0], "payments", "POST", "/v1/charges", &ctx));

    let mut g = c.benchmark_group("policy_decide");
    g.bench_function("same_caller_kept", |b| {
        b.iter(|| black_box(set.decide(&callers[0], "payments", "POST", "/v1/charges", &ctx)));
    });
    let mut later = context(1_700_000_000_000);
    g.bench_function("same_caller_new_time_kept", |b| {
        b.iter(|| {
            later.time_ms += 1;
            black_box(set.decide(&callers[0], "payments", "POST", "/v1/charges", &later))
        });
    });
    let mut i = 0usize;
    g.bench_function("new_caller_of_2048_evaluated", |b| {
        b.iter(|| {
            i = (i + 1) % CALLERS;
            black_box(set.decide(&callers[i], "payments", "POST", "/v1/charges", &ctx))
        });
    });
    g.finish();
    allowed(set.decide(&callers[1], "payments", "POST", "/v1/charges", &ctx));
}

criterion_group!(benches, decide);
criterion_main!(benches);

//! The `didgate-client` library as an agent embeds it: the examples in client/examples/ built
//! and run against a real gateway, reconnection after a gateway restart, typed errors that say
//! what to do.

use std::path::Path;
use std::process::Command;

use didgate_audit::entry::{Entry, EntryKind, Outcome};
use didgate_audit::{load_records, verify};
use didgate_client::{CallError, CallSpec, identity};
use didgate_protocol::message::RefusalCode;
use didgate_tests::{Harness, alice, bin};

/// An example binary, built by `cargo test --workspace` (cargo builds every example before it
/// runs tests) or `cargo build -p didgate-client --examples`.
fn example(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let path = bin("examples")?.join(name);
    anyhow::ensure!(
        path.is_file(),
        "{} is missing: build it with `cargo build -p didgate-client --examples`",
        path.display()
    );
    Ok(path)
}

fn run_example(h: &Harness, name: &str, args: &[&str]) -> anyhow::Result<(String, String)> {
    let out = Command::new(example(name)?)
        .args(args)
        .env("DIDGATE_GATEWAY", h.addr.to_string())
        .env("DIDGATE_GATEWAY_DID", h.gw_did.as_str())
        .env("DIDGATE_IDENTITY", h.dir.path().join("agent.identity"))
        .env("DIDGATE_CHAIN", h.chain_dir("agent"))
        .output()?;
    let stdout = String::from_utf8(out.stdout)?;
    let stderr = String::from_utf8(out.stderr)?;
    anyhow::ensure!(
        out.status.success(),
        "{name} {args:?}: {}\n{stdout}\n{stderr}",
        out.status
    );
    Ok((stdout, stderr))
}

fn outcomes(chain: &Path) -> anyhow::Result<Vec<Outcome>> {
    Ok(load_records(chain)?
        .entries
        .iter()
        .map(|(_, b)| Entry::decode(b))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|e| e.kind == EntryKind::Result)
        .filter_map(|e| e.outcome)
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn examples_run_against_a_real_gateway() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    // the agent's identity is alice's (policy allows her), in a 0600 file as the examples expect
    identity::create(&h.dir.path().join("agent.identity"), &alice())?;

    let (out, _) = run_example(&h, "one_shot", &["payments", "GET", "/v1/balance"])?;
    assert!(out.starts_with("status 200\n"), "{out}");
    assert!(out.contains(r#""amount":12345"#), "{out}");
    assert!(out.contains("receipt: call "), "{out}");

    let (out, _) = run_example(&h, "agent_loop", &["12"])?;
    assert!(
        out.contains("may call get_charge: GET /v1/charges/{id}"),
        "{out}"
    );
    assert!(
        out.trim_end()
            .ends_with("calls=12 receipts=12 refused=0 failed=0"),
        "{out}"
    );

    let (out, err) = run_example(&h, "streaming", &["/v1/events?n=4"])?;
    let expected: String = (0..4).map(|i| format!("data: {{\"i\":{i}}}\n\n")).collect();
    assert_eq!(out, expected);
    assert!(err.contains("receipt: "), "{err}");

    h.stop().await;
    let chain = h.chain_dir("agent");
    assert_eq!(outcomes(&chain)?, vec![Outcome::Receipt; 14]);
    let report = verify::verify(&[load_records(&h.gw_dir())?], &[load_records(&chain)?]);
    assert!(report.ok(), "{:?}", report.violations);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reconnects_after_the_gateway_restarts() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let a = h.client("alice", alice()).await?;
    let balance = || CallSpec::new("payments", "GET", "/v1/balance");
    assert_eq!(a.call(balance()).await?.status, 200);
    for _ in 0..2 {
        h.restart_same_addr().await?;
        // the same Client, no action by the caller: the next call connects again
        assert_eq!(a.call(balance()).await?.status, 200);
    }
    a.close().await;
    drop(a);
    h.stop().await;
    let chain = h.chain_dir("alice");
    assert_eq!(outcomes(&chain)?, vec![Outcome::Receipt; 3]);
    let report = verify::verify(&[load_records(&h.gw_dir())?], &[load_records(&chain)?]);
    assert!(report.ok(), "{:?}", report.violations);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_typed_and_say_what_to_do() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let a = h.client("alice", alice()).await?;
    let r = a
        .call(CallSpec::new("payments", "DELETE", "/v1/charges/ch_1"))
        .await;
    let e = r.expect_err("policy refuses DELETE");
    assert_eq!(e.refusal_code(), Some(RefusalCode::Policy));
    assert!(!e.is_retryable());
    assert!(e.advice().contains("operator"), "{}", e.advice());
    a.close().await;
    drop(a);

    // a gateway that is not there: unreachable, retryable, nothing sent
    let addr = h.addr;
    h.stop().await;
    let lost = didgate_client::Client::open(alice(), &h.chain_dir("alone"), addr, h.gw_did.clone())
        .await?;
    let e = lost
        .call(CallSpec::new("payments", "GET", "/v1/balance"))
        .await
        .expect_err("no gateway");
    assert!(matches!(e, CallError::Unreachable(_)), "{e:?}");
    assert!(e.is_retryable());
    assert!(e.advice().contains("nothing was sent"), "{}", e.advice());
    lost.close().await;
    Ok(())
}

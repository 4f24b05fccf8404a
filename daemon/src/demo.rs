//! `didgated demo`: the whole path with real parts, on loopback, with no configuration.
//!
//! Starts the local payments upstream, initialises a gateway with a sealed API key, creates two
//! client identities (one allowed to charge, one only to read), makes calls that succeed, one
//! that policy refuses and one replayed request, then stops the gateway and verifies both
//! clients' chains against the gateway's. Everything lives under one directory.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use didgate_audit::entry::{Entry, EntryKind};
use didgate_audit::{load_records, verify};
use didgate_client::low_level::{RawExchange as _, RawFinal};
use didgate_client::{CallError, CallSpec, Client};
use didgate_protocol::Identity;
use zeroize::Zeroizing;

use didgate_gateway::config::{RawConfig, RawUpstream, Rule, Settings};
use didgate_gateway::gateway::{self, Gateway};

use crate::upstream_demo::DemoUpstream;

/// What the demo found.
#[derive(Debug)]
pub struct DemoOutcome {
    /// The readable account.
    pub account: String,
    /// Whether every expectation held and the verifier found nothing.
    pub ok: bool,
}

fn step(out: &mut String, ok: &mut bool, good: bool, text: String) {
    let _ = writeln!(out, "  [{}] {text}", if good { "ok" } else { "UNEXPECTED" });
    *ok &= good;
}

/// Runs the demo in `root` (created if needed).
pub async fn run(root: &Path) -> anyhow::Result<DemoOutcome> {
    let mut out = String::new();
    let mut ok = true;
    let gw_dir = root.join("gateway");
    let up_dir = root.join("upstream");
    std::fs::create_dir_all(&up_dir)?;
    let _ = writeln!(out, "didgate demo in {}", root.display());

    // 1. The upstream: a payments API that accepts one bearer key.
    let api_key = Zeroizing::new(format!(
        "sk-live-demo-{}",
        hex::encode(rand::random::<[u8; 16]>())
    ));
    let upstream =
        DemoUpstream::start(api_key.clone(), Some(up_dir.join("requests.jsonl"))).await?;
    let _ = writeln!(
        out,
        "upstream   payments API at {} (accepts one bearer key, fingerprint {})",
        upstream.base_url(),
        DemoUpstream::fingerprint(&api_key)
    );

    // 2. Identities.
    let alice = identity(root, "alice")?;
    let bob = identity(root, "bob")?;

    // 3. The gateway: init, configuration, sealed secret.
    let gw_did = didgate_gateway::init(&gw_dir, "127.0.0.1:0".parse()?)?;
    let config = RawConfig {
        gateway: Settings {
            upstream_timeout_secs: 10,
            ..Settings::new("127.0.0.1:0".parse()?)
        },
        upstreams: vec![RawUpstream {
            test_path: Some("/v1/balance".into()),
            // the demo upstream listens on 127.0.0.1
            local: true,
            ..RawUpstream::new("payments", upstream.base_url(), "payments-key")
        }],
        groups: [("readers".to_string(), vec![bob.1.clone()])]
            .into_iter()
            .collect(),
        rules: vec![
            Rule {
                principals: vec![alice.1.clone()],
                upstream: "payments".into(),
                methods: vec!["GET".into(), "POST".into()],
                paths: vec![
                    "/v1/balance".into(),
                    "/v1/charges".into(),
                    "/v1/charges/*".into(),
                ],
            },
            Rule {
                principals: vec!["group:readers".into()],
                upstream: "payments".into(),
                methods: vec!["GET".into()],
                paths: vec!["/v1/balance".into()],
            },
        ],
        did_web: Default::default(),
        pkcs11: None,
        node: None,
        cluster: None,
    }
    .validate()?;
    std::fs::write(
        gateway::DataDir::new(&gw_dir).config(),
        toml::to_string(&config.to_raw())?,
    )?;
    let record = didgate_gateway::add_secret(&gw_dir, "payments-key", &api_key)?;
    drop(api_key);
    let gw = Arc::new(Gateway::open(&gw_dir).await?);
    let endpoint = didgate_gateway::server::endpoint(&gw, "127.0.0.1:0".parse()?)?;
    let addr = endpoint.local_addr()?;
    let _ = writeln!(out, "gateway    {gw_did} on udp {addr}");
    let _ = writeln!(
        out,
        "           secret payments-key sealed (shown as {}), policy: alice may read and charge, bob (group readers) may only read",
        record.display
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(didgate_gateway::server::serve(
        gw.clone(),
        endpoint,
        async move {
            let _ = stop_rx.await;
        },
    ));

    // 4. Calls.
    let _ = writeln!(out, "\ncalls");
    let a = Client::open(
        alice.0,
        &root.join("clients/alice/chain"),
        addr,
        gw_did.clone(),
    )
    .await?;
    let b = Client::open(bob.0, &root.join("clients/bob/chain"), addr, gw_did.clone()).await?;
    let _ = writeln!(out, "client     alice {}", a.did());
    let _ = writeln!(out, "client     bob   {}", b.did());

    let balance = a
        .call(CallSpec::new("payments", "GET", "/v1/balance"))
        .await;
    step(
        &mut out,
        &mut ok,
        matches!(&balance, Ok(r) if r.status == 200),
        format!("alice GET /v1/balance -> {}", describe(&balance)),
    );
    let charge = a
        .call(
            CallSpec::new("payments", "POST", "/v1/charges")
                .header("content-type", "application/json")
                .body(br#"{"amount":500,"currency":"usd"}"#.to_vec()),
        )
        .await;
    step(
        &mut out,
        &mut ok,
        matches!(&charge, Ok(r) if r.status == 200),
        format!("alice POST /v1/charges -> {}", describe(&charge)),
    );
    let refused = b
        .call(
            CallSpec::new("payments", "POST", "/v1/charges")
                .header("content-type", "application/json")
                .body(br#"{"amount":9900,"currency":"usd"}"#.to_vec()),
        )
        .await;
    step(
        &mut out,
        &mut ok,
        matches!(
            &refused,
            Err(CallError::Refused {
                code: didgate_protocol::message::RefusalCode::Policy,
                ..
            })
        ),
        format!("bob POST /v1/charges -> {}", describe(&refused)),
    );
    let bob_read = b
        .call(CallSpec::new("payments", "GET", "/v1/balance"))
        .await;
    step(
        &mut out,
        &mut ok,
        matches!(&bob_read, Ok(r) if r.status == 200),
        format!("bob GET /v1/balance -> {}", describe(&bob_read)),
    );

    // The replay: alice's signed charge request, captured and sent again.
    let seen_before = upstream.seen().len();
    let replay = match &charge {
        Ok(answer) => match signed_request(&a, answer.call)? {
            Some(bytes) => match a
                .send_signed(&bytes, br#"{"amount":500,"currency":"usd"}"#)
                .await
            {
                Ok(raw) => match raw.last {
                    RawFinal::Refusal(r) => {
                        format!("refused ({}): {}", r.message().code, r.message().reason)
                    }
                    _ => "EXECUTED AGAIN".into(),
                },
                Err(e) => e.to_string(),
            },
            None => "request not found in alice's chain".into(),
        },
        Err(_) => "skipped (the charge failed)".into(),
    };
    step(
        &mut out,
        &mut ok,
        replay.starts_with("refused (replay)") && upstream.seen().len() == seen_before,
        format!("replay of alice's signed charge -> {replay}; the upstream saw nothing new"),
    );

    // 5. What the upstream saw.
    let seen = upstream.seen();
    let _ = writeln!(
        out,
        "\nupstream received {} request(s) (log: {}):",
        seen.len(),
        up_dir.join("requests.jsonl").display()
    );
    for s in &seen {
        let _ = writeln!(
            out,
            "  {} {} authorized={} credential {}",
            s.method,
            s.path,
            s.authorized,
            s.credential_fingerprint.as_deref().unwrap_or("-")
        );
    }
    step(&mut out, &mut ok, seen.len() == 3 && seen.iter().all(|s| s.authorized), "every request that reached the upstream carried the injected key; none from bob's refused charge or the replay".into());

    // 6. Stop and verify.
    a.close().await;
    b.close().await;
    drop((a, b));
    let _ = stop_tx.send(());
    server.await?;
    drop(gw);
    let report = verify::verify(
        &[load_records(&gw_dir.join("store"))?],
        &[
            load_records(&root.join("clients/alice/chain"))?,
            load_records(&root.join("clients/bob/chain"))?,
        ],
    );
    let _ = writeln!(
        out,
        "\naudit (didgate-audit verify --gateway {} --client {} --client {})",
        gw_dir.display(),
        root.join("clients/alice/chain").display(),
        root.join("clients/bob/chain").display()
    );
    for c in &report.chains {
        let _ = writeln!(
            out,
            "  chain {}: {} entries, {} calls",
            short_label(root, &c.label),
            c.entries,
            c.calls
        );
    }
    let _ = writeln!(out, "  cross-links checked: {}", report.cross_links);
    for v in &report.violations {
        let _ = writeln!(out, "  VIOLATION {v}");
    }
    ok &= report.ok();
    let _ = writeln!(
        out,
        "verdict: {}",
        if report.ok() {
            "OK, both sides' chains verify against each other"
        } else {
            "FAILED"
        }
    );
    Ok(DemoOutcome { account: out, ok })
}

fn identity(root: &Path, name: &str) -> anyhow::Result<(Identity, String)> {
    let dir: PathBuf = root.join("clients").join(name);
    let id = Identity::generate();
    didgate_client::identity::create(&dir.join("identity"), &id)?;
    let did = id.did().to_string();
    Ok((id, did))
}

fn signed_request(client: &Client, call: [u8; 32]) -> anyhow::Result<Option<Vec<u8>>> {
    for item in client.chain().store().entries() {
        let (_, bytes) = item?;
        let e = Entry::decode(&bytes)?;
        if e.kind == EntryKind::Request && e.call == Some(call) {
            return Ok(e.signed);
        }
    }
    Ok(None)
}

fn short_label(root: &Path, label: &str) -> String {
    label
        .strip_prefix(&format!("{}/", root.display()))
        .unwrap_or(label)
        .to_string()
}

fn describe(r: &Result<didgate_client::Answer, CallError>) -> String {
    match r {
        Ok(a) => format!(
            "{} {} (receipt: gateway entry {})",
            a.status,
            String::from_utf8_lossy(&a.body),
            a.receipt.entry.seq
        ),
        Err(e) => e.to_string(),
    }
}

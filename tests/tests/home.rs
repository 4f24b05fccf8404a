//! One home, many tools (`didgate_client::local`): while a `didgate proxy` holds a home's
//! chain, `didgate call`, `didgate mcp` (driven by the official MCP Python SDK) and `didgate
//! export` of the same home work at the same time, through the proxy, and every call lands in
//! the one chain, which `didgate-audit verify` accepts with the gateway's; killing the owner
//! mid-call gives the caller a typed error (owner lost, outcome unknown), never a hang, and the
//! next call takes the chain over; a process the owner cannot serve (another gateway) records in
//! a fallback chain of the home, which the auditor reads with it.
//!
//! Every wait is bounded by a deadline and polls an observable condition.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use didgate_audit::entry::{EntryKind, Outcome};
use didgate_audit::load_records;
use didgate_tests::{
    Harness, ProxyProcess, alice_home, bin, entries_in, python_with, results_in as results,
};
use serde_json::Value;
use tokio::process::Command;

/// Longest any one step may take (never reached when things work).
const DEADLINE: Duration = Duration::from_secs(120);

/// The MCP script.
const MCP_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/sdk/mcp_call.py");

/// `didgate --home HOME ARGS...` as a process, its output once it ends (bounded).
async fn didgate(home: &Path, args: &[&str]) -> anyhow::Result<Output> {
    let child = Command::new(bin("didgate")?)
        .arg("--home")
        .arg(home)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(DEADLINE, child)
        .await
        .map_err(|_| anyhow::anyhow!("didgate {args:?} did not end within {DEADLINE:?}"))?
        .map_err(Into::into)
}

/// The one JSON object a `--json` command printed.
fn json_of(out: &Output) -> anyhow::Result<Value> {
    serde_json::from_slice(&out.stdout).map_err(|e| {
        anyhow::anyhow!(
            "not one JSON object: {e}: stdout {:?}, stderr {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// `didgate-audit --json verify --gateway G... --client C...`: exit status and report.
fn audit_verify(gateways: &[&Path], clients: &[&Path]) -> anyhow::Result<(Option<i32>, Value)> {
    let mut cmd = std::process::Command::new(bin("didgate-audit")?);
    cmd.args(["verify", "--json"]);
    for g in gateways {
        cmd.arg("--gateway").arg(g);
    }
    for c in clients {
        cmd.arg("--client").arg(c);
    }
    let out = cmd.output()?;
    Ok((out.status.code(), json_of(&out)?))
}

/// The outcomes of the calls recorded in the chain at `dir`, in order.
fn outcomes(dir: &Path) -> anyhow::Result<Vec<Outcome>> {
    Ok(results(dir)?.into_iter().filter_map(|(o, _)| o).collect())
}

/// The requests recorded in the chain at `dir`.
fn requests(dir: &Path) -> anyhow::Result<usize> {
    Ok(entries_in(dir)?
        .iter()
        .filter(|e| e.kind == EntryKind::Request)
        .count())
}

/// One MCP session through the SDK (`None` when the SDK is not installed; it prints SKIPPED,
/// and fails under CI).
async fn mcp_session(home: &Path) -> anyhow::Result<Option<Value>> {
    let Some(python) = python_with("mcp")? else {
        return Ok(None);
    };
    let child = Command::new(python)
        .arg(MCP_SCRIPT)
        .arg(bin("didgate")?)
        .arg(home)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(DEADLINE, child)
        .await
        .map_err(|_| anyhow::anyhow!("the MCP script did not end"))??;
    anyhow::ensure!(out.status.success(), "MCP script: {out:?}");
    Ok(Some(serde_json::from_slice(&out.stdout)?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tool_of_one_home_works_while_a_proxy_runs() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let home = alice_home(&h)?;
    let proxy = ProxyProcess::start(&home).await?;
    let socket = home.join("chain.sock");
    let mode = std::fs::metadata(&socket)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the owner's socket is private");

    let export = h.dir.path().join("mid-run.cbor");
    let export_arg = export.to_string_lossy().into_owned();
    let http = async {
        didgate_client::low_level::tls::install_provider();
        let resp = reqwest::Client::builder()
            .no_proxy()
            .build()?
            .get(format!("{}/payments/v1/balance", proxy.url))
            .bearer_auth(&proxy.token)
            .send()
            .await?;
        // read to the end: a caller that drops the body leaves the outcome unknown
        anyhow::Ok((resp.status().as_u16(), resp.text().await?))
    };
    let export_args = ["--json", "export", "--out", &export_arg];
    let (call, exported, mcp, http) = tokio::join!(
        didgate(&home, &["--json", "call", "payments", "GET", "/v1/balance"]),
        didgate(&home, &export_args),
        mcp_session(&home),
        http,
    );

    // the CLI call went through the proxy's process and answered
    let call = call?;
    assert_eq!(call.status.code(), Some(0), "{call:?}");
    let answer = json_of(&call)?;
    assert_eq!(answer["status"], 200, "{answer}");
    assert_eq!(answer["body"]["available"][0]["amount"], 12345, "{answer}");
    // the export was written by the owner, sealed
    let exported = exported?;
    assert_eq!(exported.status.code(), Some(0), "{exported:?}");
    let exported = json_of(&exported)?;
    assert_eq!(exported["sealed"], true, "{exported}");
    assert!(exported["entries"].as_u64().is_some_and(|n| n >= 1));
    assert_eq!(exported["other_chains"], serde_json::json!([]));
    // the SDK's session listed the tools and called one
    let mcp = mcp?;
    if let Some(mcp) = &mcp {
        assert!(
            mcp["tools"]
                .as_array()
                .is_some_and(|t| t.iter().any(|n| n == "payments__get_balance")),
            "{mcp}"
        );
        assert_eq!(mcp["balance"]["isError"], false, "{mcp}");
        assert_eq!(mcp["balance"]["structuredContent"]["status"], 200, "{mcp}");
    }
    // the proxy's own caller
    let (status, body) = http?;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("12345"), "{body}");

    proxy.stop().await?;
    assert!(!socket.exists(), "a stopped owner removes its socket");
    assert!(
        !home.join("chains").exists(),
        "nobody needed a chain of its own"
    );
    h.stop().await;

    // one chain holds every call, each with its receipt
    let calls = 2 + usize::from(mcp.is_some());
    let chain = home.join("chain");
    assert_eq!(
        outcomes(&chain)?,
        vec![Outcome::Receipt; calls],
        "{:?}",
        results(&chain)?
    );
    let gw = h.gw_dir();
    let (code, report) = audit_verify(&[&gw], &[&home])?;
    assert_eq!(code, Some(0), "{report:#}");
    // the export made mid-run is a prefix of that chain (a gateway log that went on after it
    // is checked against the whole chain)
    let prefix = load_records(&export)?.entries;
    let whole = load_records(&chain)?.entries;
    assert!(!prefix.is_empty() && prefix.len() <= whole.len());
    assert_eq!(prefix[..], whole[..prefix.len()]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_owner_mid_call_is_a_typed_error_and_the_next_call_takes_over()
-> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let home = alice_home(&h)?;
    let proxy = ProxyProcess::start(&home).await?;
    let owner = proxy.pid()?;

    // a call through the proxy's process that the upstream holds until released
    let home2 = home.clone();
    let held = tokio::spawn(async move {
        didgate(
            &home2,
            &["--json", "call", "payments", "GET", "/v1/slow-head"],
        )
        .await
    });
    let deadline = Instant::now() + DEADLINE;
    while !h.upstream.seen().iter().any(|r| r.path == "/v1/slow-head") {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the held call never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    proxy.kill().await?;

    // the caller learns it at once: owner lost, outcome unknown, exit 4
    let out = tokio::time::timeout(DEADLINE, held)
        .await
        .map_err(|_| anyhow::anyhow!("the caller hangs after its owner died"))???;
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let error = json_of(&out)?;
    assert_eq!(error["kind"], "owner_lost", "{error}");
    assert_eq!(error["owner_pid"], owner, "{error}");
    assert!(
        error["error"]
            .as_str()
            .is_some_and(|e| e.contains("outcome unknown")),
        "{error}"
    );
    h.upstream.release_slow(1);

    // the next call of the home opens the chain itself (the lock died with the owner)
    let out = didgate(&home, &["--json", "call", "payments", "GET", "/v1/balance"]).await?;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(!home.join("chains").exists());
    h.stop().await;

    // the killed owner recorded the held call as sent; the next process to open the chain
    // closed it as unknown before its own call, which has its receipt; the auditor accepts the
    // chain with the gateway's
    let chain = home.join("chain");
    assert_eq!(requests(&chain)?, 2);
    let results = results(&chain)?;
    assert_eq!(results.len(), 2, "{results:?}");
    assert_eq!(results[0].0, Some(Outcome::Unknown), "{results:?}");
    assert!(
        results[0]
            .1
            .as_deref()
            .is_some_and(|d| d.contains("ended before its answer")),
        "{results:?}"
    );
    assert_eq!(results[1].0, Some(Outcome::Receipt), "{results:?}");
    let (code, report) = audit_verify(&[&h.gw_dir()], &[&home])?;
    assert_eq!(code, Some(0), "{report:#}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_the_owner_cannot_serve_records_in_a_fallback_chain_the_auditor_reads()
-> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let mut other = Harness::start().await?;
    let home = alice_home(&h)?;
    let proxy = ProxyProcess::start(&home).await?;

    // the proxy calls gateway 1; this call is for gateway 2: not the owner's to make
    let (addr, did) = (other.addr.to_string(), other.gw_did.to_string());
    let out = didgate(
        &home,
        &[
            "--json",
            "call",
            "--gateway",
            &addr,
            "--gateway-did",
            &did,
            "payments",
            "GET",
            "/v1/balance",
        ],
    )
    .await?;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("chains/1") && stderr.contains("didgate-audit verify --client"),
        "{stderr}"
    );
    let fallback = home.join("chains").join("1");
    assert_eq!(outcomes(&fallback)?, [Outcome::Receipt]);

    proxy.stop().await?;
    h.stop().await;
    other.stop().await;
    // the home's chain is empty of calls; the fallback chain is read with it
    let (code, report) = audit_verify(&[&h.gw_dir(), &other.gw_dir()], &[&home])?;
    assert_eq!(code, Some(0), "{report:#}");
    // without the fallback chain, the second gateway's call has no client side
    let (code, report) = audit_verify(&[&h.gw_dir(), &other.gw_dir()], &[&home.join("chain")])?;
    assert_ne!(code, Some(0), "{report:#}");
    Ok(())
}

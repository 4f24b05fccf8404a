//! `didgate`'s errors as a process (issue 17): with `--json` every exit path prints exactly one
//! JSON object with `error` and `exit`; a gateway that is down costs only `--connect-timeout`
//! and names its address; a gateway presenting another DID than the pinned one is its own
//! error (both DIDs, exit 5); a refusal carries its call ID; `didgate catalog` lists what the
//! caller may call; `call --json` returns a JSON body parsed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use didgate_audit::entry::{EntryKind, Outcome};
use didgate_protocol::Identity;
use didgate_tests::{Harness, bin, gateway_entries_in, payments_operations, seed_file};

/// A `didgate` that runs longer than this is hung (a hang detector, not a timing assertion).
const HANG: Duration = Duration::from_secs(30);

/// Runs `didgate --home HOME ARGS...` to the end, off the async runtime (the gateway under
/// test runs on it), killing it if it hangs.
async fn didgate(home: &Path, args: &[&str]) -> anyhow::Result<Output> {
    let mut command = Command::new(bin("didgate")?);
    command
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("DIDGATE_HOME")
        .env_remove("DIDGATE_AS")
        .env("DIDGATE_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    tokio::task::spawn_blocking(move || -> anyhow::Result<Output> {
        let mut child = command.spawn()?;
        let deadline = Instant::now() + HANG;
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                child.kill()?;
                let out = child.wait_with_output()?;
                anyhow::bail!(
                    "didgate hung for {HANG:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(child.wait_with_output()?)
    })
    .await?
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Stdout as exactly one JSON value (and nothing else but whitespace).
fn one_json(out: &Output) -> anyhow::Result<serde_json::Value> {
    let text = String::from_utf8(out.stdout.clone())?;
    let values: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&text)
        .into_iter()
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("stdout is not JSON ({e}): {text:?}"))?;
    anyhow::ensure!(
        values.len() == 1,
        "expected one JSON value on stdout, got {}: {text:?} (stderr: {})",
        values.len(),
        stderr(out)
    );
    Ok(values.into_iter().next().unwrap_or_default())
}

/// Stdout as one JSON object with `error` (a non-empty string) and `exit` equal to the exit
/// status; returns it.
fn error_object(out: &Output, exit: i32) -> anyhow::Result<serde_json::Value> {
    assert_eq!(out.status.code(), Some(exit), "stderr: {}", stderr(out));
    let v = one_json(out)?;
    assert!(v.is_object(), "{v}");
    assert!(
        v["error"].as_str().is_some_and(|e| !e.is_empty()),
        "no error: {v}"
    );
    assert_eq!(v["exit"], exit, "{v}");
    Ok(v)
}

/// A home with alice's identity (policy allows her GET and POST on /v1/**), pinned to
/// `addr` and `gateway_did` if given.
async fn alice_home(root: &Path, pin: Option<(&str, &str)>) -> anyhow::Result<PathBuf> {
    let home = root.join("home");
    let seed = seed_file(&root.join("seeds"), &[0xa1; 32])?;
    let out = didgate(&home, &["keygen", "--seed-file", &seed]).await?;
    assert!(out.status.success(), "{}", stderr(&out));
    if let Some((addr, did)) = pin {
        let out = didgate(&home, &["pin", "--gateway", addr, "--gateway-did", did]).await?;
        assert!(out.status.success(), "{}", stderr(&out));
    }
    Ok(home)
}

/// A UDP port on loopback that nothing listens on (bound, then released).
fn closed_udp_port() -> anyhow::Result<std::net::SocketAddr> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    Ok(socket.local_addr()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_is_down_is_unreachable_named_and_bounded() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let home = alice_home(dir.path(), None).await?;
    let addr = closed_udp_port()?.to_string();
    let did = Identity::from_seed(&[0x6d; 32]).did().to_string();
    let call = [
        "call",
        "payments",
        "GET",
        "/v1/balance",
        "--gateway",
        &addr,
        "--gateway-did",
        &did,
    ];

    let mut args = vec!["--json", "--connect-timeout", "1"];
    args.extend(call);
    let out = didgate(&home, &args).await?;
    let v = error_object(&out, 4)?;
    assert_eq!(v["kind"], "unreachable", "{v}");
    assert_eq!(v["gateway"], addr.as_str(), "{v}");
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains(&addr)),
        "{v}"
    );
    assert!(v["advice"].as_str().is_some_and(|a| !a.is_empty()), "{v}");
    assert!(
        stderr(&out).contains(&addr),
        "the address is logged: {}",
        stderr(&out)
    );

    // the same in text: the address and what to do, on stderr; nothing on stdout
    let mut args = vec!["--connect-timeout", "0.5"];
    args.extend(call);
    let out = didgate(&home, &args).await?;
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
    let text = stderr(&out);
    assert!(
        text.contains("gateway unreachable") && text.contains(&addr),
        "{text}"
    );

    // the catalog, through the same connection code
    let out = didgate(
        &home,
        &[
            "--json",
            "--connect-timeout",
            "1",
            "catalog",
            "--gateway",
            &addr,
            "--gateway-did",
            &did,
        ],
    )
    .await?;
    assert_eq!(error_object(&out, 4)?["kind"], "unreachable");

    // a timeout that is not one: a usage error, as JSON too
    for bad in ["0", "-1", "soon", "1e9", "NaN"] {
        let flag = format!("--connect-timeout={bad}");
        let mut args = vec!["--json", flag.as_str()];
        args.extend(call);
        let out = didgate(&home, &args).await?;
        let v = error_object(&out, 2)?;
        assert!(
            v["error"]
                .as_str()
                .is_some_and(|e| e.contains("connect-timeout")),
            "{bad}: {v}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_exit_path_prints_one_json_object() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let home = dir.path().join("empty-home");
    // usage errors clap finds, and ones the command finds
    for args in [
        vec!["--json", "call", "payments"],
        vec!["--json", "no-such-command"],
        vec!["--json"],
        vec!["--json", "whoami"],
        vec!["--json", "catalog"],
        vec!["--json", "call", "payments", "GET", "/v1/balance"],
        vec![
            "--json",
            "pin",
            "--gateway",
            "nowhere",
            "--gateway-did",
            "x",
        ],
    ] {
        let out = didgate(&home, &args).await?;
        let v = error_object(&out, 2).map_err(|e| anyhow::anyhow!("{args:?}: {e}"))?;
        assert!(v.get("kind").is_none(), "not a call error: {v}");
    }
    // help and version are not errors
    let out = didgate(&home, &["--help"]).await?;
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("--connect-timeout") && help.contains("5  the gateway at the address"),
        "{help}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pin_names_both_dids_and_has_its_own_exit() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let addr = h.addr.to_string();
    let pinned = Identity::from_seed(&[0x70; 32]).did().to_string();
    let home = alice_home(h.dir.path(), Some((&addr, &pinned))).await?;
    let presented = h.gw_did.to_string();

    let out = didgate(&home, &["--json", "call", "payments", "GET", "/v1/balance"]).await?;
    let v = error_object(&out, 5)?;
    assert_eq!(v["kind"], "wrong_gateway", "{v}");
    assert_eq!(v["gateway"], addr.as_str(), "{v}");
    assert_eq!(v["presented"], presented.as_str(), "{v}");
    assert_eq!(v["pinned"], pinned.as_str(), "{v}");
    let error = v["error"].as_str().unwrap_or_default();
    assert_eq!(
        error,
        format!("the gateway at {addr} presented DID {presented}, not the pinned DID {pinned}")
    );
    assert!(!error.contains("ApplicationVerificationFailure"), "{error}");

    // in text, on stderr, with what to do
    let out = didgate(&home, &["call", "payments", "GET", "/v1/balance"]).await?;
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(
        text.contains(&presented) && text.contains(&pinned) && text.contains(&addr),
        "{text}"
    );
    assert!(text.contains("didgate pin"), "advice: {text}");

    // the catalog too
    let out = didgate(&home, &["--json", "catalog"]).await?;
    assert_eq!(error_object(&out, 5)?["presented"], presented.as_str());

    // nothing reached the upstream
    assert!(h.upstream.seen().is_empty());
    h.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_in_json_carries_its_call_and_exit() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let (addr, gw) = (h.addr.to_string(), h.gw_did.to_string());
    let home = alice_home(h.dir.path(), Some((&addr, &gw))).await?;

    // alice may not DELETE
    let out = didgate(
        &home,
        &["--json", "call", "payments", "DELETE", "/v1/charges/ch_1"],
    )
    .await?;
    let v = error_object(&out, 3)?;
    assert_eq!(v["kind"], "refused", "{v}");
    assert_eq!(v["refused"], "policy", "{v}");
    assert!(v["reason"].as_str().is_some(), "{v}");
    assert!(v["advice"].as_str().is_some(), "{v}");
    let call = v["call"].as_str().unwrap_or_default().to_string();
    assert!(
        call.len() == 64 && call.bytes().all(|b| b.is_ascii_hexdigit()),
        "a call ID in hex: {v}"
    );

    // the text form names the call too
    let out = didgate(&home, &["call", "payments", "DELETE", "/v1/charges/ch_2"]).await?;
    assert_eq!(out.status.code(), Some(3));
    let text = stderr(&out);
    assert!(
        text.contains("refused (policy)") && text.contains("(call "),
        "{text}"
    );

    h.stop().await;
    // the call ID is the one the client's chain recorded the refusal for
    let call = hex::decode(&call)?;
    let refused = gateway_entries_in(&home.join("chain"))?
        .into_iter()
        .filter(|e| e.call.is_some_and(|c| c[..] == call[..]))
        .any(|e| e.kind == EntryKind::Result && e.outcome == Some(Outcome::Refusal));
    assert!(refused, "the client chain records the refusal of that call");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_lists_what_the_caller_may_call() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let (addr, gw) = (h.addr.to_string(), h.gw_did.to_string());
    let home = alice_home(h.dir.path(), Some((&addr, &gw))).await?;
    // alice may GET and POST /v1/**, not DELETE
    let allowed: Vec<_> = payments_operations()
        .into_iter()
        .filter(|o| o.method != "DELETE")
        .collect();
    assert_eq!(allowed.len(), 3);

    let out = didgate(&home, &["catalog"]).await?;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout)?;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), allowed.len(), "{text}");
    for (line, op) in lines.iter().zip(&allowed) {
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            words[..4],
            [
                "payments",
                op.name.as_str(),
                op.method.as_str(),
                op.path.as_str()
            ],
            "{line}"
        );
        assert!(line.ends_with(&op.description), "{line}");
    }
    assert!(!text.contains("refund_charge"), "{text}");

    for args in [
        vec!["--json", "catalog"],
        vec!["--json", "catalog", "--upstream", "payments"],
    ] {
        let out = didgate(&home, &args).await?;
        assert!(out.status.success(), "{}", stderr(&out));
        let v = one_json(&out)?;
        let listed = v["operations"]
            .as_array()
            .ok_or_else(|| anyhow::anyhow!("no operations array: {v}"))?;
        assert_eq!(listed.len(), allowed.len(), "{v}");
        for (o, op) in listed.iter().zip(&allowed) {
            assert_eq!(o["upstream"], "payments", "{o}");
            assert_eq!(o["name"], op.name.as_str(), "{o}");
            assert_eq!(o["method"], op.method.as_str(), "{o}");
            assert_eq!(o["path"], op.path.as_str(), "{o}");
            assert_eq!(o["description"], op.description.as_str(), "{o}");
        }
    }
    let out = didgate(&home, &["--json", "catalog", "--upstream", "nowhere"]).await?;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(one_json(&out)?, serde_json::json!({"operations": []}));

    // asking is not a call: nothing reached the upstream
    assert!(h.upstream.seen().is_empty());
    h.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_json_parses_a_json_body_and_keeps_text_otherwise() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let (addr, gw) = (h.addr.to_string(), h.gw_did.to_string());
    let home = alice_home(h.dir.path(), Some((&addr, &gw))).await?;

    let out = didgate(
        &home,
        &[
            "--json",
            "call",
            "payments",
            "POST",
            "/v1/charges",
            "--data",
            r#"{"amount":700,"currency":"usd"}"#,
            "--header",
            "content-type: application/json",
        ],
    )
    .await?;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v = one_json(&out)?;
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(v["exit"], 0, "{v}");
    assert_eq!(v["body"]["amount"], 700, "the body, parsed: {v}");
    assert_eq!(v["body"]["currency"], "usd", "{v}");
    assert!(v.get("body_text").is_none(), "{v}");
    assert!(v.get("error").is_none(), "{v}");
    assert!(v["call"].as_str().is_some_and(|c| c.len() == 64), "{v}");
    assert!(v["receipt_entry"].is_u64(), "{v}");

    // not JSON (server-sent events): the text, as before, and as body_text
    let out = didgate(
        &home,
        &["--json", "call", "payments", "GET", "/v1/events?n=2"],
    )
    .await?;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v = one_json(&out)?;
    let text = v["body_text"].as_str().unwrap_or_default();
    assert!(text.starts_with("data: "), "{v}");
    assert_eq!(v["body"], text, "{v}");

    // an HTTP error: exit 1, with error and exit, the upstream's JSON body parsed
    let out = didgate(&home, &["--json", "call", "payments", "GET", "/v1/nothing"]).await?;
    let v = error_object(&out, 1)?;
    assert_eq!(v["status"], 404, "{v}");
    assert_eq!(v["body"]["error"], "not_found", "{v}");
    h.stop().await;
    Ok(())
}

/// `didgate mcp`'s stdout is the JSON-RPC channel: `--json` is refused on stderr (nothing on
/// stdout, exit 2), and its help gives its own exit statuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_keeps_stdout_for_json_rpc() -> anyhow::Result<()> {
    let home = tempfile::tempdir()?;
    let out = didgate(home.path(), &["--json", "mcp"]).await?;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        out.stdout.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr(&out).contains("--json does not apply"),
        "{}",
        stderr(&out)
    );
    let out = didgate(home.path(), &["mcp", "--help"]).await?;
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("JSON-RPC only"), "{help}");
    assert!(!help.contains("3  the gateway refused the call"), "{help}");
    Ok(())
}

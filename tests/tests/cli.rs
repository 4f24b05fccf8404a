//! The `didgate` CLI as a process against a real gateway and upstream.

use std::path::Path;
use std::process::Command;

use didgate_tests::{CANARY, Harness, bin};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keygen_whoami_call_and_refusal() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let home = h.dir.path().join("home");
    let didgate = bin("didgate")?;
    let run = |args: &[&str]| {
        Command::new(&didgate)
            .arg("--home")
            .arg(&home)
            .args(args)
            .output()
    };
    // alice's seed, so policy allows the calls; on stdin, never on the command line
    let did = keygen_reads_its_seed_from_stdin_only(&didgate, &home)?;
    let out = run(&["whoami"])?;
    assert_eq!(String::from_utf8(out.stdout)?, format!("{did}\n"));

    let addr = h.addr.to_string();
    let gw = h.gw_did.to_string();
    let out = run(&["pin", "--gateway", &addr, "--gateway-did", &gw])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&[
        "call",
        "payments",
        "POST",
        "/v1/charges",
        "--data",
        r#"{"amount":700,"currency":"usd"}"#,
        "--header",
        "content-type: application/json",
    ])?;
    let body = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{body} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(body.contains(r#""amount":700"#), "{body}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("200"));
    assert!(!body.contains(CANARY) && !String::from_utf8_lossy(&out.stderr).contains(CANARY));

    // refused: exit 3 with the gateway's reason
    let out = run(&["call", "payments", "DELETE", "/v1/charges/ch_1"])?;
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("policy"));
    // a usage error: exit 2
    assert_eq!(run(&["call", "payments"])?.status.code(), Some(2));

    h.stop().await;
    // the developer's own chain verifies against the gateway's, given as the chain store or
    // as the home that holds it (issue 17, item 2)
    for client in [home.join("chain"), home.clone()] {
        let out = Command::new(bin("didgate-audit")?)
            .arg("verify")
            .arg("--gateway")
            .arg(h.gw_dir())
            .arg("--client")
            .arg(&client)
            .output()?;
        assert!(
            out.status.success(),
            "{}: {}",
            client.display(),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert_eq!(h.upstream.seen().len(), 1);

    // exports from both binaries verify against each other, without either store
    exports_verify_against_each_other(&h, &didgate, &home)
}

/// `didgate keygen` refuses a seed on argv, reads it from stdin (`--seed-file -`) and never
/// overwrites a key; returns the DID it printed (alice's).
fn keygen_reads_its_seed_from_stdin_only(didgate: &Path, home: &Path) -> anyhow::Result<String> {
    let run = |args: &[&str]| {
        Command::new(didgate)
            .arg("--home")
            .arg(home)
            .args(args)
            .output()
    };
    let seed = hex::encode([0xa1u8; 32]);
    let gone = run(&["keygen", "--seed-hex", &seed])?;
    assert_eq!(gone.status.code(), Some(2), "no seed on argv");
    let mut keygen = Command::new(didgate)
        .arg("--home")
        .arg(home)
        .args(["keygen", "--seed-file", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(
        &mut keygen
            .stdin
            .take()
            .ok_or_else(|| anyhow::anyhow!("stdin"))?,
        format!("{seed}\n").as_bytes(),
    )?;
    let out = keygen.wait_with_output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let did = String::from_utf8(out.stdout)?.trim().to_string();
    assert_eq!(did, didgate_tests::alice().did().to_string());
    assert_eq!(
        run(&["keygen"])?.status.code(),
        Some(2),
        "keygen never overwrites"
    );
    Ok(did)
}

/// The exports of `didgate export` and `didgated export` verify against each other with
/// `didgate-audit verify`; a truncated export is a clear error, exit 2.
fn exports_verify_against_each_other(
    h: &Harness,
    didgate: &Path,
    home: &Path,
) -> anyhow::Result<()> {
    let client_export = h.dir.path().join("client.cbor");
    let gw_export = h.dir.path().join("gateway.cbor");
    let out = Command::new(didgate)
        .arg("--home")
        .arg(home)
        .arg("export")
        .arg("--out")
        .arg(&client_export)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(bin("didgated")?)
        .arg("export")
        .arg("--data")
        .arg(h.gw_dir())
        .arg("--out")
        .arg(&gw_export)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(bin("didgate-audit")?)
        .arg("verify")
        .arg("--gateway")
        .arg(&gw_export)
        .arg("--client")
        .arg(&client_export)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // a truncated export is a clear error, exit 2
    let bytes = std::fs::read(&gw_export)?;
    std::fs::write(&gw_export, &bytes[..bytes.len() / 2])?;
    let out = Command::new(bin("didgate-audit")?)
        .arg("verify")
        .arg("--gateway")
        .arg(&gw_export)
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("truncated"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

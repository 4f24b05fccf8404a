//! Identity files and `--json` through the `didgate` binary: passphrase-sealed identities
//! (passphrase from DIDGATE_PASSPHRASE, never argv), mode 0600 enforced, keygen never
//! overwrites, and every command's `--json` output is one JSON object on stdout.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use didgate_tests::{Harness, bin};

fn didgate(home: &Path, pass: Option<&str>, args: &[&str]) -> anyhow::Result<Output> {
    let mut cmd = Command::new(bin("didgate")?);
    cmd.arg("--home").arg(home).args(args);
    cmd.env_remove("DIDGATE_PASSPHRASE");
    if let Some(p) = pass {
        cmd.env("DIDGATE_PASSPHRASE", p);
    }
    Ok(cmd.output()?)
}

fn json(out: &Output) -> anyhow::Result<serde_json::Value> {
    let text = String::from_utf8(out.stdout.clone())?;
    let mut lines = text.lines();
    let v = serde_json::from_str(lines.next().unwrap_or_default())
        .map_err(|e| anyhow::anyhow!("not JSON: {text:?}: {e}"))?;
    anyhow::ensure!(lines.next().is_none(), "more than one line: {text:?}");
    Ok(v)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_identity_needs_its_passphrase_and_calls_work() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let home = h.dir.path().join("home");
    let seed = hex::encode([0xa1u8; 32]);
    let pass = Some("a long passphrase");

    let out = didgate(
        &home,
        pass,
        &[
            "--json",
            "keygen",
            "--encrypt",
            "--seed-file",
            &didgate_tests::seed_file(h.dir.path(), &[0xa1u8; 32])?,
        ],
    )?;
    assert!(out.status.success(), "{}", stderr(&out));
    let did = json(&out)?["did"].as_str().unwrap_or_default().to_string();
    assert_eq!(did, didgate_tests::alice().did().to_string());
    let file = std::fs::read_to_string(home.join("identity"))?;
    assert!(!file.contains(&seed), "the seed is sealed");
    let mode = std::fs::metadata(home.join("identity"))?
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    // no passphrase and no terminal: a clear error, exit 2
    let out = didgate(&home, None, &["whoami"])?;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("DIDGATE_PASSPHRASE"),
        "{}",
        stderr(&out)
    );
    let out = didgate(&home, Some("wrong"), &["whoami"])?;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("wrong passphrase"),
        "{}",
        stderr(&out)
    );
    let out = didgate(&home, pass, &["whoami"])?;
    assert_eq!(String::from_utf8(out.stdout)?.trim(), did);

    // keygen never overwrites, sealed or not; the file is unchanged
    for args in [vec!["keygen"], vec!["keygen", "--encrypt"]] {
        let out = didgate(&home, pass, &args)?;
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            stderr(&out).contains("refusing to overwrite"),
            "{}",
            stderr(&out)
        );
    }
    assert_eq!(std::fs::read_to_string(home.join("identity"))?, file);

    // a sealed identity signs calls like any other
    let out = didgate(
        &home,
        pass,
        &[
            "pin",
            "--gateway",
            &h.addr.to_string(),
            "--gateway-did",
            h.gw_did.as_str(),
        ],
    )?;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = didgate(&home, pass, &["call", "payments", "GET", "/v1/balance"])?;
    assert!(out.status.success(), "{}", stderr(&out));

    // group- or world-readable: refused with the fix in the message
    std::fs::set_permissions(
        home.join("identity"),
        std::fs::Permissions::from_mode(0o644),
    )?;
    let out = didgate(&home, pass, &["whoami"])?;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("chmod 600"), "{}", stderr(&out));
    h.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_prints_json() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let home = h.dir.path().join("home");
    let seed = hex::encode([0xa1u8; 32]);
    let run = |args: &[&str]| -> anyhow::Result<serde_json::Value> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = didgate(&home, None, &all)?;
        json(&out)
    };
    let seed_path = didgate_tests::seed_file(h.dir.path(), &[0xa1u8; 32])?;
    assert!(run(&["keygen", "--seed-file", &seed_path])?["did"].is_string());
    // a bad seed file: a JSON error that does not echo what it read
    std::fs::write(&seed_path, "not-a-seed-but-secret-text")?;
    let other = h.dir.path().join("other-home");
    let out = didgate(
        &other,
        None,
        &["--json", "keygen", "--seed-file", &seed_path],
    )?;
    assert_eq!(out.status.code(), Some(2));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("secret-text"));
    let _ = &seed;
    assert!(run(&["whoami"])?["did"].is_string());
    let pinned = run(&[
        "pin",
        "--gateway",
        &h.addr.to_string(),
        "--gateway-did",
        h.gw_did.as_str(),
    ])?;
    assert_eq!(pinned["gateway_did"], h.gw_did.as_str());
    let call = run(&["call", "payments", "GET", "/v1/balance"])?;
    assert_eq!(call["status"], 200);
    let refused = run(&["call", "payments", "DELETE", "/v1/charges/ch_1"])?;
    assert_eq!(refused["refused"], "policy");
    assert!(run(&["env", "payments"])?["PAYMENTS_BASE_URL"].is_string());
    let out = h.dir.path().join("alice.cbor");
    let exported = run(&["export", "--out", out.to_str().unwrap_or_default()])?;
    assert!(exported["entries"].as_u64().is_some_and(|n| n >= 4));
    // an error is JSON too, with the exit status
    let error = run(&["keygen"])?;
    assert!(
        error["error"]
            .as_str()
            .is_some_and(|e| e.contains("refusing to overwrite"))
    );
    assert_eq!(error["exit"], 2);
    h.stop().await;
    Ok(())
}

//! `didgated` operator commands as processes (issue 17): `policy check --data` names the
//! groups, upstreams and operations gateway.toml lacks; the daemon's log has no colour codes
//! when stderr is a file; `secret add` and `secret list` show no more of a key than the display
//! form of specs/operation.md "Secrets at rest".

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use didgate_gateway::config::{OperationConfig, RawConfig, RawUpstream};
use didgate_tests::{alice, bin, bob};

/// Runs `didgated ARGS` (no master key or data directory from the environment), with `stdin`
/// written to its standard input.
fn didgated(args: &[&str], data: Option<&Path>, stdin: Option<&str>) -> anyhow::Result<Output> {
    let mut cmd = Command::new(bin("didgated")?);
    cmd.args(args)
        .env_remove(didgate_gateway::kms::MASTER_KEY_ENV)
        .env_remove("DIDGATE_DATA")
        .env_remove("DIDGATE_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(d) = data {
        cmd.arg("--data").arg(d);
    }
    let mut child = cmd.spawn()?;
    let mut input = child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdin"))?;
    if let Some(v) = stdin {
        input.write_all(v.as_bytes())?;
    }
    drop(input);
    Ok(child.wait_with_output()?)
}

/// `didgated init` in `dir/gw`.
fn init(dir: &Path) -> anyhow::Result<PathBuf> {
    let data = dir.join("gw");
    let out = didgated(&["init", "--listen", "127.0.0.1:0"], Some(&data), None)?;
    anyhow::ensure!(
        out.status.success(),
        "init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(data)
}

fn operation(name: &str, method: &str, path: &str) -> anyhow::Result<OperationConfig> {
    // as an operator writes it (fields added later keep their defaults)
    Ok(toml::from_str(&format!(
        "name = {name:?}\nmethod = {method:?}\npath = {path:?}\n"
    ))?)
}

/// gateway.toml: groups agents and readers (and contractors in the entities file), upstreams
/// openai (operations chat, models) and payments (get_charge).
fn configure(data: &Path) -> anyhow::Result<()> {
    let path = data.join("gateway.toml");
    let mut config = RawConfig::read(&path)?;
    config.groups = [
        ("agents".to_string(), vec![alice().did().to_string()]),
        ("readers".to_string(), vec![bob().did().to_string()]),
    ]
    .into_iter()
    .collect();
    config.upstreams = vec![
        RawUpstream {
            operations: vec![
                operation("chat", "POST", "/v1/chat/completions")?,
                operation("models", "GET", "/v1/models")?,
            ],
            ..RawUpstream::new("openai", "https://api.openai.com", "openai-key")
        },
        RawUpstream {
            operations: vec![operation("get_charge", "GET", "/v1/charges/{id}")?],
            ..RawUpstream::new("payments", "https://api.example.com", "payments-key")
        },
    ];
    config.gateway.entities_file = Some("entities.json".into());
    let carol = didgate_protocol::Identity::from_seed(&[0xc0; 32]);
    std::fs::write(
        data.join("entities.json"),
        serde_json::json!([{
            "uid": {"type": "Did", "id": carol.did().to_string()},
            "attrs": {},
            "parents": [{"type": "Group", "id": "contractors"}]
        }])
        .to_string(),
    )?;
    std::fs::write(&path, toml::to_string(&config)?)?;
    Ok(())
}

const CLEAN: &str = r#"
@id("allow-agents")
permit (principal in Group::"agents", action == Action::"POST", resource in Upstream::"openai")
when { resource.path == "/v1/chat/completions" }
unless { resource.path == "/v1/internal" };

@id("readers-models")
permit (principal in Group::"readers", action in Action::"read", resource)
when { context.upstream == "openai" && resource.path like "/v1/models*" };

@id("charges")
permit (principal in Group::"contractors", action == Action::"GET", resource)
when {
  resource.upstream == Upstream::"payments" &&
  (resource.path == "/v1/charges/ch_1" || resource.path like "/v1/charges/*")
};

@id("no-admin")
forbid (principal, action, resource) when { resource.path like "/admin*" };
"#;

const TYPOS: &str = r#"
@id("allow-agents")
permit (principal in Group::"agnets", action == Action::"POST", resource in Upstream::"opneai")
when { principal in Group::"agnets" && resource.path == "/v1/chat/completoins" };

@id("readers-models")
permit (principal in Group::"readers", action in Action::"read", resource)
when { context.upstream == "opneai" && resource.path like "/v1/modles*" };

@id("no-admin")
forbid (principal in Group::"agnets", action, resource) when { resource.path like "/admin*" };
"#;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Typos in group, upstream and operation names are warnings naming the policy's `@id` (exit
/// 0), errors with `--strict` (exit 2); a clean policy gets none.
#[test]
fn policy_check_names_what_gateway_toml_lacks() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = init(tmp.path())?;
    configure(&data)?;
    let typos = tmp.path().join("typos.cedar");
    std::fs::write(&typos, TYPOS)?;
    let clean = tmp.path().join("clean.cedar");
    std::fs::write(&clean, CLEAN)?;
    let file = |p: &Path| p.display().to_string();

    // without --data: names are not checked (as before)
    let out = didgated(&["policy", "check", &file(&typos)], None, None)?;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains("warning"),
        "{}",
        text(&out.stderr)
    );

    let out = didgated(&["policy", "check", &file(&typos)], Some(&data), None)?;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        text(&out.stdout).contains("valid: 3 policies"),
        "{}",
        text(&out.stdout)
    );
    let expected = [
        r#"warning: policy "allow-agents": Group::"agnets" is not a group of gateway.toml (known: agents, contractors, readers)"#,
        r#"warning: policy "allow-agents": Upstream::"opneai" is not an upstream of gateway.toml (known: openai, payments)"#,
        r#"warning: policy "allow-agents": resource.path == "/v1/chat/completoins" names no operation of gateway.toml"#,
        r#"warning: policy "readers-models": context.upstream "opneai" is not an upstream of gateway.toml (known: openai, payments)"#,
        r#"warning: policy "readers-models": resource.path like "/v1/modles*" names no operation of gateway.toml"#,
        r#"warning: policy "no-admin": Group::"agnets" is not a group of gateway.toml"#,
    ];
    for line in expected {
        assert_eq!(stderr.matches(line).count(), 1, "{line}\n{stderr}");
    }
    // once per policy and name; a forbid's path is no operation and needs none
    assert_eq!(stderr.lines().count(), expected.len(), "{stderr}");
    assert!(!stderr.contains("/admin"), "{stderr}");

    let out = didgated(
        &["policy", "check", "--strict", &file(&typos)],
        Some(&data),
        None,
    )?;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(r#"error: policy "allow-agents": Group::"agnets" is not a group"#),
        "{stderr}"
    );
    assert!(
        !text(&out.stdout).contains("valid"),
        "{}",
        text(&out.stdout)
    );

    for strict in [false, true] {
        let mut args = vec!["policy", "check"];
        if strict {
            args.push("--strict");
        }
        let clean = file(&clean);
        args.push(&clean);
        let out = didgated(&args, Some(&data), None)?;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        assert!(
            !stderr.contains("warning") && !stderr.contains("error"),
            "{stderr}"
        );
        assert!(
            text(&out.stdout).contains("valid: 4 policies"),
            "{}",
            text(&out.stdout)
        );
    }

    // --strict means nothing without names to check against
    let out = didgated(&["policy", "check", "--strict", &file(&clean)], None, None)?;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--data"),
        "{}",
        text(&out.stderr)
    );
    Ok(())
}

/// A `didgated serve` whose stderr goes to a file; killed when dropped.
struct Serve(std::process::Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (at most 30 s) for `log` to contain `needle`.
fn wait_for(log: &Path, needle: &str, serve: &mut Serve) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = text(&std::fs::read(log).unwrap_or_default());
        if text.contains(needle) {
            return Ok(text);
        }
        if let Some(status) = serve.0.try_wait()? {
            anyhow::bail!("didgated exited ({status}) before {needle:?}:\n{text}");
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no {needle:?} in the log within 30 s:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The daemon's log written to a file holds plain text: no ANSI escape (0x1b).
#[test]
fn daemon_log_to_a_file_has_no_colour_codes() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = init(tmp.path())?;
    let log = tmp.path().join("didgated.log");
    let child = Command::new(bin("didgated")?)
        .args(["serve", "--data"])
        .arg(&data)
        .env_remove(didgate_gateway::kms::MASTER_KEY_ENV)
        .env_remove("NO_COLOR")
        // info: the tracing lines (levels, fields) are what a colouring writer would paint
        .env("DIDGATE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let mut serve = Serve(child);
    wait_for(&log, " listening on udp ", &mut serve)?;
    // a lifecycle event logged by the daemon through tracing (the control socket may be bound
    // a moment after the listening line: retry until the daemon answers)
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = didgated(
            &["secret", "add", "log-key"],
            Some(&data),
            Some("sk-log-QwErTyUiOpZxCvBnMmLkJhGfDsA"),
        )?;
        if out.status.success() {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "secret add: {}",
            text(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let logged = wait_for(&log, "secret added", &mut serve)?;
    drop(serve);
    let bytes = std::fs::read(&log)?;
    assert!(
        !bytes.contains(&0x1b),
        "escape codes in the log:\n{}",
        logged.escape_debug()
    );
    assert!(text(&bytes).contains("INFO"), "{logged}");
    Ok(())
}

/// What the display form may show of a key of `n` characters: `k` of each end
/// (specs/operation.md, "Secrets at rest": k = min(4, n / 8); none under 8 characters).
fn shown_per_end(n: usize) -> usize {
    4.min(n / 8)
}

/// `secret add` and `secret list` (table and JSON) show a short and a long key only as the
/// display form: its ends and nothing longer.
#[test]
fn secret_output_shows_no_more_than_the_display_form() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = init(tmp.path())?;
    // characters that no other output holds (no hex digit pairs, no English words)
    let keys = [
        ("short-key", "Q7xZ9wJ2vB4q"),
        ("tiny-key", "Zq7Wx"),
        ("long-key", "sk-prj-QWxzRTvbYUnmIOpkLJhgFDsaZXcvNMqw"),
    ];
    let mut outputs = Vec::new();
    for (name, key) in keys {
        let out = didgated(&["secret", "add", name], Some(&data), Some(key))?;
        assert!(out.status.success(), "{}", text(&out.stderr));
        outputs.push((name, text(&out.stdout) + &text(&out.stderr)));
    }
    let mut listed = String::new();
    for json in [false, true] {
        let mut args = vec!["secret", "list"];
        if json {
            args.push("--json");
        }
        let out = didgated(&args, Some(&data), None)?;
        assert!(out.status.success(), "{}", text(&out.stderr));
        listed.push_str(&(text(&out.stdout) + &text(&out.stderr)));
    }
    for (i, (name, key)) in keys.iter().enumerate() {
        let chars: Vec<char> = key.chars().collect();
        let k = shown_per_end(chars.len());
        let expected = if k == 0 {
            format!("...({} chars)", chars.len())
        } else {
            let head: String = chars[..k].iter().collect();
            let tail: String = chars[chars.len() - k..].iter().collect();
            format!("{head}...{tail}")
        };
        assert!(4 * 2 * k <= chars.len(), "at most a quarter of {name}");
        let added = &outputs[i].1;
        for (what, out) in [("secret add", added), ("secret list", &listed)] {
            assert!(
                out.contains(&expected),
                "{what} {name}: no {expected:?} in\n{out}"
            );
            // no run of the key longer than one end of the display form (a key under 8
            // characters shows none: no two of its characters together)
            for w in chars.windows((k + 1).max(2)) {
                let run: String = w.iter().collect();
                assert!(
                    !out.contains(&run),
                    "{what} shows {run:?} of {name}:\n{out}"
                );
            }
        }
    }
    Ok(())
}

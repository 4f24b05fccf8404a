//! The processes and files that hold keys (specs/threat-model.md, "Files and processes"):
//! `didgated`, `didgate proxy` and `didgate mcp` run with no core dumps (RLIMIT_CORE 0, read
//! from /proc/PID/limits) and not dumpable (shown by /proc/PID/status: for a process that is
//! not dumpable the kernel gives its /proc files to root, whatever user it runs as); `didgated
//! init` makes its data directory 0700 and every file 0600; a start tightens what an older
//! release or an operator left readable, and refuses a directory others may write to.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use didgate_tests::{Daemon, Harness, bin, seed_file};

/// uid and gid of `nobody`.
const NOBODY: u32 = 65534;

/// (soft, hard) of "Max core file size" in /proc/PID/limits.
fn core_limit(pid: u32) -> anyhow::Result<(String, String)> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .ok_or_else(|| anyhow::anyhow!("no core line in {limits}"))?;
    let mut fields = line["Max core file size".len()..].split_whitespace();
    Ok((
        fields.next().unwrap_or_default().to_string(),
        fields.next().unwrap_or_default().to_string(),
    ))
}

/// The real uid /proc/PID/status names, and the owner of that file.
fn status_uid_and_owner(pid: u32) -> anyhow::Result<(u32, u32)> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path)?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .ok_or_else(|| anyhow::anyhow!("no Uid line"))?
        .parse()?;
    Ok((uid, std::fs::metadata(&path)?.uid()))
}

fn chown_all(path: &Path, uid: u32) -> anyhow::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid))?;
    if path.is_dir() {
        for e in std::fs::read_dir(path)? {
            chown_all(&e?.path(), uid)?;
        }
    }
    Ok(())
}

fn modes_private(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut loose = Vec::new();
    let mode = std::fs::symlink_metadata(dir)?.permissions().mode();
    if mode & 0o077 != 0 {
        loose.push(format!("{} {mode:o}", dir.display()));
    }
    if dir.is_dir() {
        for e in std::fs::read_dir(dir)? {
            loose.extend(modes_private(&e?.path())?);
        }
    }
    Ok(loose)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_holding_processes_dump_no_core_and_are_not_dumpable() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    // a home owned by nobody, on a path nobody can walk
    let open = tempfile::tempdir()?;
    std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o755))?;
    let home = open.path().join("home");
    let seed = seed_file(open.path(), &[0xa1; 32])?;
    let didgate = |args: &[&str]| {
        Command::new(bin("didgate")?)
            .arg("--home")
            .arg(&home)
            .args(args)
            .output()
            .map_err(anyhow::Error::from)
    };
    assert!(didgate(&["keygen", "--seed-file", &seed])?.status.success());
    let pin = didgate(&[
        "pin",
        "--gateway",
        &h.addr.to_string(),
        "--gateway-did",
        h.gw_did.as_str(),
    ])?;
    assert!(
        pin.status.success(),
        "{}",
        String::from_utf8_lossy(&pin.stderr)
    );
    chown_all(&home, NOBODY)?;

    // didgate proxy, as nobody
    let mut proxy = Command::new(bin("didgate")?)
        .arg("--home")
        .arg(&home)
        .args(["--json", "proxy", "--listen", "127.0.0.1:0"])
        .uid(NOBODY)
        .gid(NOBODY)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(proxy.stdout.take().ok_or_else(|| anyhow::anyhow!("out"))?),
        &mut line,
    )?;
    anyhow::ensure!(line.contains("127.0.0.1"), "proxy did not start: {line}");
    let pid = proxy.id();
    assert_eq!(core_limit(pid)?, ("0".into(), "0".into()), "didgate proxy");
    let (uid, owner) = status_uid_and_owner(pid)?;
    assert_eq!(uid, NOBODY, "the proxy runs as nobody");
    assert_eq!(owner, 0, "not dumpable: its /proc files belong to root");
    proxy.kill()?;
    proxy.wait()?;

    // didgate mcp (stdio), waiting for its client
    let mut mcp = Command::new(bin("didgate")?)
        .arg("--home")
        .arg(&home)
        .arg("mcp")
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    // it is up once it holds its chain open: poll /proc with a deadline
    let pid = mcp.id();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while core_limit(pid)?.1 != "0" {
        anyhow::ensure!(std::time::Instant::now() < deadline, "mcp never hardened");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(core_limit(pid)?, ("0".into(), "0".into()), "didgate mcp");
    assert_eq!(status_uid_and_owner(pid)?, (NOBODY, 0), "didgate mcp");
    drop(mcp.stdin.take());
    mcp.kill()?;
    mcp.wait()?;

    // didgated serve
    let data = open.path().join("gw");
    let init = Command::new(bin("didgated")?)
        .args(["init", "--data"])
        .arg(&data)
        .output()?;
    assert!(init.status.success());
    chown_all(&data, NOBODY)?;
    let log = open.path().join("didgated.log");
    std::fs::write(&log, "")?;
    chown_all(&log, NOBODY)?;
    let daemon = Daemon::start_as(&data, &log, NOBODY)?;
    assert_eq!(
        core_limit(daemon.pid())?,
        ("0".into(), "0".into()),
        "didgated"
    );
    assert_eq!(status_uid_and_owner(daemon.pid())?, (NOBODY, 0), "didgated");
    daemon.kill()?;
    Ok(())
}

#[test]
fn data_directories_are_private_and_tightened_or_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("gw");
    let didgated = |args: &[&str]| {
        Command::new(bin("didgated")?)
            .args(args)
            .arg("--data")
            .arg(&data)
            .output()
            .map_err(anyhow::Error::from)
    };
    let out = didgated(&["init"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        modes_private(&data)?,
        Vec::<String>::new(),
        "init: 0700 and 0600"
    );
    let mode = std::fs::metadata(&data)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);

    // an operator (or an older release) left files readable: the next command tightens them
    let journal = std::fs::read_dir(data.join("store"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "jnl"))
        .ok_or_else(|| anyhow::anyhow!("no journal"))?;
    for p in [&data.join("gateway.toml"), &journal] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644))?;
    }
    let out = didgated(&["secret", "list"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("tightened mode 644 -> 600"), "{log}");
    assert!(log.contains("gateway.toml"), "{log}");
    assert_eq!(modes_private(&data)?, Vec::<String>::new());

    // a data directory others may write to is refused
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777))?;
    let out = didgated(&["serve"])?;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("writable by group or others"), "{err}");

    // and a client home likewise
    let home = dir.path().join("home");
    let seed = seed_file(dir.path(), &[0xb0; 32])?;
    let didgate = |args: &[&str]| {
        Command::new(bin("didgate")?)
            .arg("--home")
            .arg(&home)
            .args(args)
            .output()
            .map_err(anyhow::Error::from)
    };
    assert!(didgate(&["keygen", "--seed-file", &seed])?.status.success());
    assert_eq!(
        modes_private(&home)?,
        Vec::<String>::new(),
        "keygen: private home"
    );
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755))?;
    let out = didgate(&["whoami"])?;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("mode 755 -> 700"));
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o775))?;
    let out = didgate(&["whoami"])?;
    assert_eq!(out.status.code(), Some(2));
    Ok(())
}

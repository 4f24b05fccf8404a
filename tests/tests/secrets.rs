//! The secret lifecycle end to end: rotation with a grace window, disable and enable, soft
//! delete and restore, list, test against the upstream, and master-key rotation, through the
//! running daemon's control socket (`didgated` as a process) and on the store directly.
//!
//! Time-dependent steps (the grace window, the purge) use the library with explicit
//! timestamps; nothing sleeps for them.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use didgate_audit::Store;
use didgate_audit::entry::{Entry, EntryKind, SecretAction, SecretStatus};
use didgate_client::{CallError, CallSpec, Client};
use didgate_daemon::upstream_demo::DemoUpstream;
use didgate_gateway::control;
use didgate_gateway::gateway::{DataDir, SECRETS, SPACES};
use didgate_gateway::kms::{Kms, LocalKms};
use didgate_gateway::secrets::{DELETE_RETENTION_MS, SecretError, SecretInfo, SecretRecord};
use didgate_protocol::message::RefusalCode;
use didgate_tests::{CANARY, Harness, alice, bin, files_containing};
use zeroize::Zeroizing;

/// The value `secret rotate` installs; the upstream accepts it and the canary during rotation.
const NEXT: &str = "sk-live-NEXTKEY-0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e";
/// A value no upstream accepts.
const WRONG: &str = "sk-live-WRONGKEY-ffffffffffffffffffffffffffff";
const NAME: &str = "payments-key";

/// A harness whose upstream accepts the canary and [`NEXT`], with `test_path` set.
async fn harness() -> anyhow::Result<(Harness, DemoUpstream)> {
    let up = DemoUpstream::start_with_keys(
        vec![
            Zeroizing::new(CANARY.to_string()),
            Zeroizing::new(NEXT.to_string()),
        ],
        None,
    )
    .await?;
    let base = up.base_url();
    let h = Harness::start_with(move |c| {
        c.upstreams[0].base_url = base;
        c.upstreams[0].test_path = Some("/v1/balance".into());
    })
    .await?;
    Ok((h, up))
}

/// The control socket of the harness's running gateway, as `didgated serve` runs it.
struct Socket {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Socket {
    async fn start(h: &Harness) -> anyhow::Result<Self> {
        let gw = h.gateway.clone().context("the gateway runs")?;
        let (stop, rx) = tokio::sync::watch::channel(false);
        let dir = h.gw_dir();
        let task = tokio::spawn(async move { control::server::serve(gw, &dir, rx).await });
        let path = control::socket_path(&h.gw_dir());
        for _ in 0..500 {
            if path.exists() {
                return Ok(Self { stop, task });
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        anyhow::bail!("the control socket did not appear")
    }

    /// Stops serving (and drops its gateway handle, so the store can be reopened).
    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.task.await??;
        Ok(())
    }
}

/// One `didgated` run; its output is kept for the canary checks.
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Every output `didgated` printed in a test.
#[derive(Default)]
struct Transcript(String);

impl Transcript {
    async fn run(&mut self, dir: &Path, args: &[&str], stdin: Option<&str>) -> anyhow::Result<Out> {
        use tokio::io::AsyncWriteExt;
        let mut cmd = tokio::process::Command::new(bin("didgated")?);
        cmd.args(args)
            .arg("--data")
            .arg(dir)
            .env_remove(didgate_gateway::kms::MASTER_KEY_ENV)
            .env_remove("DIDGATE_DATA")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn()?;
        let mut input = child.stdin.take().context("stdin")?;
        if let Some(v) = stdin {
            input.write_all(v.as_bytes()).await?;
            input.write_all(b"\n").await?;
        }
        drop(input);
        let out = child.wait_with_output().await?;
        let out = Out {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        self.0.push_str(&out.stdout);
        self.0.push_str(&out.stderr);
        Ok(out)
    }

    /// Runs and requires exit 0.
    async fn ok(
        &mut self,
        dir: &Path,
        args: &[&str],
        stdin: Option<&str>,
    ) -> anyhow::Result<String> {
        let out = self.run(dir, args, stdin).await?;
        anyhow::ensure!(
            out.code == Some(0),
            "didgated {args:?}: exit {:?}\n{}{}",
            out.code,
            out.stdout,
            out.stderr
        );
        Ok(out.stdout)
    }

    fn assert_no_values(&self) {
        for v in [CANARY, NEXT, WRONG] {
            assert!(!self.0.contains(v), "a secret value in didgated's output");
        }
        assert!(
            !self.0.contains("CANARY-7f3a9c1e"),
            "a long part of the canary printed"
        );
    }
}

async fn balance(c: &Client) -> Result<u16, CallError> {
    c.call(CallSpec::new("payments", "GET", "/v1/balance"))
        .await
        .map(|a| a.status)
}

fn refusal(r: &Result<u16, CallError>) -> Option<RefusalCode> {
    match r {
        Err(CallError::Refused { code, .. }) => Some(*code),
        _ => None,
    }
}

fn last_fingerprint(up: &DemoUpstream) -> Option<String> {
    up.seen()
        .last()
        .and_then(|s| s.credential_fingerprint.clone())
}

fn list_json(stdout: &str) -> anyhow::Result<Vec<SecretInfo>> {
    Ok(serde_json::from_str(stdout)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_calls_working_across_the_grace_window() -> anyhow::Result<()> {
    let (mut h, up) = harness().await?;
    let gw = h.gateway.clone().context("running")?;
    let secrets = gw.secrets().clone();
    let a = h.client("alice", alice()).await?;
    assert_eq!(balance(&a).await?, 200);
    assert_eq!(
        last_fingerprint(&up),
        Some(DemoUpstream::fingerprint(CANARY))
    );

    // rotate at t0 (an explicit clock): the new value is injected at once
    let t0 = didgate_gateway::now_ms();
    let grace = secrets.grace_ms();
    assert_eq!(grace, 3_600_000, "secret_grace_secs defaults to an hour");
    let info = secrets.rotate(NAME, NEXT, t0)?;
    assert_eq!(info.version, 2);
    assert_eq!(info.versions.len(), 2);
    assert_eq!(info.versions[0].usable_until_ms, Some(t0 + grace));
    assert_eq!(balance(&a).await?, 200);
    assert_eq!(last_fingerprint(&up), Some(DemoUpstream::fingerprint(NEXT)));

    // inside the window the old version is still held and still works upstream
    let config = gw.config().clone();
    let upstreams = didgate_gateway::upstreams::UpstreamSet::of_config(&config)?;
    let probes = secrets
        .probe(&upstreams, NAME, Some(1), t0 + grace - 1)
        .await?;
    assert!(probes.iter().all(|p| p.ok && p.version == 1), "{probes:?}");
    assert_eq!(
        last_fingerprint(&up),
        Some(DemoUpstream::fingerprint(CANARY))
    );
    assert!(secrets.maintain(t0 + grace - 1)?.sealed_off.is_empty());

    // at the end of the window it is sealed off: gone from the record, calls unaffected
    let upkeep = secrets.maintain(t0 + grace)?;
    assert_eq!(upkeep.sealed_off, vec![(NAME.to_string(), 1)]);
    assert!(matches!(
        secrets.probe(&upstreams, NAME, Some(1), t0 + grace).await,
        Err(SecretError::Unavailable(..))
    ));
    let listed = secrets.list()?;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        listed[0]
            .versions
            .iter()
            .map(|v| v.version)
            .collect::<Vec<_>>(),
        vec![2]
    );
    assert_eq!(balance(&a).await?, 200);
    assert_eq!(last_fingerprint(&up), Some(DemoUpstream::fingerprint(NEXT)));

    // the record on disk holds one version, and survives a restart
    a.close().await;
    drop(a);
    drop(secrets);
    drop(gw);
    h.restart().await?;
    let a = h.client("alice", alice()).await?;
    assert_eq!(balance(&a).await?, 200);
    assert_eq!(last_fingerprint(&up), Some(DemoUpstream::fingerprint(NEXT)));
    a.close().await;
    drop(a);
    h.stop().await;
    let store = Store::open(&DataDir::new(&h.gw_dir()).store(), SPACES)?;
    let bytes = store.get(SECRETS, NAME.as_bytes())?.context("stored")?;
    let rec = SecretRecord::decode(&bytes, [0; 8])?;
    assert_eq!(rec.versions.len(), 1);
    assert!(
        rec.history
            .iter()
            .any(|e| e.action == "sealed_off" && e.version == 1)
    );
    drop(store);
    // every executed entry names the secret and the version its call used (amendment 2.3):
    // version 1 before the rotation, version 2 after
    let used: Vec<(Option<[u8; 16]>, Option<u64>)> = h
        .gateway_entries()?
        .iter()
        .filter(|e| e.kind == EntryKind::Executed)
        .map(|e| (e.secret_id, e.secret_version))
        .collect();
    let id = Some(rec.id);
    assert_eq!(used.first(), Some(&(id, Some(1))), "{used:?}");
    assert_eq!(used.last(), Some(&(id, Some(2))), "{used:?}");
    assert!(used.windows(2).all(|w| w[0].1 <= w[1].1), "{used:?}");
    for v in [CANARY, NEXT] {
        assert!(
            files_containing(h.dir.path(), v.as_bytes()).is_empty(),
            "a secret value on disk"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_through_the_control_socket_never_prints_a_value() -> anyhow::Result<()> {
    let (mut h, up) = harness().await?;
    let dir = h.gw_dir();
    let socket = Socket::start(&h).await?;
    let mut t = Transcript::default();
    let a = h.client("alice", alice()).await?;
    assert_eq!(balance(&a).await?, 200);

    // list: name, version, prefix, status, last use (from the daemon's memory)
    let table = t.ok(&dir, &["secret", "list"], None).await?;
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains(NAME) && table.contains("sk-l...0234") && table.contains("enabled"));
    let listed = list_json(&t.ok(&dir, &["secret", "list", "--json"], None).await?)?;
    assert_eq!(listed[0].version, 1);
    assert!(
        listed[0].last_used_ms.is_some(),
        "last use reported while running"
    );

    // disable: refused with secret_unavailable; enable restores
    t.ok(&dir, &["secret", "disable", NAME], None).await?;
    assert_eq!(
        refusal(&balance(&a).await),
        Some(RefusalCode::SecretUnavailable)
    );
    t.ok(&dir, &["secret", "enable", NAME], None).await?;
    assert_eq!(balance(&a).await?, 200);

    // delete (soft), then restore within the window
    let out = t.ok(&dir, &["secret", "delete", NAME], None).await?;
    assert!(out.contains("restores it until"), "{out}");
    assert_eq!(
        refusal(&balance(&a).await),
        Some(RefusalCode::SecretUnavailable)
    );
    let listed = list_json(&t.ok(&dir, &["secret", "list", "--json"], None).await?)?;
    assert_eq!(listed[0].status, "deleted");
    assert_eq!(
        listed[0].purge_ms,
        listed[0].deleted_ms.map(|d| d + DELETE_RETENTION_MS)
    );
    let out = t.run(&dir, &["secret", "add", NAME], Some(NEXT)).await?;
    assert_eq!(
        out.code,
        Some(2),
        "a deleted name is not reused before the purge"
    );
    t.ok(&dir, &["secret", "restore", NAME], None).await?;
    assert_eq!(balance(&a).await?, 200);

    // rotate through the socket: the value goes over stdin and the socket, never argv
    rotate_and_test_through_the_socket(&mut t, &dir, &a, &up).await?;

    // errors are clear and carry no value
    let out = t.run(&dir, &["secret", "disable", "nope"], None).await?;
    assert_eq!(out.code, Some(2));
    assert!(
        out.stderr.contains("secret nope is not stored"),
        "{}",
        out.stderr
    );
    let out = t.run(&dir, &["secret", "rotate", NAME], Some("")).await?;
    assert_eq!(out.code, Some(2));

    // a second secret added through the socket
    t.ok(&dir, &["secret", "add", "other-key"], Some(WRONG))
        .await?;
    let listed = list_json(&t.ok(&dir, &["secret", "list", "--json"], None).await?)?;
    assert_eq!(listed.len(), 2);

    a.close().await;
    drop(a);
    socket.stop().await?;
    h.stop().await;
    // no daemon: the same commands open the store directly; last use was persisted at stop
    let listed = list_json(&t.ok(&dir, &["secret", "list", "--json"], None).await?)?;
    let pay = listed.iter().find(|s| s.name == NAME).context("listed")?;
    assert_eq!(pay.version, 4);
    assert!(pay.last_used_ms.is_some(), "last use persisted at shutdown");
    t.ok(&dir, &["secret", "disable", "other-key"], None)
        .await?;
    t.ok(&dir, &["secret", "delete", "other-key"], None).await?;
    let out = t.ok(&dir, &["secret", "test", NAME], None).await?;
    assert!(out.contains("200 ok"), "{out}");
    t.assert_no_values();

    // every change, through the socket or not, is a secret entry of the gateway's chain
    // (names, versions, fingerprints), and each executed call names the version it used
    the_chain_records_every_change(&dir, &h.chain_dir("alice"))?;
    for v in [CANARY, NEXT, WRONG] {
        assert!(
            files_containing(h.dir.path(), v.as_bytes()).is_empty(),
            "a secret value on disk"
        );
    }
    Ok(())
}

/// Rotations through the socket (the value over stdin and the socket, never argv), and
/// `secret test`: ok for the current and the retired version, a failure for a key the
/// upstream refuses; the secret ends at a good key (version 4).
async fn rotate_and_test_through_the_socket(
    t: &mut Transcript,
    dir: &Path,
    a: &Client,
    up: &DemoUpstream,
) -> anyhow::Result<()> {
    let out = t.ok(dir, &["secret", "rotate", NAME], Some(NEXT)).await?;
    assert!(
        out.contains("rotated to version 2") && out.contains("stays usable until"),
        "{out}"
    );
    assert_eq!(balance(a).await?, 200);
    assert_eq!(last_fingerprint(up), Some(DemoUpstream::fingerprint(NEXT)));
    let table = t.ok(dir, &["secret", "list"], None).await?;
    assert!(table.contains("2 (+1 in grace)"), "{table}");

    // secret test: ok for the current and the retired version, failure for a refused key
    let out = t.ok(dir, &["secret", "test", NAME], None).await?;
    assert!(
        out.contains("version 2 via payments: GET /v1/balance -> 200 ok"),
        "{out}"
    );
    let out = t
        .ok(dir, &["secret", "test", NAME, "--version", "1"], None)
        .await?;
    assert!(out.contains("200 ok"), "{out}");
    t.ok(dir, &["secret", "rotate", NAME], Some(WRONG)).await?;
    let out = t.run(dir, &["secret", "test", NAME], None).await?;
    assert_eq!(out.code, Some(1), "{}{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("401 failed"), "{}", out.stdout);
    assert_eq!(balance(a).await?, 401, "the upstream refuses the wrong key");
    // back to a good key
    t.ok(dir, &["secret", "rotate", NAME], Some(NEXT)).await?;
    assert_eq!(balance(a).await?, 200);
    Ok(())
}

/// Every change of the secrets is a secret entry of the gateway's chain (in the store of the
/// data directory `dir`): the snapshot of an empty store, then each change; each executed call
/// names the version it used; the chains verify.
fn the_chain_records_every_change(dir: &Path, alice_chain: &Path) -> anyhow::Result<()> {
    let gateway = didgate_audit::load_records(&DataDir::new(dir).store())?;
    let entries: Vec<Entry> = gateway
        .entries
        .iter()
        .map(|(_, b)| Entry::decode(b))
        .collect::<Result<_, _>>()?;
    let lifecycle: Vec<(SecretAction, String, SecretStatus, Option<u64>)> = entries
        .iter()
        .filter_map(|e| Some((e.action?, e.secrets.as_deref()?)))
        .flat_map(|(a, states)| {
            states
                .iter()
                .map(move |st| (a, st.name.clone(), st.status, st.current()))
        })
        .collect();
    use SecretAction::*;
    use SecretStatus::{Deleted as Gone, Disabled as Off, Enabled as On};
    let other = "other-key";
    let expected = [
        (Added, NAME, On, 1),
        (Disabled, NAME, Off, 1),
        (Enabled, NAME, On, 1),
        (Deleted, NAME, Gone, 1),
        (Restored, NAME, On, 1),
        (Rotated, NAME, On, 2),
        (Rotated, NAME, On, 3),
        (Rotated, NAME, On, 4),
        (Added, other, On, 1),
        (Disabled, other, Off, 1),
        (Deleted, other, Gone, 1),
    ]
    .map(|(a, n, st, v)| (a, n.to_string(), st, Some(v)));
    assert_eq!(
        lifecycle, expected,
        "the snapshot of an empty store, then each change"
    );
    let snapshot = entries
        .iter()
        .find(|e| e.kind == EntryKind::Secret)
        .context("secret entries")?;
    assert_eq!(
        (snapshot.action, snapshot.secrets.as_deref().map(<[_]>::len)),
        (Some(Snapshot), Some(0))
    );
    let used: Vec<u64> = entries
        .iter()
        .filter(|e| e.kind == EntryKind::Executed)
        .filter_map(|e| e.secret_version)
        .collect();
    assert_eq!(used, [1, 1, 1, 2, 3, 4]);
    let report =
        didgate_audit::verify::verify(&[gateway], &[didgate_audit::load_records(alice_chain)?]);
    assert!(report.ok(), "{:#?}", report.violations);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_rotate_keeps_calls_working_and_retires_the_old_master_key() -> anyhow::Result<()> {
    let (mut h, up) = harness().await?;
    let dir = h.gw_dir();
    let master = DataDir::new(&dir).master_key();
    let old = LocalKms::load_file(&master)?;
    // a second version, so more than one data key is rewrapped
    h.gateway.clone().context("running")?.secrets().rotate(
        NAME,
        NEXT,
        didgate_gateway::now_ms(),
    )?;
    let socket = Socket::start(&h).await?;
    let mut t = Transcript::default();

    // calls run without a pause while the master key is rotated
    let a = Arc::new(h.client("alice", alice()).await?);
    let done = Arc::new(AtomicBool::new(false));
    let caller = {
        let (a, done) = (a.clone(), done.clone());
        tokio::spawn(async move {
            let mut calls = 0u32;
            while !done.load(Ordering::SeqCst) || calls < 3 {
                match balance(&a).await {
                    Ok(200) => calls += 1,
                    other => return Err(anyhow::anyhow!("call {calls} failed: {other:?}")),
                }
            }
            Ok(calls)
        })
    };
    for _ in 0..3 {
        let out = t.ok(&dir, &["kms", "rotate"], None).await?;
        assert!(out.contains("2 data keys rewrapped in 1 secrets"), "{out}");
    }
    done.store(true, Ordering::SeqCst);
    let calls = caller.await??;
    assert!(calls >= 3);
    assert_eq!(last_fingerprint(&up), Some(DemoUpstream::fingerprint(NEXT)));
    let listed = list_json(&t.ok(&dir, &["secret", "list", "--json"], None).await?)?;
    let new = LocalKms::load_file(&master)?;
    assert_eq!(listed[0].key_id, hex::encode(new.key_id()));
    assert_ne!(new.key_id(), old.key_id());
    assert!(!Path::new(&format!("{}.new", master.display())).exists());

    // the gateway restarts on the new key
    a.close().await;
    drop(a);
    socket.stop().await?;
    h.restart().await?;
    let a = h.client("alice", alice()).await?;
    assert_eq!(balance(&a).await?, 200);
    a.close().await;
    drop(a);
    h.stop().await;

    // the old master key opens no record; the new one opens every version
    let store = Store::open(&DataDir::new(&dir).store(), SPACES)?;
    let mut opened = 0;
    for (_, bytes) in store.scan(SECRETS, b"")? {
        let rec = SecretRecord::decode(&bytes, [0; 8])?;
        assert_eq!(rec.kek, new.key_id());
        for v in &rec.versions {
            assert!(v.open(&old, &rec.id, &rec.name).is_err());
            assert!(v.open(&new, &rec.id, &rec.name).is_ok());
            opened += 1;
        }
    }
    assert_eq!(opened, 2);
    drop(store);
    // with no daemon, kms rotate works on the store directly
    let out = t.ok(&dir, &["kms", "rotate"], None).await?;
    assert!(out.contains("rewrapped"), "{out}");
    assert_ne!(LocalKms::load_file(&master)?.key_id(), new.key_id());
    t.assert_no_values();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_secret_is_purged_after_the_retention_window() -> anyhow::Result<()> {
    let (mut h, _up) = harness().await?;
    let secrets = h.gateway.clone().context("running")?.secrets().clone();
    let a = h.client("alice", alice()).await?;
    let t0 = didgate_gateway::now_ms();
    secrets.delete(NAME, t0)?;
    assert_eq!(
        refusal(&balance(&a).await),
        Some(RefusalCode::SecretUnavailable)
    );
    // restore within the window
    assert!(
        secrets
            .maintain(t0 + DELETE_RETENTION_MS - 1)?
            .purged
            .is_empty()
    );
    secrets.enable(NAME, t0 + DELETE_RETENTION_MS - 1)?;
    assert_eq!(balance(&a).await?, 200);
    // delete again and let the window pass: purged, the name is free
    secrets.delete(NAME, t0)?;
    let upkeep = secrets.maintain(t0 + DELETE_RETENTION_MS)?;
    assert_eq!(upkeep.purged, vec![NAME.to_string()]);
    assert!(matches!(
        secrets.enable(NAME, t0 + DELETE_RETENTION_MS),
        Err(SecretError::NotFound(_))
    ));
    assert_eq!(
        refusal(&balance(&a).await),
        Some(RefusalCode::SecretUnavailable)
    );
    secrets.add(NAME, CANARY, t0 + DELETE_RETENTION_MS)?;
    assert_eq!(balance(&a).await?, 200);
    a.close().await;
    drop(a);
    drop(secrets);
    h.stop().await;
    Ok(())
}

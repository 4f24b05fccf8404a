//! Data written by the previous release (b9992ca, `tests/fixtures/release-b9992ca`: a
//! `didgated demo` run, its gateway store, the two clients' chains, and exports of all three)
//! still opens and verifies under this release, has its secret rotated with no daemon running
//! (the gateway chain switches, then gets the snapshot of the old release's secret and the
//! rotation: amendment 2.4), takes new calls (each chain switches to version 2 once, at a
//! recorded seq; each executed entry names the rotated version), and the whole of each chain
//! (version 1 part, switch, version 2 part) verifies: with the library, with `didgate-audit
//! verify` on the stores and on fresh exports, and with `check-evidence` on an evidence bundle
//! from each side of the switch (specs/audit-log.md, "Format evolution").

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use didgate_audit::entry::{Entry, EntryKind, SecretAction, SecretStatus};
use didgate_client::{CallSpec, Client};
use didgate_daemon::upstream_demo::DemoUpstream;
use didgate_protocol::message::{self, Checkpoint, RefusalCode};
use didgate_tests::{Daemon, bin, refusal_code};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/release-b9992ca");
/// The key the upgraded gateway's upstream accepts (the demo's own died with its process).
const KEY: &str = "sk-test-upgrade-4c1d8e2f90ab7356";

/// Copies the fixture; git does not keep file modes, and identity files and the master key
/// must be 0600 to be read at all.
fn copy_fixture(to: &Path) -> anyhow::Result<()> {
    didgate_tests::copy_private_tree(Path::new(FIXTURE), to)
}

/// Runs a workspace binary; returns (exit status, stdout and stderr).
fn run(name: &str, args: &[&Path], stdin: Option<&str>) -> anyhow::Result<(i32, String)> {
    let mut child = Command::new(bin(name)?)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(text) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdin"))?
            .write_all(text.as_bytes())?;
    }
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.code().unwrap_or(-1), text))
}

fn p(s: &str) -> PathBuf {
    PathBuf::from(s)
}

fn entries(store: &Path) -> anyhow::Result<Vec<Entry>> {
    let records = didgate_audit::load_records(store)?;
    Ok(records
        .entries
        .iter()
        .map(|(_, b)| Entry::decode(b))
        .collect::<Result<_, _>>()?)
}

/// `didgate-audit verify` over the given chains: exit 0 and `verdict: OK`.
fn verify_ok(gateway: &Path, clients: &[&Path]) -> anyhow::Result<String> {
    let mut args: Vec<&Path> = vec![Path::new("verify"), Path::new("--gateway"), gateway];
    for c in clients {
        args.push(Path::new("--client"));
        args.push(c);
    }
    let (code, text) = run("didgate-audit", &args, None)?;
    anyhow::ensure!(code == 0 && text.contains("verdict: OK"), "{code}: {text}");
    Ok(text)
}

/// `evidence` then `check-evidence` for `call`: both exit 0.
fn evidence_holds(dir: &Path, client: &Path, gateway: &Path, call: [u8; 32]) -> anyhow::Result<()> {
    let out = dir.join(format!("evidence-{}.cbor", hex::encode(&call[..4])));
    let call = p(&hex::encode(call));
    let (code, text) = run(
        "didgate-audit",
        &[
            &p("evidence"),
            &p("--client"),
            client,
            &p("--gateway"),
            gateway,
            &p("--call"),
            &call,
            &p("--out"),
            &out,
        ],
        None,
    )?;
    anyhow::ensure!(code == 0, "evidence: {code}: {text}");
    let (code, text) = run("didgate-audit", &[&p("check-evidence"), &out], None)?;
    anyhow::ensure!(code == 0, "check-evidence: {code}: {text}");
    Ok(())
}

/// The chain at `store`: `old` version 1 entries as the fixture had them, then the format
/// entry at seq `old`, then only version 2 entries. Returns the entries.
fn switched_once(store: &Path, old: usize) -> anyhow::Result<Vec<Entry>> {
    let all = entries(store)?;
    anyhow::ensure!(
        all.len() > old + 1,
        "{}: no entries after the switch",
        store.display()
    );
    let formats: Vec<u64> = all
        .iter()
        .filter(|e| e.kind == EntryKind::Format)
        .map(|e| e.seq)
        .collect();
    anyhow::ensure!(
        formats == vec![old as u64],
        "{}: switches at {formats:?}",
        store.display()
    );
    anyhow::ensure!(all[..old].iter().all(|e| e.v == 1), "version 1 part");
    anyhow::ensure!(all[old..].iter().all(|e| e.v == 2), "version 2 part");
    anyhow::ensure!(all[old].version == Some(2), "the switch names version 2");
    Ok(all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_previous_release_store_and_chains_upgrade_in_place() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fx = dir.path().join("fx");
    copy_fixture(&fx)?;
    let gw = fx.join("gateway");
    let alice_chain = fx.join("clients/alice/chain");
    let bob_chain = fx.join("clients/bob/chain");
    let chains = [gw.as_path(), alice_chain.as_path(), bob_chain.as_path()];

    // 1. As the previous release left them: version 1 chains that verify, stores and exports.
    let (before, v1_call) = as_the_previous_release_left_them(dir.path(), &fx, chains)?;
    // 2. The upgrade: this release's daemon on the old data directory, the secret rotated
    // first, then calls.
    let (_upstream, secret) = rotate_the_secret_with_no_daemon(&gw, chains, &before).await?;
    let charge = call_through_the_upgraded_daemon(dir.path(), &fx, chains).await?;
    // 3. Each chain switched once, right after the old head.
    each_chain_switched_once(chains, &before, secret)?;
    // 4. The whole chains verify: the library, the command on the stores, on fresh exports.
    let (gw_export, alice_export) = the_whole_chains_verify(dir.path(), chains)?;
    // 5. Evidence from each side of the switch, from the upgraded chains.
    evidence_holds(dir.path(), &alice_export, &gw_export, v1_call)?;
    evidence_holds(dir.path(), &alice_export, &gw_export, charge)?;
    Ok(())
}

/// Step 1: the fixture's chains (gateway, alice, bob) are version 1 and verify, as stores and
/// as exports, and evidence of a call holds. Returns their lengths and that call.
fn as_the_previous_release_left_them(
    dir: &Path,
    fx: &Path,
    [gw, alice_chain, bob_chain]: [&Path; 3],
) -> anyhow::Result<(Vec<usize>, [u8; 32])> {
    let before: Vec<usize> = [gw, alice_chain, bob_chain]
        .iter()
        .map(|s| entries(s).map(|e| e.len()))
        .collect::<Result<_, _>>()?;
    assert_eq!(before, vec![9, 5, 5], "the fixture as the demo wrote it");
    for s in [gw, alice_chain, bob_chain] {
        assert!(entries(s)?.iter().all(|e| e.v == 1), "{}", s.display());
    }
    verify_ok(gw, &[alice_chain, bob_chain])?;
    verify_ok(
        &fx.join("gateway.cbor"),
        &[&fx.join("alice.cbor"), &fx.join("bob.cbor")],
    )?;
    // a call of the version 1 part: alice's charge, as the old export holds it
    let v1_call = entries(&fx.join("alice.cbor"))?
        .iter()
        .rev()
        .filter(|e| e.kind == EntryKind::Request)
        .find_map(|e| e.call)
        .ok_or_else(|| anyhow::anyhow!("no request in alice's chain"))?;
    evidence_holds(
        dir,
        &fx.join("alice.cbor"),
        &fx.join("gateway.cbor"),
        v1_call,
    )?;
    Ok((before, v1_call))
}

/// Step 2: the demo's upstream died with its run, so a new one, and the operator rotates the
/// secret to its key with no daemon running. Returns the upstream (to keep it running) and
/// the secret's id.
async fn rotate_the_secret_with_no_daemon(
    gw: &Path,
    [_, alice_chain, bob_chain]: [&Path; 3],
    before: &[usize],
) -> anyhow::Result<(DemoUpstream, [u8; 16])> {
    let upstream = DemoUpstream::start(zeroize::Zeroizing::new(KEY.to_string()), None).await?;
    let config = gw.join("gateway.toml");
    let text = std::fs::read_to_string(&config)?;
    let old_url = text
        .lines()
        .find_map(|l| l.strip_prefix("base_url = "))
        .ok_or_else(|| anyhow::anyhow!("no base_url"))?
        .to_string();
    std::fs::write(
        &config,
        text.replace(&old_url, &format!("{:?}", upstream.base_url())),
    )?;
    let (code, out) = run(
        "didgated",
        &[
            &p("secret"),
            &p("rotate"),
            &p("payments-key"),
            &p("--data"),
            gw,
        ],
        Some(KEY),
    )?;
    assert_eq!(code, 0, "{out}");
    // The secret command (no daemon runs) is this release's first writer of the gateway
    // chain: the switch, then one snapshot entry of the secret as the old release left it,
    // then the rotation, each with names, versions and fingerprints only. Reading and
    // verifying wrote nothing; the clients' chains are untouched.
    let gw_now = entries(gw)?;
    assert_eq!(gw_now.len(), before[0] + 3, "{gw_now:#?}");
    assert_eq!(gw_now[before[0]].kind, EntryKind::Format);
    let (snapshot, rotated) = (&gw_now[before[0] + 1], &gw_now[before[0] + 2]);
    assert_eq!(snapshot.action, Some(SecretAction::Snapshot));
    assert_eq!(rotated.action, Some(SecretAction::Rotated));
    let (Some([old]), Some([new])) = (snapshot.secrets.as_deref(), rotated.secrets.as_deref())
    else {
        anyhow::bail!("one secret in each: {snapshot:?} {rotated:?}");
    };
    assert_eq!(
        (old.name.as_str(), old.status, old.current()),
        ("payments-key", SecretStatus::Enabled, Some(1))
    );
    assert_eq!((new.id, new.current()), (old.id, Some(2)));
    assert_eq!(new.versions[0].fingerprint, old.versions[0].fingerprint);
    assert!(new.versions[0].retired_ms.is_some());
    for (s, n) in [alice_chain, bob_chain].iter().zip(&before[1..]) {
        let now = entries(s)?;
        assert_eq!(now.len(), *n, "{}", s.display());
        assert!(now.iter().all(|e| e.v == 1), "{}", s.display());
    }
    Ok((upstream, old.id))
}

/// Step 2, then: this release's daemon on the old data directory takes alice's and bob's
/// calls (and refuses what policy does not allow), then drains on SIGTERM. Returns the call ID
/// of alice's charge.
async fn call_through_the_upgraded_daemon(
    dir: &Path,
    fx: &Path,
    [gw, alice_chain, bob_chain]: [&Path; 3],
) -> anyhow::Result<[u8; 32]> {
    let daemon = Daemon::start(gw, &dir.join("didgated.log"))?;
    let gw_did = didgate_client::identity::load(&gw.join("identity"))?
        .did()
        .clone();
    let alice = Client::open(
        didgate_client::identity::load(&fx.join("clients/alice/identity"))?,
        alice_chain,
        daemon.addr,
        gw_did.clone(),
    )
    .await?;
    let balance = alice
        .call(CallSpec::new("payments", "GET", "/v1/balance"))
        .await?;
    assert_eq!((balance.status, balance.receipt.v), (200, 2));
    let charge = alice
        .call(
            CallSpec::new("payments", "POST", "/v1/charges")
                .header("content-type", "application/json")
                .body(br#"{"amount":700,"currency":"usd"}"#.to_vec()),
        )
        .await?;
    assert_eq!(charge.status, 200);
    let bob = Client::open(
        didgate_client::identity::load(&fx.join("clients/bob/identity"))?,
        bob_chain,
        daemon.addr,
        gw_did,
    )
    .await?;
    assert_eq!(
        bob.call(CallSpec::new("payments", "GET", "/v1/balance"))
            .await?
            .status,
        200
    );
    let refused = bob
        .call(CallSpec::new("payments", "POST", "/v1/charges"))
        .await;
    assert_eq!(refusal_code(&refused), Some(RefusalCode::Policy));
    for c in [alice, bob] {
        c.close().await;
    }
    // SIGTERM: the daemon drains, checkpoints and exits 0
    let killed = Command::new("kill")
        .args(["-TERM", &daemon.pid().to_string()])
        .status()?;
    assert!(killed.success(), "kill -TERM");
    daemon.wait()?;
    Ok(charge.call)
}

/// Step 3: each chain switched to version 2 once, right after its old head, each switch sealed
/// by a version 2 checkpoint; every executed entry after the switch names the secret's id and
/// the version the rotation made current.
fn each_chain_switched_once(
    [gw, alice_chain, bob_chain]: [&Path; 3],
    before: &[usize],
    secret: [u8; 16],
) -> anyhow::Result<()> {
    let gw_entries = switched_once(gw, before[0])?;
    switched_once(alice_chain, before[1])?;
    switched_once(bob_chain, before[2])?;
    // after the switch, the snapshot and the rotation, the calls: each executed entry names the
    // secret's id and the version the rotation made current
    assert_eq!(gw_entries[before[0] + 3].kind, EntryKind::Executing);
    let used: Vec<([u8; 16], u64)> = gw_entries[before[0]..]
        .iter()
        .filter(|e| e.kind == EntryKind::Executed)
        .map(|e| e.secret_id.zip(e.secret_version))
        .collect::<Option<_>>()
        .ok_or_else(|| anyhow::anyhow!("an executed entry names no secret"))?;
    assert_eq!(used, vec![(secret, 2); 3]);
    // each switch is sealed by a version 2 checkpoint that covers it
    for (s, n) in [gw, alice_chain, bob_chain].iter().zip(before) {
        let sealed = didgate_audit::load_records(s)?
            .checkpoints
            .iter()
            .map(|b| message::open::<Checkpoint>(b).map(|c| c.into_message()))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .any(|c| c.size == *n as u64 + 1 && c.v == 2);
        assert!(sealed, "{}: no checkpoint at the switch", s.display());
    }
    Ok(())
}

/// Step 4: the whole chains verify with the library and with `didgate-audit verify` on the
/// stores and on fresh exports. Returns the gateway's and alice's exports.
fn the_whole_chains_verify(
    dir: &Path,
    [gw, alice_chain, bob_chain]: [&Path; 3],
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let report = didgate_audit::verify::verify(
        &[didgate_audit::load_records(gw)?],
        &[
            didgate_audit::load_records(alice_chain)?,
            didgate_audit::load_records(bob_chain)?,
        ],
    );
    assert!(report.ok(), "{:#?}", report.violations);
    // 7 before, and as many again: two executed calls of alice, one of bob, bob's refusal
    assert_eq!(report.cross_links, 7 + 7, "{report:?}");
    verify_ok(gw, &[alice_chain, bob_chain])?;
    let (gw_export, alice_export) = (dir.join("gw.cbor"), dir.join("alice.cbor"));
    let (code, out) = run(
        "didgated",
        &[&p("export"), &p("--data"), gw, &p("--out"), &gw_export],
        None,
    )?;
    assert_eq!(code, 0, "{out}");
    let (code, out) = run(
        "didgate-audit",
        &[
            &p("export"),
            &p("--db"),
            alice_chain,
            &p("--out"),
            &alice_export,
        ],
        None,
    )?;
    assert_eq!(code, 0, "{out}");
    verify_ok(&gw_export, &[&alice_export])?;
    Ok((gw_export, alice_export))
}

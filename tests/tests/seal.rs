//! Sealed chains (issue 16): `didgated export` (through a running daemon, or on a stopped
//! daemon's store), `didgate export` and `didgated seal` leave the chain's last entry covered by a
//! checkpoint its owner signed, and sealing writes nothing but that checkpoint.

use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure};
use didgate_audit::entry::entry_hash;
use didgate_audit::{ChainRecords, LoadError, export, load_records};
use didgate_client::{CallSpec, Client};
use didgate_protocol::Did;
use didgate_protocol::message::{Checkpoint, open_from};
use didgate_tests::{Daemon, Harness, alice, bin};

fn balance() -> CallSpec {
    CallSpec::new("payments", "GET", "/v1/balance")
}

/// Whether the last checkpoint of `records` covers its last entry (its signature unchecked).
fn covered(records: &ChainRecords) -> anyhow::Result<bool> {
    let size = records.entries.last().map_or(0, |(seq, _)| seq + 1);
    Ok(match records.checkpoints.last() {
        Some(bytes) => {
            didgate_protocol::message::open::<Checkpoint>(bytes)?
                .message()
                .size
                == size
        }
        None => size == 0,
    })
}

/// The last checkpoint of `records` is signed by `owner` and covers its last entry exactly:
/// size = highest seq + 1, head = that entry's hash.
fn assert_sealed(records: &ChainRecords, owner: &Did) -> anyhow::Result<()> {
    let (seq, bytes) = records
        .entries
        .last()
        .ok_or_else(|| anyhow!("{}: no entries", records.label))?;
    let last = records
        .checkpoints
        .last()
        .ok_or_else(|| anyhow!("{}: no checkpoint", records.label))?;
    let cp = open_from::<Checkpoint>(last, owner)?.into_message();
    ensure!(
        cp.size == seq + 1 && cp.head == entry_hash(bytes),
        "{}: the last checkpoint covers {} entries, the last entry is {seq}",
        records.label,
        cp.size
    );
    Ok(())
}

fn run(name: &str, args: &[&std::ffi::OsStr]) -> anyhow::Result<Output> {
    Ok(std::process::Command::new(bin(name)?).args(args).output()?)
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The chain at `path` once no process holds its store (a writer that was just dropped lets
/// go of it when its thread ends).
fn records_when_free(path: &Path) -> anyhow::Result<ChainRecords> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match load_records(path) {
            Err(LoadError::Store(e)) if e.is_locked() && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return Ok(other?),
        }
    }
}

/// Starts `didgated serve` on the Harness's data directory, makes `calls` calls as alice (her
/// chain closed after them), then kills the daemon with SIGKILL: the gateway chain's last
/// entries are covered by no checkpoint.
async fn calls_then_kill(h: &Harness, calls: usize) -> anyhow::Result<ChainRecords> {
    let daemon = Daemon::start(&h.gw_dir(), &h.dir.path().join("didgated.log"))?;
    let client = Client::open(
        alice(),
        &h.chain_dir("alice"),
        daemon.addr,
        h.gw_did.clone(),
    )
    .await?;
    for _ in 0..calls {
        client.call(balance()).await?;
    }
    client.close().await;
    daemon.kill()?;
    let records = load_records(&h.gw_dir())?;
    ensure!(
        !covered(&records)?,
        "the killed daemon's chain is sealed already"
    );
    Ok(records)
}

fn verify(gateway: &Path, client: &Path) -> anyhow::Result<()> {
    let out = run(
        "didgate-audit",
        &[
            "verify".as_ref(),
            "--gateway".as_ref(),
            gateway.as_os_str(),
            "--client".as_ref(),
            client.as_os_str(),
        ],
    )?;
    ensure!(out.status.success(), "verify: {}", text(&out));
    Ok(())
}

/// `didgated export` through a running daemon while calls keep coming: the file ends with the
/// gateway's checkpoint of its last entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_export_is_sealed_while_calls_go_on() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    h.stop().await;
    let data = h.gw_dir();
    let daemon = Daemon::start(&data, &h.dir.path().join("didgated.log"))?;
    let client = Arc::new(
        Client::open(
            alice(),
            &h.chain_dir("alice"),
            daemon.addr,
            h.gw_did.clone(),
        )
        .await?,
    );
    for _ in 0..3 {
        client.call(balance()).await?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn({
        let (client, stop) = (client.clone(), stop.clone());
        async move {
            while !stop.load(Ordering::Acquire) {
                let _ = client.call(balance()).await;
            }
        }
    });
    let out = h.dir.path().join("gateway.cbor");
    let exported = tokio::process::Command::new(bin("didgated")?)
        .arg("export")
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .output()
        .await?;
    stop.store(true, Ordering::Release);
    load.await?;
    ensure!(exported.status.success(), "export: {}", text(&exported));
    let records = export::import(&out, "gateway export")?;
    ensure!(records.entries.len() >= 7, "genesis and three calls");
    assert_sealed(&records, &h.gw_did)?;
    client.close().await;
    drop(daemon);
    Ok(())
}

/// A stopped daemon's store whose last entries no checkpoint covers: `didgated seal` covers
/// them with one checkpoint and nothing else, says so, and a second `seal` writes nothing;
/// `didgated export` with no daemon does the same sealing first. Both results verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_store_is_sealed_by_seal_and_export() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    h.stop().await;
    let data = h.gw_dir();
    let seal = || {
        run(
            "didgated",
            &["seal".as_ref(), "--data".as_ref(), data.as_os_str()],
        )
    };

    let before = calls_then_kill(&h, 2).await?;
    let out = seal()?;
    ensure!(out.status.success(), "seal: {}", text(&out));
    ensure!(text(&out).contains("signed a checkpoint"), "{}", text(&out));
    let after = load_records(&data)?;
    ensure!(after.entries == before.entries, "sealing wrote an entry");
    ensure!(after.checkpoints.len() == before.checkpoints.len() + 1);
    assert_sealed(&after, &h.gw_did)?;
    let out = seal()?;
    ensure!(out.status.success(), "second seal: {}", text(&out));
    ensure!(text(&out).contains("nothing written"), "{}", text(&out));
    let again = load_records(&data)?;
    ensure!(again.entries == after.entries && again.checkpoints == after.checkpoints);
    verify(&data, &h.chain_dir("alice"))?;

    let before = calls_then_kill(&h, 2).await?;
    let file = h.dir.path().join("gateway.cbor");
    let out = run(
        "didgated",
        &[
            "export".as_ref(),
            "--data".as_ref(),
            data.as_os_str(),
            "--out".as_ref(),
            file.as_os_str(),
        ],
    )?;
    ensure!(out.status.success(), "export: {}", text(&out));
    let exported = export::import(&file, "gateway export")?;
    ensure!(exported.entries == before.entries, "sealing wrote an entry");
    ensure!(exported.checkpoints.len() == before.checkpoints.len() + 1);
    assert_sealed(&exported, &h.gw_did)?;
    verify(&file, &h.chain_dir("alice"))?;

    // no store: a clear error, exit 2
    let empty = h.dir.path().join("empty");
    std::fs::create_dir_all(&empty)?;
    let out = run(
        "didgated",
        &["seal".as_ref(), "--data".as_ref(), empty.as_os_str()],
    )?;
    ensure!(out.status.code() == Some(2), "{}", text(&out));
    ensure!(
        text(&out).contains("holds no gateway store"),
        "{}",
        text(&out)
    );
    Ok(())
}

/// `didgate export` of a client chain its process left unsealed (dropped without closing, as
/// after a crash): sealed with the client's identity, nothing but the checkpoint written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_export_is_sealed() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let home = h.dir.path().join("home");
    let seed = didgate_tests::seed_file(h.dir.path(), &[0xa1; 32])?;
    let didgate = |args: &[&std::ffi::OsStr]| {
        let mut all: Vec<&std::ffi::OsStr> = vec!["--home".as_ref(), home.as_os_str()];
        all.extend_from_slice(args);
        run("didgate", &all)
    };
    let out = didgate(&["keygen".as_ref(), "--seed-file".as_ref(), seed.as_ref()])?;
    ensure!(out.status.success(), "keygen: {}", text(&out));
    let chain = home.join("chain");
    let client = Client::open(alice(), &chain, h.addr, h.gw_did.clone()).await?;
    for _ in 0..2 {
        client.call(balance()).await?;
    }
    drop(client);
    let before = records_when_free(&chain)?;
    ensure!(
        !covered(&before)?,
        "the dropped client's chain is sealed already"
    );
    let file = h.dir.path().join("alice.cbor");
    let out = didgate(&[
        "--json".as_ref(),
        "export".as_ref(),
        "--out".as_ref(),
        file.as_os_str(),
    ])?;
    ensure!(out.status.success(), "export: {}", text(&out));
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(reply["sealed_now"] == true, "{reply}");
    let exported = export::import(&file, "alice export")?;
    ensure!(exported.entries == before.entries, "sealing wrote an entry");
    assert_sealed(&exported, alice().did())?;
    h.stop().await;
    verify(&h.gw_dir(), &file)?;
    Ok(())
}

/// Copies the previous release's gateway data directory (`tests/fixtures/release-b9992ca`, a
/// version 1 chain); git keeps no modes, and the identity must be 0600 to be read.
fn copy_v1_gateway(to: &Path) -> anyhow::Result<()> {
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/release-b9992ca/gateway"
    );
    didgate_tests::copy_private_tree(Path::new(fixture), to)
}

/// A store of the previous release whose last entries no checkpoint covers (its last
/// checkpoint removed): `didgated seal` does not switch it to version 2; it adds one version 1
/// checkpoint and nothing else, so the previous release's tools still read it.
#[test]
fn previous_release_store_is_sealed_in_its_version() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("gateway");
    copy_v1_gateway(&data)?;
    {
        let db = fjall::Database::builder(data.join("store")).open()?;
        let cps = db.keyspace("checkpoints", fjall::KeyspaceCreateOptions::default)?;
        let last = cps
            .last_key_value()
            .ok_or_else(|| anyhow!("the fixture has no checkpoint"))?
            .key()?;
        cps.remove(last)?;
        db.persist(fjall::PersistMode::SyncAll)?;
    }
    let before = records_when_free(&data)?;
    ensure!(!covered(&before)?, "the fixture is still sealed");
    let out = run(
        "didgated",
        &["seal".as_ref(), "--data".as_ref(), data.as_os_str()],
    )?;
    ensure!(out.status.success(), "seal: {}", text(&out));
    let after = load_records(&data)?;
    ensure!(after.entries == before.entries, "sealing wrote an entry");
    let (_, genesis) = after.entries.first().ok_or_else(|| anyhow!("no genesis"))?;
    let owner = Did::parse(
        didgate_audit::entry::Entry::decode(genesis)?
            .owner
            .as_deref()
            .unwrap_or_default(),
    )?;
    assert_sealed(&after, &owner)?;
    let last = after
        .checkpoints
        .last()
        .ok_or_else(|| anyhow!("no checkpoint"))?;
    ensure!(open_from::<Checkpoint>(last, &owner)?.message().v == 1);
    let out = run(
        "didgate-audit",
        &["verify".as_ref(), "--gateway".as_ref(), data.as_os_str()],
    )?;
    ensure!(out.status.success(), "verify: {}", text(&out));
    Ok(())
}

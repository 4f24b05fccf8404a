//! Crash rounds: the real `didgated serve` under load from several clients is killed with
//! SIGKILL at a random moment, restarted, and its chain (exported through the restarted daemon)
//! is held to every invariant after each round:
//!
//! - the gateway chain and every client chain verify together (`didgate_audit::verify`);
//! - no acknowledged entry is missing: the previous round's export is a prefix of this one, and
//!   every receipt a client verified names an entry present with that hash;
//! - no grant executes twice, and every executing entry is closed (executed, failed, abandoned);
//! - every call a client saw succeed is in the gateway's chain as executed;
//! - every request the upstream received is in the gateway's chain as executing (matched by the
//!   grant id the gateway passes as `Idempotency-Key`).
//!
//! `DIDGATE_CRASH_ROUNDS` (default 20) sets the rounds, `DIDGATE_CRASH_SEED` replays a run (the
//! seed is printed first).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use didgate_audit::entry::{Entry, EntryKind, Role};
use didgate_audit::verify::{self, ChainRecords};
use didgate_audit::{entry::entry_hash, export, load_records};
use didgate_client::{CallError, CallSpec, Client};
use didgate_protocol::Identity;
use didgate_protocol::message::EntryRef;
use didgate_tests::{CANARY, Daemon, Harness, alice, bin, bob, files_containing};
use rand::{Rng, SeedableRng};

/// A client chain's name and its identity.
type Named = (&'static str, fn() -> Identity);

/// What the clients saw succeed: call ID -> the receipt's (grant, closing entry).
type Successes = Arc<Mutex<HashMap<[u8; 32], ([u8; 16], EntryRef)>>>;

/// One client's load: calls until `stop`, two-step grants every third call for alice's
/// second chain; successes recorded.
async fn load(client: Arc<Client>, who: &'static str, stop: Arc<AtomicBool>, ok: Successes) {
    let mut i = 0u64;
    while !stop.load(Ordering::Acquire) {
        i += 1;
        let spec = match who {
            "bob" => CallSpec::new("payments", "GET", "/v1/balance"),
            _ => CallSpec::new("payments", "POST", "/v1/charges")
                .header("content-type", "application/json")
                .body(format!(r#"{{"amount":{i},"currency":"usd"}}"#).into_bytes()),
        };
        let answer = if who == "alice-b" && i.is_multiple_of(3) {
            match client.grant(spec).await {
                Ok(g) => client.execute(&g).await,
                Err(e) => Err(e),
            }
        } else {
            client.call(spec).await
        };
        match answer {
            Ok(a) => {
                ok.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(a.call, (a.receipt.grant, a.receipt.entry));
            }
            Err(CallError::Audit(_)) => return,
            Err(_) => {}
        }
    }
}

fn decode_all(records: &ChainRecords) -> anyhow::Result<Vec<Entry>> {
    records
        .entries
        .iter()
        .map(|(_, b)| Ok(Entry::decode(b)?))
        .collect()
}

/// Checks every invariant of the module docs on the gateway export `gw` (taken right after a
/// restart) and returns it.
fn check_round(
    round: usize,
    h: &Harness,
    gw: ChainRecords,
    previous: Option<&ChainRecords>,
    clients: &[PathBuf],
    ok: &Successes,
) -> anyhow::Result<ChainRecords> {
    let entries = decode_all(&gw)?;
    // nothing acknowledged before is missing or altered
    if let Some(prev) = previous {
        assert!(
            gw.entries.len() >= prev.entries.len(),
            "round {round}: the chain shrank"
        );
        assert!(
            gw.entries[..prev.entries.len()] == prev.entries[..],
            "round {round}: an entry exported before changed"
        );
    }
    let by_seq: HashMap<u64, &Vec<u8>> = gw.entries.iter().map(|(s, b)| (*s, b)).collect();
    // executing entries: grants unique, each closed exactly once
    let mut grants = HashSet::new();
    let mut open: HashMap<[u8; 32], usize> = HashMap::new();
    let mut executed = HashSet::new();
    for e in &entries {
        match e.kind {
            EntryKind::Executing => {
                let grant = e
                    .grant
                    .ok_or_else(|| anyhow::anyhow!("executing without grant"))?;
                assert!(grants.insert(grant), "round {round}: grant executed twice");
                let call = e
                    .call
                    .ok_or_else(|| anyhow::anyhow!("executing without call"))?;
                assert!(
                    open.insert(call, 0).is_none(),
                    "round {round}: call executing twice"
                );
            }
            EntryKind::Executed | EntryKind::Failed | EntryKind::Abandoned => {
                let call = e
                    .call
                    .ok_or_else(|| anyhow::anyhow!("close without call"))?;
                *open.get_mut(&call).ok_or_else(|| {
                    anyhow::anyhow!("round {round}: a close with no executing entry")
                })? += 1;
                if e.kind == EntryKind::Executed {
                    executed.insert(call);
                }
            }
            _ => {}
        }
    }
    for (call, closes) in &open {
        assert_eq!(
            *closes,
            1,
            "round {round}: call {} closed {closes} times",
            hex::encode(call)
        );
    }
    // every success a client saw is there, at the entry its receipt named
    for (call, (grant, entry)) in ok.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        assert!(
            executed.contains(call),
            "round {round}: a success is missing"
        );
        assert!(
            grants.contains(grant),
            "round {round}: a receipt's grant is missing"
        );
        let bytes = by_seq
            .get(&entry.seq)
            .ok_or_else(|| anyhow::anyhow!("round {round}: receipt entry {} missing", entry.seq))?;
        assert_eq!(
            entry_hash(bytes),
            entry.hash,
            "round {round}: receipt entry {} differs",
            entry.seq
        );
    }
    // every request the upstream received was durably executing first
    for seen in h.upstream.seen() {
        let key = seen
            .idempotency_key
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("an upstream request without a grant id"))?;
        let mut grant = [0u8; 16];
        hex::decode_to_slice(key, &mut grant)?;
        assert!(
            grants.contains(&grant),
            "round {round}: the upstream received a call the chain has no executing entry for"
        );
    }
    // both chains verify
    let client_records = clients
        .iter()
        .filter(|c| c.exists())
        .map(|c| load_records(c))
        .collect::<Result<Vec<_>, _>>()?;
    let report = verify::verify(std::slice::from_ref(&gw), &client_records);
    assert!(report.ok(), "round {round}: {:?}", report.violations);
    Ok(gw)
}

fn export_now(data: &Path, out: &Path) -> anyhow::Result<ChainRecords> {
    let status = Command::new(bin("didgated")?)
        .arg("export")
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "didgated export failed: {status}");
    Ok(export::import(out, "gateway")?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_nothing_acknowledged() -> anyhow::Result<()> {
    let rounds: usize = std::env::var("DIDGATE_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("DIDGATE_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    println!("crash rounds: {rounds}, seed {seed} (replay: DIDGATE_CRASH_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    // a fixed port, so calls racing the kill reach the restarted daemon instead of waiting out
    // a connect timeout
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
    let mut h = Harness::start_with(|c| c.gateway.listen = port).await?;
    h.stop().await;
    let data = h.gw_dir();
    let log = h.dir.path().join("didgated.log");
    let export_file = h.dir.path().join("gateway.export");
    let names: [Named; 3] = [("alice-a", alice), ("alice-b", alice), ("bob", bob)];
    let chains: Vec<PathBuf> = names.iter().map(|(n, _)| h.chain_dir(n)).collect();
    let ok: Successes = Arc::default();

    let mut daemon = Daemon::start(&data, &log)?;
    let mut previous = check_round(0, &h, export_now(&data, &export_file)?, None, &chains, &ok)?;
    for round in 1..=rounds {
        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = Vec::new();
        let mut tasks = Vec::new();
        for (name, id) in &names {
            let c = Arc::new(
                Client::open(id(), &h.chain_dir(name), daemon.addr, h.gw_did.clone()).await?,
            );
            tasks.push(tokio::spawn(load(
                c.clone(),
                name,
                stop.clone(),
                ok.clone(),
            )));
            clients.push(c);
        }
        let delay = rng.gen_range(20..400u64);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        daemon.kill()?;
        stop.store(true, Ordering::Release);
        for c in &clients {
            c.disconnect().await;
        }
        // restart: start-up closes what the crash left open
        daemon = Daemon::start(&data, &log)?;
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(30), t).await??;
        }
        for c in &clients {
            c.close().await;
        }
        drop(clients);
        let gw = export_now(&data, &export_file)?;
        previous = check_round(round, &h, gw, Some(&previous), &chains, &ok)?;
    }
    daemon.kill()?;
    // after every kill: the daemon's log, the stores, the exports and the client chains hold
    // no plaintext key
    let hits = files_containing(h.dir.path(), CANARY.as_bytes());
    assert!(hits.is_empty(), "canary in {hits:?}");
    let entries = decode_all(&previous)?;
    let count = |k: EntryKind| entries.iter().filter(|e| e.kind == k).count();
    println!(
        "after {rounds} kill -9 rounds: {} calls executed, {} failed, {} abandoned, {} client successes, {} upstream requests, {} gateway entries",
        count(EntryKind::Executed),
        count(EntryKind::Failed),
        count(EntryKind::Abandoned),
        ok.lock().unwrap_or_else(|p| p.into_inner()).len(),
        h.upstream.seen().len(),
        entries.len()
    );
    assert!(
        count(EntryKind::Executed) >= rounds,
        "the load made too few calls to test anything"
    );
    assert_eq!(
        entries.first().and_then(|e| e.role),
        Some(Role::Gateway),
        "the export is the gateway's chain"
    );
    Ok(())
}

//! didgate-bench: figures for calls through didgate and for the audit log.
//!
//! `didgate-bench` (no subcommand) is the call benchmark of [`calls`]: the same local upstream
//! and load generator for a direct call, nginx injecting the header, the didgate library over
//! QUIC to a `didgated serve` process, and the `didgate proxy` local proxy when the build has
//! one; both audit chains are verified at the end.
//!
//! `didgate-bench audit` measures, on this machine:
//!
//! 1. durable appends (every append awaited, i.e. fsynced) to a real [`Store`] + [`Chain`] on
//!    disk, with 1 writer and with 64 concurrent writers;
//! 2. the generation of a gateway chain and client chains from N calls, built in memory exactly
//!    as the gateway and the client write them (real signed requests, receipts with entry and
//!    Merkle root, checkpoints every 4096 entries), without the network;
//! 3. `verify` throughput on those chains with one thread and with every core, and where the
//!    time goes.
//!
//! It ends with one JSON line holding the figures.
//!
//! `didgate-bench flood` is the handshake flood of [`flood`].
//!
//! `didgate-bench growth` is the gateway's CPU and store size per call as calls accumulate, of
//! [`growth`].
//!
//! `didgate-bench cluster` is a cluster node's CPU per call against a single gateway's, and the
//! latency of a followed `moved`, of [`cluster`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::{Parser, Subcommand};
use didgate_audit::entry::{Entry, EntryKind, Outcome, Role, entry_hash};
use didgate_audit::merkle::{Frontier, leaf_hash};
use didgate_audit::store::{Chain, CheckpointPolicy, Store};
use didgate_audit::verify::{self, ChainRecords};
use didgate_protocol::envelope::{self, Kind};
use didgate_protocol::message::{
    ChainHead, Checkpoint, Digest, EntryRef, Message, Receipt, Request, SignedMessage,
};
use didgate_protocol::{Did, Identity};

/// The version of the messages and entries the benchmark builds.
const VERSION: u64 = didgate_protocol::Version::CURRENT.as_u64();

#[path = "didgate-bench/calls.rs"]
mod calls;
#[path = "didgate-bench/cluster.rs"]
mod cluster;
#[path = "didgate-bench/flood.rs"]
mod flood;
#[path = "didgate-bench/growth.rs"]
mod growth;
#[path = "didgate-bench/host.rs"]
mod host;

use host::{cpu_model, ms, threads, work_dir};

/// mimalloc instead of glibc's malloc: allocation and free were about 12% of the gateway's CPU
/// per call in `perf` (docs/performance.md, "Calls").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "didgate-bench",
    version,
    about = "didgate benchmarks: calls (the default) and the audit log",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// The call benchmark's options (when no subcommand is given).
    #[command(flatten)]
    calls: calls::CallArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Audit log: durable appends, chain generation, verify throughput.
    Audit(AuditArgs),
    /// A handshake flood from one loopback address against a legitimate caller, with the
    /// admission of new connections off and at its defaults.
    Flood(flood::FloodArgs),
    /// Whether the gateway's CPU per call and its store's size per call stay flat as calls
    /// accumulate.
    Growth(growth::GrowthArgs),
    /// A node's CPU per call in a 3-node cluster against a single gateway, and the latency a
    /// followed `moved` adds (needs etcd).
    Cluster(cluster::ClusterArgs),
}

#[derive(clap::Args)]
struct AuditArgs {
    /// Calls to generate chains from [default: 1000000; 20000 with --quick].
    #[arg(long)]
    calls: Option<u64>,
    /// A short run: 20,000 calls and fewer appends.
    #[arg(long)]
    quick: bool,
    /// Directory for the append benchmark's stores (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// Client identities the generated calls are spread over.
const CLIENTS: usize = 16;
/// Entries between signed checkpoints (the store's default policy).
const CHECKPOINT_EVERY: u64 = 4096;
/// Calls in flight at once during generation: they sign against the same client heads.
const WAVE: usize = 2048;
/// A fixed clock for generated entries, ms since the Unix epoch.
const T0: u64 = 1_780_000_000_000;

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::Audit(args)) => audit(args),
        Some(Cmd::Flood(args)) => flood::run(args),
        Some(Cmd::Growth(args)) => growth::run(args),
        Some(Cmd::Cluster(args)) => cluster::run(args),
        None => calls::run(cli.calls),
    }
}

fn audit(args: AuditArgs) -> Result<()> {
    let calls = args
        .calls
        .unwrap_or(if args.quick { 20_000 } else { 1_000_000 });
    ensure!(calls > 0, "--calls must be at least 1");
    let (single, writers, per_writer) = if args.quick {
        (300, 64, 100)
    } else {
        (2_000, 64, 1_000)
    };
    let cores = threads();
    println!("didgate-bench audit: {calls} calls, {cores} core(s)");
    println!("machine: {}", cpu_model());

    // 1. Durable appends.
    let base = work_dir(args.dir.as_deref())?;
    println!(
        "\n== durable appends (store in {}) ==",
        base.path().display()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let one = rt.block_on(appends(&base.path().join("w1"), 1, single))?;
    one.print("1 writer");
    let many = rt.block_on(appends(&base.path().join("w64"), writers, per_writer))?;
    many.print(&format!("{writers} writers"));
    drop(rt);
    drop(base);

    // 2. Chains from N calls.
    println!("\n== generating chains from {calls} calls ({CLIENTS} clients) ==");
    let started = Instant::now();
    let (gateway, clients) = generate(calls, cores)?;
    let generate_s = started.elapsed().as_secs_f64();
    let entries: u64 = std::iter::once(&gateway)
        .chain(&clients)
        .map(|c| c.entries.len() as u64)
        .sum();
    let checkpoints: usize = std::iter::once(&gateway)
        .chain(&clients)
        .map(|c| c.checkpoints.len())
        .sum();
    println!(
        "generated {entries} entries ({} gateway, {} client), {checkpoints} checkpoints in {generate_s:.1} s",
        gateway.entries.len(),
        entries - gateway.entries.len() as u64
    );
    let gateways = [gateway];

    // 3. Verify: every core first (it is also the check that the data verifies), then one.
    println!("\n== verify ==");
    let (all_report, all) = verify::verify_phases(&gateways, &clients, cores);
    ensure!(
        all_report.ok(),
        "generated chains do not verify: {} violation(s), first: {}",
        all_report.violations.len(),
        all_report.violations[0]
    );
    let (one_report, single_core) = verify::verify_phases(&gateways, &clients, 1);
    ensure!(
        format!("{:?}", one_report.violations) == format!("{:?}", all_report.violations)
            && one_report.cross_links == all_report.cross_links,
        "1-thread and {cores}-thread reports differ"
    );
    let rows = [(1usize, &single_core), (cores, &all)];
    println!(
        "{:>7} {:>9} {:>12} {:>11} {:>12}",
        "threads", "seconds", "entries/s", "sigs", "sigs/s"
    );
    for (t, p) in rows {
        let s = p.total.as_secs_f64();
        println!(
            "{t:>7} {s:>9.2} {:>12.0} {:>11} {:>12.0}",
            entries as f64 / s,
            p.signatures,
            p.signatures as f64 / s
        );
    }
    println!(
        "cross-links {}, signed blobs referenced {} (distinct {}, each checked once)",
        all_report.cross_links, all.signed_refs, all.signatures
    );
    println!("\nwhere the time goes (wall seconds per phase):");
    println!(
        "{:<44} {:>9} {:>9}",
        "phase",
        "1 thread",
        format!("{cores} threads")
    );
    for (i, (name, d1)) in single_core.breakdown().into_iter().enumerate() {
        let dn = all.breakdown()[i].1;
        println!(
            "{name:<44} {:>9.2} {:>9.2}",
            d1.as_secs_f64(),
            dn.as_secs_f64()
        );
    }

    let json = serde_json::json!({
        "calls": calls,
        "entries": entries,
        "checkpoints": checkpoints,
        "signatures": all.signatures,
        "cores": cores,
        "append_1_per_s": one.per_s(),
        "append_1_p50_ms": ms(one.quantile(0.50)),
        "append_1_p99_ms": ms(one.quantile(0.99)),
        "append_64_per_s": many.per_s(),
        "append_64_p50_ms": ms(many.quantile(0.50)),
        "append_64_p99_ms": ms(many.quantile(0.99)),
        "generate_s": generate_s,
        "verify_1core_s": single_core.total.as_secs_f64(),
        "verify_1core_entries_per_s": entries as f64 / single_core.total.as_secs_f64(),
        "verify_1core_sigs_per_s": single_core.signatures as f64 / single_core.total.as_secs_f64(),
        format!("verify_{cores}core_s"): all.total.as_secs_f64(),
        format!("verify_{cores}core_entries_per_s"): entries as f64 / all.total.as_secs_f64(),
        format!("verify_{cores}core_sigs_per_s"): all.signatures as f64 / all.total.as_secs_f64(),
    });
    println!("\n{json}");
    Ok(())
}

/// Latencies of one append run.
struct AppendStats {
    count: usize,
    wall: Duration,
    latencies: Vec<Duration>,
}

impl AppendStats {
    fn per_s(&self) -> f64 {
        self.count as f64 / self.wall.as_secs_f64()
    }

    fn quantile(&self, q: f64) -> Duration {
        let i = ((self.latencies.len() as f64 * q).ceil() as usize).saturating_sub(1);
        self.latencies.get(i).copied().unwrap_or_default()
    }

    fn print(&self, what: &str) {
        println!(
            "{what:<11} {:>6} appends in {:>6.2} s: {:>8.0} entries/s, latency p50 {:.2} ms, p99 {:.2} ms",
            self.count,
            self.wall.as_secs_f64(),
            self.per_s(),
            ms(self.quantile(0.50)),
            ms(self.quantile(0.99)),
        );
    }
}

/// `writers` tasks each append `per` entries to one chain on disk, every append awaited.
async fn appends(dir: &Path, writers: usize, per: usize) -> Result<AppendStats> {
    let gw = Arc::new(Identity::from_seed(&[0x9a; 32]));
    let client = Identity::from_seed(&[0xc1; 32]);
    let store = Store::open(dir, &[])?;
    let chain = Chain::open(
        store,
        gw.clone(),
        Role::Gateway,
        T0,
        CheckpointPolicy::default(),
    )?;
    // A realistic pair: an executing entry (with a signed request) and its executed entry.
    let head = chain.head()?;
    let req = request(gw.did(), 0, head);
    let signed = req.sign(&client);
    let call = envelope::verify(&signed, Kind::Request)?.digest();
    let mut executing = Entry::new(EntryKind::Executing, T0);
    executing.call = Some(call);
    executing.signed = Some(signed);
    executing.subject = Some(client.did().to_string());
    executing.grant = Some([7; 16]);
    executing.peer_head = Some(head);
    let mut executed = Entry::new(EntryKind::Executed, T0);
    executed.call = Some(call);
    executed.status = Some(200);
    executed.resp_len = Some(64);
    executed.resp_b3 = Some([3; 32]);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(writers);
    for w in 0..writers {
        let chain = chain.clone();
        let (executing, executed) = (executing.clone(), executed.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per);
            for i in 0..per {
                let e = if (i + w) % 2 == 0 {
                    executing.clone()
                } else {
                    executed.clone()
                };
                let t = Instant::now();
                chain.append_entry(e).await?;
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut latencies = Vec::with_capacity(writers * per);
    for t in tasks {
        latencies.extend(t.await??);
    }
    let wall = started.elapsed();
    let appended = chain.head()?.seq;
    ensure!(
        appended == (writers * per) as u64,
        "chain holds {appended} appended entries, expected {}",
        writers * per
    );
    chain.close();
    latencies.sort_unstable();
    Ok(AppendStats {
        count: writers * per,
        wall,
        latencies,
    })
}

/// The request of call `i` from a client to the gateway `aud`, carrying `head`.
fn request(aud: &Did, i: u64, head: ChainHead) -> Request {
    let post = i.is_multiple_of(4);
    let body: &[u8] = if post { br#"{"amount":500}"# } else { b"" };
    let mut nonce = [0u8; 16];
    nonce.copy_from_slice(&blake3::hash(&i.to_be_bytes()).as_bytes()[..16]);
    Request {
        v: VERSION,
        aud: aud.to_string(),
        upstream: "payments".into(),
        method: if post { "POST" } else { "GET" }.into(),
        path: format!("/v1/items/{i}"),
        query: vec![("expand".into(), "customer".into())],
        headers: if post {
            vec![("content-type".into(), "application/json".into())]
        } else {
            Vec::new()
        },
        body_len: body.len() as u64,
        body_b3: *blake3::hash(body).as_bytes(),
        nonce,
        time_ms: T0 + i,
        head,
    }
}

/// One chain being built in memory the way the store's writer builds it.
struct Builder {
    label: String,
    owner: usize,
    did: String,
    id: Digest,
    entries: Vec<(u64, Vec<u8>)>,
    frontier: Frontier,
    head: EntryRef,
    /// Checkpoints due, not yet signed.
    due: Vec<Checkpoint>,
    last_cp: u64,
}

impl Builder {
    fn new(label: String, owner: usize, identity: &Identity, role: Role) -> Self {
        let mut genesis = Entry::new(EntryKind::Genesis, T0);
        genesis.owner = Some(identity.did().to_string());
        genesis.role = Some(role);
        let bytes = genesis.encode();
        let hash = entry_hash(&bytes);
        let mut frontier = Frontier::default();
        frontier.push(leaf_hash(&hash));
        Self {
            label,
            owner,
            did: identity.did().to_string(),
            id: hash,
            entries: vec![(0, bytes)],
            frontier,
            head: EntryRef { seq: 0, hash },
            due: Vec::new(),
            last_cp: 0,
        }
    }

    fn chain_head(&self) -> ChainHead {
        ChainHead {
            chain: self.id,
            seq: self.head.seq,
            hash: self.head.hash,
        }
    }

    /// Appends like the writer: seq, prev, encode, hash, Merkle leaf, checkpoint when due.
    fn push(&mut self, mut e: Entry) -> EntryRef {
        e.seq = self.head.seq + 1;
        e.prev = self.head.hash;
        let bytes = e.encode();
        let hash = entry_hash(&bytes);
        self.frontier.push(leaf_hash(&hash));
        self.entries.push((e.seq, bytes));
        self.head = EntryRef { seq: e.seq, hash };
        if self.frontier.size() - self.last_cp >= CHECKPOINT_EVERY {
            self.checkpoint(e.time_ms);
        }
        self.head
    }

    fn checkpoint(&mut self, time_ms: u64) {
        self.due.push(Checkpoint {
            v: VERSION,
            log: self.did.clone(),
            chain: self.id,
            size: self.frontier.size(),
            head: self.head.hash,
            root: self.frontier.root(),
            time_ms,
            node_cert: None,
        });
        self.last_cp = self.frontier.size();
    }

    /// The final checkpoint a close writes.
    fn close(&mut self, time_ms: u64) {
        if self.frontier.size() > self.last_cp {
            self.checkpoint(time_ms);
        }
    }
}

/// Maps `items` in order, split over `threads` scoped threads.
fn par_map<T: Sync, U: Send>(items: &[T], threads: usize, f: impl Fn(&T) -> U + Sync) -> Vec<U> {
    let chunk = items.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|c| s.spawn(|| c.iter().map(&f).collect::<Vec<U>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// The protected header bytes `identity` signs requests with (they do not depend on the
/// payload), so call IDs can be computed without verifying each request.
fn protected_header(identity: &Identity) -> Result<Vec<u8>> {
    let sample = envelope::sign(identity, Kind::Request, Vec::new());
    envelope::parse_for_tests(&sample)
        .and_then(|s| s.protected.original_data)
        .context("cannot read a protected header back")
}

/// Builds a gateway chain and `CLIENTS` client chains from `calls` calls.
fn generate(calls: u64, threads: usize) -> Result<(ChainRecords, Vec<ChainRecords>)> {
    let gw_id = Identity::from_seed(&[0x9a; 32]);
    let ids: Vec<Identity> = (0..CLIENTS)
        .map(|i| Identity::from_seed(&[i as u8 + 1; 32]))
        .collect();
    let protected = ids
        .iter()
        .map(protected_header)
        .collect::<Result<Vec<_>>>()?;
    let mut gw = Builder::new("gateway".into(), usize::MAX, &gw_id, Role::Gateway);
    let mut cls: Vec<Builder> = ids
        .iter()
        .enumerate()
        .map(|(j, id)| Builder::new(format!("client-{j:02}"), j, id, Role::Client))
        .collect();
    let mut sign_s = 0.0;
    let mut checked = false;
    let mut wave = 0u64;
    while wave < calls {
        let end = (wave + WAVE as u64).min(calls);
        // Clients sign their calls of this wave against their current heads.
        let reqs: Vec<(usize, Request)> = (wave..end)
            .map(|i| {
                let j = (i % CLIENTS as u64) as usize;
                (j, request(gw_id.did(), i, cls[j].chain_head()))
            })
            .collect();
        let t = Instant::now();
        let signed: Vec<(Vec<u8>, Digest)> = par_map(&reqs, threads, |(j, r)| {
            let payload = r.encode();
            let call = envelope::signed_digest(&protected[*j], &payload);
            (envelope::sign(&ids[*j], Kind::Request, payload), call)
        });
        sign_s += t.elapsed().as_secs_f64();
        if !checked {
            for (bytes, call) in signed.iter().take(CLIENTS) {
                ensure!(
                    envelope::verify(bytes, Kind::Request)?.digest() == *call,
                    "generated call ID differs from the envelope's digest"
                );
            }
            checked = true;
        }
        // Client: request entry; gateway: executing, then executed; the receipt names it.
        let receipts = record_wave(wave, &reqs, &signed, &ids, &mut gw, &mut cls);
        let t = Instant::now();
        let receipt_bytes = par_map(&receipts, threads, |(_, r)| r.sign(&gw_id));
        sign_s += t.elapsed().as_secs_f64();
        // Client: result entry with the receipt.
        for ((j, r), bytes) in receipts.iter().zip(receipt_bytes) {
            let mut e = Entry::new(EntryKind::Result, r.time_ms);
            e.call = Some(r.call);
            e.outcome = Some(Outcome::Receipt);
            e.signed = Some(bytes);
            e.peer_entry = Some(r.entry);
            cls[*j].push(e);
        }
        wave = end;
    }
    // Close every chain (final checkpoint) and sign the checkpoints.
    let close_time = T0 + calls + 1;
    gw.close(close_time);
    for c in &mut cls {
        c.close(close_time);
    }
    let t = Instant::now();
    let mut records = sign_checkpoints(gw, cls, &gw_id, &ids, threads);
    sign_s += t.elapsed().as_secs_f64();
    println!("  (of which signing on {threads} thread(s): {sign_s:.1} s)");
    let gateway = records.remove(0);
    Ok((gateway, records))
}

/// Records the calls of one wave, the first being call `first`, as the client and the gateway
/// write them: the client's request entry, the gateway's executing and executed entries.
/// Returns each call's client and receipt, naming the executed entry and the gateway's root
/// after it.
fn record_wave(
    first: u64,
    reqs: &[(usize, Request)],
    signed: &[(Vec<u8>, Digest)],
    ids: &[Identity],
    gw: &mut Builder,
    cls: &mut [Builder],
) -> Vec<(usize, Receipt)> {
    let mut receipts = Vec::with_capacity(reqs.len());
    for (k, ((j, req), (bytes, call))) in reqs.iter().zip(signed).enumerate() {
        let i = first + k as u64;
        let time = T0 + i;
        let mut e = Entry::new(EntryKind::Request, time);
        e.call = Some(*call);
        e.signed = Some(bytes.clone());
        cls[*j].push(e);
        let mut grant = [0u8; 16];
        grant.copy_from_slice(&blake3::hash(call).as_bytes()[..16]);
        let mut x = Entry::new(EntryKind::Executing, time);
        x.call = Some(*call);
        x.signed = Some(bytes.clone());
        x.subject = Some(ids[*j].did().to_string());
        x.grant = Some(grant);
        x.peer_head = Some(req.head);
        gw.push(x);
        let body = format!("{{\"id\":{i},\"status\":\"ok\"}}");
        let resp_b3 = *blake3::hash(body.as_bytes()).as_bytes();
        let mut d = Entry::new(EntryKind::Executed, time);
        d.call = Some(*call);
        d.status = Some(200);
        d.resp_len = Some(body.len() as u64);
        d.resp_b3 = Some(resp_b3);
        let at = gw.push(d);
        receipts.push((
            *j,
            Receipt {
                v: VERSION,
                call: *call,
                grant,
                client: ids[*j].did().to_string(),
                status: 200,
                resp_len: body.len() as u64,
                resp_b3,
                entry: at,
                root: Some(gw.frontier.root()),
                time_ms: time + 1,
                node_cert: None,
            },
        ));
    }
    receipts
}

/// The chains' records, the gateway's first, each with its checkpoints signed by its owner.
fn sign_checkpoints(
    gw: Builder,
    cls: Vec<Builder>,
    gw_id: &Identity,
    ids: &[Identity],
    threads: usize,
) -> Vec<ChainRecords> {
    let mut all = Vec::with_capacity(CLIENTS + 1);
    all.push(gw);
    all.extend(cls);
    let mut records: Vec<ChainRecords> = Vec::with_capacity(all.len());
    for b in all {
        let signer = if b.owner == usize::MAX {
            gw_id
        } else {
            &ids[b.owner]
        };
        let checkpoints = par_map(&b.due, threads, |cp| cp.sign(signer));
        records.push(ChainRecords {
            label: b.label,
            entries: b.entries,
            head: Some(b.head),
            checkpoints,
            documents: Vec::new(),
            sealed: false,
        });
    }
    records
}

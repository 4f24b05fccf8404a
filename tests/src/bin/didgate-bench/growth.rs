//! `didgate-bench growth` (issue 18, item 5): whether the gateway's CPU per call and its store's
//! size per call stay flat as calls accumulate (within 5% from 10,000 to 1,000,000 calls).
//!
//! One local upstream and one `didgated serve` process on 127.0.0.1, configured as the call
//! benchmark's library path (the same upstream, secret and policy, both audit chains durable:
//! every append acknowledged after its fsync), with `[gateway] skew_secs` from `--skew-secs`
//! (replay keys are kept for that window). `--clients` identities each hold one QUIC
//! connection; `--concurrency` workers spread over them make normal pipelined calls
//! (`Client::call`) until the next checkpoint. At each checkpoint of cumulative calls it prints
//! the gateway process's CPU (user + system, /proc/PID/stat) per call over the window since the
//! previous checkpoint, the window's calls/s, the bytes of every file under the gateway's data
//! directory (total and per call so far) and the load average; at the end, one JSON line with
//! the series and the ratio of the last window's CPU per call to the first window's.
//!
//! Then (unless `--paired-rounds 0`) the paired comparison: a fresh gateway is started beside
//! the aged one and the two are loaded in turn, so that the machine's drift over the run's
//! minutes (more than the 5% the target asks on this VM) weighs on both alike; it prints each
//! one's CPU per call over the comparison and their ratio, the figure the target is judged by.
//!
//! Every loop is bounded by its call count. Loopback only.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use didgate_client::Client;
use didgate_protocol::Identity;

use crate::calls::{
    Binaries, GatewayProcess, LIB_SEED, LocalUpstream, cpu_seconds, cpu_times, dir_usage,
    library_worker, load, no_admission,
};
use crate::host::{cpu_model, ms, threads, work_dir};

/// Options of the growth benchmark.
#[derive(clap::Args)]
pub(crate) struct GrowthArgs {
    /// Calls in all [default: 1000000; 20000 with --quick]; the run stops at the last
    /// checkpoint at most this.
    #[arg(long, value_name = "N")]
    calls: Option<u64>,
    /// Calls in flight at once.
    #[arg(long, value_name = "C", default_value_t = 64)]
    concurrency: usize,
    /// Client identities the calls are spread over, one QUIC connection each.
    #[arg(long, value_name = "K", default_value_t = 4)]
    clients: usize,
    /// The gateway's `[gateway] skew_secs`: accepted clock skew, and how long replay keys are
    /// kept.
    #[arg(long, value_name = "S", default_value_t = 30)]
    skew_secs: u64,
    /// Cumulative call counts to report at [default: 10000,30000,100000,300000,1000000;
    /// 5000,10000,20000 with --quick].
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    checkpoints: Option<Vec<u64>>,
    /// A short run: 20,000 calls, checkpoints at 5,000, 10,000 and 20,000.
    #[arg(long)]
    quick: bool,
    /// Working directory for the stores (default: the system temp dir); removed at the end.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Rounds of the paired comparison after the last checkpoint (0: none) [default: 3; 0
    /// with --quick].
    #[arg(long, value_name = "R")]
    paired_rounds: Option<u32>,
    /// Calls to each gateway in each round of the paired comparison.
    #[arg(long, value_name = "N", default_value_t = 20_000)]
    paired_calls: u64,
    /// Restart the aged gateway (a new process on its store) before the paired comparison:
    /// whether what an aged gateway costs more lies in its store or in its process's memory.
    #[arg(long)]
    restart_aged: bool,
}

/// The figures at one checkpoint; CPU and rate over the window since the previous one.
#[derive(Debug, Clone)]
struct Point {
    calls: u64,
    cpu_ms_per_call: f64,
    /// The part of `cpu_ms_per_call` spent in the kernel (system time).
    sys_ms_per_call: f64,
    calls_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    store_bytes: u64,
    store_allocated: u64,
    store_files: usize,
    /// Bytes the gateway caused to be written to storage in the window, per call
    /// (/proc/PID/io `write_bytes`): the store's writes, flushes and compactions, a measure of
    /// write amplification that does not depend on what else the machine runs.
    disk_bytes_per_call: f64,
    /// The gateway's resident memory at the checkpoint, MiB.
    rss_mib: f64,
    load1: Option<f64>,
}

impl Point {
    fn bytes_per_call(&self) -> f64 {
        self.store_bytes as f64 / self.calls as f64
    }
}

/// What the run measured.
struct Growth {
    series: Vec<Point>,
    wall_s: f64,
    peak_mib: f64,
    paired: Option<Paired>,
}

pub(crate) fn run(args: GrowthArgs) -> Result<()> {
    let calls = args
        .calls
        .unwrap_or(if args.quick { 20_000 } else { 1_000_000 });
    let mut checkpoints = args.checkpoints.clone().unwrap_or_else(|| {
        if args.quick {
            vec![5_000, 10_000, 20_000]
        } else {
            vec![10_000, 30_000, 100_000, 300_000, 1_000_000]
        }
    });
    checkpoints.sort_unstable();
    checkpoints.dedup();
    checkpoints.retain(|&c| c <= calls);
    ensure!(
        args.concurrency > 0 && (1..=64).contains(&args.clients),
        "--concurrency must be at least 1, --clients from 1 to 64"
    );
    ensure!(args.skew_secs > 0, "--skew-secs must be at least 1");
    ensure!(
        checkpoints.first().is_some_and(|&c| c > 0),
        "no checkpoint between 1 and --calls {calls}: give --checkpoints within it"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench(&args, &checkpoints))
}

async fn bench(args: &GrowthArgs, checkpoints: &[u64]) -> Result<()> {
    let last = checkpoints.last().copied().unwrap_or_default();
    println!(
        "didgate-bench growth: {last} calls at concurrency {} over {} client(s), checkpoints {}; gateway skew_secs {}; {} core(s), {}",
        args.concurrency,
        args.clients,
        checkpoints
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(","),
        args.skew_secs,
        threads(),
        cpu_model()
    );
    if args.calls.is_some_and(|n| n > last) {
        println!("(stopping at the last checkpoint, {last}, not --calls)");
    }
    let base = work_dir(args.dir.as_deref())?;
    let bins = Binaries::find().await?;
    let upstream = LocalUpstream::start().await?;
    let seeds: Vec<[u8; 32]> = (0..args.clients)
        .map(|i| match i {
            0 => LIB_SEED,
            // any seed but the benchmark's other identities
            i => [0x10u8.wrapping_add(i as u8); 32],
        })
        .collect();
    let principals: Vec<String> = seeds
        .iter()
        .map(|s| Identity::from_seed(s).did().to_string())
        .collect();
    let skew = args.skew_secs;
    let configure = |c: &mut didgate_gateway::config::RawConfig| {
        c.gateway.handshakes = no_admission();
        c.gateway.skew_secs = skew;
        for rule in &mut c.rules {
            for p in &principals {
                if !rule.principals.contains(p) {
                    rule.principals.push(p.clone());
                }
            }
        }
    };
    let mut gw = GatewayProcess::start_with(&bins, base.path(), upstream.addr, configure).await?;
    println!(
        "gateway {} (pid {}) on udp {}, data in {}",
        gw.did,
        gw.pid,
        gw.addr,
        gw.data.display()
    );
    let before = upstream.authorized();
    let mut measured = measure(args, checkpoints, &seeds, base.path(), &gw).await;
    let rounds = args.paired_rounds.unwrap_or(if args.quick { 0 } else { 3 });
    if rounds > 0
        && let Ok(g) = &mut measured
    {
        if args.restart_aged {
            gw = gw
                .restart(&bins)
                .await
                .context("restarting the aged gateway")?;
            println!("\naged gateway restarted on its store: pid {}", gw.pid);
        }
        let fresh_base = base.path().join("fresh");
        std::fs::create_dir_all(&fresh_base)?;
        let fresh =
            GatewayProcess::start_with(&bins, &fresh_base, upstream.addr, configure).await?;
        let compared = paired(args, rounds, &seeds, base.path(), (&gw, last), &fresh).await;
        let fresh_stopped = fresh.stop().await;
        match (compared, fresh_stopped) {
            (Ok(p), Ok(())) => g.paired = Some(p),
            (Err(e), _) | (Ok(_), Err(e)) => measured = Err(e),
        }
    }
    let data = gw.data.clone();
    let stopped = gw.stop().await;
    upstream.stop();
    let growth = match (measured, stopped) {
        (Ok(g), Ok(())) => g,
        (Err(e), Err(s)) => return Err(e.context(format!("(and stopping didgated: {s:#})"))),
        (Err(e), Ok(())) | (Ok(_), Err(e)) => return Err(e),
    };
    let authorized = upstream.authorized() - before;
    let expected = last + growth.paired.as_ref().map_or(0, |p| p.calls);
    ensure!(
        authorized == expected,
        "the upstream saw the credential on {authorized} of {expected} calls"
    );
    let after_stop = dir_usage(&data);
    print(args, &growth, after_stop.bytes);
    Ok(())
}

/// Opens the clients, makes the calls checkpoint by checkpoint, closes the clients.
async fn measure(
    args: &GrowthArgs,
    checkpoints: &[u64],
    seeds: &[[u8; 32]],
    base: &Path,
    gw: &GatewayProcess,
) -> Result<Growth> {
    let clients = open_clients(seeds, base, "client", gw).await?;
    println!(
        "\n{:>9} {:>15} {:>7} {:>9} {:>8} {:>8} {:>14} {:>11} {:>12} {:>8} {:>6}",
        "calls",
        "gw cpu ms/call",
        "of sys",
        "calls/s",
        "p50 ms",
        "p99 ms",
        "store bytes",
        "bytes/call",
        "written/call",
        "rss MiB",
        "load1"
    );
    // workers take the clients in turn
    let turn = AtomicUsize::new(0);
    let make = || {
        let c = clients[turn.fetch_add(1, Ordering::Relaxed) % clients.len()].clone();
        async move { anyhow::Ok(library_worker(c)) }
    };
    let mut series = Vec::with_capacity(checkpoints.len());
    let mut done = 0u64;
    let started = Instant::now();
    for &at in checkpoints {
        let window = at - done;
        let (user0, sys0) = cpu_times(gw.pid).context("reading the gateway's CPU time")?;
        let written0 = written_bytes(gw.pid)?;
        let run = load(window, args.concurrency, make)
            .await
            .with_context(|| format!("calls {} to {at}", done + 1))?;
        let (user1, sys1) = cpu_times(gw.pid).context("reading the gateway's CPU time")?;
        let (cpu, sys) = (user1 + sys1 - user0 - sys0, sys1 - sys0);
        let written = written_bytes(gw.pid)? - written0;
        done = at;
        let usage = dir_usage(&gw.data);
        let point = Point {
            calls: at,
            cpu_ms_per_call: cpu * 1e3 / window as f64,
            sys_ms_per_call: sys * 1e3 / window as f64,
            calls_per_sec: run.per_s(),
            p50_ms: ms(run.quantile(0.5)),
            p99_ms: ms(run.quantile(0.99)),
            store_bytes: usage.bytes,
            store_allocated: usage.allocated,
            store_files: usage.files,
            disk_bytes_per_call: written as f64 / window as f64,
            rss_mib: gw.memory("VmRSS")?,
            load1: load1(),
        };
        println!(
            "{:>9} {:>15.4} {:>7.4} {:>9.0} {:>8.3} {:>8.3} {:>14} {:>11.1} {:>12.0} {:>8.1} {:>6}",
            point.calls,
            point.cpu_ms_per_call,
            point.sys_ms_per_call,
            point.calls_per_sec,
            point.p50_ms,
            point.p99_ms,
            point.store_bytes,
            point.bytes_per_call(),
            point.disk_bytes_per_call,
            point.rss_mib,
            point
                .load1
                .map_or_else(|| "?".into(), |l| format!("{l:.2}")),
        );
        series.push(point);
    }
    let wall_s = started.elapsed().as_secs_f64();
    let peak_mib = gw.memory("VmHWM")?;
    for c in &clients {
        c.close().await;
    }
    Ok(Growth {
        series,
        wall_s,
        peak_mib,
        paired: None,
    })
}

/// The paired comparison: the aged gateway (every call of the run so far in its store) and a
/// fresh one (a new data directory, warmed with `--paired-calls` calls first) are loaded in
/// turn, `rounds` rounds of `--paired-calls` calls each, in the same minutes, so that what
/// else the machine does weighs on both alike (a run's windows are minutes apart, and this
/// machine's CPU per call drifts by more than the 5% the target asks). Each gateway's CPU is
/// counted over the whole comparison, from a settled start to a settled end (no CPU used for a
/// second, or 60 s), so work one gateway defers past its own turn (a compaction, a flush) is
/// still counted as its own.
async fn paired(
    args: &GrowthArgs,
    rounds: u32,
    seeds: &[[u8; 32]],
    base: &Path,
    aged: (&GatewayProcess, u64),
    fresh: &GatewayProcess,
) -> Result<Paired> {
    let (aged, aged_calls) = aged;
    let n = args.paired_calls;
    ensure!(n > 0, "--paired-calls must be at least 1");
    let sides = [
        open_clients(seeds, base, "paired-aged", aged).await?,
        open_clients(seeds, base, "paired-fresh", fresh).await?,
    ];
    let turn = AtomicUsize::new(0);
    let make = |side: usize| {
        let clients = &sides[side];
        let c = clients[turn.fetch_add(1, Ordering::Relaxed) % clients.len()].clone();
        async move { anyhow::Ok(library_worker(c)) }
    };
    // the fresh gateway's first calls, so that both have flushed and compacted before
    load(n, args.concurrency, || make(1))
        .await
        .context("warming the fresh gateway")?;
    println!(
        "\npaired comparison: {rounds} round(s) of {n} calls to each gateway in turn (aged: {aged_calls} calls before; fresh: {n})"
    );
    let settled = [settle(aged.pid).await?, settle(fresh.pid).await?];
    let start = [cpu_times(aged.pid)?, cpu_times(fresh.pid)?];
    let mut turns: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for r in 0..rounds {
        let order: [usize; 2] = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        for side in order {
            let pid = [aged.pid, fresh.pid][side];
            let cpu0 = cpu_seconds(pid)?;
            load(n, args.concurrency, || make(side))
                .await
                .with_context(|| format!("paired round {r}"))?;
            turns[side].push((cpu_seconds(pid)? - cpu0) * 1e3 / n as f64);
        }
    }
    let ended = [settle(aged.pid).await?, settle(fresh.pid).await?];
    let end = [cpu_times(aged.pid)?, cpu_times(fresh.pid)?];
    for clients in &sides {
        for c in clients {
            c.close().await;
        }
    }
    let calls = u64::from(rounds) * n;
    let per_call = |i: usize| {
        let ((u0, s0), (u1, s1)) = (start[i], end[i]);
        (
            (u1 + s1 - u0 - s0) * 1e3 / calls as f64,
            (s1 - s0) * 1e3 / calls as f64,
        )
    };
    let (aged_ms, aged_sys) = per_call(0);
    let (fresh_ms, fresh_sys) = per_call(1);
    let p = Paired {
        calls: calls * 2 + n,
        rounds,
        aged_ms,
        aged_sys,
        fresh_ms,
        fresh_sys,
        turns,
        settled: settled.iter().chain(&ended).all(|s| *s),
    };
    println!(
        "gateway CPU per call over the comparison: aged {:.4} ms ({:.4} system), fresh {:.4} ms ({:.4} system); aged / fresh {:.3}{}",
        p.aged_ms,
        p.aged_sys,
        p.fresh_ms,
        p.fresh_sys,
        p.aged_ms / p.fresh_ms,
        if p.settled {
            ""
        } else {
            " (a gateway did not settle within 60 s)"
        }
    );
    let show = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.4}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "each turn's own window, ms per call: aged {}; fresh {}",
        show(&p.turns[0]),
        show(&p.turns[1])
    );
    Ok(p)
}

/// Opens one client per seed to `gw`, each with its chain in `base/{prefix}-chain-{i}`.
async fn open_clients(
    seeds: &[[u8; 32]],
    base: &Path,
    prefix: &str,
    gw: &GatewayProcess,
) -> Result<Vec<Arc<Client>>> {
    let mut clients = Vec::with_capacity(seeds.len());
    for (i, seed) in seeds.iter().enumerate() {
        let client = Client::open(
            Identity::from_seed(seed),
            &base.join(format!("{prefix}-chain-{i}")),
            gw.addr,
            gw.did.clone(),
        )
        .await
        .with_context(|| format!("opening {prefix} client {i}"))?;
        clients.push(Arc::new(client));
    }
    Ok(clients)
}

/// Waits until process `pid` has used no CPU for a second (its flushes and compactions done),
/// polled every 250 ms for at most 60 s; whether it settled.
async fn settle(pid: u32) -> Result<bool> {
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    let mut quiet_since = Instant::now();
    let mut last = cpu_times(pid)?;
    while Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        let now = cpu_times(pid)?;
        // less than one clock tick (10 ms) used in the last 250 ms counts as quiet
        if now.0 + now.1 - last.0 - last.1 > 0.011 {
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() >= std::time::Duration::from_secs(1) {
            return Ok(true);
        }
        last = now;
    }
    Ok(false)
}

/// What the paired comparison measured.
struct Paired {
    /// Calls made to both gateways in the comparison, the fresh one's warm-up included.
    calls: u64,
    rounds: u32,
    aged_ms: f64,
    aged_sys: f64,
    fresh_ms: f64,
    fresh_sys: f64,
    /// CPU per call within each gateway's own turns, aged then fresh.
    turns: [Vec<f64>; 2],
    /// Both gateways settled before and after.
    settled: bool,
}

/// Bytes process `pid` caused to be sent to storage so far (/proc/PID/io `write_bytes`).
fn written_bytes(pid: u32) -> Result<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io"))
        .with_context(|| format!("reading /proc/{pid}/io"))?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .context("no write_bytes in /proc/PID/io")?
        .trim()
        .parse()
        .context("write_bytes")
}

/// The one-minute load average (/proc/loadavg).
fn load1() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `last / first`, when `first` is not zero.
fn ratio(last: f64, first: f64) -> Option<f64> {
    (first > 0.0).then(|| last / first)
}

fn print(args: &GrowthArgs, g: &Growth, bytes_after_stop: u64) {
    let (Some(first), Some(last)) = (g.series.first(), g.series.last()) else {
        return;
    };
    let cpu_ratio = ratio(last.cpu_ms_per_call, first.cpu_ms_per_call);
    let bytes_ratio = ratio(last.bytes_per_call(), first.bytes_per_call());
    let show = |r: Option<f64>| r.map_or_else(|| "n/a".into(), |r| format!("{r:.3}"));
    println!(
        "\n{} calls in {:.1} s; gateway CPU per call, last window / first: {}; store bytes per call, at {} / at {}: {}; gateway VmHWM {:.1} MiB; store {} bytes after the gateway stopped",
        last.calls,
        g.wall_s,
        show(cpu_ratio),
        last.calls,
        first.calls,
        show(bytes_ratio),
        g.peak_mib,
        bytes_after_stop
    );
    if g.wall_s < args.skew_secs as f64 {
        println!(
            "note: the run lasted less than skew_secs ({} s): no replay key outlived its window",
            args.skew_secs
        );
    }
    let series: Vec<_> = g
        .series
        .iter()
        .map(|p| {
            serde_json::json!({
                "calls": p.calls,
                "cpu_ms_per_call": p.cpu_ms_per_call,
                "sys_ms_per_call": p.sys_ms_per_call,
                "calls_per_sec": p.calls_per_sec,
                "store_bytes": p.store_bytes,
                "bytes_per_call": p.bytes_per_call(),
                "load1": p.load1,
                "p50_ms": p.p50_ms,
                "p99_ms": p.p99_ms,
                "store_allocated_bytes": p.store_allocated,
                "store_files": p.store_files,
                "disk_bytes_per_call": p.disk_bytes_per_call,
                "rss_mib": p.rss_mib,
            })
        })
        .collect();
    let json = serde_json::json!({
        "calls": last.calls,
        "concurrency": args.concurrency,
        "clients": args.clients,
        "skew_secs": args.skew_secs,
        "cores": threads(),
        "wall_s": g.wall_s,
        "series": series,
        "cpu_per_call_ratio_last_first": cpu_ratio,
        "bytes_per_call_ratio_last_first": bytes_ratio,
        "gateway_peak_rss_mib": g.peak_mib,
        "store_bytes_after_stop": bytes_after_stop,
        "paired": g.paired.as_ref().map(|p| serde_json::json!({
            "rounds": p.rounds,
            "calls_per_turn": args.paired_calls,
            "aged_cpu_ms_per_call": p.aged_ms,
            "aged_sys_ms_per_call": p.aged_sys,
            "fresh_cpu_ms_per_call": p.fresh_ms,
            "fresh_sys_ms_per_call": p.fresh_sys,
            "aged_over_fresh": p.aged_ms / p.fresh_ms,
            "aged_turns": p.turns[0],
            "fresh_turns": p.turns[1],
            "settled": p.settled,
        })),
    });
    println!("\n{json}");
}

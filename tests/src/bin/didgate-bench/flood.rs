//! `didgate-bench flood` (issue 15, item 7): what a handshake flood from one address does to a
//! legitimate caller, with the admission of new connections off (every connection accepted at
//! once, as before issue 15) and at its defaults (`[gateway.handshakes]`).
//!
//! For each configuration, a `didgated serve` process on 127.0.0.1 with the call benchmark's
//! upstream and policy:
//!
//! 1. quiet: the legitimate client (127.0.0.1) makes `--calls` calls one after another on its
//!    connection, then `--fresh` calls each on a new connection (handshake included);
//! 2. flood: from 127.0.0.2, new connections are offered at `--rate` a second for `--secs`
//!    seconds (at most `--concurrency` attempts in flight; an attempt that finds them all busy
//!    is not made and is counted as skipped), each with a fresh did:key certificate; every
//!    connection it gets is held open until the flood ends (at most `--hold`). Once the flood
//!    has made a second's worth of attempts, the legitimate client repeats step 1;
//! 3. the gateway's CPU (user + system, /proc) over the flood, in cores.
//!
//! Every loop is bounded by its count or the flood's duration. Loopback only.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use didgate_client::low_level::tls;
use didgate_client::{CallSpec, Client};
use didgate_gateway::config;
use didgate_protocol::Identity;

use crate::calls::{
    Binaries, GatewayProcess, LIB_SEED, LocalUpstream, PATH, Run, UPSTREAM, cpu_seconds,
    no_admission,
};
use crate::host::{cpu_model, ms, threads, work_dir};

/// Options of the flood benchmark.
#[derive(clap::Args)]
pub(crate) struct FloodArgs {
    /// How long the flood lasts, seconds.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// New connections the flood offers per second.
    #[arg(long, default_value_t = 2000)]
    rate: u64,
    /// Connection attempts of the flood in flight at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Connections the flood holds open at most.
    #[arg(long, default_value_t = 4000)]
    hold: usize,
    /// Legitimate calls one after another on one connection, per phase.
    #[arg(long, default_value_t = 400)]
    calls: u64,
    /// Legitimate calls each on a new connection, per phase.
    #[arg(long, default_value_t = 40)]
    fresh: u64,
    /// Working directory for the stores (default: the system temp dir); removed at the end.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

/// The flood's source address (the legitimate client is on 127.0.0.1).
const FLOOD_FROM: &str = "127.0.0.2";
/// Distinct flood identities, reused in turn (each a fresh did:key).
const FLOOD_IDENTITIES: usize = 64;
/// How long one flood attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// The legitimate client's figures in one phase.
struct Legit {
    calls: Run,
    fresh: Run,
}

/// What the flood's attempts came to.
#[derive(Default)]
struct FloodCounts {
    attempts: AtomicU64,
    established: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
    timed_out: AtomicU64,
    skipped: AtomicU64,
}

/// One configuration's figures.
struct Figures {
    label: &'static str,
    quiet: Legit,
    flood: Legit,
    gateway_cores: f64,
    flood_secs: f64,
    counts: [u64; 6],
}

pub(crate) fn run(args: FloodArgs) -> Result<()> {
    ensure!(
        args.secs > 0 && args.rate > 0 && args.concurrency > 0 && args.calls > 0 && args.fresh > 0,
        "counts must be at least 1"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench(args))
}

async fn bench(args: FloodArgs) -> Result<()> {
    println!(
        "didgate-bench flood: {} new connections/s for {} s from {FLOOD_FROM} (at most {} in flight, {} held); {} calls and {} fresh connections of a legitimate client on 127.0.0.1 per phase; {} core(s), {}",
        args.rate,
        args.secs,
        args.concurrency,
        args.hold,
        args.calls,
        args.fresh,
        threads(),
        cpu_model()
    );
    let bins = Binaries::find().await?;
    let upstream = LocalUpstream::start().await?;
    let mut all = Vec::new();
    for (label, handshakes) in [
        ("admission off", no_admission()),
        ("defaults", config::Handshakes::default()),
    ] {
        let base = work_dir(args.dir.as_deref())?;
        all.push(one(&args, &bins, &upstream, base.path(), label, handshakes).await?);
    }
    upstream.stop();
    print(&all);
    let mut json = serde_json::Map::new();
    for f in &all {
        let key = f.label.replace(' ', "_");
        json.insert(
            key,
            serde_json::json!({
                "quiet_call_p50_ms": ms(f.quiet.calls.quantile(0.5)),
                "flood_call_p50_ms": ms(f.flood.calls.quantile(0.5)),
                "call_p50_ratio": ratio(&f.flood.calls, &f.quiet.calls),
                "quiet_fresh_p50_ms": ms(f.quiet.fresh.quantile(0.5)),
                "flood_fresh_p50_ms": ms(f.flood.fresh.quantile(0.5)),
                "fresh_p50_ratio": ratio(&f.flood.fresh, &f.quiet.fresh),
                "gateway_cores_during_flood": f.gateway_cores,
                "flood_attempts": f.counts[0],
                "flood_established": f.counts[1],
                "flood_refused": f.counts[2],
            }),
        );
    }
    println!("\n{}", serde_json::Value::Object(json));
    Ok(())
}

fn ratio(during: &Run, quiet: &Run) -> f64 {
    let q = quiet.quantile(0.5).as_secs_f64();
    if q > 0.0 {
        during.quantile(0.5).as_secs_f64() / q
    } else {
        0.0
    }
}

/// One configuration: a gateway, its quiet phase, its flood.
async fn one(
    args: &FloodArgs,
    bins: &Binaries,
    upstream: &LocalUpstream,
    base: &std::path::Path,
    label: &'static str,
    handshakes: config::Handshakes,
) -> Result<Figures> {
    let gw = GatewayProcess::start(bins, base, upstream.addr, handshakes).await?;
    println!("\n== {label}: gateway pid {} on udp {} ==", gw.pid, gw.addr);
    let identity = Arc::new(Identity::from_seed(&LIB_SEED));
    let client = Client::open(
        Identity::from_seed(&LIB_SEED),
        &base.join("client-chain"),
        gw.addr,
        gw.did.clone(),
    )
    .await?;
    legit(&client, &identity, &gw, 50, 1).await?;
    let quiet = legit(&client, &identity, &gw, args.calls, args.fresh).await?;
    report("quiet", &quiet);

    let counts = Arc::new(FloodCounts::default());
    let cpu0 = cpu_seconds(gw.pid)?;
    let t0 = Instant::now();
    let (offered_tx, offered) = tokio::sync::oneshot::channel();
    let flood = tokio::spawn(flood(
        args_of(args),
        gw.addr,
        gw.did.clone(),
        counts.clone(),
        offered_tx,
    ));
    // the legitimate client starts once the flood made a second's worth of attempts
    let ramp = Instant::now() + Duration::from_secs(args.secs);
    while counts.attempts.load(Ordering::Relaxed) + counts.skipped.load(Ordering::Relaxed)
        < args.rate
        && Instant::now() < ramp
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let during = legit(&client, &identity, &gw, args.calls, args.fresh).await;
    // the gateway's CPU over the time the flood offered connections
    let _ = offered.await;
    let flood_secs = t0.elapsed().as_secs_f64();
    let gateway_cores = (cpu_seconds(gw.pid)? - cpu0) / flood_secs;
    flood.await.context("the flood task")??;
    let during = during?;
    report("flood", &during);
    let counts = [
        &counts.attempts,
        &counts.established,
        &counts.refused,
        &counts.failed,
        &counts.timed_out,
        &counts.skipped,
    ]
    .map(|c| c.load(Ordering::Relaxed));
    println!(
        "flood: {} attempts in {flood_secs:.1} s: {} established, {} refused, {} failed otherwise, {} timed out, {} not made (all {} in flight); gateway CPU {gateway_cores:.2} cores",
        counts[0], counts[1], counts[2], counts[3], counts[4], counts[5], args.concurrency
    );
    client.close().await;
    gw.stop().await?;
    Ok(Figures {
        label,
        quiet,
        flood: during,
        gateway_cores,
        flood_secs,
        counts,
    })
}

/// The flood's parameters (owned, for its task).
struct FloodPlan {
    secs: u64,
    rate: u64,
    concurrency: usize,
    hold: usize,
}

fn args_of(a: &FloodArgs) -> FloodPlan {
    FloodPlan {
        secs: a.secs,
        rate: a.rate,
        concurrency: a.concurrency,
        hold: a.hold,
    }
}

/// Offers new connections from [`FLOOD_FROM`] at the plan's rate for its duration (then says
/// so on `offered`), holds what it gets, then closes everything.
async fn flood(
    plan: FloodPlan,
    addr: SocketAddr,
    gw: didgate_protocol::Did,
    counts: Arc<FloodCounts>,
    offered: tokio::sync::oneshot::Sender<()>,
) -> Result<()> {
    let endpoint = quinn::Endpoint::client(format!("{FLOOD_FROM}:0").parse()?)
        .context("binding 127.0.0.2 (a loopback address)")?;
    let configs = (0..FLOOD_IDENTITIES)
        .map(|_| tls::client_config(&Identity::generate(), &gw))
        .collect::<Result<Vec<_>, _>>()?;
    let slots = Arc::new(tokio::sync::Semaphore::new(plan.concurrency));
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    // attempts are launched every 10 ms, rate/100 at a time
    let per_tick = plan.rate.div_ceil(100);
    let ticks = plan.secs * 100;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0usize;
    for _ in 0..ticks {
        tick.tick().await;
        for _ in 0..per_tick {
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                counts.skipped.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            counts.attempts.fetch_add(1, Ordering::Relaxed);
            let cfg = configs[n % configs.len()].clone();
            n += 1;
            let connecting = endpoint.connect_with(cfg, addr, tls::SERVER_NAME)?;
            let (counts, held, hold) = (counts.clone(), held.clone(), plan.hold);
            tokio::spawn(async move {
                let _slot = slot;
                match tokio::time::timeout(ATTEMPT_TIMEOUT, connecting).await {
                    Ok(Ok(conn)) => {
                        counts.established.fetch_add(1, Ordering::Relaxed);
                        let mut held = held.lock().unwrap_or_else(|p| p.into_inner());
                        if held.len() < hold {
                            held.push(conn);
                        } else {
                            conn.close(0u32.into(), b"bye");
                        }
                    }
                    Ok(Err(e)) if tls::is_connection_refused(&e) => {
                        counts.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(_)) => {
                        counts.failed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        counts.timed_out.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    }
    let _ = offered.send(());
    // the attempts still in flight end within their timeout
    let _all = slots
        .acquire_many(u32::try_from(plan.concurrency).unwrap_or(u32::MAX))
        .await?;
    let conns = std::mem::take(&mut *held.lock().unwrap_or_else(|p| p.into_inner()));
    for c in conns {
        c.close(0u32.into(), b"bye");
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), endpoint.wait_idle()).await;
    Ok(())
}

/// `calls` calls one after another on the client's connection, then `fresh` calls each on a
/// new connection.
async fn legit(
    client: &Client,
    identity: &Arc<Identity>,
    gw: &GatewayProcess,
    calls: u64,
    fresh: u64,
) -> Result<Legit> {
    let spec = || CallSpec::new(UPSTREAM, "GET", PATH);
    let mut lat = Vec::with_capacity(calls as usize);
    let t0 = Instant::now();
    for _ in 0..calls {
        let t = Instant::now();
        let a = client.call(spec()).await?;
        ensure!(a.status == 200, "a legitimate call failed: {}", a.status);
        lat.push(t.elapsed());
    }
    let calls = Run::new(t0.elapsed(), lat);
    let mut lat = Vec::with_capacity(fresh as usize);
    let t0 = Instant::now();
    for _ in 0..fresh {
        let c = Client::with_chain(
            identity.clone(),
            client.chain().clone(),
            gw.addr,
            gw.did.clone(),
        )?;
        let t = Instant::now();
        let a = c.call(spec()).await?;
        lat.push(t.elapsed());
        ensure!(a.status == 200, "a legitimate fresh call failed");
        // not `close`: that would stop the chain writer the clients share
        c.disconnect().await;
    }
    Ok(Legit {
        calls,
        fresh: Run::new(t0.elapsed(), lat),
    })
}

fn report(phase: &str, l: &Legit) {
    println!(
        "{phase}: call p50 {:.3} ms p99 {:.3} ms; call on a new connection p50 {:.3} ms p99 {:.3} ms",
        ms(l.calls.quantile(0.5)),
        ms(l.calls.quantile(0.99)),
        ms(l.fresh.quantile(0.5)),
        ms(l.fresh.quantile(0.99)),
    );
}

fn print(all: &[Figures]) {
    println!(
        "\n{:<14} {:>12} {:>12} {:>7} {:>13} {:>13} {:>7} {:>9} {:>9} {:>9} {:>9}",
        "admission",
        "call quiet",
        "call flood",
        "ratio",
        "fresh quiet",
        "fresh flood",
        "ratio",
        "gw cores",
        "attempts",
        "accepted",
        "refused"
    );
    for f in all {
        println!(
            "{:<14} {:>9.3} ms {:>9.3} ms {:>6.2}x {:>10.3} ms {:>10.3} ms {:>6.2}x {:>9.2} {:>9} {:>9} {:>9}",
            f.label,
            ms(f.quiet.calls.quantile(0.5)),
            ms(f.flood.calls.quantile(0.5)),
            ratio(&f.flood.calls, &f.quiet.calls),
            ms(f.quiet.fresh.quantile(0.5)),
            ms(f.flood.fresh.quantile(0.5)),
            ratio(&f.flood.fresh, &f.quiet.fresh),
            f.gateway_cores,
            f.counts[0],
            f.counts[1],
            f.counts[2],
        );
    }
    println!(
        "(p50s; gateway CPU over the {} the flood offered connections)",
        all.iter()
            .map(|f| format!("{:.1} s", f.flood_secs))
            .collect::<Vec<_>>()
            .join(" and ")
    );
}

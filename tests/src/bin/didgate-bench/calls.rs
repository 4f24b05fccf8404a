//! The call benchmark (issue 7): what routing a call through didgate costs, against a direct
//! call and against nginx injecting the header, on loopback.
//!
//! One minimal local upstream (hyper, HTTP/1.1 keep-alive, a small JSON body) and one load
//! generator serve every path; each path makes a fixed number of calls at concurrency 1 and 64
//! after a short warm-up that is not counted:
//!
//! 1. direct: HTTP/1.1 client -> upstream;
//! 2. nginx: HTTP/1.1 client -> nginx (`proxy_set_header Authorization`, keep-alive to the
//!    upstream) -> upstream;
//! 3. didgate library: `didgate_client::Client` (one QUIC connection, one stream per call) ->
//!    a `didgated serve` process -> upstream, both audit chains durable (every append is
//!    acknowledged only after its fsync, as in production);
//! 4. didgate local proxy: HTTP/1.1 client -> `didgate proxy` -> gateway -> upstream, when the
//!    build has that subcommand.
//!
//! The gateway runs as its own process so its memory (VmHWM, VmRSS from /proc) is its alone.
//! The run ends by verifying the gateway chain against every client chain with the audit
//! crate's verifier; a violation fails the benchmark. Every loop is bounded by its call count.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use didgate_client::low_level::{RawExchange as _, tls};
use didgate_client::{CallSpec, Client};
use didgate_gateway::config::{self, RawConfig, RawUpstream, Rule, Settings};
use didgate_gateway::limits::RateLimit;
use didgate_protocol::{Did, Identity};
use futures_util::future::BoxFuture;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::host::{cpu_model, ms, threads, work_dir};

/// Options of the call benchmark.
#[derive(clap::Args)]
pub(crate) struct CallArgs {
    /// A short run of a few seconds: fewer calls per path.
    #[arg(long)]
    quick: bool,
    /// Calls per path at concurrency 1 [default: 2000; 200 with --quick].
    #[arg(long, value_name = "N")]
    calls_c1: Option<u64>,
    /// Calls per path at concurrency 64 [default: 100000; 3000 with --quick].
    #[arg(long, value_name = "N")]
    calls_c64: Option<u64>,
    /// Fresh connections for the handshake figure [default: 300; 50 with --quick].
    #[arg(long, value_name = "N")]
    handshakes: Option<u64>,
    /// Leave nginx out (its ratio is then absent from the JSON line).
    #[arg(long)]
    no_nginx: bool,
    /// Leave the local proxy path out (its figures are then absent).
    #[arg(long)]
    no_proxy: bool,
    /// Samples of the gateway's VmRSS over the concurrency-64 run [default: 10].
    #[arg(long, value_name = "N")]
    rss_samples: Option<u64>,
    /// Working directory for the stores (default: the system temp dir); removed at the end.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

/// The upstream's whole answer.
const BODY: &[u8] =
    br#"{"id":"ch_bench","object":"charge","amount":500,"currency":"usd","status":"succeeded"}"#;
/// The credential nginx and the gateway inject (a benchmark value, not a real key).
pub(crate) const SECRET: &str = "sk-bench-0123456789abcdef";
/// The path every call asks for.
pub(crate) const PATH: &str = "/v1/charges/ch_bench";
/// The upstream name at the gateway (and the local proxy's first path segment).
pub(crate) const UPSTREAM: &str = "bench";
/// Concurrency of the second run of each path.
const WIDE: usize = 64;
/// Identity seeds: the library client and the local proxy's client.
pub(crate) const LIB_SEED: [u8; 32] = [0xbe; 32];
const PROXY_SEED: [u8; 32] = [0xb4; 32];

/// Figures of one run (one path at one concurrency).
#[derive(Debug, Clone)]
pub(crate) struct Run {
    calls: u64,
    wall: Duration,
    latencies: Vec<Duration>,
}

impl Run {
    pub(crate) fn new(wall: Duration, mut latencies: Vec<Duration>) -> Self {
        latencies.sort_unstable();
        Self {
            calls: latencies.len() as u64,
            wall,
            latencies,
        }
    }

    pub(crate) fn per_s(&self) -> f64 {
        self.calls as f64 / self.wall.as_secs_f64()
    }

    pub(crate) fn quantile(&self, q: f64) -> Duration {
        let i = ((self.latencies.len() as f64 * q).ceil() as usize).saturating_sub(1);
        self.latencies.get(i).copied().unwrap_or_default()
    }
}

/// One path's two runs.
#[derive(Debug, Clone)]
struct PathFigures {
    name: &'static str,
    c1: Run,
    c64: Run,
}

/// The gateway's memory while the library path ran.
#[derive(Debug, Clone, Default)]
struct Memory {
    /// VmRSS before the wide run, MiB.
    rss_before_mib: f64,
    /// VmRSS samples during the wide run: (calls done, MiB).
    samples: Vec<(u64, f64)>,
    /// VmHWM after the wide run, MiB.
    peak_mib: f64,
    /// CPU time per call during the wide run, ms: the gateway process, and this process (the
    /// client library, its chain writer, the upstream and the load generator).
    cpu_ms_per_call: (f64, f64),
    /// Files in the gateway's store after the wide run.
    store_files: usize,
}

/// Runs the call benchmark and prints its table and JSON line.
pub(crate) fn run(args: CallArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench(args))
}

async fn bench(args: CallArgs) -> Result<()> {
    let c1 = args
        .calls_c1
        .unwrap_or(if args.quick { 200 } else { 2_000 });
    let c64 = args
        .calls_c64
        .unwrap_or(if args.quick { 3_000 } else { 100_000 });
    let handshakes = args.handshakes.unwrap_or(if args.quick { 50 } else { 300 });
    let rss_samples = args.rss_samples.unwrap_or(10);
    ensure!(
        c1 > 0 && c64 > 0 && handshakes > 0 && rss_samples > 0,
        "call and sample counts must be at least 1"
    );
    let base = work_dir(args.dir.as_deref())?;
    println!(
        "didgate-bench: {c1} calls at concurrency 1, {c64} at concurrency {WIDE}, per path; {} core(s), {}",
        threads(),
        cpu_model()
    );
    println!("load while starting: {}", loadavg());
    let bins = Binaries::find().await?;
    let upstream = LocalUpstream::start().await?;
    println!("upstream on http://{}", upstream.addr);
    let mut paths = Vec::new();

    // 1. direct
    let direct = HttpTarget {
        addr: upstream.addr,
        path: PATH.into(),
        auth: None,
    };
    paths.push(http_path("direct", &direct, c1, c64).await?);

    // 2. nginx
    let nginx = if args.no_nginx {
        println!("nginx: left out (--no-nginx)");
        None
    } else {
        let figures = nginx_path(base.path(), &upstream, c1, c64).await?;
        paths.push(figures.clone());
        Some(figures)
    };

    // 3. didgate library, 4. local proxy
    // nor admission: the handshake figure opens hundreds of connections in a row
    let gw = GatewayProcess::start(&bins, base.path(), upstream.addr, no_admission()).await?;
    println!("gateway {} (pid {}) on udp {}", gw.did, gw.pid, gw.addr);
    let before = upstream.authorized();
    let lib_chain = base.path().join("client-chain");
    let client = Arc::new(
        Client::open(
            Identity::from_seed(&LIB_SEED),
            &lib_chain,
            gw.addr,
            gw.did.clone(),
        )
        .await?,
    );
    let (lib, memory) = library_path(&client, &gw, c1, c64, rss_samples).await?;
    let hs = handshake(&client, &gw, handshakes).await?;
    let phases = phases(&client, c1.min(500)).await?;
    let lib_calls = c1 + c64 + warmup_calls(c1) + warmup_calls(c64) + hs.fresh.calls + phases.calls;
    ensure!(
        upstream.authorized() - before == lib_calls,
        "the gateway did not inject the credential on every call"
    );
    client.close().await;
    drop(client);
    paths.push(lib.clone());
    let proxy = if args.no_proxy {
        println!("{:<16} left out (--no-proxy)", "didgate proxy");
        None
    } else {
        local_proxy(&bins, base.path(), &gw, c1, c64).await?
    };
    if let Some((p, _)) = &proxy {
        paths.push(p.clone());
    }
    let gw_store = gw.store.clone();
    gw.stop().await?;
    upstream.stop();

    // Both chains of every didgate run, verified against each other.
    let mut client_chains = vec![lib_chain];
    if let Some((_, chain)) = proxy {
        client_chains.push(chain);
    }
    let verified = verify_chains(&gw_store, &client_chains, lib_calls)?;

    print_table(&paths, &memory, &hs);
    phases.print();
    println!("\n{verified}");
    println!("load at the end: {}", loadavg());
    let json = figures_json(&paths, &lib, nginx.as_ref(), &memory, &hs, (c1, c64));
    println!("\n{json}");
    Ok(())
}

/// nginx between the load generator and the upstream, injecting the credential (every call
/// must reach the upstream with it).
async fn nginx_path(
    base: &Path,
    upstream: &LocalUpstream,
    c1: u64,
    c64: u64,
) -> Result<PathFigures> {
    let before = upstream.authorized();
    let n = Nginx::start(base, upstream.addr).await?;
    let target = HttpTarget {
        addr: n.addr,
        path: PATH.into(),
        auth: None,
    };
    let figures = http_path("nginx", &target, c1, c64).await;
    n.stop().await?;
    let figures = figures?;
    let warm = warmup_calls(c1) + warmup_calls(c64);
    ensure!(
        upstream.authorized() - before == c1 + c64 + warm,
        "nginx did not inject the credential on every call"
    );
    Ok(figures)
}

/// The run's figures as one JSON object: the library path against the direct one (and nginx,
/// and the local proxy, when they ran), memory and CPU, handshakes, and the call counts
/// `(c1, c64)`.
fn figures_json(
    paths: &[PathFigures],
    lib: &PathFigures,
    nginx: Option<&PathFigures>,
    memory: &Memory,
    hs: &Handshakes,
    (c1, c64): (u64, u64),
) -> serde_json::Value {
    let direct = &paths[0];
    let mut json = serde_json::json!({
        "c1_p50_added_ms": ms(lib.c1.quantile(0.5).saturating_sub(direct.c1.quantile(0.5))),
        "c1_p99_added_ms": ms(lib.c1.quantile(0.99).saturating_sub(direct.c1.quantile(0.99))),
        "c1_p50_ms": ms(lib.c1.quantile(0.5)),
        "c1_calls_per_s": lib.c1.per_s(),
        "c64_calls_per_s": lib.c64.per_s(),
        "c64_p50_ms": ms(lib.c64.quantile(0.5)),
        "c64_p99_ms": ms(lib.c64.quantile(0.99)),
        "c64_vs_nginx": nginx.map(|n| lib.c64.per_s() / n.c64.per_s()),
        "c64_vs_direct": lib.c64.per_s() / direct.c64.per_s(),
        "direct_c64_calls_per_s": direct.c64.per_s(),
        "nginx_c64_calls_per_s": nginx.map(|n| n.c64.per_s()),
        "nginx_c1_p50_added_ms": nginx.map(|n| ms(n.c1.quantile(0.5).saturating_sub(direct.c1.quantile(0.5)))),
        "gateway_peak_rss_mib": memory.peak_mib,
        "c64_gateway_cpu_ms_per_call": memory.cpu_ms_per_call.0,
        "c64_client_side_cpu_ms_per_call": memory.cpu_ms_per_call.1,
        "gateway_rss_first_mib": memory.samples.first().map(|s| s.1),
        "gateway_rss_last_mib": memory.samples.last().map(|s| s.1),
        "handshake_p50_ms": ms(hs.connect.quantile(0.5)),
        "fresh_connection_call_p50_ms": ms(hs.fresh.quantile(0.5)),
        "calls_c1": c1,
        "calls_c64": c64,
        "cores": threads(),
    });
    if let Some(p) = paths.iter().find(|p| p.name == "didgate proxy") {
        json["proxy_c1_p50_added_ms"] = serde_json::json!(ms(p
            .c1
            .quantile(0.5)
            .saturating_sub(direct.c1.quantile(0.5))));
        json["proxy_c64_calls_per_s"] = serde_json::json!(p.c64.per_s());
    }
    json
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| {
            let f: Vec<&str> = s.split_whitespace().take(3).collect();
            format!("load average {}", f.join(" "))
        })
        .unwrap_or_else(|_| "load average unknown".into())
}

/// Warm-up calls before a run of `calls` (not counted).
fn warmup_calls(calls: u64) -> u64 {
    (calls / 10).clamp(1, 500)
}

fn print_table(paths: &[PathFigures], memory: &Memory, hs: &Handshakes) {
    let direct = &paths[0];
    println!(
        "\n{:<16} {:>5} {:>8} {:>9} {:>9} {:>11} {:>12}",
        "path", "conc", "calls", "p50 ms", "p99 ms", "calls/s", "p50 added"
    );
    for p in paths {
        for (conc, run, base) in [(1, &p.c1, &direct.c1), (WIDE, &p.c64, &direct.c64)] {
            println!(
                "{:<16} {:>5} {:>8} {:>9.3} {:>9.3} {:>11.0} {:>12.3}",
                p.name,
                conc,
                run.calls,
                ms(run.quantile(0.5)),
                ms(run.quantile(0.99)),
                run.per_s(),
                ms(run.quantile(0.5).saturating_sub(base.quantile(0.5))),
            );
        }
    }
    println!(
        "\nnew QUIC connection with mutual DID authentication: handshake p50 {:.3} ms, p99 {:.3} ms ({} connections); first call on a fresh connection p50 {:.3} ms",
        ms(hs.connect.quantile(0.5)),
        ms(hs.connect.quantile(0.99)),
        hs.connect.calls,
        ms(hs.fresh.quantile(0.5)),
    );
    let series: Vec<String> = memory
        .samples
        .iter()
        .map(|(n, m)| format!("{m:.1}@{n}"))
        .collect();
    println!(
        "gateway memory (separate process): VmRSS {:.1} MiB before the concurrency-{WIDE} run, peak (VmHWM) {:.1} MiB; VmRSS MiB@calls during it: {}; {} files in its store after it",
        memory.rss_before_mib,
        memory.peak_mib,
        series.join(" "),
        memory.store_files
    );
    println!(
        "CPU per call at concurrency {WIDE}: gateway process {:.3} ms, benchmark process (client library, its chain, upstream, load generator) {:.3} ms",
        memory.cpu_ms_per_call.0, memory.cpu_ms_per_call.1
    );
}

// ---------------------------------------------------------------------------------------------
// The local upstream

/// A minimal HTTP/1.1 upstream on 127.0.0.1 answering every request with [`BODY`], counting the
/// requests that carry the credential.
pub(crate) struct LocalUpstream {
    pub(crate) addr: SocketAddr,
    authorized: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl LocalUpstream {
    pub(crate) async fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let authorized = Arc::new(AtomicU64::new(0));
        let expected: Arc<[u8]> = format!("Bearer {SECRET}").into_bytes().into();
        let count = authorized.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let (count, expected) = (count.clone(), expected.clone());
                let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    if req
                        .headers()
                        .get(hyper::header::AUTHORIZATION)
                        .is_some_and(|v| v.as_bytes() == &*expected)
                    {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    async {
                        Ok::<_, Infallible>(
                            hyper::Response::builder()
                                .header(hyper::header::CONTENT_TYPE, "application/json")
                                .body(Full::new(Bytes::from_static(BODY)))
                                .unwrap_or_default(),
                        )
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self {
            addr,
            authorized,
            task,
        })
    }

    /// Requests seen so far with the injected credential.
    pub(crate) fn authorized(&self) -> u64 {
        self.authorized.load(Ordering::Relaxed)
    }

    pub(crate) fn stop(&self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// The load generator

/// Where the HTTP load generator sends its GETs.
#[derive(Debug, Clone)]
struct HttpTarget {
    addr: SocketAddr,
    path: String,
    auth: Option<String>,
}

/// One worker of the load generator: each call of it makes one call and checks the answer.
pub(crate) type Worker = Box<dyn FnMut() -> BoxFuture<'static, Result<()>> + Send>;

/// Runs `calls` calls with `concurrency` workers made by `make_worker` (each call returns an
/// error for a wrong answer). Returns the run's latencies.
pub(crate) async fn load<W, F>(calls: u64, concurrency: usize, make_worker: W) -> Result<Run>
where
    W: Fn() -> F,
    F: Future<Output = Result<Worker>>,
{
    // every worker connects before the clock starts
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        workers.push(make_worker().await?);
    }
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(concurrency);
    for mut one in workers {
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < calls {
                let t = Instant::now();
                one().await?;
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut latencies = Vec::with_capacity(calls as usize);
    for t in tasks {
        latencies.extend(t.await??);
    }
    let run = Run::new(started.elapsed(), latencies);
    ensure!(run.calls == calls, "{} of {calls} calls made", run.calls);
    Ok(run)
}

/// A keep-alive HTTP/1.1 connection of the load generator.
type HttpSender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn http_connect(addr: SocketAddr) -> Result<HttpSender> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// A worker for an HTTP target: its own keep-alive HTTP/1.1 connection, opened again (within
/// the call that finds it closed) if the server closed it between two calls.
async fn http_worker(target: HttpTarget) -> Result<Worker> {
    let sender = Arc::new(tokio::sync::Mutex::new(http_connect(target.addr).await?));
    let target = Arc::new(target);
    Ok(Box::new(move || {
        let (sender, target) = (sender.clone(), target.clone());
        Box::pin(async move {
            let mut req = hyper::Request::get(target.path.as_str())
                .header(hyper::header::HOST, target.addr.to_string());
            if let Some(auth) = &target.auth {
                req = req.header(hyper::header::AUTHORIZATION, auth.as_str());
            }
            let req = req.body(Empty::<Bytes>::new())?;
            let mut sender = sender.lock().await;
            if sender.is_closed() || sender.ready().await.is_err() {
                *sender = http_connect(target.addr).await?;
                sender.ready().await?;
            }
            let resp = sender.send_request(req).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            ensure!(
                status == hyper::StatusCode::OK && body == BODY,
                "unexpected answer {status}: {}",
                String::from_utf8_lossy(&body)
            );
            Ok(())
        })
    }))
}

/// A worker of the library path: calls through the shared client (one QUIC connection, one
/// stream per call).
pub(crate) fn library_worker(client: Arc<Client>) -> Worker {
    Box::new(move || {
        let client = client.clone();
        Box::pin(async move {
            let answer = client
                .call(CallSpec::new(UPSTREAM, "GET", PATH))
                .await
                .context("library call")?;
            ensure!(
                answer.status == 200 && answer.body == BODY,
                "unexpected answer {}: {}",
                answer.status,
                String::from_utf8_lossy(&answer.body)
            );
            Ok(())
        })
    })
}

/// Warm-up, then `c1` calls at concurrency 1 and `c64` at [`WIDE`], over HTTP.
async fn http_path(
    name: &'static str,
    target: &HttpTarget,
    c1: u64,
    c64: u64,
) -> Result<PathFigures> {
    let mut runs = Vec::new();
    for (calls, conc) in [(c1, 1), (c64, WIDE)] {
        let make = || {
            let t = target.clone();
            async move { http_worker(t).await }
        };
        load(warmup_calls(calls), conc, make).await?;
        let run = load(calls, conc, make).await?;
        println!(
            "{name:<16} concurrency {conc:>2}: {calls} calls, p50 {:.3} ms, {:.0} calls/s",
            ms(run.quantile(0.5)),
            run.per_s()
        );
        runs.push(run);
    }
    let c64r = runs.pop().context("run")?;
    let c1r = runs.pop().context("run")?;
    Ok(PathFigures {
        name,
        c1: c1r,
        c64: c64r,
    })
}

/// Path 3: the library through the gateway process, with its memory sampled during the wide
/// run.
async fn library_path(
    client: &Arc<Client>,
    gw: &GatewayProcess,
    c1: u64,
    c64: u64,
    rss_samples: u64,
) -> Result<(PathFigures, Memory)> {
    let make = || {
        let c = client.clone();
        async move { anyhow::Ok(library_worker(c)) }
    };
    load(warmup_calls(c1), 1, make).await?;
    let r1 = load(c1, 1, make).await?;
    println!(
        "{:<16} concurrency  1: {c1} calls, p50 {:.3} ms, {:.0} calls/s",
        "didgate library",
        ms(r1.quantile(0.5)),
        r1.per_s()
    );
    load(warmup_calls(c64), WIDE, make).await?;
    let mut memory = Memory {
        rss_before_mib: gw.memory("VmRSS")?,
        ..Memory::default()
    };
    // sample VmRSS `rss_samples` times over the wide run (by elapsed calls at the client's
    // chain: two entries per call)
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<()>();
    let sampler = {
        let pid = gw.pid;
        let chain = client.chain().clone();
        let start = chain.head()?.seq;
        let step = (c64 * 2 / rss_samples).max(1);
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut next = step;
            loop {
                let finished = tokio::select! {
                    _ = &mut done_rx => true,
                    () = tokio::time::sleep(Duration::from_millis(50)) => false,
                };
                let entries = chain.head().map(|h| h.seq - start).unwrap_or(0);
                if entries >= next || finished {
                    if let Ok(m) = proc_status_mib(pid, "VmRSS") {
                        samples.push((entries / 2, m));
                    }
                    next = (entries / step + 1) * step;
                }
                if finished {
                    return samples;
                }
            }
        })
    };
    let cpu_before = (cpu_seconds(gw.pid)?, cpu_seconds(std::process::id())?);
    let r64 = load(c64, WIDE, make).await;
    let cpu_after = (cpu_seconds(gw.pid)?, cpu_seconds(std::process::id())?);
    memory.cpu_ms_per_call = (
        (cpu_after.0 - cpu_before.0) * 1e3 / c64 as f64,
        (cpu_after.1 - cpu_before.1) * 1e3 / c64 as f64,
    );
    let _ = done_tx.send(());
    memory.samples = sampler.await?;
    let r64 = r64?;
    memory.peak_mib = gw.memory("VmHWM")?;
    memory.store_files = dir_usage(&gw.store).files;
    println!(
        "{:<16} concurrency {WIDE}: {c64} calls, p50 {:.3} ms, {:.0} calls/s, gateway VmHWM {:.1} MiB",
        "didgate library",
        ms(r64.quantile(0.5)),
        r64.per_s(),
        memory.peak_mib
    );
    Ok((
        PathFigures {
            name: "didgate library",
            c1: r1,
            c64: r64,
        },
        memory,
    ))
}

/// Handshake figures.
struct Handshakes {
    /// `connect()` to an established connection: TLS 1.3 with both DID certificates, the
    /// gateway's checked against the pinned DID.
    connect: Run,
    /// A new client connection and its first call (which the gateway answers only after it
    /// accepted the client's certificate): the full cost of a fresh connection.
    fresh: Run,
}

/// Fresh connections, one after another.
async fn handshake(client: &Arc<Client>, gw: &GatewayProcess, n: u64) -> Result<Handshakes> {
    let identity = Identity::from_seed(&LIB_SEED);
    let cfg = tls::client_config(&identity, &gw.did)?;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    endpoint.set_default_client_config(cfg);
    let mut connect = Vec::with_capacity(n as usize);
    let t0 = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        let conn = endpoint.connect(gw.addr, tls::SERVER_NAME)?.await?;
        connect.push(t.elapsed());
        conn.close(0u32.into(), b"bye");
    }
    let connect = Run::new(t0.elapsed(), connect);
    endpoint.wait_idle().await;
    let identity = Arc::new(identity);
    let mut fresh = Vec::with_capacity(n as usize);
    let t0 = Instant::now();
    for _ in 0..n {
        let c = Client::with_chain(
            identity.clone(),
            client.chain().clone(),
            gw.addr,
            gw.did.clone(),
        )?;
        let t = Instant::now();
        let answer = c.call(CallSpec::new(UPSTREAM, "GET", PATH)).await?;
        fresh.push(t.elapsed());
        ensure!(answer.status == 200, "fresh connection call failed");
    }
    let fresh = Run::new(t0.elapsed(), fresh);
    println!(
        "handshake: {n} new connections, p50 {:.3} ms; first call on a new connection p50 {:.3} ms",
        ms(connect.quantile(0.5)),
        ms(fresh.quantile(0.5))
    );
    Ok(Handshakes { connect, fresh })
}

/// Where one call's time goes at concurrency 1, seen from the client: the steps of
/// `Client::call` made one by one through its public low-level API.
struct Phases {
    calls: u64,
    sign: Run,
    request_entry: Run,
    round_trip: Run,
    result_entry: Run,
}

impl Phases {
    fn print(&self) {
        println!(
            "\nwhere the time goes at concurrency 1 (client side, {} calls, p50 / mean ms):",
            self.calls
        );
        for (what, run) in [
            ("sign the request", &self.sign),
            ("request entry, durable (client fsync)", &self.request_entry),
            (
                "QUIC round trip: gateway verify, policy, grant + executing entry (fsync), secret, upstream, executed entry (fsync), receipt; client checks the receipt",
                &self.round_trip,
            ),
            ("result entry, durable (client fsync)", &self.result_entry),
        ] {
            let mean = run.latencies.iter().sum::<Duration>() / run.calls.max(1) as u32;
            println!(
                "  {:>7.3} / {:>7.3}  {what}",
                ms(run.quantile(0.5)),
                ms(mean)
            );
        }
    }
}

/// Makes `n` calls step by step, timing each step (the same entries as `Client::call`).
async fn phases(client: &Client, n: u64) -> Result<Phases> {
    use didgate_audit::entry::{Entry, EntryKind, Outcome};
    let mut t = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    let spec = CallSpec::new(UPSTREAM, "GET", PATH);
    for _ in 0..n {
        let s = Instant::now();
        let (bytes, call) = client.sign(&spec)?;
        t[0].push(s.elapsed());
        let s = Instant::now();
        let mut entry = Entry::new(EntryKind::Request, didgate_client::low_level::now_ms());
        entry.call = Some(call);
        entry.signed = Some(bytes.clone());
        client.chain().append_entry(entry).await?;
        t[1].push(s.elapsed());
        let s = Instant::now();
        let raw = client.send_signed(&bytes, &[]).await?;
        let didgate_client::low_level::RawFinal::Receipt(r) = raw.last else {
            bail!("no receipt")
        };
        ensure!(
            r.message().call == call && raw.body == BODY,
            "receipt for another call"
        );
        t[2].push(s.elapsed());
        let s = Instant::now();
        let mut result = Entry::new(EntryKind::Result, didgate_client::low_level::now_ms());
        result.call = Some(call);
        result.outcome = Some(Outcome::Receipt);
        result.peer_entry = Some(r.message().entry);
        result.signed = Some(r.into_parts().2);
        client.chain().append_entry(result).await?;
        t[3].push(s.elapsed());
    }
    let [a, b, c, d] = t.map(|l| Run::new(Duration::ZERO, l));
    Ok(Phases {
        calls: n,
        sign: a,
        request_entry: b,
        round_trip: c,
        result_entry: d,
    })
}

// ---------------------------------------------------------------------------------------------
// Processes: didgated, nginx, didgate proxy

/// The workspace's binaries this benchmark starts, built in the same profile beside it.
pub(crate) struct Binaries {
    didgated: PathBuf,
    didgate: PathBuf,
}

impl Binaries {
    /// Finds `didgated` and `didgate` beside this executable, building them (same profile)
    /// when `cargo run` did not.
    pub(crate) async fn find() -> Result<Self> {
        let exe = std::env::current_exe()?;
        let dir = exe.parent().context("no directory above the executable")?;
        let bins = Self {
            didgated: dir.join("didgated"),
            didgate: dir.join("didgate"),
        };
        // a stale sibling would measure old code: build whenever cargo is at hand
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let release = dir.file_name().is_some_and(|n| n == "release");
        let mut cmd = tokio::process::Command::new(cargo);
        cmd.args(["build", "--quiet", "--bin", "didgated", "--bin", "didgate"])
            .arg("--manifest-path")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml"));
        if release {
            cmd.arg("--release");
        }
        match cmd.status().await {
            Ok(s) if s.success() => {}
            other => {
                ensure!(
                    bins.didgated.exists() && bins.didgate.exists(),
                    "cannot build didgated and didgate ({other:?}); build them with `cargo build --release --bins`"
                );
                eprintln!("note: could not rebuild didgated/didgate; using the ones present");
            }
        }
        Ok(bins)
    }
}

/// Admission of new connections turned off (`[gateway.handshakes]`): every connection is
/// accepted at once, as before issue 15.
pub(crate) fn no_admission() -> config::Handshakes {
    didgate_tests::no_address_limits()
}

/// Kills `pid` with `signal` (a process this benchmark started).
async fn signal(pid: u32, signal: &str) -> Result<()> {
    let status = tokio::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .await?;
    ensure!(status.success(), "kill -{signal} {pid} failed");
    Ok(())
}

/// User + system CPU seconds of process `pid` so far (/proc/PID/stat, in clock ticks of 10 ms).
/// With `DIDGATE_BENCH_PKCS11=MODULE:TOKEN_LABEL` (and the user PIN in
/// `DIDGATE_BENCH_PKCS11_PIN`, `SOFTHSM2_CONF` for SoftHSM2), the gateway's master key is a key
/// generated in that token (`[gateway] kms = "pkcs11"`): the calls then pay the token's unwrap
/// (docs/performance.md, "The master key in a token"). Returns whether it is.
fn bench_token(config: &mut RawConfig) -> bool {
    let Some((module, token)) = std::env::var("DIDGATE_BENCH_PKCS11").ok().and_then(|v| {
        v.rsplit_once(':')
            .map(|(m, t)| (m.to_string(), t.to_string()))
    }) else {
        return false;
    };
    config.gateway.kms = config::KmsKind::Pkcs11;
    config.pkcs11 = Some(config::Pkcs11Settings {
        module,
        token,
        key_label: "didgate-bench-gateway".into(),
        pin_env: Some("DIDGATE_BENCH_PKCS11_PIN".into()),
        pin_file: None,
    });
    true
}

pub(crate) fn cpu_seconds(pid: u32) -> Result<f64> {
    let (user, system) = cpu_times(pid)?;
    Ok(user + system)
}

/// Process `pid`'s CPU time so far, (user, system) in seconds (/proc/PID/stat).
pub(crate) fn cpu_times(pid: u32) -> Result<(f64, f64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // fields after the command name, which is in parentheses and may hold spaces
    let rest: Vec<&str> = s
        .rsplit_once(')')
        .context("malformed stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks = |i: usize| -> Result<f64> { Ok(rest.get(i).context("short stat")?.parse()?) };
    // utime and stime are fields 14 and 15 of stat(5): 11 and 12 after the name
    Ok((ticks(11)? / 100.0, ticks(12)? / 100.0))
}

fn proc_status_mib(pid: u32, field: &str) -> Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = s
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    let kib: f64 = line
        .split_whitespace()
        .nth(1)
        .context("malformed status line")?
        .parse()?;
    Ok(kib / 1024.0)
}

/// The files under a directory, recursively.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DirUsage {
    /// Files (anything but a directory; symbolic links not followed).
    pub(crate) files: usize,
    /// The sum of their sizes, bytes.
    pub(crate) bytes: u64,
    /// The blocks allocated to them, bytes.
    pub(crate) allocated: u64,
}

/// The files under `dir`, recursively (what cannot be read counts as nothing: a store may
/// remove files while it is walked).
pub(crate) fn dir_usage(dir: &Path) -> DirUsage {
    use std::os::unix::fs::MetadataExt;
    let mut usage = DirUsage::default();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        match e.metadata() {
            Ok(m) if m.is_dir() => {
                let sub = dir_usage(&e.path());
                usage.files += sub.files;
                usage.bytes += sub.bytes;
                usage.allocated += sub.allocated;
            }
            Ok(m) => {
                usage.files += 1;
                usage.bytes += m.len();
                usage.allocated += m.blocks() * 512;
            }
            Err(_) => {}
        }
    }
    usage
}

/// A `didgated serve` process on 127.0.0.1 with the benchmark's upstream, secret and policy.
pub(crate) struct GatewayProcess {
    child: tokio::process::Child,
    pub(crate) pid: u32,
    pub(crate) addr: SocketAddr,
    pub(crate) did: Did,
    /// Its data directory (configuration, secrets, store).
    pub(crate) data: PathBuf,
    store: PathBuf,
    log: tokio::task::JoinHandle<Vec<String>>,
}

impl GatewayProcess {
    /// A gateway with the benchmark's configuration and `handshakes` as its admission of new
    /// connections.
    pub(crate) async fn start(
        bins: &Binaries,
        base: &Path,
        upstream: SocketAddr,
        handshakes: config::Handshakes,
    ) -> Result<Self> {
        Self::start_with(bins, base, upstream, |c| c.gateway.handshakes = handshakes).await
    }

    /// A gateway with the benchmark's configuration as `adjust` leaves it (its master key in
    /// a PKCS#11 token when [`bench_token`] says so).
    pub(crate) async fn start_with(
        bins: &Binaries,
        base: &Path,
        upstream: SocketAddr,
        adjust: impl FnOnce(&mut RawConfig),
    ) -> Result<Self> {
        let dir = base.join("gateway");
        let did = didgate_gateway::init(&dir, "127.0.0.1:0".parse()?)?;
        let principals = [LIB_SEED, PROXY_SEED]
            .iter()
            .map(|s| Identity::from_seed(s).did().to_string())
            .collect();
        let mut config = RawConfig {
            gateway: Settings {
                // the benchmark measures cost, not the limits: no rate or concurrency caps
                rate_per_did: RateLimit {
                    burst: 0,
                    per_sec: 0.0,
                },
                max_concurrent_per_did: 0,
                max_concurrent_per_upstream: 0,
                ..Settings::new("127.0.0.1:0".parse()?)
            },
            upstreams: vec![RawUpstream {
                local: true,
                ..RawUpstream::new(UPSTREAM, format!("http://{upstream}"), "bench-key")
            }],
            groups: Default::default(),
            rules: vec![Rule {
                principals,
                upstream: UPSTREAM.into(),
                methods: vec!["GET".into()],
                paths: vec!["/v1/**".into()],
            }],
            did_web: Default::default(),
            pkcs11: None,
            node: None,
            cluster: None,
        };
        adjust(&mut config);
        let in_token = bench_token(&mut config);
        std::fs::write(dir.join("gateway.toml"), toml::to_string(&config)?)?;
        if in_token {
            let opened = didgate_gateway::admin::open_dir(&dir)?;
            opened
                .secrets
                .kms_to_token(true, didgate_gateway::now_ms())?;
        }
        didgate_gateway::add_secret(&dir, "bench-key", SECRET)?;
        Self::spawn(bins, dir, did).await
    }

    /// Stops the gateway and starts a new process on the same data directory (the same
    /// identity, configuration and store; a new port): what a process carries in memory is
    /// gone, the store is the one it left.
    pub(crate) async fn restart(self, bins: &Binaries) -> Result<Self> {
        let (dir, did) = (self.data.clone(), self.did.clone());
        self.stop().await?;
        Self::spawn(bins, dir, did).await
    }

    /// Runs `didgated serve` on the prepared data directory `dir` and waits for its address.
    async fn spawn(bins: &Binaries, dir: PathBuf, did: Did) -> Result<Self> {
        // DIDGATE_BENCH_GATEWAY_WRAPPER (words split on white space) goes before the gateway's
        // command, for a profiler: e.g. `env LD_PRELOAD=.../libheaptrack_preload.so
        // DUMP_HEAPTRACK_OUTPUT=/tmp/gw.raw` (`env` execs, so the pid sampled stays the
        // gateway's; a wrapper that forks instead is sampled and signalled in its place).
        let wrapper = std::env::var("DIDGATE_BENCH_GATEWAY_WRAPPER").unwrap_or_default();
        let mut words = wrapper.split_whitespace();
        let mut child = match words.next() {
            Some(first) => {
                let mut c = tokio::process::Command::new(first);
                c.args(words).arg(&bins.didgated);
                c
            }
            None => tokio::process::Command::new(&bins.didgated),
        }
        .arg("serve")
        .arg("--data")
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bins.didgated.display()))?;
        let pid = child.id().context("didgated exited at once")?;
        let mut lines = BufReader::new(child.stderr.take().context("stderr")?).lines();
        let mut seen = Vec::new();
        let addr = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(a) = line.split("listening on udp ").nth(1) {
                    return Ok(a.trim().parse::<SocketAddr>()?);
                }
                seen.push(line);
            }
            bail!("didgated stopped: {}", seen.join(" | "))
        })
        .await
        .context("didgated did not start within 30 s")??;
        // keep draining its log so it never blocks on a full pipe
        let log = tokio::spawn(async move {
            let mut kept = Vec::new();
            while let Ok(Some(line)) = lines.next_line().await {
                if kept.len() < 50 {
                    kept.push(line);
                }
            }
            kept
        });
        Ok(Self {
            child,
            pid,
            addr,
            did,
            store: dir.join("store"),
            data: dir,
            log,
        })
    }

    pub(crate) fn memory(&self, field: &str) -> Result<f64> {
        proc_status_mib(self.pid, field)
    }

    /// SIGTERM: the gateway drains, writes its final checkpoint and exits.
    pub(crate) async fn stop(mut self) -> Result<()> {
        signal(self.pid, "TERM").await?;
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .context("didgated did not stop within 60 s")??;
        let log = self.log.await.unwrap_or_default();
        ensure!(
            status.success(),
            "didgated exited with {status}: {}",
            log.join(" | ")
        );
        let warnings: Vec<_> = log.iter().filter(|l| !l.contains("stopped")).collect();
        if !warnings.is_empty() {
            println!("didgated said: {warnings:?}");
        }
        Ok(())
    }
}

/// nginx on 127.0.0.1 from a generated config in a temp dir, proxying to the upstream with the
/// credential injected and keep-alive connections to it.
struct Nginx {
    child: tokio::process::Child,
    addr: SocketAddr,
}

impl Nginx {
    async fn start(base: &Path, upstream: SocketAddr) -> Result<Self> {
        let bin = nginx_binary().await?;
        let dir = base.join("nginx");
        std::fs::create_dir_all(&dir)?;
        let port = free_port().await?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let d = dir.display();
        let conf = format!(
            "daemon off;
master_process on;
worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream bench {{
        server {upstream};
        keepalive 128;
        keepalive_requests 10000000;
    }}
    server {{
        listen {addr};
        location / {{
            proxy_pass http://bench;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Authorization \"Bearer {SECRET}\";
        }}
    }}
}}
"
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let child = tokio::process::Command::new(&bin)
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        wait_for_tcp(addr, "nginx").await?;
        println!("nginx ({}) on http://{addr}", bin.display());
        Ok(Self { child, addr })
    }

    /// SIGQUIT: graceful stop.
    async fn stop(mut self) -> Result<()> {
        if let Some(pid) = self.child.id() {
            signal(pid, "QUIT").await?;
        }
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .context("nginx did not stop within 30 s")??;
        Ok(())
    }
}

/// The nginx binary, installed from the distribution's packages when missing.
async fn nginx_binary() -> Result<PathBuf> {
    let found = || {
        ["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
    };
    if let Some(p) = found() {
        return Ok(p);
    }
    println!("nginx missing: apt-get install -y nginx");
    let status = tokio::process::Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends", "nginx"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status()
        .await
        .context("running apt-get")?;
    ensure!(
        status.success(),
        "apt-get install nginx failed ({status}); run `apt-get update` first, or pass --no-nginx"
    );
    found().context("nginx installed but not found")
}

async fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    Ok(l.local_addr()?.port())
}

async fn wait_for_tcp(addr: SocketAddr, what: &str) -> Result<()> {
    for _ in 0..200 {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{what} is not listening on {addr} after 10 s")
}

/// Path 4: the `didgate proxy` local proxy, when this build has it. Returns its figures and
/// its chain directory.
async fn local_proxy(
    bins: &Binaries,
    base: &Path,
    gw: &GatewayProcess,
    c1: u64,
    c64: u64,
) -> Result<Option<(PathFigures, PathBuf)>> {
    let has_proxy = tokio::process::Command::new(&bins.didgate)
        .args(["proxy", "--help"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    if !has_proxy {
        println!(
            "{:<16} skipped: no local proxy in this build",
            "didgate proxy"
        );
        return Ok(None);
    }
    let home = base.join("proxy-home");
    let didgate = |args: &[&str]| {
        let mut c = std::process::Command::new(&bins.didgate);
        c.arg("--home").arg(&home).args(args);
        c
    };
    let ok = |mut c: std::process::Command, what: &str| -> Result<()> {
        let out = c.output()?;
        ensure!(
            out.status.success(),
            "didgate {what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    ok(
        didgate(&[
            "keygen",
            "--seed-file",
            &didgate_tests::seed_file(base, &PROXY_SEED)?,
        ]),
        "keygen",
    )?;
    ok(
        didgate(&[
            "pin",
            "--gateway",
            &gw.addr.to_string(),
            "--gateway-did",
            gw.did.as_str(),
        ]),
        "pin",
    )?;
    let port = free_port().await?;
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let mut child =
        tokio::process::Command::from(didgate(&["proxy", "--listen", &listen.to_string()]))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
    let pid = child.id().context("didgate proxy exited at once")?;
    // the proxy prints its local token; take the last word of the first line naming it
    let mut out = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let mut err = BufReader::new(child.stderr.take().context("stderr")?).lines();
    let token = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let line = tokio::select! {
                l = out.next_line() => l?,
                l = err.next_line() => l?,
            };
            let Some(line) = line else {
                bail!("didgate proxy ended without printing a token")
            };
            if line.to_ascii_lowercase().contains("token")
                && let Some(t) = line.split_whitespace().last()
            {
                return Ok(t.trim_matches(|c| c == '"' || c == '\'').to_string());
            }
        }
    })
    .await
    .context("no token from didgate proxy within 30 s")??;
    tokio::spawn(async move { while let Ok(Some(_)) = out.next_line().await {} });
    tokio::spawn(async move { while let Ok(Some(_)) = err.next_line().await {} });
    wait_for_tcp(listen, "didgate proxy").await?;
    let target = HttpTarget {
        addr: listen,
        path: format!("/{UPSTREAM}{PATH}"),
        auth: Some(format!("Bearer {token}")),
    };
    let figures = http_path("didgate proxy", &target, c1, c64).await;
    signal(pid, "TERM").await?;
    tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .context("didgate proxy did not stop within 60 s")??;
    Ok(Some((figures?, home.join("chain"))))
}

/// Verifies the gateway's store against the client chains; `lib_calls` calls must be in the
/// first client chain (a request and a result entry each).
fn verify_chains(gateway: &Path, clients: &[PathBuf], lib_calls: u64) -> Result<String> {
    let t = Instant::now();
    let gw = didgate_audit::load_records(gateway)
        .with_context(|| format!("loading {}", gateway.display()))?;
    let cls = clients
        .iter()
        .map(|c| didgate_audit::load_records(c).with_context(|| format!("loading {}", c.display())))
        .collect::<Result<Vec<_>>>()?;
    let report = didgate_audit::verify::verify(std::slice::from_ref(&gw), &cls);
    ensure!(
        report.ok(),
        "the audit chains do not verify: {} violation(s), first: {}",
        report.violations.len(),
        report.violations[0]
    );
    let lib_entries = cls[0].entries.len() as u64;
    ensure!(
        lib_entries == 1 + 2 * lib_calls,
        "the library client's chain holds {lib_entries} entries, expected {}",
        1 + 2 * lib_calls
    );
    let client_entries: usize = cls.iter().map(|c| c.entries.len()).sum();
    Ok(format!(
        "audit: gateway chain {} entries ({} checkpoints) and {} client chain(s) {} entries verified against each other in {:.1} s: {} cross-links, no violation",
        gw.entries.len(),
        gw.checkpoints.len(),
        cls.len(),
        client_entries,
        t.elapsed().as_secs_f64(),
        report.cross_links
    ))
}

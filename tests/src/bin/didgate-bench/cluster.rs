//! `didgate-bench cluster`: what a cluster costs a call (issue 24). Starts a 3-member etcd on
//! loopback (tests/etcd/start-cluster.sh), a single `didgated serve` without `[cluster]`, and
//! three certified nodes of one gateway joined to the etcd cluster, all with the call
//! benchmark's configuration and local upstream. Then, in alternation, `--runs` times: the
//! gateway CPU per call at concurrency 64 of the single gateway, and of the caller's home node
//! in the cluster (the CPU time of that node's process, /proc/PID/stat). Then the latency of a
//! first call on a new client pinned at another node (a `moved`, followed: two handshakes)
//! against one pinned at the home. Prints the medians and one JSON line.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use didgate_client::{CallSpec, Client};
use didgate_cluster::ClusterSettings;
use didgate_protocol::{Did, Identity};

use crate::calls::{
    Binaries, GatewayProcess, LIB_SEED, LocalUpstream, PATH, Run, UPSTREAM, cpu_seconds,
    library_worker, load,
};
use crate::host::{cpu_model, ms, threads, work_dir};

/// The node names; the measured node is the one the benchmark's caller has as its home.
const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];

/// The etcd ports (BASE..BASE+5).
const ETCD_BASE: u16 = 24_100;

/// `didgate-bench cluster`'s options.
#[derive(clap::Args)]
pub(crate) struct ClusterArgs {
    /// Calls per measurement at concurrency 64 [default: 20000; 3000 with --quick].
    #[arg(long)]
    calls: Option<u64>,
    /// Alternating measurements of each gateway [default: 3].
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// First calls through a node that says `moved`, and straight to the home [default: 50].
    #[arg(long, default_value_t = 50)]
    moved: usize,
    /// A short run.
    #[arg(long)]
    quick: bool,
    /// Directory for the stores (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
}

pub(crate) fn run(args: ClusterArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench(args))
}

/// A 3-member etcd started by the tests' script, killed when dropped.
struct Etcd {
    pids: Vec<u32>,
    endpoints: Vec<String>,
}

impl Etcd {
    fn start(dir: &Path) -> Result<Self> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("etcd/start-cluster.sh");
        let out = std::process::Command::new(&script)
            .arg(dir)
            .arg(ETCD_BASE.to_string())
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        if !out.status.success() {
            bail!(
                "etcd did not start (is etcd installed?): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut etcd = Self {
            pids: Vec::new(),
            endpoints: Vec::new(),
        };
        for line in String::from_utf8(out.stdout)?.lines() {
            let parts: Vec<&str> = line.split_whitespace().collect();
            ensure!(parts.len() == 3, "unexpected line {line:?}");
            etcd.pids.push(parts[1].parse()?);
            etcd.endpoints.push(parts[2].to_string());
        }
        Ok(etcd)
    }

    fn settings(&self, node: &str) -> ClusterSettings {
        ClusterSettings {
            endpoints: self.endpoints.clone(),
            name: "bench".into(),
            node: node.into(),
            lease_ttl_secs: 10,
            ca_file: None,
            cert_file: None,
            key_file: None,
            upstream_hosts: Vec::new(),
            allow_local_upstreams: false,
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for pid in &self.pids {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
    }
}

/// A certified node of the gateway in `gateway_dir`, in the cluster of `etcd`, started with
/// the call benchmark's configuration; its master key copied from `master` when given (every
/// node of a cluster holds the same).
async fn start_node(
    bins: &Binaries,
    base: &Path,
    upstream: std::net::SocketAddr,
    gateway_dir: &Path,
    cluster: ClusterSettings,
    master: Option<&Path>,
) -> Result<GatewayProcess> {
    let gateway_dir = gateway_dir.to_path_buf();
    let master = master.map(Path::to_path_buf);
    let node_dir = base.join("gateway");
    let certified = std::sync::Mutex::new(Ok(()));
    let gw = GatewayProcess::start_with(bins, base, upstream, |c| {
        let made = (|| -> Result<()> {
            use didgate_gateway::datadir::DataDir;
            let key = didgate_io::identity::load(&node_dir.join("identity"))?;
            let gateway = didgate_io::identity::load(&gateway_dir.join("identity"))?;
            let (cert, _) = didgate_gateway::node::certify(
                &DataDir::new(&gateway_dir),
                &gateway,
                &didgate_gateway::node::Certify {
                    node: key.did().clone(),
                    not_before_ms: didgate_gateway::now_ms() - 60_000,
                    valid_for_ms: 3_600_000,
                    serial: None,
                    addr: None,
                },
            )?;
            std::fs::write(node_dir.join("node.cert"), cert)?;
            if let Some(m) = &master {
                std::fs::copy(m, node_dir.join("master.key"))?;
            }
            Ok(())
        })();
        c.node = Some(didgate_gateway::node::NodeSettings {
            certificate: "node.cert".into(),
            revocations: None,
        });
        c.cluster = Some(cluster);
        *certified.lock().unwrap_or_else(|p| p.into_inner()) = made;
    })
    .await?;
    certified.into_inner().unwrap_or_else(|p| p.into_inner())?;
    Ok(gw)
}

/// Gateway CPU per call (ms) of `calls` calls at concurrency 64 through `client`, and the run.
async fn cpu_per_call(client: &Arc<Client>, pid: u32, calls: u64) -> Result<(f64, Run)> {
    let make = || {
        let c = client.clone();
        async move { anyhow::Ok(library_worker(c)) }
    };
    load((calls / 10).clamp(1, 500), 64, make).await?;
    let before = cpu_seconds(pid)?;
    let run = load(calls, 64, make).await?;
    let after = cpu_seconds(pid)?;
    Ok(((after - before) * 1e3 / calls as f64, run))
}

/// The latencies of `n` first calls, each on a new client pinned at `addr`.
async fn first_calls(
    chain: &Path,
    gateway: &Did,
    addr: std::net::SocketAddr,
    n: usize,
) -> Result<Run> {
    let identity = Arc::new(Identity::from_seed(&LIB_SEED));
    let base = Client::open(Identity::from_seed(&LIB_SEED), chain, addr, gateway.clone()).await?;
    let mut latencies = Vec::with_capacity(n);
    let t0 = Instant::now();
    for _ in 0..n {
        let c = Client::with_chain(
            identity.clone(),
            base.chain().clone(),
            addr,
            gateway.clone(),
        )?;
        let t = Instant::now();
        let answer = c.call(CallSpec::new(UPSTREAM, "GET", PATH)).await?;
        latencies.push(t.elapsed());
        ensure!(answer.status == 200, "a first call failed");
        c.disconnect().await;
    }
    Ok(Run::new(t0.elapsed(), latencies))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The cluster: one gateway DID (its key in BASE/gateway-key) and three certified nodes of it
/// in `etcd`'s cluster, the benchmark caller's home first; returns the gateway DID, the home's
/// name and the nodes, once every node is registered.
async fn start_cluster(
    bins: &Binaries,
    base: &Path,
    etcd: &Etcd,
    upstream: std::net::SocketAddr,
) -> Result<(Did, String, Vec<GatewayProcess>)> {
    // one gateway DID, three certified nodes
    let gateway_dir = base.join("gateway-key");
    let gateway = didgate_gateway::init(&gateway_dir, "127.0.0.1:0".parse()?)?;
    let members: Vec<didgate_cluster::Member> = NODES
        .iter()
        .map(|n| didgate_cluster::Member {
            node: (*n).into(),
            key: String::new(),
            gateway: String::new(),
            address: String::new(),
            lease: 0,
            lease_ttl_secs: 0,
            joined_ms: 0,
        })
        .collect();
    let caller = Identity::from_seed(&LIB_SEED);
    let home = didgate_cluster::home::home(caller.did().as_str(), &members)
        .context("a home")?
        .node
        .clone();
    let mut nodes = Vec::new();
    let mut master: Option<PathBuf> = None;
    // the home first: it has no handover window to wait out (no node served before it)
    let order: Vec<&str> = std::iter::once(home.as_str())
        .chain(NODES.iter().copied().filter(|n| *n != home))
        .collect();
    for name in &order {
        let node_base = base.join(name);
        let gw = start_node(
            bins,
            &node_base,
            upstream,
            &gateway_dir,
            etcd.settings(name),
            master.as_deref(),
        )
        .await?;
        master.get_or_insert(node_base.join("gateway/master.key"));
        nodes.push(gw);
    }
    let plane = didgate_cluster::ControlPlane::observe(etcd.settings("observer"), None).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while plane.members().await?.len() < NODES.len() {
        ensure!(
            Instant::now() < deadline,
            "the nodes did not all register within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((gateway, home, nodes))
}

async fn bench(args: ClusterArgs) -> Result<()> {
    let calls = args
        .calls
        .unwrap_or(if args.quick { 3_000 } else { 20_000 });
    ensure!(
        calls > 0 && args.runs > 0 && args.moved > 0,
        "counts must be at least 1"
    );
    println!(
        "didgate-bench cluster: {} x {calls} calls at concurrency 64 per gateway; {} core(s), {}",
        args.runs,
        threads(),
        cpu_model()
    );
    let base = work_dir(args.dir.as_deref())?;
    let bins = Binaries::find().await?;
    let etcd = Etcd::start(&base.path().join("etcd"))?;
    let upstream = LocalUpstream::start().await?;

    let single =
        GatewayProcess::start_with(&bins, &base.path().join("single"), upstream.addr, |_| {})
            .await?;
    let (gateway, home, nodes) = start_cluster(&bins, base.path(), &etcd, upstream.addr).await?;
    let (home_gw, other) = (&nodes[0], &nodes[1]);
    println!(
        "single gateway pid {}; cluster of {} nodes, the caller's home {home} pid {}",
        single.pid,
        nodes.len(),
        home_gw.pid
    );
    let single_client = Arc::new(
        Client::open(
            Identity::from_seed(&LIB_SEED),
            &base.path().join("chain-single"),
            single.addr,
            single.did.clone(),
        )
        .await?,
    );
    let cluster_client = Arc::new(
        Client::open(
            Identity::from_seed(&LIB_SEED),
            &base.path().join("chain-cluster"),
            home_gw.addr,
            gateway.clone(),
        )
        .await?,
    );
    let (mut alone, mut clustered) = (Vec::new(), Vec::new());
    for i in 0..args.runs {
        let (a, ra) = cpu_per_call(&single_client, single.pid, calls).await?;
        let (c, rc) = cpu_per_call(&cluster_client, home_gw.pid, calls).await?;
        println!(
            "run {}: gateway CPU per call: single {a:.4} ms ({:.0} calls/s), cluster home node {c:.4} ms ({:.0} calls/s)",
            i + 1,
            ra.per_s(),
            rc.per_s()
        );
        alone.push(a);
        clustered.push(c);
    }
    single_client.close().await;
    cluster_client.close().await;
    let (a, c) = (median(alone), median(clustered));
    let direct = first_calls(
        &base.path().join("chain-direct"),
        &gateway,
        home_gw.addr,
        args.moved,
    )
    .await?;
    let moved = first_calls(
        &base.path().join("chain-moved"),
        &gateway,
        other.addr,
        args.moved,
    )
    .await?;
    println!(
        "median gateway CPU per call: single {a:.4} ms, cluster {c:.4} ms ({:+.1}%)",
        (c / a - 1.0) * 100.0
    );
    println!(
        "first call on a new client: pinned at the home p50 {:.3} ms; pinned at another node (moved, followed) p50 {:.3} ms (+{:.3} ms)",
        ms(direct.quantile(0.5)),
        ms(moved.quantile(0.5)),
        ms(moved.quantile(0.5).saturating_sub(direct.quantile(0.5)))
    );
    for gw in nodes {
        gw.stop().await?;
    }
    single.stop().await?;
    upstream.stop();
    drop(etcd);
    let json = serde_json::json!({
        "single_cpu_ms_per_call": a,
        "cluster_home_cpu_ms_per_call": c,
        "cluster_vs_single": c / a,
        "first_call_home_p50_ms": ms(direct.quantile(0.5)),
        "first_call_moved_p50_ms": ms(moved.quantile(0.5)),
        "moved_added_p50_ms": ms(moved.quantile(0.5).saturating_sub(direct.quantile(0.5))),
        "calls": calls,
        "runs": args.runs,
        "cores": threads(),
    });
    println!("\n{json}");
    Ok(())
}

//! The cluster's control plane on a real 3-member etcd on loopback (issue 23;
//! specs/operation.md, "Cluster"), started by `tests/etcd/start-cluster.sh`, with real
//! gateways joined to it. Without etcd these tests print `SKIPPED: etcd not installed` and pass,
//! except under `CI=true`, where they fail (.ci/run installs it).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use didgate_client::{CallError, CallSpec};
use didgate_cluster::ClusterSettings;
use didgate_gateway::gateway::Revoke;
use didgate_protocol::message::RefusalCode;
use didgate_protocol::{Identity, Principal};
use didgate_tests::{Harness, alice, bob};

/// A 3-member etcd on loopback, stopped (every member killed) when dropped.
struct Etcd {
    dir: PathBuf,
    base: u16,
    /// Certificates for client TLS (`ETCD_TLS_DIR` of the script), if any.
    tls: Option<PathBuf>,
    pids: Vec<u32>,
    endpoints: Vec<String>,
}

impl Etcd {
    /// Starts one on ports `base`..`base + 5`; `None` (after printing SKIPPED) when etcd is
    /// not installed outside CI.
    fn start(dir: &Path, base: u16) -> anyhow::Result<Option<Self>> {
        Self::start_with_tls(dir, base, None)
    }

    /// Like [`Etcd::start`], with client TLS from the certificates in `tls`.
    fn start_with_tls(dir: &Path, base: u16, tls: Option<PathBuf>) -> anyhow::Result<Option<Self>> {
        if which("etcd").is_none() {
            if std::env::var("CI").as_deref() == Ok("true") {
                anyhow::bail!("etcd not installed, and CI=true (.ci/run installs it)");
            }
            println!("SKIPPED: etcd not installed (.ci/run installs it)");
            return Ok(None);
        }
        let mut etcd = Self {
            dir: dir.to_path_buf(),
            base,
            tls,
            pids: Vec::new(),
            endpoints: Vec::new(),
        };
        etcd.run_script()?;
        Ok(Some(etcd))
    }

    fn run_script(&mut self) -> anyhow::Result<()> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("etcd/start-cluster.sh");
        let mut cmd = std::process::Command::new(script);
        cmd.arg(&self.dir).arg(self.base.to_string());
        match &self.tls {
            Some(dir) => cmd.env("ETCD_TLS_DIR", dir),
            None => cmd.env_remove("ETCD_TLS_DIR"),
        };
        let out = cmd.output()?;
        anyhow::ensure!(
            out.status.success(),
            "etcd did not start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.pids.clear();
        self.endpoints.clear();
        for line in String::from_utf8(out.stdout)?.lines() {
            let parts: Vec<&str> = line.split_whitespace().collect();
            anyhow::ensure!(parts.len() == 3, "unexpected line {line:?}");
            self.pids.push(parts[1].parse()?);
            self.endpoints.push(parts[2].to_string());
        }
        Ok(())
    }

    /// Kills member `i` with SIGKILL and waits for it to be gone.
    fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        let pid = self.pids[i];
        std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{pid}/stat")).exists()
            && std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| !s.contains(") Z "))
                .unwrap_or(false)
        {
            anyhow::ensure!(Instant::now() < deadline, "etcd member {pid} did not die");
            std::thread::yield_now();
        }
        Ok(())
    }

    /// The index of the member that is the raft leader now (`etcdctl endpoint status`).
    fn leader(&self) -> anyhow::Result<usize> {
        let out = std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.endpoints.join(",")])
            .args(["endpoint", "status", "-w", "json"])
            .output()?;
        anyhow::ensure!(out.status.success(), "etcdctl endpoint status failed");
        let all: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
        for s in &all {
            let status = &s["Status"];
            if status["header"]["member_id"].as_u64().is_some()
                && status["header"]["member_id"] == status["leader"]
            {
                let ep = s["Endpoint"].as_str().unwrap_or_default();
                if let Some(i) = self.endpoints.iter().position(|e| e == ep) {
                    return Ok(i);
                }
            }
        }
        anyhow::bail!("no leader in {}", String::from_utf8_lossy(&out.stdout))
    }

    fn kill_all(&mut self) -> anyhow::Result<()> {
        for i in 0..self.pids.len() {
            self.kill(i)?;
        }
        Ok(())
    }

    /// Starts the three members again on their data.
    fn restart(&mut self) -> anyhow::Result<()> {
        self.run_script()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for pid in &self.pids {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

fn settings(etcd: &Etcd, cluster: &str, node: &str, ttl: u64) -> ClusterSettings {
    ClusterSettings {
        endpoints: etcd.endpoints.clone(),
        name: cluster.into(),
        node: node.into(),
        lease_ttl_secs: ttl,
        ca_file: None,
        cert_file: None,
        key_file: None,
        upstream_hosts: Vec::new(),
        allow_local_upstreams: false,
    }
}

/// `didgate-audit verify` over the chains of `gateways` (stores, data directories or exports)
/// and `clients`.
fn audit_verify(gateways: &[PathBuf], clients: &[PathBuf]) -> anyhow::Result<std::process::Output> {
    let mut cmd = std::process::Command::new(didgate_tests::bin("didgate-audit")?);
    cmd.arg("verify");
    for g in gateways {
        cmd.arg("--gateway").arg(g);
    }
    for c in clients {
        cmd.arg("--client").arg(c);
    }
    Ok(cmd.output()?)
}

/// [`audit_verify`] passes (exit 0), or the test fails with its report.
fn assert_verifies(gateways: &[PathBuf], clients: &[PathBuf]) -> anyhow::Result<()> {
    let out = audit_verify(gateways, clients)?;
    anyhow::ensure!(
        out.status.code() == Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Polls `f` until it holds, or fails after `within`.
async fn until(
    within: Duration,
    what: &str,
    mut f: impl AsyncFnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while !f().await {
        anyhow::ensure!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Whether `client`'s next GET /v1/balance is refused with `code`.
async fn refused_with(client: &didgate_client::Client, code: RefusalCode) -> bool {
    matches!(
        client.call(CallSpec::new("payments", "GET", "/v1/balance")).await,
        Err(CallError::Refused { code: c, .. }) if c == code
    )
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

/// [`measure_propagation`] while 4 clients of bob call node `b` as fast as they can (each at most
/// 5,000 calls, stopped when the measurement ends): the figures under load, and the calls made.
async fn measure_propagation_under_load(
    gw_a: &std::sync::Arc<didgate_gateway::Gateway>,
    b: &Harness,
) -> anyhow::Result<()> {
    let gw_b = b.gateway.clone().expect("b");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for i in 0..4 {
        // bob: alice is revoked by then
        let client = b.client(&format!("bob-load-{i}"), bob()).await?;
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let mut done = 0u32;
            while done < 5_000 && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = client
                    .call(CallSpec::new("payments", "GET", "/v1/balance"))
                    .await;
                done += 1;
            }
            done
        }));
    }
    let started = Instant::now();
    measure_propagation(gw_a, &gw_b, "under load: 4 clients calling node b").await?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut calls = 0;
    for t in load {
        calls += t.await?;
    }
    println!(
        "load on node b meanwhile: {calls} calls in {:?} ({:.0} calls/s)",
        started.elapsed(),
        f64::from(calls) / started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Revocations made on `a` until in force on `b`, 50 times: p50 and p99 printed.
async fn measure_propagation(
    gw_a: &std::sync::Arc<didgate_gateway::Gateway>,
    gw_b: &std::sync::Arc<didgate_gateway::Gateway>,
    when: &str,
) -> anyhow::Result<()> {
    let mut took = Vec::new();
    for _ in 0..50 {
        let did = Revoke::Did(Principal::parse(Identity::generate().did().as_str())?);
        let start = Instant::now();
        gw_a.revoke(&did, "measured").await?;
        until(
            Duration::from_secs(5),
            "a revocation reaches node b",
            async || gw_b.revoked(&did),
        )
        .await?;
        took.push(start.elapsed());
    }
    took.sort();
    println!(
        "revocation propagation a -> b over {} revocations ({when}, loopback, 3-member etcd): p50 {:?}, p99 {:?}, max {:?} (from the revoke call, which waits for a's own fsynced entry)",
        took.len(),
        percentile(&took, 50),
        percentile(&took, 99),
        took[took.len() - 1]
    );

    Ok(())
}

#[tokio::test]
async fn members_register_under_a_lease_and_a_revocation_is_in_force_on_every_node()
-> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let Some(etcd) = Etcd::start(&tmp.path().join("etcd"), 23_700)? else {
        return Ok(());
    };
    let a_settings = settings(&etcd, "c1", "node-a", 10);
    let b_settings = settings(&etcd, "c1", "node-b", 10);
    let mut a = Harness::start_with(|c| c.cluster = Some(a_settings)).await?;
    // every node of a cluster holds the same master key
    let master = a.gw_dir().join("master.key");
    let b = Harness::start_sharing(Some(&master), |c| c.cluster = Some(b_settings)).await?;
    let c = Harness::start_sharing(Some(&master), |c| {
        c.cluster = Some(settings(&etcd, "c1", "node-c", 10));
    })
    .await?;
    let plane = b
        .gateway
        .as_ref()
        .expect("b")
        .cluster()
        .expect("joined")
        .clone();
    let mut members = plane.members().await?;
    members.sort_by(|x, y| x.node.cmp(&y.node));
    assert_eq!(
        members
            .iter()
            .map(|m| (m.node.as_str(), m.address.clone()))
            .collect::<Vec<_>>(),
        vec![
            ("node-a", a.addr.to_string()),
            ("node-b", b.addr.to_string()),
            ("node-c", c.addr.to_string())
        ]
    );
    assert!(
        members
            .iter()
            .all(|m| m.lease != 0 && m.lease_ttl_secs == 10)
    );

    // alice calls node b; node a revokes her; node b refuses her next call, audited there
    let client = b.client("alice-b", alice()).await?;
    client
        .call(CallSpec::new("payments", "GET", "/v1/balance"))
        .await?;
    let gw_a = a.gateway.clone().expect("a");
    let gw_b = b.gateway.clone().expect("b");
    let alice_did = Revoke::Did(Principal::parse(alice().did().as_str())?);
    gw_a.revoke(&alice_did, "left the team").await?;
    let gw_c = c.gateway.clone().expect("c");
    until(
        Duration::from_secs(5),
        "the revocation reaches nodes b and c",
        async || gw_b.revoked(&alice_did) && gw_c.revoked(&alice_did),
    )
    .await?;
    // her open connection to b is closed by the revocation there; her next call on a new one
    // is refused, signed
    until(
        Duration::from_secs(5),
        "alice refused revoked on b",
        async || refused_with(&client, RefusalCode::Revoked).await,
    )
    .await?;

    measure_propagation(&gw_a, &gw_b, "idle").await?;
    measure_propagation_under_load(&gw_a, &b).await?;

    // a policy reloaded on a is in force on b (bob's GET /v1/balance: allowed, then not)
    let bob_client = b.client("bob-b", bob()).await?;
    bob_client
        .call(CallSpec::new("payments", "GET", "/v1/balance"))
        .await?;
    let alice_only = format!(
        "@id(\"alice-only\")\npermit (principal == Did::\"{}\", action, resource in Upstream::\"payments\");\n",
        alice().did()
    );
    a.use_policy(&alice_only)?;
    let published = gw_a.reload_policy_everywhere().await?;
    assert_eq!(gw_a.policy().hash(), published);
    until(
        Duration::from_secs(5),
        "the policy reaches node b",
        async || refused_with(&bob_client, RefusalCode::Policy).await,
    )
    .await?;
    assert_eq!(
        gw_b.policy().hash(),
        published,
        "the same text, groups and entities"
    );

    // a leaves: its member key goes with its lease
    a.stop().await;
    let left = plane.members().await?;
    let mut left: Vec<&str> = left.iter().map(|m| m.node.as_str()).collect();
    left.sort_unstable();
    assert_eq!(left, vec!["node-b", "node-c"]);
    Ok(())
}

#[tokio::test]
async fn a_node_cut_off_from_etcd_refuses_then_serves_again_and_survives_a_killed_member()
-> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let Some(mut etcd) = Etcd::start(&tmp.path().join("etcd"), 23_710)? else {
        return Ok(());
    };
    // a lease of 3 s: a node refuses after 1 s without an answered keep-alive
    let s = settings(&etcd, "c2", "node-a", 3);
    let h = Harness::start_with(|c| c.cluster = Some(s)).await?;
    let gw = h.gateway.clone().expect("running");
    let plane = gw.cluster().expect("joined").clone();
    let client = h.client("alice", alice()).await?;
    let call = || client.call(CallSpec::new("payments", "GET", "/v1/balance"));
    call().await?;

    // the member it talks to is killed: it moves to another endpoint and keeps serving
    let killed_at = didgate_cluster::monotonic_ms();
    etcd.kill(0)?;
    until(
        Duration::from_secs(10),
        "a keep-alive answered by another member",
        async || plane.health().last_answered_ms() > killed_at + 500,
    )
    .await?;
    call().await?;

    // every member killed: within the bound (a third of the TTL) calls are refused,
    // signed and audited
    etcd.kill_all()?;
    let cut_at = Instant::now();
    until(
        Duration::from_secs(10),
        "control_plane_unavailable",
        async || {
            matches!(
                call().await,
                Err(CallError::Refused {
                    code: RefusalCode::ControlPlaneUnavailable,
                    ..
                })
            )
        },
    )
    .await?;
    println!(
        "refusing {:?} after etcd went away (lease 3 s, bound 1 s)",
        cut_at.elapsed()
    );

    // etcd back: the node registers again and serves
    etcd.restart()?;
    let back_at = Instant::now();
    until(Duration::from_secs(20), "serving again", async || {
        call().await.is_ok()
    })
    .await?;
    println!("serving {:?} after etcd came back", back_at.elapsed());
    // its lease revoked behind its back (as when it was cut off longer than the TTL): it
    // registers again under a new lease, and still fails closed when etcd goes away again
    let old = plane.lease();
    let revoked = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &etcd.endpoints.join(",")])
        .args(["lease", "revoke", &format!("{old:x}")])
        .output()?;
    anyhow::ensure!(
        revoked.status.success(),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    until(Duration::from_secs(10), "registered again", async || {
        plane.lease() != old
    })
    .await?;
    etcd.kill_all()?;
    until(
        Duration::from_secs(10),
        "control_plane_unavailable again",
        async || refused_with(&client, RefusalCode::ControlPlaneUnavailable).await,
    )
    .await?;
    etcd.restart()?;
    until(Duration::from_secs(20), "serving again", async || {
        call().await.is_ok()
    })
    .await?;
    let members = plane.members().await?;
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].lease, plane.lease());
    drop(client);
    let refused = h
        .live_entries()?
        .into_iter()
        .filter(|e| e.code.as_deref() == Some("control_plane_unavailable"))
        .count();
    assert!(refused >= 1, "the refusals are audited");
    Ok(())
}

#[tokio::test]
async fn a_single_node_joins_a_new_cluster_keeping_its_chain_secrets_and_policy()
-> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let Some(etcd) = Etcd::start(&tmp.path().join("etcd"), 23_720)? else {
        return Ok(());
    };
    // a single node with history
    let mut a = Harness::start().await?;
    let client = a.client("alice", alice()).await?;
    let spec = || CallSpec::new("payments", "GET", "/v1/balance");
    client.call(spec()).await?;
    drop(client);
    // it joins a new cluster: the same data directory, [cluster] added
    let path = a.gw_dir().join("gateway.toml");
    let mut config = didgate_gateway::config::RawConfig::read(&path)?;
    config.cluster = Some(settings(&etcd, "c3", "node-a", 10));
    std::fs::write(&path, toml::to_string(&config)?)?;
    a.restart().await?;
    let client = a.client("alice", alice()).await?;
    client.call(spec()).await?;
    let gw_a = a.gateway.clone().expect("a");
    assert!(gw_a.cluster().is_some());
    // a DID revoked before a second node joins is refused by that node from its first call
    // (the join reads the cluster's revocations before the node takes calls)
    gw_a.revoke(
        &Revoke::Did(Principal::parse(alice().did().as_str())?),
        "before b joined",
    )
    .await?;
    // its policy seeded the cluster: a second node with other rules swaps it in
    let b = Harness::start_sharing(Some(&a.gw_dir().join("master.key")), |c| {
        c.rules.truncate(1); // no rule for bob's group
        c.cluster = Some(settings(&etcd, "c3", "node-b", 10));
    })
    .await?;
    let gw_b = b.gateway.clone().expect("b");
    until(
        Duration::from_secs(5),
        "node b takes the seeded policy",
        async || gw_b.policy().hash() == gw_a.policy().hash(),
    )
    .await?;
    b.client("bob", bob()).await?.call(spec()).await?;
    let first = b.client("alice-b", alice()).await?.call(spec()).await;
    assert!(
        matches!(
            first,
            Err(CallError::Refused {
                code: RefusalCode::Revoked,
                ..
            })
        ),
        "{first:?}"
    );
    // the chain continues across the upgrade and verifies with the client's
    drop((client, gw_a));
    a.stop().await;
    assert_verifies(&[a.gw_dir()], &[a.chain_dir("alice")])?;
    Ok(())
}

/// A certified node serving in process.
struct Member {
    gw: std::sync::Arc<didgate_gateway::Gateway>,
    addr: std::net::SocketAddr,
    serial: u64,
    task: tokio::task::JoinHandle<()>,
    /// Sending (or dropping) it stops the node: it drains and leaves the cluster.
    stop: tokio::sync::oneshot::Sender<()>,
}

impl Member {
    /// Stops the node and waits until its store is closed.
    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task.await?;
        drop(self.gw);
        Ok(())
    }
}

/// Makes `dir` the data directory of a certified node of the gateway of `h` (its key certified
/// for an hour) in `cluster`, with the gateway's configuration, master key and secret; returns
/// its certificate's serial.
fn certified_node(h: &Harness, dir: &Path, cluster: ClusterSettings) -> anyhow::Result<u64> {
    use didgate_gateway::datadir::DataDir;
    let key = didgate_gateway::init(dir, "127.0.0.1:0".parse()?)?;
    let gateway = didgate_io::identity::load(&h.gw_dir().join("identity"))?;
    let (cert, opened) = didgate_gateway::node::certify(
        &DataDir::new(&h.gw_dir()),
        &gateway,
        &didgate_gateway::node::Certify {
            node: key,
            not_before_ms: didgate_gateway::now_ms() - 60_000,
            valid_for_ms: 3_600_000,
            serial: None,
            addr: None,
        },
    )?;
    std::fs::write(dir.join("node.cert"), cert)?;
    let mut config = didgate_gateway::config::RawConfig::read(&h.gw_dir().join("gateway.toml"))?;
    config.node = Some(didgate_gateway::node::NodeSettings {
        certificate: "node.cert".into(),
        revocations: None,
    });
    config.cluster = Some(cluster);
    std::fs::write(dir.join("gateway.toml"), toml::to_string(&config)?)?;
    // every node of a cluster holds the same master key
    std::fs::copy(h.gw_dir().join("master.key"), dir.join("master.key"))?;
    didgate_gateway::add_secret(dir, "payments-key", didgate_tests::CANARY)?;
    Ok(opened.serial)
}

/// A certified node of the gateway of `h` (its key certified for an hour) in cluster `c`,
/// serving in process.
async fn certified_member(
    h: &Harness,
    dir: &Path,
    cluster: ClusterSettings,
) -> anyhow::Result<Member> {
    let serial = certified_node(h, dir, cluster)?;
    let gw = std::sync::Arc::new(didgate_gateway::Gateway::open(dir).await?);
    let endpoint = didgate_gateway::server::endpoint(&gw, "127.0.0.1:0".parse()?)?;
    let addr = endpoint.local_addr()?;
    gw.join_cluster(addr).await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(didgate_gateway::server::serve(
        gw.clone(),
        endpoint,
        async move {
            let _ = stopped.await;
        },
    ));
    Ok(Member {
        gw,
        addr,
        serial,
        task,
        stop,
    })
}

#[tokio::test]
async fn a_node_revocation_published_in_the_cluster_is_stapled_by_every_node_and_stops_the_node()
-> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let Some(etcd) = Etcd::start(&tmp.path().join("etcd"), 23_730)? else {
        return Ok(());
    };
    // a clock window of 1 s: alice's calls to b, her new home once a stopped, wait out the
    // handover from a (1 s + the nodes' clock tolerance) rather than 31 s
    let h = Harness::start_with(|c| c.gateway.skew_secs = 1).await?;
    let a = certified_member(&h, &tmp.path().join("a"), settings(&etcd, "c4", "a", 10)).await?;
    let (a_serial, a_task, _a_stop) = (a.serial, a.task, a.stop);
    let b = certified_member(&h, &tmp.path().join("b"), settings(&etcd, "c4", "b", 10)).await?;
    let (gw_b, b_addr) = (b.gw.clone(), b.addr);
    // the gateway key revokes a's serial; the list is published once, through b's etcd
    let gateway = didgate_io::identity::load(&h.gw_dir().join("identity"))?;
    let now = didgate_gateway::now_ms();
    let (bytes, list) = didgate_gateway::node::revoke(
        &didgate_gateway::datadir::DataDir::new(&h.gw_dir()),
        &gateway,
        a_serial,
        now,
        now,
    )?;
    gw_b.cluster()
        .expect("joined")
        .publish_node_revocations(list.seq, &bytes)
        .await?;
    // a stops taking calls by itself
    tokio::time::timeout(Duration::from_secs(10), a_task).await??;
    // b staples it (polled on b: the list it holds)...
    until(Duration::from_secs(5), "b holds the list", async || {
        gw_b.node_credentials()
            .and_then(|c| c.revocations)
            .as_deref()
            == Some(bytes.as_slice())
    })
    .await?;
    // ...so a new client of b learns it in its handshake, and keeps it in its home
    let home = tmp.path().join("home-revocations.cose");
    let client =
        didgate_client::Client::open(alice(), &h.chain_dir("alice-b"), b_addr, h.gw_did.clone())
            .await?
            .with_revocations_file(home.clone())?;
    until(Duration::from_secs(10), "alice served by b", async || {
        client
            .call(CallSpec::new("payments", "GET", "/v1/balance"))
            .await
            .is_ok()
    })
    .await?;
    assert_eq!(client.node_revocations().as_deref(), Some(bytes.as_slice()));
    assert_eq!(std::fs::read(&home)?, bytes, "kept in the home");
    Ok(())
}

/// A test CA, etcd's server certificate (127.0.0.1) and a client certificate, as PEM files in
/// `dir` under the names the script and `[cluster]` take.
fn etcd_certificates(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "didgate etcd test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key)?;
    std::fs::write(dir.join("ca.pem"), ca.pem())?;
    for (name, usage) in [
        ("server", rcgen::ExtendedKeyUsagePurpose::ServerAuth),
        ("client", rcgen::ExtendedKeyUsagePurpose::ClientAuth),
    ] {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()])?;
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress("127.0.0.1".parse()?));
        params.extended_key_usages = vec![usage];
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("didgate {name}"));
        let cert = params.signed_by(&key, &ca)?;
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem())?;
        std::fs::write(dir.join(format!("{name}-key.pem")), key.serialize_pem())?;
    }
    Ok(())
}

#[tokio::test]
async fn a_node_talks_to_etcd_over_tls_with_a_client_certificate() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let certs = tmp.path().join("certs");
    etcd_certificates(&certs)?;
    let Some(etcd) = Etcd::start_with_tls(&tmp.path().join("etcd"), 23_740, Some(certs.clone()))?
    else {
        return Ok(());
    };
    assert!(etcd.endpoints.iter().all(|e| e.starts_with("https://")));
    let with_tls = |client_cert: bool| {
        let mut s = settings(&etcd, "c5", "node-a", 10);
        let at = |name: &str| certs.join(name).display().to_string();
        s.ca_file = Some(at("ca.pem"));
        if client_cert {
            s.cert_file = Some(at("client.pem"));
            s.key_file = Some(at("client-key.pem"));
        }
        s
    };
    // without a client certificate etcd refuses the node: it does not start
    let refused = Harness::start_with(|c| c.cluster = Some(with_tls(false))).await;
    let e = refused.err().expect("no client certificate, no join");
    assert!(e.to_string().contains("cluster"), "{e}");
    // with one, it joins, registers and serves
    let h = Harness::start_with(|c| c.cluster = Some(with_tls(true))).await?;
    let plane = h
        .gateway
        .as_ref()
        .expect("a")
        .cluster()
        .expect("joined")
        .clone();
    assert_eq!(plane.members().await?.len(), 1);
    h.client("alice", alice())
        .await?
        .call(CallSpec::new("payments", "GET", "/v1/balance"))
        .await?;
    Ok(())
}

#[tokio::test]
async fn nodes_publish_their_checkpoints_and_witness_each_others() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let Some(etcd) = Etcd::start(&tmp.path().join("etcd"), 23_750)? else {
        return Ok(());
    };
    let h = Harness::start().await?;
    let (a_dir, b_dir) = (tmp.path().join("a"), tmp.path().join("b"));
    let a = certified_member(&h, &a_dir, settings(&etcd, "c6", "a", 3)).await?;
    let b = certified_member(&h, &b_dir, settings(&etcd, "c6", "b", 3)).await?;
    let (gw_a, gw_b, a_addr) = (a.gw.clone(), b.gw.clone(), a.addr);
    // a copy of a's store before the call: later, a's chain "rewritten" below what b witnessed
    let early = tmp.path().join("a-early");
    gw_a.chain().store().backup(&early)?;
    let client =
        didgate_client::Client::open(alice(), &h.chain_dir("alice-a"), a_addr, h.gw_did.clone())
            .await?;
    client
        .call(CallSpec::new("payments", "GET", "/v1/balance"))
        .await?;
    // a's checkpoint after the call reaches the registry, and b witnesses it
    gw_a.chain().checkpoint()?;
    let a_key = gw_a.key().to_string();
    let plane = gw_b.cluster().expect("joined").clone();
    until(
        Duration::from_secs(10),
        "b witnesses a's checkpoint",
        async || {
            gw_b.chain()
                .store()
                .entries()
                .filter_map(|item| item.ok())
                .filter_map(|(_, b)| didgate_audit::entry::Entry::decode(&b).ok())
                .any(|e| {
                    e.kind == didgate_audit::entry::EntryKind::Witness
                        && e.subject.as_deref() == Some(a_key.as_str())
                })
        },
    )
    .await?;
    let registry = plane.checkpoints().await?;
    assert!(registry.iter().any(|(n, _)| n == "a"), "{registry:?}");
    // both chains, with the witness, verify in one run
    drop((client, plane, gw_a, gw_b));
    a.stop().await?;
    b.stop().await?;
    assert_verifies(
        &[a_dir.join("store"), b_dir.join("store")],
        &[h.chain_dir("alice-a")],
    )?;
    // a's chain as it was before b witnessed it: a named violation
    let out = audit_verify(&[early, b_dir.join("store")], &[])?;
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("witnessed_rewrite"), "{said}");
    Ok(())
}

/// The control socket of the in-process gateway `gw` on `dir`, served until the sender
/// sends `true`; returned once the socket exists.
async fn control_socket(
    gw: &std::sync::Arc<didgate_gateway::Gateway>,
    dir: &Path,
) -> anyhow::Result<(
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<std::io::Result<()>>,
)> {
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn({
        let (gw, dir) = (gw.clone(), dir.to_path_buf());
        async move { didgate_gateway::control::server::serve(gw, &dir, stop_rx).await }
    });
    until(Duration::from_secs(5), "the control socket", async || {
        dir.join("control.sock").exists()
    })
    .await?;
    Ok((stop, task))
}

/// Runs `didgated ARGS` with `stdin`; (exit code, stderr).
fn didgated(args: &[&str], data: &Path, stdin: &str) -> anyhow::Result<(Option<i32>, String)> {
    use std::io::Write;
    let mut child = std::process::Command::new(didgate_tests::bin("didgated")?)
        .args(args)
        .arg("--data")
        .arg(data)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(stdin.as_bytes())?;
    let out = child.wait_with_output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The newest version of payments-key in etcd.
async fn newest_in_etcd(gw: &std::sync::Arc<didgate_gateway::Gateway>) -> Option<u64> {
    let plane = gw.cluster()?;
    let (bytes, _) = plane.secret("payments-key").await.ok()??;
    didgate_gateway::secrets::Secrets::newest_of(&bytes, gw.secrets().key_id()).map(|(_, v)| v)
}

/// With payments-key at version 2 on both nodes: `v1` (its version 1 record) written back to
/// etcd is refused by the nodes, which publish version 2 over it; and a change of a racing a
/// change another node published first loses, a taking the cluster's record.
async fn rollback_and_conflict(
    gw_a: &std::sync::Arc<didgate_gateway::Gateway>,
    gw_b: &std::sync::Arc<didgate_gateway::Gateway>,
    v1: &[u8],
) -> anyhow::Result<()> {
    let plane = gw_b.cluster().expect("joined").clone();
    let (_, rev) = plane.secret("payments-key").await?.expect("published");
    assert!(
        plane
            .publish_secret("payments-key", v1, rev)
            .await?
            .is_some(),
        "etcd takes any write"
    );
    // both nodes healed it: etcd and both stores agree again
    let agreed = async || {
        let (a, b) = (
            gw_a.secrets().stored("payments-key").ok().flatten(),
            gw_b.secrets().stored("payments-key").ok().flatten(),
        );
        newest_in_etcd(gw_b).await == Some(2) && a.is_some() && a == b
    };
    until(
        Duration::from_secs(5),
        "a node publishes version 2 over the rollback",
        agreed,
    )
    .await?;
    // a rotates to version 3 while b's disable of version 2 lands in etcd first
    let now = didgate_gateway::now_ms();
    let plane_a = gw_a.cluster().expect("joined").clone();
    let (out, published) = gw_a
        .shared()
        .change(&plane_a, gw_a.secrets(), "payments-key", || async {
            // b's operator disables it, through b's own path
            let (_, on_b) = gw_b
                .shared()
                .change(&plane, gw_b.secrets(), "payments-key", || async {
                    gw_b.secrets().disable("payments-key", now)
                })
                .await;
            on_b?;
            gw_a.secrets()
                .rotate("payments-key", "sk_live_lost_rotation_77", now)?;
            anyhow::Ok(())
        })
        .await;
    out.expect("run")?;
    let lost = published.expect_err("a conflict").to_string();
    assert!(lost.contains("another node changed"), "{lost}");
    // a holds the cluster's record (version 2, disabled), not its lost version 3
    until(Duration::from_secs(5), "a and b agree", async || {
        gw_a.secrets().stored("payments-key").ok().flatten()
            == gw_b.secrets().stored("payments-key").ok().flatten()
    })
    .await?;
    assert_eq!(newest_in_etcd(gw_a).await, Some(2));
    assert!(
        gw_a.secrets().open_current("payments-key", now).is_err(),
        "disabled"
    );
    Ok(())
}

#[tokio::test]
async fn a_secret_rotated_on_one_node_is_used_by_every_node() -> anyhow::Result<()> {
    use didgate_daemon::upstream_demo::DemoUpstream;
    let tmp = tempfile::tempdir()?;
    let Some(etcd) = Etcd::start(&tmp.path().join("etcd"), 23_760)? else {
        return Ok(());
    };
    let a = Harness::start_with(|c| c.cluster = Some(settings(&etcd, "c7", "node-a", 10))).await?;
    let master = a.gw_dir().join("master.key");
    // a node holding another master key could not open the cluster's secrets: it does not
    // join (exit 2 from didgated)
    let other =
        Harness::start_with(|c| c.cluster = Some(settings(&etcd, "c7", "node-x", 10))).await;
    let refused = format!("{:#}", other.err().expect("another master key refused"));
    assert!(refused.contains("master key"), "{refused}");
    let mut b = Harness::start_sharing(Some(&master), |c| {
        c.cluster = Some(settings(&etcd, "c7", "node-b", 10));
    })
    .await?;
    let (gw_a, gw_b) = (a.gateway.clone().expect("a"), b.gateway.clone().expect("b"));
    let plane = gw_b.cluster().expect("joined").clone();
    // b took the cluster's record (a's, which seeded it) in place of the one it had
    let (in_etcd, _) = plane.secret("payments-key").await?.expect("seeded");
    assert_eq!(
        gw_b.secrets().stored("payments-key")?.as_deref(),
        Some(in_etcd.as_slice())
    );
    let fingerprints = |up: &DemoUpstream| {
        up.seen()
            .iter()
            .filter_map(|s| s.credential_fingerprint.clone())
            .collect::<Vec<_>>()
    };
    // (b serves the cluster's upstreams: a's payments)
    let alice_b = b.client("alice-b", alice()).await?;
    alice_b
        .call(CallSpec::new("payments", "GET", "/v1/balance"))
        .await?;
    assert_eq!(
        fingerprints(&a.upstream).last(),
        Some(&DemoUpstream::fingerprint(didgate_tests::CANARY))
    );

    // the operator rotates it on a (didgated through a's control socket)
    let a_dir = a.gw_dir();
    let (stop_ctl, ctl) = control_socket(&gw_a, &a_dir).await?;
    let rotated = "sk_live_rotated_on_node_a_8d1f0c";
    let dir = a_dir.clone();
    let (code, stderr) = tokio::task::spawn_blocking(move || {
        didgated(&["secret", "rotate", "payments-key"], &dir, rotated)
    })
    .await??;
    assert_eq!(code, Some(0), "{stderr}");
    // b's next calls carry the new value
    let started = Instant::now();
    until(
        Duration::from_secs(5),
        "b injects the rotated value",
        async || {
            let _ = alice_b
                .call(CallSpec::new("payments", "GET", "/v1/balance"))
                .await;
            fingerprints(&a.upstream).last() == Some(&DemoUpstream::fingerprint(rotated))
        },
    )
    .await?;
    println!(
        "a secret rotated on node a was injected by node b {:?} after the command returned",
        started.elapsed()
    );
    rollback_and_conflict(&gw_a, &gw_b, &in_etcd).await?;

    // a stopped member refuses a lifecycle change made on its store alone
    drop((alice_b, gw_b, plane));
    b.stop().await;
    let dir = b.gw_dir();
    let (code, stderr) = tokio::task::spawn_blocking(move || {
        didgated(&["secret", "disable", "payments-key"], &dir, "")
    })
    .await??;
    assert_ne!(code, Some(0));
    assert!(stderr.contains("cluster member"), "{stderr}");
    // a revocation made on the stopped member reaches the cluster all the same
    let stranger = Identity::generate();
    let (dir, did) = (b.gw_dir(), stranger.did().to_string());
    let (code, stderr) = tokio::task::spawn_blocking(move || {
        didgated(&["revoke", "did", &did, "--reason", "offline"], &dir, "")
    })
    .await??;
    assert_eq!(code, Some(0), "{stderr}");
    let revoked = Revoke::Did(Principal::parse(stranger.did().as_str())?);
    until(
        Duration::from_secs(5),
        "a takes b's offline revocation",
        async || gw_a.revoked(&revoked),
    )
    .await?;
    // b's chain declares the version its calls used (the taken record's secret entry)
    assert_verifies(&[b.gw_dir()], &[b.chain_dir("alice-b")])?;
    let _ = stop_ctl.send(true);
    ctl.await??;
    Ok(())
}

#[tokio::test]
async fn every_nodes_chain_is_exported_from_one_node_and_verifies() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let Some(etcd) = Etcd::start(&tmp.path().join("etcd"), 23_770)? else {
        return Ok(());
    };
    let h = Harness::start().await?;
    let (a_dir, b_dir) = (tmp.path().join("a"), tmp.path().join("b"));
    let a = certified_member(&h, &a_dir, settings(&etcd, "c8", "a", 10)).await?;
    let b = certified_member(&h, &b_dir, settings(&etcd, "c8", "b", 10)).await?;
    for (name, addr) in [("alice-a", a.addr), ("alice-b", b.addr)] {
        didgate_client::Client::open(alice(), &h.chain_dir(name), addr, h.gw_did.clone())
            .await?
            .call(CallSpec::new("payments", "GET", "/v1/balance"))
            .await?;
    }
    // a key that is not a member's is refused the chain (signed refusal, policy)
    let stranger = Identity::generate();
    let refused = didgate_gateway::export::fetch(
        &stranger,
        &h.gw_did,
        b.addr,
        &tmp.path().join("stolen.export"),
    )
    .await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("refused: policy")),
        "{refused:?}"
    );
    assert!(!tmp.path().join("stolen.export").exists());
    // the operator exports every chain from a (a's own through its control socket)
    let (stop_ctl, ctl) = control_socket(&a.gw, &a_dir).await?;
    let out = tmp.path().join("exports");
    let export = |out: PathBuf| {
        let a_dir = a_dir.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(didgate_tests::bin("didgated")?)
                .args(["export", "--cluster", "--data"])
                .arg(&a_dir)
                .arg("--out")
                .arg(&out)
                .output()
                .map_err(anyhow::Error::from)
        })
    };
    let done = export(out.clone()).await??;
    let said = String::from_utf8_lossy(&done.stderr).into_owned();
    assert_eq!(done.status.code(), Some(0), "{said}");
    // both exports and both clients' chains verify in one run
    assert_verifies(
        &[out.join("a.export"), out.join("b.export")],
        &[h.chain_dir("alice-a"), h.chain_dir("alice-b")],
    )?;
    // b leaves: its chain is in the registry but cannot be fetched; the export says so
    b.stop().await?;
    let done = export(tmp.path().join("exports-2")).await??;
    let said = String::from_utf8_lossy(&done.stderr).into_owned();
    assert_eq!(done.status.code(), Some(1), "{said}");
    assert!(said.contains("b: NOT exported"), "{said}");
    assert!(tmp.path().join("exports-2/a.export").exists());
    let _ = stop_ctl.send(true);
    ctl.await??;
    a.stop().await?;
    Ok(())
}

#[tokio::test]
async fn upstreams_reloaded_on_one_node_are_served_by_every_node() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let Some(etcd) = Etcd::start(&tmp.path().join("etcd"), 23_780)? else {
        return Ok(());
    };
    let a = Harness::start_with(|c| c.cluster = Some(settings(&etcd, "c9", "node-a", 10))).await?;
    let b = Harness::start_sharing(Some(&a.gw_dir().join("master.key")), |c| {
        c.cluster = Some(settings(&etcd, "c9", "node-b", 10));
    })
    .await?;
    let (gw_a, gw_b) = (a.gateway.clone().expect("a"), b.gateway.clone().expect("b"));
    // b serves the cluster's upstreams (a's, which seeded them), not its own file's
    assert_eq!(gw_b.upstreams().hash(), gw_a.upstreams().hash());
    let alice_b = b.client("alice-b", alice()).await?;
    let balance = || CallSpec::new("payments", "GET", "/v1/balance");
    let (seen_a, seen_b) = (a.upstream.seen().len(), b.upstream.seen().len());
    alice_b.call(balance()).await?;
    assert_eq!(
        a.upstream.seen().len(),
        seen_a + 1,
        "b reached a's payments"
    );
    assert_eq!(b.upstream.seen().len(), seen_b);
    // the operator points payments at another base URL on a and reloads (didgated, through
    // a's control socket): every node takes it
    let path = a.gw_dir().join("gateway.toml");
    let mut config = didgate_gateway::config::RawConfig::read(&path)?;
    config.upstreams[0].base_url = b.upstream.base_url();
    std::fs::write(&path, toml::to_string(&config)?)?;
    let a_dir = a.gw_dir();
    let (stop_ctl, ctl) = control_socket(&gw_a, &a_dir).await?;
    let dir = a_dir.clone();
    let (code, stderr) =
        tokio::task::spawn_blocking(move || didgated(&["upstreams", "reload"], &dir, "")).await??;
    assert_eq!(code, Some(0), "{stderr}");
    until(
        Duration::from_secs(5),
        "b takes the new upstreams",
        async || gw_b.upstreams().hash() == gw_a.upstreams().hash(),
    )
    .await?;
    let seen_b = b.upstream.seen().len();
    alice_b.call(balance()).await?;
    assert_eq!(
        b.upstream.seen().len(),
        seen_b + 1,
        "b reached the new base URL"
    );
    // tables this node cannot validate are refused, and the ones in force stay
    config.upstreams[0].base_url = "not a url".into();
    std::fs::write(&path, toml::to_string(&config)?)?;
    let before = gw_a.upstreams().hash();
    let dir = a_dir.clone();
    let (code, stderr) =
        tokio::task::spawn_blocking(move || didgated(&["upstreams", "reload"], &dir, "")).await??;
    assert_ne!(code, Some(0));
    assert!(stderr.contains("upstreams in force stay"), "{stderr}");
    assert_eq!(gw_a.upstreams().hash(), before);
    let _ = stop_ctl.send(true);
    ctl.await??;
    Ok(())
}

#[tokio::test]
async fn revocations_written_across_a_killed_etcd_leader_are_all_in_force_on_every_node()
-> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let Some(mut etcd) = Etcd::start(&tmp.path().join("etcd"), 23_790)? else {
        return Ok(());
    };
    let a = Harness::start_with(|c| c.cluster = Some(settings(&etcd, "c10", "node-a", 10))).await?;
    let b = Harness::start_sharing(Some(&a.gw_dir().join("master.key")), |c| {
        c.cluster = Some(settings(&etcd, "c10", "node-b", 10));
    })
    .await?;
    let (gw_a, gw_b) = (a.gateway.clone().expect("a"), b.gateway.clone().expect("b"));
    // 30 revocations on a, the etcd leader killed (SIGKILL) after the 10th: a revocation whose
    // publication fails is run again, as the operator is told to
    let dids: Vec<Revoke> = (0..30)
        .map(|_| Principal::parse(Identity::generate().did().as_str()).map(Revoke::Did))
        .collect::<Result<_, _>>()?;
    let mut stalled = Duration::ZERO;
    for (i, did) in dids.iter().enumerate() {
        if i == 10 {
            let leader = etcd.leader()?;
            etcd.kill(leader)?;
            println!("killed the etcd leader (member {leader})");
        }
        let start = Instant::now();
        let deadline = start + Duration::from_secs(20);
        while let Err(e) = gw_a.revoke(did, "leader killed").await {
            anyhow::ensure!(
                Instant::now() < deadline,
                "revocation {i} never published: {e}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stalled = stalled.max(start.elapsed());
    }
    println!(
        "the longest revocation (with its retries) across the leader's death took {stalled:?}"
    );
    // nothing is lost: every one is in force on b
    until(
        Duration::from_secs(10),
        "every revocation on b",
        async || dids.iter().all(|d| gw_b.revoked(d)),
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_node_restored_from_an_old_copy_of_its_store_refuses_to_serve() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let Some(etcd) = Etcd::start(&tmp.path().join("etcd"), 23_800)? else {
        return Ok(());
    };
    let mut a =
        Harness::start_with(|c| c.cluster = Some(settings(&etcd, "c11", "node-a", 10))).await?;
    let balance = || CallSpec::new("payments", "GET", "/v1/balance");
    let client = a.client("alice", alice()).await?;
    client.call(balance()).await?;
    // a backup made while the node serves (didgated, through its control socket)
    let dir = a.gw_dir();
    let gw = a.gateway.clone().expect("a");
    let (stop_ctl, ctl) = control_socket(&gw, &dir).await?;
    let backup = tmp.path().join("backup");
    let (d, b) = (dir.clone(), backup.clone());
    let (code, stderr) = tokio::task::spawn_blocking(move || {
        didgated(&["backup", "--out", &b.display().to_string()], &d, "")
    })
    .await??;
    assert_eq!(code, Some(0), "{stderr}");
    // the backup alone is a chain that verifies
    assert_verifies(std::slice::from_ref(&backup), &[])?;
    // the node serves on; a clean stop seals and publishes its last checkpoint
    for _ in 0..3 {
        client.call(balance()).await?;
    }
    drop((client, gw));
    let _ = stop_ctl.send(true);
    ctl.await??;
    a.stop().await;
    // restored from the backup: the cluster saw this chain longer, so the node does not start
    let (d, b) = (dir.clone(), backup.clone());
    let (code, stderr) = tokio::task::spawn_blocking(move || {
        didgated(&["restore", "--from", &b.display().to_string()], &d, "")
    })
    .await??;
    assert_eq!(code, Some(0), "{stderr}");
    let refused = format!("{:#}", a.restart().await.expect_err("a rewound chain"));
    assert!(refused.contains("restored from an old backup"), "{refused}");
    Ok(())
}

/// How many `moved` refusals node `gw` has sent (its metrics).
fn moved_count(gw: &didgate_gateway::Gateway) -> u64 {
    let text = gw.metrics().render();
    text.lines()
        .find_map(|l| l.strip_prefix("didgate_refusals_total{code=\"moved\"} "))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// How many requests for `path` the demo upstream of `h` received.
fn upstream_saw(h: &Harness, path: &str) -> usize {
    h.upstream.seen().iter().filter(|r| r.path == path).count()
}

/// Waits until every node of `nodes` sees all of them as members serving the gateway.
async fn all_members(nodes: &[&std::sync::Arc<didgate_gateway::Gateway>]) -> anyhow::Result<()> {
    for gw in nodes {
        let plane = gw.cluster().expect("joined").clone();
        until(
            Duration::from_secs(10),
            "every node sees every member",
            async || plane.route_members().len() == nodes.len(),
        )
        .await?;
    }
    Ok(())
}

/// Issue 24: a caller's calls are judged on its home node. alice's home among nodes a, b and
/// c is a (rendezvous hashing over the names): a client pinned at b is sent to a, follows, and
/// goes straight to a from then on; a request replayed through another node reaches a and is
/// refused; a grant a issued is executed once, whichever node it is presented to.
#[tokio::test]
async fn calls_are_moved_to_the_callers_home_where_a_replay_or_a_second_execution_is_refused()
-> anyhow::Result<()> {
    use didgate_client::low_level::{RawExchange, RawFinal};
    let tmp = tempfile::tempdir()?;
    let Some(etcd) = Etcd::start(&tmp.path().join("etcd"), 23_810)? else {
        return Ok(());
    };
    let h = Harness::start().await?;
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        let s = settings(&etcd, "c10", name, 3);
        nodes.push(certified_member(&h, &tmp.path().join(name), s).await?);
    }
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    all_members(&[&a.gw, &b.gw, &c.gw]).await?;
    let members = a.gw.cluster().expect("joined").route_members();
    let home = didgate_cluster::home::home(alice().did().as_str(), &members).expect("home");
    assert_eq!(home.node, "a", "alice's home among a, b, c");
    // each node published, when it joined, a checkpoint that opens under the gateway (so a
    // node joining later knows that it served)
    let registry = a.gw.cluster().expect("joined").checkpoints().await?;
    assert_eq!(registry.len(), 3);
    for (node, bytes) in &registry {
        didgate_protocol::node::open_signed::<didgate_protocol::message::Checkpoint>(
            bytes, &h.gw_did, None, None,
        )
        .map_err(|e| anyhow::anyhow!("{node}: {e}"))?;
    }
    let client = async |name: &str, addr| {
        didgate_client::Client::open(alice(), &h.chain_dir(name), addr, h.gw_did.clone()).await
    };

    // pinned at b: moved to a, then straight to a
    let via_b = client("alice-via-b", b.addr).await?;
    via_b
        .call(CallSpec::new("payments", "GET", "/v1/balance"))
        .await?;
    assert_eq!(via_b.home_addr(), a.addr, "the home is remembered");
    assert_eq!(moved_count(&b.gw), 1);
    for _ in 0..3 {
        via_b
            .call(CallSpec::new("payments", "GET", "/v1/balance"))
            .await?;
    }
    assert_eq!(moved_count(&b.gw), 1, "later calls go straight home");
    assert_eq!(moved_count(&c.gw), 0);
    // each executing entry records the revision of the view that made a alice's home
    let revs: Vec<Option<u64>> =
        a.gw.chain()
            .store()
            .entries()
            .filter_map(|item| item.ok())
            .filter_map(|(_, b)| didgate_audit::entry::Entry::decode(&b).ok())
            .filter(|e| e.kind == didgate_audit::entry::EntryKind::Executing)
            .map(|e| e.home_rev)
            .collect();
    assert_eq!(revs.len(), 4);
    assert!(revs.iter().all(|r| r.is_some_and(|r| r > 0)), "{revs:?}");

    // a request sent through c executes on a; the same bytes through b reach a and are refused
    let via_c = client("alice-via-c", c.addr).await?;
    let (signed, _) = via_c.sign(&CallSpec::new("payments", "GET", "/v1/replayed"))?;
    let first = via_c.send_signed(&signed, &[]).await?;
    assert!(
        matches!(first.last, RawFinal::Receipt(_)),
        "{:?}",
        first.last
    );
    let again = client("alice-replay", b.addr).await?;
    let second = again.send_signed(&signed, &[]).await?;
    match &second.last {
        RawFinal::Refusal(r) => assert_eq!(r.message().code, RefusalCode::Replay),
        other => panic!("a replay through b: {other:?}"),
    }
    assert_eq!(upstream_saw(&h, "/v1/replayed"), 1, "executed once");

    // a grant issued by a, presented at c (sent to a, executed), then at b (used: refused)
    let grant = via_b
        .grant(CallSpec::new("payments", "POST", "/v1/granted").body(b"{}".to_vec()))
        .await?;
    let at_c = client("alice-exec-c", c.addr).await?;
    at_c.execute(&grant).await?;
    let at_b = client("alice-exec-b", b.addr).await?;
    match at_b.execute(&grant).await {
        Err(CallError::Refused { code, .. }) => assert_eq!(code, RefusalCode::GrantInvalid),
        other => panic!("a second execution through b: {other:?}"),
    }
    assert_eq!(upstream_saw(&h, "/v1/granted"), 1, "executed once");

    // an Execute sent on to the grant's issuer goes there alone: while it is held at the
    // upstream, the client's home is where it was (c), a call of the same client follows its
    // own `moved` to a, and the Execute's end does not set the home back to c
    let held = via_b
        .grant(CallSpec::new("payments", "GET", "/v1/slow-head"))
        .await?;
    let at_c = std::sync::Arc::new(client("alice-exec-held", c.addr).await?);
    let execution = {
        let at_c = at_c.clone();
        tokio::spawn(async move { at_c.execute(&held).await })
    };
    until(
        Duration::from_secs(10),
        "the held execution reaches the upstream",
        async || upstream_saw(&h, "/v1/slow-head") == 1,
    )
    .await?;
    assert_eq!(
        at_c.home_addr(),
        c.addr,
        "an Execute leaves the home as it was"
    );
    at_c.call(CallSpec::new("payments", "GET", "/v1/balance"))
        .await?;
    assert_eq!(at_c.home_addr(), a.addr, "a call follows its own moved");
    h.upstream.release_slow(1);
    let done = execution.await??;
    assert_eq!(done.status, 200);
    assert_eq!(
        at_c.home_addr(),
        a.addr,
        "the Execute's end leaves the home the other call found"
    );
    Ok(())
}

/// What the load of [`load`] saw: each call's path, when it ended, and its outcome.
#[derive(Debug)]
struct Seen {
    path: String,
    started: Instant,
    at: Instant,
    outcome: Result<(), CallError>,
}

/// Calls `client` from `tasks` tasks, each one call at a time, each call a new path under
/// `/v1/load/ROUND-`, until `stop` is set (at most `most` calls per task).
fn load(
    client: &std::sync::Arc<didgate_client::Client>,
    round: u32,
    tasks: usize,
    most: usize,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<Seen>>> {
    (0..tasks)
        .map(|t| {
            let (client, stop) = (client.clone(), stop.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                for i in 0..most {
                    if stop.load(std::sync::atomic::Ordering::Acquire) {
                        break;
                    }
                    let path = format!("/v1/load/{round}-{t}-{i}");
                    let started = Instant::now();
                    let outcome = client
                        .call(CallSpec::new("payments", "GET", &path))
                        .await
                        .map(|_| ());
                    seen.push(Seen {
                        path,
                        started,
                        at: Instant::now(),
                        outcome,
                    });
                }
                seen
            })
        })
        .collect()
}

/// `stop`, cleared for another load.
fn stop_again(
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    stop.store(false, std::sync::atomic::Ordering::Release);
    stop.clone()
}

/// Stops the load and returns what it saw.
async fn stop_load(
    handles: Vec<tokio::task::JoinHandle<Vec<Seen>>>,
    stop: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<Vec<Seen>> {
    stop.store(true, std::sync::atomic::Ordering::Release);
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await?);
    }
    Ok(all)
}

/// No path of the load reached the upstream twice.
fn executed_once(h: &Harness) {
    let mut paths: Vec<String> = h
        .upstream
        .seen()
        .into_iter()
        .map(|r| r.path)
        .filter(|p| p.starts_with("/v1/load/"))
        .collect();
    let n = paths.len();
    paths.sort();
    paths.dedup();
    assert_eq!(paths.len(), n, "a call executed twice");
}

/// The signed requests `client` recorded in its chain.
fn recorded_requests(client: &didgate_client::Client) -> Vec<Vec<u8>> {
    client
        .chain()
        .store()
        .entries()
        .filter_map(|item| item.ok())
        .filter_map(|(_, b)| didgate_audit::entry::Entry::decode(&b).ok())
        .filter(|e| e.kind == didgate_audit::entry::EntryKind::Request)
        .filter_map(|e| e.signed)
        .collect()
}

/// The code of the refusal `signed`, sent again through `client`, gets, once it reaches a node
/// that is the caller's home (while a node still sends it to a home that is gone, again).
async fn refusal_of(client: &didgate_client::Client, signed: &[u8]) -> anyhow::Result<RefusalCode> {
    use didgate_client::low_level::{RawExchange, RawFinal};
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        anyhow::ensure!(Instant::now() < deadline, "no home answered within 15 s");
        match client.send_signed(signed, &[]).await {
            Ok(a) => match a.last {
                RawFinal::Refusal(r) if r.message().code == RefusalCode::Moved => {}
                RawFinal::Refusal(r) => return Ok(r.message().code),
                other => anyhow::bail!("a request executed before ran again: {other:?}"),
            },
            Err(CallError::Unreachable(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Three certified nodes a, b and c of the gateway of `h` in `cluster`, each a `didgated
/// serve` process, with a lease of 3 s.
fn three_daemons(
    h: &Harness,
    etcd: &Etcd,
    cluster: &str,
    root: &Path,
) -> anyhow::Result<Vec<didgate_tests::Daemon>> {
    let mut daemons = Vec::new();
    for name in ["a", "b", "c"] {
        let dir = root.join(name);
        certified_node(h, &dir, settings(etcd, cluster, name, 3))?;
        daemons.push(didgate_tests::Daemon::start(
            &dir,
            &root.join(format!("{name}.log")),
        )?);
    }
    Ok(daemons)
}

/// Issue 24: kill -9 of alice's home node (a) while she calls through b. Her calls are served
/// by her new home once a's lease has expired and the handover window has passed (measured
/// and printed; bound: lease TTL + clock window + a keep-alive period + the client's idle
/// timeout, here 3 + 6 + 0.5 + 1.5 s, plus 3 s for the test's own connection timeouts); requests a executed just
/// before it died, sent again to the other nodes, are refused `handover`; no call reaches the
/// upstream twice; once a is back, every node and client chain verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_home_nodes_callers_are_served_elsewhere_after_the_bound_and_nothing_runs_twice()
-> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let Some(etcd) = Etcd::start(&tmp.path().join("etcd"), 23_820)? else {
        return Ok(());
    };
    // a clock window of 5 s (+ 1 s between nodes): long enough for a replay to pass the clock
    let h = Harness::start_with(|c| c.gateway.skew_secs = 5).await?;
    let root = tmp.path();
    let mut daemons = three_daemons(&h, &etcd, "c11", root)?;
    let (a_addr, b_addr) = (daemons[0].addr, daemons[1].addr);
    let observer =
        didgate_cluster::ControlPlane::observe(settings(&etcd, "c11", "observer", 3), None).await?;
    let open = async |name: &str, addr| -> anyhow::Result<didgate_client::Client> {
        // a dead node noticed within 1.5 s (keep-alives every 250 ms)
        Ok(
            didgate_client::Client::open(alice(), &h.chain_dir(name), addr, h.gw_did.clone())
                .await?
                .with_connect_timeout(Duration::from_millis(300))
                .with_idle_timeout(Duration::from_millis(1_500))?,
        )
    };
    let client = std::sync::Arc::new(open("alice", b_addr).await?);
    until(
        Duration::from_secs(10),
        "alice served through b",
        async || {
            client
                .call(CallSpec::new("payments", "GET", "/v1/balance"))
                .await
                .is_ok()
        },
    )
    .await?;
    assert_eq!(client.home_addr(), a_addr, "alice's home is a");

    // requests a executes just before it dies, as its client recorded them, kept to be sent
    // again
    let raw = open("alice-raw", a_addr).await?;
    for i in 0..3 {
        raw.call(CallSpec::new("payments", "GET", &format!("/v1/kept/{i}")))
            .await?;
    }
    let kept = recorded_requests(&raw);
    assert_eq!(kept.len(), 3);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handles = load(&client, 1, 4, 100_000, &stop);
    until(Duration::from_secs(10), "the load runs on a", async || {
        h.upstream
            .seen()
            .iter()
            .any(|r| r.path.starts_with("/v1/load/"))
    })
    .await?;
    let a = daemons.remove(0);
    let killed = Instant::now();
    tokio::task::spawn_blocking(move || a.kill()).await??;

    // a's member key goes with its lease; the requests it executed are refused elsewhere
    until(Duration::from_secs(10), "a's lease expires", async || {
        observer
            .members()
            .await
            .is_ok_and(|m| m.iter().all(|m| m.node != "a"))
    })
    .await?;
    let again = open("alice-again", b_addr).await?;
    for signed in &kept {
        assert_eq!(refusal_of(&again, signed).await?, RefusalCode::Handover);
    }
    for i in 0..3 {
        assert_eq!(upstream_saw(&h, &format!("/v1/kept/{i}")), 1);
    }
    let bound = Duration::from_millis(3_000 + 6_000 + 500 + 1_500 + 3_000);
    let started = Instant::now();
    let mut last = None;
    let served = until(bound, "alice served again", async || {
        let r = client
            .call(CallSpec::new("payments", "GET", "/v1/balance"))
            .await;
        let ok = r.is_ok();
        last = Some(r.map(|_| ()));
        ok
    })
    .await;
    anyhow::ensure!(served.is_ok(), "{served:?}: the last call: {last:?}");
    let failover = killed.elapsed();
    let seen = stop_load(handles, &stop).await?;
    println!(
        "failover: alice served again {:.2} s after a was killed ({:.2} s after its lease expired); {} calls under load, {} done",
        failover.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        seen.len(),
        seen.iter().filter(|s| s.outcome.is_ok()).count()
    );
    assert!(failover < bound, "{failover:?}");
    executed_once(&h);
    assert!(
        seen.iter().any(|s| s.outcome.is_ok() && s.at > killed),
        "the load was served after the kill"
    );

    // a comes back (it closes the calls it left open), then every chain verifies
    let a = didgate_tests::Daemon::start(&root.join("a"), &root.join("a.log"))?;
    daemons.insert(0, a);
    drop((client, raw, again));
    for d in daemons {
        tokio::task::spawn_blocking(move || d.stop()).await??;
    }
    assert_verifies(
        &[
            root.join("a/store"),
            root.join("b/store"),
            root.join("c/store"),
        ],
        &[h.chain_dir("alice"), h.chain_dir("alice-raw")],
    )?;
    Ok(())
}

/// Issue 24: a planned leave (SIGTERM) of alice's home loses no call: under load through b,
/// every call gets a receipt or a signed refusal (a call cut by a's close once drained is sent
/// again), her calls are served by her new home after the handover window; then kill -9 of the
/// etcd leader under load executes nothing twice; and every chain verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_leave_of_a_home_node_loses_no_call() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let Some(mut etcd) = Etcd::start(&tmp.path().join("etcd"), 23_830)? else {
        return Ok(());
    };
    let h = Harness::start_with(|c| c.gateway.skew_secs = 1).await?;
    let root = tmp.path();
    let mut daemons = three_daemons(&h, &etcd, "c12", root)?;
    let (a_addr, b_addr) = (daemons[0].addr, daemons[1].addr);
    let client = std::sync::Arc::new(
        didgate_client::Client::open(alice(), &h.chain_dir("alice"), b_addr, h.gw_did.clone())
            .await?
            .with_connect_timeout(Duration::from_millis(300)),
    );
    until(
        Duration::from_secs(10),
        "alice served through b",
        async || {
            client
                .call(CallSpec::new("payments", "GET", "/v1/balance"))
                .await
                .is_ok()
        },
    )
    .await?;
    assert_eq!(client.home_addr(), a_addr, "alice's home is a");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handles = load(&client, 1, 4, 100_000, &stop);
    until(Duration::from_secs(10), "the load runs on a", async || {
        h.upstream
            .seen()
            .iter()
            .any(|r| r.path.starts_with("/v1/load/"))
    })
    .await?;
    // two grants a issued and alice has not executed yet
    let grants = [
        client
            .grant(CallSpec::new("payments", "GET", "/v1/grant/1"))
            .await?,
        client
            .grant(CallSpec::new("payments", "GET", "/v1/grant/2"))
            .await?,
    ];
    let a = daemons.remove(0);
    let left = Instant::now();
    a.terminate()?;
    until(
        Duration::from_secs(10),
        "alice served by her new home",
        async || {
            client
                .call(CallSpec::new("payments", "GET", "/v1/balance"))
                .await
                .is_ok()
        },
    )
    .await?;
    println!(
        "planned leave: alice served again {:.2} s after a was told to stop",
        left.elapsed().as_secs_f64()
    );
    // the load goes on at the new home for a while
    let before = h.upstream.seen().len();
    until(
        Duration::from_secs(10),
        "the load runs at the new home",
        async || h.upstream.seen().len() >= before + 40,
    )
    .await?;
    let mut seen = stop_load(handles, &stop).await?;
    let gone = grants_executed_while_draining(&client, &grants, a, a_addr).await?;
    for path in ["/v1/grant/1", "/v1/grant/2"] {
        let n = h.upstream.seen().iter().filter(|r| r.path == path).count();
        assert_eq!(n, 1, "{path} executed {n} times");
    }
    // and the load goes on once a has exited
    let handles = load(&client, 3, 4, 100_000, &stop_again(&stop));
    let before = h.upstream.seen().len();
    until(
        Duration::from_secs(10),
        "the load runs on after a exited",
        async || h.upstream.seen().len() >= before + 20,
    )
    .await?;
    seen.extend(stop_load(handles, &stop).await?);
    no_call_waited(&seen, left, gone);
    let lost: Vec<(&str, &CallError)> = seen
        .iter()
        .filter_map(|s| match &s.outcome {
            Ok(()) | Err(CallError::Refused { .. }) => None,
            Err(e) => Some((s.path.as_str(), e)),
        })
        .collect();
    assert!(
        lost.is_empty(),
        "calls without a receipt or a refusal: {lost:?}"
    );
    executed_once(&h);

    leader_killed_under_load(&h, &client, &mut etcd, &stop).await?;
    drop(client);
    for d in daemons {
        tokio::task::spawn_blocking(move || d.stop()).await??;
    }
    assert_verifies(
        &[
            root.join("a/store"),
            root.join("b/store"),
            root.join("c/store"),
        ],
        &[h.chain_dir("alice")],
    )?;
    Ok(())
}

/// Kill -9 of the etcd leader under load: the nodes may refuse for a moment
/// (`control_plane_unavailable`), calls are served again, and nothing executes twice.
async fn leader_killed_under_load(
    h: &Harness,
    client: &std::sync::Arc<didgate_client::Client>,
    etcd: &mut Etcd,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<()> {
    let handles = load(client, 2, 4, 100_000, &stop_again(stop));
    let leader = etcd.leader()?;
    etcd.kill(leader)?;
    println!("killed the etcd leader (member {leader})");
    let before = h.upstream.seen().len();
    until(
        Duration::from_secs(15),
        "calls served after the leader's death",
        async || h.upstream.seen().len() > before + 10,
    )
    .await?;
    stop_load(handles, stop).await?;
    executed_once(h);
    Ok(())
}

/// The leaving node a drains while alice's two grants it issued are pending: her new home
/// sends their execution to a, which executes each once; her calls then go to her home again,
/// and a exits once they are consumed, long before its drain deadline (lease TTL + twice the
/// clock window, 7 s after the signal here). Returns when a had exited.
async fn grants_executed_while_draining(
    client: &didgate_client::Client,
    grants: &[didgate_client::IssuedGrant],
    a: didgate_tests::Daemon,
    a_addr: std::net::SocketAddr,
) -> anyhow::Result<Instant> {
    let home = client.home_addr();
    assert_ne!(home, a_addr, "alice was sent to her new home");
    for g in grants {
        // the test upstream answers 404 on these paths: an answer with a receipt
        client.execute(g).await?;
    }
    assert_eq!(
        client.home_addr(),
        home,
        "after a grant, calls go home again"
    );
    let executed = Instant::now();
    tokio::task::spawn_blocking(move || a.wait()).await??;
    let gone = Instant::now();
    let after = gone.duration_since(executed);
    println!(
        "planned leave: a exited {:.2} s after its last grant was executed",
        after.as_secs_f64()
    );
    assert!(
        after < Duration::from_secs(3),
        "a drained {after:?} after its grants were consumed"
    );
    Ok(gone)
}

/// A planned leave's load, as its caller saw it: a handover, not a window. No call of the
/// load is refused `handover` (one that was in flight when the node left, stamped before
/// another task's call the node admitted, is refused once and made again by the client at
/// once), and no call begun after the node stopped (`gone`) is refused at all.
fn no_call_waited(seen: &[Seen], left: Instant, gone: Instant) {
    let waited = seen
        .iter()
        .filter(|s| {
            s.outcome.as_ref().err().and_then(CallError::refusal_code)
                == Some(RefusalCode::Handover)
        })
        .count();
    let refused_after: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.started > gone && s.outcome.is_err())
        .collect();
    // over the load that ran across the leave (round 1; round 3 began after a exited)
    let mut done: Vec<Instant> = seen
        .iter()
        .filter(|s| s.outcome.is_ok() && s.path.starts_with("/v1/load/1-"))
        .map(|s| s.at)
        .collect();
    done.sort();
    let gap = done
        .windows(2)
        .map(|w| w[1].duration_since(w[0]))
        .max()
        .unwrap_or_default();
    println!(
        "planned leave: {} calls of the load, {waited} refused handover, longest wait between two receipts across the leave {:.0} ms",
        seen.len(),
        gap.as_secs_f64() * 1000.0
    );
    for s in seen.iter().filter(|s| s.outcome.is_err()) {
        println!(
            "  {} {:?}: {:?}",
            s.path,
            s.at.duration_since(left),
            s.outcome
        );
    }
    assert_eq!(waited, 0, "calls refused handover");
    let moved = seen
        .iter()
        .filter(|s| {
            s.outcome.as_ref().err().and_then(CallError::refusal_code) == Some(RefusalCode::Moved)
        })
        .count();
    assert_eq!(moved, 0, "calls refused moved (a loop of homes)");
    assert!(
        refused_after.is_empty(),
        "calls begun after the node stopped and refused: {:?}",
        refused_after
            .iter()
            .map(|s| (&s.path, &s.outcome))
            .collect::<Vec<_>>()
    );
}

/// `count` identities (from seeds 0x40.. on) whose home among nodes a, b and c is `node`.
fn homed_at(node: &str, count: usize) -> Vec<Identity> {
    let member = |n: &str| didgate_cluster::Member {
        node: n.into(),
        key: String::new(),
        gateway: String::new(),
        address: String::new(),
        lease: 0,
        lease_ttl_secs: 0,
        joined_ms: 0,
    };
    let nodes = [member("a"), member("b"), member("c")];
    (0x40u8..=0xff)
        .map(|s| Identity::from_seed(&[s; 32]))
        .filter(|id| {
            didgate_cluster::home::home(id.did().as_str(), &nodes).is_some_and(|m| m.node == node)
        })
        .take(count)
        .collect()
}

/// Issue 24: an upstream's rate limit (30 calls/s, burst 5) is split between the nodes by
/// demand: three callers at home on a and one on b, each calling as fast as it can for 6 s,
/// are admitted about one limit in all (bound: 30 x 6 + 3 x 5 bursts, plus a tenth), not one
/// per node; a, with three times b's demand, admits more than b.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_rate_limit_is_shared_by_the_nodes_by_demand() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let Some(etcd) = Etcd::start(&tmp.path().join("etcd"), 23_840)? else {
        return Ok(());
    };
    let callers: Vec<Identity> = homed_at("a", 3)
        .into_iter()
        .chain(homed_at("b", 1))
        .collect();
    let dids: Vec<String> = callers.iter().map(|i| i.did().to_string()).collect();
    let h = Harness::start_with(|c| {
        // b's caller waits out b's handover window from a (3 s + 1 s + 1 s) before the load
        c.gateway.skew_secs = 1;
        c.upstreams[0].rate_per_upstream = Some(didgate_gateway::config::RateLimit {
            burst: 5,
            per_sec: 30.0,
        });
        c.rules.push(didgate_gateway::config::Rule {
            principals: dids.clone(),
            upstream: "payments".into(),
            methods: vec!["GET".into()],
            paths: vec!["/v1/**".into()],
        });
    })
    .await?;
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        let s = settings(&etcd, "c13", name, 3);
        nodes.push(certified_member(&h, &tmp.path().join(name), s).await?);
    }
    all_members(&[&nodes[0].gw, &nodes[1].gw, &nodes[2].gw]).await?;
    let b_plane = nodes[1].gw.cluster().expect("joined").clone();
    until(
        Duration::from_secs(10),
        "b's handover window passes",
        async || b_plane.route(&dids[3]) == didgate_cluster::Route::Here { fence_ms: None },
    )
    .await?;
    let homes = [nodes[0].addr, nodes[0].addr, nodes[0].addr, nodes[1].addr];
    let run = Duration::from_secs(6);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, (id, addr)) in callers.into_iter().zip(homes).enumerate() {
        let client = didgate_client::Client::open(
            id,
            &h.chain_dir(&format!("caller-{i}")),
            addr,
            h.gw_did.clone(),
        )
        .await?;
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            while started.elapsed() < run {
                let spec = CallSpec::new("payments", "GET", "/v1/balance");
                if client.call(spec).await.is_ok() {
                    done += 1;
                }
            }
            done
        }));
    }
    let mut done = Vec::new();
    for t in tasks {
        done.push(t.await?);
    }
    let on_a_done: u64 = done[..3].iter().sum();
    let total: u64 = done.iter().sum();
    let bound = ((30.0 * run.as_secs_f64() + 15.0) * 1.1) as u64;
    println!(
        "rate shares: {total} calls admitted in {:.1} s (limit 30/s, burst 5): {on_a_done} on a, {} on b; bound {bound}",
        run.as_secs_f64(),
        done[3]
    );
    assert!(total <= bound, "{total} > {bound}");
    assert!(
        on_a_done > done[3],
        "a, the busier node, admits more: {done:?}"
    );
    assert!(total >= 90, "the limit is used, not starved: {total}");
    Ok(())
}

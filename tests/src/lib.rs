//! End-to-end harness: a real gateway (in-process `serve` on 127.0.0.1:0 with its store on
#![forbid(unsafe_code)]
//! disk), the real local payments upstream over HTTP on 127.0.0.1, and real clients over QUIC.

pub mod docserver;
pub mod echo_upstream;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use didgate_client::Client;
use didgate_daemon::upstream_demo::DemoUpstream;
use didgate_gateway::catalog::OperationConfig;
use didgate_gateway::config::{RawConfig, RawUpstream, Rule, Settings};
use didgate_gateway::gateway::Gateway;
use didgate_protocol::{Did, Identity};

/// The canary secret: it must never appear anywhere but as ciphertext.
pub const CANARY: &str = "sk-live-CANARY-7f3a9c1e5b2d4068a1b3c5d7e9f10234";

/// A running gateway with its upstream.
pub struct Harness {
    /// Root temp directory.
    pub dir: tempfile::TempDir,
    /// The upstream.
    pub upstream: DemoUpstream,
    /// The gateway DID.
    pub gw_did: Did,
    /// The gateway's UDP address.
    pub addr: SocketAddr,
    /// The running gateway (between start/restart and stop).
    pub gateway: Option<Arc<Gateway>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

/// The identities tests use: alice is allowed, bob is known (group readers, GET only).
pub fn alice() -> Identity {
    Identity::from_seed(&[0xa1; 32])
}
/// Bob.
pub fn bob() -> Identity {
    Identity::from_seed(&[0xb0; 32])
}

impl Harness {
    /// Starts the upstream and a gateway allowing alice GET/POST on /v1/** and bob GET
    /// /v1/balance.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(|_| {}).await
    }

    /// Like [`Harness::start`], letting the test adjust the configuration first.
    pub async fn start_with(adjust: impl FnOnce(&mut RawConfig)) -> anyhow::Result<Self> {
        Self::start_sharing(None, adjust).await
    }

    /// Like [`Harness::start_with`], the gateway's master key a copy of the file `master` (as
    /// every node of one cluster holds the same master key) when given.
    pub async fn start_sharing(
        master: Option<&Path>,
        adjust: impl FnOnce(&mut RawConfig),
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let upstream = DemoUpstream::start(
            zeroize::Zeroizing::new(CANARY.to_string()),
            Some(dir.path().join("upstream.jsonl")),
        )
        .await?;
        let gw_dir = dir.path().join("gateway");
        let gw_did = didgate_gateway::init(&gw_dir, "127.0.0.1:0".parse()?)?;
        let config = RawConfig {
            gateway: Settings {
                upstream_timeout_secs: 10,
                refusal_window_secs: 3600,
                ..Settings::new("127.0.0.1:0".parse()?)
            },
            upstreams: vec![RawUpstream {
                // the demo upstream listens on 127.0.0.1
                local: true,
                operations: payments_operations(),
                ..RawUpstream::new("payments", upstream.base_url(), "payments-key")
            }],
            groups: [("readers".to_string(), vec![bob().did().to_string()])]
                .into_iter()
                .collect(),
            rules: vec![
                Rule {
                    principals: vec![alice().did().to_string()],
                    upstream: "payments".into(),
                    methods: vec!["GET".into(), "POST".into()],
                    paths: vec!["/v1/**".into()],
                },
                Rule {
                    principals: vec!["group:readers".into()],
                    upstream: "payments".into(),
                    methods: vec!["GET".into()],
                    paths: vec!["/v1/balance".into()],
                },
            ],
            did_web: Default::default(),
            pkcs11: None,
            node: None,
            cluster: None,
        };
        let mut config = config;
        adjust(&mut config);
        std::fs::write(gw_dir.join("gateway.toml"), toml_string(&config)?)?;
        if let Some(master) = master {
            std::fs::copy(master, gw_dir.join("master.key"))?;
        }
        didgate_gateway::add_secret(&gw_dir, "payments-key", CANARY)?;
        let mut h = Self {
            dir,
            upstream,
            gw_did,
            addr: "127.0.0.1:1".parse()?,
            gateway: None,
            stop: None,
            server: None,
        };
        h.serve().await?;
        Ok(h)
    }

    /// The gateway's data directory.
    pub fn gw_dir(&self) -> PathBuf {
        self.dir.path().join("gateway")
    }

    /// A client's chain directory.
    pub fn chain_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join("clients").join(name)
    }

    async fn serve(&mut self) -> anyhow::Result<()> {
        self.serve_on("127.0.0.1:0".parse()?).await
    }

    async fn serve_on(&mut self, addr: SocketAddr) -> anyhow::Result<()> {
        let gw = Arc::new(Gateway::open(&self.gw_dir()).await?);
        let endpoint = didgate_gateway::server::endpoint(&gw, addr)?;
        self.addr = endpoint.local_addr()?;
        // a no-op without [cluster]
        gw.join_cluster(self.addr).await?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        self.stop = Some(tx);
        self.gateway = Some(gw.clone());
        self.server = Some(tokio::spawn(didgate_gateway::server::serve(
            gw,
            endpoint,
            async move {
                let _ = rx.await;
            },
        )));
        Ok(())
    }

    /// Asks the gateway to stop without waiting: it drains (calls in flight finish, new ones
    /// are refused) while the test goes on; [`Harness::stop`] then waits for the end.
    pub fn signal_stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// Stops the gateway (drains calls, closes its store).
    pub async fn stop(&mut self) {
        self.gateway = None;
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(s) = self.server.take() {
            let _ = s.await;
        }
    }

    /// Stops and starts the gateway again on the same data directory (new port).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await;
        self.serve().await
    }

    /// The gateway chain's entries, decoded (the gateway must be stopped).
    pub fn gateway_entries(&self) -> anyhow::Result<Vec<didgate_audit::entry::Entry>> {
        gateway_entries_in(&self.gw_dir())
    }

    /// Stops and starts the gateway again on the same data directory and the same address,
    /// as a restarted daemon would (clients keep their address).
    pub async fn restart_same_addr(&mut self) -> anyhow::Result<()> {
        let addr = self.addr;
        self.stop().await;
        self.serve_on(addr).await
    }

    /// Replaces the harness's rules with the Cedar policy `cedar` (written to
    /// `policies.cedar`, named by gateway.toml's `policy_file`) and reloads the running gateway.
    pub fn use_policy(&self, cedar: &str) -> anyhow::Result<()> {
        std::fs::write(self.gw_dir().join("policies.cedar"), cedar)?;
        let path = self.gw_dir().join("gateway.toml");
        let mut config = RawConfig::read(&path)?;
        config.gateway.policy_file = Some("policies.cedar".into());
        config.rules.clear();
        std::fs::write(&path, toml_string(&config)?)?;
        self.gateway
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("the gateway is not running"))?
            .reload_policy()?;
        Ok(())
    }

    /// A client for `identity` with its own chain named `name`.
    pub async fn client(&self, name: &str, identity: Identity) -> anyhow::Result<Client> {
        Ok(Client::open(
            identity,
            &self.chain_dir(name),
            self.addr,
            self.gw_did.clone(),
        )
        .await?)
    }
}

/// The payments upstream's catalog: alice may call all but `refund_charge` (DELETE); bob
/// only `get_balance`.
pub fn payments_operations() -> Vec<OperationConfig> {
    let op = |name: &str, method: &str, path: &str, description: &str| OperationConfig {
        name: name.into(),
        method: method.into(),
        path: path.into(),
        description: description.into(),
        ..OperationConfig::default()
    };
    vec![
        op(
            "get_balance",
            "GET",
            "/v1/balance",
            "The account's available balance.",
        ),
        op(
            "create_charge",
            "POST",
            "/v1/charges",
            "Create a charge; JSON body {\"amount\": cents, \"currency\": \"usd\"}.",
        ),
        op(
            "get_charge",
            "GET",
            "/v1/charges/{id}",
            "One charge by its id.",
        ),
        op(
            "refund_charge",
            "DELETE",
            "/v1/charges/{id}",
            "Refund a charge.",
        ),
    ]
}

fn toml_string(c: &RawConfig) -> anyhow::Result<String> {
    Ok(toml::to_string(c)?)
}

/// Turns off the admission of new connections by source address (`[gateway.handshakes]`):
/// for tests whose floods all come from 127.0.0.1 but stand for many addresses (a distributed
/// attacker), so that they reach the checks they are about. The admission itself is tested in
/// `limits.rs`.
pub fn without_address_limits(c: &mut RawConfig) {
    c.gateway.handshakes = no_address_limits();
}

/// `[gateway.handshakes]` with every limit off: every connection accepted at once, as before
/// issue 15 (the benchmarks' baseline too).
pub fn no_address_limits() -> didgate_gateway::config::Handshakes {
    didgate_gateway::config::Handshakes {
        retry_above_per_sec: 1_000_000,
        max_in_flight_per_address: 0,
        max_open_per_address: 0,
        rate_per_address: didgate_gateway::config::RateLimit {
            burst: 0,
            per_sec: 0.0,
        },
    }
}

/// Copies the directory tree `from` to `to`, making `identity` and `master.key` files 0600 (git
/// keeps no modes, and they are read only when private): for the fixtures of an earlier
/// release.
pub fn copy_private_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_private_tree(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), &target)?;
            if matches!(e.file_name().to_str(), Some("identity" | "master.key")) {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600))?;
            }
        }
    }
    Ok(())
}

/// The typed reason of a refused call (`None` if it was not refused by the gateway).
pub fn refusal_code<T>(
    r: &Result<T, didgate_client::CallError>,
) -> Option<didgate_protocol::message::RefusalCode> {
    match r {
        Err(didgate_client::CallError::Refused { code, .. }) => Some(*code),
        _ => None,
    }
}

/// The entries of the gateway chain in `gw_dir`, decoded (the gateway must be stopped).
pub fn gateway_entries_in(gw_dir: &Path) -> anyhow::Result<Vec<didgate_audit::entry::Entry>> {
    entries_in(gw_dir)
}

/// The entries of the chain at `path` (a data directory, a client home, a store or an export),
/// decoded; its owner must be stopped.
pub fn entries_in(path: &Path) -> anyhow::Result<Vec<didgate_audit::entry::Entry>> {
    let records = didgate_audit::load_records(path)?;
    Ok(records
        .entries
        .iter()
        .map(|(_, b)| didgate_audit::entry::Entry::decode(b))
        .collect::<Result<_, _>>()?)
}

/// The outcome and detail of each `result` entry of the client chain at `path`, in order.
pub fn results_in(
    path: &Path,
) -> anyhow::Result<Vec<(Option<didgate_audit::entry::Outcome>, Option<String>)>> {
    Ok(entries_in(path)?
        .into_iter()
        .filter(|e| e.kind == didgate_audit::entry::EntryKind::Result)
        .map(|e| (e.outcome, e.detail))
        .collect())
}

/// Writes `seed` as 64 hex digits to a new file (mode 0600) in `dir`, for `didgate keygen
/// --seed-file` (a seed never goes on a command line). Returns its path as text.
pub fn seed_file(dir: &Path, seed: &[u8; 32]) -> anyhow::Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!(
        "seed-{}.hex",
        hex::encode(&blake3::hash(seed).as_bytes()[..4])
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)?;
    std::io::Write::write_all(&mut f, hex::encode(seed).as_bytes())?;
    Ok(path.display().to_string())
}

/// The path of one of the workspace's binaries (`didgate`, `didgated`, `didgate-audit`), built
/// beside the test executables by the README's test command.
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    exe.parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join(name))
        .ok_or_else(|| anyhow::anyhow!("no directory above {}", exe.display()))
}

/// Every file under `dir` whose bytes contain `needle`.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p)
                && memchr::memmem::find(&bytes, needle).is_some()
            {
                hits.push(p);
            }
        }
    }
    hits
}

impl Harness {
    /// The gateway chain's entries as stored right now, read through the running gateway's own
    /// store (every refusal is acknowledged, so durable, before its answer is sent).
    pub fn live_entries(&self) -> anyhow::Result<Vec<didgate_audit::entry::Entry>> {
        let gw = self
            .gateway
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("the gateway is not running"))?;
        gw.chain()
            .store()
            .entries()
            .map(|item| Ok(didgate_audit::entry::Entry::decode(&item?.1)?))
            .collect()
    }

    /// A raw QUIC connection to the gateway as `who` (mutual DID authentication, no chain, no
    /// client library): for tests that send what the library never would. Keep the endpoint
    /// while the connection is used.
    pub async fn raw_connection(
        &self,
        who: &Identity,
    ) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
        self.raw_connection_speaking(who, didgate_protocol::Version::CURRENT)
            .await
    }

    /// [`Harness::raw_connection`] offering protocol `version` (its ALPN id) only.
    pub async fn raw_connection_speaking(
        &self,
        who: &Identity,
        version: didgate_protocol::Version,
    ) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
        didgate_client::low_level::tls::install_provider();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        endpoint.set_default_client_config(didgate_client::low_level::tls::client_config_for(
            who,
            &self.gw_did,
            version,
        )?);
        let conn = endpoint
            .connect(self.addr, didgate_client::low_level::tls::SERVER_NAME)?
            .await?;
        Ok((endpoint, conn))
    }

    /// A request to this gateway signed by `who`: GET /v1/balance on `payments`, no body, a
    /// random nonce, the current time and a fixed client head, then adjusted by `adjust`.
    /// Returns the signed bytes and the call ID.
    pub fn signed_request(
        &self,
        who: &Identity,
        adjust: impl FnOnce(&mut didgate_protocol::message::Request),
    ) -> anyhow::Result<(Vec<u8>, [u8; 32])> {
        use didgate_protocol::message::{ChainHead, Request, SignedMessage};
        let mut req = Request {
            v: didgate_protocol::Version::CURRENT.as_u64(),
            aud: self.gw_did.to_string(),
            upstream: "payments".into(),
            method: "GET".into(),
            path: "/v1/balance".into(),
            query: vec![],
            headers: vec![],
            body_len: 0,
            body_b3: *blake3::hash(b"").as_bytes(),
            nonce: rand::random(),
            time_ms: didgate_client::low_level::now_ms(),
            head: ChainHead {
                chain: [3; 32],
                seq: 0,
                hash: [3; 32],
            },
        };
        adjust(&mut req);
        let signed = req.sign(who);
        let call = didgate_protocol::envelope::verify(&signed, Request::KIND)?.digest();
        Ok((signed, call))
    }
}

/// The final frame of a raw stream, decoded and checked against the gateway's DID.
#[derive(Debug)]
pub enum RawEnd {
    /// A signed refusal.
    Refusal(didgate_protocol::message::Refusal),
    /// A signed receipt.
    Receipt(didgate_protocol::message::Receipt),
    /// A signed grant.
    Grant(didgate_protocol::message::GrantBody),
}

/// A catalog request on `conn` answered: the gateway has completed the connection's handshake
/// (and counted it open).
pub async fn answered(conn: &quinn::Connection) -> anyhow::Result<()> {
    use didgate_protocol::message::Message as _;
    let (mut send, mut recv) = conn.open_bi().await?;
    let request = didgate_protocol::catalog::CatalogRequest {
        v: didgate_protocol::Version::CURRENT.as_u64(),
        upstream: None,
    };
    let mut frame = bytes::BytesMut::new();
    didgate_protocol::frame::encode(
        didgate_protocol::frame::FrameType::CatalogRequest,
        &request.encode(),
        &mut frame,
    )?;
    send.write_all(&frame).await?;
    send.finish()?;
    let answer = recv.read_to_end(1 << 20).await?;
    anyhow::ensure!(!answer.is_empty(), "no answer to a catalog request");
    Ok(())
}

/// Writes `bytes` on a new stream of `conn` (finishing it if `finish`), then reads frames until
/// a signed terminal frame from `gateway` arrives.
pub async fn raw_exchange(
    conn: &quinn::Connection,
    gateway: &Did,
    bytes: &[u8],
    finish: bool,
) -> anyhow::Result<RawEnd> {
    let (mut send, mut recv) = conn.open_bi().await?;
    // a refusal may stop our side early: the answer still arrives
    let _ = send.write_all(bytes).await;
    if finish {
        let _ = send.finish();
    }
    read_end(&mut recv, gateway).await
}

/// Reads frames from `recv` until a signed terminal frame from `gateway`.
pub async fn read_end(recv: &mut quinn::RecvStream, gateway: &Did) -> anyhow::Result<RawEnd> {
    use didgate_protocol::frame::{FrameDecoder, FrameType};
    use didgate_protocol::message;
    let mut dec = FrameDecoder::new();
    loop {
        let Some(f) = didgate_client::low_level::wire::next_frame(recv, &mut dec).await? else {
            anyhow::bail!("stream ended without a terminal frame");
        };
        return Ok(match f.kind {
            FrameType::Refusal => {
                RawEnd::Refusal(message::open_from(&f.payload, gateway)?.into_message())
            }
            FrameType::Receipt => {
                RawEnd::Receipt(message::open_from(&f.payload, gateway)?.into_message())
            }
            FrameType::Grant => {
                RawEnd::Grant(message::open_from(&f.payload, gateway)?.into_message())
            }
            _ => continue,
        });
    }
}

/// `kind` frame(s) of `payload` (body payloads are split into frames of the maximum size).
pub fn frames(kind: didgate_protocol::frame::FrameType, payload: &[u8]) -> Vec<u8> {
    let mut out = bytes::BytesMut::new();
    if kind == didgate_protocol::frame::FrameType::Body {
        didgate_protocol::frame::encode_chunks(payload, &mut out);
    } else if didgate_protocol::frame::encode(kind, payload, &mut out).is_err() {
        return Vec::new();
    }
    out.to_vec()
}

/// A running `didgated serve`.
pub struct Daemon {
    child: std::process::Child,
    /// Its UDP address.
    pub addr: SocketAddr,
    stderr: Option<std::thread::JoinHandle<()>>,
}

impl Daemon {
    /// Starts the daemon on `data` and waits for its "listening" line and its control socket;
    /// everything it writes on stderr is appended to `log`.
    pub fn start(data: &Path, log: &Path) -> anyhow::Result<Self> {
        Self::start_with_log_level(data, log, "info")
    }

    /// Like [`Daemon::start`] with `RUST_LOG` set to `level`.
    pub fn start_with_log_level(data: &Path, log: &Path, level: &str) -> anyhow::Result<Self> {
        Self::spawn(data, log, level, None, &[])
    }

    /// Like [`Daemon::start`] with these environment variables set too.
    pub fn start_with_env(
        data: &Path,
        log: &Path,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> anyhow::Result<Self> {
        Self::spawn(data, log, "info", None, env)
    }

    /// Like [`Daemon::start`], running as user and group `uid` (the data directory must be
    /// theirs).
    pub fn start_as(data: &Path, log: &Path, uid: u32) -> anyhow::Result<Self> {
        Self::spawn(data, log, "info", Some(uid), &[])
    }

    fn spawn(
        data: &Path,
        log: &Path,
        level: &str,
        uid: Option<u32>,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> anyhow::Result<Self> {
        use std::io::{BufRead, BufReader, Write};
        use std::os::unix::process::CommandExt;
        use std::process::{Command, Stdio};
        let mut cmd = Command::new(bin("didgated")?);
        cmd.arg("serve")
            .arg("--data")
            .arg(data)
            .env("RUST_LOG", level)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(uid) = uid {
            cmd.uid(uid).gid(uid);
        }
        let mut child = cmd.spawn()?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stderr"))?;
        let mut lines = BufReader::new(stderr);
        let mut log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let mut addr = None;
        let mut line = String::new();
        while addr.is_none() {
            line.clear();
            if lines.read_line(&mut line)? == 0 {
                let _ = child.kill();
                anyhow::bail!("didgated exited before listening (see {})", log.display());
            }
            log_file.write_all(line.as_bytes())?;
            if let Some(rest) = line.trim().split(" listening on udp ").nth(1) {
                addr = Some(rest.parse()?);
            }
        }
        let stderr = std::thread::spawn(move || {
            let mut buf = Vec::new();
            while lines.read_until(b'\n', &mut buf).unwrap_or(0) > 0 {
                let _ = log_file.write_all(&buf);
                buf.clear();
            }
        });
        // ready when its control socket answers too (it is bound by a task of its own, and a
        // stale socket file from a kill -9 may still be there until then)
        let control = didgate_gateway::control::socket_path(data);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&control).is_err() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                anyhow::bail!("didgated's control socket never answered");
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        Ok(Self {
            child,
            addr: addr.ok_or_else(|| anyhow::anyhow!("no address"))?,
            stderr: Some(stderr),
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (at most 60 s) for the process to exit on its own, after a signal the test sent;
    /// an error if it did not, or if it exited with a failure status.
    pub fn wait(mut self) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if std::time::Instant::now() > deadline {
                anyhow::bail!("didgated did not exit within 60 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        if let Some(t) = self.stderr.take() {
            let _ = t.join();
        }
        anyhow::ensure!(status.success(), "didgated exited with {status}");
        Ok(())
    }

    /// SIGTERM, then [`Daemon::wait`]: the daemon drains, writes its final checkpoint and
    /// exits 0.
    pub fn stop(self) -> anyhow::Result<()> {
        self.terminate()?;
        self.wait()
    }

    /// SIGTERM only: the daemon starts to drain ([`Daemon::wait`] for its exit).
    pub fn terminate(&self) -> anyhow::Result<()> {
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()?;
        anyhow::ensure!(sent.success(), "kill -TERM {}", self.pid());
        Ok(())
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        if let Some(t) = self.stderr.take() {
            let _ = t.join();
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Python interpreter when it can import `module` (a pinned SDK of tests/requirements.txt).
/// Without it: prints `SKIPPED: ...` and returns `None` on a bare machine, and fails under
/// `CI=true` (where .ci/run installs it).
pub fn python_with(module: &str) -> anyhow::Result<Option<PathBuf>> {
    let python = PathBuf::from("python3");
    let found = std::process::Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return Ok(Some(python));
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        anyhow::bail!(
            "python module {module} is not installed (.ci/run installs tests/requirements.txt)"
        );
    }
    println!("SKIPPED: python module {module} not installed (.ci/run installs it)");
    Ok(None)
}

/// A `didgate` home for alice (seed `a1` repeated), made and pinned to the harness's gateway by
/// the real CLI, at `home` in the harness's directory.
pub fn alice_home(h: &Harness) -> anyhow::Result<PathBuf> {
    client_home(h, "home", &[0xa1u8; 32])
}

/// A `didgate` home at `name` in the harness's directory for the identity of `seed`, made and
/// pinned to the harness's gateway by the real CLI.
pub fn client_home(h: &Harness, name: &str, seed: &[u8; 32]) -> anyhow::Result<PathBuf> {
    let home = h.dir.path().join(name);
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let out = std::process::Command::new(bin("didgate")?)
            .arg("--home")
            .arg(&home)
            .args(args)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "didgate {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    run(&["keygen", "--seed-file", &seed_file(h.dir.path(), seed)?])?;
    run(&[
        "pin",
        "--gateway",
        &h.addr.to_string(),
        "--gateway-did",
        h.gw_did.as_str(),
    ])?;
    Ok(home)
}

/// Longest a proxy process may take to start or stop (never reached when things work).
const PROXY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);

/// A running `didgate proxy` process (killed if the test fails before stopping it).
pub struct ProxyProcess {
    child: tokio::process::Child,
    /// Its URL, `http://127.0.0.1:PORT`.
    pub url: String,
    /// Its token.
    pub token: String,
}

impl ProxyProcess {
    /// Starts `didgate --home HOME --json proxy --listen 127.0.0.1:0` and reads its start line.
    pub async fn start(home: &Path) -> anyhow::Result<Self> {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(bin("didgate")?)
            .arg("--home")
            .arg(home)
            .args(["--json", "proxy", "--listen", "127.0.0.1:0"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("stdout"))?;
        let mut line = String::new();
        tokio::time::timeout(
            PROXY_DEADLINE,
            tokio::io::BufReader::new(stdout).read_line(&mut line),
        )
        .await
        .map_err(|_| anyhow::anyhow!("the proxy printed no start line"))??;
        let v: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| anyhow::anyhow!("proxy start line {line:?}: {e}"))?;
        let url = v["url"].as_str().unwrap_or_default().to_string();
        let token = v["token"].as_str().unwrap_or_default().to_string();
        anyhow::ensure!(url.starts_with("http://127.0.0.1:"), "{line}");
        anyhow::ensure!(token.starts_with("dgp_"), "{line}");
        Ok(Self { child, url, token })
    }

    /// The proxy's process ID.
    pub fn pid(&self) -> anyhow::Result<u32> {
        self.child.id().ok_or_else(|| anyhow::anyhow!("no pid"))
    }

    /// SIGTERM, then the exit status (the proxy closes its chain and exits 0).
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let pid = self.pid()?;
        let st = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        anyhow::ensure!(st.success(), "kill -TERM {pid}");
        let status = tokio::time::timeout(PROXY_DEADLINE, self.child.wait())
            .await
            .map_err(|_| anyhow::anyhow!("the proxy did not stop after SIGTERM"))??;
        anyhow::ensure!(status.success(), "proxy exited with {status}");
        Ok(())
    }

    /// SIGKILL (nothing closes), then waits for the process to be gone.
    pub async fn kill(mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        tokio::time::timeout(PROXY_DEADLINE, self.child.wait())
            .await
            .map_err(|_| anyhow::anyhow!("the proxy did not die after SIGKILL"))??;
        Ok(())
    }
}

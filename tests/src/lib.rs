//! End-to-end harness: a real gateway (in-process `serve` on 127.0.0.1:0 with its store on
#![forbid(unsafe_code)]
//! disk), the real local payments upstream over HTTP on 127.0.0.1, and real clients over QUIC.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use didgate_client::Client;
use didgate_gateway::catalog::OperationConfig;
use didgate_gateway::config::{Auth, Config, Rule, Settings, Upstream};
use didgate_gateway::gateway::{self, Gateway};
use didgate_gateway::upstream_demo::DemoUpstream;
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
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let upstream = DemoUpstream::start(
            zeroize::Zeroizing::new(CANARY.to_string()),
            Some(dir.path().join("upstream.jsonl")),
        )
        .await?;
        let gw_dir = dir.path().join("gateway");
        let gw_did = didgate_gateway::init(&gw_dir, "127.0.0.1:0".parse()?)?;
        let config = Config {
            gateway: Settings {
                upstream_timeout_secs: 10,
                refusal_window_secs: 3600,
                ..Settings::new("127.0.0.1:0".parse()?)
            },
            upstreams: vec![Upstream {
                name: "payments".into(),
                base_url: upstream.base_url(),
                auth: Auth::Bearer,
                secret: "payments-key".into(),
                allowed_hosts: vec!["127.0.0.1".into()],
                allow_headers: vec!["content-type".into(), "accept".into()],
                test_path: None,
                // the demo upstream listens on 127.0.0.1
                local: true,
                timeout_secs: None,
                rate_per_upstream: None,
                max_concurrent_per_upstream: None,
                rate_per_did: None,
                max_concurrent_per_did: None,
                max_response_bytes: None,
                operations: payments_operations(),
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
        };
        let mut config = config;
        adjust(&mut config);
        std::fs::write(gw_dir.join("gateway.toml"), toml_string(&config)?)?;
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
        let endpoint = gateway::endpoint(&gw, addr)?;
        self.addr = endpoint.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        self.stop = Some(tx);
        self.gateway = Some(gw.clone());
        self.server = Some(tokio::spawn(gateway::serve(gw, endpoint, async move {
            let _ = rx.await;
        })));
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

    /// Stops and starts the gateway again on the same data directory and the same address,
    /// as a restarted daemon would (clients keep their address).
    pub async fn restart_same_addr(&mut self) -> anyhow::Result<()> {
        let addr = self.addr;
        self.stop().await;
        self.serve_on(addr).await
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

fn toml_string(c: &Config) -> anyhow::Result<String> {
    Ok(toml::to_string(c)?)
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
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                hits.push(p);
            }
        }
    }
    hits
}

//! One gateway DID, many nodes (issue 22; specs/protocol.md, "Nodes"): real gateways serving
//! as nodes with their own keys on 127.0.0.1, certified by the gateway DID, a real upstream,
//! real clients pinned to the gateway DID only, and `didgate-audit verify` over every chain.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use didgate_client::low_level::RawExchange;
use didgate_client::{CallError, CallSpec, Client, Unreachable};
use didgate_gateway::config::RawConfig;
use didgate_gateway::datadir::DataDir;
use didgate_gateway::gateway::Gateway;
use didgate_gateway::node::{self, Certify, NodeSettings};
use didgate_io::node::NodeCredentials;
use didgate_protocol::message::SignedMessage;
use didgate_protocol::node::{NodeCertError, NodeCertificate};
use didgate_protocol::{Did, Identity, Version};
use didgate_tests::{CANARY, Harness, alice, bin};

const HOUR_MS: u64 = 3_600_000;

/// A gateway serving as one node, in process, on its own data directory and key.
struct Node {
    dir: PathBuf,
    key: Did,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Node {
    /// Makes a node in `dir` (a fresh key) with the single gateway's configuration and secret,
    /// certified by the gateway key of `h` for an hour, and starts it on `addr`.
    async fn start(h: &Harness, dir: &Path, addr: SocketAddr) -> anyhow::Result<Self> {
        let key = didgate_gateway::init(dir, addr)?;
        let cert = certify(h, &key, didgate_gateway::now_ms() - 60_000, HOUR_MS)?.0;
        std::fs::write(dir.join("node.cert"), cert)?;
        let mut config = RawConfig::read(&h.gw_dir().join("gateway.toml"))?;
        config.gateway.listen = addr;
        config.node = Some(NodeSettings {
            certificate: "node.cert".into(),
            revocations: None,
        });
        std::fs::write(dir.join("gateway.toml"), toml::to_string(&config)?)?;
        didgate_gateway::add_secret(dir, "payments-key", CANARY)?;
        let mut node = Self {
            dir: dir.to_path_buf(),
            key,
            addr,
            stop: None,
            task: None,
        };
        node.serve(addr).await?;
        Ok(node)
    }

    async fn serve(&mut self, addr: SocketAddr) -> anyhow::Result<()> {
        let gw = Arc::new(Gateway::open(&self.dir).await?);
        let endpoint = didgate_gateway::server::endpoint(&gw, addr)?;
        self.addr = endpoint.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        self.stop = Some(tx);
        self.task = Some(tokio::spawn(didgate_gateway::server::serve(
            gw,
            endpoint,
            async move {
                let _ = rx.await;
            },
        )));
        Ok(())
    }

    async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

/// Signs a node certificate for `node` with the gateway key of `h`.
fn certify(
    h: &Harness,
    node: &Did,
    not_before_ms: u64,
    valid_for_ms: u64,
) -> anyhow::Result<(Vec<u8>, NodeCertificate)> {
    let gateway = didgate_io::identity::load(&h.gw_dir().join("identity"))?;
    Ok(node::certify(
        &DataDir::new(&h.gw_dir()),
        &gateway,
        &Certify {
            node: node.clone(),
            not_before_ms,
            valid_for_ms,
            serial: None,
            addr: None,
        },
    )?)
}

async fn client_at(h: &Harness, name: &str, addr: SocketAddr) -> anyhow::Result<Client> {
    Ok(Client::open(alice(), &h.chain_dir(name), addr, h.gw_did.clone()).await?)
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
    Ok(s.local_addr()?)
}

#[tokio::test]
async fn a_client_pinned_to_the_gateway_did_talks_to_two_nodes_and_one_verify_takes_both()
-> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let root = h.dir.path().to_path_buf();
    let mut a = Node::start(&h, &root.join("node-a"), "127.0.0.1:0".parse()?).await?;
    let mut b = Node::start(&h, &root.join("node-b"), "127.0.0.1:0".parse()?).await?;
    assert_ne!(a.key, b.key);
    let to_a = client_at(&h, "to-a", a.addr).await?;
    let to_b = client_at(&h, "to-b", b.addr).await?;
    for (client, node) in [(&to_a, &a), (&to_b, &b)] {
        let answer = client
            .call(CallSpec::new("payments", "GET", "/v1/balance"))
            .await?;
        assert_eq!(answer.status, 200);
        let signed = didgate_protocol::message::open::<didgate_protocol::message::Receipt>(
            &answer.receipt_bytes,
        )?;
        // signed by the node's own key, carrying its certificate by the gateway DID
        assert_eq!(signed.envelope().signer(), &node.key);
        let cert = signed.message().node_cert.as_deref().expect("node_cert");
        didgate_protocol::node::check(cert, &h.gw_did, &node.key, answer.receipt.time_ms, None)?;
    }
    // the two-step flow: the grant carries the certificate too, and never outlives it
    let grant = to_a
        .grant(
            CallSpec::new("payments", "POST", "/v1/charges")
                .header("content-type", "application/json")
                .body(br#"{"amount":3,"currency":"usd"}"#.to_vec()),
        )
        .await?;
    assert!(grant.grant.node_cert.is_some());
    assert_eq!(to_a.execute(&grant).await?.status, 200);
    // a version 1 client cannot talk to a node: a clear version error, nothing sent
    let v1 = client_at(&h, "v1", a.addr).await?.speaking(Version::V1)?;
    let r = v1
        .call(CallSpec::new("payments", "GET", "/v1/balance"))
        .await;
    assert!(
        matches!(r, Err(CallError::VersionUnsupported { .. })),
        "{r:?}"
    );
    drop((to_a, to_b, v1));
    a.stop().await;
    b.stop().await;
    h.stop().await;
    let out = std::process::Command::new(bin("didgate-audit")?)
        .args(["verify", "--gateway"])
        .arg(a.dir.join("store"))
        .arg("--gateway")
        .arg(b.dir.join("store"))
        .arg("--client")
        .arg(h.chain_dir("to-a"))
        .arg("--client")
        .arg(h.chain_dir("to-b"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A QUIC endpoint presenting `credentials` for `key` that completes handshakes and then
/// closes each connection: what a client's verifier judges is the leaf alone.
fn presenting(key: &Identity, credentials: &NodeCredentials) -> anyhow::Result<quinn::Endpoint> {
    let cfg = didgate_io::tls::node_server_config(key, credentials, &[Version::V2])?;
    let endpoint = quinn::Endpoint::server(cfg, "127.0.0.1:0".parse()?)?;
    let accepting = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accepting.accept().await {
            tokio::spawn(async move {
                if let Ok(conn) = incoming.await {
                    conn.close(0u32.into(), b"handshake only");
                }
            });
        }
    });
    Ok(endpoint)
}

fn node_refusal(r: Result<didgate_client::Answer, CallError>) -> NodeCertError {
    match r {
        Err(CallError::Unreachable(Unreachable::NodeCertificate { source, .. })) => source,
        other => panic!("expected a refused node certificate, got {other:?}"),
    }
}

#[tokio::test]
async fn expired_revoked_and_foreign_signed_node_certificates_are_refused_at_the_handshake()
-> anyhow::Result<()> {
    let h = Harness::start().await?;
    let now = didgate_gateway::now_ms();
    let key = Identity::generate();
    let spec = || CallSpec::new("payments", "GET", "/v1/balance");
    let credentials = |certificate: Vec<u8>, revocations: Option<Vec<u8>>| NodeCredentials {
        certificate,
        revocations,
    };

    // expired an hour ago
    let (expired, _) = certify(&h, key.did(), now - 2 * HOUR_MS, HOUR_MS)?;
    let server = presenting(&key, &credentials(expired, None))?;
    let client = client_at(&h, "expired", server.local_addr()?).await?;
    assert!(matches!(
        node_refusal(client.call(spec()).await),
        NodeCertError::Expired { .. }
    ));

    // signed by a key that is not the pinned gateway
    let foreign = Identity::generate();
    let mut forged = certify(&h, key.did(), now - 60_000, HOUR_MS)?.1;
    forged.gateway = foreign.did().to_string();
    let server = presenting(&key, &credentials(forged.sign(&foreign), None))?;
    let client = client_at(&h, "foreign", server.local_addr()?).await?;
    assert!(matches!(
        node_refusal(client.call(spec()).await),
        NodeCertError::Open(_)
    ));

    // revoked: a valid certificate, until the client holds a list naming its serial
    let (good, cert) = certify(&h, key.did(), now - 60_000, HOUR_MS)?;
    let server = presenting(&key, &credentials(good, None))?;
    let home = h.dir.path().join("revocations.cose");
    let client = client_at(&h, "revoked", server.local_addr()?)
        .await?
        .with_revocations_file(home.clone())?;
    // the handshake succeeds (then the endpoint closes the connection: no call is answered)
    assert!(!matches!(
        client.call(spec()).await,
        Err(CallError::Unreachable(_))
    ));
    let gateway = didgate_io::identity::load(&h.gw_dir().join("identity"))?;
    let (_, list) = node::revoke(
        &DataDir::new(&h.gw_dir()),
        &gateway,
        cert.serial,
        now - 1,
        now,
    )?;
    // another node staples the list: a client of the same home learns it there, keeps it,
    // and the revoked node is refused from then on, by this client and the next
    let other = Identity::generate();
    let (other_cert, _) = certify(&h, other.did(), now - 60_000, HOUR_MS)?;
    let list_bytes = std::fs::read(node::revocations_path(&DataDir::new(&h.gw_dir())))?;
    let stapling = presenting(&other, &credentials(other_cert, Some(list_bytes)))?;
    let learner = client_at(&h, "learner", stapling.local_addr()?)
        .await?
        .with_revocations_file(home.clone())?;
    let _ = learner.call(spec()).await;
    assert_eq!(
        learner.node_revocations().map(|b| b.len()),
        Some(std::fs::read(&home)?.len())
    );
    let later = client_at(&h, "revoked-later", server.local_addr()?)
        .await?
        .with_revocations_file(home)?;
    assert!(matches!(
        node_refusal(later.call(spec()).await),
        NodeCertError::Revoked { serial, .. } if serial == cert.serial
    ));
    assert_eq!(list.revoked.len(), 1);
    Ok(())
}

#[tokio::test]
async fn a_node_gets_a_new_key_and_certificate_and_its_clients_keep_working() -> anyhow::Result<()>
{
    let h = Harness::start().await?;
    let root = h.dir.path().to_path_buf();
    let addr = free_addr()?;
    let mut first = Node::start(&h, &root.join("node-1"), addr).await?;
    let client = client_at(&h, "rotating", addr).await?;
    let spec = || CallSpec::new("payments", "GET", "/v1/balance");
    let before = client.call(spec()).await?;
    first.stop().await;
    // the same address, a new key, a new certificate: no re-pin
    let second = Node::start(&h, &root.join("node-2"), addr).await?;
    assert_ne!(first.key, second.key);
    let after = client.call(spec()).await?;
    let signer = |bytes: &[u8]| -> anyhow::Result<Did> {
        Ok(
            didgate_protocol::message::open::<didgate_protocol::message::Receipt>(bytes)?
                .envelope()
                .signer()
                .clone(),
        )
    };
    assert_eq!(signer(&before.receipt_bytes)?, first.key);
    assert_eq!(signer(&after.receipt_bytes)?, second.key);
    Ok(())
}

#[tokio::test]
async fn a_node_refuses_to_start_with_a_certificate_that_does_not_hold() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let dir = h.dir.path().join("node-x");
    let node = Node::start(&h, &dir, "127.0.0.1:0".parse()?).await?;
    let now = didgate_gateway::now_ms();
    let (expired, _) = certify(&h, &node.key, now - 2 * HOUR_MS, HOUR_MS)?;
    std::fs::write(dir.join("node.cert"), expired)?;
    let e = Gateway::open(&dir).await.expect_err("refused");
    assert!(e.to_string().contains("expired"), "{e}");
    // another node's certificate
    let (others, _) = certify(&h, Identity::generate().did(), now - 60_000, HOUR_MS)?;
    std::fs::write(dir.join("node.cert"), others)?;
    let e = Gateway::open(&dir).await.expect_err("refused");
    assert!(e.to_string().contains("another key"), "{e}");
    Ok(())
}

#[tokio::test]
async fn a_node_stops_taking_calls_before_its_certificate_ends() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let dir = h.dir.path().join("node-ending");
    let mut node = Node::start(&h, &dir, "127.0.0.1:0".parse()?).await?;
    node.stop().await;
    // restarted with a certificate whose end, less the drain margin (upstream timeout 10 s +
    // 10 s), is one second away
    let now = didgate_gateway::now_ms();
    let (ending, _) = certify(&h, &node.key, now - 60_000, 60_000 + 21_000)?;
    std::fs::write(dir.join("node.cert"), ending)?;
    node.serve("127.0.0.1:0".parse()?).await?;
    let client = client_at(&h, "ending", node.addr).await?;
    client
        .call(CallSpec::new("payments", "GET", "/v1/balance"))
        .await?;
    // the server drains by itself: poll its task with a deadline
    let task = node.task.take().expect("serving");
    tokio::time::timeout(std::time::Duration::from_secs(20), task).await??;
    let r = client
        .call(CallSpec::new("payments", "GET", "/v1/balance"))
        .await;
    assert!(r.is_err(), "a drained node took a call: {r:?}");
    Ok(())
}

#[tokio::test]
async fn the_operator_certifies_and_revokes_nodes_with_didgated_cluster() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let didgated = bin("didgated")?;
    let run = |args: &[&str]| -> anyhow::Result<std::process::Output> {
        Ok(std::process::Command::new(&didgated)
            .args(args)
            .arg("--data")
            .arg(h.gw_dir())
            .output()?)
    };
    let node = Identity::generate();
    let out_file = h.dir.path().join("n.cert");
    let out_text = out_file.to_string_lossy().to_string();
    let ok = run(&[
        "cluster",
        "certify-node",
        "--node",
        node.did().as_str(),
        "--valid-hours",
        "12",
        "--out",
        &out_text,
    ])?;
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");
    assert!(String::from_utf8_lossy(&ok.stdout).contains("serial 1 "));
    let cert = didgate_protocol::node::check(
        &std::fs::read(&out_file)?,
        &h.gw_did,
        node.did(),
        didgate_gateway::now_ms(),
        None,
    )?;
    assert_eq!(cert.not_after_ms - cert.not_before_ms, 12 * HOUR_MS);
    // bad input: a clear error and exit 2, nothing written
    for bad in [
        vec![
            "cluster",
            "certify-node",
            "--node",
            "did:key:nope",
            "--out",
            &out_text,
        ],
        vec![
            "cluster",
            "certify-node",
            "--node",
            node.did().as_str(),
            "--valid-hours",
            "721",
            "--out",
            &out_text,
        ],
    ] {
        let r = run(&bad)?;
        assert_eq!(r.status.code(), Some(2), "{bad:?}: {r:?}");
        assert!(!r.stderr.is_empty());
    }
    let revoked = run(&["cluster", "revoke-node", "1"])?;
    assert_eq!(revoked.status.code(), Some(0), "{revoked:?}");
    let list = std::fs::read(node::revocations_path(&DataDir::new(&h.gw_dir())))?;
    let list = didgate_protocol::node::NodeRevocations::open(&list, &h.gw_did)?;
    assert!(list.revoked_from(1).is_some());
    let show = run(&["cluster", "show"])?;
    assert_eq!(show.status.code(), Some(0), "{show:?}");
    assert!(String::from_utf8_lossy(&show.stdout).contains("a single node"));
    Ok(())
}

#[tokio::test]
async fn a_request_replayed_to_another_node_is_reported_as_one_call_executed_twice()
-> anyhow::Result<()> {
    // Claims are each node's own until callers have a home node (issue 24): the same signed
    // request sent to two nodes executes on both. The auditor, given both node chains, names it.
    let mut h = Harness::start().await?;
    let root = h.dir.path().to_path_buf();
    let mut a = Node::start(&h, &root.join("node-a"), "127.0.0.1:0".parse()?).await?;
    let mut b = Node::start(&h, &root.join("node-b"), "127.0.0.1:0".parse()?).await?;
    let to_a = client_at(&h, "to-a", a.addr).await?;
    let to_b = client_at(&h, "to-b", b.addr).await?;
    let (bytes, _) = to_a.sign(&CallSpec::new("payments", "GET", "/v1/balance"))?;
    for c in [&to_a, &to_b] {
        let raw = c.send_signed(&bytes, b"").await?;
        assert!(
            matches!(raw.last, didgate_client::low_level::RawFinal::Receipt(_)),
            "executed"
        );
    }
    drop((to_a, to_b));
    a.stop().await;
    b.stop().await;
    h.stop().await;
    let out = std::process::Command::new(bin("didgate-audit")?)
        .args(["verify", "--gateway"])
        .arg(a.dir.join("store"))
        .arg("--gateway")
        .arg(b.dir.join("store"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("duplicate_call"), "{text}");
    Ok(())
}

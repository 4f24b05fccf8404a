//! Every node's chain in one place (specs/operation.md, "Cluster", "Exporting every chain";
//! protocol.md "Chain export", amendment 2.10).
//!
//! Owns both ends of the chain exchange: a node answering a `ChainRequest` from a member of
//! its cluster with its sealed export file ([`answer`]), and `didgated export --cluster`
//! ([`export_cluster`]), which reads the members and the registry of node chains from etcd,
//! exports this node's own chain as `didgated export` does, and fetches every other member's
//! over QUIC, as this node's key. A node answers only a TLS peer whose key is a member's in
//! etcd now, one export at a time; the file it sends is checked by the auditor
//! (`didgate-audit verify`), not trusted by the exporter.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::BytesMut;
use didgate_cluster::{ClusterError, ControlPlane};
use didgate_io::{now_ms, tls, wire};
use didgate_protocol::chain::ChainRequest;
use didgate_protocol::frame::{self, FrameDecoder, FrameType};
use didgate_protocol::message::{Message, RefusalCode};
use didgate_protocol::{Did, Identity, Version};

use crate::call::Call;
use crate::config::Config;
use crate::datadir::DataDir;
use crate::gateway::Gateway;

/// The most a node's answer may take before the exporter gives up on it, and the most a node
/// spends writing and sending one export.
const FETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// The largest export file taken from one node (8 GiB): a node cannot fill the exporter's
/// disk.
pub const MAX_EXPORT_BYTES: u64 = 8 << 30;

/// The prefix of the files a node writes its export to before sending it (in its data
/// directory; removed after, and when the node next serves: [`remove_leftovers`]).
const TEMP_PREFIX: &str = "chain-export-";

/// Answers a ChainRequest frame on one stream: ChainPart frames carrying the node's sealed
/// export file, then FIN; or a signed refusal (audited like any refusal before a call):
/// `malformed` for a request that does not decode, `policy` for a peer that is not a member
/// of the cluster now (or a gateway without `[cluster]`), `control_plane_unavailable` when
/// etcd cannot say, `audit_unavailable` when the chain cannot be sealed or exported.
pub(crate) async fn answer(
    gw: &Gateway,
    cx: &mut Call,
    mut send: quinn::SendStream,
    payload: &[u8],
) {
    if ChainRequest::decode_v(payload, cx.version).is_err() {
        let why = "the chain request does not decode (a version 2 ChainRequest)";
        return gw
            .refuse_unverified(cx, &mut send, RefusalCode::Malformed, why)
            .await;
    }
    let Some(plane) = gw.cluster() else {
        let why =
            "this gateway is not a cluster member: its chain is exported with `didgated export`";
        return gw
            .refuse_unverified(cx, &mut send, RefusalCode::Policy, why)
            .await;
    };
    let members = match plane.members().await {
        Ok(m) => m,
        Err(e) => {
            let why = format!("the cluster's members cannot be read: {e}");
            return gw
                .refuse_unverified(cx, &mut send, RefusalCode::ControlPlaneUnavailable, &why)
                .await;
        }
    };
    let peer = cx.peer.key().as_str().to_string();
    if !members.iter().any(|m| m.key == peer) {
        let why = "only a member of this gateway's cluster may read its chain";
        return gw
            .refuse_unverified(cx, &mut send, RefusalCode::Policy, why)
            .await;
    }
    // one export at a time: each writes a whole file first; the peer must still be a member
    // when its turn comes
    let _one = gw.exporting.lock().await;
    match plane.members().await {
        Ok(m) if m.iter().any(|m| m.key == peer) => {}
        Ok(_) => {
            let why = "only a member of this gateway's cluster may read its chain";
            return gw
                .refuse_unverified(cx, &mut send, RefusalCode::Policy, why)
                .await;
        }
        Err(e) => {
            let why = format!("the cluster's members cannot be read: {e}");
            return gw
                .refuse_unverified(cx, &mut send, RefusalCode::ControlPlaneUnavailable, &why)
                .await;
        }
    }
    let path = gw.data_dir().join(format!("{TEMP_PREFIX}{}.tmp", now_ms()));
    let chain = gw.chain().clone();
    let p = path.clone();
    let sent = tokio::time::timeout(FETCH_TIMEOUT, async {
        let written = tokio::task::spawn_blocking(move || {
            chain.seal_then(move |store, _| didgate_audit::export::export_sealed(store, &p))
        })
        .await;
        match written {
            Ok(Ok(Ok(_))) => stream_file(&path, &mut send).await,
            Ok(Ok(Err(e))) => Err(e.to_string()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
    let outcome = sent.unwrap_or_else(|_| Err(format!("not sent within {FETCH_TIMEOUT:?}")));
    let _ = std::fs::remove_file(&path);
    match outcome {
        Ok(bytes) => {
            tracing::info!(peer = %peer, bytes, "sent this node's chain to a member");
            let _ = send.finish();
        }
        Err(e) => {
            let why = format!("the chain cannot be exported: {e}");
            gw.refuse_unverified(cx, &mut send, RefusalCode::AuditUnavailable, &why)
                .await;
        }
    }
}

/// Removes the export files a node left in its data directory `dir` when it stopped while
/// sending one (when it next serves).
pub fn remove_leftovers(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(TEMP_PREFIX) && name.ends_with(".tmp") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Sends the file at `path` as ChainPart frames; the bytes sent.
async fn stream_file(path: &Path, send: &mut quinn::SendStream) -> Result<u64, String> {
    use tokio::io::AsyncReadExt;
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| e.to_string())?;
    let mut chunk = vec![0u8; frame::MAX_FRAME];
    let mut out = BytesMut::with_capacity(frame::MAX_FRAME + frame::HEADER_LEN);
    let mut total = 0u64;
    loop {
        let n = file.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(total);
        }
        out.clear();
        frame::encode(FrameType::ChainPart, &chunk[..n], &mut out).map_err(|e| e.to_string())?;
        send.write_all(&out).await.map_err(|e| e.to_string())?;
        total += n as u64;
    }
}

/// Why `didgated export --cluster` could not run at all.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterExportError {
    /// gateway.toml.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The data directory has no `[cluster]`.
    #[error(
        "{0}: gateway.toml has no [cluster] (export this gateway's chain with `didgated export`)"
    )]
    NotClustered(String),
    /// The identity.
    #[error(transparent)]
    Identity(#[from] didgate_io::identity::IdentityError),
    /// etcd.
    #[error("cluster: {0}")]
    Cluster(#[from] ClusterError),
    /// `[node]`: the certificate.
    #[error("node: {0}")]
    Node(#[from] crate::node::NodeError),
    /// The output directory.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
}

/// What happened to one node's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeExport {
    /// Written to `path` (`bytes` long).
    Written {
        /// The file.
        path: PathBuf,
        /// Its size.
        bytes: u64,
    },
    /// Not exported: why (a node that is not a member now, one that refused or did not
    /// answer). The registry's last checkpoint of it, if any, covers `published` entries.
    Missing {
        /// Why.
        why: String,
        /// The size its last published checkpoint covers.
        published: Option<u64>,
    },
}

/// `didgated export --cluster --out DIR`: every node's chain, sealed, as `DIR/NODE.export`:
/// this node's through its daemon (or its store), every other member's fetched from it, and
/// each node of the registry that is not a member now reported missing. Returns each node's
/// outcome, by name.
pub async fn export_cluster(
    data: &Path,
    out: &Path,
) -> Result<Vec<(String, NodeExport)>, ClusterExportError> {
    let d = DataDir::new(data);
    let config = Config::load(&d.config())?;
    let settings = config
        .cluster()
        .ok_or_else(|| ClusterExportError::NotClustered(data.display().to_string()))?
        .clone();
    let identity = Arc::new(didgate_io::identity::load(&d.identity())?);
    std::fs::create_dir_all(out)
        .map_err(|e| ClusterExportError::Io(out.display().to_string(), e))?;
    let tls = settings.tls(data)?;
    let plane = ControlPlane::observe(settings.clone(), tls).await?;
    let members = plane.members().await?;
    let registry = plane.checkpoints().await?;
    // a certified node pins its gateway's DID (every member presents a node certificate);
    // an uncertified member is pinned by its own key
    let served = match config.node() {
        Some(s) => Some(crate::node::Node::served_gateway(data, s)?),
        None => None,
    };
    let mut names: Vec<String> = members.iter().map(|m| m.node.clone()).collect();
    names.extend(registry.iter().map(|(n, _)| n.clone()));
    names.push(settings.node.clone());
    names.sort();
    names.dedup();
    let mut outcomes = Vec::new();
    for name in names {
        // names come from etcd: one that could leave OUTDIR is not used as a file name
        if !didgate_cluster::valid_name(&name) {
            let why = "not a valid node name (1 to 64 of [A-Za-z0-9._-], not . or ..): not written"
                .into();
            outcomes.push((
                name,
                NodeExport::Missing {
                    why,
                    published: None,
                },
            ));
            continue;
        }
        let path = out.join(format!("{name}.export"));
        let published = registry
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, cp)| checkpoint_size(cp));
        let missing = |why: String| NodeExport::Missing { why, published };
        // a file of an earlier run is never left beside a "NOT exported" line
        let _ = std::fs::remove_file(&path);
        let outcome = if name == settings.node {
            match crate::control::export(data, &path).await {
                Ok(_) => written(&path),
                Err(e) => missing(e.to_string()),
            }
        } else if let Some(m) = members.iter().find(|m| m.node == name) {
            let pin = match (&served, Did::parse(&m.key)) {
                (Some(g), _) => Ok(g.clone()),
                (None, Ok(k)) => Ok(k),
                (None, Err(e)) => Err(format!("its member key does not parse: {e}")),
            };
            let addr = m.address.parse::<SocketAddr>().map_err(|e| e.to_string());
            match (pin, addr) {
                (Ok(pin), Ok(addr)) => match fetch(&identity, &pin, addr, &path).await {
                    Ok(_) => written(&path),
                    Err(why) => missing(why),
                },
                (Err(why), _) | (_, Err(why)) => missing(why),
            }
        } else {
            missing("not a member of the cluster now (export it on that node)".into())
        };
        outcomes.push((name, outcome));
    }
    Ok(outcomes)
}

fn written(path: &Path) -> NodeExport {
    match std::fs::metadata(path) {
        Ok(m) => NodeExport::Written {
            path: path.to_path_buf(),
            bytes: m.len(),
        },
        Err(e) => NodeExport::Missing {
            why: e.to_string(),
            published: None,
        },
    }
}

/// The size a signed checkpoint covers, if it opens.
fn checkpoint_size(bytes: &[u8]) -> Option<u64> {
    didgate_protocol::message::open::<didgate_protocol::message::Checkpoint>(bytes)
        .ok()
        .map(|cp| cp.message().size)
}

/// Asks the node at `addr` (pinned to `pin`) for its chain as `identity`, and writes it to
/// `path` (through `path.partial`, renamed when the answer ended cleanly).
pub async fn fetch(
    identity: &Identity,
    pin: &Did,
    addr: SocketAddr,
    path: &Path,
) -> Result<u64, String> {
    let trust = Arc::new(didgate_io::node::GatewayTrust::new(pin.clone()));
    let cfg =
        tls::client_config_trusting(identity, trust, Version::V2).map_err(|e| e.to_string())?;
    let bind: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| e.to_string())?;
    endpoint.set_default_client_config(cfg);
    let got = tokio::time::timeout(FETCH_TIMEOUT, async {
        let conn = endpoint
            .connect(addr, tls::SERVER_NAME)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        wire::write_frame(
            &mut send,
            FrameType::ChainRequest,
            &ChainRequest::new().encode(),
        )
        .await
        .map_err(|e| e.to_string())?;
        let _ = send.finish();
        receive(&mut recv, path).await
    })
    .await;
    endpoint.close(0u32.into(), b"done");
    match got {
        Ok(r) => r,
        Err(_) => {
            let _ = std::fs::remove_file(path.with_extension("partial"));
            Err(format!("no whole answer within {FETCH_TIMEOUT:?}"))
        }
    }
}

/// Reads ChainPart frames into `path`; a Refusal frame ends it with its code and reason.
async fn receive(recv: &mut quinn::RecvStream, path: &Path) -> Result<u64, String> {
    use tokio::io::AsyncWriteExt;
    let partial = path.with_extension("partial");
    let mut file = tokio::fs::File::create(&partial)
        .await
        .map_err(|e| format!("{}: {e}", partial.display()))?;
    let mut dec = FrameDecoder::new();
    let mut total = 0u64;
    loop {
        match wire::next_frame(recv, &mut dec).await {
            Ok(Some(f)) if f.kind == FrameType::ChainPart => {
                if total + f.payload.len() as u64 > MAX_EXPORT_BYTES {
                    drop(file);
                    let _ = tokio::fs::remove_file(&partial).await;
                    return Err(format!(
                        "the answer is larger than {MAX_EXPORT_BYTES} bytes: not taken"
                    ));
                }
                file.write_all(&f.payload)
                    .await
                    .map_err(|e| format!("{}: {e}", partial.display()))?;
                total += f.payload.len() as u64;
            }
            Ok(Some(f)) if f.kind == FrameType::Refusal => {
                let _ = tokio::fs::remove_file(&partial).await;
                return Err(
                    match didgate_protocol::message::open::<didgate_protocol::message::Refusal>(
                        &f.payload,
                    ) {
                        Ok(r) => format!(
                            "refused: {} ({})",
                            r.message().code.as_str(),
                            r.message().reason
                        ),
                        Err(e) => format!("refused with a refusal that does not open: {e}"),
                    },
                );
            }
            Ok(Some(f)) => {
                let _ = tokio::fs::remove_file(&partial).await;
                return Err(format!("unexpected frame {:?}", f.kind));
            }
            Ok(None) => break,
            Err(e) => {
                let _ = tokio::fs::remove_file(&partial).await;
                return Err(format!("the answer broke off: {e}"));
            }
        }
    }
    file.sync_all()
        .await
        .map_err(|e| format!("{}: {e}", partial.display()))?;
    drop(file);
    tokio::fs::rename(&partial, path)
        .await
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(total)
}

//! One node of a gateway DID (specs/protocol.md, "Nodes"; specs/operation.md, "Nodes").
//!
//! Owns what a gateway needs to serve as a node: loading and checking its node certificate
//! and the revocation list it staples (`[node]` in gateway.toml), and the two operator
//! commands run where the gateway key is, [`certify`] (`didgated cluster certify-node`) and
//! [`revoke`] (`didgated cluster revoke-node`). A gateway without `[node]` is a single node
//! that signs with the gateway key itself, exactly as before node certificates existed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use didgate_io::node::NodeCredentials;
use didgate_protocol::message::SignedMessage;
use didgate_protocol::node::{
    self as cert, MAX_REVOKED, MAX_VALIDITY_MS, NodeCertError, NodeCertificate, NodeRevocations,
    Revoked,
};
use didgate_protocol::{Did, Identity};

use crate::datadir::DataDir;

/// Why a node cannot serve, or a node certificate cannot be issued or revoked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// A file cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The certificate names a gateway that is not a did:key.
    #[error("the node certificate names gateway {gateway:?}, not a did:key")]
    GatewayDid {
        /// What it names.
        gateway: String,
    },
    /// The certificate or list does not hold (signature, key, window, revocation).
    #[error("{path}: {source}")]
    Certificate {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: NodeCertError,
    },
    /// The certificate binds the node to another address than the one it listens on.
    #[error("the node certificate allows address {allowed}, the node listens on {listen}")]
    Address {
        /// The certificate's `addr`.
        allowed: String,
        /// `[gateway] listen`.
        listen: SocketAddr,
    },
    /// `certify-node` was asked for a window longer than 30 days or of zero length.
    #[error("a node certificate is valid for at most 30 days (and more than 0 ms)")]
    Window,
    /// The revocation list this node holds names its own certificate.
    #[error("this node's certificate is revoked by its gateway's revocation list")]
    Revoked,
    /// `revoke-node` would list more serials than a list may hold.
    #[error("a revocation list holds at most {MAX_REVOKED} serials")]
    TooMany,
}

/// `[node]` in gateway.toml: this gateway is one node of the gateway DID its certificate
/// names.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSettings {
    /// The node certificate file (COSE_Sign1 bytes from `didgated cluster certify-node`),
    /// relative to the data directory.
    pub certificate: String,
    /// The gateway's newest revocation list (from `didgated cluster revoke-node`), relative to
    /// the data directory; stapled in the node's TLS certificate so that clients learn it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocations: Option<String>,
}

/// A node's certified identity: the gateway DID it serves, its certificate (as signed and as
/// opened) and the list it staples.
#[derive(Debug, Clone)]
pub struct Node {
    gateway: Did,
    certificate: NodeCertificate,
    credentials: NodeCredentials,
}

impl Node {
    /// The gateway DID the certificate of `settings` names (unchecked: for a tool that pins
    /// it, such as `didgated export --cluster`).
    pub fn served_gateway(dir: &Path, settings: &NodeSettings) -> Result<Did, NodeError> {
        let cert_path = dir.join(&settings.certificate);
        let bytes = read(&cert_path)?;
        let named = cert_gateway(&bytes).map_err(|source| NodeError::Certificate {
            path: cert_path,
            source,
        })?;
        Did::parse(&named).map_err(|_| NodeError::GatewayDid { gateway: named })
    }

    /// Loads and checks `[node]` for `identity` listening on `listen` at `now_ms`: the
    /// certificate is signed by the gateway it names, for this key, valid now, bound to this
    /// address if it names one, and not revoked by the list (which the same gateway signed).
    pub fn load(
        dir: &Path,
        settings: &NodeSettings,
        identity: &Identity,
        listen: SocketAddr,
        now_ms: u64,
    ) -> Result<Self, NodeError> {
        let cert_path = dir.join(&settings.certificate);
        let bytes = read(&cert_path)?;
        let named = cert_gateway(&bytes).map_err(|source| NodeError::Certificate {
            path: cert_path.clone(),
            source,
        })?;
        let gateway = Did::parse(&named).map_err(|_| NodeError::GatewayDid { gateway: named })?;
        let revocations = match &settings.revocations {
            None => None,
            Some(p) => {
                let path = dir.join(p);
                let list = read(&path)?;
                let opened = NodeRevocations::open(&list, &gateway)
                    .map_err(|source| NodeError::Certificate { path, source })?;
                Some((opened, list))
            }
        };
        let certificate = cert::check(
            &bytes,
            &gateway,
            identity.did(),
            now_ms,
            revocations.as_ref().map(|r| &r.0),
        )
        .map_err(|source| NodeError::Certificate {
            path: cert_path,
            source,
        })?;
        // revoked at any time, even from a later time: refuse now
        if revocations
            .as_ref()
            .is_some_and(|r| r.0.revoked_from(certificate.serial).is_some())
        {
            return Err(NodeError::Revoked);
        }
        if let Some(allowed) = &certificate.addr
            && allowed.parse::<SocketAddr>().ok() != Some(listen)
        {
            return Err(NodeError::Address {
                allowed: allowed.clone(),
                listen,
            });
        }
        Ok(Self {
            gateway,
            certificate,
            credentials: NodeCredentials {
                certificate: bytes,
                revocations: revocations.map(|r| r.1),
            },
        })
    }

    /// The gateway DID this node serves (what clients pin and requests name in `aud`).
    pub fn gateway(&self) -> &Did {
        &self.gateway
    }

    /// The certificate, opened.
    pub fn certificate(&self) -> &NodeCertificate {
        &self.certificate
    }

    /// The certificate's bytes and the stapled list (for the TLS leaf).
    pub fn credentials(&self) -> &NodeCredentials {
        &self.credentials
    }
}

/// What a node did with a revocation list the cluster published
/// ([`crate::gateway::Gateway::apply_node_revocations`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stapled {
    /// Not newer than the one held, not signed by the node's gateway, or not a list: ignored.
    Older,
    /// Newer: held and stapled from the next handshake on.
    Newer,
    /// Newer, and it revokes this node's own certificate: the node must stop taking calls.
    RevokesThisNode,
}

/// The `gateway` a certificate names, read before its signature is checked against it.
fn cert_gateway(bytes: &[u8]) -> Result<String, NodeCertError> {
    Ok(didgate_protocol::message::open::<NodeCertificate>(bytes)?
        .into_message()
        .gateway)
}

fn read(path: &Path) -> Result<Vec<u8>, NodeError> {
    std::fs::read(path).map_err(|source| NodeError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), NodeError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| NodeError::Io {
            path: path.to_path_buf(),
            source,
        })
}

/// The directory of a gateway's issued node certificates, one file per serial.
pub fn issued_dir(d: &DataDir) -> PathBuf {
    d.root().join("node-certs")
}

/// A gateway's newest revocation list.
pub fn revocations_path(d: &DataDir) -> PathBuf {
    d.root().join("node-revocations.cose")
}

/// What `certify-node` is asked for.
#[derive(Debug, Clone)]
pub struct Certify {
    /// The node's did:key.
    pub node: Did,
    /// Valid from (ms since the epoch).
    pub not_before_ms: u64,
    /// Valid for (ms), at most [`MAX_VALIDITY_MS`].
    pub valid_for_ms: u64,
    /// The serial; `None` takes the next one after every serial issued from this data
    /// directory.
    pub serial: Option<u64>,
    /// The address the node may serve on.
    pub addr: Option<SocketAddr>,
}

/// Signs a node certificate with the gateway key `identity`, records a copy in the data
/// directory (`node-certs/SERIAL.cose`), and returns its bytes and contents.
pub fn certify(
    d: &DataDir,
    identity: &Identity,
    req: &Certify,
) -> Result<(Vec<u8>, NodeCertificate), NodeError> {
    if req.valid_for_ms == 0 || req.valid_for_ms > MAX_VALIDITY_MS {
        return Err(NodeError::Window);
    }
    let dir = issued_dir(d);
    std::fs::create_dir_all(&dir).map_err(|source| NodeError::Io {
        path: dir.clone(),
        source,
    })?;
    let serial = match req.serial {
        Some(s) => s,
        None => next_serial(&dir)?,
    };
    let cert = NodeCertificate {
        v: didgate_protocol::Version::V2.as_u64(),
        gateway: identity.did().to_string(),
        node: req.node.to_string(),
        serial,
        not_before_ms: req.not_before_ms,
        not_after_ms: req.not_before_ms.saturating_add(req.valid_for_ms),
        addr: req.addr.map(|a| a.to_string()),
    };
    let bytes = cert.sign(identity);
    write(&dir.join(format!("{serial}.cose")), &bytes)?;
    Ok((bytes, cert))
}

fn next_serial(dir: &Path) -> Result<u64, NodeError> {
    let entries = std::fs::read_dir(dir).map_err(|source| NodeError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let max = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".cose")?
                .parse::<u64>()
                .ok()
        })
        .max();
    Ok(max.map_or(1, |m| m.saturating_add(1)))
}

/// Adds `serial` (revoked from `from_ms`) to the gateway's revocation list, signs the next
/// list with `identity` and writes it to [`revocations_path`]. Returns it. Revoking a serial
/// already listed keeps its earlier time.
pub fn revoke(
    d: &DataDir,
    identity: &Identity,
    serial: u64,
    from_ms: u64,
    now_ms: u64,
) -> Result<(Vec<u8>, NodeRevocations), NodeError> {
    let path = revocations_path(d);
    let mut list = match std::fs::read(&path) {
        Ok(bytes) => NodeRevocations::open(&bytes, identity.did()).map_err(|source| {
            NodeError::Certificate {
                path: path.clone(),
                source,
            }
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => NodeRevocations {
            v: didgate_protocol::Version::V2.as_u64(),
            gateway: identity.did().to_string(),
            seq: 0,
            time_ms: 0,
            revoked: Vec::new(),
        },
        Err(source) => return Err(NodeError::Io { path, source }),
    };
    if let Err(at) = list.revoked.binary_search_by_key(&serial, |r| r.serial) {
        if list.revoked.len() >= MAX_REVOKED {
            return Err(NodeError::TooMany);
        }
        list.revoked.insert(
            at,
            Revoked {
                serial,
                time_ms: from_ms,
            },
        );
    }
    list.seq += 1;
    list.time_ms = now_ms;
    let bytes = list.sign(identity);
    write(&path, &bytes)?;
    Ok((bytes, list))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certify_then_load_then_revoke() {
        let tmp = tempfile::tempdir().expect("tmp");
        let d = DataDir::new(tmp.path());
        let gateway = Identity::from_seed(&[1; 32]);
        let node = Identity::from_seed(&[2; 32]);
        let listen: SocketAddr = "127.0.0.1:7000".parse().expect("addr");
        let req = Certify {
            node: node.did().clone(),
            not_before_ms: 1_000,
            valid_for_ms: 3_600_000,
            serial: None,
            addr: Some(listen),
        };
        let (bytes, first) = certify(&d, &gateway, &req).expect("certify");
        assert_eq!(first.serial, 1);
        assert_eq!(certify(&d, &gateway, &req).expect("again").1.serial, 2);
        std::fs::write(tmp.path().join("node.cert"), &bytes).expect("write");
        let settings = NodeSettings {
            certificate: "node.cert".into(),
            revocations: None,
        };
        let loaded = Node::load(tmp.path(), &settings, &node, listen, 2_000).expect("load");
        assert_eq!(loaded.gateway(), gateway.did());
        // another address, another key, too late
        let other: SocketAddr = "127.0.0.1:7001".parse().expect("addr");
        assert!(matches!(
            Node::load(tmp.path(), &settings, &node, other, 2_000),
            Err(NodeError::Address { .. })
        ));
        assert!(Node::load(tmp.path(), &settings, &gateway, listen, 2_000).is_err());
        assert!(Node::load(tmp.path(), &settings, &node, listen, 3_601_000).is_err());
        // revoked: the node refuses to serve with the list that names it
        revoke(&d, &gateway, 1, 1_500, 1_500).expect("revoke");
        let (_, list) = revoke(&d, &gateway, 1, 1_900, 1_900).expect("again");
        assert_eq!((list.seq, list.revoked.len()), (2, 1));
        assert_eq!(list.revoked_from(1), Some(1_500));
        let settings = NodeSettings {
            certificate: "node.cert".into(),
            revocations: Some("node-revocations.cose".into()),
        };
        assert!(matches!(
            Node::load(tmp.path(), &settings, &node, listen, 2_000),
            Err(NodeError::Certificate {
                source: NodeCertError::Revoked { serial: 1, .. },
                ..
            })
        ));
        // a revocation dated after now (a gateway clock ahead) refuses the start all the same
        revoke(&d, &gateway, 1, 5_000, 5_000).expect("revoke");
        assert!(matches!(
            Node::load(tmp.path(), &settings, &node, listen, 1_200),
            Err(NodeError::Revoked)
        ));
        assert!(matches!(
            certify(
                &d,
                &gateway,
                &Certify {
                    valid_for_ms: MAX_VALIDITY_MS + 1,
                    ..req
                }
            ),
            Err(NodeError::Window)
        ));
    }
}

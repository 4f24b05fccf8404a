//! didgate's control plane over etcd (specs/operation.md, "Cluster").
//!
//! Owns what the nodes of one gateway share through etcd, and nothing of a call's own path:
//! the key layout ([`keys`]), a node's membership under a lease and the fail-closed health it
//! gives ([`health`], pure over `now`), and the connection to etcd that keeps the lease alive,
//! publishes revocations and watches everyone's ([`plane`]). Claims stay in each node's own
//! store: etcd is never on the per-call path.

pub mod health;
pub mod home;
pub mod keys;
pub mod plane;
pub mod shares;

pub use health::Health;
pub use home::{Homes, Route};
pub use plane::{ClusterError, ControlPlane, Member, monotonic_ms};

/// A policy as a cluster shares it (JSON in etcd under its hash): the Cedar text (or the
/// translation of `[[rule]]`) and the entities document; each node compiles it with its own
/// `[groups]`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDocument {
    /// Where the text came from on the node that published it (for errors).
    pub source: String,
    /// The Cedar policy text.
    pub text: String,
    /// The Cedar entities JSON, if any.
    pub entities: Option<String>,
}

/// A document the cluster shares as a whole, stored by its hash under `KIND/sets/HASH` with
/// `KIND/current` naming the one in force (specs/operation.md, "Cluster", "Keys in etcd"):
/// the policy ([`PolicyDocument`]) and the upstreams ([`UpstreamsDocument`]).
pub trait Document:
    serde::Serialize + serde::de::DeserializeOwned + Send + Sync + std::fmt::Debug + 'static
{
    /// The key segment under the cluster's root: `policy` or `upstreams`.
    const KIND: &'static str;
    /// Its identity in etcd.
    fn hash(&self) -> [u8; 32];
}

impl Document for PolicyDocument {
    const KIND: &'static str = "policy";

    fn hash(&self) -> [u8; 32] {
        PolicyDocument::hash(self)
    }
}

/// The `[[upstream]]` tables a cluster shares (JSON in etcd under its hash): every node serves
/// these upstreams, with its own `[gateway]` settings, groups and policy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamsDocument {
    /// Where they came from on the node that published them (for errors).
    pub source: String,
    /// The `[[upstream]]` tables as TOML text (names, URLs, auth, secret names, limits,
    /// operations; never a secret's value).
    pub text: String,
}

impl Document for UpstreamsDocument {
    const KIND: &'static str = "upstreams";

    /// BLAKE3-derive("didgate 2026 cluster upstreams v1") over the text's length (u64be) and
    /// bytes.
    fn hash(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key("didgate 2026 cluster upstreams v1");
        h.update(&(self.text.len() as u64).to_be_bytes());
        h.update(self.text.as_bytes());
        *h.finalize().as_bytes()
    }
}

impl PolicyDocument {
    /// Its identity in etcd: BLAKE3-derive("didgate 2026 cluster policy v1") over the text's
    /// length (u64be) and bytes, then the entities' (absent: no bytes after a zero length and
    /// a 0 flag; present: a 1 flag, length and bytes).
    pub fn hash(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key("didgate 2026 cluster policy v1");
        h.update(&(self.text.len() as u64).to_be_bytes());
        h.update(self.text.as_bytes());
        match &self.entities {
            None => {
                h.update(&[0]);
            }
            Some(e) => {
                h.update(&[1]);
                h.update(&(e.len() as u64).to_be_bytes());
                h.update(e.as_bytes());
            }
        }
        *h.finalize().as_bytes()
    }
}

/// `[cluster]` in gateway.toml: this node is a member of a cluster whose control plane is etcd.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettings {
    /// etcd client URLs (`http://host:port`), tried in order; a node moves to the next when one
    /// does not answer.
    pub endpoints: Vec<String>,
    /// The cluster's name: every key lives under `/didgate/NAME/`.
    pub name: String,
    /// This node's name, unique in the cluster.
    pub node: String,
    /// The lease's time to live, seconds (3 to 3600; default 10). A node that has not had a
    /// keep-alive answered for a third of it refuses calls (`control_plane_unavailable`).
    #[serde(default = "d_lease_ttl")]
    pub lease_ttl_secs: u64,
    /// PEM file of the CA that signed etcd's server certificates (relative to the data
    /// directory): required with `https://` endpoints (TLS 1.3/1.2 on the one ring provider).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// PEM file of this node's client certificate for etcd (`--client-cert-auth`), with
    /// `key_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<String>,
    /// PEM file of that certificate's private key (a credential: read at join, never logged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
    /// Hosts the cluster's `[[upstream]]` tables may send any secret to, beyond those this
    /// node's own `gateway.toml` pairs with that secret (specs/operation.md, "Cluster",
    /// "Upstreams"): whoever writes etcd cannot send a secret elsewhere.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstream_hosts: Vec<String>,
    /// Whether the cluster's tables may mark an upstream `local` (loopback, private addresses)
    /// when this node's own file has no `local` upstream using the same secret.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_local_upstreams: bool,
}

/// What a node presents to etcd over TLS, read from the files `[cluster]` names.
pub struct EtcdTls {
    /// The CA certificates, PEM.
    pub ca_pem: Vec<u8>,
    /// The client certificate and key, PEM.
    pub identity: Option<(Vec<u8>, zeroize::Zeroizing<Vec<u8>>)>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTls")
            .field("client_certificate", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

fn d_lease_ttl() -> u64 {
    10
}

/// Whether `s` may name a cluster or a node: 1 to 64 characters of `[A-Za-z0-9._-]`, not `.`
/// or `..` (a node's name also names its files, e.g. `didgated export --cluster`'s).
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Why `[cluster]` is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    /// No endpoint.
    #[error("cluster.endpoints is empty")]
    NoEndpoint,
    /// A name that is empty, `.` or `..`, or holds a character other than `[A-Za-z0-9._-]`.
    #[error("cluster.{field} must be 1 to 64 characters of [A-Za-z0-9._-], not . or ..")]
    Name {
        /// `name` or `node`.
        field: &'static str,
    },
    /// A lease under 3 seconds or over an hour.
    #[error("cluster.lease_ttl_secs must be 3 to 3600")]
    LeaseTtl,
    /// An endpoint that is neither `http://` nor `https://`, `https://` without `ca_file`, or a
    /// mix of both schemes.
    #[error("cluster.endpoints: all http:// or all https:// (https:// needs cluster.ca_file)")]
    Scheme,
    /// One of `cert_file` and `key_file` without the other.
    #[error("cluster.cert_file and cluster.key_file go together")]
    ClientCertificate,
}

impl ClusterSettings {
    /// Reads the TLS files the settings name, relative to the data directory `dir`: `None`
    /// without `ca_file` (plain `http://` endpoints).
    pub fn tls(&self, dir: &std::path::Path) -> Result<Option<EtcdTls>, ClusterError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|source| ClusterError::File { path, source })
        };
        let Some(ca) = &self.ca_file else {
            return Ok(None);
        };
        Ok(Some(EtcdTls {
            ca_pem: read(ca)?,
            identity: match (&self.cert_file, &self.key_file) {
                (Some(c), Some(k)) => Some((read(c)?, zeroize::Zeroizing::new(read(k)?))),
                _ => None,
            },
        }))
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), SettingsError> {
        if self.endpoints.is_empty() {
            return Err(SettingsError::NoEndpoint);
        }
        if !valid_name(&self.name) {
            return Err(SettingsError::Name { field: "name" });
        }
        if !valid_name(&self.node) {
            return Err(SettingsError::Name { field: "node" });
        }
        if !(3..=3600).contains(&self.lease_ttl_secs) {
            return Err(SettingsError::LeaseTtl);
        }
        let https = self
            .endpoints
            .iter()
            .filter(|e| e.starts_with("https://"))
            .count();
        let http = self
            .endpoints
            .iter()
            .filter(|e| e.starts_with("http://"))
            .count();
        if http + https != self.endpoints.len()
            || (http > 0 && https > 0)
            || (https > 0 && self.ca_file.is_none())
        {
            return Err(SettingsError::Scheme);
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(SettingsError::ClientCertificate);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked() {
        let good = ClusterSettings {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            name: "prod".into(),
            node: "node-1".into(),
            lease_ttl_secs: 10,
            ca_file: None,
            cert_file: None,
            key_file: None,
            upstream_hosts: Vec::new(),
            allow_local_upstreams: false,
        };
        assert_eq!(good.validate(), Ok(()));
        let mut bad = good.clone();
        bad.node = "a/b".into();
        assert_eq!(bad.validate(), Err(SettingsError::Name { field: "node" }));
        bad.node = "..".into();
        assert_eq!(bad.validate(), Err(SettingsError::Name { field: "node" }));
        let mut bad = good.clone();
        bad.endpoints.clear();
        assert_eq!(bad.validate(), Err(SettingsError::NoEndpoint));
        let mut bad = good.clone();
        bad.lease_ttl_secs = 2;
        assert_eq!(bad.validate(), Err(SettingsError::LeaseTtl));
        let mut bad = good.clone();
        bad.endpoints = vec!["https://127.0.0.1:2379".into()];
        assert_eq!(bad.validate(), Err(SettingsError::Scheme));
        bad.ca_file = Some("ca.pem".into());
        assert_eq!(bad.validate(), Ok(()));
        bad.cert_file = Some("c.pem".into());
        assert_eq!(bad.validate(), Err(SettingsError::ClientCertificate));
    }
}

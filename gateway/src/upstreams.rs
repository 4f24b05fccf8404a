//! The upstreams in force (specs/operation.md, "`[[upstream]]`" and "Cluster", "Upstreams").
//!
//! Owns [`UpstreamSet`]: the validated `[[upstream]]` tables and one HTTP client per upstream
//! ([`crate::egress::Egress`]), swapped as a whole. A call takes the set in force when its
//! stream opens and keeps it, as it keeps its policy set, so a reload never changes an
//! upstream under a call. A set comes from the node's own `gateway.toml` (at start and on
//! `didgated upstreams reload`) or from the cluster ([`UpstreamSet::from_document`]): the
//! tables are checked with the rest of the node's configuration exactly as at start (a
//! `[[rule]]` naming an upstream the set lacks refuses it).

use std::sync::Arc;

use didgate_cluster::{Document, UpstreamsDocument};
use serde::{Deserialize, Serialize};

use crate::config::{Config, ConfigError, RawConfig, RawUpstream, Upstream};
use crate::egress::{ClientError, Egress};

/// Why a set of upstreams cannot be put in force.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamSetError {
    /// The tables do not parse as `[[upstream]]` TOML.
    #[error("{source_name}: {error}")]
    Parse {
        /// Where they came from.
        source_name: String,
        /// Why.
        #[source]
        error: toml::de::Error,
    },
    /// They do not validate with this node's configuration.
    #[error("{0}: {1}")]
    Invalid(String, #[source] Box<ConfigError>),
    /// The tables cannot be written as TOML.
    #[error("cannot write the [[upstream]] tables: {0}")]
    Encode(#[source] toml::ser::Error),
    /// A cluster's table would send a secret to a host this node's own `gateway.toml` does
    /// not pair with that secret (nor list in `[cluster] upstream_hosts`).
    #[error(
        "{source_name}: upstream {upstream} would send secret {secret} to {host}, which this node's gateway.toml does not pair with that secret nor list in [cluster] upstream_hosts"
    )]
    Destination {
        /// Where the tables came from.
        source_name: String,
        /// The upstream.
        upstream: String,
        /// Its secret's name.
        secret: String,
        /// The host refused.
        host: String,
    },
    /// A cluster's table marks an upstream `local` that this node does not allow.
    #[error(
        "{source_name}: upstream {upstream} is local (loopback and private addresses), which this node's gateway.toml does not allow for secret {secret} ([cluster] allow_local_upstreams)"
    )]
    Local {
        /// Where the tables came from.
        source_name: String,
        /// The upstream.
        upstream: String,
        /// Its secret's name.
        secret: String,
    },
    /// An upstream's HTTP client cannot be built.
    #[error("transport: {0}")]
    Client(#[from] ClientError),
}

/// `[[upstream]]` tables alone, as a document holds them.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Tables {
    #[serde(default, rename = "upstream")]
    upstreams: Vec<RawUpstream>,
}

/// The upstreams in force and their HTTP clients.
#[derive(Debug)]
pub struct UpstreamSet {
    list: Vec<Arc<Upstream>>,
    egress: Egress,
    document: UpstreamsDocument,
}

impl UpstreamSet {
    /// The upstreams of `config` (the node's own `gateway.toml`).
    pub fn of_config(config: &Config) -> Result<Self, UpstreamSetError> {
        let raw: Vec<RawUpstream> = config.upstreams().iter().map(|u| u.raw().clone()).collect();
        Ok(Self {
            list: config.upstreams().iter().cloned().map(Arc::new).collect(),
            egress: Egress::new(config)?,
            document: Self::document_of(raw)?,
        })
    }

    /// The document of `[[upstream]]` tables as `gateway.toml` holds them.
    pub fn document_of(raw: Vec<RawUpstream>) -> Result<UpstreamsDocument, UpstreamSetError> {
        let text = toml::to_string(&Tables { upstreams: raw }).map_err(UpstreamSetError::Encode)?;
        Ok(UpstreamsDocument {
            source: "gateway.toml [[upstream]]".into(),
            text,
        })
    }

    /// The upstreams of a document, checked with the rest of `config` (this node's
    /// `[gateway]`, groups and rules) as `gateway.toml` is at start. With `pinned` (this
    /// node's own `gateway.toml`, for tables that came from the cluster), every upstream may
    /// send its secret only to hosts the node's own tables pair with that secret or that
    /// `[cluster] upstream_hosts` lists, and be `local` only where the node's own tables are
    /// (or `[cluster] allow_local_upstreams`): whoever can write etcd cannot send a secret
    /// elsewhere.
    pub fn from_document(
        config: &Config,
        doc: &UpstreamsDocument,
        pinned: Option<&RawConfig>,
    ) -> Result<Self, UpstreamSetError> {
        let tables: Tables =
            toml::from_str(&doc.text).map_err(|error| UpstreamSetError::Parse {
                source_name: doc.source.clone(),
                error,
            })?;
        let mut raw = config.to_raw();
        raw.upstreams = tables.upstreams;
        let checked = raw
            .validate()
            .map_err(|e| UpstreamSetError::Invalid(doc.source.clone(), Box::new(e)))?;
        if let Some(own) = pinned {
            check_destinations(own, &checked, &doc.source)?;
        }
        Ok(Self {
            list: checked.upstreams().iter().cloned().map(Arc::new).collect(),
            egress: Egress::new(&checked)?,
            document: doc.clone(),
        })
    }

    /// The upstream named `name` (the first, if two share it).
    pub fn get(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.list.iter().find(|u| u.name() == name)
    }

    /// Every upstream, in configuration order.
    pub fn iter(&self) -> impl Iterator<Item = &Upstream> {
        self.list.iter().map(AsRef::as_ref)
    }

    /// The HTTP client of `upstream` (a public-only client for a name not in the set).
    pub fn client(&self, upstream: &str) -> &reqwest::Client {
        self.egress.client(upstream)
    }

    /// The document this set was built from (what a cluster member publishes).
    pub fn document(&self) -> &UpstreamsDocument {
        &self.document
    }

    /// The document's hash ([`Document::hash`]).
    pub fn hash(&self) -> [u8; 32] {
        self.document.hash()
    }
}

/// The hosts an upstream of `gateway.toml` names: its base URL's and its `allowed_hosts`,
/// lower case.
fn hosts_of(base_url: &str, allowed: &[String]) -> Vec<String> {
    let mut hosts: Vec<String> = allowed.iter().map(|h| h.to_ascii_lowercase()).collect();
    if let Some(h) = url::Url::parse(base_url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_ascii_lowercase))
    {
        hosts.push(h);
    }
    hosts
}

/// Checks that every upstream of `new` sends its secret only where `own` (this node's own
/// file) allows it ([`UpstreamSet::from_document`]).
fn check_destinations(own: &RawConfig, new: &Config, source: &str) -> Result<(), UpstreamSetError> {
    let extra: Vec<String> = own
        .cluster
        .as_ref()
        .map(|c| {
            c.upstream_hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect()
        })
        .unwrap_or_default();
    let allow_local = own
        .cluster
        .as_ref()
        .is_some_and(|c| c.allow_local_upstreams);
    for up in new.upstreams() {
        let same_secret: Vec<&RawUpstream> = own
            .upstreams
            .iter()
            .filter(|o| o.secret == up.secret())
            .collect();
        let permitted: Vec<String> = same_secret
            .iter()
            .flat_map(|o| hosts_of(&o.base_url, &o.allowed_hosts))
            .chain(extra.iter().cloned())
            .collect();
        let named = hosts_of(up.base_url().as_str(), up.allowed_hosts());
        if let Some(host) = named.into_iter().find(|h| !permitted.contains(h)) {
            return Err(UpstreamSetError::Destination {
                source_name: source.to_string(),
                upstream: up.name().to_string(),
                secret: up.secret().to_string(),
                host,
            });
        }
        if up.local() && !allow_local && !same_secret.iter().any(|o| o.local) {
            return Err(UpstreamSetError::Local {
                source_name: source.to_string(),
                upstream: up.name().to_string(),
                secret: up.secret().to_string(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> RawConfig {
        toml::from_str(text).expect("toml")
    }

    const OWN: &str = r#"
[gateway]
listen = "127.0.0.1:4433"

[[upstream]]
name = "payments"
base_url = "https://api.stripe.com"
auth = { kind = "bearer" }
secret = "stripe"
allowed_hosts = ["api.stripe.com"]
"#;

    fn document(base_url: &str, extra: &str) -> UpstreamsDocument {
        UpstreamsDocument {
            source: "the cluster".into(),
            text: format!(
                "[[upstream]]\nname = \"payments\"\nbase_url = \"{base_url}\"\nauth = {{ kind = \"bearer\" }}\nsecret = \"stripe\"\nallowed_hosts = [\"{}\"]\n{extra}",
                url::Url::parse(base_url)
                    .expect("url")
                    .host_str()
                    .expect("host")
            ),
        }
    }

    #[test]
    fn a_cluster_set_cannot_send_a_secret_where_this_nodes_file_does_not() {
        didgate_io::tls::install_provider();
        let own = config(OWN);
        let running = own.clone().validate().expect("valid");
        // the same destination, other settings: taken
        let same = document("https://api.stripe.com/v2", "timeout_secs = 5\n");
        assert!(UpstreamSet::from_document(&running, &same, Some(&own)).is_ok());
        // another host for the same secret: refused, whatever etcd says
        let evil = document("https://collector.example", "");
        let refused = UpstreamSet::from_document(&running, &evil, Some(&own)).expect_err("refused");
        assert!(
            matches!(&refused, UpstreamSetError::Destination { host, .. } if host == "collector.example"),
            "{refused}"
        );
        // unless this node's [cluster] lists it
        let mut widened = config(OWN);
        let mut cluster: didgate_cluster::ClusterSettings = toml::from_str(
            "endpoints = [\"http://127.0.0.1:2379\"]\nname = \"c\"\nnode = \"n\"\nupstream_hosts = [\"collector.example\"]",
        )
        .expect("cluster");
        widened.cluster = Some(cluster.clone());
        assert!(UpstreamSet::from_document(&running, &evil, Some(&widened)).is_ok());
        // a local upstream (private addresses) needs this node's consent
        let local = document("https://api.stripe.com", "local = true\n");
        let refused = UpstreamSet::from_document(&running, &local, Some(&own)).expect_err("local");
        assert!(
            matches!(refused, UpstreamSetError::Local { .. }),
            "{refused}"
        );
        cluster.allow_local_upstreams = true;
        widened.cluster = Some(cluster);
        assert!(UpstreamSet::from_document(&running, &local, Some(&widened)).is_ok());
        // this node's own reload is not pinned
        assert!(UpstreamSet::from_document(&running, &evil, None).is_ok());
    }
}

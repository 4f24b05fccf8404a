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

use crate::config::{Config, ConfigError, RawUpstream, Upstream};
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

    /// The upstreams of a cluster's document, checked with the rest of `config` (this node's
    /// `[gateway]`, groups and rules) as `gateway.toml` is at start.
    pub fn from_document(
        config: &Config,
        doc: &UpstreamsDocument,
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

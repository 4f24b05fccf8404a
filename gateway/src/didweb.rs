//! Resolution of did:web callers (specs/protocol.md, "did:web callers").
//!
//! Owns fetching, checking and caching DID documents. A small did:web method resolver over
//! our own reqwest client, plugged into ssi's resolver trait ([`WebMethod`] implements
//! `ssi_dids_core::DIDMethodResolver`); ssi's own did:web fetcher is not used, because it
//! fetches over plain HTTP for localhost and private addresses and cannot be told to trust a
//! test CA. The rules:
//!
//! - only the did:webs the policy set names exactly are fetched (the caller checks
//!   [`crate::policy::PolicySet::knows`] first: a did:web no policy names exactly costs no fetch);
//! - HTTPS only, no redirect followed, no proxy, a timeout, a size cap
//!   ([`didgate_protocol::web::MAX_DOCUMENT`]);
//! - `localhost`, IP-literal hosts, and names resolving to loopback or private addresses are
//!   refused unless `[did_web] allow_local` (tests);
//! - the host is looked up once, the address checked, and the fetch pinned to that address
//!   (no second lookup to rebind);
//! - the document's `id` must equal the DID; its authentication keys come from the ssi
//!   document model;
//! - documents are cached for `cache_ttl_secs` (bounded). A key the cached document does not
//!   list (an agent's newly added key) triggers a fresh fetch, and so does a failure, but at
//!   most once per [`MIN_REFETCH`] per DID (or per `cache_ttl_secs` if shorter), so callers
//!   claiming a named domain cannot make the gateway hammer its document server;
//! - one fetch in flight per DID (single flight), and at most `fetches_per_host_per_min`
//!   fetches per host over all its DIDs (a token bucket): a fetch over it is not made, the
//!   outcome is [`ResolveError::HostRateLimited`] and is not cached.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use didgate_protocol::web::{DidDocument, DocumentError, MAX_DOCUMENT};
use didgate_protocol::{Did, WebDid};
use futures_util::StreamExt;

use crate::config::{DidWeb, RateLimit};
use crate::egress::refused_range;
use crate::limits::TokenBucket;

/// Why a did:web could not be resolved.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ResolveError {
    /// No policy, group or entity names a did:web of this host.
    #[error("no policy names the domain {0}")]
    DomainNotNamed(String),
    /// `localhost`, an IP literal, or a loopback or private address, outside test mode.
    #[error("did:web host {0} is local or private")]
    Local(String),
    /// The host did not resolve, or the fetch failed (connection, TLS, timeout).
    #[error("fetching the DID document failed: {0}")]
    Fetch(#[source] Arc<reqwest::Error>),
    /// A `test_roots` file cannot be read.
    #[error("fetching the DID document failed: test root {name}: {source}")]
    TestRootRead {
        /// The file, as configured.
        name: String,
        /// Why.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// A `test_roots` file is not a PEM certificate bundle.
    #[error("fetching the DID document failed: test root {name}: {source}")]
    TestRootPem {
        /// The file, as configured.
        name: String,
        /// Why.
        #[source]
        source: Arc<reqwest::Error>,
    },
    /// The server answered with something other than 200 (a redirect is not followed).
    #[error("the DID document server answered HTTP {0}")]
    Status(u16),
    /// The document is unusable.
    #[error(transparent)]
    Document(#[from] DocumentError),
    /// The host's fetch rate (`fetches_per_host_per_min`) is spent: no fetch was made.
    #[error("the document fetches of host {0} are over their rate")]
    HostRateLimited(String),
}

/// The outcome of the last fetch of a DID's document, and when it was made.
struct Cached {
    outcome: Result<Arc<DidDocument>, ResolveError>,
    at: Instant,
}

/// Shortest interval between two fetches of one DID's document (when `cache_ttl_secs` is not
/// shorter): a miss or a failure within it is answered from the last outcome.
pub const MIN_REFETCH: Duration = Duration::from_secs(10);

/// Resolves did:web callers' documents for the gateway.
pub struct WebResolver {
    method: WebMethod,
    ttl: Duration,
    cache: Mutex<HashMap<WebDid, Cached>>,
    /// One fetch in flight per DID: the others wait for it and take its outcome.
    inflight: Mutex<HashMap<WebDid, Arc<tokio::sync::Mutex<()>>>>,
    /// Fetches per host, over all its DIDs (`fetches_per_host_per_min`; `None` = no limit).
    host_rate: Option<RateLimit>,
    hosts: Mutex<HashMap<String, TokenBucket>>,
    /// The origin of the buckets' clock.
    origin: Instant,
}

impl std::fmt::Debug for WebResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebResolver")
            .field("ttl", &self.ttl)
            .field("allow_local", &self.method.allow_local)
            .finish()
    }
}

impl WebResolver {
    /// A resolver for `config`; test roots are read relative to `data_dir`.
    pub fn new(config: &DidWeb, data_dir: &Path) -> Result<Self, ResolveError> {
        let mut roots = Vec::new();
        for name in &config.test_roots {
            let pem =
                std::fs::read(data_dir.join(name)).map_err(|e| ResolveError::TestRootRead {
                    name: name.clone(),
                    source: Arc::new(e),
                })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                ResolveError::TestRootPem {
                    name: name.clone(),
                    source: Arc::new(e),
                }
            })?;
            roots.extend(certs);
        }
        let timeout = Duration::from_secs(config.timeout_secs);
        // the one rustls provider (ring), as the daemon installs it at start
        didgate_io::tls::install_provider();
        // one client for every fetch (the one ring provider; its connection pool and TLS
        // setup reused): HTTPS only, no redirect, no proxy, and a resolver that drops
        // addresses a did:web may not point at
        let resolver = if config.allow_local {
            crate::egress::GuardedResolver::allow_local()
        } else {
            crate::egress::GuardedResolver::public_only()
        };
        let mut builder = reqwest::Client::builder()
            .https_only(true)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(timeout)
            .timeout(timeout)
            .dns_resolver(resolver);
        if !roots.is_empty() {
            builder = builder.tls_certs_only(roots);
        }
        let client = builder
            .build()
            .map_err(|e| ResolveError::Fetch(Arc::new(e.without_url())))?;
        Ok(Self {
            method: WebMethod {
                client,
                allow_local: config.allow_local,
                fetches: AtomicU64::new(0),
            },
            ttl: Duration::from_secs(config.cache_ttl_secs),
            cache: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            host_rate: (config.fetches_per_host_per_min > 0).then(|| RateLimit {
                burst: config.fetches_per_host_per_min,
                per_sec: config.fetches_per_host_per_min as f64 / 60.0,
            }),
            hosts: Mutex::new(HashMap::new()),
            origin: Instant::now(),
        })
    }

    /// Takes a token of `host`'s fetch bucket; false when it is spent.
    fn host_may_fetch(&self, host: &str) -> bool {
        let Some(rate) = self.host_rate else {
            return true;
        };
        let now = self.origin.elapsed().as_millis() as u64;
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        if hosts.len() >= MAX_CACHED && !hosts.contains_key(host) {
            // bounded: full buckets hold nothing worth keeping
            hosts.retain(|_, b| !b.is_full(now));
        }
        hosts
            .entry(host.to_string())
            .or_insert_with(|| TokenBucket::new(rate, now))
            .try_take(now)
    }

    /// The current document of `did`, as it concerns `key`: the cached document while younger
    /// than the TTL if it lists `key`; else the last outcome if it is younger than the refetch
    /// interval; else a fresh fetch, one at a time per DID (concurrent callers wait for it and
    /// take its outcome). The caller has checked that policy names the host.
    pub async fn resolve(&self, did: &WebDid, key: &Did) -> Result<Arc<DidDocument>, ResolveError> {
        let started = Instant::now();
        if let Some(outcome) = self.usable(did, key, None) {
            return outcome;
        }
        let flight = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            inflight.entry(did.clone()).or_default().clone()
        };
        let _turn = flight.lock().await;
        // a fetch that ended while this caller waited is its answer
        if let Some(outcome) = self.usable(did, key, Some(started)) {
            return outcome;
        }
        let outcome = self.fetch_and_cache(did).await;
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(did);
        outcome
    }

    /// The cached outcome for `did` if it may be used for `key` now: a document younger than
    /// the TTL that lists the key, or any outcome younger than the refetch interval, or (after
    /// waiting for another caller's fetch) any outcome recorded since `since`.
    fn usable(
        &self,
        did: &WebDid,
        key: &Did,
        since: Option<Instant>,
    ) -> Option<Result<Arc<DidDocument>, ResolveError>> {
        let refetch = self.ttl.min(MIN_REFETCH);
        let (outcome, age) = self.cached(did)?;
        let fresh_hit = matches!(&outcome, Ok(doc) if doc.lists_key(key)) && age < self.ttl;
        let fetched_meanwhile = since.is_some_and(|t| age <= t.elapsed());
        (fresh_hit || age < refetch || fetched_meanwhile).then_some(outcome)
    }

    /// Fetches and parses `did`'s document and records the outcome; over the host's fetch
    /// rate, makes no fetch and records nothing.
    async fn fetch_and_cache(&self, did: &WebDid) -> Result<Arc<DidDocument>, ResolveError> {
        if !self.host_may_fetch(did.host()) {
            return Err(ResolveError::HostRateLimited(did.host().to_string()));
        }
        let outcome = match self.method.fetch(did).await {
            Ok(bytes) => DidDocument::parse(did, &bytes)
                .map(Arc::new)
                .map_err(ResolveError::from),
            Err(e) => Err(e),
        };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        // bounded: stale entries go first, then everything if still too many
        if cache.len() >= MAX_CACHED {
            let keep = self.ttl.max(MIN_REFETCH);
            cache.retain(|_, c| c.at.elapsed() < keep);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(
            did.clone(),
            Cached {
                outcome: outcome.clone(),
                at: Instant::now(),
            },
        );
        outcome
    }

    /// The last outcome for `did` and its age.
    fn cached(&self, did: &WebDid) -> Option<(Result<Arc<DidDocument>, ResolveError>, Duration)> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.get(did).map(|c| (c.outcome.clone(), c.at.elapsed()))
    }

    /// Drops every cached document (after a policy reload, or an operator's request).
    pub fn forget(&self) {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// How many fetches were attempted since start-up.
    pub fn fetches(&self) -> u64 {
        self.method.fetches.load(Ordering::Relaxed)
    }

    /// The ssi method resolver behind this cache.
    pub fn method(&self) -> &WebMethod {
        &self.method
    }
}

/// Most documents cached at once.
const MAX_CACHED: usize = 10_000;

/// The did:web method over our HTTPS client: implements ssi's `DIDMethodResolver`.
pub struct WebMethod {
    client: reqwest::Client,
    allow_local: bool,
    fetches: AtomicU64,
}

impl WebMethod {
    /// Refuses a local name (unless `allow_local`) and an IP-literal host outside the rule; a
    /// DNS name's addresses are checked by the client's resolver when it connects.
    fn check_host(&self, did: &WebDid) -> Result<(), ResolveError> {
        let host = did.host();
        if did.is_local_name() && !self.allow_local {
            return Err(ResolveError::Local(host.to_string()));
        }
        match host.parse::<IpAddr>() {
            Ok(ip) if !self.allow_local && refused_range(ip).is_some() => {
                Err(ResolveError::Local(host.to_string()))
            }
            _ => Ok(()),
        }
    }

    /// Fetches the document bytes of `did`: HTTPS, no redirect, capped, over the shared client
    /// whose resolver connects only to addresses that pass the rule (an IP-literal host, which
    /// no resolver sees, is checked here).
    pub async fn fetch(&self, did: &WebDid) -> Result<Vec<u8>, ResolveError> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        self.check_host(did)?;
        let resp = self
            .client
            .get(did.document_url())
            .header("accept", "application/did+json, application/json")
            .send()
            .await
            .map_err(|e| ResolveError::Fetch(Arc::new(e.without_url())))?;
        if resp.status() != reqwest::StatusCode::OK {
            return Err(ResolveError::Status(resp.status().as_u16()));
        }
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_DOCUMENT as u64)
        {
            return Err(DocumentError::TooLarge.into());
        }
        let mut body = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| ResolveError::Fetch(Arc::new(e.without_url())))?;
            if body.len() + chunk.len() > MAX_DOCUMENT {
                return Err(DocumentError::TooLarge.into());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

impl ssi_dids_core::DIDMethod for WebMethod {
    const DID_METHOD_NAME: &'static str = "web";
}

impl ssi_dids_core::DIDMethodResolver for WebMethod {
    async fn resolve_method_representation<'a>(
        &'a self,
        method_specific_id: &'a str,
        _options: ssi_dids_core::resolution::Options,
    ) -> Result<ssi_dids_core::resolution::Output<Vec<u8>>, ssi_dids_core::resolution::Error> {
        use ssi_dids_core::resolution::Error;
        let did = WebDid::parse(&format!("did:web:{method_specific_id}"))
            .map_err(|e| Error::InvalidMethodSpecificId(e.to_string()))?;
        match self.fetch(&did).await {
            Ok(bytes) => Ok(ssi_dids_core::resolution::Output::from_content(
                bytes,
                Some("application/did+json".into()),
            )),
            Err(ResolveError::Status(404)) => Err(Error::NotFound),
            Err(e) => Err(Error::internal(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolver(allow_local: bool) -> WebResolver {
        let cfg = DidWeb {
            allow_local,
            ..DidWeb::default()
        };
        WebResolver::new(&cfg, Path::new("/nonexistent")).expect("resolver")
    }

    #[tokio::test]
    async fn local_hosts_are_refused_without_test_mode() {
        let r = resolver(false);
        for did in [
            "did:web:localhost%3A8443",
            "did:web:127.0.0.1",
            "did:web:10.0.0.1",
            "did:web:169.254.169.254:latest",
            "did:web:api.localhost",
        ] {
            let did = WebDid::parse(did).expect("did");
            let key = didgate_protocol::Identity::from_seed(&[1; 32])
                .did()
                .clone();
            assert!(
                matches!(r.resolve(&did, &key).await, Err(ResolveError::Local(_))),
                "{did} was not refused as local"
            );
        }
    }

    #[tokio::test]
    async fn ssi_trait_maps_errors() {
        use ssi_dids_core::DIDMethodResolver;
        let r = resolver(false);
        let out = r
            .method()
            .resolve_method_representation("localhost", Default::default())
            .await;
        assert!(out.is_err());
        let out = r
            .method()
            .resolve_method_representation("Bad..Host", Default::default())
            .await;
        assert!(matches!(
            out,
            Err(ssi_dids_core::resolution::Error::InvalidMethodSpecificId(_))
        ));
    }
}

//! `gateway.toml`: listen address, limits, upstreams and policy rules (specs/operation.md,
//! "Gateway configuration").

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use didgate_protocol::web::PrincipalError;
use didgate_protocol::{Principal, Version};
use reqwest::Url;
use serde::{Deserialize, Serialize};

use didgate_protocol::catalog;
use didgate_protocol::catalog::BodyMode;

/// How an upstream's secret is injected into the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Auth {
    /// `Authorization: Bearer SECRET`.
    Bearer,
    /// `Authorization: Basic base64(USER:SECRET)`.
    Basic {
        /// The user name.
        user: String,
    },
    /// A named header carrying the secret.
    Header {
        /// Header name.
        name: String,
    },
    /// A query parameter carrying the secret.
    Query {
        /// Parameter name.
        name: String,
    },
}

/// One upstream API as written in `[[upstream]]` (unchecked: [`RawUpstream::validate`] makes the
/// [`Upstream`] the gateway uses).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// Name callers use.
    pub name: String,
    /// Base URL, `http(s)://host[:port][/prefix]`, no trailing slash.
    pub base_url: String,
    /// How the secret is injected.
    pub auth: Auth,
    /// Name of the secret (`didgated secret add NAME`).
    pub secret: String,
    /// Hostnames the gateway may connect to for this upstream.
    pub allowed_hosts: Vec<String>,
    /// Request headers a caller may set (lower case).
    #[serde(default = "default_headers")]
    pub allow_headers: Vec<String>,
    /// Path of a harmless `GET` that `didgated secret test` sends with the secret injected,
    /// e.g. `/v1/balance` (absolute, no query).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_path: Option<String>,
    /// The upstream runs on this machine or a private network: its host may resolve to (or
    /// be) a loopback or private address. Otherwise such addresses are refused (specs/operation.md,
    /// "Limits and egress").
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub local: bool,
    /// Connect and read timeout for this upstream, seconds (default: `upstream_timeout_secs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Rate of calls to this upstream from all callers (default: `[gateway]`
    /// `rate_per_upstream`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_upstream: Option<RateLimit>,
    /// Calls in flight to this upstream from all callers, 0 = unlimited (default: `[gateway]`
    /// `max_concurrent_per_upstream`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_per_upstream: Option<u64>,
    /// Rate of calls from each DID to this upstream, on top of `[gateway]` `rate_per_did`
    /// (default: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_did: Option<RateLimit>,
    /// Calls in flight from each DID to this upstream, 0 = unlimited, on top of `[gateway]`
    /// `max_concurrent_per_did` (default: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_per_did: Option<u64>,
    /// Largest response body relayed from this upstream, bytes, 0 = unlimited (default:
    /// `[gateway]` `max_response_bytes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_response_bytes: Option<u64>,
    /// Named operations callers may discover (`[[upstream.operation]]`; specs/operation.md,
    /// "Operations").
    #[serde(default, rename = "operation", skip_serializing_if = "Vec::is_empty")]
    pub operations: Vec<OperationConfig>,
    /// What to do when the response holds the call's credential (specs/operation.md, "Secret
    /// echoes"): redact it (the default) or fail the call.
    #[serde(default, skip_serializing_if = "EchoAction::is_default")]
    pub on_secret_echo: EchoAction,
    /// Whether this upstream routes paths without regard to case (`insensitive`: the path is
    /// lower-cased before policy, and that is what the grant names and the upstream gets).
    #[serde(default, skip_serializing_if = "PathCase::is_default")]
    pub path_case: PathCase,
    /// Whether this upstream routes `/a/` as `/a` (`fold`: one trailing slash is removed before
    /// policy, and that is what the grant names and the upstream gets).
    #[serde(default, skip_serializing_if = "TrailingSlash::is_default")]
    pub trailing_slash: TrailingSlash,
    /// Whether callers may send method-override headers and query parameters
    /// (`X-HTTP-Method-Override`, `_method`, `X-Original-URL`, ...: `canonical::check_overrides`).
    /// Off by default: on many servers they make a request another method or path than the one
    /// policy judged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_method_override: bool,
}

/// How an upstream matches path case ([`RawUpstream::path_case`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathCase {
    /// Paths are compared as written (the default).
    #[default]
    Sensitive,
    /// The upstream ignores case: paths are lower-cased (ASCII) before policy.
    Insensitive,
}

impl PathCase {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// What an upstream does with a trailing slash ([`RawUpstream::trailing_slash`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrailingSlash {
    /// `/a/` and `/a` are different paths (the default).
    #[default]
    Keep,
    /// The upstream routes `/a/` as `/a`: one trailing slash is removed before policy.
    Fold,
}

impl TrailingSlash {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// What the gateway does with a response that holds the call's credential.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EchoAction {
    /// Replace each occurrence with as many `*` and relay the rest.
    #[default]
    Redact,
    /// Fail the call (`upstream_failed`): the caller gets no further byte of the response.
    Fail,
}

impl EchoAction {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl RawUpstream {
    /// An upstream `name` at `base_url` whose secret `secret` is sent as a bearer token, with
    /// what a `[[upstream]]` table that names only these gets: connections to the base URL's
    /// host only, the default request headers, not `local`, no test path, no limits of its own
    /// (the `[gateway]` ones apply) and no operations.
    pub fn new(
        name: impl Into<String>,
        base_url: impl Into<String>,
        secret: impl Into<String>,
    ) -> Self {
        let base_url = base_url.into();
        let allowed_hosts = Url::parse(&base_url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .into_iter()
            .collect();
        Self {
            name: name.into(),
            base_url,
            auth: Auth::Bearer,
            secret: secret.into(),
            allowed_hosts,
            allow_headers: default_headers(),
            test_path: None,
            local: false,
            timeout_secs: None,
            rate_per_upstream: None,
            max_concurrent_per_upstream: None,
            rate_per_did: None,
            max_concurrent_per_did: None,
            max_response_bytes: None,
            operations: Vec::new(),
            on_secret_echo: EchoAction::Redact,
            path_case: PathCase::Sensitive,
            trailing_slash: TrailingSlash::Keep,
            allow_method_override: false,
        }
    }
}

fn default_headers() -> Vec<String> {
    vec!["content-type".into(), "accept".into()]
}

/// A policy rule: these principals may call these (methods, paths) on one upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// DIDs, or `group:NAME`.
    pub principals: Vec<String>,
    /// Upstream name.
    pub upstream: String,
    /// Methods, upper case.
    pub methods: Vec<String>,
    /// Path patterns: exact, `*` for one segment, a final `**` for any remainder.
    pub paths: Vec<String>,
}

/// Gateway limits and address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Accepted clock skew, seconds.
    #[serde(default = "d_skew")]
    pub skew_secs: u64,
    /// Largest request body, bytes.
    #[serde(default = "d_body")]
    pub max_body: u64,
    /// Grant lifetime, seconds.
    #[serde(default = "d_grant")]
    pub grant_ttl_secs: u64,
    /// Upstream timeout, seconds.
    #[serde(default = "d_timeout")]
    pub upstream_timeout_secs: u64,
    /// How long a stream may take to deliver its first frame, and then its whole body,
    /// seconds: a stream that stalls (slowloris) is refused and freed after this.
    #[serde(default = "d_frame_timeout")]
    pub frame_timeout_secs: u64,
    /// Connections one DID may hold open at once (0 = unlimited); a connection beyond it is
    /// answered `rate_limited` on its first stream and closed.
    #[serde(default = "d_conns_did")]
    pub max_connections_per_did: u64,
    /// Window over which refusals not recorded one by one are counted into one entry, seconds.
    #[serde(default = "d_window")]
    pub refusal_window_secs: u64,
    /// Refused entries recorded one by one per authenticated DID per minute (0 = no limit):
    /// refusals past it are counted into the aggregate entry, as are repeated refusals of one
    /// call ID.
    #[serde(default = "d_refusal_entries")]
    pub refusal_entries_per_min: u64,
    /// Sign a checkpoint of the gateway's chain at least every this many entries.
    #[serde(default = "d_cp_entries")]
    pub checkpoint_every_entries: u64,
    /// ... and at least every this many seconds while entries are added (and at shutdown).
    #[serde(default = "d_cp_secs")]
    pub checkpoint_every_secs: u64,
    /// How long a secret version replaced by `secret rotate` stays usable, seconds.
    #[serde(default = "d_grace")]
    pub secret_grace_secs: u64,
    /// Cedar policy file, relative to the data directory (specs/operation.md, "Policy"). When
    /// absent, the `[[rule]]` list is translated into Cedar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_file: Option<String>,
    /// Cedar entities file (JSON) adding Did and Group membership, relative to the data
    /// directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entities_file: Option<String>,
    /// Rate of calls from each DID, across all upstreams (`burst = 0`: unlimited).
    #[serde(default = "d_rate_did")]
    pub rate_per_did: RateLimit,
    /// Default rate of calls to each upstream, across all callers (`burst = 0`, the default:
    /// unlimited).
    #[serde(default = "d_rate_up")]
    pub rate_per_upstream: RateLimit,
    /// Calls in flight from each DID, across all upstreams (0 = unlimited).
    #[serde(default = "d_conc_did")]
    pub max_concurrent_per_did: u64,
    /// Default number of calls in flight to each upstream (0 = unlimited).
    #[serde(default = "d_conc_up")]
    pub max_concurrent_per_upstream: u64,
    /// Default largest response body relayed, bytes (0 = unlimited).
    #[serde(default = "d_resp")]
    pub max_response_bytes: u64,
    /// TCP address serving Prometheus metrics at `GET /metrics` (absent: no metrics server).
    /// A loopback address unless `metrics_allow_remote`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// Allow a `metrics_listen` address that is not loopback (the metrics are unauthenticated).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub metrics_allow_remote: bool,
    /// Host names a scraper may put in the metrics request's `Host` header, besides loopback
    /// names and IP literals (which are always accepted): any other name is refused (403), so a
    /// web page cannot read the metrics through DNS rebinding.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics_hosts: Vec<String>,
    /// The oldest protocol version whose requests are served (specs/protocol.md, "Format
    /// evolution"): 1 (the default) serves clients of every release; 2 refuses version 1
    /// requests with a signed version 1 refusal that says so.
    #[serde(default = "d_min_client")]
    pub min_client_version: u64,
    /// Admission of new QUIC connections (`[gateway.handshakes]`).
    #[serde(default)]
    pub handshakes: Handshakes,
    /// Where the master key that wraps every secret's data key lives: `file` (the default:
    /// `master.key` in the data directory, or `DIDGATE_MASTER_KEY`) or `pkcs11` (a key in a
    /// token that never leaves it: `[pkcs11]`; specs/operation.md, "A master key in a token").
    #[serde(default, skip_serializing_if = "KmsKind::is_file")]
    pub kms: KmsKind,
}

/// `[gateway] kms`: the KMS backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KmsKind {
    /// `master.key` (or `DIDGATE_MASTER_KEY`).
    #[default]
    File,
    /// A PKCS#11 token (`[pkcs11]`).
    Pkcs11,
}

impl KmsKind {
    fn is_file(&self) -> bool {
        *self == Self::File
    }
}

/// `[pkcs11]`: the token that holds the master key when `[gateway] kms = "pkcs11"`. The PIN
/// comes from `pin_env` or `pin_file` (exactly one), never from this file or argv.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Settings {
    /// Path of the PKCS#11 module (a shared library, e.g. SoftHSM2's
    /// `/usr/lib/softhsm/libsofthsm2.so`).
    pub module: String,
    /// The token's label.
    pub token: String,
    /// The label of the master keys didgate generates in the token.
    #[serde(default = "d_key_label")]
    pub key_label: String,
    /// Name of an environment variable holding the user PIN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_env: Option<String>,
    /// A file holding the user PIN (its first line), absolute or relative to the data
    /// directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_file: Option<String>,
}

fn d_key_label() -> String {
    "didgate-master".into()
}

impl Pkcs11Settings {
    /// The token's configuration, with `pin_file` resolved against the data directory `dir`.
    pub fn token_config(&self, dir: &Path) -> crate::pkcs11::TokenConfig {
        use crate::pkcs11::PinSource;
        let pin = match (&self.pin_env, &self.pin_file) {
            (Some(var), _) => PinSource::Env(var.clone()),
            (None, Some(file)) => PinSource::File(dir.join(file)),
            // refused by `RawConfig::validate`
            (None, None) => PinSource::Env(String::new()),
        };
        crate::pkcs11::TokenConfig {
            module: PathBuf::from(&self.module),
            token: self.token.clone(),
            key_label: self.key_label.clone(),
            pin,
        }
    }
}

/// `[gateway.handshakes]`: admission of new QUIC connections, before any handshake work
/// (specs/operation.md, "Handshake floods"; [`crate::admission`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Handshakes {
    /// Above this many new connections per second (over the whole gateway), a connection whose
    /// address QUIC has not validated is answered with a Retry (0: always).
    #[serde(default = "d_retry_above")]
    pub retry_above_per_sec: u64,
    /// Handshakes in flight from one address (IPv4, or IPv6 /64) (0 = unlimited).
    #[serde(default = "d_in_flight_addr")]
    pub max_in_flight_per_address: u64,
    /// Connections open from one address (0 = unlimited).
    #[serde(default = "d_open_addr")]
    pub max_open_per_address: u64,
    /// New connections from one address (a token bucket; `burst = 0`: unlimited).
    #[serde(default = "d_rate_addr")]
    pub rate_per_address: RateLimit,
}

impl Default for Handshakes {
    fn default() -> Self {
        Self {
            retry_above_per_sec: d_retry_above(),
            max_in_flight_per_address: d_in_flight_addr(),
            max_open_per_address: d_open_addr(),
            rate_per_address: d_rate_addr(),
        }
    }
}

fn d_retry_above() -> u64 {
    100
}
fn d_in_flight_addr() -> u64 {
    16
}
fn d_open_addr() -> u64 {
    256
}
fn d_rate_addr() -> RateLimit {
    RateLimit {
        burst: 64,
        per_sec: 32.0,
    }
}

impl Settings {
    /// Defaults for everything but the address.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            skew_secs: d_skew(),
            max_body: d_body(),
            grant_ttl_secs: d_grant(),
            upstream_timeout_secs: d_timeout(),
            frame_timeout_secs: d_frame_timeout(),
            max_connections_per_did: d_conns_did(),
            refusal_window_secs: d_window(),
            refusal_entries_per_min: d_refusal_entries(),
            checkpoint_every_entries: d_cp_entries(),
            checkpoint_every_secs: d_cp_secs(),
            secret_grace_secs: d_grace(),
            policy_file: None,
            entities_file: None,
            rate_per_did: d_rate_did(),
            rate_per_upstream: d_rate_up(),
            max_concurrent_per_did: d_conc_did(),
            max_concurrent_per_upstream: d_conc_up(),
            max_response_bytes: d_resp(),
            metrics_listen: None,
            metrics_allow_remote: false,
            metrics_hosts: Vec::new(),
            min_client_version: d_min_client(),
            handshakes: Handshakes::default(),
            kms: KmsKind::File,
        }
    }
}

fn d_min_client() -> u64 {
    Version::OLDEST.as_u64()
}

fn d_rate_did() -> RateLimit {
    RateLimit {
        burst: 1000,
        per_sec: 100.0,
    }
}
fn d_rate_up() -> RateLimit {
    RateLimit {
        burst: 0,
        per_sec: 0.0,
    }
}
fn d_conc_did() -> u64 {
    64
}
fn d_conc_up() -> u64 {
    1024
}
fn d_resp() -> u64 {
    128 * 1024 * 1024
}

fn d_cp_entries() -> u64 {
    4096
}
fn d_grace() -> u64 {
    DEFAULT_GRACE_SECS
}
fn d_cp_secs() -> u64 {
    60
}

fn d_skew() -> u64 {
    30
}
fn d_body() -> u64 {
    1024 * 1024
}
fn d_grant() -> u64 {
    10
}
fn d_timeout() -> u64 {
    30
}
fn d_frame_timeout() -> u64 {
    10
}
fn d_conns_did() -> u64 {
    32
}
fn d_window() -> u64 {
    10
}
fn d_refusal_entries() -> u64 {
    60
}

/// The whole configuration as written in `gateway.toml` (unchecked): what the file
/// deserialises into and what tools and tests build. [`RawConfig::validate`] (or
/// [`Config::load`]) turns it into the [`Config`] the gateway runs with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Address and limits.
    pub gateway: Settings,
    /// Upstream APIs.
    #[serde(default, rename = "upstream")]
    pub upstreams: Vec<RawUpstream>,
    /// Named groups of DIDs.
    #[serde(default)]
    pub groups: BTreeMap<String, Vec<String>>,
    /// Policy rules (default deny).
    #[serde(default, rename = "rule")]
    pub rules: Vec<Rule>,
    /// Resolution of did:web callers.
    #[serde(default)]
    pub did_web: DidWeb,
    /// The PKCS#11 token of `[gateway] kms = "pkcs11"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pkcs11: Option<Pkcs11Settings>,
    /// This gateway is one node of a gateway DID (specs/operation.md, "Nodes").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<crate::node::NodeSettings>,
    /// This node is a member of a cluster whose control plane is etcd (specs/operation.md,
    /// "Cluster").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<didgate_cluster::ClusterSettings>,
}

/// `[did_web]`: how did:web callers' documents are fetched (specs/protocol.md, "did:web
/// callers"). Only hosts that the policy set names are ever fetched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DidWeb {
    /// How long a fetched document is used before it is fetched again, seconds (at most
    /// 3600; 0 = fetch for every request).
    #[serde(default = "d_doc_ttl")]
    pub cache_ttl_secs: u64,
    /// Connect and read timeout of a fetch, seconds.
    #[serde(default = "d_doc_timeout")]
    pub timeout_secs: u64,
    /// PEM files of extra trust roots, relative to the data directory. When set, they are
    /// the only roots the resolver trusts (tests: a local CA).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub test_roots: Vec<String>,
    /// Document fetches per host per minute, over every DID of that host (a token bucket:
    /// that many at once, refilled at 1/60 of it a second; 0 = no limit). A fetch over it is
    /// not made: the call is refused `did_unresolved`.
    #[serde(default = "d_fetches_per_host")]
    pub fetches_per_host_per_min: u64,
    /// Tests only: accept `localhost`, IP-literal hosts, and loopback or private addresses.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_local: bool,
}

impl Default for DidWeb {
    fn default() -> Self {
        Self {
            cache_ttl_secs: d_doc_ttl(),
            timeout_secs: d_doc_timeout(),
            test_roots: Vec::new(),
            fetches_per_host_per_min: d_fetches_per_host(),
            allow_local: false,
        }
    }
}

/// Longest document cache lifetime accepted, seconds.
pub const MAX_DOC_TTL_SECS: u64 = 3600;

fn d_doc_ttl() -> u64 {
    300
}
fn d_doc_timeout() -> u64 {
    5
}
fn d_fetches_per_host() -> u64 {
    120
}

/// Why the configuration is unusable. The texts name the table and key at fault
/// (specs/operation.md, "Gateway configuration").
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{}: {source}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: toml::de::Error,
    },
    /// `min_client_version` is not a protocol version of this release.
    #[error(
        "gateway: min_client_version must be {} to {} (this release's protocol versions), not {value}",
        Version::OLDEST,
        Version::CURRENT
    )]
    MinClientVersion {
        /// The value given.
        value: u64,
    },
    /// `kms = "pkcs11"` without a `[pkcs11]` table.
    #[error(
        "gateway: kms = \"pkcs11\" needs a [pkcs11] table (module, token, pin_env or pin_file)"
    )]
    Pkcs11Missing,
    /// `[cluster]` is not valid.
    #[error("{0}")]
    Cluster(#[source] didgate_cluster::SettingsError),
    /// `[pkcs11]` gives both or neither of `pin_env` and `pin_file`.
    #[error("pkcs11: set exactly one of pin_env and pin_file (the PIN is never in this file)")]
    Pkcs11Pin,
    /// `[pkcs11]` has an empty `module`, `token` or `key_label`.
    #[error("pkcs11: module, token and key_label must not be empty")]
    Pkcs11Empty,
    /// An upstream's `base_url` is not a URL.
    #[error("upstream {upstream}: base_url: {source}")]
    BaseUrl {
        /// The upstream.
        upstream: String,
        /// Why.
        #[source]
        source: url::ParseError,
    },
    /// An upstream's `base_url` is not `http` or `https`.
    #[error("upstream {upstream}: base_url must be http or https")]
    Scheme {
        /// The upstream.
        upstream: String,
    },
    /// The host of an upstream's `base_url` is not in its `allowed_hosts`.
    #[error("upstream {upstream}: host {host} of base_url is not in allowed_hosts")]
    HostNotAllowed {
        /// The upstream.
        upstream: String,
        /// The base URL's host.
        host: String,
    },
    /// An upstream's `test_path` is not an absolute path without a query.
    #[error("upstream {upstream}: test_path must start with '/' and hold no query")]
    TestPath {
        /// The upstream.
        upstream: String,
    },
    /// An upstream's `base_url` ends with `/`.
    #[error("upstream {upstream}: base_url must not end with '/'")]
    BaseUrlSlash {
        /// The upstream.
        upstream: String,
    },
    /// `allow_headers` names a method-override header without `allow_method_override`.
    #[error(
        "upstream {upstream}: allow_headers names {header}, which overrides the method or path on many servers; set allow_method_override = true if this upstream ignores it or policy allows every method and path it could reach"
    )]
    OverrideHeader {
        /// The upstream.
        upstream: String,
        /// The header.
        header: String,
    },
    /// An `[[upstream.operation]]` is not acceptable.
    #[error(transparent)]
    Operation(#[from] OperationError),
    /// A rate has a bad `per_sec`; `at` names the table (empty for `[gateway]`).
    #[error("{at}{source}")]
    Rate {
        /// `upstream NAME: `, `gateway.handshakes: `, or empty for `[gateway]`.
        at: String,
        /// Why.
        #[source]
        source: RateError,
    },
    /// `did_web.cache_ttl_secs` is over [`MAX_DOC_TTL_SECS`].
    #[error(
        "did_web.cache_ttl_secs is at most {MAX_DOC_TTL_SECS} (a rotated-out key must stop working)"
    )]
    DocTtl,
    /// `did_web.timeout_secs` is 0.
    #[error("did_web.timeout_secs must be at least 1")]
    DidWebTimeout,
    /// `metrics_listen` is not loopback and `metrics_allow_remote` is not set.
    #[error(
        "metrics_listen {addr} is not a loopback address; the metrics are unauthenticated \
         (set metrics_allow_remote = true to serve them there anyway)"
    )]
    MetricsNotLoopback {
        /// The address.
        addr: SocketAddr,
    },
    /// A group member is not a DID.
    #[error("group {group}: {member}: {source}")]
    Member {
        /// The group.
        group: String,
        /// The member as written.
        member: String,
        /// Why.
        #[source]
        source: PrincipalError,
    },
    /// Both `policy_file` and `[[rule]]` entries are given.
    #[error("give policy_file or [[rule]] entries, not both (the rules would be ignored)")]
    PolicyFileAndRules,
    /// A rule names an upstream that is not configured.
    #[error("rule {rule}: unknown upstream {upstream}")]
    UnknownUpstream {
        /// The rule's index.
        rule: usize,
        /// The upstream it names.
        upstream: String,
    },
    /// A rule names a group that is not configured.
    #[error("rule {rule}: unknown group {group}")]
    UnknownGroup {
        /// The rule's index.
        rule: usize,
        /// The group it names.
        group: String,
    },
    /// A rule's principal is neither `group:NAME` nor a DID.
    #[error("rule {rule}: {principal}: {source}")]
    Principal {
        /// The rule's index.
        rule: usize,
        /// The principal as written.
        principal: String,
        /// Why.
        #[source]
        source: PrincipalError,
    },
}

/// A rate's `per_sec` is not a finite number >= 0.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("per_sec must be a finite number >= 0, not {per_sec}")]
pub struct RateError {
    /// The value given.
    pub per_sec: f64,
}

/// An `[[upstream.operation]]` is not acceptable ([`validate_operations`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("upstream {upstream} operation {operation:?}: {problem}")]
pub struct OperationError {
    /// The upstream.
    pub upstream: String,
    /// The operation's name.
    pub operation: String,
    /// What is wrong.
    #[source]
    pub problem: OperationProblem,
}

/// What is wrong with an operation ([`OperationError`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OperationProblem {
    /// The name, path template, title or body schema is refused by the catalog's rules.
    #[error(transparent)]
    Template(#[from] catalog::TemplateError),
    /// Another operation of the upstream has this name.
    #[error("the name is used twice")]
    DuplicateName,
    /// The method is not upper-case ASCII letters.
    #[error("method must be upper case, e.g. GET")]
    Method,
    /// The description is longer than [`MAX_DESCRIPTION`].
    #[error("description longer than {MAX_DESCRIPTION} bytes")]
    Description,
    /// A body schema is given with `body = "none"`.
    #[error("body_schema given with body = \"none\"")]
    SchemaWithoutBody,
    /// A body schema is given for a method that has no body by default.
    #[error(
        "body_schema given, but a {method} operation has no body unless body = \"optional\" or \"required\""
    )]
    SchemaForBodylessMethod {
        /// The method.
        method: String,
    },
}

/// One upstream, checked ([`RawUpstream::validate`]): its base URL parsed once, its timeout a
/// [`Duration`]. The gateway reaches upstreams only through these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    raw: RawUpstream,
    base_url: Url,
    timeout: Option<Duration>,
}

impl RawUpstream {
    /// Checks this upstream on its own (base URL, allowed host, test path, headers,
    /// operations, rates) and returns the [`Upstream`] the gateway uses.
    pub fn validate(self) -> Result<Upstream, ConfigError> {
        let upstream = || self.name.clone();
        let base_url = Url::parse(&self.base_url).map_err(|source| ConfigError::BaseUrl {
            upstream: upstream(),
            source,
        })?;
        if !matches!(base_url.scheme(), "http" | "https") {
            return Err(ConfigError::Scheme {
                upstream: upstream(),
            });
        }
        let host = base_url.host_str().unwrap_or_default();
        if !self.allowed_hosts.iter().any(|h| h == host) {
            return Err(ConfigError::HostNotAllowed {
                upstream: upstream(),
                host: host.to_string(),
            });
        }
        if let Some(p) = &self.test_path
            && (!p.starts_with('/') || p.contains(['?', '#']))
        {
            return Err(ConfigError::TestPath {
                upstream: upstream(),
            });
        }
        if self.base_url.ends_with('/') {
            return Err(ConfigError::BaseUrlSlash {
                upstream: upstream(),
            });
        }
        if !self.allow_method_override
            && let Some(h) = self.allow_headers.iter().find(|h| {
                didgate_protocol::canonical::METHOD_OVERRIDE_HEADERS
                    .iter()
                    .any(|o| o.eq_ignore_ascii_case(h))
            })
        {
            return Err(ConfigError::OverrideHeader {
                upstream: upstream(),
                header: h.clone(),
            });
        }
        validate_operations(&self)?;
        for r in [self.rate_per_upstream, self.rate_per_did]
            .into_iter()
            .flatten()
        {
            r.validate().map_err(|source| ConfigError::Rate {
                at: format!("upstream {}: ", self.name),
                source,
            })?;
        }
        Ok(Upstream {
            timeout: self.timeout_secs.map(Duration::from_secs),
            base_url,
            raw: self,
        })
    }
}

impl Upstream {
    /// The name callers use.
    pub fn name(&self) -> &str {
        &self.raw.name
    }

    /// The base URL, parsed at load (http or https, its host in [`Upstream::allowed_hosts`],
    /// no trailing slash as written).
    pub fn base_url(&self) -> &Url {
        &self.base_url
    }

    /// How the secret is injected.
    pub fn auth(&self) -> &Auth {
        &self.raw.auth
    }

    /// The name of the upstream's secret.
    pub fn secret(&self) -> &str {
        &self.raw.secret
    }

    /// Hostnames the gateway may connect to for this upstream.
    pub fn allowed_hosts(&self) -> &[String] {
        &self.raw.allowed_hosts
    }

    /// Request headers a caller may set (lower case).
    pub fn allow_headers(&self) -> &[String] {
        &self.raw.allow_headers
    }

    /// The path `didgated secret test` sends a `GET` to, if any.
    pub fn test_path(&self) -> Option<&str> {
        self.raw.test_path.as_deref()
    }

    /// Whether the upstream may be on a loopback or private address.
    pub fn local(&self) -> bool {
        self.raw.local
    }

    /// This upstream's own connect and read timeout (else `[gateway]`'s applies).
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// This upstream's own rate of calls from all callers (else `[gateway]`'s applies).
    pub fn rate_per_upstream(&self) -> Option<RateLimit> {
        self.raw.rate_per_upstream
    }

    /// This upstream's own limit of calls in flight (else `[gateway]`'s applies).
    pub fn max_concurrent_per_upstream(&self) -> Option<u64> {
        self.raw.max_concurrent_per_upstream
    }

    /// The rate of calls from each DID to this upstream, if limited.
    pub fn rate_per_did(&self) -> Option<RateLimit> {
        self.raw.rate_per_did
    }

    /// Calls in flight from each DID to this upstream, if limited.
    pub fn max_concurrent_per_did(&self) -> Option<u64> {
        self.raw.max_concurrent_per_did
    }

    /// This upstream's own largest response body (else `[gateway]`'s applies).
    pub fn max_response_bytes(&self) -> Option<u64> {
        self.raw.max_response_bytes
    }

    /// The named operations callers may discover.
    pub fn operations(&self) -> &[OperationConfig] {
        &self.raw.operations
    }

    /// What to do when the response holds the call's credential.
    pub fn on_secret_echo(&self) -> EchoAction {
        self.raw.on_secret_echo
    }

    /// Whether callers may send method-override headers and query parameters.
    pub fn allow_method_override(&self) -> bool {
        self.raw.allow_method_override
    }

    /// The upstream as written in `gateway.toml`.
    pub fn raw(&self) -> &RawUpstream {
        &self.raw
    }

    /// The path policy judges, the grant names and the upstream gets for a request's canonical
    /// `path`: lower-cased if the upstream ignores case, without its trailing slash if it folds
    /// them (never `/` itself).
    pub fn policy_path<'a>(&self, path: &'a str) -> std::borrow::Cow<'a, str> {
        let mut folded = std::borrow::Cow::Borrowed(path);
        if self.raw.trailing_slash == TrailingSlash::Fold
            && folded.len() > 1
            && folded.ends_with('/')
        {
            folded = std::borrow::Cow::Borrowed(&path[..path.len() - 1]);
        }
        if self.raw.path_case == PathCase::Insensitive
            && folded.bytes().any(|b| b.is_ascii_uppercase())
        {
            folded = std::borrow::Cow::Owned(folded.to_ascii_lowercase());
        }
        folded
    }
}

/// The validated configuration the gateway runs with: built only by [`Config::load`] or
/// [`RawConfig::validate`], so every value in it has been checked, and values used on every
/// call are held parsed (each upstream's base URL, durations, the oldest client version).
/// [`Config::to_raw`] gives back what it was built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    gateway: Settings,
    upstreams: Vec<Upstream>,
    groups: BTreeMap<String, Vec<String>>,
    rules: Vec<Rule>,
    did_web: DidWeb,
    pkcs11: Option<Pkcs11Settings>,
    node: Option<crate::node::NodeSettings>,
    cluster: Option<didgate_cluster::ClusterSettings>,
    min_client: Version,
    skew: Duration,
    grant_ttl: Duration,
    upstream_timeout: Duration,
    frame_timeout: Duration,
    refusal_window: Duration,
    secret_grace: Duration,
}

impl RawConfig {
    /// Reads and parses `gateway.toml` without checking it (tools that edit the file and
    /// write it back).
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Checks everything (each upstream, `[gateway]`, `[pkcs11]`, `[did_web]`, groups, and
    /// rules against upstreams and groups) and returns the [`Config`] the gateway runs with.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let min_client = Version::from_u64(self.gateway.min_client_version).ok_or(
            ConfigError::MinClientVersion {
                value: self.gateway.min_client_version,
            },
        )?;
        self.validate_kms()?;
        let Self {
            gateway,
            upstreams,
            groups,
            rules,
            did_web,
            pkcs11,
            node,
            cluster,
        } = self;
        if let Some(c) = &cluster {
            c.validate().map_err(ConfigError::Cluster)?;
        }
        let upstreams = upstreams
            .into_iter()
            .map(RawUpstream::validate)
            .collect::<Result<Vec<_>, _>>()?;
        for r in [gateway.rate_per_did, gateway.rate_per_upstream] {
            r.validate().map_err(|source| ConfigError::Rate {
                at: String::new(),
                source,
            })?;
        }
        gateway
            .handshakes
            .rate_per_address
            .validate()
            .map_err(|source| ConfigError::Rate {
                at: "gateway.handshakes: ".into(),
                source,
            })?;
        if did_web.cache_ttl_secs > MAX_DOC_TTL_SECS {
            return Err(ConfigError::DocTtl);
        }
        if did_web.timeout_secs == 0 {
            return Err(ConfigError::DidWebTimeout);
        }
        if let Some(addr) = gateway.metrics_listen
            && !addr.ip().is_loopback()
            && !gateway.metrics_allow_remote
        {
            return Err(ConfigError::MetricsNotLoopback { addr });
        }
        for (group, members) in &groups {
            for m in members {
                Principal::parse(m).map_err(|source| ConfigError::Member {
                    group: group.clone(),
                    member: m.clone(),
                    source,
                })?;
            }
        }
        if gateway.policy_file.is_some() && !rules.is_empty() {
            return Err(ConfigError::PolicyFileAndRules);
        }
        for (i, r) in rules.iter().enumerate() {
            if !upstreams.iter().any(|u| u.name() == r.upstream) {
                return Err(ConfigError::UnknownUpstream {
                    rule: i,
                    upstream: r.upstream.clone(),
                });
            }
            for p in &r.principals {
                match p.strip_prefix("group:") {
                    Some(g) if !groups.contains_key(g) => {
                        return Err(ConfigError::UnknownGroup {
                            rule: i,
                            group: g.to_string(),
                        });
                    }
                    Some(_) => {}
                    None => {
                        Principal::parse(p).map_err(|source| ConfigError::Principal {
                            rule: i,
                            principal: p.clone(),
                            source,
                        })?;
                    }
                }
            }
        }
        Ok(Config {
            min_client,
            skew: Duration::from_secs(gateway.skew_secs),
            grant_ttl: Duration::from_secs(gateway.grant_ttl_secs),
            upstream_timeout: Duration::from_secs(gateway.upstream_timeout_secs),
            frame_timeout: Duration::from_secs(gateway.frame_timeout_secs.max(1)),
            refusal_window: Duration::from_secs(gateway.refusal_window_secs),
            secret_grace: Duration::from_secs(gateway.secret_grace_secs),
            gateway,
            upstreams,
            groups,
            rules,
            did_web,
            pkcs11,
            node,
            cluster,
        })
    }

    /// `[gateway] kms` and `[pkcs11]` agree, and the PIN has exactly one source.
    fn validate_kms(&self) -> Result<(), ConfigError> {
        match (&self.gateway.kms, &self.pkcs11) {
            (KmsKind::Pkcs11, None) => return Err(ConfigError::Pkcs11Missing),
            (_, Some(p)) => {
                if p.pin_env.is_some() == p.pin_file.is_some() {
                    return Err(ConfigError::Pkcs11Pin);
                }
                if p.module.is_empty() || p.token.is_empty() || p.key_label.is_empty() {
                    return Err(ConfigError::Pkcs11Empty);
                }
            }
            (KmsKind::File, None) => {}
        }
        Ok(())
    }
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Self, ConfigError> {
        raw.validate()
    }
}

impl Config {
    /// Reads, parses and validates `gateway.toml`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        RawConfig::read(path)?.validate()
    }

    /// What this configuration was built from (to change it: edit, then validate again).
    pub fn to_raw(&self) -> RawConfig {
        RawConfig {
            gateway: self.gateway.clone(),
            upstreams: self.upstreams.iter().map(|u| u.raw.clone()).collect(),
            groups: self.groups.clone(),
            rules: self.rules.clone(),
            did_web: self.did_web.clone(),
            pkcs11: self.pkcs11.clone(),
            node: self.node.clone(),
            cluster: self.cluster.clone(),
        }
    }

    /// `[gateway]` as written: the address and the limits. Durations and the oldest client
    /// version are also held parsed ([`Config::skew`], [`Config::min_client`], ...).
    pub fn gateway(&self) -> &Settings {
        &self.gateway
    }

    /// The upstreams, in file order.
    pub fn upstreams(&self) -> &[Upstream] {
        &self.upstreams
    }

    /// The upstream named `name` (the first, if two share it).
    pub fn upstream(&self, name: &str) -> Option<&Upstream> {
        self.upstreams.iter().find(|u| u.name() == name)
    }

    /// `[groups]`: group name -> member DIDs (each checked to parse).
    pub fn groups(&self) -> &BTreeMap<String, Vec<String>> {
        &self.groups
    }

    /// The `[[rule]]` list (empty when `policy_file` is given).
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// `[did_web]`.
    pub fn did_web(&self) -> &DidWeb {
        &self.did_web
    }

    /// `[cluster]`, when this node is a member of a cluster.
    pub fn cluster(&self) -> Option<&didgate_cluster::ClusterSettings> {
        self.cluster.as_ref()
    }

    /// `[node]`, when this gateway is one node of a gateway DID.
    pub fn node(&self) -> Option<&crate::node::NodeSettings> {
        self.node.as_ref()
    }

    /// `[pkcs11]`, when the master key is in a token.
    pub fn pkcs11(&self) -> Option<&Pkcs11Settings> {
        self.pkcs11.as_ref()
    }

    /// The oldest protocol version served (`min_client_version`).
    pub fn min_client(&self) -> Version {
        self.min_client
    }

    /// The accepted clock skew (`skew_secs`).
    pub fn skew(&self) -> Duration {
        self.skew
    }

    /// A grant's lifetime (`grant_ttl_secs`).
    pub fn grant_ttl(&self) -> Duration {
        self.grant_ttl
    }

    /// The default upstream timeout (`upstream_timeout_secs`).
    pub fn upstream_timeout(&self) -> Duration {
        self.upstream_timeout
    }

    /// How long a stream may take to deliver its first frame, then its body
    /// (`frame_timeout_secs`, at least one second).
    pub fn frame_timeout(&self) -> Duration {
        self.frame_timeout
    }

    /// The window over which refusals not recorded one by one are counted
    /// (`refusal_window_secs`).
    pub fn refusal_window(&self) -> Duration {
        self.refusal_window
    }

    /// How long a replaced secret version stays usable (`secret_grace_secs`).
    pub fn secret_grace(&self) -> Duration {
        self.secret_grace
    }

    /// When the gateway's chain writer signs checkpoints (`checkpoint_every_entries`,
    /// `checkpoint_every_secs`, each at least 1).
    pub fn checkpoint_policy(&self) -> didgate_audit::store::CheckpointPolicy {
        didgate_audit::store::CheckpointPolicy {
            every_entries: self.gateway.checkpoint_every_entries.max(1),
            every: Duration::from_secs(self.gateway.checkpoint_every_secs.max(1)),
        }
    }

    /// The token of `[gateway] kms = "pkcs11"` (`None` with the file KMS), its `pin_file`
    /// resolved against the data directory `dir`.
    pub fn token_config(&self, dir: &Path) -> Option<crate::pkcs11::TokenConfig> {
        match (self.gateway.kms, &self.pkcs11) {
            (KmsKind::Pkcs11, Some(p)) => Some(p.token_config(dir)),
            _ => None,
        }
    }
}

/// The commented template `didgated init` writes.
pub fn template(listen: SocketAddr) -> String {
    format!(
        r#"# didgate gateway configuration (specs/operation.md, "Gateway configuration").

[gateway]
# UDP address for QUIC.
listen = "{listen}"
# Accepted difference between a request's time and the gateway's clock, seconds.
skew_secs = 30
# Largest request body, bytes.
max_body = 1048576
# Lifetime of a grant, seconds.
grant_ttl_secs = 10
# Upstream timeout, seconds.
upstream_timeout_secs = 30
# Refusals to DIDs that policy does not know are counted into one audit entry per window.
refusal_window_secs = 10
# A DID's refusals of its own requests are one entry each up to this many per minute (0 = no
# limit); past it, and for a call ID refused before, they are counted in that entry.
refusal_entries_per_min = 60
# Oldest protocol version served (specs/protocol.md, "Format evolution"): 1 serves clients of
# every release; 2 refuses version 1 clients with a signed refusal that tells them to upgrade.
min_client_version = 1
# Signed checkpoints of the gateway's audit chain: every N entries, every T seconds while
# entries arrive, and at shutdown.
checkpoint_every_entries = 4096
checkpoint_every_secs = 60
# A secret replaced by `didgated secret rotate` stays usable this long, seconds, then is
# sealed off (its ciphertext deleted).
secret_grace_secs = 3600
# Policy in Cedar (specs/operation.md, "Policy"), relative to this directory. `didgated init`
# writes a commented example policies.cedar; check it with `didgated policy check FILE`, apply
# changes with `didgated policy reload` or SIGHUP. Without policy_file, the [[rule]] list below
# is the policy. An optional Cedar entities file (JSON) adds Did -> Group membership.
# policy_file = "policies.cedar"
# entities_file = "entities.json"
# Limits (specs/operation.md, "Limits and egress"). A call over a limit is refused
# `rate_limited` (audited) before it consumes a grant. Rates are token buckets: `burst` calls at
# once, refilled at `per_sec` per second; burst = 0 is unlimited, per_sec = 0 never refills.
rate_per_did = {{ burst = 1000, per_sec = 100 }}
rate_per_upstream = {{ burst = 0, per_sec = 0 }}
# Calls in flight (0 = unlimited).
max_concurrent_per_did = 64
max_concurrent_per_upstream = 1024
# Largest response body relayed, bytes (0 = unlimited); a larger one fails the call
# `response_too_large`.
max_response_bytes = 134217728
# Prometheus metrics at GET /metrics over HTTP (specs/operation.md, "Events and metrics"); absent
# = off. Unauthenticated: a loopback address unless metrics_allow_remote = true.
# metrics_listen = "127.0.0.1:9464"
# metrics_allow_remote = false

# Admission of new QUIC connections, before any handshake work (specs/operation.md, "Handshake
# floods"). Above retry_above_per_sec new connections a second (0: always), a connection whose
# address is not validated gets a QUIC Retry; a validated address (IPv4, or IPv6 /64) over one of
# the per-address limits is refused (counted `rate_limited` in the aggregate refusal entry).
[gateway.handshakes]
retry_above_per_sec = 100
max_in_flight_per_address = 16
max_open_per_address = 256
rate_per_address = {{ burst = 64, per_sec = 32 }}

# An upstream API. The secret is stored encrypted with `didgated secret add NAME` (stdin).
# auth: {{ kind = "bearer" }} | {{ kind = "basic", user = "U" }} | {{ kind = "header", name = "x-api-key" }}
#       | {{ kind = "query", name = "api_key" }}
# [[upstream]]
# name = "payments"
# base_url = "https://api.example.com"
# auth = {{ kind = "bearer" }}
# secret = "payments-key"
# allowed_hosts = ["api.example.com"]
# allow_headers = ["content-type", "accept"]
# A harmless GET that `didgated secret test payments-key` sends with the key injected.
# test_path = "/v1/balance"
# Egress: only allowed_hosts are reachable, no redirect is followed, and a host that is or
# resolves to a loopback, private, link-local or other non-public address is refused unless
# local = true (an upstream on this machine or a private network).
# local = false
# Per-upstream overrides of the [gateway] values (timeout, rate and concurrency of all calls to
# this upstream, response size), and limits per DID on this upstream:
# timeout_secs = 30
# rate_per_upstream = {{ burst = 100, per_sec = 25 }}
# max_concurrent_per_upstream = 32
# max_response_bytes = 10485760
# rate_per_did = {{ burst = 10, per_sec = 1 }}
# max_concurrent_per_did = 4

# Named groups of DIDs.
[groups]
# payers = ["did:key:z6Mk..."]

# Policy: default deny. Without policy_file, a rule allows principals (DIDs or group:NAME)
# some methods and path patterns (exact, `*` = one segment, final `**` = any remainder) on one
# upstream; the rules are translated into Cedar policies named rule-0, rule-1, ...
# [[rule]]
# principals = ["group:payers"]
# upstream = "payments"
# methods = ["GET", "POST"]
# paths = ["/v1/charges", "/v1/charges/*"]

# did:web callers (specs/protocol.md, "did:web callers"): documents are fetched over HTTPS only,
# and only for domains a policy names (principal Did::"did:web:example.com:agents:a1").
# [did_web]
# cache_ttl_secs = 300        # at most 3600; a key removed from the document stops working then
# timeout_secs = 5
"#
    )
}

/// Default `secret_grace_secs`: how long a retired secret version stays usable, seconds.
pub const DEFAULT_GRACE_SECS: u64 = 3600;

/// A token-bucket rate: at most `burst` calls at once, refilled at `per_sec` calls per second.
/// `burst = 0` means unlimited; `per_sec = 0` means the `burst` tokens are never refilled.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Bucket capacity: calls allowed back to back. 0 = unlimited.
    pub burst: u64,
    /// Refill rate, calls per second (fractions allowed; finite, 0 or more).
    pub per_sec: f64,
}

impl PartialEq for RateLimit {
    fn eq(&self, other: &Self) -> bool {
        self.burst == other.burst && self.per_sec.to_bits() == other.per_sec.to_bits()
    }
}

impl Eq for RateLimit {}

impl RateLimit {
    /// Whether this rate limits anything (`burst > 0`).
    pub fn is_limited(&self) -> bool {
        self.burst > 0
    }

    /// Checks the values: `per_sec` finite and not negative.
    pub fn validate(&self) -> Result<(), RateError> {
        if !self.per_sec.is_finite() || self.per_sec < 0.0 {
            return Err(RateError {
                per_sec: self.per_sec,
            });
        }
        Ok(())
    }
}

/// One named operation of an upstream (`[[upstream.operation]]` in `gateway.toml`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperationConfig {
    /// Name, unique within the upstream: 1 to 48 of `a-z A-Z 0-9 _ -`.
    pub name: String,
    /// HTTP method, upper case.
    pub method: String,
    /// Path template: a canonical path whose whole segments may be `{param}`.
    pub path: String,
    /// What it does (shown to callers and, through `didgate mcp`, to agents).
    #[serde(default)]
    pub description: String,
    /// A short human-readable name (the MCP tool's title): 1 to 128 bytes, one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Whether a call may destroy or overwrite data (`true`) or only reads or adds (`false`);
    /// unset: not said (MCP clients then assume a non-GET tool may be destructive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destructive: Option<bool>,
    /// Whether a call carries a body: `"required"`, `"optional"` or `"none"`; unset: required
    /// for POST, PUT and PATCH, none for GET, HEAD, DELETE, OPTIONS, TRACE and CONNECT,
    /// optional for other methods ([`BodyMode::default_for`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<BodyMode>,
    /// A JSON Schema for the body, as the text of a JSON object (in `gateway.toml`: an inline
    /// table, or a string holding the JSON); at most [`catalog::MAX_BODY_SCHEMA`] bytes.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "body_schema_text"
    )]
    pub body_schema: Option<String>,
}

/// Reads `body_schema` from a table or from a string holding a JSON object, as JSON text.
fn body_schema_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    use serde::de::Error;
    let bad = || {
        D::Error::custom(
            "body_schema must be an inline table or a string holding a JSON object (a JSON Schema)",
        )
    };
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(text) => match serde_json::from_str(&text) {
            Ok(serde_json::Value::Object(_)) => Ok(Some(text)),
            _ => Err(bad()),
        },
        serde_json::Value::Object(table) => {
            serde_json::to_string(&table).map(Some).map_err(|_| bad())
        }
        _ => Err(bad()),
    }
}

/// Largest description accepted, bytes (keeps one operation well inside a frame).
pub const MAX_DESCRIPTION: usize = catalog::MAX_DESCRIPTION;

/// Checks an upstream's operations: names valid and unique, methods upper-case ASCII letters,
/// path templates well formed, descriptions at most [`MAX_DESCRIPTION`] bytes, titles one
/// line, body schemas JSON objects, and no body schema for an operation without a body.
pub fn validate_operations(up: &RawUpstream) -> Result<(), OperationError> {
    let mut seen = std::collections::BTreeSet::new();
    for op in &up.operations {
        let at = |problem: OperationProblem| OperationError {
            upstream: up.name.clone(),
            operation: op.name.clone(),
            problem,
        };
        let template = |e: catalog::TemplateError| at(e.into());
        catalog::check_operation_name(&op.name).map_err(template)?;
        if !seen.insert(op.name.as_str()) {
            return Err(at(OperationProblem::DuplicateName));
        }
        if op.method.is_empty() || !op.method.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(at(OperationProblem::Method));
        }
        catalog::check_path_template(&op.path).map_err(template)?;
        if op.description.len() > MAX_DESCRIPTION {
            return Err(at(OperationProblem::Description));
        }
        if let Some(title) = &op.title {
            catalog::check_title(title).map_err(template)?;
        }
        if let Some(schema) = &op.body_schema {
            catalog::check_body_schema(schema).map_err(template)?;
            if op.body == Some(BodyMode::None) {
                return Err(at(OperationProblem::SchemaWithoutBody));
            }
            if op.body.is_none() && BodyMode::default_for(&op.method) == BodyMode::None {
                return Err(at(OperationProblem::SchemaForBodylessMethod {
                    method: op.method.clone(),
                }));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_upstream_is_what_a_table_naming_only_its_fields_gives() {
        let parsed: RawUpstream = toml::from_str(
            "name = \"stripe\"\nbase_url = \"https://api.stripe.com:443/v1\"\n\
             auth = { kind = \"bearer\" }\nsecret = \"stripe-key\"\n\
             allowed_hosts = [\"api.stripe.com\"]\n",
        )
        .expect("parses");
        assert_eq!(
            RawUpstream::new("stripe", "https://api.stripe.com:443/v1", "stripe-key"),
            parsed
        );
        assert!(
            RawUpstream::new("bad", "not a url", "k")
                .allowed_hosts
                .is_empty()
        );
    }

    #[test]
    fn template_parses() {
        let cfg: RawConfig = toml::from_str(&template("127.0.0.1:7443".parse().expect("addr")))
            .expect("template parses");
        let cfg = cfg.validate().expect("valid");
        assert!(cfg.rules().is_empty(), "default deny");
    }

    #[test]
    fn limit_keys_parse_with_defaults_and_overrides() {
        let text = r#"
[gateway]
listen = "127.0.0.1:7443"
rate_per_did = { burst = 5, per_sec = 0.5 }
max_concurrent_per_did = 2

[[upstream]]
name = "payments"
base_url = "https://api.example.com"
auth = { kind = "bearer" }
secret = "k"
allowed_hosts = ["api.example.com"]
rate_per_upstream = { burst = 100, per_sec = 25 }
rate_per_did = { burst = 3, per_sec = 0 }
max_response_bytes = 0
timeout_secs = 5

[[upstream]]
name = "local"
base_url = "http://127.0.0.1:8080"
auth = { kind = "bearer" }
secret = "k"
allowed_hosts = ["127.0.0.1"]
local = true
"#;
        let cfg: RawConfig = toml::from_str(text).expect("parses");
        cfg.clone().validate().expect("valid");
        let g = &cfg.gateway;
        assert_eq!(
            g.rate_per_did,
            RateLimit {
                burst: 5,
                per_sec: 0.5
            }
        );
        assert_eq!(g.rate_per_upstream.burst, 0, "unlimited by default");
        assert_eq!(
            (g.max_concurrent_per_did, g.max_concurrent_per_upstream),
            (2, 1024)
        );
        assert_eq!(g.max_response_bytes, 128 * 1024 * 1024);
        let up = &cfg.upstreams[0];
        assert!(!up.local, "local defaults to false");
        assert_eq!(
            up.rate_per_did,
            Some(RateLimit {
                burst: 3,
                per_sec: 0.0
            })
        );
        assert_eq!(up.max_response_bytes, Some(0));
        assert_eq!(up.timeout_secs, Some(5));
        assert!(cfg.upstreams[1].local);
        // what the harness and the demo write reads back the same
        let again: RawConfig =
            toml::from_str(&toml::to_string(&cfg).expect("serializes")).expect("reparses");
        assert_eq!(again, cfg);

        let bad = text.replace("per_sec = 0.5", "per_sec = -1");
        let cfg: RawConfig = toml::from_str(&bad).expect("parses");
        assert!(matches!(cfg.validate(), Err(ConfigError::Rate { .. })));
        let unknown = text.replace("local = true", "local = true\nburst = 3");
        assert!(
            toml::from_str::<RawConfig>(&unknown).is_err(),
            "unknown keys are refused"
        );
    }

    #[test]
    fn policy_file_excludes_rules() {
        let mut cfg: RawConfig = toml::from_str(&template("127.0.0.1:7443".parse().expect("addr")))
            .expect("template parses");
        cfg.gateway.policy_file = Some("policies.cedar".into());
        cfg.clone()
            .validate()
            .expect("a policy file alone is valid");
        cfg.rules.push(Rule {
            principals: vec![],
            upstream: "payments".into(),
            methods: vec![],
            paths: vec![],
        });
        cfg.upstreams
            .push(RawUpstream::new("payments", "https://api.example.com", "k"));
        assert!(matches!(
            cfg.clone().validate(),
            Err(ConfigError::PolicyFileAndRules)
        ));
        let text = toml::to_string(&cfg).expect("serializes");
        assert!(text.contains("policy_file = \"policies.cedar\""));
    }

    const BASE: &str = r#"
[gateway]
listen = "127.0.0.1:7443"
skew_secs = 45
grant_ttl_secs = 7
upstream_timeout_secs = 12
frame_timeout_secs = 0
refusal_window_secs = 20
secret_grace_secs = 90
min_client_version = 2

[[upstream]]
name = "payments"
base_url = "https://api.example.com:8443/v1"
auth = { kind = "bearer" }
secret = "k"
allowed_hosts = ["api.example.com"]
timeout_secs = 3

[groups]
payers = ["did:web:example.com"]

[[rule]]
principals = ["group:payers"]
upstream = "payments"
methods = ["GET"]
paths = ["/v1/**"]
"#;

    #[test]
    fn the_validated_config_holds_parsed_values() {
        let raw: RawConfig = toml::from_str(BASE).expect("parses");
        let cfg = Config::try_from(raw.clone()).expect("valid");
        let up = cfg.upstream("payments").expect("configured");
        let url: &Url = up.base_url();
        assert_eq!(url.host_str(), Some("api.example.com"));
        assert_eq!(url.port(), Some(8443));
        assert_eq!(url.path(), "/v1");
        assert_eq!(up.timeout(), Some(Duration::from_secs(3)));
        assert_eq!(cfg.skew(), Duration::from_secs(45));
        assert_eq!(cfg.grant_ttl(), Duration::from_secs(7));
        assert_eq!(cfg.upstream_timeout(), Duration::from_secs(12));
        assert_eq!(cfg.frame_timeout(), Duration::from_secs(1), "at least 1s");
        assert_eq!(cfg.refusal_window(), Duration::from_secs(20));
        assert_eq!(cfg.secret_grace(), Duration::from_secs(90));
        assert_eq!(cfg.min_client().as_u64(), 2);
        assert_eq!(cfg.to_raw(), raw, "what it was built from");
    }

    /// Tells whether an error is the one a bad input should give.
    type Check = fn(&ConfigError) -> bool;

    /// An edit of [`BASE`] (`FROM => TO`), the error it must give, and a fragment of its text.
    const BAD_INPUTS: &[(&str, Check, &str)] = &[
        (
            "min_client_version = 2 => min_client_version = 99",
            |e| matches!(e, ConfigError::MinClientVersion { value: 99 }),
            "min_client_version must be",
        ),
        (
            "secret_grace_secs = 90 => kms = \"pkcs11\"",
            |e| matches!(e, ConfigError::Pkcs11Missing),
            "needs a [pkcs11] table",
        ),
        (
            "[groups] => [pkcs11]\nmodule = \"m\"\ntoken = \"t\"\n[groups]",
            |e| matches!(e, ConfigError::Pkcs11Pin),
            "exactly one of pin_env and pin_file",
        ),
        (
            "[groups] => [pkcs11]\nmodule = \"\"\ntoken = \"t\"\npin_env = \"P\"\n[groups]",
            |e| matches!(e, ConfigError::Pkcs11Empty),
            "must not be empty",
        ),
        (
            "https://api.example.com:8443/v1 => https://",
            |e| {
                matches!(e, ConfigError::BaseUrl { upstream, .. } if upstream == "payments")
                    && std::error::Error::source(e).is_some()
            },
            "upstream payments: base_url: ",
        ),
        (
            "https://api.example.com:8443/v1 => ftp://api.example.com",
            |e| matches!(e, ConfigError::Scheme { .. }),
            "must be http or https",
        ),
        (
            "https://api.example.com:8443/v1 => https://evil.example",
            |e| matches!(e, ConfigError::HostNotAllowed { host, .. } if host == "evil.example"),
            "host evil.example of base_url is not in allowed_hosts",
        ),
        (
            "timeout_secs = 3 => test_path = \"/a?b\"",
            |e| matches!(e, ConfigError::TestPath { .. }),
            "test_path must start with '/'",
        ),
        (
            "8443/v1\" => 8443/v1/\"",
            |e| matches!(e, ConfigError::BaseUrlSlash { .. }),
            "must not end with '/'",
        ),
        (
            "timeout_secs = 3 => allow_headers = [\"x-http-method-override\"]",
            |e| matches!(e, ConfigError::OverrideHeader { header, .. } if header == "x-http-method-override"),
            "set allow_method_override = true",
        ),
        (
            "timeout_secs = 3 => [[upstream.operation]]\nname = \"a b\"\nmethod = \"GET\"\npath = \"/x\"",
            |e| {
                matches!(
                    e,
                    ConfigError::Operation(OperationError {
                        problem: OperationProblem::Template(_),
                        ..
                    })
                )
            },
            "upstream payments operation \"a b\": operation name",
        ),
        (
            "timeout_secs = 3 => [[upstream.operation]]\nname = \"a\"\nmethod = \"get\"\npath = \"/x\"",
            |e| {
                matches!(
                    e,
                    ConfigError::Operation(OperationError {
                        problem: OperationProblem::Method,
                        ..
                    })
                )
            },
            "method must be upper case",
        ),
        (
            "timeout_secs = 3 => rate_per_did = { burst = 1, per_sec = -1 }",
            |e| {
                matches!(
                    e,
                    ConfigError::Rate {
                        source: RateError { .. },
                        ..
                    }
                )
            },
            "upstream payments: per_sec must be a finite number >= 0, not -1",
        ),
        (
            "min_client_version = 2 => rate_per_did = { burst = 1, per_sec = nan }",
            |e| matches!(e, ConfigError::Rate { at, .. } if at.is_empty()),
            "per_sec must be a finite number >= 0, not NaN",
        ),
        (
            "[groups] => [gateway.handshakes]\nrate_per_address = { burst = 1, per_sec = -2 }\n[groups]",
            |e| matches!(e, ConfigError::Rate { .. }),
            "gateway.handshakes: per_sec must be",
        ),
        (
            "[groups] => [did_web]\ncache_ttl_secs = 3601\n[groups]",
            |e| matches!(e, ConfigError::DocTtl),
            "cache_ttl_secs is at most 3600",
        ),
        (
            "[groups] => [did_web]\ntimeout_secs = 0\n[groups]",
            |e| matches!(e, ConfigError::DidWebTimeout),
            "did_web.timeout_secs must be at least 1",
        ),
        (
            "min_client_version = 2 => metrics_listen = \"192.0.2.1:9464\"",
            |e| matches!(e, ConfigError::MetricsNotLoopback { .. }),
            "metrics_allow_remote",
        ),
        (
            "did:web:example.com\"] => not-a-did\"]",
            |e| {
                matches!(e, ConfigError::Member { group, .. } if group == "payers")
                    && std::error::Error::source(e).is_some()
            },
            "group payers: not-a-did: ",
        ),
        (
            "min_client_version = 2 => policy_file = \"p.cedar\"",
            |e| matches!(e, ConfigError::PolicyFileAndRules),
            "not both",
        ),
        (
            "upstream = \"payments\" => upstream = \"nope\"",
            |e| matches!(e, ConfigError::UnknownUpstream { rule: 0, upstream } if upstream == "nope"),
            "rule 0: unknown upstream nope",
        ),
        (
            "group:payers\"] => group:nope\"]",
            |e| matches!(e, ConfigError::UnknownGroup { rule: 0, group } if group == "nope"),
            "rule 0: unknown group nope",
        ),
        (
            "group:payers\"] => did:nope\"]",
            |e| {
                matches!(e, ConfigError::Principal { rule: 0, .. })
                    && std::error::Error::source(e).is_some()
            },
            "rule 0: did:nope: ",
        ),
    ];

    #[test]
    fn each_bad_input_is_refused_with_its_own_error() {
        fn err(edit: &str) -> ConfigError {
            let (from, to) = edit.split_once(" => ").expect("an edit");
            assert!(BASE.contains(from), "{from}");
            let raw: RawConfig = toml::from_str(&BASE.replacen(from, to, 1)).expect("parses");
            raw.validate().expect_err(edit)
        }
        for (edit, check, text) in BAD_INPUTS {
            let e = err(edit);
            assert!(check(&e), "{edit}: {e:?}");
            assert!(e.to_string().contains(text), "{edit}: {e}");
        }
    }

    #[test]
    fn read_and_parse_errors_carry_their_causes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.toml");
        let e = Config::load(&missing).expect_err("absent");
        assert!(matches!(&e, ConfigError::Read { path, .. } if *path == missing));
        assert!(e.to_string().starts_with("cannot read "), "{e}");
        let bad = dir.path().join("gateway.toml");
        std::fs::write(&bad, "[gateway]\nlisten = 3\n").expect("write");
        let e = Config::load(&bad).expect_err("bad type");
        assert!(matches!(&e, ConfigError::Parse { path, .. } if *path == bad));
        assert!(std::error::Error::source(&e).is_some());
    }
}

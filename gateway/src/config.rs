//! `gateway.toml`: listen address, limits, upstreams and policy rules (specs/protocol.md,
//! "Gateway configuration").

use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

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

/// One upstream API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
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
    /// Window over which refusals to unknown principals are counted into one entry, seconds.
    #[serde(default = "d_window")]
    pub refusal_window_secs: u64,
    /// Sign a checkpoint of the gateway's chain at least every this many entries.
    #[serde(default = "d_cp_entries")]
    pub checkpoint_every_entries: u64,
    /// ... and at least every this many seconds while entries are added (and at shutdown).
    #[serde(default = "d_cp_secs")]
    pub checkpoint_every_secs: u64,
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
            refusal_window_secs: d_window(),
            checkpoint_every_entries: d_cp_entries(),
            checkpoint_every_secs: d_cp_secs(),
        }
    }
}

fn d_cp_entries() -> u64 {
    4096
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
fn d_window() -> u64 {
    10
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address and limits.
    pub gateway: Settings,
    /// Upstream APIs.
    #[serde(default, rename = "upstream")]
    pub upstreams: Vec<Upstream>,
    /// Named groups of DIDs.
    #[serde(default)]
    pub groups: std::collections::BTreeMap<String, Vec<String>>,
    /// Policy rules (default deny).
    #[serde(default, rename = "rule")]
    pub rules: Vec<Rule>,
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Cannot read.
    #[error("cannot read {0}: {1}")]
    Read(String, std::io::Error),
    /// Not valid TOML for this schema.
    #[error("{0}: {1}")]
    Parse(String, String),
    /// Semantically invalid.
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// Loads and validates `gateway.toml`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(p.clone(), e))?;
        let cfg: Self = toml::from_str(&text).map_err(|e| ConfigError::Parse(p, e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks cross-references: rules name known upstreams and groups, DIDs parse, base URLs
    /// are http(s) with an allowed host.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |s: String| Err(ConfigError::Invalid(s));
        for u in &self.upstreams {
            let url = reqwest::Url::parse(&u.base_url)
                .map_err(|e| ConfigError::Invalid(format!("upstream {}: base_url: {e}", u.name)))?;
            if !matches!(url.scheme(), "http" | "https") {
                return bad(format!(
                    "upstream {}: base_url must be http or https",
                    u.name
                ));
            }
            let host = url.host_str().unwrap_or_default();
            if !u.allowed_hosts.iter().any(|h| h == host) {
                return bad(format!(
                    "upstream {}: host {host} of base_url is not in allowed_hosts",
                    u.name
                ));
            }
            if u.base_url.ends_with('/') {
                return bad(format!(
                    "upstream {}: base_url must not end with '/'",
                    u.name
                ));
            }
        }
        for (name, members) in &self.groups {
            for m in members {
                didgate_protocol::Did::parse(m)
                    .map_err(|e| ConfigError::Invalid(format!("group {name}: {m}: {e}")))?;
            }
        }
        for (i, r) in self.rules.iter().enumerate() {
            if !self.upstreams.iter().any(|u| u.name == r.upstream) {
                return bad(format!("rule {i}: unknown upstream {}", r.upstream));
            }
            for p in &r.principals {
                match p.strip_prefix("group:") {
                    Some(g) if !self.groups.contains_key(g) => {
                        return bad(format!("rule {i}: unknown group {g}"));
                    }
                    Some(_) => {}
                    None => {
                        didgate_protocol::Did::parse(p)
                            .map_err(|e| ConfigError::Invalid(format!("rule {i}: {p}: {e}")))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The upstream named `name`.
    pub fn upstream(&self, name: &str) -> Option<&Upstream> {
        self.upstreams.iter().find(|u| u.name == name)
    }
}

/// The commented template `didgated init` writes.
pub fn template(listen: SocketAddr) -> String {
    format!(
        r#"# didgate gateway configuration (specs/protocol.md, "Gateway configuration").

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
# Signed checkpoints of the gateway's audit chain: every N entries, every T seconds while
# entries arrive, and at shutdown.
checkpoint_every_entries = 4096
checkpoint_every_secs = 60

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

# Named groups of DIDs.
[groups]
# payers = ["did:key:z6Mk..."]

# Policy: default deny. A rule allows principals (DIDs or group:NAME) some methods and path
# patterns (exact, `*` = one segment, final `**` = any remainder) on one upstream.
# [[rule]]
# principals = ["group:payers"]
# upstream = "payments"
# methods = ["GET", "POST"]
# paths = ["/v1/charges", "/v1/charges/*"]
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_parses() {
        let cfg: Config = toml::from_str(&template("127.0.0.1:7443".parse().expect("addr")))
            .expect("template parses");
        cfg.validate().expect("valid");
        assert!(cfg.rules.is_empty(), "default deny");
    }
}

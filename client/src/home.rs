//! A client's home directory: where its identity, pinned gateway, chains and proxy files live
//! (specs/client-tools.md), the layout the `didgate` binary, the proxy, the MCP server and an
//! embedding agent share.
//!
//! The layout:
//!
//! - `identity`: the client's private identity (mode 0600, [`crate::identity`]);
//! - `config.toml`: the pinned gateway, `gateway = "ADDR"` and `gateway_did = "did:key:..."`
//!   ([`Home::pin`], [`Home::pinned`]);
//! - `chain/`: the client's own audit chain (every call is recorded before it is sent);
//! - `chain.sock`: while a process of this home holds `chain/`, the socket through which the
//!   home's other processes make their calls ([`crate::local`]);
//! - `chains/N`: fallback chains, for a process that holder could not serve;
//! - `proxy-token`: the local proxy's token (mode 0600, kept across starts);
//! - `proxy-url`: the running proxy's URL (while it runs).
//!
//! This module reads and writes `config.toml` and reads the identity; it never prompts (a
//! sealed identity's passphrase comes from the caller: [`Home::identity`],
//! [`Home::identity_with`]) and never changes file modes (see [`crate::hardening`]). A client
//! is made from a home by [`crate::Client::from_home`], or, sharing the home's chain with its
//! other processes, [`crate::local::Caller::from_home`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use didgate_client::{CallSpec, Home};
//! let home = Home::from_env(None)?; // DIDGATE_HOME, else $HOME/.didgate
//! let identity = home.identity(None)?; // a sealed one needs Some(passphrase)
//! let pin = home.pinned()?.ok_or("no gateway pinned: run `didgate pin`")?;
//! let client = didgate_client::Client::from_home(&home, identity, &pin).await?;
//! let answer = client.call(CallSpec::new("payments", "GET", "/v1/balance")).await?;
//! println!("{}", answer.status);
//! client.close().await;
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use didgate_protocol::did::DidError;
use didgate_protocol::{Did, Identity};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use didgate_io::identity::{self, IdentityError};

/// The environment variable naming the home directory (before the default).
pub const HOME_ENV: &str = "DIDGATE_HOME";
/// The identity file, in the home.
pub const IDENTITY: &str = "identity";
/// The pinned gateway, in the home.
pub const CONFIG: &str = "config.toml";
/// The home's chain.
pub const CHAIN: &str = "chain";
/// Where fallback chains live in the home (`chains/1`, `chains/2`, ...).
pub const FALLBACK_CHAINS: &str = "chains";
/// How many fallback chains a home may have.
pub const MAX_FALLBACK: u32 = 16;
/// The socket of the process holding the home's chain, in the home.
pub const SOCKET: &str = "chain.sock";
/// The local proxy's token file, in the home.
pub const PROXY_TOKEN: &str = "proxy-token";
/// The running proxy's URL, in the home.
pub const PROXY_URL: &str = "proxy-url";

/// The gateway a client trusts: its address and the DID its certificate must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    /// The gateway's UDP address.
    pub addr: SocketAddr,
    /// The gateway's DID.
    pub did: Did,
}

/// `config.toml` as written: each part optional (a file written by hand may pin one only).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Config {
    /// The gateway's UDP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gateway: Option<String>,
    /// The gateway's DID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gateway_did: Option<String>,
}

/// Why the home, its pinned gateway or its identity could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HomeError {
    /// No home was given, `DIDGATE_HOME` is not set, and neither is `HOME`.
    #[error("HOME is not set; give a home directory or set DIDGATE_HOME")]
    NoHome,
    /// `config.toml` exists but could not be read.
    #[error("cannot read {path}: {source}")]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `config.toml` is not valid TOML of the expected shape.
    #[error("invalid {path}: {source}")]
    ParseConfig {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: toml::de::Error,
    },
    /// The pinned address is not `IP:PORT`.
    #[error("invalid gateway in {path} {text:?}: {source} (expected IP:PORT, e.g. 127.0.0.1:7443)")]
    PinnedAddr {
        /// The file.
        path: PathBuf,
        /// The address as written.
        text: String,
        /// Why.
        #[source]
        source: std::net::AddrParseError,
    },
    /// The pinned DID is not a did:key.
    #[error("invalid gateway_did in {path} {text:?}: {source}")]
    PinnedDid {
        /// The file.
        path: PathBuf,
        /// The DID as written.
        text: String,
        /// Why.
        #[source]
        source: DidError,
    },
    /// No address was given and `config.toml` pins none.
    #[error("no gateway address: none given, and no `gateway` in {path}")]
    NoGatewayAddr {
        /// The file.
        path: PathBuf,
    },
    /// No DID was given and `config.toml` pins none.
    #[error("no gateway DID: none given, and no `gateway_did` in {path}")]
    NoGatewayDid {
        /// The file.
        path: PathBuf,
    },
    /// The pin could not be encoded.
    #[error("cannot encode config.toml: {0}")]
    EncodeConfig(#[source] toml::ser::Error),
    /// The home directory could not be created.
    #[error("cannot create home directory {path}: {source}")]
    CreateHome {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `config.toml` could not be written.
    #[error("cannot write {path}: {source}")]
    WriteConfig {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The home has no identity file yet.
    #[error("no identity at {path}")]
    NoIdentity {
        /// Where it would be.
        path: PathBuf,
    },
    /// The identity file could not be used (mode, format, passphrase).
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// A client's home directory (module docs). Making one touches no file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Home {
    dir: PathBuf,
}

impl Home {
    /// The home at `dir` (created by the first write into it).
    pub fn open(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The home at `flag` if given, else at `DIDGATE_HOME` if set, else `$HOME/.didgate`.
    pub fn from_env(flag: Option<PathBuf>) -> Result<Self, HomeError> {
        if let Some(dir) = flag {
            return Ok(Self::open(dir));
        }
        if let Some(dir) = std::env::var_os(HOME_ENV).filter(|d| !d.is_empty()) {
            return Ok(Self::open(dir));
        }
        match std::env::var_os("HOME") {
            Some(h) if !h.is_empty() => Ok(Self::open(PathBuf::from(h).join(".didgate"))),
            _ => Err(HomeError::NoHome),
        }
    }

    /// The home directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The identity file.
    pub fn identity_path(&self) -> PathBuf {
        self.dir.join(IDENTITY)
    }

    /// The pinned gateway's file, `config.toml`.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join(CONFIG)
    }

    /// The newest revocation list of the pinned gateway's nodes this home has seen
    /// (`node-revocations.cose`, kept by [`crate::Client::from_home`]).
    pub fn node_revocations(&self) -> PathBuf {
        self.dir.join("node-revocations.cose")
    }

    /// The home's chain.
    pub fn chain_dir(&self) -> PathBuf {
        self.dir.join(CHAIN)
    }

    /// Where fallback chains live (`chains/1`, `chains/2`, ...).
    pub fn fallback_chains_dir(&self) -> PathBuf {
        self.dir.join(FALLBACK_CHAINS)
    }

    /// The socket of the process holding the chain.
    pub fn socket_path(&self) -> PathBuf {
        self.dir.join(SOCKET)
    }

    /// The local proxy's token file.
    pub fn token_path(&self) -> PathBuf {
        self.dir.join(PROXY_TOKEN)
    }

    /// The file where a running proxy writes its URL.
    pub fn proxy_url_path(&self) -> PathBuf {
        self.dir.join(PROXY_URL)
    }

    /// Pins the gateway `did` at `addr`: writes `config.toml` (creating the home if needed),
    /// replacing any earlier pin. Returns the file written.
    pub fn pin(&self, addr: SocketAddr, did: &Did) -> Result<PathBuf, HomeError> {
        let config = Config {
            gateway: Some(addr.to_string()),
            gateway_did: Some(did.to_string()),
        };
        let text = toml::to_string(&config).map_err(HomeError::EncodeConfig)?;
        std::fs::create_dir_all(&self.dir).map_err(|source| HomeError::CreateHome {
            path: self.dir.clone(),
            source,
        })?;
        let path = self.config_path();
        std::fs::write(&path, text).map_err(|source| HomeError::WriteConfig {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    /// The pinned gateway; `None` if nothing is pinned (no `config.toml`). A file that pins
    /// only one of the two is an error ([`Home::resolve`] accepts it with the other given).
    pub fn pinned(&self) -> Result<Option<Pin>, HomeError> {
        if self.read_config()?.is_none() {
            return Ok(None);
        }
        self.resolve(None, None).map(Some)
    }

    /// The gateway to use: `addr` and `did` where given, each missing one from `config.toml`
    /// (not read when both are given).
    pub fn resolve(&self, addr: Option<SocketAddr>, did: Option<Did>) -> Result<Pin, HomeError> {
        let config = if addr.is_some() && did.is_some() {
            Config::default()
        } else {
            self.read_config()?.unwrap_or_default()
        };
        let path = self.config_path();
        let addr = match (addr, config.gateway) {
            (Some(addr), _) => addr,
            (None, Some(text)) => match text.trim().parse() {
                Ok(addr) => addr,
                Err(source) => return Err(HomeError::PinnedAddr { path, text, source }),
            },
            (None, None) => return Err(HomeError::NoGatewayAddr { path }),
        };
        let did = match (did, config.gateway_did) {
            (Some(did), _) => did,
            (None, Some(text)) => match Did::parse(text.trim()) {
                Ok(did) => did,
                Err(source) => return Err(HomeError::PinnedDid { path, text, source }),
            },
            (None, None) => return Err(HomeError::NoGatewayDid { path }),
        };
        Ok(Pin { addr, did })
    }

    /// `config.toml`, `None` if there is none.
    fn read_config(&self) -> Result<Option<Config>, HomeError> {
        let path = self.config_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(HomeError::ReadConfig { path, source }),
        };
        match toml::from_str(&text) {
            Ok(config) => Ok(Some(config)),
            Err(source) => Err(HomeError::ParseConfig { path, source }),
        }
    }

    /// The home's identity, opened with `passphrase` if it is sealed (without one, a sealed
    /// identity is [`IdentityError::NeedsPassphrase`]).
    pub fn identity(&self, passphrase: Option<&str>) -> Result<Identity, HomeError> {
        let path = self.identity_path();
        identity::load_with_passphrase(&path, passphrase).map_err(|e| self.identity_error(e))
    }

    /// The home's identity; if it is sealed, `passphrase` is asked for the passphrase of the
    /// file it is given (a prompt, an environment variable), and only then.
    pub fn identity_with<E: From<HomeError>>(
        &self,
        passphrase: impl FnOnce(&Path) -> Result<Zeroizing<String>, E>,
    ) -> Result<Identity, E> {
        let path = self.identity_path();
        let loaded = match identity::load(&path) {
            Err(IdentityError::NeedsPassphrase(_)) => {
                let pass = passphrase(&path)?;
                identity::load_with_passphrase(&path, Some(&pass))
            }
            other => other,
        };
        loaded.map_err(|e| E::from(self.identity_error(e)))
    }

    /// A missing identity file is [`HomeError::NoIdentity`].
    fn identity_error(&self, e: IdentityError) -> HomeError {
        match e {
            IdentityError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                HomeError::NoIdentity {
                    path: self.identity_path(),
                }
            }
            other => HomeError::Identity(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_reads_back_as_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::open(dir.path().join("home"));
        assert!(home.pinned().expect("no file is no pin").is_none());
        let did = Identity::from_seed(&[7; 32]).did().clone();
        let addr: SocketAddr = "127.0.0.1:7443".parse().expect("addr");
        let path = home.pin(addr, &did).expect("pin");
        assert_eq!(path, home.config_path());
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(
            text,
            format!("gateway = \"127.0.0.1:7443\"\ngateway_did = \"{did}\"\n")
        );
        assert_eq!(home.pinned().expect("pinned"), Some(Pin { addr, did }));
    }

    #[test]
    fn a_given_part_overrides_the_file_and_a_missing_one_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::open(dir.path());
        std::fs::write(home.config_path(), "gateway = \"127.0.0.1:1\"\n").expect("write");
        let did = Identity::from_seed(&[8; 32]).did().clone();
        let pin = home.resolve(None, Some(did.clone())).expect("resolve");
        assert_eq!(pin.addr, "127.0.0.1:1".parse().expect("addr"));
        assert!(matches!(home.pinned(), Err(HomeError::NoGatewayDid { .. })));
        std::fs::write(home.config_path(), "gateway = \"nowhere\"\n").expect("write");
        let e = home.resolve(None, Some(did)).expect_err("bad address");
        assert!(matches!(e, HomeError::PinnedAddr { .. }), "{e:?}");
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn a_missing_identity_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::open(dir.path());
        assert!(matches!(
            home.identity(None),
            Err(HomeError::NoIdentity { .. })
        ));
    }
}

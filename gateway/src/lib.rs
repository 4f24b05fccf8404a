//! The didgate gateway: QUIC server with mutual DID authentication, canonical-request checks,
//! policy, single-use grants recorded atomically with their audit entry, a local KMS with
//! just-in-time decryption, and the upstream executor. `didgated` is a thin binary over it.
//!
//! Owns: the data directory ([`gateway::DataDir`]), `gateway.toml` ([`config`]), the policy
//! decision ([`policy`]), keys at rest ([`kms`]), the per-call pipeline and server
//! ([`gateway`]), the upstream executor ([`upstream`]), the demo ([`demo`]) and its local
//! payments upstream ([`upstream_demo`]). It does not own the wire format (didgate-protocol)
//! or the audit log format (didgate-audit).
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = std::path::Path::new("/var/lib/didgate");
//! let gw = std::sync::Arc::new(didgate_gateway::gateway::Gateway::open(dir).await?);
//! let endpoint = didgate_gateway::gateway::endpoint(&gw, gw.config().gateway.listen)?;
//! didgate_gateway::gateway::serve(gw, endpoint, async { let _ = tokio::signal::ctrl_c().await; }).await;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
pub mod control;
pub mod demo;
pub mod gateway;
pub mod kms;
pub mod policy;
pub mod upstream;
pub mod upstream_demo;

use std::net::SocketAddr;
use std::path::Path;

use didgate_audit::store::Store;
use didgate_protocol::{Did, Identity};

pub use gateway::{Gateway, serve};

/// Milliseconds since the Unix epoch by the system clock.
pub fn now_ms() -> u64 {
    didgate_client::now_ms()
}

/// Why `init` or a secret command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The data directory already holds a gateway.
    #[error("{0} already holds a gateway identity; refusing to overwrite it")]
    Exists(String),
    /// I/O.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// Identity.
    #[error(transparent)]
    Identity(#[from] didgate_client::identity::IdentityError),
    /// KMS.
    #[error(transparent)]
    Kms(#[from] kms::KmsError),
    /// Store.
    #[error(transparent)]
    Store(#[from] didgate_audit::StoreError),
    /// Configuration.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// Bad input.
    #[error("{0}")]
    Invalid(String),
}

/// `didgated init`: creates the identity (0600), the master key (0600), the store and a
/// commented `gateway.toml`. Returns the gateway DID.
pub fn init(dir: &Path, listen: SocketAddr) -> Result<Did, AdminError> {
    let d = gateway::DataDir::new(dir);
    if d.identity().exists() {
        return Err(AdminError::Exists(dir.display().to_string()));
    }
    std::fs::create_dir_all(dir).map_err(|e| AdminError::Io(dir.display().to_string(), e))?;
    let identity = Identity::generate();
    didgate_client::identity::create(&d.identity(), &identity)?;
    kms::LocalKms::create(&d.master_key())?;
    drop(Store::open(&d.store(), gateway::SPACES)?);
    if !d.config().exists() {
        std::fs::write(d.config(), config::template(listen))
            .map_err(|e| AdminError::Io(d.config().display().to_string(), e))?;
    }
    Ok(identity.did().clone())
}

/// `didgated secret add`: seals `plaintext` under a fresh data key and stores only the
/// ciphertext and display form. Opens the store directly: the daemon must not be running.
pub fn add_secret(
    dir: &Path,
    name: &str,
    plaintext: &str,
) -> Result<kms::SecretRecord, AdminError> {
    if name.is_empty()
        || name.len() > 128
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(AdminError::Invalid(
            "secret names use letters, digits, '-', '_' and '.'".into(),
        ));
    }
    if plaintext.is_empty() {
        return Err(AdminError::Invalid(
            "the secret read from stdin is empty".into(),
        ));
    }
    let d = gateway::DataDir::new(dir);
    let kms = kms::LocalKms::load(&d.master_key())?;
    let record = kms::SecretRecord::seal(&kms, name, plaintext)?;
    let store = Store::open(&d.store(), gateway::SPACES)?;
    if store.get(gateway::SECRETS, name.as_bytes())?.is_some() {
        return Err(AdminError::Invalid(format!(
            "secret {name} exists (rotation comes with `secret rotate`)"
        )));
    }
    store.write(
        &[(gateway::SECRETS, name.as_bytes().to_vec(), record.encode())],
        &[],
    )?;
    Ok(record)
}

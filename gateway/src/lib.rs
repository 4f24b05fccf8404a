//! The didgate gateway: QUIC server with mutual DID authentication, canonical-request checks,
//! policy, single-use grants recorded atomically with their audit entry, a local KMS with
//! just-in-time decryption, and the upstream executor. `didgated` is a thin binary over it.
//!
//! Owns: the data directory ([`gateway::DataDir`]), `gateway.toml` ([`config`]), the policy
//! decision ([`policy`]), keys at rest ([`kms`]) and their lifecycle ([`secrets`]), the per-call pipeline and server
//! ([`gateway`]), the upstream executor ([`upstream`]), live events ([`events`]) and Prometheus
//! metrics ([`metrics`]). It does not own the wire format (didgate-protocol), the shared I/O
//! (didgate-io: TLS binding, framing, identity files, hardening, the clock), the audit log
//! format (didgate-audit), or the daemon's command line and the demo (didgate-daemon).
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

pub mod catalog;
pub mod config;
pub mod control;
pub mod didweb;
pub mod echo;
pub mod events;
pub mod gateway;
pub mod kms;
pub mod limits;
pub mod metrics;
pub mod policy;
pub mod secrets;
pub mod upstream;

use std::net::SocketAddr;
use std::path::Path;

use didgate_audit::store::Store;
use didgate_protocol::{Did, Identity};

pub use gateway::{Gateway, serve};

/// Milliseconds since the Unix epoch by the system clock.
pub fn now_ms() -> u64 {
    didgate_io::now_ms()
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
    Identity(#[from] didgate_io::identity::IdentityError),
    /// KMS.
    #[error(transparent)]
    Kms(#[from] kms::KmsError),
    /// Store.
    #[error(transparent)]
    Store(#[from] didgate_audit::StoreError),
    /// Configuration.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// Secret lifecycle.
    #[error(transparent)]
    Secrets(#[from] secrets::SecretError),
    /// Bad input.
    #[error("{0}")]
    Invalid(String),
    /// The data directory may be written by others, or its modes cannot be tightened.
    #[error("data directory: {0}")]
    DataDir(#[from] didgate_io::hardening::HardeningError),
}

/// `didgated init`: creates the identity (0600), the master key (0600), the store, a
/// commented `gateway.toml` and an example `policies.cedar` (not referenced until
/// `policy_file` names it). Returns the gateway DID.
pub fn init(dir: &Path, listen: SocketAddr) -> Result<Did, AdminError> {
    let d = gateway::DataDir::new(dir);
    if d.identity().exists() {
        return Err(AdminError::Exists(dir.display().to_string()));
    }
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| AdminError::Io(dir.display().to_string(), e))?;
    }
    // every file below is created private whatever the caller's umask
    private_data_dir(dir)?;
    let identity = Identity::generate();
    didgate_io::identity::create(&d.identity(), &identity)?;
    kms::LocalKms::create(&d.master_key())?;
    drop(Store::open(&d.store(), gateway::SPACES)?);
    if !d.config().exists() {
        std::fs::write(d.config(), config::template(listen))
            .map_err(|e| AdminError::Io(d.config().display().to_string(), e))?;
    }
    let policies = dir.join(policy::TEMPLATE_FILE);
    if !policies.exists() {
        std::fs::write(&policies, policy::template())
            .map_err(|e| AdminError::Io(policies.display().to_string(), e))?;
    }
    // what was created under a looser umask (an embedding process) is made private too
    private_data_dir(dir)?;
    Ok(identity.did().clone())
}

/// The key files of a data directory: left as they are by [`private_data_dir`], so that their
/// loaders refuse them when others could read them.
pub const KEY_FILES: &[&str] = &["identity", "master.key"];

/// Refuses a data directory that group or others may write to, and removes the group and
/// other permission bits of everything in it but its key files, logging each change
/// (specs/threat-model.md).
pub fn private_data_dir(dir: &Path) -> Result<(), didgate_io::hardening::HardeningError> {
    for (path, old, new) in didgate_io::hardening::private_dir(dir, KEY_FILES)? {
        tracing::warn!(path = %path.display(), "tightened mode {old:o} -> {new:o} (readable by others before)");
    }
    Ok(())
}

/// `didgated secret add` on the store directly (no daemon may run; the `didgated` command goes
/// through the control socket when one does): seals `plaintext` under a fresh data key as
/// version 1 and stores only the ciphertext and display form.
pub fn add_secret(
    dir: &Path,
    name: &str,
    plaintext: &str,
) -> Result<secrets::SecretInfo, AdminError> {
    let opened = secrets::open_dir(dir)?;
    Ok(opened.secrets.add(name, plaintext, now_ms())?)
}

//! The gateway's data directory: where each file is ([`DataDir`]), the store's keyspaces
//! besides the chain's own ([`SPACES`]), and the rule that keeps the directory private
//! ([`private_data_dir`]). A leaf: it imports no other module of this crate.

use std::path::{Path, PathBuf};

/// Keyspace of the claims that matter until a deadline, keyed deadline (u64be ms) || tag || id
/// so that the expired ones are the keyspace's head: `c` || call ID and `n` || DID key || nonce
/// (replay keys, until the request's time plus the skew window) -> empty; `g` || grant id (a
/// consumed grant, until the grant's expiry) -> call ID. Keys of releases before this one
/// (`c` || call ID, `n` || DID key || nonce -> expiry) are re-keyed at start-up.
pub const REPLAY: &str = "replay";
/// Keyspace of issued two-step grants: expiry (u64be ms) || `i` || grant id -> the request
/// (`crate::gateway`). Keys of releases before this one (`i` || grant id; and `c` || grant id,
/// a consumed grant) are re-keyed or dropped at start-up.
pub const GRANTS: &str = "grants";
/// Keyspace of client heads seen: signer key (32) || chain id || seq (u64be) -> hash.
pub const HEADS: &str = "heads";
/// Keyspace of secrets: name -> `crate::secrets::SecretRecord`.
pub const SECRETS: &str = "secrets";
/// Keyspace of the secret lifecycle's marks: `snapshot` -> when the snapshot entry of the
/// stored secrets was written (u64be ms; see `crate::secrets`, "Audit").
pub const LIFECYCLE: &str = "lifecycle";
/// Keyspace of revocations: `d` || DID text, or `g` || grant id -> reason (UTF-8).
pub const REVOKED: &str = "revoked";
/// Keyspace of did:web documents that decided calls: document hash -> the exact bytes served
/// (kept beside the chain for auditors; entries record the hash in `did_doc`).
pub const DOCUMENTS: &str = didgate_audit::store::DOCUMENTS;
/// Every keyspace of the gateway's store besides the chain's own.
pub const SPACES: &[&str] = &[
    REPLAY, GRANTS, HEADS, SECRETS, LIFECYCLE, REVOKED, DOCUMENTS,
];

/// Files of a gateway data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// The data directory at `root`.
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }
    /// `gateway.toml`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `gateway.toml`.
    pub fn config(&self) -> PathBuf {
        self.root.join("gateway.toml")
    }
    /// The gateway identity (mode 0600).
    pub fn identity(&self) -> PathBuf {
        self.root.join("identity")
    }
    /// The local KMS master key (mode 0600).
    pub fn master_key(&self) -> PathBuf {
        self.root.join("master.key")
    }
    /// The store.
    pub fn store(&self) -> PathBuf {
        self.root.join("store")
    }
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

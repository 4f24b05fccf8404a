//! didgate's audit chains: the hash-chained, append-only log on an embedded store, and the
//! verifier that checks chains against each other.
//!
//! Owns: entries and their hashes ([`entry`]), the thin store type over fjall and the chain
//! writer with group commit ([`store`]), the pure verifier ([`verify`]), and the node revocation
//! lists and signer rule its checks apply ([`nodes`]). It does not own what a call is (the
//! gateway and client decide what to append) or any network I/O.
//! The byte-level format is `specs/audit-log.md`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use didgate_audit::{entry::{Entry, EntryKind, Role}, store::{Chain, Store}};
//! let me = std::sync::Arc::new(didgate_protocol::Identity::generate());
//! let store = Store::open(std::path::Path::new("/tmp/chain"), &[])?;
//! let chain = Chain::open(store, me, Role::Client, 0, Default::default())?;
//! let appended = chain.append_entry(Entry::new(EntryKind::Result, 1)).await?;
//! println!("entry {} is durable", appended.entry.seq);
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod entry;
pub mod evidence;
pub mod export;
pub mod merkle;
pub mod nodes;
pub mod receipt;
mod space;
pub mod store;
pub mod verify;

use std::path::{Path, PathBuf};

pub use store::{Chain, Store, StoreError};
pub use verify::{ChainRecords, Report, UnknownOutcome, Violation, ViolationKind};

/// The store directory for a path given on a command line: `PATH/store` when PATH is a
/// gateway data directory, `PATH/chain` when it is a client home (`DIDGATE_HOME`, `--home`),
/// else PATH itself.
pub fn store_dir(path: &Path) -> PathBuf {
    ["store", "chain"]
        .iter()
        .map(|inner| path.join(inner))
        .find(|inner| inner.join("version").is_file())
        .unwrap_or_else(|| path.to_path_buf())
}

/// A client home's fallback chains (`chains/N` holding a store, in name order): those a
/// process of the home used when the process holding `chain/` could not make its calls
/// (`didgate_client::local`). Empty when there are none or `home` is not a directory.
pub fn fallback_chains(home: &Path) -> Vec<PathBuf> {
    let Ok(dir) = std::fs::read_dir(home.join("chains")) else {
        return Vec::new();
    };
    let mut chains: Vec<PathBuf> = dir
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("version").is_file())
        .collect();
    chains.sort();
    chains
}

/// Why a chain could not be loaded for verification.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The store failed to open or read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The export file is unreadable or malformed.
    #[error(transparent)]
    Export(#[from] export::ExportError),
    /// Neither an export file nor a store.
    #[error("{0} is neither an export file nor a store")]
    NotFound(String),
}

/// Reads every entry, checkpoint and the recorded head of a chain: an export file, or the store
/// at `path` (see [`store_dir`]), which the owning process must not hold open.
pub fn load_records(path: &Path) -> Result<ChainRecords, LoadError> {
    let label = path.display().to_string();
    if path.is_file() {
        return Ok(export::import(path, &label)?);
    }
    let dir = store_dir(path);
    if !dir.join("version").is_file() {
        return Err(LoadError::NotFound(label));
    }
    let store = Store::open(&dir, &[])?;
    let entries = store.entries().collect::<Result<Vec<_>, _>>()?;
    let head = store.head()?;
    let checkpoints = store.checkpoints()?;
    let documents = store.documents()?;
    Ok(ChainRecords {
        label,
        entries,
        head,
        checkpoints,
        documents,
        sealed: false,
    })
}

//! didgate's audit chains: the hash-chained, append-only log on an embedded store, and the
//! verifier that checks chains against each other.
//!
//! Owns: entries and their hashes ([`entry`]), the thin store type over fjall and the chain
//! writer with group commit ([`store`]), and the pure verifier ([`verify`]). It does not own
//! what a call is (the gateway and client decide what to append) or any network I/O.
//! The byte-level format is `specs/audit-log.md`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use didgate_audit::{entry::{Entry, EntryKind, Role}, store::{Chain, Store}};
//! let me = didgate_protocol::Identity::generate();
//! let store = Store::open(std::path::Path::new("/tmp/chain"), &[])?;
//! let chain = Chain::open(store, me.did(), Role::Client, 0)?;
//! let appended = chain.append_entry(Entry::new(EntryKind::Result, 1)).await?;
//! println!("entry {} is durable", appended.entry.seq);
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod entry;
pub mod merkle;
pub mod store;
pub mod verify;

use std::path::{Path, PathBuf};

pub use store::{Chain, Store, StoreError};
pub use verify::{ChainRecords, Report, Violation, ViolationKind};

/// The store directory for a path given on a command line: `PATH/store` when PATH is a
/// gateway or client data directory, else PATH itself.
pub fn store_dir(path: &Path) -> PathBuf {
    let inner = path.join("store");
    if inner.is_dir() {
        inner
    } else {
        path.to_path_buf()
    }
}

/// Reads every entry and the recorded head of the chain stored at `path` (see
/// [`store_dir`]). Opens the store, so its owning process must not be running.
pub fn load_records(path: &Path) -> Result<ChainRecords, StoreError> {
    let dir = store_dir(path);
    if !dir.join("version").is_file() {
        return Err(StoreError::Corrupt {
            seq: 0,
            why: format!("{} is not a store", dir.display()),
        });
    }
    let store = Store::open(&dir, &[])?;
    let entries = store.entries().collect::<Result<Vec<_>, _>>()?;
    let head = store.head()?;
    Ok(ChainRecords {
        label: path.display().to_string(),
        entries,
        head,
    })
}

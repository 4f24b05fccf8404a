//! Export files (specs/audit-log.md, "Export files"): one chain as a CBOR sequence (RFC 8742)
//! of items: a header, every entry in seq order, every signed checkpoint, every did:web
//! document kept beside the chain, the recorded head, and an end item with counts, so a
//! truncated file is detected.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use didgate_protocol::cbor::fixed_opt;
use didgate_protocol::message::EntryRef;
use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError};
use crate::verify::ChainRecords;

/// Why an export could not be written or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// File I/O.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An item does not decode or is out of place.
    #[error("export item {index} is malformed: {why}")]
    Malformed {
        /// Zero-based item index.
        index: u64,
        /// Why.
        why: String,
    },
    /// The file ends before its end item, or the counts disagree.
    #[error("export is truncated: {0}")]
    Truncated(String),
    /// A sealed export was asked for but the last checkpoint does not cover the last entry.
    #[error("the chain is not sealed: its last checkpoint covers {covered} entries of {size}")]
    NotSealed {
        /// Entries the last checkpoint covers.
        covered: u64,
        /// Entries in the chain.
        size: u64,
    },
}

/// One item of the sequence; `t` says which fields are present.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Item {
    /// "header", "entry", "checkpoint", "head" or "end".
    t: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    v: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(
        default,
        with = "didgate_protocol::cbor::bytes_opt",
        skip_serializing_if = "Option::is_none"
    )]
    bytes: Option<Vec<u8>>,
    #[serde(default, with = "fixed_opt", skip_serializing_if = "Option::is_none")]
    hash: Option<[u8; 32]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    entries: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    checkpoints: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    documents: Option<u64>,
    /// End item: the writer sealed the chain before exporting it (its last checkpoint covers
    /// its last entry); absent in exports that copy a store as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sealed: Option<bool>,
}

const FORMAT: &str = "didgate-audit-export";

/// Writes the chain in `store` to `out` as it is; returns (entries, checkpoints) written.
pub fn export(store: &Store, out: &Path) -> Result<(u64, u64), ExportError> {
    write(store, out, false)
}

/// Writes the chain in `store` to `out`, declaring it sealed: its last checkpoint must cover
/// its last entry (the owner sealed it first), else [`ExportError::NotSealed`] and nothing is
/// written. The verifier then reports an entry no checkpoint covers as a violation
/// (`unsealed_tail`) rather than a warning.
pub fn export_sealed(store: &Store, out: &Path) -> Result<(u64, u64), ExportError> {
    write(store, out, true)
}

/// The size (highest seq + 1) the last checkpoint of `checkpoints` covers, if it opens.
fn last_checkpoint_size(checkpoints: &[Vec<u8>]) -> Option<u64> {
    let last = checkpoints.last()?;
    didgate_protocol::message::open::<didgate_protocol::message::Checkpoint>(last)
        .ok()
        .map(|cp| cp.message.size)
}

fn write(store: &Store, out: &Path, sealed: bool) -> Result<(u64, u64), ExportError> {
    // The head is read once, first: a running writer may append meanwhile, and the export
    // stops at what was acknowledged when it began, so it is a consistent prefix; a sealed
    // export checks that prefix's coverage, not a later head's.
    let head = store.head()?;
    let last = head.map_or(0, |h| h.seq);
    if sealed {
        let size = head.map_or(0, |h| h.seq + 1);
        let covered = last_checkpoint_size(&store.checkpoints_upto(size)?).unwrap_or(0);
        if covered != size {
            return Err(ExportError::NotSealed { covered, size });
        }
    }
    let tmp = out.with_extension("partial");
    let mut w = BufWriter::new(std::fs::File::create(&tmp)?);
    let mut put = |item: &Item| -> Result<(), ExportError> {
        ciborium::into_writer(item, &mut w)
            .map_err(|e| ExportError::Io(std::io::Error::other(e.to_string())))
    };
    put(&Item {
        t: "header".into(),
        v: Some(1),
        bytes: Some(FORMAT.as_bytes().to_vec()),
        ..Default::default()
    })?;
    let mut entries = 0u64;
    for item in store.entries() {
        let (seq, bytes) = item?;
        if head.is_none() || seq > last {
            break;
        }
        put(&Item {
            t: "entry".into(),
            seq: Some(seq),
            bytes: Some(bytes),
            ..Default::default()
        })?;
        entries += 1;
    }
    let cps: Vec<Vec<u8>> = store.checkpoints_upto(last + 1)?;
    for cp in &cps {
        put(&Item {
            t: "checkpoint".into(),
            bytes: Some(cp.clone()),
            ..Default::default()
        })?;
    }
    let docs = store.documents()?;
    for doc in &docs {
        put(&Item {
            t: "document".into(),
            bytes: Some(doc.clone()),
            ..Default::default()
        })?;
    }
    if let Some(head) = head {
        put(&Item {
            t: "head".into(),
            seq: Some(head.seq),
            hash: Some(head.hash),
            ..Default::default()
        })?;
    }
    put(&Item {
        t: "end".into(),
        entries: Some(entries),
        checkpoints: Some(cps.len() as u64),
        documents: (!docs.is_empty()).then_some(docs.len() as u64),
        sealed: sealed.then_some(true),
        ..Default::default()
    })?;
    w.flush()?;
    w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, out)?;
    Ok((entries, cps.len() as u64))
}

/// Reads an export file into the verifier's input.
pub fn import(path: &Path, label: &str) -> Result<ChainRecords, ExportError> {
    let file = std::fs::File::open(path)?;
    read(BufReader::new(file), label)
}

/// Where the reader is in the file: items come in the order of the table in
/// specs/audit-log.md ("Export files").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Section {
    Header,
    Entries,
    Checkpoints,
    Documents,
    Head,
}

/// Reads an export from any reader. Refuses, besides malformed items: items out of the
/// table's order, entry keys that do not strictly increase (a duplicated or moved entry), and a
/// second head item.
pub fn read(mut r: impl Read, label: &str) -> Result<ChainRecords, ExportError> {
    let mut records = ChainRecords {
        label: label.to_string(),
        entries: Vec::new(),
        head: None,
        checkpoints: Vec::new(),
        documents: Vec::new(),
        sealed: false,
    };
    let mut index = 0u64;
    let mut ended = None;
    let mut section = Section::Header;
    loop {
        let item: Item = match ciborium::de::from_reader_with_recursion_limit(&mut r, 16) {
            Ok(i) => i,
            Err(ciborium::de::Error::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                break;
            }
            Err(e) => {
                return Err(ExportError::Malformed {
                    index,
                    why: e.to_string(),
                });
            }
        };
        let bad = |why: &str| ExportError::Malformed {
            index,
            why: why.to_string(),
        };
        if ended.is_some() {
            return Err(bad("item after the end item"));
        }
        let place = match item.t.as_str() {
            "header" => Section::Header,
            "entry" => Section::Entries,
            "checkpoint" => Section::Checkpoints,
            "document" => Section::Documents,
            "head" | "end" => Section::Head,
            other => return Err(bad(&format!("unknown item type {other:?}"))),
        };
        if index > 0 && (place < section || place == Section::Header) {
            return Err(bad(&format!(
                "a {:?} item after the {section:?} items (the order is header, entries, checkpoints, documents, head, end)",
                item.t
            )));
        }
        section = place;
        match (index, item.t.as_str()) {
            (0, "header") => {
                if item.v != Some(1) || item.bytes.as_deref() != Some(FORMAT.as_bytes()) {
                    return Err(bad("not a version 1 didgate audit export"));
                }
            }
            (0, _) => return Err(bad("the first item must be the header")),
            (_, "entry") => {
                let (Some(seq), Some(bytes)) = (item.seq, item.bytes) else {
                    return Err(bad("entry without seq or bytes"));
                };
                if let Some((last, _)) = records.entries.last()
                    && seq <= *last
                {
                    return Err(bad(&format!(
                        "entry key {seq} does not increase (after {last}): keys are unique and in order"
                    )));
                }
                records.entries.push((seq, bytes));
            }
            (_, "checkpoint") => records
                .checkpoints
                .push(item.bytes.ok_or_else(|| bad("checkpoint without bytes"))?),
            (_, "document") => records
                .documents
                .push(item.bytes.ok_or_else(|| bad("document without bytes"))?),
            (_, "head") => {
                let (Some(seq), Some(hash)) = (item.seq, item.hash) else {
                    return Err(bad("head without seq or hash"));
                };
                if records.head.is_some() {
                    return Err(bad("a second head item"));
                }
                records.head = Some(EntryRef { seq, hash });
            }
            (_, "end") => {
                records.sealed = item.sealed == Some(true);
                ended = Some((item.entries, item.checkpoints, item.documents));
            }
            (_, other) => return Err(bad(&format!("unknown item type {other:?}"))),
        }
        index += 1;
    }
    match ended {
        None if index == 0 => Err(ExportError::Truncated("empty file".into())),
        None => Err(ExportError::Truncated(format!(
            "no end item after {index} items"
        ))),
        Some((e, c, d))
            if e != Some(records.entries.len() as u64)
                || c != Some(records.checkpoints.len() as u64)
                || d.unwrap_or(0) != records.documents.len() as u64 =>
        {
            Err(ExportError::Truncated(
                "the end item's counts disagree with the items read".into(),
            ))
        }
        Some(_) => Ok(records),
    }
}

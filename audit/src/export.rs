//! Export files (specs/audit-log.md, "Export files"): one chain as a CBOR sequence (RFC 8742)
//! of items: a header, every entry in seq order, every signed checkpoint, every did:web
//! document kept beside the chain, the recorded head, and an end item with counts, so a
//! truncated file is detected.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use didgate_protocol::cbor::{CborError, fixed_opt};
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
    /// Writing an item failed (the CBOR encoder's error, which holds the file's I/O error).
    #[error("{0}")]
    Encode(#[source] ciborium::ser::Error<std::io::Error>),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An item does not decode or is out of place.
    #[error("export item {index} is malformed: {why}")]
    Malformed {
        /// Zero-based item index.
        index: u64,
        /// Why.
        #[source]
        why: ItemError,
    },
    /// The file ends before its end item, or the counts disagree.
    #[error("export is truncated: {0}")]
    Truncated(Truncation),
    /// A sealed export was asked for but the last checkpoint does not cover the last entry.
    #[error("the chain is not sealed: its last checkpoint covers {covered} entries of {size}")]
    NotSealed {
        /// Entries the last checkpoint covers.
        covered: u64,
        /// Entries in the chain.
        size: u64,
    },
}

/// How an export is truncated ([`ExportError::Truncated`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Truncation {
    /// No item at all.
    #[error("empty file")]
    Empty,
    /// No end item after `items` items.
    #[error("no end item after {items} items")]
    NoEnd {
        /// Items read.
        items: u64,
    },
    /// The end item's counts disagree with the items read.
    #[error("the end item's counts disagree with the items read")]
    Counts,
}

/// Why an export item is malformed ([`ExportError::Malformed`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ItemError {
    /// Not CBOR of an item's shape.
    #[error(transparent)]
    Cbor(#[from] CborError),
    /// An item type this release does not read.
    #[error("unknown item type {0:?}")]
    UnknownType(String),
    /// An item of type `t` after the items of a later section (`after`) of the table.
    #[error(
        "a {t:?} item after the {after} items (the order is header, entries, checkpoints, documents, head, end)"
    )]
    OutOfOrder {
        /// The item's type.
        t: String,
        /// The section read last (`Entries`).
        after: &'static str,
    },
    /// An entry key not above the one before it (a duplicated or moved entry).
    #[error("entry key {seq} does not increase (after {last}): keys are unique and in order")]
    KeyOrder {
        /// The entry's key.
        seq: u64,
        /// The key before it.
        last: u64,
    },
    /// Another rule of the format (`"a second head item"`).
    #[error("{0}")]
    Rule(&'static str),
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
        .map(|cp| cp.message().size)
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
        ciborium::into_writer(item, &mut w).map_err(ExportError::Encode)
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

impl Section {
    /// The section's name as error messages give it.
    fn name(self) -> &'static str {
        match self {
            Self::Header => "Header",
            Self::Entries => "Entries",
            Self::Checkpoints => "Checkpoints",
            Self::Documents => "Documents",
            Self::Head => "Head",
        }
    }
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
                    why: e.into(),
                });
            }
        };
        let malformed = |why: ItemError| ExportError::Malformed { index, why };
        let bad = |why: &'static str| malformed(ItemError::Rule(why));
        if ended.is_some() {
            return Err(bad("item after the end item"));
        }
        let place = match item.t.as_str() {
            "header" => Section::Header,
            "entry" => Section::Entries,
            "checkpoint" => Section::Checkpoints,
            "document" => Section::Documents,
            "head" | "end" => Section::Head,
            other => return Err(malformed(ItemError::UnknownType(other.into()))),
        };
        if index > 0 && (place < section || place == Section::Header) {
            return Err(malformed(ItemError::OutOfOrder {
                t: item.t,
                after: section.name(),
            }));
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
                    return Err(malformed(ItemError::KeyOrder { seq, last: *last }));
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
            (_, other) => return Err(malformed(ItemError::UnknownType(other.into()))),
        }
        index += 1;
    }
    match ended {
        None if index == 0 => Err(ExportError::Truncated(Truncation::Empty)),
        None => Err(ExportError::Truncated(Truncation::NoEnd { items: index })),
        Some((e, c, d))
            if e != Some(records.entries.len() as u64)
                || c != Some(records.checkpoints.len() as u64)
                || d.unwrap_or(0) != records.documents.len() as u64 =>
        {
            Err(ExportError::Truncated(Truncation::Counts))
        }
        Some(_) => Ok(records),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn an_undecodable_item_carries_the_cbor_error_as_source() {
        let e = read(&b"\xff"[..], "test").expect_err("a break is no item");
        let ExportError::Malformed { index: 0, why } = &e else {
            panic!("{e:?}");
        };
        assert!(matches!(why, ItemError::Cbor(_)), "{why:?}");
        assert!(e.source().is_some_and(|s| s.is::<ItemError>()));
        assert_eq!(e.to_string(), format!("export item 0 is malformed: {why}"));
    }

    #[test]
    fn an_item_out_of_place_names_its_type_and_section() {
        let mut bytes = Vec::new();
        for item in [
            Item {
                t: "header".into(),
                v: Some(1),
                bytes: Some(FORMAT.as_bytes().to_vec()),
                ..Default::default()
            },
            Item {
                t: "checkpoint".into(),
                bytes: Some(vec![1]),
                ..Default::default()
            },
            Item {
                t: "entry".into(),
                seq: Some(0),
                bytes: Some(vec![1]),
                ..Default::default()
            },
        ] {
            ciborium::into_writer(&item, &mut bytes).expect("encode");
        }
        let e = read(&bytes[..], "test").expect_err("out of order");
        assert_eq!(
            e.to_string(),
            "export item 2 is malformed: a \"entry\" item after the Checkpoints items (the order is header, entries, checkpoints, documents, head, end)"
        );
    }
}

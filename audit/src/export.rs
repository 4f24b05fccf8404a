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
    #[serde(default, with = "serde_bytes", skip_serializing_if = "Option::is_none")]
    bytes: Option<Vec<u8>>,
    #[serde(default, with = "fixed_opt", skip_serializing_if = "Option::is_none")]
    hash: Option<[u8; 32]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    entries: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    checkpoints: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    documents: Option<u64>,
}

const FORMAT: &str = "didgate-audit-export";

/// Writes the chain in `store` to `out`; returns (entries, checkpoints) written.
pub fn export(store: &Store, out: &Path) -> Result<(u64, u64), ExportError> {
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
    // The head is read first: a running writer may append meanwhile, and the export stops at
    // what was acknowledged when it began, so it is a consistent prefix.
    let head = store.head()?;
    let last = head.map_or(0, |h| h.seq);
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

/// Reads an export from any reader.
pub fn read(mut r: impl Read, label: &str) -> Result<ChainRecords, ExportError> {
    let mut records = ChainRecords {
        label: label.to_string(),
        entries: Vec::new(),
        head: None,
        checkpoints: Vec::new(),
        documents: Vec::new(),
    };
    let mut index = 0u64;
    let mut ended = None;
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
                records.head = Some(EntryRef { seq, hash });
            }
            (_, "end") => ended = Some((item.entries, item.checkpoints, item.documents)),
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

//! Audit entries and their hashes (specs/audit-log.md, "Entries").
//!
//! An entry is a versioned CBOR map; its hash is BLAKE3 in derive-key mode with the context
//! [`ENTRY_CONTEXT`] over the entry's exact stored bytes. A chain's id is the hash of its
//! entry 0 (the genesis, which names the owner DID).
//!
//! Versions (specs/audit-log.md, "Format evolution"): every entry carries `v`. Version 2 is
//! version 1 plus the `format` kind, the entry at which a chain switches from version 1 to 2,
//! and the fields and kinds of its amendments (`secret`, 2.4; `witness`, a peer node's signed
//! checkpoint, 2.9); each version's decoder stays strict (a version 1 entry with the `format`
//! kind or the `version` field is refused).
//!
//! Two decoders: [`Entry::decode`] reads a party's own store (serde over ciborium, which is
//! lenient about the encoding), and [`Entry::decode_strict`], the verifier's, refuses any entry
//! that breaks the encoding rules (definite lengths, shortest arguments, no tags, no null, each
//! field of its table's CBOR type) or the per-kind field table of its version
//! ([`Entry::check_fields`]). Beside the strict one, [`Entry::decode_plain`] is the verifier's
//! fast path: the strict decoder's value, faster, for the plain encoding the writers produce,
//! and `None` for anything else (which then goes to `decode_strict`).

use didgate_protocol::cbor::{self, DecodeError, PlainReader, fixed, fixed_opt};
use didgate_protocol::message::{self, ChainHead, Checkpoint, Digest, EntryRef, OpenError};
use didgate_protocol::{Did, Version};
use serde::{Deserialize, Serialize};

use ciborium::Value;

/// BLAKE3 derive-key context of entry hashes.
pub const ENTRY_CONTEXT: &str = "didgate 2026 audit-entry v1";

/// The hash of an entry's stored bytes.
pub fn entry_hash(bytes: &[u8]) -> Digest {
    *blake3::Hasher::new_derive_key(ENTRY_CONTEXT)
        .update(bytes)
        .finalize()
        .as_bytes()
}

/// What an entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum EntryKind {
    /// Entry 0: names the owner DID and role.
    Genesis,
    /// Client: a signed request, written and flushed before it is sent.
    Request,
    /// Client: the answer to a request (receipt, refusal, or unknown).
    Result,
    /// Gateway: a call whose grant was consumed; holds the client's signed request.
    Executing,
    /// Gateway: the upstream answered; closes an executing entry.
    Executed,
    /// Gateway: the upstream call failed; closes an executing entry.
    Failed,
    /// Gateway: written at start-up for an executing entry a crash left open.
    Abandoned,
    /// Gateway: one refusal to a principal that policy knows.
    Refused,
    /// Gateway: refusals counted over a window (unknown principals, floods).
    Refusals,
    /// Gateway: a grant issued for the two-step flow (holds the signed request and the grant).
    Granted,
    /// Gateway: a DID or a grant revoked by the operator (`subject`, or `grant`; `detail`).
    Revocation,
    /// Both (version 2 on): the chain switches to the version named in `version`, from this
    /// entry on (`detail`: the writer's release).
    Format,
    /// Gateway (version 2, amendment 2.4): a secret's lifecycle event, a master-key rotation,
    /// or the snapshot of every secret (`action`, `secrets`; never a value).
    Secret,
    /// Gateway (version 2, amendment 2.9): a peer node's signed checkpoint, byte for byte
    /// (`signed`), and the peer's DID, its `log` (`subject`): this chain saw the peer's chain
    /// at that size with that root, so the peer cannot rewrite it below that size unseen.
    Witness,
}

/// Why a peer's checkpoint cannot be witnessed ([`Entry::witness`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WitnessError {
    /// Not a signed checkpoint: the envelope, the signature or the payload fails.
    #[error("not a signed checkpoint: {0}")]
    Open(#[source] OpenError),
    /// Signed by another key than the peer's, or for another log.
    #[error("the checkpoint is signed by {signer} for the log {log}, not by the peer {peer}")]
    Signer {
        /// The peer the caller named.
        peer: String,
        /// The key that signed it.
        signer: String,
        /// The log it names.
        log: String,
    },
}

/// BLAKE3 derive-key context of a sealed secret version's fingerprint.
pub const SEALED_CONTEXT: &str = "didgate 2026 sealed-secret v1";

/// The fingerprint of one stored secret version: BLAKE3-derive([`SEALED_CONTEXT`]) over the
/// secret's id, the version (u64 big-endian) and the sealed bytes as stored (nonce ||
/// ciphertext under the version's random data key). It names the ciphertext, not the value:
/// it changes with every seal, and a master-key rotation (which rewraps the data key only)
/// keeps it.
pub fn sealed_fingerprint(id: &[u8; 16], version: u64, sealed: &[u8]) -> Digest {
    *blake3::Hasher::new_derive_key(SEALED_CONTEXT)
        .update(id)
        .update(&version.to_be_bytes())
        .update(sealed)
        .finalize()
        .as_bytes()
}

/// What a `secret` entry records (amendment 2.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretAction {
    /// Every secret the store holds: written once, the first time a gateway of this release
    /// opens the store (an empty list for a store without secrets).
    Snapshot,
    /// `secret add`: version 1 of a new secret.
    Added,
    /// `secret rotate`: a new current version; the previous one is retired.
    Rotated,
    /// `secret disable`.
    Disabled,
    /// `secret enable` of a disabled secret.
    Enabled,
    /// `secret delete` (soft delete).
    Deleted,
    /// `secret enable` or `disable` of a deleted secret (its new status says which).
    Restored,
    /// Retired versions whose grace window ended were removed from the record.
    SealedOff,
    /// A deleted secret's retention ended: the record is removed, the name is free.
    Purged,
    /// `kms rotate`: every data key rewrapped under a new master key (every secret listed).
    KmsRotated,
}

/// A secret's status in a `secret` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecretStatus {
    /// Calls may use it.
    Enabled,
    /// Calls are refused.
    Disabled,
    /// Soft-deleted: refused, restorable until purged.
    Deleted,
    /// Removed from the store.
    Purged,
}

/// One secret as a `secret` entry lists it: names, versions and fingerprints, never a value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretState {
    /// The secret's name (the store key).
    pub name: String,
    /// Its immutable id (what `executed` entries name in `secret_id`).
    #[serde(with = "fixed")]
    pub id: [u8; 16],
    /// Its status after the event.
    pub status: SecretStatus,
    /// Id of the master key that wraps its data keys (8 bytes).
    #[serde(with = "fixed")]
    pub kek: [u8; 8],
    /// Every version the record holds after the event, ascending (empty when purged).
    pub versions: Vec<VersionState>,
}

/// One held version of a [`SecretState`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionState {
    /// The version number.
    pub version: u64,
    /// [`sealed_fingerprint`] of its stored ciphertext.
    #[serde(with = "fixed")]
    pub fingerprint: Digest,
    /// When a rotation retired it; absent for the current version, never null.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present_uint"
    )]
    pub retired_ms: Option<u64>,
}

impl SecretState {
    /// The current version: the highest, which alone is not retired; `None` when purged.
    pub fn current(&self) -> Option<u64> {
        self.versions
            .last()
            .filter(|v| v.retired_ms.is_none())
            .map(|v| v.version)
    }

    /// The invariants a decoder checks: versions strictly ascending from 1; a purged secret
    /// holds none; any other holds at least one, and exactly the highest is not retired.
    fn is_valid(&self) -> bool {
        let ascending = self
            .versions
            .windows(2)
            .all(|w| w[0].version < w[1].version)
            && self.versions.first().is_none_or(|v| v.version >= 1);
        let current_only_last = self
            .versions
            .iter()
            .rev()
            .skip(1)
            .all(|v| v.retired_ms.is_some());
        ascending
            && match self.status {
                SecretStatus::Purged => self.versions.is_empty(),
                _ => self.current().is_some() && current_only_last,
            }
    }
}

/// The role of a chain's owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The gateway's chain.
    Gateway,
    /// A client's chain.
    Client,
}

/// The outcome a client's result entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A signed receipt is in `signed`.
    Receipt,
    /// A signed refusal is in `signed`.
    Refusal,
    /// The connection was lost: the outcome is unknown.
    Unknown,
    /// The gateway issued a signed grant (in `signed`) for later execution; the call's outcome
    /// comes in a later result entry.
    Grant,
}

/// One audit entry. Fields not used by a kind are absent from the encoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Entry version ([`Version`]): 1, or 2 from a chain's switch on.
    pub v: u64,
    /// Position in the chain, from 0, contiguous.
    pub seq: u64,
    /// Hash of the previous entry; 32 zero bytes for entry 0.
    #[serde(with = "fixed")]
    pub prev: Digest,
    /// Writer's clock, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// What the entry records.
    pub kind: EntryKind,
    /// The call ID this entry concerns.
    #[serde(with = "fixed_opt", default, skip_serializing_if = "Option::is_none")]
    pub call: Option<Digest>,
    /// A signed message verbatim: the client's request (request, executing, refused) or the
    /// gateway's receipt or refusal (result).
    #[serde(
        with = "cbor::bytes_opt",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub signed: Option<Vec<u8>>,
    /// Link to the counterpart's chain: the client's head a request carried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_head: Option<ChainHead>,
    /// Link to the counterpart's chain: the gateway entry a receipt or refusal names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_entry: Option<EntryRef>,
    /// Genesis: the owner's DID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Genesis: the owner's role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// The DID the entry is about (executing, refused: the caller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Executing: the consumed grant's id.
    #[serde(with = "fixed_opt", default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<[u8; 16]>,
    /// Executed: the upstream status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Executed: response length relayed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resp_len: Option<u64>,
    /// Executed: BLAKE3 of the response body relayed.
    #[serde(with = "fixed_opt", default, skip_serializing_if = "Option::is_none")]
    pub resp_b3: Option<Digest>,
    /// Refused, refusals, failed: the refusal code or failure cause.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Refused, failed, abandoned: human-readable detail (never a secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Refusals: how many refusals the window counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Result: the outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    /// Reserved (later versions): hash of the policy set that decided.
    #[serde(with = "fixed_opt", default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Digest>,
    /// Reserved (later versions): hash of the resolved DID document.
    #[serde(with = "fixed_opt", default, skip_serializing_if = "Option::is_none")]
    pub did_doc: Option<Digest>,
    /// Reserved (later versions): Merkle root of the chain before this entry.
    #[serde(with = "fixed_opt", default, skip_serializing_if = "Option::is_none")]
    pub root: Option<Digest>,
    /// Format (version 2 on): the version the chain switches to, equal to this entry's `v`.
    /// Present or absent, never null (a version 1 reader must see the key to refuse it).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present_uint"
    )]
    pub version: Option<u64>,
    /// Executed (version 2, amendment 2.1): occurrences of the call's credential the response
    /// scanner redacted; absent when there were none, never null.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present_uint"
    )]
    pub secret_echo: Option<u64>,
    /// Executed (version 2, amendment 2.3): the immutable id of the secret the call used.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "fixed_opt::serialize",
        deserialize_with = "present_id"
    )]
    pub secret_id: Option<[u8; 16]>,
    /// Executed (version 2, amendment 2.3): the version of that secret the call used.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present_uint"
    )]
    pub secret_version: Option<u64>,
    /// Secret (version 2, amendment 2.4): what happened.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub action: Option<SecretAction>,
    /// Secret (version 2, amendment 2.4): the secrets concerned, as they are after the event
    /// (one for a secret's own event; every secret for `snapshot` and `kms_rotated`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub secrets: Option<Vec<SecretState>>,
    /// Executing and granted (version 2, amendment 2.12), in a cluster: the etcd revision as of
    /// which the node's view of the members made it the caller's home when it admitted the
    /// request (specs/audit-log.md, "Home revisions"); absent outside a cluster, never null.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present_uint"
    )]
    pub home_rev: Option<u64>,
}

/// A field added by version 2 whose value is a map, an array or a text: present means a
/// value, never null.
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// [`present_uint`] for a 16-byte id (a byte string, never null).
fn present_id<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<[u8; 16]>, D::Error> {
    fixed::deserialize(d).map(Some)
}

/// A field added by version 2: when its key is there, its value is an unsigned integer (null
/// would read as absent and hide the key from the version rules).
fn present_uint<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    u64::deserialize(d).map(Some)
}

/// The optional fields of [`Entry`], in the struct's (and the encoding's) order: bit `i` of a
/// field set ([`Entry::fields`]) stands for `OPTIONAL[i]`.
const OPTIONAL: [&str; 25] = [
    "call",
    "signed",
    "peer_head",
    "peer_entry",
    "owner",
    "role",
    "subject",
    "grant",
    "status",
    "resp_len",
    "resp_b3",
    "code",
    "detail",
    "count",
    "outcome",
    "policy",
    "did_doc",
    "root",
    "version",
    "secret_echo",
    "secret_id",
    "secret_version",
    "action",
    "secrets",
    "home_rev",
];

/// Field sets: one bit per optional field, as in [`OPTIONAL`].
mod bit {
    pub(super) const CALL: u32 = 1 << 0;
    pub(super) const SIGNED: u32 = 1 << 1;
    pub(super) const PEER_HEAD: u32 = 1 << 2;
    pub(super) const PEER_ENTRY: u32 = 1 << 3;
    pub(super) const OWNER: u32 = 1 << 4;
    pub(super) const ROLE: u32 = 1 << 5;
    pub(super) const SUBJECT: u32 = 1 << 6;
    pub(super) const GRANT: u32 = 1 << 7;
    pub(super) const STATUS: u32 = 1 << 8;
    pub(super) const RESP_LEN: u32 = 1 << 9;
    pub(super) const RESP_B3: u32 = 1 << 10;
    pub(super) const CODE: u32 = 1 << 11;
    pub(super) const DETAIL: u32 = 1 << 12;
    pub(super) const COUNT: u32 = 1 << 13;
    pub(super) const OUTCOME: u32 = 1 << 14;
    pub(super) const POLICY: u32 = 1 << 15;
    pub(super) const DID_DOC: u32 = 1 << 16;
    pub(super) const ROOT: u32 = 1 << 17;
    pub(super) const VERSION: u32 = 1 << 18;
    pub(super) const SECRET_ECHO: u32 = 1 << 19;
    pub(super) const SECRET_ID: u32 = 1 << 20;
    pub(super) const SECRET_VERSION: u32 = 1 << 21;
    pub(super) const ACTION: u32 = 1 << 22;
    pub(super) const SECRETS: u32 = 1 << 23;
    pub(super) const HOME_REV: u32 = 1 << 24;
}

/// The optional fields an entry of `kind` may carry and those it must carry in version `v`, as
/// (allowed, required); `None` when `v` has no such kind. See [`Entry::check_fields`].
fn field_rule(kind: EntryKind, v: Version) -> Option<(u32, u32)> {
    use bit::*;
    let v2 = v >= Version::V2;
    // executing and granted: what `request_entry` writes; policy and did_doc as the spec says
    let request = CALL
        | SIGNED
        | PEER_HEAD
        | SUBJECT
        | GRANT
        | POLICY
        | DID_DOC
        | if v2 { HOME_REV } else { 0 };
    let (allowed, required) = match kind {
        EntryKind::Genesis => (OWNER | ROLE, OWNER | ROLE),
        EntryKind::Request => (CALL | SIGNED, CALL | SIGNED),
        EntryKind::Result => (CALL | SIGNED | PEER_ENTRY | DETAIL | OUTCOME, 0),
        EntryKind::Executing => (request, CALL | SIGNED | PEER_HEAD | SUBJECT),
        EntryKind::Granted => (
            request | DETAIL,
            CALL | SIGNED | PEER_HEAD | SUBJECT | GRANT | DETAIL,
        ),
        EntryKind::Executed => {
            let amended = if v2 {
                SECRET_ECHO | SECRET_ID | SECRET_VERSION
            } else {
                0
            };
            let closing = CALL | STATUS | RESP_LEN | RESP_B3;
            (closing | POLICY | amended, closing)
        }
        EntryKind::Failed => (CALL | CODE | DETAIL | POLICY, CALL | CODE | DETAIL),
        EntryKind::Abandoned => (CALL | DETAIL | POLICY, CALL | DETAIL),
        EntryKind::Refused => (
            CALL | SIGNED | PEER_HEAD | SUBJECT | CODE | DETAIL | POLICY | DID_DOC,
            0,
        ),
        EntryKind::Refusals => (CODE | DETAIL | COUNT, 0),
        EntryKind::Revocation => (SUBJECT | GRANT | DETAIL, DETAIL),
        EntryKind::Format if v2 => (VERSION | DETAIL, VERSION),
        EntryKind::Secret if v2 => (ACTION | SECRETS | DETAIL, ACTION | SECRETS),
        EntryKind::Witness if v2 => (SIGNED | SUBJECT, SIGNED | SUBJECT),
        EntryKind::Format | EntryKind::Secret | EntryKind::Witness => return None,
    };
    // the reserved `root` is accepted on every kind ("A v1 reader MUST accept the reserved
    // fields when present")
    Some((allowed | ROOT, required))
}

/// The name of the lowest field in `set`, if any.
fn first_field(set: u32) -> Option<&'static str> {
    OPTIONAL.get(set.trailing_zeros() as usize).copied()
}

/// Deepest nesting of arrays and maps an entry may have (protocol.md "Messages").
const MAX_DEPTH: usize = 32;

/// A [`DecodeError::Encoding`] for what was found at byte `at`.
fn malformed(at: usize, what: &'static str) -> DecodeError {
    DecodeError::Encoding { what, at }
}

/// Checks that `bytes` are exactly one CBOR item (RFC 8949) in the encoding entries must use:
/// definite lengths, every argument in its shortest form (preferred serialization, 4.2.1), no
/// tag, no float and no simple value but false and true (so no null: unused fields are
/// absent), text keys in every map, UTF-8 text, at most [`MAX_DEPTH`] nested arrays and maps,
/// nothing after the item.
///
/// Iterative and allocation-free (but for the error): a stack of the items the top level and
/// each open array or map still hold.
fn check_encoding(bytes: &[u8]) -> Result<(), DecodeError> {
    let mut left = [0u64; MAX_DEPTH + 1];
    left[0] = 1;
    // bit d: level d is a map, whose items alternate key and value
    let mut maps = 0u64;
    let mut depth = 0;
    let mut i = 0;
    loop {
        while left[depth] == 0 {
            if depth == 0 {
                return match bytes.len() - i {
                    0 => Ok(()),
                    n => Err(DecodeError::Trailing(n)),
                };
            }
            depth -= 1;
        }
        // a map of n pairs holds 2n items: a key whenever an even number is left
        let key = (maps >> depth) & 1 == 1 && left[depth].is_multiple_of(2);
        left[depth] -= 1;
        let at = i;
        let (major, arg) = head(bytes, &mut i)?;
        if key && major != 3 {
            return Err(malformed(at, "a map key that is not a text string"));
        }
        match major {
            2 | 3 => {
                let s = usize::try_from(arg)
                    .ok()
                    .and_then(|n| bytes.get(i..i.checked_add(n)?))
                    .ok_or_else(|| malformed(at, "a string longer than the input"))?;
                if major == 3 && std::str::from_utf8(s).is_err() {
                    return Err(malformed(at, "a text string that is not UTF-8"));
                }
                i += s.len();
            }
            4 | 5 => {
                if depth == MAX_DEPTH {
                    return Err(malformed(at, "arrays and maps nested deeper than 32"));
                }
                // every item takes one byte at least
                let items = if major == 5 {
                    arg.saturating_mul(2)
                } else {
                    arg
                };
                if items > (bytes.len() - i) as u64 {
                    return Err(malformed(at, "more items than the input holds"));
                }
                depth += 1;
                left[depth] = items;
                maps = (maps & !(1 << depth)) | (u64::from(major == 5) << depth);
            }
            6 => return Err(malformed(at, "a tag")),
            // 0 and 1: integers; 7: false or true (`head` refuses any other)
            _ => {}
        }
    }
}

/// Reads the head at `*i` (RFC 8949 section 3): its major type and argument, the argument in
/// its shortest form and never an indefinite length; of major type 7 only false and true.
fn head(bytes: &[u8], i: &mut usize) -> Result<(u8, u64), DecodeError> {
    let at = *i;
    let first = *bytes
        .get(at)
        .ok_or_else(|| malformed(at, "the input ending inside an item"))?;
    let (major, info) = (first >> 5, first & 0x1f);
    if major == 7 {
        return match info {
            20 | 21 => {
                *i += 1;
                Ok((7, u64::from(info)))
            }
            22 => Err(malformed(
                at,
                "null (an unused field is absent, never null)",
            )),
            31 => Err(malformed(at, "a break outside an indefinite-length item")),
            _ => Err(malformed(
                at,
                "a float or a simple value other than false and true",
            )),
        };
    }
    let (len, min) = match info {
        0..=23 => {
            *i += 1;
            return Ok((major, u64::from(info)));
        }
        24 => (1, 24),
        25 => (2, 0x100),
        26 => (4, 0x1_0000),
        27 => (8, 0x1_0000_0000),
        31 => return Err(malformed(at, "an indefinite length")),
        _ => return Err(malformed(at, "reserved additional information (28 to 30)")),
    };
    let raw = bytes
        .get(at + 1..at + 1 + len)
        .ok_or_else(|| malformed(at, "the input ending inside an item's head"))?;
    let arg = raw.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
    if arg < min {
        return Err(malformed(at, "an argument not in its shortest form"));
    }
    *i = at + 1 + len;
    Ok((major, arg))
}

/// The two CBOR values are equal, map keys compared in any order (the spec leaves key order
/// free). Both come from inputs serde read as an entry, so neither map has a duplicate key.
fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Map(a), Value::Map(b)) => {
            a.len() == b.len()
                && a.iter().all(|(key, value)| {
                    b.iter()
                        .find(|(k, _)| k == key)
                        .is_some_and(|(_, v)| same_value(value, v))
                })
        }
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(a, b)| same_value(a, b))
        }
        (a, b) => a == b,
    }
}

impl Entry {
    /// A new entry of `kind` with every optional field empty; the writer sets seq and prev.
    /// Its version is [`Version::CURRENT`] until the writer sets the chain's.
    pub fn new(kind: EntryKind, time_ms: u64) -> Self {
        Self {
            v: Version::CURRENT.as_u64(),
            seq: 0,
            prev: [0; 32],
            time_ms,
            kind,
            call: None,
            signed: None,
            peer_head: None,
            peer_entry: None,
            owner: None,
            role: None,
            subject: None,
            grant: None,
            status: None,
            resp_len: None,
            resp_b3: None,
            code: None,
            detail: None,
            count: None,
            outcome: None,
            policy: None,
            did_doc: None,
            root: None,
            version: None,
            secret_echo: None,
            secret_id: None,
            secret_version: None,
            action: None,
            secrets: None,
            home_rev: None,
        }
    }

    /// A `secret` entry (amendment 2.4): `action` on `secrets`, as they are after it.
    pub fn secret(action: SecretAction, secrets: Vec<SecretState>, time_ms: u64) -> Self {
        let mut e = Self::new(EntryKind::Secret, time_ms);
        e.action = Some(action);
        e.secrets = Some(secrets);
        e
    }

    /// A `witness` entry (amendment 2.9): the checkpoint `checkpoint` (its COSE_Sign1 bytes,
    /// exactly as the peer signed them) of the chain of the peer node `peer`, seen at
    /// `time_ms`. The checkpoint must open as a signed checkpoint (every rule of protocol.md
    /// "Signed envelopes" and "Messages") signed by `peer` for the log `peer` (its `log`);
    /// otherwise the verifier would report the entry `bad_signature`, and it is refused here.
    /// Its node certificate, if any, is not judged here (the verifier judges it as it judges a
    /// checkpoint's: the caller holds the revocation lists).
    pub fn witness(peer: &Did, checkpoint: Vec<u8>, time_ms: u64) -> Result<Self, WitnessError> {
        let opened = message::open::<Checkpoint>(&checkpoint).map_err(WitnessError::Open)?;
        let (envelope, cp, _) = opened.into_parts();
        if envelope.signer() != peer || cp.log != peer.as_str() {
            return Err(WitnessError::Signer {
                peer: peer.to_string(),
                signer: envelope.signer().to_string(),
                log: cp.log,
            });
        }
        let mut e = Self::new(EntryKind::Witness, time_ms);
        e.signed = Some(checkpoint);
        e.subject = Some(peer.to_string());
        Ok(e)
    }

    /// The `format` entry that switches a chain to `to`.
    pub fn format(to: Version, time_ms: u64) -> Self {
        let mut e = Self::new(EntryKind::Format, time_ms);
        e.v = to.as_u64();
        e.version = Some(to.as_u64());
        e.detail = Some(format!("didgate {}", env!("CARGO_PKG_VERSION")));
        e
    }

    /// The entry's version, if this release reads it.
    pub fn version(&self) -> Option<Version> {
        Version::from_u64(self.v)
    }

    /// Encodes the entry.
    pub fn encode(&self) -> Vec<u8> {
        cbor::to_vec(self)
    }

    /// Decodes an entry strictly: a version this release reads, and nothing that version's
    /// table lacks (the `format` kind and the `version` field are not in version 1; a
    /// `format` entry names its own version, and no other entry has `version`).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let e: Self = cbor::from_slice(bytes)?;
        e.check_version()?;
        Ok(e)
    }

    /// What [`Entry::decode`] requires of a decoded entry's version beyond its fields.
    pub fn check_version(&self) -> Result<(), DecodeError> {
        let Some(v) = self.version() else {
            return Err(DecodeError::Version(self.v));
        };
        if self.secret_echo.is_some() && (v == Version::V1 || self.kind != EntryKind::Executed) {
            return Err(DecodeError::Field("secret_echo"));
        }
        // amendment 2.12: on executing and granted entries of version 2 only
        if self.home_rev.is_some()
            && (v == Version::V1 || !matches!(self.kind, EntryKind::Executing | EntryKind::Granted))
        {
            return Err(DecodeError::Field("home_rev"));
        }
        // amendment 2.3: both or neither, on executed entries of version 2
        if (self.secret_id.is_some() || self.secret_version.is_some())
            && (v == Version::V1
                || self.kind != EntryKind::Executed
                || self.secret_id.is_none()
                || self.secret_version.is_none())
        {
            return Err(DecodeError::Field("secret_id"));
        }
        // amendment 2.4: action and secrets on secret entries of version 2, and only there
        match (self.kind, &self.action, &self.secrets) {
            (EntryKind::Secret, _, _) if v == Version::V1 => {
                return Err(DecodeError::Field("kind"));
            }
            (EntryKind::Secret, Some(action), Some(states)) => {
                let one = !matches!(action, SecretAction::Snapshot | SecretAction::KmsRotated);
                let purged = states.iter().any(|s| s.status == SecretStatus::Purged);
                let valid = states.iter().all(SecretState::is_valid)
                    && (!one || states.len() == 1)
                    && purged == (*action == SecretAction::Purged);
                if !valid {
                    return Err(DecodeError::Field("secrets"));
                }
            }
            (EntryKind::Secret, _, _) => return Err(DecodeError::Field("action")),
            (_, None, None) => {}
            (_, _, _) => return Err(DecodeError::Field("action")),
        }
        match (v, self.kind, self.version) {
            // amendment 2.9: no witness entry in version 1
            (Version::V1, EntryKind::Format | EntryKind::Witness, _) => {
                Err(DecodeError::Field("kind"))
            }
            (Version::V1, _, Some(_)) => Err(DecodeError::Field("version")),
            (_, EntryKind::Format, Some(to)) if to == self.v => Ok(()),
            (_, EntryKind::Format, _) => Err(DecodeError::Field("version")),
            (_, _, Some(_)) => Err(DecodeError::Field("version")),
            _ => Ok(()),
        }
    }

    /// The verifier's decoder: [`Entry::decode`], and an auditor's strictness on top of it.
    /// It refuses, besides what `decode` refuses:
    ///
    /// - an encoding the spec forbids: indefinite lengths, integers or lengths not in their
    ///   shortest form, tags, floats and simple values but false and true (null included:
    ///   unused fields are absent), map keys that are not text, text that is not UTF-8,
    ///   nesting deeper than 32, bytes after the item;
    /// - a value of another CBOR type than its field's (a byte string given as an array of
    ///   integers, say), which serde would convert: the entry's own encoding must hold the
    ///   same values as `bytes`, keys in any order;
    /// - a field its kind lacks, or one of its kind's required fields missing
    ///   ([`Entry::check_fields`]).
    ///
    /// The stores' own readers use `decode`, which stays as lenient as ever.
    pub fn decode_strict(bytes: &[u8]) -> Result<Self, DecodeError> {
        check_encoding(bytes)?;
        let e = Self::decode(bytes)?;
        e.check_fields()?;
        e.check_types(bytes)?;
        Ok(e)
    }

    /// Decodes an entry like [`Entry::decode_strict`], faster, for the plain encoding the chain
    /// writer produces; `None` whenever the input is anything else (the caller then uses
    /// [`Entry::decode_strict`], whose verdict and error stand).
    ///
    /// Accepted here, and only this: one definite-length map with text keys, each a field of
    /// [`Entry`] at most once (the secret entries' `action` and `secrets` excepted); unsigned
    /// integers, byte strings and text strings in their shortest definite form
    /// ([`PlainReader`]); no null (an absent option is absent; null is the strict decoder's
    /// to refuse); nested `peer_head` / `peer_entry` maps likewise; no tags, no trailing bytes;
    /// the required fields present, a version [`Entry::decode`] accepts
    /// ([`Entry::check_version`]) and the kind's field table ([`Entry::check_fields`]). Every
    /// such input is one that ciborium and serde (what `Entry::decode` uses) accept, decoding
    /// to the same value: they accept these forms (and more, which go to
    /// `Entry::decode_strict`), enum names are matched by serde itself, and unknown or
    /// duplicate fields are left to `Entry::decode_strict` to refuse.
    pub fn decode_plain(bytes: &[u8]) -> Option<Self> {
        let mut r = PlainReader::new(bytes);
        let n = r.head(5)?;
        let mut e = Entry::new(EntryKind::Genesis, 0);
        let mut seen = 0u32;
        for _ in 0..n {
            let bit = plain_field(r.text()?)?;
            if seen & (1 << bit) != 0 {
                return None;
            }
            seen |= 1 << bit;
            // unused fields are absent, not null: the strict decoder says why
            if r.peek() == Some(0xf6) {
                return None;
            }
            match bit {
                0 => e.v = r.uint()?,
                1 => e.seq = r.uint()?,
                2 => e.prev = r.fixed()?,
                3 => e.time_ms = r.uint()?,
                4 => e.kind = unit_variant(r.text()?)?,
                5 => e.call = r.opt(PlainReader::fixed)?,
                6 => e.signed = r.opt(|r| r.bytes().map(<[u8]>::to_vec))?,
                7 => e.peer_head = r.opt(ChainHead::read_plain)?,
                8 => e.peer_entry = r.opt(EntryRef::read_plain)?,
                9 => e.owner = r.opt(PlainReader::string)?,
                10 => e.role = r.opt(|r| unit_variant(r.text()?))?,
                11 => e.subject = r.opt(PlainReader::string)?,
                12 => e.grant = r.opt(PlainReader::fixed)?,
                13 => e.status = r.opt(|r| u16::try_from(r.uint()?).ok())?,
                14 => e.resp_len = r.opt(PlainReader::uint)?,
                15 => e.resp_b3 = r.opt(PlainReader::fixed)?,
                16 => e.code = r.opt(PlainReader::string)?,
                17 => e.detail = r.opt(PlainReader::string)?,
                18 => e.count = r.opt(PlainReader::uint)?,
                19 => e.outcome = r.opt(|r| unit_variant(r.text()?))?,
                20 => e.policy = r.opt(PlainReader::fixed)?,
                21 => e.did_doc = r.opt(PlainReader::fixed)?,
                22 => e.root = r.opt(PlainReader::fixed)?,
                // never null (Entry's `present_uint`)
                23 => e.version = Some(r.uint()?),
                24 => e.secret_echo = Some(r.uint()?),
                25 => e.secret_id = Some(r.fixed()?),
                26 => e.secret_version = Some(r.uint()?),
                _ => e.home_rev = Some(r.uint()?),
            }
        }
        // v, seq, prev, time_ms and kind are required; anything after the map is refused; the
        // version's own rules are the strict decoder's
        (seen & 0b11111 == 0b11111
            && r.at_end()
            && e.check_version().is_ok()
            && e.check_fields().is_ok())
        .then_some(e)
    }

    /// The per-kind field table of the entry's version: refuses a field its kind may not
    /// carry and a field its kind must carry that is absent. `v`, `seq`, `prev`, `time_ms` and
    /// `kind` are always there; `root` (reserved) is accepted on every kind. The table is the
    /// spec's ("Entries", "Entry kinds", "Version 2 entries") joined with what the writers
    /// write (where they write more than the spec's field table lists, what they write is
    /// allowed, so no log breaks):
    ///
    /// - `genesis`: owner, role; both required.
    /// - `request`: call, signed; both required.
    /// - `result`: call, signed, peer_entry, detail, outcome.
    /// - `executing`: call, signed, peer_head, subject, grant, policy, did_doc; call, signed,
    ///   peer_head and subject required.
    /// - `granted`: as executing, and detail; all but policy and did_doc required.
    /// - `executed`: call, status, resp_len, resp_b3, policy, and from version 2 secret_echo,
    ///   secret_id, secret_version; call, status, resp_len and resp_b3 required.
    /// - `failed`: call, code, detail, policy; all but policy required.
    /// - `abandoned`: call, detail, policy; call and detail required.
    /// - `refused`: call, signed, peer_head, subject, code, detail, policy, did_doc.
    /// - `refusals`: code, detail, count.
    /// - `revocation`: subject, grant, detail; detail required.
    /// - `format` (version 2 on): version, detail; version required.
    /// - `secret` (version 2 on): action, secrets, and detail when the action is
    ///   `kms_rotated`; action and secrets required.
    /// - `witness` (version 2 on, amendment 2.9): signed, subject; both required.
    ///
    /// Version 1 has no `format`, `secret` or `witness` kind. The rules of [`Entry::check_version`]
    /// (a format entry names its own version, `secret_id` with `secret_version`, the secret
    /// states' invariants) are not repeated here.
    pub fn check_fields(&self) -> Result<(), DecodeError> {
        let Some(v) = self.version() else {
            return Err(DecodeError::Version(self.v));
        };
        let kind = format!("{:?}", self.kind).to_lowercase();
        let Some((allowed, required)) = field_rule(self.kind, v) else {
            return Err(DecodeError::Fields(format!(
                "an entry of kind {kind}, which version {v} lacks"
            )));
        };
        let present = self.fields();
        if let Some(field) = first_field(present & !allowed) {
            return Err(DecodeError::Fields(format!(
                "field {field} on an entry of kind {kind} (version {v}), whose table lacks it"
            )));
        }
        if let Some(field) = first_field(required & !present) {
            return Err(DecodeError::Fields(format!(
                "an entry of kind {kind} without its field {field}"
            )));
        }
        if self.detail.is_some()
            && self.kind == EntryKind::Secret
            && self.action != Some(SecretAction::KmsRotated)
        {
            return Err(DecodeError::Fields(
                "field detail on a secret entry whose action is not kms_rotated".into(),
            ));
        }
        Ok(())
    }

    /// The optional fields present, as a set of [`OPTIONAL`] bits.
    fn fields(&self) -> u32 {
        let present = [
            self.call.is_some(),
            self.signed.is_some(),
            self.peer_head.is_some(),
            self.peer_entry.is_some(),
            self.owner.is_some(),
            self.role.is_some(),
            self.subject.is_some(),
            self.grant.is_some(),
            self.status.is_some(),
            self.resp_len.is_some(),
            self.resp_b3.is_some(),
            self.code.is_some(),
            self.detail.is_some(),
            self.count.is_some(),
            self.outcome.is_some(),
            self.policy.is_some(),
            self.did_doc.is_some(),
            self.root.is_some(),
            self.version.is_some(),
            self.secret_echo.is_some(),
            self.secret_id.is_some(),
            self.secret_version.is_some(),
            self.action.is_some(),
            self.secrets.is_some(),
            self.home_rev.is_some(),
        ];
        present
            .iter()
            .enumerate()
            .fold(0, |set, (i, &p)| set | (u32::from(p) << i))
    }

    /// Every value in `bytes`, which decoded as `self`, has its field's CBOR type: `self`
    /// encodes to the same values, keys in any order. (serde converts, e.g. reads a byte
    /// string field from an array of integers; the encoder writes each field in its table's
    /// type.) The writers' own entries encode to the same bytes, which settles them without
    /// building the values.
    fn check_types(&self, bytes: &[u8]) -> Result<(), DecodeError> {
        let own = self.encode();
        if own == bytes {
            return Ok(());
        }
        let given: Value = cbor::from_slice(bytes)?;
        let own: Value = cbor::from_slice(&own)?;
        if same_value(&given, &own) {
            return Ok(());
        }
        let field = match (&given, &own) {
            (Value::Map(given), Value::Map(own)) => given
                .iter()
                .find(|(k, v)| !own.iter().any(|(ok, ov)| ok == k && same_value(v, ov)))
                .and_then(|(k, _)| k.as_text()),
            _ => None,
        };
        Err(DecodeError::Fields(format!(
            "field {} is not of its table's CBOR type",
            field.unwrap_or("(the entry)")
        )))
    }
}

/// The number [`Entry::decode_plain`] gives a field it reads; `None` for the fields it leaves
/// to the strict decoder (`action`, `secrets`) and for unknown keys.
#[inline]
fn plain_field(key: &str) -> Option<u32> {
    Some(match key {
        "v" => 0,
        "seq" => 1,
        "prev" => 2,
        "time_ms" => 3,
        "kind" => 4,
        "call" => 5,
        "signed" => 6,
        "peer_head" => 7,
        "peer_entry" => 8,
        "owner" => 9,
        "role" => 10,
        "subject" => 11,
        "grant" => 12,
        "status" => 13,
        "resp_len" => 14,
        "resp_b3" => 15,
        "code" => 16,
        "detail" => 17,
        "count" => 18,
        "outcome" => 19,
        "policy" => 20,
        "did_doc" => 21,
        "root" => 22,
        "version" => 23,
        "secret_echo" => 24,
        "secret_id" => 25,
        "secret_version" => 26,
        "home_rev" => 27,
        _ => return None,
    })
}

/// A unit enum variant by its serde name, matched by serde itself.
fn unit_variant<T: serde::de::DeserializeOwned>(name: &str) -> Option<T> {
    use serde::de::IntoDeserializer;
    let d: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
        name.into_deserializer();
    T::deserialize(d).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use didgate_protocol::test_util::Rng;

    #[test]
    fn round_trip_and_hash() {
        let mut e = Entry::new(EntryKind::Executed, 5);
        e.seq = 3;
        e.call = Some([1; 32]);
        e.status = Some(200);
        let bytes = e.encode();
        assert_eq!(Entry::decode(&bytes), Ok(e.clone()));
        e.status = Some(201);
        assert_ne!(entry_hash(&bytes), entry_hash(&e.encode()));
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(Entry::decode(&trailing).is_err());
    }

    #[test]
    fn each_version_is_strict() {
        the_format_kind_and_version_field_are_version_2s();
        secret_echo_and_secret_id_follow_amendments_2_1_and_2_3();
        secret_entries_follow_amendment_2_4();
        witness_entries_follow_amendment_2_9();
        for v in [0, 3, u64::MAX] {
            let mut bad = Entry::new(EntryKind::Executed, 5);
            bad.v = v;
            assert_eq!(Entry::decode(&bad.encode()), Err(DecodeError::Version(v)));
        }
    }

    /// Version 1 has no `format` kind and no `version` field; a format entry names its own
    /// version and no other entry carries one.
    fn the_format_kind_and_version_field_are_version_2s() {
        let mut v1 = Entry::new(EntryKind::Executed, 5);
        v1.v = 1;
        assert_eq!(Entry::decode(&v1.encode()), Ok(v1.clone()));
        let format = Entry::format(Version::V2, 6);
        assert_eq!(Entry::decode(&format.encode()), Ok(format.clone()));
        // version 1 has no format kind and no version field
        let mut bad = format.clone();
        bad.v = 1;
        assert_eq!(
            Entry::decode(&bad.encode()),
            Err(DecodeError::Field("kind"))
        );
        bad = v1.clone();
        bad.version = Some(1);
        assert_eq!(
            Entry::decode(&bad.encode()),
            Err(DecodeError::Field("version"))
        );
        // a format entry names its own version; no other entry carries one
        bad = format.clone();
        bad.version = Some(1);
        assert_eq!(
            Entry::decode(&bad.encode()),
            Err(DecodeError::Field("version"))
        );
        bad.version = None;
        assert_eq!(
            Entry::decode(&bad.encode()),
            Err(DecodeError::Field("version"))
        );
        bad = Entry::new(EntryKind::Executed, 5);
        bad.version = Some(2);
        assert_eq!(
            Entry::decode(&bad.encode()),
            Err(DecodeError::Field("version"))
        );
        // a key version 1 lacks is refused even with a null value
        let mut null_key: Value = ciborium::from_reader(v1.encode().as_slice()).expect("cbor");
        if let Value::Map(m) = &mut null_key {
            m.push((Value::Text("version".into()), Value::Null));
        }
        assert!(Entry::decode(&cbor::to_vec(&null_key)).is_err());
    }

    /// `secret_echo` (amendment 2.1) and `secret_id` with `secret_version` (2.3): on executed
    /// entries of version 2 only, the last two both or neither.
    fn secret_echo_and_secret_id_follow_amendments_2_1_and_2_3() {
        // amendment 2.1: secret_echo on executed entries of version 2 only
        let mut echo = Entry::new(EntryKind::Executed, 5);
        echo.secret_echo = Some(2);
        assert_eq!(Entry::decode(&echo.encode()), Ok(echo.clone()));
        echo.v = 1;
        assert_eq!(
            Entry::decode(&echo.encode()),
            Err(DecodeError::Field("secret_echo"))
        );
        echo.v = 2;
        echo.kind = EntryKind::Failed;
        assert_eq!(
            Entry::decode(&echo.encode()),
            Err(DecodeError::Field("secret_echo"))
        );
        // amendment 2.3: the secret a call used, both fields or neither, executed only
        let mut used = Entry::new(EntryKind::Executed, 5);
        used.secret_id = Some([7; 16]);
        used.secret_version = Some(3);
        assert_eq!(Entry::decode(&used.encode()), Ok(used.clone()));
        // a byte string, as the table says (0x50: bstr of 16 bytes after the key)
        let key = b"\x69secret_id\x50";
        assert!(used.encode().windows(key.len()).any(|w| w == key));
        let mut half = used.clone();
        half.secret_version = None;
        assert_eq!(
            Entry::decode(&half.encode()),
            Err(DecodeError::Field("secret_id"))
        );
        used.v = 1;
        assert_eq!(
            Entry::decode(&used.encode()),
            Err(DecodeError::Field("secret_id"))
        );
    }

    /// Amendment 2.4: secret entries, version 2 only, with their invariants.
    fn secret_entries_follow_amendment_2_4() {
        let state = |status, versions: &[(u64, Option<u64>)]| SecretState {
            name: "k".into(),
            id: [7; 16],
            status,
            kek: [1; 8],
            versions: versions
                .iter()
                .map(|&(version, retired_ms)| VersionState {
                    version,
                    fingerprint: sealed_fingerprint(&[7; 16], version, b"x"),
                    retired_ms,
                })
                .collect(),
        };
        let rotated = Entry::secret(
            SecretAction::Rotated,
            vec![state(SecretStatus::Enabled, &[(1, Some(4)), (2, None)])],
            5,
        );
        assert_eq!(Entry::decode(&rotated.encode()), Ok(rotated.clone()));
        let snapshot = Entry::secret(SecretAction::Snapshot, Vec::new(), 5);
        assert_eq!(Entry::decode(&snapshot.encode()), Ok(snapshot.clone()));
        let purged = Entry::secret(
            SecretAction::Purged,
            vec![state(SecretStatus::Purged, &[])],
            5,
        );
        assert_eq!(Entry::decode(&purged.encode()), Ok(purged.clone()));
        for (action, states) in [
            // two current versions, a current version below a retired one, none current
            (
                SecretAction::Rotated,
                vec![state(SecretStatus::Enabled, &[(1, None), (2, None)])],
            ),
            (
                SecretAction::Rotated,
                vec![state(SecretStatus::Enabled, &[(1, None), (2, Some(3))])],
            ),
            (
                SecretAction::Disabled,
                vec![state(SecretStatus::Disabled, &[(1, Some(3))])],
            ),
            // versions out of order, version 0, a purge that keeps versions, two states
            (
                SecretAction::Added,
                vec![state(SecretStatus::Enabled, &[(2, Some(1)), (1, None)])],
            ),
            (
                SecretAction::Added,
                vec![state(SecretStatus::Enabled, &[(0, None)])],
            ),
            (
                SecretAction::Purged,
                vec![state(SecretStatus::Purged, &[(1, None)])],
            ),
            (
                SecretAction::Deleted,
                vec![state(SecretStatus::Purged, &[])],
            ),
            (
                SecretAction::Added,
                vec![state(SecretStatus::Enabled, &[(1, None)]); 2],
            ),
        ] {
            let e = Entry::secret(action, states, 5);
            assert_eq!(
                Entry::decode(&e.encode()),
                Err(DecodeError::Field("secrets")),
                "{e:?}"
            );
        }
        let mut bare = rotated.clone();
        bare.secrets = None;
        assert_eq!(
            Entry::decode(&bare.encode()),
            Err(DecodeError::Field("action"))
        );
        let mut stray = Entry::new(EntryKind::Executed, 5);
        stray.action = Some(SecretAction::Added);
        assert_eq!(
            Entry::decode(&stray.encode()),
            Err(DecodeError::Field("action"))
        );
        let mut old = rotated.clone();
        old.v = 1;
        assert_eq!(
            Entry::decode(&old.encode()),
            Err(DecodeError::Field("kind"))
        );
    }

    /// Amendment 2.9: witness entries, version 2 only, with exactly `signed` and `subject`;
    /// the constructor takes only a checkpoint the peer signed for its own log.
    fn witness_entries_follow_amendment_2_9() {
        use didgate_protocol::Identity;
        use didgate_protocol::message::SignedMessage;
        let (peer, other) = (
            Identity::from_seed(&[0x3c; 32]),
            Identity::from_seed(&[0x3d; 32]),
        );
        let checkpoint = |log: &Identity, by: &Identity| {
            Checkpoint {
                v: 2,
                log: log.did().to_string(),
                chain: [1; 32],
                size: 3,
                head: [2; 32],
                root: [3; 32],
                time_ms: 5,
                node_cert: None,
            }
            .sign(by)
        };
        let signed = checkpoint(&peer, &peer);
        let w = Entry::witness(peer.did(), signed.clone(), 6).expect("the peer's checkpoint");
        assert_eq!(
            (w.kind, w.subject.as_deref(), w.signed.as_deref(), w.time_ms),
            (
                EntryKind::Witness,
                Some(peer.did().as_str()),
                Some(signed.as_slice()),
                6
            )
        );
        let bytes = w.encode();
        assert_eq!(Entry::decode(&bytes), Ok(w.clone()));
        assert_eq!(Entry::decode_strict(&bytes), Ok(w.clone()));
        assert_eq!(Entry::decode_plain(&bytes), Some(w.clone()));
        // version 1 is frozen: no witness kind, by every decoder
        let mut old = w.clone();
        old.v = 1;
        for result in [
            Entry::decode(&old.encode()),
            Entry::decode_strict(&old.encode()),
        ] {
            assert_eq!(result, Err(DecodeError::Field("kind")));
        }
        assert_eq!(Entry::decode_plain(&old.encode()), None);
        // exactly signed and subject, both required
        let mut bare = w.clone();
        bare.subject = None;
        strict_refuses(
            &bare.encode(),
            "entry of kind witness without its field subject",
        );
        bare = w.clone();
        bare.signed = None;
        strict_refuses(
            &bare.encode(),
            "entry of kind witness without its field signed",
        );
        let mut extra = w.clone();
        extra.call = Some([4; 32]);
        strict_refuses(&extra.encode(), "field call on an entry of kind witness");
        for e in [bare, extra] {
            assert_eq!(Entry::decode_plain(&e.encode()), None);
        }
        // the constructor: the peer's own checkpoint for its own log, nothing else
        let refused = |peer: &Identity, bytes: Vec<u8>| Entry::witness(peer.did(), bytes, 6);
        assert!(matches!(
            refused(&other, signed.clone()),
            Err(WitnessError::Signer { .. })
        ));
        assert!(matches!(
            refused(&other, checkpoint(&peer, &other)),
            Err(WitnessError::Signer { .. })
        ));
        let mut broken = signed.clone();
        let last = broken.len() - 1;
        broken[last] ^= 1;
        assert!(matches!(refused(&peer, broken), Err(WitnessError::Open(_))));
        assert!(matches!(
            refused(&peer, b"not a checkpoint".to_vec()),
            Err(WitnessError::Open(_))
        ));
    }

    /// A chain head, as requests carry.
    const HEAD: ChainHead = ChainHead {
        chain: [0x11; 32],
        seq: 4,
        hash: [0x22; 32],
    };

    /// Entries of every kind as the writers build them (gateway, client, store), version 2.
    fn as_written() -> Vec<Entry> {
        let new = |kind: EntryKind, f: &dyn Fn(&mut Entry)| {
            let mut e = Entry::new(kind, 1_700_000_000_000);
            e.seq = 7;
            e.prev = [9; 32];
            f(&mut e);
            e
        };
        // gateway `request_entry`, of a did:key caller (no did_doc) or a did:web one
        let request = |kind: EntryKind, did_doc: Option<Digest>| {
            new(kind, &|e| {
                e.call = Some([3; 32]);
                e.signed = Some(vec![0xd2, 0x84, 0x40]);
                e.subject = Some("did:key:z6Mk".into());
                e.grant = Some([4; 16]);
                e.peer_head = Some(HEAD);
                e.policy = Some([5; 32]);
                e.did_doc = did_doc;
            })
        };
        let result = |outcome: Outcome, signed: bool, peer: bool, detail: bool| {
            new(EntryKind::Result, &|e| {
                e.call = Some([3; 32]);
                e.outcome = Some(outcome);
                e.signed = signed.then(|| vec![0xd2, 0x84]);
                e.peer_entry = peer.then_some(EntryRef {
                    seq: 9,
                    hash: [6; 32],
                });
                e.detail = detail.then(|| "connection lost".into());
            })
        };
        let state = SecretState {
            name: "k".into(),
            id: [7; 16],
            status: SecretStatus::Enabled,
            kek: [1; 8],
            versions: vec![VersionState {
                version: 1,
                fingerprint: [8; 32],
                retired_ms: None,
            }],
        };
        let mut granted = request(EntryKind::Granted, Some([0xdd; 32]));
        granted.detail = Some("expires at 5 ms".into());
        let mut kms = Entry::secret(SecretAction::KmsRotated, vec![state.clone()], 5);
        kms.detail = Some("master key 01 -> 02".into());
        vec![
            new(EntryKind::Genesis, &|e| {
                e.owner = Some("did:key:z6Mk".into());
                e.role = Some(Role::Gateway);
            }),
            new(EntryKind::Request, &|e| {
                e.call = Some([3; 32]);
                e.signed = Some(vec![0xd2, 0x84]);
            }),
            result(Outcome::Receipt, true, true, false),
            result(Outcome::Refusal, true, true, false),
            result(Outcome::Refusal, true, false, false),
            result(Outcome::Unknown, false, false, true),
            result(Outcome::Unknown, true, false, true),
            result(Outcome::Grant, true, false, false),
            request(EntryKind::Executing, None),
            request(EntryKind::Executing, Some([0xdd; 32])),
            granted,
            new(EntryKind::Executed, &|e| {
                e.call = Some([3; 32]);
                e.status = Some(200);
                e.resp_len = Some(70_000);
                e.resp_b3 = Some([10; 32]);
                e.policy = Some([5; 32]);
                e.secret_echo = Some(2);
                e.secret_id = Some([7; 16]);
                e.secret_version = Some(1);
            }),
            new(EntryKind::Failed, &|e| {
                e.call = Some([3; 32]);
                e.code = Some("upstream_failed".into());
                e.detail = Some("connect refused".into());
                e.policy = Some([5; 32]);
            }),
            new(EntryKind::Abandoned, &|e| {
                e.call = Some([3; 32]);
                e.policy = Some([5; 32]);
                e.detail = Some("outcome unknown".into());
            }),
            new(EntryKind::Abandoned, &|e| {
                e.call = Some([3; 32]);
                e.detail = Some("interrupted at seq 3 by a gateway stop".into());
            }),
            new(EntryKind::Refused, &|e| {
                e.policy = Some([5; 32]);
                e.call = Some([3; 32]);
                e.signed = Some(vec![0xd2, 0x84]);
                e.subject = Some("did:web:example.com".into());
                e.did_doc = Some([0xdd; 32]);
                e.peer_head = Some(HEAD);
                e.code = Some("forbidden".into());
                e.detail = Some("no policy permits it".into());
            }),
            new(EntryKind::Refusals, &|e| {
                e.count = Some(3);
                e.code = Some("malformed=3".into());
                e.detail = Some("refusals counted since 1".into());
            }),
            new(EntryKind::Revocation, &|e| {
                e.subject = Some("did:key:z6Mk".into());
                e.detail = Some("key lost".into());
            }),
            new(EntryKind::Revocation, &|e| {
                e.grant = Some([4; 16]);
                e.detail = Some(String::new());
            }),
            Entry::format(Version::V2, 5),
            Entry::secret(SecretAction::Snapshot, Vec::new(), 5),
            Entry::secret(SecretAction::Added, vec![state], 5),
            kms,
            new(EntryKind::Witness, &|e| {
                e.signed = Some(vec![0xd2, 0x84]);
                e.subject = Some("did:key:z6Mk".into());
            }),
        ]
    }

    /// The same entries as a version 1 writer builds them (no version 2 kind or field).
    fn as_written_v1() -> Vec<Entry> {
        as_written()
            .into_iter()
            .filter(|e| {
                !matches!(
                    e.kind,
                    EntryKind::Format | EntryKind::Secret | EntryKind::Witness
                )
            })
            .map(|mut e| {
                e.v = 1;
                (e.secret_echo, e.secret_id, e.secret_version) = (None, None, None);
                e
            })
            .collect()
    }

    /// `e`'s encoding with field `key` set to `value` (added when absent).
    fn with(e: &Entry, key: &str, value: Value) -> Vec<u8> {
        let mut map: Value = cbor::from_slice(&e.encode()).expect("own entry");
        if let Value::Map(m) = &mut map {
            match m.iter_mut().find(|(k, _)| k.as_text() == Some(key)) {
                Some((_, v)) => *v = value,
                None => m.push((Value::Text(key.into()), value)),
            }
        }
        cbor::to_vec(&map)
    }

    /// `bytes` with the first occurrence of `from` replaced by `to`.
    fn splice(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
        let at = bytes
            .windows(from.len())
            .position(|w| w == from)
            .expect("pattern present");
        [&bytes[..at], to, &bytes[at + from.len()..]].concat()
    }

    /// The first entry of `kind` in [`as_written`].
    fn written(kind: EntryKind) -> Entry {
        as_written()
            .into_iter()
            .find(|e| e.kind == kind)
            .expect("an entry of the kind")
    }

    /// An executed entry of version 2 as the gateway writes it.
    fn executed() -> Entry {
        written(EntryKind::Executed)
    }

    /// `Entry::decode` takes `bytes` for `e`, and `decode_strict` refuses them for `why`.
    fn lenient_only(bytes: &[u8], e: &Entry, why: &str) {
        assert_eq!(Entry::decode(bytes).as_ref(), Ok(e), "{why}");
        strict_refuses(bytes, why);
    }

    /// Both decoders refuse `bytes`; `decode_strict` says `why`. A byte string given as an
    /// array of integers is refused by every decoder since issue 18.
    fn both_refuse(bytes: &[u8], why: &str) {
        assert!(
            Entry::decode(bytes).is_err(),
            "{why}: the lenient decoder took it"
        );
        assert!(
            matches!(
                Entry::decode_strict(bytes),
                Err(DecodeError::Malformed(_)
                    | DecodeError::Encoding { .. }
                    | DecodeError::Fields(_))
            ),
            "{why}: the strict decoder took it"
        );
    }

    /// `decode_strict` refuses `bytes`, saying `why`.
    fn strict_refuses(bytes: &[u8], why: &str) {
        match Entry::decode_strict(bytes) {
            Err(
                e @ (DecodeError::Malformed(_)
                | DecodeError::Encoding { .. }
                | DecodeError::Fields(_)),
            ) => {
                let m = e.to_string();
                assert!(m.contains(why), "{m:?} lacks {why:?}");
            }
            other => panic!("{why}: {other:?}"),
        }
    }

    #[test]
    fn decode_strict_accepts_entries_as_the_writers_build_them() {
        for e in as_written().into_iter().chain(as_written_v1()) {
            assert_eq!(Entry::decode_strict(&e.encode()), Ok(e.clone()), "{e:?}");
            assert_eq!(e.check_fields(), Ok(()), "{e:?}");
        }
        // the reserved root, on any kind
        for mut e in as_written() {
            e.root = Some([0x77; 32]);
            assert_eq!(Entry::decode_strict(&e.encode()), Ok(e.clone()), "{e:?}");
        }
    }

    #[test]
    fn decode_strict_accepts_any_key_order() {
        for e in as_written() {
            let mut map: Value = cbor::from_slice(&e.encode()).expect("own entry");
            if let Value::Map(m) = &mut map {
                m.reverse();
                if let Some((_, Value::Map(head))) =
                    m.iter_mut().find(|(k, _)| k.as_text() == Some("peer_head"))
                {
                    head.reverse();
                }
            }
            let bytes = cbor::to_vec(&map);
            assert_ne!(bytes, e.encode());
            assert_eq!(Entry::decode_strict(&bytes), Ok(e.clone()), "{e:?}");
        }
    }

    #[test]
    fn decode_strict_refuses_an_indefinite_length_map() {
        let e = executed();
        let bytes = e.encode();
        // 0xa0 + n: a map of n < 24 pairs; 0xbf .. 0xff: the same pairs, indefinite length
        assert!((0xa0..0xb8).contains(&bytes[0]));
        let indefinite = [&[0xbf], &bytes[1..], &[0xff]].concat();
        lenient_only(&indefinite, &e, "an indefinite length at byte 0");
    }

    #[test]
    fn decode_strict_refuses_an_indefinite_length_byte_string() {
        let mut e = written(EntryKind::Request);
        e.signed = Some(b"abcd".to_vec());
        let bytes = e.encode();
        // "signed": h'61626364' as two chunks, h'6162' h'6364'
        let indefinite = splice(
            &bytes,
            b"\x66signed\x44abcd",
            b"\x66signed\x5f\x42ab\x42cd\xff",
        );
        lenient_only(&indefinite, &e, "an indefinite length");
    }

    #[test]
    fn decode_strict_refuses_a_non_shortest_integer() {
        let e = executed();
        // seq 7 as 0x18 0x07 (one byte more than it needs), status 200 as 0x19 0x00 0xc8
        let long_seq = splice(&e.encode(), b"\x63seq\x07", b"\x63seq\x18\x07");
        lenient_only(&long_seq, &e, "an argument not in its shortest form");
        let long_status = splice(
            &e.encode(),
            b"\x66status\x18\xc8",
            b"\x66status\x19\x00\xc8",
        );
        lenient_only(&long_status, &e, "an argument not in its shortest form");
        // a length: prev's 32 bytes as 0x59 0x00 0x20
        let long_len = splice(&e.encode(), b"\x64prev\x58\x20", b"\x64prev\x59\x00\x20");
        lenient_only(&long_len, &e, "an argument not in its shortest form");
    }

    #[test]
    fn decode_strict_refuses_a_tag() {
        let e = executed();
        // tag 1 (epoch time) on seq
        let tagged = splice(&e.encode(), b"\x63seq\x07", b"\x63seq\xc1\x07");
        lenient_only(&tagged, &e, "a tag");
    }

    #[test]
    fn decode_strict_refuses_null() {
        let e = executed();
        // an unused field given as null reads as absent to serde
        let null = with(&e, "grant", Value::Null);
        lenient_only(&null, &e, "null");
        // undefined likewise, and any other simple value or float
        let undefined = splice(&null, b"\x65grant\xf6", b"\x65grant\xf7");
        lenient_only(&undefined, &e, "a float or a simple value");
        let float = with(&e, "status", Value::Float(200.0));
        strict_refuses(&float, "a float or a simple value");
    }

    #[test]
    fn decode_strict_refuses_a_byte_string_given_as_an_array() {
        let e = executed();
        let ints = |b: &[u8]| Value::Array(b.iter().map(|&x| Value::from(x)).collect());
        let prev = with(&e, "prev", ints(&e.prev));
        both_refuse(&prev, "field prev is not of its table's CBOR type");
        let id = with(&e, "secret_id", ints(&[7; 16]));
        both_refuse(&id, "field secret_id is not of its table's CBOR type");
        // nested: peer_head's hash
        let x = &written(EntryKind::Executing);
        let mut head: Value = cbor::from_slice(&cbor::to_vec(&HEAD)).expect("head");
        if let Value::Map(m) = &mut head {
            m[2].1 = ints(&HEAD.hash);
        }
        let nested = with(x, "peer_head", head);
        both_refuse(&nested, "field peer_head is not of its table's CBOR type");
    }

    #[test]
    fn decode_strict_refuses_a_field_the_kind_lacks() {
        // fields no writer writes for the kind and the spec does not list
        let mut count = executed();
        count.count = Some(1);
        let mut owner = written(EntryKind::Request);
        owner.owner = Some("did:key:z6Mk".into());
        let mut policy = written(EntryKind::Refusals);
        policy.policy = Some([5; 32]);
        let mut detail = Entry::secret(SecretAction::Snapshot, Vec::new(), 5);
        detail.detail = Some("why".into());
        for e in [count, owner, policy, detail] {
            assert_eq!(Entry::decode(&e.encode()), Ok(e.clone()));
            strict_refuses(&e.encode(), "field ");
            assert!(e.check_fields().is_err());
        }
        // a required field missing
        let mut genesis = written(EntryKind::Genesis);
        genesis.role = None;
        assert_eq!(Entry::decode(&genesis.encode()), Ok(genesis.clone()));
        strict_refuses(
            &genesis.encode(),
            "entry of kind genesis without its field role",
        );
        let mut closing = executed();
        closing.resp_b3 = None;
        strict_refuses(
            &closing.encode(),
            "entry of kind executed without its field resp_b3",
        );
        // what check_version refuses, decode_strict refuses as decode does
        let mut v1 = executed();
        v1.v = 1;
        assert_eq!(
            Entry::decode_strict(&v1.encode()),
            Err(DecodeError::Field("secret_echo"))
        );
    }

    #[test]
    fn decode_strict_refuses_other_malformed_encodings() {
        let e = executed();
        let bytes = e.encode();
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(
            Entry::decode_strict(&trailing),
            Err(DecodeError::Trailing(1))
        );
        // cut inside secret_id's 16 bytes (the last field but one)
        strict_refuses(&bytes[..bytes.len() - 20], "a string longer than the input");
        strict_refuses(&[0xbb, 0xff], "the input ending inside an item's head");
        strict_refuses(&[0xb9, 0xff, 0xff], "more items than the input holds");
        strict_refuses(&[0xbc], "reserved additional information");
        strict_refuses(&[0xff], "a break");
        // a map key that is not text (serde would take the bytes "seq" for the key seq)
        let bytes_key = splice(&bytes, b"\x63seq", b"\x43seq");
        strict_refuses(&bytes_key, "a map key that is not a text string");
        let bad_utf8 = splice(&bytes, b"\x66status", b"\x66st\xffus");
        strict_refuses(&bad_utf8, "not UTF-8");
        // 32 nested arrays are well-formed (and no entry); 33 are refused
        let nest = |n: usize| [vec![0x81; n], vec![0x00]].concat();
        assert!(check_encoding(&nest(32)).is_ok());
        strict_refuses(&nest(33), "nested deeper than 32");
        assert!(check_encoding(&bytes).is_ok());
    }

    #[test]
    fn optional_fields_follow_the_struct() {
        let mut all = executed();
        all.signed = Some(Vec::new());
        all.peer_head = Some(HEAD);
        all.peer_entry = Some(EntryRef {
            seq: 1,
            hash: [1; 32],
        });
        all.owner = Some(String::new());
        all.role = Some(Role::Client);
        all.subject = Some(String::new());
        all.grant = Some([1; 16]);
        all.code = Some(String::new());
        all.detail = Some(String::new());
        all.count = Some(1);
        all.outcome = Some(Outcome::Unknown);
        all.did_doc = Some([1; 32]);
        all.root = Some([1; 32]);
        all.version = Some(2);
        all.action = Some(SecretAction::Snapshot);
        all.secrets = Some(Vec::new());
        all.home_rev = Some(1);
        assert_eq!(all.fields(), (1 << OPTIONAL.len()) - 1);
        let map: Value = cbor::from_slice(&all.encode()).expect("own entry");
        let keys: Vec<_> = map
            .as_map()
            .expect("a map")
            .iter()
            .filter_map(|(k, _)| k.as_text())
            .collect();
        assert_eq!(keys[5..], OPTIONAL);
    }

    /// The chains the previous release (b9992ca) wrote and exported pass the strict decoder.
    #[test]
    fn decode_strict_accepts_the_previous_release_exports() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/release-b9992ca");
        let mut n = 0;
        for file in ["gateway.cbor", "alice.cbor", "bob.cbor"] {
            let chain = crate::export::import(&dir.join(file), file).expect("fixture export");
            for (seq, bytes) in &chain.entries {
                let e = Entry::decode_strict(bytes);
                assert_eq!(e, Entry::decode(bytes), "{file} entry {seq}");
                assert!(e.is_ok(), "{file} entry {seq}: {e:?}");
                n += 1;
            }
        }
        assert_eq!(n, 9 + 5 + 5);
    }

    /// Every entry of the spec's vectors that decodes decodes strictly, to the same value.
    #[test]
    fn decode_strict_agrees_on_the_spec_vectors() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs/vectors");
        let mut n = 0;
        for file in ["format-switch.json", "secret-lifecycle.json"] {
            let text = std::fs::read_to_string(dir.join(file)).expect("vector file");
            let json: serde_json::Value = serde_json::from_str(&text).expect("json");
            let chains = json["chains"].as_array().expect("chains");
            for entry in chains
                .iter()
                .flat_map(|c| c["entries"].as_array().expect("entries"))
            {
                let bytes = hex::decode(entry["bytes"].as_str().expect("hex")).expect("hex");
                if let Ok(e) = Entry::decode(&bytes) {
                    assert_eq!(Entry::decode_strict(&bytes), Ok(e), "{file}");
                    n += 1;
                }
            }
        }
        assert!(n > 20, "{n} entries");
    }

    fn random_entry(rng: &mut Rng) -> Entry {
        let kinds = [
            EntryKind::Genesis,
            EntryKind::Request,
            EntryKind::Result,
            EntryKind::Executing,
            EntryKind::Executed,
            EntryKind::Failed,
            EntryKind::Abandoned,
            EntryKind::Refused,
            EntryKind::Refusals,
            EntryKind::Witness,
        ];
        let mut e = Entry::new(kinds[rng.below(kinds.len() as u64) as usize], rng.int());
        e.seq = rng.int();
        e.prev = rng.digest();
        let maybe = |rng: &mut Rng| rng.below(3) == 0;
        if maybe(rng) {
            e.call = Some(rng.digest());
        }
        if maybe(rng) {
            e.signed = Some(vec![rng.next() as u8; rng.below(300) as usize]);
        }
        if maybe(rng) {
            e.peer_head = Some(ChainHead {
                chain: rng.digest(),
                seq: rng.int(),
                hash: rng.digest(),
            });
        }
        if maybe(rng) {
            e.peer_entry = Some(EntryRef {
                seq: rng.int(),
                hash: rng.digest(),
            });
        }
        if maybe(rng) {
            e.owner = Some(rng.text());
        }
        if maybe(rng) {
            e.role = Some([Role::Gateway, Role::Client][rng.below(2) as usize]);
        }
        if maybe(rng) {
            e.subject = Some(rng.text());
        }
        if maybe(rng) {
            e.grant = Some([rng.next() as u8; 16]);
        }
        if maybe(rng) {
            e.status = Some(rng.int() as u16);
        }
        if maybe(rng) {
            e.resp_len = Some(rng.int());
        }
        if maybe(rng) {
            e.resp_b3 = Some(rng.digest());
        }
        if maybe(rng) {
            e.code = Some(rng.text());
        }
        if maybe(rng) {
            e.detail = Some(rng.text());
        }
        if maybe(rng) {
            e.count = Some(rng.int());
        }
        if maybe(rng) {
            e.outcome =
                Some([Outcome::Receipt, Outcome::Refusal, Outcome::Unknown][rng.below(3) as usize]);
        }
        for field in [&mut e.policy, &mut e.did_doc, &mut e.root] {
            if rng.below(5) == 0 {
                *field = Some(rng.digest());
            }
        }
        // both versions; version 2 has the format kind and its version field
        match rng.below(4) {
            // version 1 has no witness kind (every decoder refuses it: tested on its own)
            0 if e.kind != EntryKind::Witness => e.v = 1,
            1 => {
                e.kind = EntryKind::Format;
                e.version = Some(e.v);
            }
            2 => {
                e.kind = EntryKind::Executed;
                e.secret_echo = Some(rng.int());
                if rng.below(2) == 0 {
                    e.secret_id = Some([rng.next() as u8; 16]);
                    e.secret_version = Some(rng.int());
                }
            }
            _ => {}
        }
        e
    }

    /// The fast entry decoder gives `Entry::decode`'s value on what the writer encodes, and
    /// whenever it accepts altered bytes, `Entry::decode` accepts them with the same value.
    #[test]
    fn fast_entry_decoder_agrees_with_entry_decode() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut accepted_altered = 0;
        let mut accepted_fresh = 0;
        // random fields mostly break the kinds' field tables: draw until enough pass (bounded)
        for _ in 0..400_000 {
            if accepted_fresh >= 300 {
                break;
            }
            let e = random_entry(&mut rng);
            let bytes = e.encode();
            assert_eq!(Entry::decode(&bytes), Ok(e.clone()));
            // random fields break the kinds' field tables: the fast path and the strict decoder
            // agree on which, and on the value when they accept
            let strict = Entry::decode_strict(&bytes).ok();
            assert_eq!(Entry::decode_plain(&bytes), strict);
            if strict.is_none() {
                continue;
            }
            accepted_fresh += 1;
            for _ in 0..20 {
                let mut altered = bytes.clone();
                match rng.below(4) {
                    0 => {
                        let i = rng.below(altered.len() as u64) as usize;
                        altered[i] ^= 1 << rng.below(8);
                    }
                    1 => {
                        let i = rng.below(altered.len() as u64) as usize;
                        altered[i] = rng.next() as u8;
                    }
                    2 => altered.truncate(rng.below(altered.len() as u64) as usize),
                    _ => {
                        let i = rng.below(altered.len() as u64) as usize;
                        altered.insert(i, rng.next() as u8);
                    }
                }
                if let Some(fast) = Entry::decode_plain(&altered) {
                    accepted_altered += 1;
                    assert_eq!(Entry::decode_strict(&altered), Ok(fast), "{altered:02x?}");
                }
            }
        }
        assert!(accepted_fresh > 100, "{accepted_fresh}");
        assert!(accepted_altered > 100, "{accepted_altered}");
        // forms the writer never produces are left to Entry::decode
        let e = random_entry(&mut rng);
        let value: Value = ciborium::from_reader(e.encode().as_slice()).expect("cbor");
        let mut tagged = Vec::new();
        ciborium::into_writer(&Value::Tag(55799, Box::new(value)), &mut tagged).expect("encode");
        assert_eq!(Entry::decode_plain(&tagged), None);
        let mut wide_v = e.encode();
        let v = e.v as u8;
        let at = wide_v
            .windows(3)
            .position(|w| w == [0x61, b'v', v])
            .expect("v");
        wide_v.splice(at + 2..at + 3, [0x18, v]);
        assert_eq!(Entry::decode_plain(&wide_v), None);
    }

    /// On the entries of the spec's vectors, of the previous release's exports and of the
    /// committed fuzz corpus, the fast decoder agrees with the strict one whenever it accepts
    /// an entry, and it accepts every vector entry the strict decoder accepts, but the secret
    /// entries it leaves to the strict decoder.
    #[test]
    fn decode_plain_agrees_on_the_vectors_and_the_corpus() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut vectors = Vec::new();
        for file in didgate_protocol::test_util::VECTOR_FILES {
            let path = root.join("specs/vectors").join(file);
            let text = std::fs::read_to_string(path).expect("vector file");
            let json: serde_json::Value = serde_json::from_str(&text).expect("json");
            let (entries, _) = didgate_protocol::test_util::vector_hex(&json);
            vectors.extend(entries.iter().map(|h| hex::decode(h).expect("hex")));
        }
        let (mut strict, mut plain) = (0, 0);
        for bytes in &vectors {
            let fast = Entry::decode_plain(bytes);
            match Entry::decode_strict(bytes) {
                Ok(e) if e.kind == EntryKind::Secret => assert_eq!(fast, None),
                Ok(e) => {
                    strict += 1;
                    assert_eq!(fast, Some(e));
                }
                Err(_) => assert_eq!(fast, None, "{bytes:02x?}"),
            }
            plain += usize::from(fast.is_some());
        }
        assert_eq!(plain, strict);
        assert!(plain > 200, "{plain} of {}", vectors.len());
        let mut corpus = Vec::new();
        let fixtures = root.join("tests/fixtures/release-b9992ca");
        for file in ["gateway.cbor", "alice.cbor", "bob.cbor"] {
            let chain = crate::export::import(&fixtures.join(file), file).expect("fixture export");
            corpus.extend(chain.entries.into_iter().map(|(_, bytes)| bytes));
        }
        let dir = root.join("fuzz/corpus/entry");
        for file in std::fs::read_dir(dir).expect("the committed fuzz corpus") {
            corpus.push(std::fs::read(file.expect("a corpus file").path()).expect("read"));
        }
        let mut accepted = 0;
        for bytes in &corpus {
            if let Some(fast) = Entry::decode_plain(bytes) {
                accepted += 1;
                assert_eq!(Entry::decode_strict(bytes), Ok(fast), "{bytes:02x?}");
            }
        }
        assert!(accepted >= 19, "{accepted} of {}", corpus.len());
    }
}

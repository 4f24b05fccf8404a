//! Audit entries and their hashes (specs/audit-log.md, "Entries").
//!
//! An entry is a versioned CBOR map; its hash is BLAKE3 in derive-key mode with the context
//! [`ENTRY_CONTEXT`] over the entry's exact stored bytes. A chain's id is the hash of its
//! entry 0 (the genesis, which names the owner DID).
//!
//! Versions (specs/audit-log.md, "Format evolution"): every entry carries `v`. Version 2 is
//! version 1 plus the `format` kind, the entry at which a chain switches from version 1 to 2;
//! each version's decoder stays strict (a version 1 entry with the `format` kind or the
//! `version` field is refused).

use didgate_protocol::Version;
use didgate_protocol::cbor::{self, DecodeError, fixed, fixed_opt};
use didgate_protocol::message::{ChainHead, Digest, EntryRef};
use serde::{Deserialize, Serialize};

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
    #[serde(with = "serde_bytes", default, skip_serializing_if = "Option::is_none")]
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
        }
    }

    /// A `secret` entry (amendment 2.4): `action` on `secrets`, as they are after it.
    pub fn secret(action: SecretAction, secrets: Vec<SecretState>, time_ms: u64) -> Self {
        let mut e = Self::new(EntryKind::Secret, time_ms);
        e.action = Some(action);
        e.secrets = Some(secrets);
        e
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
            (Version::V1, EntryKind::Format, _) => Err(DecodeError::Field("kind")),
            (Version::V1, _, Some(_)) => Err(DecodeError::Field("version")),
            (_, EntryKind::Format, Some(to)) if to == self.v => Ok(()),
            (_, EntryKind::Format, _) => Err(DecodeError::Field("version")),
            (_, _, Some(_)) => Err(DecodeError::Field("version")),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // a key version 1 lacks is refused even with a null value
        let mut null_key: ciborium::Value =
            ciborium::from_reader(v1.encode().as_slice()).expect("cbor");
        if let ciborium::Value::Map(m) = &mut null_key {
            m.push((
                ciborium::Value::Text("version".into()),
                ciborium::Value::Null,
            ));
        }
        assert!(Entry::decode(&cbor::to_vec(&null_key)).is_err());
        // amendment 2.4: secret entries, version 2 only, with their invariants
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
        for v in [0, 3, u64::MAX] {
            bad = Entry::new(EntryKind::Executed, 5);
            bad.v = v;
            assert_eq!(Entry::decode(&bad.encode()), Err(DecodeError::Version(v)));
        }
    }
}

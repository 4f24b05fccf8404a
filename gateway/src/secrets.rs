//! The secret lifecycle: add, rotate with a grace window, disable and enable, soft delete and
//! purge, list, test against the upstream, and master-key rotation (specs/operation.md, "Secrets
//! at rest").
//!
//! Owns the stored record ([`SecretRecord`], CBOR v2, still reading v1), the pure lifecycle
//! functions over it (every one takes `now_ms`, so the grace window and the purge are tested
//! with explicit timestamps), and [`Secrets`], the store-backed manager the gateway opens at
//! start and the admin commands open when no daemon runs. It does not own the cryptography
//! ([`crate::kms`]) or the control socket's framing ([`crate::control`]).
//!
//! # Versions and the grace window
//! A record holds every version still usable. The current version is the highest one without
//! `retired_ms`; calls always inject it. `rotate` seals the new value as the next version and
//! retires the previous current one at `now`. A retired version stays sealed in the record and
//! usable (`secret test NAME --version N`) until `retired_ms + secret_grace_secs`; from then on
//! it cannot be opened, and the next write or upkeep removes it from the record ("sealed off":
//! its wrapped data key and ciphertext are deleted, only a history event remains).
//!
//! # Status
//! `enabled` (calls may use it), `disabled` (calls get `secret_unavailable`), or `deleted` at
//! some time: refused like a disabled secret, restored by `enable` (or `disable`) for
//! [`DELETE_RETENTION_MS`] (90 days), then purged: the record is removed and the name is free.
//!
//! # Last use
//! A call records its time in memory only (a write per call would cost an fsync). The running
//! gateway persists the newest times every [`UPKEEP_SECS`] seconds and at shutdown, and
//! `secret list` through the control socket reports the in-memory value, so what is lost in a
//! crash is at most the last minute of "last use".
//!
//! # Master-key rotation and crashes
//! `kms rotate` ([`Secrets::kms_rotate`]) never decrypts a secret: for every version it unwraps
//! the data key under the old master key and wraps it under the new one. Every record names the
//! master key that wraps its data keys by its [`KeyId`] (`kek`). The steps:
//!
//! 1. write the new key to `master.key.new` (created 0600, file and directory fsynced);
//! 2. rewrap every record in memory, then write them all in one atomic, durable store batch,
//!    each now naming the new key's id, with the chain's `kms_rotated` entry;
//! 3. rename `master.key.new` over `master.key` and fsync the directory.
//!
//! A crash leaves one of these states, and [`Secrets::open`] (every start, every direct admin
//! command) repairs it before anything reads a secret:
//! - no `master.key.new`: nothing started, or everything finished; `master.key` matches.
//! - `master.key.new` exists (possibly torn) and **no** record names its id: the batch did not
//!   commit (batches are atomic), so every record still names the old key in `master.key`;
//!   the pending file is deleted.
//! - `master.key.new` exists and records name its id: the batch committed (the file was fsynced
//!   before it, so it is whole); the rename is redone.
//!
//! A running daemon keeps both keys in its key ring from step 1 until step 3, and a call holds
//! the ring's read lock while it reads the record and unwraps, so calls work throughout. With
//! the master key in [`crate::kms::MASTER_KEY_ENV`] rotation is refused: the gateway cannot
//! change the environment. The old key's bytes are overwritten in memory (zeroized) but the
//! file system may keep the old `master.key` blocks: rotation protects against a later leak of
//! the old key, not against forensic recovery of the disk.
//!
//! # Audit
//! Every lifecycle write is a `secret` entry of the gateway's chain (specs/audit-log.md,
//! amendment 2.4), appended in the same durable batch as the record it writes (the record goes
//! with the entry as a [`ClaimRule::Put`] or [`ClaimRule::Remove`] claim): add, rotate,
//! disable, enable, delete, restore, sealing off, purge and `kms rotate`. An entry lists the
//! secrets concerned as they are after the write ([`SecretRecord::state`]: name, id, status,
//! master key id, each version's number and ciphertext fingerprint), never a value or a display
//! form. The first time a release with these entries opens a store, [`Secrets::open`] writes
//! one `snapshot` entry of every secret (the mark in [`LIFECYCLE`] makes it once), so every later
//! `executed` entry names a version the chain declared. A write whose entry cannot be appended
//! does not happen. Persisting last-use times is not a lifecycle event and writes the store
//! directly. Events are also logged to stderr (target `didgate_gateway::secrets`) and kept in
//! the record's `history` (the last [`HISTORY_LIMIT`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use didgate_audit::entry::{
    Entry, SecretAction, SecretState, SecretStatus, VersionState, sealed_fingerprint,
};
use didgate_audit::store::{Append, AppendError, Claim, ClaimRule, Store};
use didgate_audit::{Chain, StoreError};
use didgate_protocol::cbor::{self, fixed};
use didgate_protocol::message::{ChainHead, Request as CallRequest};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::sync::watch;
use zeroize::Zeroizing;

use crate::config::{ConfigError, Upstream};
use crate::datadir::{DataDir, LIFECYCLE, SECRETS};
use crate::kms::{KeyId, Kms, KmsError, LocalKms, SealedVersion};
use crate::pkcs11::{Pkcs11Kms, Token, TokenConfig};
use crate::upstream;
use didgate_io::now_ms;

/// How long a deleted secret stays recoverable before it is purged: 90 days, in ms.
pub const DELETE_RETENTION_MS: u64 = 90 * 24 * 3600 * 1000;
pub use crate::config::DEFAULT_GRACE_SECS;
/// How often a running gateway seals off expired versions, purges deleted secrets and persists
/// last-use times, seconds.
pub const UPKEEP_SECS: u64 = 60;
/// Lifecycle events kept per record (the oldest are dropped).
pub const HISTORY_LIMIT: usize = 32;
/// Record version written.
const RECORD_V2: u64 = 2;
/// [`LIFECYCLE`] key of the snapshot mark: the time (u64be ms) the snapshot entry was written.
const SNAPSHOT_MARK: &[u8] = b"snapshot";
/// [`LIFECYCLE`] key naming the current master key when it is in a PKCS#11 token: its 8-byte
/// id (`CKA_ID`). Written in the same batch as the records rewrapped under it (`kms
/// init-pkcs11`, `kms migrate --to pkcs11`, `kms rotate`); absent while the key is a file.
const TOKEN_KEY_MARK: &[u8] = b"kms_token_key";

/// Why a secret operation failed. Never carries secret material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// No record of that name.
    #[error("secret {0} is not stored")]
    NotFound(String),
    /// A record of that name exists.
    #[error("secret {0} exists{1}")]
    Exists(String, &'static str),
    /// Disabled, deleted, or the version asked for is gone.
    #[error("secret {0} is {1}")]
    Unavailable(String, String),
    /// Bad input.
    #[error("{0}")]
    Invalid(String),
    /// A stored record does not decode or breaks an invariant.
    #[error("secret record {0} is malformed")]
    Malformed(String),
    /// KMS.
    #[error(transparent)]
    Kms(#[from] KmsError),
    /// Store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// I/O on a key file or the control socket.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// A master-key rotation stopped after its first step; both keys stay loaded, and the next
    /// start or `kms rotate` finishes or rolls it back.
    #[error(
        "master-key rotation did not finish ({0}); calls keep working, and the next start or \
         `didgated kms rotate` finishes or rolls it back"
    )]
    RotationIncomplete(#[source] RotationStop),
    /// The data directory may be written by others, or its modes cannot be tightened.
    #[error("data directory: {0}")]
    DataDir(#[from] didgate_io::hardening::HardeningError),
    /// The token: unusable, or refused an operation.
    #[error(transparent)]
    Token(#[from] crate::pkcs11::TokenError),
    /// The lifecycle entry could not be appended to the gateway's chain: nothing was written.
    #[error("the audit log cannot be written, so nothing changed: {0}")]
    Audit(#[source] AppendError),
    /// A record from the cluster is older than the one held (rollback guard).
    #[error(
        "the cluster's record of {name} is older than this node's (version {offered} < {held}): not taken"
    )]
    Older {
        /// The secret.
        name: String,
        /// The newest version the record offered.
        offered: u64,
        /// The newest version held.
        held: u64,
    },
    /// A blocking task (`what`) did not finish (it panicked or was cancelled).
    #[error("{what}: {source}")]
    Task {
        /// What the task did.
        what: &'static str,
        /// Why it did not finish.
        #[source]
        source: tokio::task::JoinError,
    },
    /// The gateway identity (it signs the chain) cannot be loaded.
    #[error("the gateway identity: {0}")]
    Identity(#[source] didgate_io::identity::IdentityError),
    /// The HTTP client of `secret test` cannot be built.
    #[error(transparent)]
    HttpClient(#[from] crate::egress::ClientError),
}

/// Why a master-key rotation stopped after its first step ([`SecretError::RotationIncomplete`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RotationStop {
    /// The batch's entry may have committed before its sync failed.
    #[error(transparent)]
    Audit(AppendError),
    /// Replacing or removing the old key file failed.
    #[error(transparent)]
    Io(std::io::Error),
    /// Syncing the key's directory failed.
    #[error(transparent)]
    Sync(Box<SecretError>),
}

/// A secret value in transit to `secret add` or `secret rotate` (stdin, then the control
/// socket). Zeroized on drop; its `Debug` is redacted.
#[derive(Clone)]
pub struct SecretValue(Zeroizing<String>);

impl SecretValue {
    /// Wraps a value.
    pub fn new(value: Zeroizing<String>) -> Self {
        Self(value)
    }
    /// The plaintext, for sealing it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretValue(<redacted>)")
    }
}

impl Serialize for SecretValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SecretValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Self(Zeroizing::new(String::deserialize(d)?)))
    }
}

/// Whether calls may use a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Status {
    /// Calls may use it.
    Enabled,
    /// Calls are refused with `secret_unavailable`.
    Disabled,
    /// Soft-deleted at `at_ms`: refused, recoverable until `at_ms + DELETE_RETENTION_MS`.
    Deleted {
        /// When it was deleted, ms since the Unix epoch.
        at_ms: u64,
    },
}

impl Status {
    /// `enabled`, `disabled` or `deleted`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Enabled => "enabled",
            Self::Disabled => "disabled",
            Self::Deleted { .. } => "deleted",
        }
    }
}

/// One lifecycle event kept in a record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// `added`, `rotated`, `disabled`, `enabled`, `deleted`, `restored`, `sealed_off` or
    /// `rewrapped`.
    pub action: String,
    /// The version it concerns (the new one for `rotated`, the removed one for `sealed_off`).
    pub version: u64,
}

/// A stored secret: ciphertexts and metadata only (specs/operation.md, "Secrets at rest").
#[derive(Debug, Clone)]
pub struct SecretRecord {
    /// Immutable random id, bound into every version's ciphertexts.
    pub id: [u8; 16],
    /// Name (also the store key).
    pub name: String,
    /// Id of the master key that wraps every version's data key.
    pub kek: KeyId,
    /// Versions still held, ascending; exactly one (the highest) is not retired.
    pub versions: Vec<SealedVersion>,
    /// Whether calls may use it.
    pub status: Status,
    /// Last call that used it, as last persisted.
    pub last_used_ms: Option<u64>,
    /// Lifecycle events, oldest first, at most [`HISTORY_LIMIT`].
    pub history: Vec<Event>,
}

/// Which secret a call used: its immutable id and the version opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecretUse {
    /// The secret's immutable id.
    pub id: [u8; 16],
    /// The version opened.
    pub version: u64,
}

/// The v2 record as stored.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireV2 {
    v: u64,
    #[serde(with = "fixed")]
    id: [u8; 16],
    name: String,
    #[serde(with = "fixed")]
    kek: KeyId,
    status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    deleted_ms: Option<u64>,
    versions: Vec<SealedVersion>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_used_ms: Option<u64>,
    history: Vec<Event>,
}

/// The v1 record (one version, an `enabled` flag), still read.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireV1 {
    v: u64,
    #[serde(with = "fixed")]
    id: [u8; 16],
    name: String,
    version: u64,
    display: String,
    enabled: bool,
    #[serde(with = "cbor::bytes")]
    wrapped_key: Vec<u8>,
    #[serde(with = "cbor::bytes")]
    sealed: Vec<u8>,
}

/// A secret as `list` and every lifecycle command report it: never a value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretInfo {
    /// Name.
    pub name: String,
    /// Current version.
    pub version: u64,
    /// Display form of the current version (`sk-live-...9f2c`).
    pub display: String,
    /// `enabled`, `disabled` or `deleted`.
    pub status: String,
    /// When it was deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_ms: Option<u64>,
    /// When a deleted secret is purged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purge_ms: Option<u64>,
    /// Last call that used it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_ms: Option<u64>,
    /// Id of the master key wrapping its data keys (hex).
    pub key_id: String,
    /// Every version held, ascending.
    pub versions: Vec<VersionInfo>,
}

/// One version in a [`SecretInfo`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// Version number.
    pub version: u64,
    /// Display form.
    pub display: String,
    /// When it was stored.
    pub created_ms: u64,
    /// When a rotation retired it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_ms: Option<u64>,
    /// Until when a retired version stays usable (then it is sealed off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usable_until_ms: Option<u64>,
}

/// The outcome of `secret test` against one upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    /// Upstream name.
    pub upstream: String,
    /// The version injected.
    pub version: u64,
    /// `GET`.
    pub method: String,
    /// The upstream's `test_path`.
    pub path: String,
    /// HTTP status, when the upstream answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// A 2xx status.
    pub ok: bool,
    /// Why no status (connect or build error; never a URL or a value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The outcome of `kms rotate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KmsRotation {
    /// Id of the master key replaced (hex).
    pub old_key_id: String,
    /// Id of the new master key (hex).
    pub new_key_id: String,
    /// Records rewritten.
    pub secrets: u64,
    /// Data keys rewrapped.
    pub data_keys: u64,
}

impl KmsRotation {
    /// The outcome of a rotation from `old` to `new`, logged with `what`.
    fn logged(old: KeyId, new: KeyId, secrets: u64, data_keys: u64, what: &str) -> Self {
        let out = Self {
            old_key_id: hex::encode(old),
            new_key_id: hex::encode(new),
            secrets,
            data_keys,
        };
        tracing::info!(
            old = out.old_key_id.as_str(),
            new = out.new_key_id.as_str(),
            secrets = out.secrets,
            data_keys = out.data_keys,
            "{what}"
        );
        out
    }
}

/// What one upkeep pass changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Upkeep {
    /// (name, version) of each version sealed off.
    pub sealed_off: Vec<(String, u64)>,
    /// Names of deleted secrets purged.
    pub purged: Vec<String>,
    /// Records whose last-use time was persisted.
    pub last_use_persisted: usize,
}

fn valid_name(name: &str) -> Result<(), SecretError> {
    if name.is_empty()
        || name.len() > 128
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(SecretError::Invalid(
            "secret names use letters, digits, '-', '_' and '.' (1 to 128)".into(),
        ));
    }
    Ok(())
}

fn valid_value(value: &str) -> Result<(), SecretError> {
    if value.is_empty() {
        return Err(SecretError::Invalid(
            "the secret read from stdin is empty".into(),
        ));
    }
    Ok(())
}

impl SecretRecord {
    /// Seals a new secret as version 1, enabled.
    pub fn new(
        kms: &dyn Kms,
        name: &str,
        plaintext: &str,
        now_ms: u64,
    ) -> Result<Self, SecretError> {
        valid_name(name)?;
        valid_value(plaintext)?;
        let id: [u8; 16] = rand::random();
        let first = SealedVersion::seal(kms, &id, 1, plaintext, now_ms)?;
        let mut rec = Self {
            id,
            name: name.into(),
            kek: kms.key_id(),
            versions: vec![first],
            status: Status::Enabled,
            last_used_ms: None,
            history: Vec::new(),
        };
        rec.event(now_ms, "added", 1);
        Ok(rec)
    }

    fn event(&mut self, at_ms: u64, action: &str, version: u64) {
        self.history.push(Event {
            at_ms,
            action: action.into(),
            version,
        });
        if self.history.len() > HISTORY_LIMIT {
            let extra = self.history.len() - HISTORY_LIMIT;
            self.history.drain(..extra);
        }
    }

    /// The current version: the highest one not retired.
    pub fn current(&self) -> Option<&SealedVersion> {
        self.versions
            .iter()
            .filter(|v| v.retired_ms.is_none())
            .max_by_key(|v| v.version)
    }

    /// Until when `v` may be opened: `None` for a version that is not retired.
    pub fn usable_until(v: &SealedVersion, grace_ms: u64) -> Option<u64> {
        v.retired_ms.map(|r| r.saturating_add(grace_ms))
    }

    /// Seals `plaintext` as the next version and retires the current one at `now_ms`. Returns
    /// the new version. A deleted secret is restored first (`enable`), not rotated.
    pub fn rotate(
        &mut self,
        kms: &dyn Kms,
        plaintext: &str,
        now_ms: u64,
    ) -> Result<u64, SecretError> {
        valid_value(plaintext)?;
        if let Status::Deleted { .. } = self.status {
            return Err(SecretError::Unavailable(
                self.name.clone(),
                "deleted (restore it with `secret enable` first)".into(),
            ));
        }
        if kms.key_id() != self.kek {
            return Err(SecretError::Invalid(format!(
                "secret {} is wrapped under another master key",
                self.name
            )));
        }
        let next = self.versions.iter().map(|v| v.version).max().unwrap_or(0) + 1;
        let sealed = SealedVersion::seal(kms, &self.id, next, plaintext, now_ms)?;
        for v in &mut self.versions {
            if v.retired_ms.is_none() {
                v.retired_ms = Some(now_ms);
            }
        }
        self.versions.push(sealed);
        self.event(now_ms, "rotated", next);
        Ok(next)
    }

    /// Sets the status; `Deleted` keeps the first deletion time. Returns the event, `None`
    /// when nothing changed.
    pub fn set_status(&mut self, status: Status, now_ms: u64) -> Option<SecretAction> {
        let version = self.current().map_or(0, |v| v.version);
        let (action, name) = match (self.status, status) {
            (a, b) if a == b => return None,
            (Status::Deleted { .. }, Status::Deleted { .. }) => return None,
            (Status::Deleted { .. }, _) => (SecretAction::Restored, "restored"),
            (_, Status::Enabled) => (SecretAction::Enabled, "enabled"),
            (_, Status::Disabled) => (SecretAction::Disabled, "disabled"),
            (_, Status::Deleted { .. }) => (SecretAction::Deleted, "deleted"),
        };
        self.status = status;
        self.event(now_ms, name, version);
        Some(action)
    }

    /// Removes ("seals off") every retired version whose grace window ended at or before
    /// `now_ms`. Returns the versions removed.
    pub fn prune(&mut self, now_ms: u64, grace_ms: u64) -> Vec<u64> {
        let gone: Vec<u64> = self
            .versions
            .iter()
            .filter(|v| Self::usable_until(v, grace_ms).is_some_and(|until| until <= now_ms))
            .map(|v| v.version)
            .collect();
        self.versions.retain(|v| !gone.contains(&v.version));
        for v in &gone {
            self.event(now_ms, "sealed_off", *v);
        }
        gone
    }

    /// Whether a deleted secret's retention ended.
    pub fn purge_due(&self, now_ms: u64) -> bool {
        matches!(self.status, Status::Deleted { at_ms } if at_ms.saturating_add(DELETE_RETENTION_MS) <= now_ms)
    }

    /// Decrypts the current version for a call, just in time; refused unless enabled.
    pub fn open_current(&self, kms: &dyn Kms) -> Result<Zeroizing<String>, SecretError> {
        if self.status != Status::Enabled {
            return Err(SecretError::Unavailable(
                self.name.clone(),
                self.status.as_str().into(),
            ));
        }
        let v = self
            .current()
            .ok_or_else(|| SecretError::Malformed(self.name.clone()))?;
        Ok(v.open(kms, &self.id, &self.name)?)
    }

    /// Decrypts `version` (the current one if `None`) for `secret test`: allowed while the
    /// secret is enabled or disabled, and for a retired version until its grace window ends.
    pub fn open_version(
        &self,
        kms: &dyn Kms,
        version: Option<u64>,
        now_ms: u64,
        grace_ms: u64,
    ) -> Result<(u64, Zeroizing<String>), SecretError> {
        if let Status::Deleted { .. } = self.status {
            return Err(SecretError::Unavailable(
                self.name.clone(),
                "deleted".into(),
            ));
        }
        let v = match version {
            None => self.current(),
            Some(n) => self.versions.iter().find(|v| v.version == n),
        }
        .ok_or_else(|| {
            SecretError::Unavailable(
                self.name.clone(),
                format!("not held at version {}", version.unwrap_or(0)),
            )
        })?;
        if Self::usable_until(v, grace_ms).is_some_and(|until| until <= now_ms) {
            return Err(SecretError::Unavailable(
                self.name.clone(),
                format!("sealed off at version {} (grace window over)", v.version),
            ));
        }
        Ok((v.version, v.open(kms, &self.id, &self.name)?))
    }

    /// Rewraps every version's data key from `old` to `new` (no secret is decrypted) and names
    /// `new` as the record's key. All or nothing. Returns the number of data keys rewrapped.
    pub fn rewrap(
        &mut self,
        old: &dyn Kms,
        new: &dyn Kms,
        now_ms: u64,
    ) -> Result<usize, SecretError> {
        let mut versions = self.versions.clone();
        for v in &mut versions {
            v.rewrap(old, new, &self.id, &self.name)?;
        }
        self.versions = versions;
        self.kek = new.key_id();
        let current = self.current().map_or(0, |v| v.version);
        self.event(now_ms, "rewrapped", current);
        Ok(self.versions.len())
    }

    /// The record as a `secret` entry lists it: never a value or a display form.
    pub fn state(&self) -> SecretState {
        SecretState {
            name: self.name.clone(),
            id: self.id,
            status: match self.status {
                Status::Enabled => SecretStatus::Enabled,
                Status::Disabled => SecretStatus::Disabled,
                Status::Deleted { .. } => SecretStatus::Deleted,
            },
            kek: self.kek,
            versions: self
                .versions
                .iter()
                .map(|v| VersionState {
                    version: v.version,
                    fingerprint: sealed_fingerprint(&self.id, v.version, &v.sealed),
                    retired_ms: v.retired_ms,
                })
                .collect(),
        }
    }

    /// The state a `purged` entry lists: the record is gone.
    fn purged_state(&self) -> SecretState {
        SecretState {
            status: SecretStatus::Purged,
            versions: Vec::new(),
            ..self.state()
        }
    }

    /// The claim that writes this record with its entry.
    fn put(&self) -> Claim {
        Claim {
            space: SECRETS,
            key: self.name.as_bytes().to_vec(),
            value: self.encode(),
            rule: ClaimRule::Put,
        }
    }

    /// The highest version number the record holds (0 for none).
    fn newest_version(&self) -> u64 {
        self.versions.iter().map(|v| v.version).max().unwrap_or(0)
    }

    /// What `list` shows; `last_used_ms` is the gateway's in-memory time, if newer.
    pub fn info(&self, grace_ms: u64, last_used_ms: Option<u64>) -> SecretInfo {
        let current = self.current();
        let deleted_ms = match self.status {
            Status::Deleted { at_ms } => Some(at_ms),
            _ => None,
        };
        SecretInfo {
            name: self.name.clone(),
            version: current.map_or(0, |v| v.version),
            display: current.map(|v| v.shown()).unwrap_or_default(),
            status: self.status.as_str().into(),
            deleted_ms,
            purge_ms: deleted_ms.map(|d| d.saturating_add(DELETE_RETENTION_MS)),
            last_used_ms: self.last_used_ms.max(last_used_ms),
            key_id: hex::encode(self.kek),
            versions: self
                .versions
                .iter()
                .map(|v| VersionInfo {
                    version: v.version,
                    display: v.shown(),
                    created_ms: v.created_ms,
                    retired_ms: v.retired_ms,
                    usable_until_ms: Self::usable_until(v, grace_ms),
                })
                .collect(),
        }
    }

    /// Encodes for the store (record v2).
    pub fn encode(&self) -> Vec<u8> {
        let deleted_ms = match self.status {
            Status::Deleted { at_ms } => Some(at_ms),
            _ => None,
        };
        cbor::to_vec(&WireV2 {
            v: RECORD_V2,
            id: self.id,
            name: self.name.clone(),
            kek: self.kek,
            status: self.status.as_str().into(),
            deleted_ms,
            versions: self.versions.clone(),
            last_used_ms: self.last_used_ms,
            history: self.history.clone(),
        })
    }

    /// Decodes a stored record, v2 or v1. A v1 record names no master key: it is read as
    /// wrapped under `legacy_kek`, the master key loaded (the only one a v1 gateway knew).
    pub fn decode(bytes: &[u8], legacy_kek: KeyId) -> Result<Self, SecretError> {
        let bad = || SecretError::Malformed("(undecodable)".into());
        if let Ok(w) = cbor::from_slice::<WireV2>(bytes) {
            let malformed = || SecretError::Malformed(w.name.clone());
            let status = match (w.status.as_str(), w.deleted_ms) {
                ("enabled", None) => Status::Enabled,
                ("disabled", None) => Status::Disabled,
                ("deleted", Some(at_ms)) => Status::Deleted { at_ms },
                _ => return Err(malformed()),
            };
            let ascending = w.versions.windows(2).all(|p| p[0].version < p[1].version);
            let current: Vec<_> = w
                .versions
                .iter()
                .filter(|v| v.retired_ms.is_none())
                .collect();
            let ok = w.v == RECORD_V2
                && ascending
                && w.versions.first().is_some_and(|v| v.version >= 1)
                && current.len() == 1
                && w.versions.last().is_some_and(|v| v.retired_ms.is_none())
                && w.history.len() <= HISTORY_LIMIT;
            if !ok {
                return Err(malformed());
            }
            return Ok(Self {
                id: w.id,
                name: w.name,
                kek: w.kek,
                versions: w.versions,
                status,
                last_used_ms: w.last_used_ms,
                history: w.history,
            });
        }
        let w: WireV1 = cbor::from_slice(bytes).map_err(|_| bad())?;
        if w.v != 1 || w.version < 1 {
            return Err(SecretError::Malformed(w.name));
        }
        Ok(Self {
            id: w.id,
            name: w.name,
            kek: legacy_kek,
            versions: vec![SealedVersion {
                version: w.version,
                display: w.display,
                wrapped_key: w.wrapped_key,
                sealed: w.sealed,
                created_ms: 0,
                retired_ms: None,
            }],
            status: if w.enabled {
                Status::Enabled
            } else {
                Status::Disabled
            },
            last_used_ms: None,
            history: Vec::new(),
        })
    }
}

/// The master keys a process holds: the current one, and during a master-key rotation the
/// other one.
struct Keyring {
    current: Arc<dyn Kms>,
    others: Vec<Arc<dyn Kms>>,
}

impl Keyring {
    fn get(&self, id: &KeyId) -> Option<&Arc<dyn Kms>> {
        std::iter::once(&self.current)
            .chain(self.others.iter())
            .find(|k| &k.key_id() == id)
    }

    fn for_record(&self, rec: &SecretRecord) -> Result<&Arc<dyn Kms>, SecretError> {
        self.get(&rec.kek).ok_or_else(|| {
            SecretError::Kms(KmsError::MasterKey {
                key: hex::encode(rec.kek),
                problem: crate::kms::MasterKeyProblem::NotLoaded {
                    secret: rec.name.clone(),
                },
            })
        })
    }
}

/// The `secret` entry action of a record taken from the cluster: its last event's.
fn replica_action(event: &str) -> SecretAction {
    match event {
        "added" => SecretAction::Added,
        "disabled" => SecretAction::Disabled,
        "enabled" => SecretAction::Enabled,
        "deleted" => SecretAction::Deleted,
        "restored" => SecretAction::Restored,
        "sealed_off" => SecretAction::SealedOff,
        _ => SecretAction::Rotated,
    }
}

/// The secrets of one gateway store: lifecycle, just-in-time decryption, upkeep.
///
/// Lifecycle writes are serialized by one lock; calls only read. Every method takes `now_ms`.
pub struct Secrets {
    store: Store,
    /// The gateway's chain: every lifecycle write is appended through it, with its entry.
    chain: Chain,
    master_key: PathBuf,
    keys: RwLock<Keyring>,
    from_env: bool,
    /// The PKCS#11 token of `[gateway] kms = "pkcs11"`.
    token: Option<Arc<Token>>,
    lock: Mutex<()>,
    last_used: Mutex<HashMap<String, u64>>,
    grace_ms: u64,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field("grace_ms", &self.grace_ms)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `master.key.new` beside `master.key`.
fn pending_path(master: &Path) -> PathBuf {
    let mut s = master.as_os_str().to_owned();
    s.push(".new");
    PathBuf::from(s)
}

fn sync_dir(file: &Path) -> Result<(), SecretError> {
    let dir = file.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| SecretError::Io(dir.display().to_string(), e))
}

/// Finishes or rolls back a master-key rotation a crash interrupted (see the module doc).
fn recover_rotation(master: &Path, store: &Store) -> Result<(), SecretError> {
    let pending = pending_path(master);
    if std::fs::symlink_metadata(&pending).is_err() {
        return Ok(());
    }
    let referenced = match LocalKms::load_file(&pending) {
        Ok(k) => {
            let id = k.key_id();
            store
                .scan(SECRETS, b"")?
                .iter()
                .filter_map(|(_, v)| SecretRecord::decode(v, [0; 8]).ok())
                .any(|r| r.kek == id)
        }
        // a torn file: the batch is written only after the file is whole and synced
        Err(_) => false,
    };
    if referenced {
        std::fs::rename(&pending, master)
            .map_err(|e| SecretError::Io(pending.display().to_string(), e))?;
        tracing::warn!("finished a master-key rotation that a stop interrupted");
    } else {
        std::fs::remove_file(&pending)
            .map_err(|e| SecretError::Io(pending.display().to_string(), e))?;
        tracing::warn!("rolled back a master-key rotation that a stop interrupted");
    }
    sync_dir(master)
}

/// The id of the token's master key this store names as current ([`TOKEN_KEY_MARK`]).
fn token_key_mark(store: &Store) -> Result<Option<KeyId>, SecretError> {
    match store.get(LIFECYCLE, TOKEN_KEY_MARK)? {
        None => Ok(None),
        Some(v) => KeyId::try_from(v.as_slice())
            .map(Some)
            .map_err(|_| SecretError::Malformed("(the token key mark)".into())),
    }
}

/// The key ring of a store whose master key is the token's key `id`: that key, and
/// `master.key` as well while records still name it (a migration that stopped before its
/// batch). Finishes what a stop interrupted: removes `master.key` once no record names it,
/// and destroys the token's other keys of the label that no record names (left by a
/// rotation or migration that stopped). Needs the token only for that clean-up: a token down
/// at start leaves it for the next start.
fn open_in_token(
    token: &Arc<Token>,
    id: KeyId,
    master_key: &Path,
    store: &Store,
) -> Result<Keyring, SecretError> {
    let named: std::collections::HashSet<KeyId> = store
        .scan(SECRETS, b"")?
        .iter()
        .filter_map(|(_, v)| SecretRecord::decode(v, id).ok())
        .map(|r| r.kek)
        .collect();
    let mut others: Vec<Arc<dyn Kms>> = Vec::new();
    if std::fs::symlink_metadata(master_key).is_ok() {
        match LocalKms::load_file(master_key) {
            Ok(file) if named.contains(&file.key_id()) => others.push(Arc::new(file)),
            _ => {
                std::fs::remove_file(master_key)
                    .map_err(|e| SecretError::Io(master_key.display().to_string(), e))?;
                sync_dir(master_key)?;
                tracing::warn!(
                    "removed master.key: no secret is wrapped under it (the master key is in the PKCS#11 token)"
                );
            }
        }
    }
    match token.key_ids() {
        Ok(ids) => {
            for stale in ids.iter().filter(|k| **k != id && !named.contains(*k)) {
                token.destroy(stale)?;
                tracing::warn!(
                    key = hex::encode(stale).as_str(),
                    "destroyed a token master key that an interrupted rotation left"
                );
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "PKCS#11 token unavailable at start; calls that need a secret are refused until it is back")
        }
    }
    Ok(Keyring {
        current: Arc::new(Pkcs11Kms::new(token.clone(), id)),
        others,
    })
}

impl Secrets {
    /// Opens the secrets of the gateway data directory `data` on the store of its `chain`:
    /// finishes or rolls back an interrupted master-key rotation, loads the master key, writes
    /// the snapshot entry if this store never had one, and runs one upkeep pass. Blocks on
    /// the chain's appends: call it from a blocking thread.
    pub fn open(
        data: &Path,
        chain: Chain,
        grace_secs: u64,
        token: Option<TokenConfig>,
        now_ms: u64,
    ) -> Result<Self, SecretError> {
        let store = chain.store().clone();
        let master_key = DataDir::new(data).master_key();
        let token = token.map(Token::new);
        let mark = token_key_mark(&store)?;
        let (keys, from_env) = match (&token, mark) {
            (None, Some(id)) => {
                return Err(SecretError::Invalid(format!(
                    "the master key of this store is in a PKCS#11 token (key id {}): set [gateway] kms = \"pkcs11\" and [pkcs11] in gateway.toml",
                    hex::encode(id)
                )));
            }
            (Some(t), Some(id)) => (open_in_token(t, id, &master_key, &store)?, false),
            (_, None) => {
                let (current, from_env) = match LocalKms::from_env() {
                    Some(k) => (k?, true),
                    None => {
                        recover_rotation(&master_key, &store)?;
                        (LocalKms::load_file(&master_key)?, false)
                    }
                };
                if token.is_some() {
                    tracing::warn!(
                        "[gateway] kms = \"pkcs11\", but this store's master key is still master.key: run `didgated kms migrate --to pkcs11` (or `kms init-pkcs11` on a store without secrets)"
                    );
                }
                let current: Arc<dyn Kms> = Arc::new(current);
                (
                    Keyring {
                        current,
                        others: Vec::new(),
                    },
                    from_env,
                )
            }
        };
        let s = Self {
            store,
            chain,
            master_key,
            keys: RwLock::new(keys),
            from_env,
            token,
            lock: Mutex::new(()),
            last_used: Mutex::new(HashMap::new()),
            grace_ms: grace_secs.saturating_mul(1000),
        };
        s.snapshot(now_ms)?;
        s.maintain(now_ms)?;
        Ok(s)
    }

    /// The chain the lifecycle entries go to.
    pub fn chain(&self) -> &Chain {
        &self.chain
    }

    /// Appends the `secret` entry of `action` on `states` with the record writes `claims`, as
    /// one durable batch: either both are written, or neither. The entry is checked by the
    /// decoder's own rules first, so the chain never holds one a verifier would refuse.
    fn record(
        &self,
        action: SecretAction,
        states: Vec<SecretState>,
        claims: Vec<Claim>,
        detail: Option<String>,
        now_ms: u64,
    ) -> Result<(), SecretError> {
        let mut entry = Entry::secret(action, states, now_ms);
        entry.detail = detail;
        if entry.check_version().is_err() {
            return Err(SecretError::Malformed(format!("({action:?} entry)")));
        }
        match self.chain.append_blocking(Append { entry, claims }) {
            Ok(_) => Ok(()),
            Err(AppendError::Conflict { .. }) => Err(SecretError::Invalid(
                "a concurrent change to the same secret won; try again".into(),
            )),
            Err(e) => Err(SecretError::Audit(e)),
        }
    }

    /// Writes the `snapshot` entry of every stored secret, unless this store has one (the
    /// mark in [`LIFECYCLE`], written with the entry).
    fn snapshot(&self, now_ms: u64) -> Result<(), SecretError> {
        let _g = lock(&self.lock);
        if self.store.get(LIFECYCLE, SNAPSHOT_MARK)?.is_some() {
            return Ok(());
        }
        let legacy = self.key_id();
        let mut states = Vec::new();
        for (key, value) in self.store.scan(SECRETS, b"")? {
            match SecretRecord::decode(&value, legacy) {
                Ok(rec) => states.push(rec.state()),
                Err(e) => tracing::warn!(
                    key = %String::from_utf8_lossy(&key),
                    %e,
                    "a stored secret record does not decode; the snapshot leaves it out"
                ),
            }
        }
        let count = states.len();
        let mark = Claim {
            space: LIFECYCLE,
            key: SNAPSHOT_MARK.to_vec(),
            value: now_ms.to_be_bytes().to_vec(),
            rule: ClaimRule::Absent,
        };
        self.record(SecretAction::Snapshot, states, vec![mark], None, now_ms)?;
        tracing::info!(
            secrets = count,
            "wrote the snapshot entry of the stored secrets"
        );
        Ok(())
    }

    /// The grace window of retired versions, ms.
    pub fn grace_ms(&self) -> u64 {
        self.grace_ms
    }

    /// Id of the current master key.
    pub fn key_id(&self) -> KeyId {
        self.keys().current.key_id()
    }

    fn keys(&self) -> RwLockReadGuard<'_, Keyring> {
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn keys_mut(&self) -> RwLockWriteGuard<'_, Keyring> {
        self.keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn read(&self, name: &str, legacy: KeyId) -> Result<SecretRecord, SecretError> {
        let bytes = self
            .store
            .get(SECRETS, name.as_bytes())?
            .ok_or_else(|| SecretError::NotFound(name.into()))?;
        let rec = SecretRecord::decode(&bytes, legacy)?;
        if rec.name != name {
            // the id, not the name, is bound into the ciphertext: refuse a record moved to
            // another name
            return Err(SecretError::Malformed(name.into()));
        }
        Ok(rec)
    }

    fn mem_last_used(&self, name: &str) -> Option<u64> {
        lock(&self.last_used).get(name).copied()
    }

    /// Decrypts the current version of `name` for a call, just in time, and records the use
    /// in memory. Refused unless the secret is enabled.
    pub fn open_current(&self, name: &str, now_ms: u64) -> Result<Zeroizing<String>, SecretError> {
        self.open_for_call(name, now_ms)
            .map(|(_, plaintext)| plaintext)
    }

    /// [`Secrets::open_current`], also saying which secret (its immutable id) and which version
    /// was opened, for the call's `executed` entry.
    pub fn open_for_call(
        &self,
        name: &str,
        now_ms: u64,
    ) -> Result<(SecretUse, Zeroizing<String>), SecretError> {
        let opened = {
            // held across read and unwrap, so a master-key rotation never drops the key a
            // record just read names
            let keys = self.keys();
            let rec = self.read(name, keys.current.key_id())?;
            let version = rec
                .current()
                .map(|v| v.version)
                .ok_or_else(|| SecretError::Malformed(rec.name.clone()))?;
            let plaintext = rec.open_current(keys.for_record(&rec)?.as_ref())?;
            (
                SecretUse {
                    id: rec.id,
                    version,
                },
                plaintext,
            )
        };
        let mut used = lock(&self.last_used);
        let t = used.entry(name.to_string()).or_default();
        *t = (*t).max(now_ms);
        Ok(opened)
    }

    /// Read-modify-write of one record under the lifecycle lock; seals off expired versions.
    /// `f` returns its result and its event (`None`: it changed nothing). The record is written
    /// with one `secret` entry: `f`'s event, or `sealed_off` when only that happened; nothing
    /// is written when nothing changed.
    fn update<T>(
        &self,
        name: &str,
        now_ms: u64,
        f: impl FnOnce(&mut SecretRecord, &Keyring) -> Result<(T, Option<SecretAction>), SecretError>,
    ) -> Result<(T, SecretInfo), SecretError> {
        let _g = lock(&self.lock);
        let (mut rec, t, action) = {
            let keys = self.keys();
            let mut rec = self.read(name, keys.current.key_id())?;
            let (t, action) = f(&mut rec, &keys)?;
            (rec, t, action)
        };
        let gone = rec.prune(now_ms, self.grace_ms);
        let action = action.or((!gone.is_empty()).then_some(SecretAction::SealedOff));
        if let Some(action) = action {
            self.record(action, vec![rec.state()], vec![rec.put()], None, now_ms)?;
        }
        Ok((t, rec.info(self.grace_ms, self.mem_last_used(name))))
    }

    /// The record of `name` as stored (ciphertexts and wrapped data keys only), if any: what
    /// a cluster member publishes to the others.
    pub fn stored(&self, name: &str) -> Result<Option<Vec<u8>>, SecretError> {
        Ok(self.store.get(SECRETS, name.as_bytes())?)
    }

    /// Takes the record of `name` as another node of the cluster published it (specs/
    /// operation.md, "Cluster", "Secrets"): stored with a `secret` entry whose action is the
    /// record's last event, unless this node already holds the same state. Versions past
    /// their grace window are sealed off first. A record under a master key this node lacks
    /// is stored all the same (calls that need it are then refused, never served with an
    /// older value). `Ok(true)` when it changed something.
    ///
    /// The rollback guard compares the record with `floor` (a secret id and its newest version:
    /// the cluster's record a change of this node started from) when given, else with the
    /// record this node holds: one of the same id whose newest version is lower is refused
    /// ([`SecretError::Older`]).
    pub fn apply_replica(
        &self,
        name: &str,
        bytes: &[u8],
        now_ms: u64,
        floor: Option<([u8; 16], u64)>,
    ) -> Result<bool, SecretError> {
        valid_name(name)?;
        let _g = lock(&self.lock);
        let legacy = self.key_id();
        let mut rec = SecretRecord::decode(bytes, legacy)?;
        if rec.name != name {
            return Err(SecretError::Malformed(name.into()));
        }
        let action = rec
            .history
            .last()
            .map_or(SecretAction::Added, |e| replica_action(&e.action));
        rec.prune(now_ms, self.grace_ms);
        let local = match self.read(name, legacy) {
            Ok(r) => Some(r),
            Err(SecretError::NotFound(_)) => None,
            Err(e) => return Err(e),
        };
        if let Some(l) = &local {
            if l.state() == rec.state() {
                return Ok(false);
            }
            // last use stays each node's own
            rec.last_used_ms = l.last_used_ms;
        }
        // a version once current never comes back: whoever can write etcd must not be able to
        // roll a rotated (perhaps leaked) value back in
        let guard = floor.or_else(|| local.as_ref().map(|l| (l.id, l.newest_version())));
        if let Some((id, held)) = guard
            && id == rec.id
            && rec.newest_version() < held
        {
            return Err(SecretError::Older {
                name: name.into(),
                offered: rec.newest_version(),
                held,
            });
        }
        if rec.kek != legacy {
            tracing::warn!(
                secret = name,
                "a secret from the cluster is wrapped under a master key this node does not hold: calls that need it are refused"
            );
        }
        self.record(action, vec![rec.state()], vec![rec.put()], None, now_ms)?;
        tracing::info!(secret = name, "secret taken from the cluster");
        Ok(true)
    }

    /// The id and newest version of a record's bytes, if they decode.
    pub fn newest_of(bytes: &[u8], legacy: KeyId) -> Option<([u8; 16], u64)> {
        SecretRecord::decode(bytes, legacy)
            .ok()
            .map(|r| (r.id, r.newest_version()))
    }

    /// `secret add`: seals a new secret as version 1.
    pub fn add(&self, name: &str, plaintext: &str, now_ms: u64) -> Result<SecretInfo, SecretError> {
        valid_name(name)?;
        valid_value(plaintext)?;
        let _g = lock(&self.lock);
        let legacy = self.key_id();
        match self.read(name, legacy) {
            Ok(rec) if matches!(rec.status, Status::Deleted { .. }) => {
                return Err(SecretError::Exists(
                    name.into(),
                    " (deleted: `secret enable` restores it until it is purged)",
                ));
            }
            Ok(_) => {
                return Err(SecretError::Exists(
                    name.into(),
                    " (a new value goes in with `secret rotate`)",
                ));
            }
            Err(SecretError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        let rec = {
            let keys = self.keys();
            SecretRecord::new(keys.current.as_ref(), name, plaintext, now_ms)?
        };
        let put = Claim {
            rule: ClaimRule::Absent,
            ..rec.put()
        };
        self.record(
            SecretAction::Added,
            vec![rec.state()],
            vec![put],
            None,
            now_ms,
        )?;
        tracing::info!(secret = name, version = 1, "secret added");
        Ok(rec.info(self.grace_ms, None))
    }

    /// `secret rotate`: the new value becomes the current version; the previous one stays
    /// usable for the grace window. Returns the record after the rotation.
    pub fn rotate(
        &self,
        name: &str,
        plaintext: &str,
        now_ms: u64,
    ) -> Result<SecretInfo, SecretError> {
        valid_value(plaintext)?;
        let (version, info) = self.update(name, now_ms, |rec, keys| {
            if rec.kek != keys.current.key_id() {
                let old = keys.for_record(rec)?.clone();
                rec.rewrap(old.as_ref(), keys.current.as_ref(), now_ms)?;
            }
            let version = rec.rotate(keys.current.as_ref(), plaintext, now_ms)?;
            Ok((version, Some(SecretAction::Rotated)))
        })?;
        tracing::info!(
            secret = name,
            version,
            grace_ms = self.grace_ms,
            "secret rotated"
        );
        Ok(info)
    }

    fn set_status(
        &self,
        name: &str,
        status: Status,
        now_ms: u64,
    ) -> Result<SecretInfo, SecretError> {
        let (changed, info) = self.update(name, now_ms, |rec, _| {
            let action = rec.set_status(status, now_ms);
            Ok((action.is_some(), action))
        })?;
        if changed {
            tracing::info!(
                secret = name,
                status = info.status.as_str(),
                "secret status changed"
            );
        }
        Ok(info)
    }

    /// `secret disable`: calls are refused with `secret_unavailable` (also restores a deleted
    /// secret as disabled).
    pub fn disable(&self, name: &str, now_ms: u64) -> Result<SecretInfo, SecretError> {
        self.set_status(name, Status::Disabled, now_ms)
    }

    /// `secret enable`: calls may use it again; restores a deleted secret within 90 days.
    pub fn enable(&self, name: &str, now_ms: u64) -> Result<SecretInfo, SecretError> {
        self.set_status(name, Status::Enabled, now_ms)
    }

    /// `secret delete`: soft delete; refused at once, purged after [`DELETE_RETENTION_MS`].
    pub fn delete(&self, name: &str, now_ms: u64) -> Result<SecretInfo, SecretError> {
        self.set_status(name, Status::Deleted { at_ms: now_ms }, now_ms)
    }

    /// `secret list`: every secret, with the in-memory last use when newer. Never a value.
    pub fn list(&self) -> Result<Vec<SecretInfo>, SecretError> {
        let legacy = self.key_id();
        let used = lock(&self.last_used).clone();
        self.store
            .scan(SECRETS, b"")?
            .iter()
            .map(|(_, v)| {
                let rec = SecretRecord::decode(v, legacy)?;
                let mem = used.get(&rec.name).copied();
                Ok(rec.info(self.grace_ms, mem))
            })
            .collect()
    }

    /// One upkeep pass: seals off versions whose grace window ended, purges deleted secrets
    /// past retention, and persists newer in-memory last-use times. Writes only on a change.
    pub fn maintain(&self, now_ms: u64) -> Result<Upkeep, SecretError> {
        let _g = lock(&self.lock);
        let legacy = self.key_id();
        let used = lock(&self.last_used).clone();
        let mut out = Upkeep::default();
        // last-use times only: not lifecycle events, written directly in one batch
        let mut puts = Vec::new();
        for (key, value) in self.store.scan(SECRETS, b"")? {
            let Ok(mut rec) = SecretRecord::decode(&value, legacy) else {
                continue;
            };
            if rec.purge_due(now_ms) {
                let remove = Claim {
                    space: SECRETS,
                    key,
                    value: Vec::new(),
                    rule: ClaimRule::Remove,
                };
                let state = rec.purged_state();
                self.record(
                    SecretAction::Purged,
                    vec![state],
                    vec![remove],
                    None,
                    now_ms,
                )?;
                out.purged.push(rec.name.clone());
                continue;
            }
            let gone = rec.prune(now_ms, self.grace_ms);
            if let Some(t) = used.get(&rec.name)
                && rec.last_used_ms.is_none_or(|s| s < *t)
            {
                rec.last_used_ms = Some(*t);
                out.last_use_persisted += 1;
                if gone.is_empty() {
                    puts.push((SECRETS, key, rec.encode()));
                }
            }
            if !gone.is_empty() {
                self.record(
                    SecretAction::SealedOff,
                    vec![rec.state()],
                    vec![rec.put()],
                    None,
                    now_ms,
                )?;
                out.sealed_off
                    .extend(gone.into_iter().map(|v| (rec.name.clone(), v)));
            }
        }
        if !puts.is_empty() {
            self.store.write(&puts, &[])?;
        }
        for (name, version) in &out.sealed_off {
            tracing::info!(
                secret = name.as_str(),
                version,
                "retired version sealed off"
            );
        }
        for name in &out.purged {
            tracing::info!(secret = name.as_str(), "deleted secret purged");
        }
        Ok(out)
    }

    /// Runs [`Secrets::maintain`] off the async workers; logs a failure.
    pub async fn upkeep(self: &Arc<Self>, now_ms: u64) {
        let s = self.clone();
        match tokio::task::spawn_blocking(move || s.maintain(now_ms)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(%e, "secret upkeep failed"),
            Err(e) => tracing::warn!(%e, "secret upkeep task failed"),
        }
    }

    /// Runs an upkeep pass every [`UPKEEP_SECS`] until `stop` changes. The caller runs a last
    /// [`Secrets::upkeep`] once calls are drained, so the last uses are persisted.
    pub fn spawn_upkeep(
        self: &Arc<Self>,
        mut stop: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let s = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(UPKEEP_SECS));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // the first tick is immediate; opening already ran a pass
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => s.upkeep(now_ms()).await,
                    _ = stop.changed() => break,
                }
            }
        })
    }

    /// Decrypts a version for `secret test` (see [`SecretRecord::open_version`]).
    fn open_for_test(
        &self,
        name: &str,
        version: Option<u64>,
        now_ms: u64,
    ) -> Result<(u64, Zeroizing<String>), SecretError> {
        let keys = self.keys();
        let rec = self.read(name, keys.current.key_id())?;
        rec.open_version(
            keys.for_record(&rec)?.as_ref(),
            version,
            now_ms,
            self.grace_ms,
        )
    }

    /// `secret test`: for every upstream using `name` that sets `test_path`, sends `GET
    /// test_path` with the secret injected exactly as a call injects it, and reports the status
    /// (2xx = ok). The response body is dropped unread; no value is returned.
    pub async fn probe(
        &self,
        upstreams: &crate::upstreams::UpstreamSet,
        name: &str,
        version: Option<u64>,
        now_ms: u64,
    ) -> Result<Vec<Probe>, SecretError> {
        let users: Vec<&Upstream> = upstreams.iter().filter(|u| u.secret() == name).collect();
        if users.is_empty() {
            return Err(SecretError::Invalid(format!(
                "no upstream in force uses secret {name}"
            )));
        }
        let testable: Vec<(&Upstream, &str)> = users
            .iter()
            .filter_map(|u| u.test_path().map(|p| (*u, p)))
            .collect();
        if testable.is_empty() {
            return Err(SecretError::Invalid(format!(
                "no upstream in force using secret {name} sets test_path"
            )));
        }
        let mut out = Vec::new();
        for (up, path) in testable {
            let (v, secret) = self.open_for_test(name, version, now_ms)?;
            let req = probe_request(up, path, now_ms);
            let idem = hex::encode(rand::random::<[u8; 16]>());
            // the upstream's own client: the same egress rules as a call (`local`, resolver)
            let sent = upstream::send(
                upstreams.client(up.name()),
                up,
                &req,
                Vec::new(),
                secret,
                &idem,
            )
            .await;
            let (status, error) = match sent {
                Ok(resp) => (Some(resp.status().as_u16()), None),
                Err(e) => (None, Some(e.to_string())),
            };
            out.push(Probe {
                upstream: up.name().to_string(),
                version: v,
                method: "GET".into(),
                path: path.into(),
                status,
                ok: status.is_some_and(|s| (200..300).contains(&s)),
                error,
            });
        }
        tracing::info!(secret = name, "secret tested against its upstream");
        Ok(out)
    }

    /// `kms rotate`: a new master key; every data key is rewrapped under it in one batch, then
    /// the key file is replaced. No secret is decrypted; calls keep working throughout. See the
    /// module doc for the crash reasoning.
    pub fn kms_rotate(&self, now_ms: u64) -> Result<KmsRotation, SecretError> {
        if let Some(token) = &self.token
            && token_key_mark(&self.store)?.is_some()
        {
            let _g = lock(&self.lock);
            return self.switch_to_token_key(token, now_ms);
        }
        if self.from_env {
            return Err(SecretError::Invalid(format!(
                "the master key comes from {}; rotate it there (the gateway cannot change it)",
                crate::kms::MASTER_KEY_ENV
            )));
        }
        let _g = lock(&self.lock);
        let pending = pending_path(&self.master_key);
        if std::fs::symlink_metadata(&pending).is_ok() {
            // an earlier rotation in this process stopped after its first step
            recover_rotation(&self.master_key, &self.store)?;
            let current: Arc<dyn Kms> = Arc::new(LocalKms::load_file(&self.master_key)?);
            let mut keys = self.keys_mut();
            let before = std::mem::replace(&mut keys.current, current);
            keys.others.push(before);
        }
        let old_id = self.key_id();
        let new: Arc<dyn Kms> = {
            let k = LocalKms::generate();
            k.write_new(&pending)?;
            sync_dir(&pending)?;
            Arc::new(k)
        };
        self.keys_mut().others.push(new.clone());
        let abandon = |e: SecretError| {
            self.keys_mut()
                .others
                .retain(|k| k.key_id() != new.key_id());
            if let Err(why) = std::fs::remove_file(&pending)
                .map_err(|e| SecretError::Io(pending.display().to_string(), e))
                .and_then(|()| sync_dir(&pending))
            {
                tracing::warn!(%why, "cannot remove the pending master key; the next start removes it");
            }
            e
        };
        let rewrapped = self.rewrap_all(&new, now_ms);
        let (puts, states, data_keys) = rewrapped.map_err(abandon)?;
        let records = puts.len() as u64;
        // step 2: one atomic batch with its entry; past it the new key is the one that opens
        // the records
        let detail = format!(
            "master key {} replaced by {}",
            hex::encode(old_id),
            hex::encode(new.key_id())
        );
        self.record(SecretAction::KmsRotated, states, puts, Some(detail), now_ms)
            .map_err(|e| match e {
                // the batch may have committed before its sync failed: the next start decides
                SecretError::Audit(e) => SecretError::RotationIncomplete(RotationStop::Audit(e)),
                // refused before anything was written
                e => abandon(e),
            })?;
        // step 3
        std::fs::rename(&pending, &self.master_key)
            .map_err(|e| SecretError::RotationIncomplete(RotationStop::Io(e)))?;
        sync_dir(&self.master_key)
            .map_err(|e| SecretError::RotationIncomplete(RotationStop::Sync(Box::new(e))))?;
        {
            let mut keys = self.keys_mut();
            keys.current = new.clone();
            keys.others.clear();
        }
        Ok(KmsRotation::logged(
            old_id,
            new.key_id(),
            records,
            data_keys,
            "master key rotated",
        ))
    }
}

impl Secrets {
    /// Every record with its data keys rewrapped under `new` (never decrypting a secret): the
    /// record writes, their states for the entry, and how many data keys were rewrapped.
    fn rewrap_all(
        &self,
        new: &Arc<dyn Kms>,
        now_ms: u64,
    ) -> Result<(Vec<Claim>, Vec<SecretState>, u64), SecretError> {
        let keys = self.keys();
        let mut puts = Vec::new();
        let mut states = Vec::new();
        let mut data_keys = 0u64;
        for (_, value) in self.store.scan(SECRETS, b"")? {
            let mut rec = SecretRecord::decode(&value, keys.current.key_id())?;
            let old = keys.for_record(&rec)?.clone();
            data_keys += rec.rewrap(old.as_ref(), new.as_ref(), now_ms)? as u64;
            puts.push(rec.put());
            states.push(rec.state());
        }
        Ok((puts, states, data_keys))
    }

    /// `kms init-pkcs11` (`init`: refused on a store that holds secrets) and `kms migrate --to
    /// pkcs11`: a new master key generated in the token becomes the current one, every data key
    /// is rewrapped under it, and `master.key` is removed (specs/operation.md, "A master key in
    /// a token").
    pub fn kms_to_token(&self, init: bool, now_ms: u64) -> Result<KmsRotation, SecretError> {
        let token = self.token.as_ref().ok_or_else(|| {
            SecretError::Invalid(
                "set [gateway] kms = \"pkcs11\" and [pkcs11] in gateway.toml first".into(),
            )
        })?;
        let _g = lock(&self.lock);
        if let Some(id) = token_key_mark(&self.store)? {
            return Err(SecretError::Invalid(format!(
                "the master key is already in the token (key id {}); `didgated kms rotate` replaces it",
                hex::encode(id)
            )));
        }
        if init && !self.store.scan(SECRETS, b"")?.is_empty() {
            return Err(SecretError::Invalid(
                "this store holds secrets wrapped under master.key: move them with `didgated kms migrate --to pkcs11`".into(),
            ));
        }
        self.switch_to_token_key(token, now_ms)
    }

    /// Generates a master key in `token`, rewraps every data key under it and makes it the
    /// current key in one durable batch with the `kms_rotated` entry and [`TOKEN_KEY_MARK`];
    /// then retires the old key: destroyed in the token, or `master.key` removed. A stop
    /// before the batch leaves an unnamed key in the token (destroyed at the next start); a
    /// stop after it leaves the old key (destroyed or removed at the next start). The caller
    /// holds the lifecycle lock.
    fn switch_to_token_key(
        &self,
        token: &Arc<Token>,
        now_ms: u64,
    ) -> Result<KmsRotation, SecretError> {
        let old_id = self.key_id();
        let old_in_token = token_key_mark(&self.store)?.is_some();
        let new: Arc<dyn Kms> = Arc::new(token.generate()?);
        let new_id = new.key_id();
        self.keys_mut().others.push(new.clone());
        let abandon = |e: SecretError| {
            self.keys_mut().others.retain(|k| k.key_id() != new_id);
            if let Err(why) = token.destroy(&new_id) {
                tracing::warn!(%why, "cannot destroy the unused new token key; the next start destroys it");
            }
            e
        };
        let (mut puts, states, data_keys) = self.rewrap_all(&new, now_ms).map_err(abandon)?;
        let records = puts.len() as u64;
        puts.push(Claim {
            space: LIFECYCLE,
            key: TOKEN_KEY_MARK.to_vec(),
            value: new_id.to_vec(),
            rule: ClaimRule::Put,
        });
        let detail = format!(
            "master key {} ({}) replaced by {} (PKCS#11 token {:?})",
            hex::encode(old_id),
            if old_in_token { "token" } else { "file" },
            hex::encode(new_id),
            token.config().token
        );
        self.record(SecretAction::KmsRotated, states, puts, Some(detail), now_ms)
            .map_err(|e| match e {
                SecretError::Audit(e) => SecretError::RotationIncomplete(RotationStop::Audit(e)),
                e => abandon(e),
            })?;
        {
            let mut keys = self.keys_mut();
            keys.current = new;
            keys.others.clear();
        }
        if old_in_token {
            if let Err(why) = token.destroy(&old_id) {
                tracing::warn!(%why, "cannot destroy the old token key now; the next start destroys it");
            }
        } else if !self.from_env && std::fs::symlink_metadata(&self.master_key).is_ok() {
            std::fs::remove_file(&self.master_key)
                .map_err(|e| SecretError::RotationIncomplete(RotationStop::Io(e)))?;
            sync_dir(&self.master_key)
                .map_err(|e| SecretError::RotationIncomplete(RotationStop::Sync(Box::new(e))))?;
        }
        Ok(KmsRotation::logged(
            old_id,
            new_id,
            records,
            data_keys,
            "master key moved to a new key in the PKCS#11 token",
        ))
    }
}

/// The synthetic call `secret test` sends: `GET path`, no query, headers or body.
fn probe_request(up: &Upstream, path: &str, now_ms: u64) -> CallRequest {
    CallRequest {
        v: didgate_protocol::Version::CURRENT.as_u64(),
        aud: String::new(),
        upstream: up.name().to_string(),
        method: "GET".into(),
        path: path.into(),
        query: Vec::new(),
        headers: Vec::new(),
        body_len: 0,
        body_b3: *blake3::hash(b"").as_bytes(),
        nonce: rand::random(),
        time_ms: now_ms,
        head: ChainHead {
            chain: [0; 32],
            seq: 0,
            hash: [0; 32],
        },
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Request;
    use crate::datadir::SPACES;

    const CANARY: &str = "sk-live-CANARY-unit-0123456789abcdef";
    const GRACE: u64 = 3_600_000;

    fn kms() -> LocalKms {
        LocalKms::generate()
    }

    #[test]
    fn rotate_keeps_the_old_version_for_the_grace_window_then_seals_it_off() {
        let k = kms();
        let mut r = SecretRecord::new(&k, "pay", CANARY, 1_000).expect("new");
        assert_eq!(r.current().map(|v| v.version), Some(1));
        let v = r
            .rotate(&k, "sk-live-NEW-VALUE-0000000000000", 10_000)
            .expect("rotate");
        assert_eq!(v, 2);
        assert_eq!(
            r.open_current(&k).expect("open").as_str(),
            "sk-live-NEW-VALUE-0000000000000"
        );
        // the old version is still usable inside the window
        let (n, old) = r
            .open_version(&k, Some(1), 10_000 + GRACE - 1, GRACE)
            .expect("grace");
        assert_eq!((n, old.as_str()), (1, CANARY));
        assert!(r.prune(10_000 + GRACE - 1, GRACE).is_empty());
        // at the end of the window it is refused, then sealed off
        assert!(r.open_version(&k, Some(1), 10_000 + GRACE, GRACE).is_err());
        assert_eq!(r.prune(10_000 + GRACE, GRACE), vec![1]);
        assert_eq!(r.versions.len(), 1);
        assert!(r.open_version(&k, Some(1), 10_000 + GRACE, GRACE).is_err());
        assert_eq!(
            r.open_current(&k).expect("open").as_str(),
            "sk-live-NEW-VALUE-0000000000000"
        );
        // two rotations inside one window: both older versions expire from their own retirement
        let v3 = r
            .rotate(&k, "third-value-abcdefghijkl", 20_000 + GRACE)
            .expect("rotate");
        let v4 = r
            .rotate(&k, "fourth-value-abcdefghijk", 30_000 + GRACE)
            .expect("rotate");
        assert_eq!((v3, v4), (3, 4));
        assert_eq!(r.prune(20_000 + 2 * GRACE, GRACE), vec![2]);
        assert_eq!(r.prune(30_000 + 2 * GRACE, GRACE), vec![3]);
        let back = SecretRecord::decode(&r.encode(), [9; 8]).expect("decode");
        assert_eq!(back.versions.len(), 1);
        assert!(
            back.history
                .iter()
                .any(|e| e.action == "sealed_off" && e.version == 1)
        );
        assert!(
            !r.encode()
                .windows(CANARY.len())
                .any(|w| w == CANARY.as_bytes())
        );
    }

    #[test]
    fn status_transitions_and_purge() {
        let k = kms();
        let mut r = SecretRecord::new(&k, "pay", CANARY, 0).expect("new");
        assert_eq!(
            r.set_status(Status::Disabled, 1),
            Some(SecretAction::Disabled)
        );
        assert!(matches!(
            r.open_current(&k),
            Err(SecretError::Unavailable(..))
        ));
        assert!(
            r.open_version(&k, None, 1, GRACE).is_ok(),
            "a disabled key can be tested"
        );
        assert_eq!(
            r.set_status(Status::Enabled, 2),
            Some(SecretAction::Enabled)
        );
        assert_eq!(r.set_status(Status::Enabled, 3), None, "no change");
        assert_eq!(
            r.set_status(Status::Deleted { at_ms: 4 }, 4),
            Some(SecretAction::Deleted)
        );
        assert!(
            r.set_status(Status::Deleted { at_ms: 5 }, 5).is_none(),
            "first deletion time kept"
        );
        assert_eq!(r.status, Status::Deleted { at_ms: 4 });
        assert!(r.open_current(&k).is_err());
        assert!(r.open_version(&k, None, 5, GRACE).is_err());
        assert!(
            r.rotate(&k, "x-value", 5).is_err(),
            "a deleted secret is not rotated"
        );
        assert!(!r.purge_due(4 + DELETE_RETENTION_MS - 1));
        assert!(r.purge_due(4 + DELETE_RETENTION_MS));
        assert_eq!(
            r.set_status(Status::Enabled, 6),
            Some(SecretAction::Restored)
        );
        assert_eq!(
            r.history.last().map(|e| e.action.as_str()),
            Some("restored")
        );
        assert!(!r.purge_due(u64::MAX));
        assert_eq!(r.open_current(&k).expect("open").as_str(), CANARY);
    }

    #[test]
    fn v1_records_decode_and_strict_v2_decoding() {
        let k = kms();
        let id: [u8; 16] = rand::random();
        let v = SealedVersion::seal(&k, &id, 3, CANARY, 0).expect("seal");
        let v1 = cbor::to_vec(&WireV1 {
            v: 1,
            id,
            name: "old".into(),
            version: 3,
            display: v.display.clone(),
            enabled: false,
            wrapped_key: v.wrapped_key.clone(),
            sealed: v.sealed.clone(),
        });
        let mut r = SecretRecord::decode(&v1, k.key_id()).expect("v1");
        assert_eq!(r.kek, k.key_id());
        assert_eq!(r.status, Status::Disabled);
        assert!(r.set_status(Status::Enabled, 1).is_some());
        assert_eq!(r.open_current(&k).expect("open").as_str(), CANARY);
        // re-encoded as v2
        let back = SecretRecord::decode(&r.encode(), [0; 8]).expect("v2");
        assert_eq!(back.kek, k.key_id());
        assert_eq!(back.versions[0].version, 3);
        // strictness: trailing bytes, bad status, two current versions
        let mut trailing = r.encode();
        trailing.push(0);
        assert!(SecretRecord::decode(&trailing, [0; 8]).is_err());
        let mut two = r.clone();
        let mut extra = two.versions[0].clone();
        extra.version = 4;
        two.versions.push(extra);
        assert!(SecretRecord::decode(&two.encode(), [0; 8]).is_err());
        let mut wire: WireV2 = cbor::from_slice(&r.encode()).expect("wire");
        wire.status = "deleted".into();
        assert!(SecretRecord::decode(&cbor::to_vec(&wire), [0; 8]).is_err());
        wire.v = 3;
        wire.status = "enabled".into();
        assert!(SecretRecord::decode(&cbor::to_vec(&wire), [0; 8]).is_err());
        assert!(SecretRecord::decode(b"\xff\x00garbage", [0; 8]).is_err());
    }

    #[test]
    fn debug_and_value_never_show_plaintext() {
        let k = kms();
        let r = SecretRecord::new(&k, "pay", CANARY, 0).expect("new");
        assert!(!format!("{r:?}").contains("CANARY"));
        let v = SecretValue::new(Zeroizing::new(CANARY.into()));
        assert_eq!(format!("{v:?}"), "SecretValue(<redacted>)");
        let req = Request::SecretRotate {
            name: "pay".into(),
            value: v,
        };
        assert!(!format!("{req:?}").contains("CANARY"));
        let wire = serde_json::to_string(&req).expect("json");
        let back: Request = serde_json::from_str(&wire).expect("json");
        match back {
            Request::SecretRotate { value, .. } => assert_eq!(value.expose(), CANARY),
            _ => panic!("wrong variant"),
        }
    }

    /// A data directory with a master key and a gateway chain (its writer is a plain thread,
    /// so these tests need no runtime).
    fn data_dir() -> (tempfile::TempDir, Chain) {
        let dir = tempfile::tempdir().expect("tmp");
        let d = DataDir::new(dir.path());
        LocalKms::create(&d.master_key()).expect("kms");
        let store = Store::open(&d.store(), SPACES).expect("store");
        let chain = Chain::open(
            store,
            Arc::new(didgate_protocol::Identity::from_seed(&[9; 32])),
            didgate_audit::entry::Role::Gateway,
            0,
            Default::default(),
        )
        .expect("chain");
        (dir, chain)
    }

    /// A secret as a test compares it: name, status, versions.
    type Listed = (String, SecretStatus, Vec<u64>);

    /// The `secret` entries of the chain: each action and the secrets it lists.
    fn lifecycle(chain: &Chain) -> Vec<(SecretAction, Vec<Listed>)> {
        chain
            .store()
            .entries()
            .map(|r| Entry::decode(&r.expect("read").1).expect("decode"))
            .filter_map(|e| Some((e.action?, e.secrets?)))
            .map(|(a, states)| {
                let states = states
                    .into_iter()
                    .map(|s| {
                        (
                            s.name,
                            s.status,
                            s.versions.iter().map(|v| v.version).collect(),
                        )
                    })
                    .collect();
                (a, states)
            })
            .collect()
    }

    fn open_all(s: &Secrets, k: &dyn Kms) -> Vec<bool> {
        s.store
            .scan(SECRETS, b"")
            .expect("scan")
            .iter()
            .flat_map(|(_, v)| {
                let r = SecretRecord::decode(v, [0; 8]).expect("decode");
                r.versions
                    .iter()
                    .map(|v| v.open(k, &r.id, &r.name).is_ok())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn kms_rotate_rewraps_everything_and_recovers_from_each_crash_point() {
        if std::env::var_os(crate::kms::MASTER_KEY_ENV).is_some() {
            return;
        }
        let (dir, chain) = data_dir();
        let master = DataDir::new(dir.path()).master_key();
        let s = Secrets::open(dir.path(), chain.clone(), 3600, None, 0).expect("open");
        s.add("a", CANARY, 1).expect("add");
        s.add("b", "sk-second-secret-value-xyz", 1).expect("add");
        s.rotate("b", "sk-second-secret-value-v2", 2)
            .expect("rotate");
        let old = LocalKms::load_file(&master).expect("old key");
        let out = s.kms_rotate(3).expect("rotate");
        assert_eq!((out.secrets, out.data_keys), (2, 3));
        assert_ne!(out.old_key_id, out.new_key_id);
        assert!(!pending_path(&master).exists());
        let new = LocalKms::load_file(&master).expect("new key");
        assert_eq!(hex::encode(new.key_id()), out.new_key_id);
        assert!(
            open_all(&s, &old).iter().all(|ok| !ok),
            "the old key opens nothing"
        );
        assert!(open_all(&s, &new).iter().all(|ok| *ok));
        assert_eq!(s.open_current("a", 4).expect("open").as_str(), CANARY);
        // one entry lists every secret under the new key, with the fingerprints it had
        let entries: Vec<Entry> = chain
            .store()
            .entries()
            .map(|r| Entry::decode(&r.expect("read").1).expect("decode"))
            .filter(|e| e.kind == didgate_audit::entry::EntryKind::Secret)
            .collect();
        let [.., before, rotated] = entries.as_slice() else {
            panic!("{entries:?}")
        };
        assert_eq!(rotated.action, Some(SecretAction::KmsRotated));
        let states = rotated.secrets.as_deref().unwrap_or_default();
        assert_eq!(states.len(), 2);
        assert!(states.iter().all(|st| st.kek == new.key_id()));
        let b = states.iter().find(|st| st.name == "b").expect("b");
        let b_before = &before.secrets.as_deref().unwrap_or_default()[0];
        assert_eq!(
            b.versions, b_before.versions,
            "rewrapping keeps the ciphertexts and their fingerprints"
        );
        assert_ne!(b.kek, b_before.kek);
        drop(s);

        // crash after the batch, before the rename: master.key is old, master.key.new is new
        std::fs::rename(&master, pending_path(&master)).expect("mv");
        old.write_new(&master).expect("old back");
        let s = Secrets::open(dir.path(), chain.clone(), 3600, None, 5).expect("recover");
        assert!(!pending_path(&master).exists());
        assert_eq!(s.key_id(), new.key_id(), "the rename was redone");
        assert_eq!(s.open_current("a", 6).expect("open").as_str(), CANARY);
        drop(s);

        // crash before the batch: a pending key (or a torn file) no record names
        LocalKms::generate()
            .write_new(&pending_path(&master))
            .expect("pending");
        let s = Secrets::open(dir.path(), chain.clone(), 3600, None, 7).expect("recover");
        assert!(!pending_path(&master).exists());
        assert_eq!(
            s.key_id(),
            new.key_id(),
            "rolled back to the key in master.key"
        );
        assert_eq!(s.open_current("a", 8).expect("open").as_str(), CANARY);
        drop(s);
        std::fs::write(pending_path(&master), b"0123").expect("torn");
        let s = Secrets::open(dir.path(), chain.clone(), 3600, None, 9).expect("recover");
        assert!(!pending_path(&master).exists());
        assert_eq!(
            s.open_current("b", 10).expect("open").as_str(),
            "sk-second-secret-value-v2"
        );
        // the recoveries wrote no lifecycle entry, and the snapshot was written once
        let actions: Vec<SecretAction> = lifecycle(&chain).into_iter().map(|(a, _)| a).collect();
        assert_eq!(
            actions,
            [
                SecretAction::Snapshot,
                SecretAction::Added,
                SecretAction::Added,
                SecretAction::Rotated,
                SecretAction::KmsRotated
            ]
        );
        chain.close();
    }

    #[test]
    fn upkeep_persists_last_use_seals_off_and_purges() {
        let (dir, chain) = data_dir();
        let s = Secrets::open(dir.path(), chain.clone(), 10, None, 0).expect("open");
        s.add("a", CANARY, 1_000).expect("add");
        s.add("gone", "sk-to-be-deleted-0123456789", 1_000)
            .expect("add");
        s.rotate("a", "sk-rotated-value-0123456789", 2_000)
            .expect("rotate");
        s.delete("gone", 3_000).expect("delete");
        assert!(s.open_current("gone", 3_001).is_err());
        drop(s.open_current("a", 5_000).expect("open"));
        // listed from memory before it is persisted
        let listed = s.list().expect("list");
        let a = listed.iter().find(|i| i.name == "a").expect("a");
        assert_eq!(a.last_used_ms, Some(5_000));
        assert_eq!(a.versions.len(), 2);
        assert_eq!(a.versions[0].usable_until_ms, Some(12_000));
        let up = s.maintain(11_999).expect("upkeep");
        assert_eq!(up.last_use_persisted, 1);
        assert!(up.sealed_off.is_empty());
        assert!(
            s.maintain(11_999).expect("upkeep") == Upkeep::default(),
            "no write without a change"
        );
        let up = s.maintain(12_000).expect("upkeep");
        assert_eq!(up.sealed_off, vec![("a".to_string(), 1)]);
        let up = s.maintain(3_000 + DELETE_RETENTION_MS).expect("upkeep");
        assert_eq!(up.purged, vec!["gone".to_string()]);
        drop(s);
        let s = Secrets::open(
            dir.path(),
            chain.clone(),
            10,
            None,
            3_000 + DELETE_RETENTION_MS,
        )
        .expect("reopen");
        let listed = s.list().expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].last_used_ms, Some(5_000), "persisted");
        assert_eq!(listed[0].version, 2);
        assert!(matches!(s.enable("gone", 1), Err(SecretError::NotFound(_))));
        s.add("gone", "sk-the-name-is-free-again-01", 1)
            .expect("name free after purge");
        // every lifecycle write is an entry; persisting the last use is not
        use SecretStatus::{Deleted, Enabled, Purged};
        let st = |n: &str, s, v: &[u64]| (n.to_string(), s, v.to_vec());
        assert_eq!(
            lifecycle(&chain),
            vec![
                (SecretAction::Snapshot, vec![]),
                (SecretAction::Added, vec![st("a", Enabled, &[1])]),
                (SecretAction::Added, vec![st("gone", Enabled, &[1])]),
                (SecretAction::Rotated, vec![st("a", Enabled, &[1, 2])]),
                (SecretAction::Deleted, vec![st("gone", Deleted, &[1])]),
                (SecretAction::SealedOff, vec![st("a", Enabled, &[2])]),
                (SecretAction::Purged, vec![st("gone", Purged, &[])]),
                (SecretAction::Added, vec![st("gone", Enabled, &[1])]),
            ]
        );
        chain.close();
    }
}

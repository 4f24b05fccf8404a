//! Keys at rest: envelope encryption with just-in-time decryption (specs/operation.md,
//! "Secrets at rest").
//!
//! Each secret version has its own random 256-bit data key; the secret is sealed with
//! AES-256-GCM-SIV under the data key, and the data key is wrapped under the KMS master key.
//! The associated data binds the secret's immutable id and version, so a ciphertext moved to
//! another record fails to open. Plaintext leaves this module only as `Zeroizing` bytes.
//!
//! This module owns the cryptography (the [`Kms`] trait, the [`LocalKms`] master key and one
//! [`SealedVersion`]); the record that holds the versions and the secret lifecycle (rotation,
//! status, master-key rotation) live in [`crate::secrets`].

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use aes_gcm_siv::aead::{Aead, KeyInit, Payload};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Why a KMS or secret operation failed. Never carries secret material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KmsError {
    /// The master key `key` (a file, [`MASTER_KEY_ENV`] or a key id) is missing, unreadable,
    /// malformed or not loaded.
    #[error("master key {key}: {problem}")]
    MasterKey {
        /// Which key: its file, [`MASTER_KEY_ENV`], or its id (hex).
        key: String,
        /// What is wrong.
        #[source]
        problem: MasterKeyProblem,
    },
    /// Decryption failed (wrong key, or a record moved or altered).
    #[error("secret {0} cannot be decrypted (wrong master key or altered record)")]
    Open(String),
    /// The record does not decode.
    #[error("secret record is malformed")]
    Malformed,
    /// The KMS cannot be used now (a PKCS#11 token missing, locked or failing); calls that
    /// need a secret are refused `kms_unavailable` until it is back.
    /// The cause is the backend's own error (a PKCS#11 token's `TokenError`), boxed so that
    /// this module does not depend on the backends built on it.
    #[error("the KMS is unavailable: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// What is wrong with a master key ([`KmsError::MasterKey`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MasterKeyProblem {
    /// The file cannot be read, created or written.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The file is readable by group or others.
    #[error(
        "readable by group or others (mode {mode:o}): it may have been read; chmod 600 it and rotate it (`didgated kms rotate`)"
    )]
    Exposed {
        /// The file's permission bits.
        mode: u32,
    },
    /// The text is not 64 hex digits.
    #[error("not 64 hex digits")]
    NotHex,
    /// A secret is wrapped under this key, which is not loaded.
    #[error("secret {secret} is wrapped under a master key not loaded")]
    NotLoaded {
        /// The secret.
        secret: String,
    },
}

impl KmsError {
    fn master_key(key: &str, problem: impl Into<MasterKeyProblem>) -> Self {
        Self::MasterKey {
            key: key.to_string(),
            problem: problem.into(),
        }
    }
}

/// Identifies a master key without revealing it: the first 8 bytes of BLAKE3 `derive_key`
/// under the context `didgate kms key id v1` over the 32-byte key (specs/operation.md,
/// "Secrets at rest"). Records name the key that wraps their data keys with it.
pub type KeyId = [u8; 8];

/// BLAKE3 `derive_key` context of [`KeyId`].
const KEY_ID_CONTEXT: &str = "didgate kms key id v1";
/// Prefix of the associated data of a wrapped data key.
const WRAP_AAD: &[u8] = b"didgate kms wrap v1|";
/// Prefix of the associated data of a sealed secret.
const SECRET_AAD: &[u8] = b"didgate secret v1|";

/// A key-management service: wraps and unwraps data keys. `aad` binds the wrapped key to
/// its secret's id and version.
pub trait Kms: Send + Sync {
    /// The id of the master key this KMS wraps under.
    fn key_id(&self) -> KeyId;
    /// Wraps a data key.
    fn wrap(&self, data_key: &[u8; 32], aad: &[u8]) -> Result<Vec<u8>, KmsError>;
    /// Unwraps a data key.
    fn unwrap(&self, wrapped: &[u8], aad: &[u8]) -> Result<Zeroizing<[u8; 32]>, KmsError>;
}

/// The local KMS: a 256-bit master key from a file (mode 0600) or the environment.
pub struct LocalKms {
    master: Zeroizing<[u8; 32]>,
    id: KeyId,
}

impl std::fmt::Debug for LocalKms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalKms(id {}, <redacted>)", hex::encode(self.id))
    }
}

/// Environment variable that may hold the master key (64 hex digits) instead of the file.
pub const MASTER_KEY_ENV: &str = "DIDGATE_MASTER_KEY";

impl LocalKms {
    fn from_master(master: Zeroizing<[u8; 32]>) -> Self {
        let derived = blake3::derive_key(KEY_ID_CONTEXT, master.as_ref());
        let mut id = [0u8; 8];
        id.copy_from_slice(&derived[..8]);
        Self { master, id }
    }

    /// A new random master key, in memory only (see [`LocalKms::write_new`]).
    pub fn generate() -> Self {
        Self::from_master(Zeroizing::new(rand::random::<[u8; 32]>()))
    }

    /// Creates a new random master key file with mode 0600; fails if it exists.
    pub fn create(path: &Path) -> Result<Self, KmsError> {
        let kms = Self::generate();
        kms.write_new(path)?;
        Ok(kms)
    }

    /// Writes this key to a new file `path` (64 hex digits, mode 0600) and syncs the file; fails
    /// if the file exists. The caller syncs the directory when the name must be durable.
    pub fn write_new(&self, path: &Path) -> Result<(), KmsError> {
        let text = Zeroizing::new(hex::encode(self.master.as_ref()));
        let p = path.display().to_string();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| KmsError::master_key(&p, e))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| KmsError::master_key(&p, e))
    }

    /// Loads the master key from [`MASTER_KEY_ENV`] if set, else from `path`.
    pub fn load(path: &Path) -> Result<Self, KmsError> {
        match Self::from_env() {
            Some(k) => k,
            None => Self::load_file(path),
        }
    }

    /// The master key from [`MASTER_KEY_ENV`], if the variable is set.
    pub fn from_env() -> Option<Result<Self, KmsError>> {
        let text = Zeroizing::new(std::env::var(MASTER_KEY_ENV).ok()?);
        Some(Self::parse(&text, MASTER_KEY_ENV))
    }

    /// Loads the master key from the file `path` only (the environment is not consulted).
    /// A file group or others could read is refused (like an identity file): the key may have
    /// been read, so it should be rotated (`didgated kms rotate`) rather than quietly kept.
    pub fn load_file(path: &Path) -> Result<Self, KmsError> {
        use std::os::unix::fs::PermissionsExt;
        let p = path.display().to_string();
        let mode = std::fs::metadata(path)
            .map_err(|e| KmsError::master_key(&p, e))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(KmsError::master_key(
                &p,
                MasterKeyProblem::Exposed { mode: mode & 0o777 },
            ));
        }
        let text =
            Zeroizing::new(std::fs::read_to_string(path).map_err(|e| KmsError::master_key(&p, e))?);
        Self::parse(&text, &p)
    }

    fn parse(text: &str, label: &str) -> Result<Self, KmsError> {
        let mut master = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(text.trim(), master.as_mut())
            .map_err(|_| KmsError::master_key(label, MasterKeyProblem::NotHex))?;
        Ok(Self::from_master(master))
    }
}

fn seal(key: &[u8; 32], plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
    let cipher = Aes256GcmSiv::new(key.into());
    let nonce: [u8; 12] = rand::random();
    let mut out = nonce.to_vec();
    // Encryption with a valid key and in-memory buffers cannot fail.
    out.extend(
        cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .unwrap_or_default(),
    );
    out
}

fn open(key: &[u8; 32], sealed: &[u8], aad: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let (nonce, ct) = (
        <[u8; 12]>::try_from(sealed.get(..12)?).ok()?,
        sealed.get(12..)?,
    );
    let cipher = Aes256GcmSiv::new(key.into());
    cipher
        .decrypt(&Nonce::from(nonce), Payload { msg: ct, aad })
        .ok()
        .map(Zeroizing::new)
}

impl Kms for LocalKms {
    fn key_id(&self) -> KeyId {
        self.id
    }

    fn wrap(&self, data_key: &[u8; 32], aad: &[u8]) -> Result<Vec<u8>, KmsError> {
        Ok(seal(&self.master, data_key, &[WRAP_AAD, aad].concat()))
    }

    fn unwrap(&self, wrapped: &[u8], aad: &[u8]) -> Result<Zeroizing<[u8; 32]>, KmsError> {
        let raw = open(&self.master, wrapped, &[WRAP_AAD, aad].concat())
            .ok_or_else(|| KmsError::Open("data key".into()))?;
        let mut key = Zeroizing::new([0u8; 32]);
        if raw.len() != 32 {
            return Err(KmsError::Malformed);
        }
        key.copy_from_slice(&raw);
        Ok(key)
    }
}

/// The associated data of one secret version: `"didgate secret v1|" || id || u64be(version)`.
fn aad(id: &[u8; 16], version: u64) -> Vec<u8> {
    let mut a = SECRET_AAD.to_vec();
    a.extend_from_slice(id);
    a.extend_from_slice(&version.to_be_bytes());
    a
}

/// Characters of each end a display form shows at most.
const DISPLAY_END: usize = 4;

/// How many characters of each end a display form of a secret of `len` characters shows: at
/// most [`DISPLAY_END`], and both ends together never more than a quarter of it.
fn display_end(len: usize) -> usize {
    DISPLAY_END.min(len / 8)
}

/// A display form that shows at most 4 characters of each end, never more than a quarter of
/// the secret in all (`sk-l...9f2c` for a 40-character key), or `...(N chars)` for a secret
/// under 8 characters.
pub fn display_form(secret: &str) -> String {
    let chars: Vec<char> = secret.chars().collect();
    let k = display_end(chars.len());
    if k == 0 {
        return format!("...({} chars)", chars.len());
    }
    let head: String = chars[..k].iter().collect();
    let tail: String = chars[chars.len() - k..].iter().collect();
    format!("{head}...{tail}")
}

/// Bytes a sealed value adds to its plaintext: the 12-byte nonce and the 16-byte tag.
const SEAL_OVERHEAD: usize = 12 + 16;

/// One sealed version of a secret: its own data key (wrapped by the KMS) and ciphertext,
/// bound to the secret's id and this version number (specs/operation.md, "Secrets at rest").
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedVersion {
    /// Version number, from 1, never reused within a secret.
    pub version: u64,
    /// Display prefix and suffix as stored (releases before b9992ca's successor stored 8
    /// characters of the head): show [`SealedVersion::shown`] instead.
    pub display: String,
    /// The data key wrapped by the KMS.
    #[serde(with = "serde_bytes")]
    pub wrapped_key: Vec<u8>,
    /// The secret sealed under the data key (nonce || ciphertext).
    #[serde(with = "serde_bytes")]
    pub sealed: Vec<u8>,
    /// When this version was stored, ms since the Unix epoch (0 for a version from a v1 record).
    pub created_ms: u64,
    /// When a rotation replaced it, ms since the Unix epoch; absent for the current version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_ms: Option<u64>,
}

impl std::fmt::Debug for SealedVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedVersion")
            .field("version", &self.version)
            .field("display", &self.display)
            .field("created_ms", &self.created_ms)
            .field("retired_ms", &self.retired_ms)
            .finish_non_exhaustive()
    }
}

impl SealedVersion {
    /// The display form under today's rule ([`display_form`]), from the stored one and the
    /// sealed length (the plaintext's byte length, an upper bound of its characters): a form
    /// stored by an older release is cut down, never decrypted.
    pub fn shown(&self) -> String {
        let Some((head, tail)) = self.display.split_once("...") else {
            return self.display.clone();
        };
        if tail.starts_with('(') {
            return self.display.clone();
        }
        let len = self.sealed.len().saturating_sub(SEAL_OVERHEAD);
        let k = display_end(len)
            .min(head.chars().count())
            .min(tail.chars().count());
        if k == 0 {
            return format!("...({len} bytes)");
        }
        let head: String = head.chars().take(k).collect();
        let tail: String = tail.chars().skip(tail.chars().count() - k).collect();
        format!("{head}...{tail}")
    }

    /// Seals `plaintext` as `version` of the secret `id` under a fresh data key.
    pub fn seal(
        kms: &dyn Kms,
        id: &[u8; 16],
        version: u64,
        plaintext: &str,
        now_ms: u64,
    ) -> Result<Self, KmsError> {
        let data_key = Zeroizing::new(rand::random::<[u8; 32]>());
        let aad = aad(id, version);
        let wrapped_key = kms.wrap(&data_key, &aad)?;
        let sealed = seal(&data_key, plaintext.as_bytes(), &aad);
        Ok(Self {
            version,
            display: display_form(plaintext),
            wrapped_key,
            sealed,
            created_ms: now_ms,
            retired_ms: None,
        })
    }

    /// Decrypts just in time; the caller drops the result as soon as it is injected. `label`
    /// names the secret in the error.
    pub fn open(
        &self,
        kms: &dyn Kms,
        id: &[u8; 16],
        label: &str,
    ) -> Result<Zeroizing<String>, KmsError> {
        let aad = aad(id, self.version);
        let data_key = kms.unwrap(&self.wrapped_key, &aad).map_err(|e| match e {
            // the KMS is down: not a statement about this record
            KmsError::Unavailable(why) => KmsError::Unavailable(why),
            _ => KmsError::Open(label.into()),
        })?;
        let raw =
            open(&data_key, &self.sealed, &aad).ok_or_else(|| KmsError::Open(label.into()))?;
        let text = std::str::from_utf8(&raw).map_err(|_| KmsError::Malformed)?;
        Ok(Zeroizing::new(text.to_string()))
    }

    /// Re-wraps the data key from `old` to `new`: the data key is unwrapped (and zeroized on
    /// return), the sealed secret is not touched and never decrypted.
    pub fn rewrap(
        &mut self,
        old: &dyn Kms,
        new: &dyn Kms,
        id: &[u8; 16],
        label: &str,
    ) -> Result<(), KmsError> {
        let aad = aad(id, self.version);
        let data_key = old.unwrap(&self.wrapped_key, &aad).map_err(|e| match e {
            // the KMS is down: not a statement about this record
            KmsError::Unavailable(why) => KmsError::Unavailable(why),
            _ => KmsError::Open(label.into()),
        })?;
        self.wrapped_key = new.wrap(&data_key, &aad)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_and_binding() {
        let dir = tempfile::tempdir().expect("tmp");
        let kms = LocalKms::create(&dir.path().join("mk")).expect("kms");
        let canary = "sk-live-CANARY-0123456789abcdef";
        let id_a: [u8; 16] = rand::random();
        let a = SealedVersion::seal(&kms, &id_a, 1, canary, 5).expect("seal");
        assert_eq!(a.open(&kms, &id_a, "a").expect("open").as_str(), canary);
        assert!(
            !didgate_protocol::cbor::to_vec(&a)
                .windows(canary.len())
                .any(|w| w == canary.as_bytes())
        );
        assert!(!format!("{a:?}").contains("CANARY"));
        // 30 characters: 3 of each end (a quarter of 30 is 7)
        assert_eq!(a.display, "sk-...def");
        assert_eq!(a.shown(), "sk-...def");
        // a form stored by an older release is cut down to today's rule
        let old = SealedVersion {
            display: "sk-live-...cdef".into(),
            ..a.clone()
        };
        assert_eq!(old.shown(), "sk-...def");
        for (secret, shown) in [
            ("short", "...(5 chars)"),
            ("sixteen-chars-ok", "si...ok"),
            ("abcdefgh", "a...h"),
        ] {
            assert_eq!(display_form(secret), shown);
            let ends = shown.split("...").map(str::len).sum::<usize>();
            assert!(shown.starts_with("...") || 4 * ends <= secret.len());
        }
        // ciphertext moved to another record (other id) fails
        let id_b: [u8; 16] = rand::random();
        assert!(a.open(&kms, &id_b, "b").is_err());
        // version bump without re-sealing fails
        let mut c = a.clone();
        c.version = 2;
        assert!(c.open(&kms, &id_a, "a").is_err());
        // another master key fails
        let other = LocalKms::create(&dir.path().join("mk2")).expect("kms");
        assert!(a.open(&other, &id_a, "a").is_err());
        assert_ne!(kms.key_id(), other.key_id());
        // the same key read back has the same id, and the file is 0600
        let again = LocalKms::load_file(&dir.path().join("mk")).expect("load");
        assert_eq!(again.key_id(), kms.key_id());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("mk"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!format!("{kms:?}").contains(&hex::encode(kms.master.as_ref())));
        std::fs::set_permissions(
            dir.path().join("mk"),
            std::fs::Permissions::from_mode(0o640),
        )
        .expect("chmod");
        let refused = LocalKms::load_file(&dir.path().join("mk")).expect_err("loose key");
        assert!(refused.to_string().contains("rotate it"), "{refused}");
    }

    #[test]
    fn rewrap_moves_the_data_key_only() {
        let old = LocalKms::generate();
        let new = LocalKms::generate();
        let id: [u8; 16] = rand::random();
        let mut v =
            SealedVersion::seal(&old, &id, 3, "sk-test-rewrap-0123456789", 1).expect("seal");
        let sealed_before = v.sealed.clone();
        v.rewrap(&old, &new, &id, "x").expect("rewrap");
        assert_eq!(v.sealed, sealed_before, "the sealed secret is untouched");
        assert_eq!(
            v.open(&new, &id, "x").expect("open").as_str(),
            "sk-test-rewrap-0123456789"
        );
        assert!(v.open(&old, &id, "x").is_err(), "the old key opens nothing");
        // rewrapping with the wrong old key fails and changes nothing
        let before = v.wrapped_key.clone();
        assert!(v.rewrap(&old, &new, &id, "x").is_err());
        assert_eq!(v.wrapped_key, before);
    }
}

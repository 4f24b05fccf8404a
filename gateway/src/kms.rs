//! Keys at rest: envelope encryption with just-in-time decryption (specs/protocol.md,
//! "Secrets at rest").
//!
//! Each secret has its own random 256-bit data key; the secret is sealed with AES-256-GCM-SIV
//! under the data key, and the data key is wrapped under the KMS master key. The associated
//! data binds the secret's immutable id and version, so a ciphertext moved to another record
//! fails to open. Plaintext leaves this module only as `Zeroizing` bytes.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use aes_gcm_siv::aead::{Aead, KeyInit, Payload};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use didgate_protocol::cbor::{self, fixed};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Why a KMS or secret operation failed. Never carries secret material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KmsError {
    /// The master key file is missing, unreadable or malformed.
    #[error("master key {0}: {1}")]
    MasterKey(String, String),
    /// Decryption failed (wrong key, or a record moved or altered).
    #[error("secret {0} cannot be decrypted (wrong master key or altered record)")]
    Open(String),
    /// The record does not decode.
    #[error("secret record is malformed")]
    Malformed,
}

/// A key-management service: wraps and unwraps data keys. `aad` binds the wrapped key to
/// its secret's id and version.
pub trait Kms: Send + Sync {
    /// Wraps a data key.
    fn wrap(&self, data_key: &[u8; 32], aad: &[u8]) -> Result<Vec<u8>, KmsError>;
    /// Unwraps a data key.
    fn unwrap(&self, wrapped: &[u8], aad: &[u8]) -> Result<Zeroizing<[u8; 32]>, KmsError>;
}

/// The local KMS: a 256-bit master key from a file (mode 0600) or the environment.
pub struct LocalKms {
    master: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for LocalKms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalKms(<redacted>)")
    }
}

/// Environment variable that may hold the master key (64 hex digits) instead of the file.
pub const MASTER_KEY_ENV: &str = "DIDGATE_MASTER_KEY";

impl LocalKms {
    /// Creates a new random master key file with mode 0600; fails if it exists.
    pub fn create(path: &Path) -> Result<Self, KmsError> {
        let master = Zeroizing::new(rand::random::<[u8; 32]>());
        let text = Zeroizing::new(hex::encode(master.as_ref()));
        let p = path.display().to_string();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| KmsError::MasterKey(p.clone(), e.to_string()))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| KmsError::MasterKey(p, e.to_string()))?;
        Ok(Self { master })
    }

    /// Loads the master key from [`MASTER_KEY_ENV`] if set, else from `path`.
    pub fn load(path: &Path) -> Result<Self, KmsError> {
        let p = path.display().to_string();
        let text = match std::env::var(MASTER_KEY_ENV) {
            Ok(v) => Zeroizing::new(v),
            Err(_) => Zeroizing::new(
                std::fs::read_to_string(path)
                    .map_err(|e| KmsError::MasterKey(p.clone(), e.to_string()))?,
            ),
        };
        let mut master = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(text.trim(), master.as_mut())
            .map_err(|_| KmsError::MasterKey(p, "not 64 hex digits".into()))?;
        Ok(Self { master })
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
    fn wrap(&self, data_key: &[u8; 32], aad: &[u8]) -> Result<Vec<u8>, KmsError> {
        Ok(seal(
            &self.master,
            data_key,
            &[b"didgate kms wrap v1|".as_slice(), aad].concat(),
        ))
    }

    fn unwrap(&self, wrapped: &[u8], aad: &[u8]) -> Result<Zeroizing<[u8; 32]>, KmsError> {
        let raw = open(
            &self.master,
            wrapped,
            &[b"didgate kms wrap v1|".as_slice(), aad].concat(),
        )
        .ok_or_else(|| KmsError::Open("data key".into()))?;
        let mut key = Zeroizing::new([0u8; 32]);
        if raw.len() != 32 {
            return Err(KmsError::Malformed);
        }
        key.copy_from_slice(&raw);
        Ok(key)
    }
}

/// A stored secret: ciphertext and metadata only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretRecord {
    /// Record version, 1.
    pub v: u64,
    /// Immutable random id, bound into the ciphertexts.
    #[serde(with = "fixed")]
    pub id: [u8; 16],
    /// Display name.
    pub name: String,
    /// Secret version, from 1.
    pub version: u64,
    /// Display prefix and suffix, e.g. `sk-live-...9f2c`.
    pub display: String,
    /// Whether calls may use it.
    pub enabled: bool,
    /// The data key wrapped by the KMS.
    #[serde(with = "serde_bytes")]
    pub wrapped_key: Vec<u8>,
    /// The secret sealed under the data key (nonce || ciphertext).
    #[serde(with = "serde_bytes")]
    pub sealed: Vec<u8>,
}

fn aad(id: &[u8; 16], version: u64) -> Vec<u8> {
    let mut a = b"didgate secret v1|".to_vec();
    a.extend_from_slice(id);
    a.extend_from_slice(&version.to_be_bytes());
    a
}

/// A display form that shows a few characters and never the whole secret.
pub fn display_form(secret: &str) -> String {
    let chars: Vec<char> = secret.chars().collect();
    if chars.len() < 16 {
        return format!("...({} chars)", chars.len());
    }
    let head: String = chars[..8].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}...{tail}")
}

impl SecretRecord {
    /// Seals a new secret.
    pub fn seal(kms: &dyn Kms, name: &str, plaintext: &str) -> Result<Self, KmsError> {
        let id: [u8; 16] = rand::random();
        let version = 1;
        let data_key = Zeroizing::new(rand::random::<[u8; 32]>());
        let aad = aad(&id, version);
        let wrapped_key = kms.wrap(&data_key, &aad)?;
        let sealed = seal(&data_key, plaintext.as_bytes(), &aad);
        Ok(Self {
            v: 1,
            id,
            name: name.into(),
            version,
            display: display_form(plaintext),
            enabled: true,
            wrapped_key,
            sealed,
        })
    }

    /// Decrypts just in time; the caller drops the result as soon as it is injected.
    pub fn open(&self, kms: &dyn Kms) -> Result<Zeroizing<String>, KmsError> {
        let aad = aad(&self.id, self.version);
        let data_key = kms
            .unwrap(&self.wrapped_key, &aad)
            .map_err(|_| KmsError::Open(self.name.clone()))?;
        let raw =
            open(&data_key, &self.sealed, &aad).ok_or_else(|| KmsError::Open(self.name.clone()))?;
        let text = std::str::from_utf8(&raw).map_err(|_| KmsError::Malformed)?;
        Ok(Zeroizing::new(text.to_string()))
    }

    /// Encodes for the store.
    pub fn encode(&self) -> Vec<u8> {
        cbor::to_vec(self)
    }

    /// Decodes from the store.
    pub fn decode(bytes: &[u8]) -> Result<Self, KmsError> {
        let r: Self = cbor::from_slice(bytes).map_err(|_| KmsError::Malformed)?;
        if r.v != 1 {
            return Err(KmsError::Malformed);
        }
        Ok(r)
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
        let a = SecretRecord::seal(&kms, "a", canary).expect("seal");
        assert_eq!(a.open(&kms).expect("open").as_str(), canary);
        assert!(
            !a.encode()
                .windows(canary.len())
                .any(|w| w == canary.as_bytes())
        );
        assert_eq!(a.display, "sk-live-...cdef");
        // ciphertext moved to another record (other id) fails
        let mut b = SecretRecord::seal(&kms, "b", "other-secret-value-xyz").expect("seal");
        b.sealed = a.sealed.clone();
        b.wrapped_key = a.wrapped_key.clone();
        assert!(b.open(&kms).is_err());
        // version bump without re-sealing fails
        let mut c = a.clone();
        c.version = 2;
        assert!(c.open(&kms).is_err());
        // another master key fails
        let other = LocalKms::create(&dir.path().join("mk2")).expect("kms");
        assert!(a.open(&other).is_err());
    }
}

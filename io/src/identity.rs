//! Identity files (specs/client-tools.md, "Identity files"): a private Ed25519 seed in a file of mode
//! 0600, in the clear or sealed under a passphrase (Argon2id, then AES-256-GCM-SIV). A world- or
//! group-readable key file is refused; creation never overwrites.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use aes_gcm_siv::aead::{Aead, KeyInit, Payload};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use didgate_protocol::Identity;
use zeroize::Zeroizing;

const HEADER: &str = "didgate-identity-v1";
const SEALED_HEADER: &str = "didgate-identity-v1-sealed";
/// Argon2id parameters for new sealed files: memory (KiB), passes, lanes (the OWASP minimum
/// for Argon2id, 19 MiB and 2 passes).
const KDF_M_KIB: u32 = 19 * 1024;
const KDF_T: u32 = 2;
const KDF_P: u32 = 1;
/// Largest Argon2 memory a file may ask for (a hostile file must not exhaust memory).
const KDF_MAX_M_KIB: u32 = 1024 * 1024;

/// Why an identity file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The file is missing or unreadable.
    #[error("cannot read identity {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file already exists (keygen never overwrites).
    #[error("identity {0} already exists; refusing to overwrite it")]
    Exists(String),
    /// The file could not be written.
    #[error("cannot write identity {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Readable by group or others.
    #[error(
        "identity {path} has mode {mode:o}; run `chmod 600 {path}` (it must not be readable by others)"
    )]
    Permissions {
        /// The file.
        path: String,
        /// Its mode.
        mode: u32,
    },
    /// Not an identity file.
    #[error("identity {0} is malformed")]
    Malformed(String),
    /// The file is sealed under a passphrase and none was given.
    #[error(
        "identity {0} is encrypted with a passphrase; set DIDGATE_PASSPHRASE or enter it when asked"
    )]
    NeedsPassphrase(String),
    /// The passphrase does not open the file (or the file was altered).
    #[error("wrong passphrase for identity {0} (or the file was altered)")]
    WrongPassphrase(String),
    /// An empty passphrase was given for sealing.
    #[error("the passphrase is empty")]
    EmptyPassphrase,
}

/// Loads an identity file, refusing one that others can read. A sealed file needs
/// [`load_with_passphrase`] ([`IdentityError::NeedsPassphrase`]).
pub fn load(path: &Path) -> Result<Identity, IdentityError> {
    load_with_passphrase(path, None)
}

/// Whether the identity file at `path` is sealed under a passphrase (checks its mode first).
pub fn is_sealed(path: &Path) -> Result<bool, IdentityError> {
    let text = read_private(path)?;
    Ok(text.lines().next() == Some(SEALED_HEADER))
}

fn read_private(path: &Path) -> Result<Zeroizing<String>, IdentityError> {
    let p = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|source| IdentityError::Read {
        path: p.clone(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::Permissions { path: p, mode });
    }
    Ok(Zeroizing::new(std::fs::read_to_string(path).map_err(
        |source| IdentityError::Read { path: p, source },
    )?))
}

/// Loads an identity file in the clear, or sealed with `passphrase`. A file others can read
/// is refused before anything else.
pub fn load_with_passphrase(
    path: &Path,
    passphrase: Option<&str>,
) -> Result<Identity, IdentityError> {
    let p = path.display().to_string();
    let text = read_private(path)?;
    let mut lines = text.lines();
    match lines.next() {
        Some(HEADER) => {
            let hex_seed = lines
                .next()
                .ok_or_else(|| IdentityError::Malformed(p.clone()))?;
            let mut seed = Zeroizing::new([0u8; 32]);
            hex::decode_to_slice(hex_seed.trim(), seed.as_mut())
                .map_err(|_| IdentityError::Malformed(p))?;
            Ok(Identity::from_seed(&seed))
        }
        Some(SEALED_HEADER) => {
            let passphrase = passphrase.ok_or_else(|| IdentityError::NeedsPassphrase(p.clone()))?;
            open_sealed(&p, lines, passphrase)
        }
        _ => Err(IdentityError::Malformed(p)),
    }
}

/// The sealed format's lines after the header: `argon2id M T P`, salt (32 hex), nonce (24
/// hex), ciphertext of the seed with its tag (96 hex), the DID.
fn open_sealed<'a>(
    p: &str,
    mut lines: impl Iterator<Item = &'a str>,
    passphrase: &str,
) -> Result<Identity, IdentityError> {
    let malformed = || IdentityError::Malformed(p.to_string());
    let params = lines.next().ok_or_else(malformed)?;
    let nums: Vec<&str> = params.split(' ').collect();
    let [alg, m, t, lanes] = nums.as_slice() else {
        return Err(malformed());
    };
    if *alg != "argon2id" {
        return Err(malformed());
    }
    let parse = |s: &str| s.parse::<u32>().map_err(|_| malformed());
    let (m, t, lanes) = (parse(m)?, parse(t)?, parse(lanes)?);
    if m > KDF_MAX_M_KIB || t > 16 || lanes > 16 {
        return Err(malformed());
    }
    let mut salt = [0u8; 16];
    let mut nonce = [0u8; 12];
    let mut sealed = [0u8; 48];
    hex::decode_to_slice(lines.next().ok_or_else(malformed)?, &mut salt)
        .map_err(|_| malformed())?;
    hex::decode_to_slice(lines.next().ok_or_else(malformed)?, &mut nonce)
        .map_err(|_| malformed())?;
    hex::decode_to_slice(lines.next().ok_or_else(malformed)?, &mut sealed)
        .map_err(|_| malformed())?;
    let did = lines.next().ok_or_else(malformed)?;
    let key = derive_key(passphrase, &salt, m, t, lanes).map_err(|_| malformed())?;
    let aad = sealed_aad(params, did);
    let seed = Zeroizing::new(
        Aes256GcmSiv::new_from_slice(key.as_ref())
            .map_err(|_| malformed())?
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &sealed,
                    aad: &aad,
                },
            )
            .map_err(|_| IdentityError::WrongPassphrase(p.to_string()))?,
    );
    let seed: Zeroizing<[u8; 32]> =
        Zeroizing::new(seed.as_slice().try_into().map_err(|_| malformed())?);
    let identity = Identity::from_seed(&seed);
    if identity.did().as_str() != did {
        return Err(malformed());
    }
    Ok(identity)
}

/// Associated data of a sealed file: the header, the KDF parameters and the DID, so none can
/// be changed without the passphrase failing.
fn sealed_aad(params: &str, did: &str) -> Vec<u8> {
    format!("{SEALED_HEADER}\n{params}\n{did}").into_bytes()
}

fn derive_key(
    passphrase: &str,
    salt: &[u8],
    m: u32,
    t: u32,
    lanes: u32,
) -> Result<Zeroizing<[u8; 32]>, argon2::Error> {
    let params = argon2::Params::new(m, t, lanes, Some(32))?;
    let kdf = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut key = Zeroizing::new([0u8; 32]);
    kdf.hash_password_into(passphrase.as_bytes(), salt, key.as_mut())?;
    Ok(key)
}

/// Writes `identity` to a new file of mode 0600, sealed under `passphrase` (Argon2id, then
/// AES-256-GCM-SIV); fails if the file exists.
pub fn create_sealed(
    path: &Path,
    identity: &Identity,
    passphrase: &str,
) -> Result<(), IdentityError> {
    if passphrase.is_empty() {
        return Err(IdentityError::EmptyPassphrase);
    }
    let p = path.display().to_string();
    let salt: [u8; 16] = rand::random();
    let nonce: [u8; 12] = rand::random();
    let params = format!("argon2id {KDF_M_KIB} {KDF_T} {KDF_P}");
    let did = identity.did().to_string();
    let key = derive_key(passphrase, &salt, KDF_M_KIB, KDF_T, KDF_P)
        .map_err(|_| IdentityError::Malformed(p.clone()))?;
    let seed = identity.seed();
    let sealed = Aes256GcmSiv::new_from_slice(key.as_ref())
        .map_err(|_| IdentityError::Malformed(p.clone()))?
        .encrypt(
            &Nonce::from(nonce),
            Payload {
                msg: seed.as_ref(),
                aad: &sealed_aad(&params, &did),
            },
        )
        .map_err(|_| IdentityError::Malformed(p))?;
    let text = Zeroizing::new(format!(
        "{SEALED_HEADER}\n{params}\n{}\n{}\n{}\n{did}\n",
        hex::encode(salt),
        hex::encode(nonce),
        hex::encode(sealed)
    ));
    write_new(path, &text)
}

/// Writes `identity` to a new file of mode 0600; fails if the file exists.
pub fn create(path: &Path, identity: &Identity) -> Result<(), IdentityError> {
    let seed = identity.seed();
    let text = Zeroizing::new(format!(
        "{HEADER}\n{}\n{}\n",
        hex::encode(seed.as_ref()),
        identity.did()
    ));
    write_new(path, &text)
}

fn write_new(path: &Path, text: &str) -> Result<(), IdentityError> {
    let p = path.display().to_string();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| IdentityError::Write {
            path: p.clone(),
            source,
        })?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => IdentityError::Exists(p.clone()),
            _ => IdentityError::Write {
                path: p.clone(),
                source,
            },
        })?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|source| IdentityError::Write { path: p, source })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).ok();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_load_refuse() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("id");
        let id = Identity::from_seed(&[4; 32]);
        create(&path, &id).expect("create");
        assert_eq!(
            std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(load(&path).expect("load").did(), id.did());
        assert!(matches!(
            create(&path, &Identity::generate()),
            Err(IdentityError::Exists(_))
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(
            load(&path),
            Err(IdentityError::Permissions { .. })
        ));
    }

    #[test]
    fn sealed_files_open_only_with_the_passphrase() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("id");
        let id = Identity::from_seed(&[7; 32]);
        create_sealed(&path, &id, "correct horse").expect("create");
        assert_eq!(
            std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(
            !text.contains(&hex::encode([7u8; 32])),
            "the seed is not in the clear"
        );
        assert!(is_sealed(&path).expect("sealed"));
        assert!(matches!(
            load(&path),
            Err(IdentityError::NeedsPassphrase(_))
        ));
        assert!(matches!(
            load_with_passphrase(&path, Some("wrong")),
            Err(IdentityError::WrongPassphrase(_))
        ));
        let back = load_with_passphrase(&path, Some("correct horse")).expect("open");
        assert_eq!(back.did(), id.did());
        assert!(matches!(
            create_sealed(&path, &id, "x"),
            Err(IdentityError::Exists(_))
        ));
        assert!(matches!(
            create_sealed(&dir.path().join("e"), &id, ""),
            Err(IdentityError::EmptyPassphrase)
        ));
        // lowering the KDF cost, or swapping the DID, breaks the seal
        for (from, to) in [
            (format!("argon2id {KDF_M_KIB} "), "argon2id 8 ".to_string()),
            (
                id.did().to_string(),
                Identity::from_seed(&[8; 32]).did().to_string(),
            ),
        ] {
            let altered = dir.path().join("altered");
            let _ = std::fs::remove_file(&altered);
            std::fs::write(&altered, text.replace(&from, &to)).expect("write");
            std::fs::set_permissions(&altered, std::fs::Permissions::from_mode(0o600))
                .expect("chmod");
            assert!(
                matches!(
                    load_with_passphrase(&altered, Some("correct horse")),
                    Err(IdentityError::WrongPassphrase(_))
                ),
                "{to}"
            );
        }
        // a hostile memory cost is refused before any work
        let hostile = dir.path().join("hostile");
        std::fs::write(
            &hostile,
            text.replace(&format!("argon2id {KDF_M_KIB} "), "argon2id 4294967295 "),
        )
        .expect("write");
        std::fs::set_permissions(&hostile, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(matches!(
            load_with_passphrase(&hostile, Some("correct horse")),
            Err(IdentityError::Malformed(_))
        ));
        // group-readable: refused before the passphrase is even asked for
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        assert!(matches!(
            load_with_passphrase(&path, Some("correct horse")),
            Err(IdentityError::Permissions { .. })
        ));
    }
}

//! Identity files (specs/protocol.md, "Identities"): a private Ed25519 seed in a file of mode
//! 0600. A world- or group-readable key file is refused; `create` never overwrites.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use didgate_protocol::Identity;
use zeroize::Zeroizing;

const HEADER: &str = "didgate-identity-v1";

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
}

/// Loads an identity file, refusing one that others can read.
pub fn load(path: &Path) -> Result<Identity, IdentityError> {
    let p = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|source| IdentityError::Read {
        path: p.clone(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::Permissions { path: p, mode });
    }
    let text =
        Zeroizing::new(
            std::fs::read_to_string(path).map_err(|source| IdentityError::Read {
                path: p.clone(),
                source,
            })?,
        );
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err(IdentityError::Malformed(p));
    }
    let hex_seed = lines
        .next()
        .ok_or_else(|| IdentityError::Malformed(p.clone()))?;
    let mut seed = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(hex_seed.trim(), seed.as_mut())
        .map_err(|_| IdentityError::Malformed(p))?;
    Ok(Identity::from_seed(&seed))
}

/// Writes `identity` to a new file of mode 0600; fails if the file exists.
pub fn create(path: &Path, identity: &Identity) -> Result<(), IdentityError> {
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
    let seed = identity.seed();
    let text = Zeroizing::new(format!(
        "{HEADER}\n{}\n{}\n",
        hex::encode(seed.as_ref()),
        identity.did()
    ));
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
}

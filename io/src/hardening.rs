//! What a didgate process does to itself before it holds a key: no core dumps, files private
//! by default, and its own directory private (specs/threat-model.md, "Files and processes").
//!
//! Owns: [`harden_process`] (no core file, not dumpable, umask 077) and [`private_dir`] (refuse
//! a directory others may write to, tighten what others may read, and say what changed). Used
//! at start by `didgated`, `didgate` (every command, the proxy and MCP among them).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rustix::process::{DumpableBehavior, Resource, Rlimit};

/// Why a process or directory could not be made private.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HardeningError {
    /// A system call refused.
    #[error("cannot {what}: {source}")]
    Sys {
        /// What was attempted.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The directory may be written by group or others: someone else could have planted or
    /// replaced its files.
    #[error(
        "{} is writable by group or others (mode {mode:o}); refusing to use it (chmod 700 it after checking its contents)",
        path.display()
    )]
    Writable {
        /// The directory.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// Reading or changing a file's mode failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Disables core dumps (`RLIMIT_CORE` 0, soft and hard) and ptrace-style dumping
/// (`PR_SET_DUMPABLE` 0), and sets the file creation mask to 077 so that every file and
/// directory the process creates is private to its user.
pub fn harden_process() -> Result<(), HardeningError> {
    // the dumpable flag first: a process seen with RLIMIT_CORE 0 is already not dumpable
    rustix::process::set_dumpable_behavior(DumpableBehavior::NotDumpable).map_err(|e| {
        HardeningError::Sys {
            what: "clear the dumpable flag",
            source: e.into(),
        }
    })?;
    rustix::process::setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )
    .map_err(|e| HardeningError::Sys {
        what: "set RLIMIT_CORE to 0",
        source: e.into(),
    })?;
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    Ok(())
}

/// The modes [`private_dir`] changed: (path, old mode, new mode).
pub type Tightened = Vec<(PathBuf, u32, u32)>;

/// Checks that `dir` (if it exists) is writable by its owner only, then removes the group and
/// other permission bits of everything in it, recursively (symbolic links are not followed),
/// and returns what it changed. A directory writable by group or others is refused. The files
/// named in `keys` (relative to `dir`) are left as they are: a key file others could read may
/// have been read, and its loader refuses it so that the owner rotates it rather than have it
/// quietly made private.
pub fn private_dir(dir: &Path, keys: &[&str]) -> Result<Tightened, HardeningError> {
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(HardeningError::Io {
                path: dir.into(),
                source,
            });
        }
    };
    let mode = meta.permissions().mode() & 0o7777;
    if meta.is_dir() && mode & 0o022 != 0 {
        return Err(HardeningError::Writable {
            path: dir.into(),
            mode,
        });
    }
    let keys: Vec<PathBuf> = keys.iter().map(|k| dir.join(k)).collect();
    let mut changed = Vec::new();
    tighten(dir, &keys, &mut changed)?;
    Ok(changed)
}

fn tighten(path: &Path, keys: &[PathBuf], changed: &mut Tightened) -> Result<(), HardeningError> {
    if keys.iter().any(|k| k == path) {
        return Ok(());
    }
    let io = |source| HardeningError::Io {
        path: path.into(),
        source,
    };
    let meta = std::fs::symlink_metadata(path).map_err(io)?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        let new = mode & !0o077;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(new)).map_err(io)?;
        changed.push((path.into(), mode, new));
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).map_err(io)? {
            tighten(&entry.map_err(io)?.path(), keys, changed)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tightens_and_refuses_shared_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("data");
        std::fs::create_dir_all(root.join("store")).expect("mkdir");
        std::fs::write(root.join("store/0.jnl"), b"journal").expect("write");
        std::fs::write(root.join("gateway.toml"), b"x").expect("write");
        std::fs::write(root.join("identity"), b"key").expect("write");
        for (p, m) in [
            (root.clone(), 0o755),
            (root.join("store"), 0o755),
            (root.join("store/0.jnl"), 0o644),
            (root.join("gateway.toml"), 0o600),
            (root.join("identity"), 0o644),
        ] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)).expect("chmod");
        }
        let changed = private_dir(&root, &["identity"]).expect("tightened");
        let paths: Vec<_> = changed.iter().map(|(p, _, _)| p.clone()).collect();
        assert_eq!(paths.len(), 3, "{changed:?}");
        assert!(!paths.contains(&root.join("gateway.toml")));
        for p in [root.clone(), root.join("store"), root.join("store/0.jnl")] {
            let mode = std::fs::metadata(&p).expect("meta").permissions().mode();
            assert_eq!(mode & 0o077, 0, "{}", p.display());
        }
        // the key file is left for its loader to refuse
        let mode = std::fs::metadata(root.join("identity"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
        assert!(private_dir(&root, &["identity"]).expect("again").is_empty());
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        assert!(matches!(
            private_dir(&root, &[]),
            Err(HardeningError::Writable { .. })
        ));
        assert!(
            private_dir(&dir.path().join("absent"), &[])
                .expect("absent")
                .is_empty()
        );
    }
}

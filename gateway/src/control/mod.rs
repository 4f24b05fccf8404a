//! The daemon's local control socket (specs/operation.md, "Control socket").
//!
//! A store has one process, so admin commands reach a running `didgated` here instead of
//! opening its database. The socket is `DATA/control.sock`, mode 0600, and a connection is
//! served only if its peer runs as the socket's owner (peer credentials checked). The protocol
//! is one JSON request line and one JSON reply line per connection, except `events`: after its
//! reply line the connection stays open and carries one JSON event per line ([`subscribe`]).
//!
//! [`seal`] and [`export`] (`didgated seal`, `didgated export`) go through the socket when a
//! daemon answers and open the store otherwise; either way the chain is sealed first: its last
//! checkpoint, signed by the gateway, covers its last entry (specs/audit-log.md, "Sealing").

pub mod server;

use std::path::{Path, PathBuf};

use didgate_audit::entry::Role;
use didgate_audit::export::ExportError;
use didgate_audit::store::Sealed;
use didgate_audit::{Store, StoreError};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::events::Event;

/// A control request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum Request {
    /// Export the gateway's chain to `out` (an absolute path the daemon can write), sealed: the
    /// daemon makes its last checkpoint cover its head, then writes the file before any later
    /// append, so the file ends with a checkpoint covering its last entry.
    Export {
        /// Destination file.
        out: PathBuf,
    },
    /// A consistent copy of the store, made while the daemon serves (`didgated backup`), to
    /// `out` (an absolute path that does not exist yet).
    Backup {
        /// Destination directory.
        out: PathBuf,
    },
    /// Seal the chain now (`didgated seal`): sign a checkpoint of the current head unless the
    /// last one covers it already.
    Checkpoint,
    /// The gateway's DID and chain head.
    Status,
    /// Revoke a DID (`did`) or a grant (`grant`, 32 hex digits).
    Revoke {
        /// The DID to revoke.
        #[serde(default)]
        did: Option<String>,
        /// The grant id to revoke, hex.
        #[serde(default)]
        grant: Option<String>,
        /// Why (recorded in the audit entry).
        reason: String,
    },
    /// Add a secret (`didgated secret add`); the value travels over this socket only.
    SecretAdd {
        /// Secret name.
        name: String,
        /// The value (redacted in `Debug`).
        value: crate::secrets::SecretValue,
    },
    /// Rotate a secret to a new value (`didgated secret rotate`).
    SecretRotate {
        /// Secret name.
        name: String,
        /// The new value (redacted in `Debug`).
        value: crate::secrets::SecretValue,
    },
    /// Disable a secret: calls get `secret_unavailable`.
    SecretDisable {
        /// Secret name.
        name: String,
    },
    /// Enable a secret, or restore a deleted one.
    SecretEnable {
        /// Secret name.
        name: String,
    },
    /// Soft-delete a secret (recoverable for 90 days).
    SecretDelete {
        /// Secret name.
        name: String,
    },
    /// Every secret's name, version, prefix, status and last use (never a value).
    SecretList,
    /// Test a secret against each upstream using it (`test_path`).
    SecretTest {
        /// Secret name.
        name: String,
        /// A version still held (default: the current one).
        #[serde(default)]
        version: Option<u64>,
    },
    /// Rotate the master key: rewrap every data key.
    KmsRotate,
    /// Move the master key into the PKCS#11 token of `[pkcs11]`: `kms init-pkcs11` (`init`,
    /// refused on a store holding secrets) or `kms migrate --to pkcs11`.
    KmsToToken {
        /// `init-pkcs11` rather than `migrate`.
        #[serde(default)]
        init: bool,
    },
    /// Re-read and validate the policy (`didgated policy reload`, SIGHUP) and swap it in
    /// atomically; on an error the set in force stays.
    PolicyReload,
    /// Re-read and validate the `[[upstream]]` tables of gateway.toml (`didgated upstreams
    /// reload`) and swap them in atomically (in a cluster, on every node); on an error the
    /// upstreams in force stay.
    UpstreamsReload,
    /// Stream live events (`didgated events --follow`): the reply `{"ok":true}` once
    /// subscribed, then one [`Event`] per line until the client disconnects or the daemon
    /// stops.
    Events,
}

impl Request {
    /// The secret a lifecycle command writes (add, rotate, disable, enable, delete), if it is
    /// one: what a cluster member publishes after it.
    pub fn secret_written(&self) -> Option<&str> {
        match self {
            Self::SecretAdd { name, .. }
            | Self::SecretRotate { name, .. }
            | Self::SecretDisable { name }
            | Self::SecretEnable { name }
            | Self::SecretDelete { name } => Some(name),
            _ => None,
        }
    }
}

/// A control reply.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the command succeeded.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Gateway DID (status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub did: Option<String>,
    /// Entries in the chain (status, checkpoint) or exported (export).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries: Option<u64>,
    /// Checkpoints exported (export), or signed now (checkpoint: 0 when the last one covered
    /// the head already).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoints: Option<u64>,
    /// The chain is sealed: its last checkpoint covers its last entry (checkpoint), or the
    /// export ends with such a checkpoint (export). Absent from daemons of releases that did not
    /// seal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<bool>,
    /// Secrets acted on (secret commands) or listed (`secret_list`); never a value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<Vec<crate::secrets::SecretInfo>>,
    /// Outcomes of `secret_test`, one per upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<Vec<crate::secrets::Probe>>,
    /// Outcome of `kms_rotate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms: Option<crate::secrets::KmsRotation>,
    /// Hash of the policy set in force, 64 lowercase hex digits (`status`, `policy_reload`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Items copied (`backup`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copied: Option<u64>,
    /// Hash of the upstreams in force, 64 lowercase hex digits (`upstreams_reload`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstreams: Option<String>,
}

/// The socket path in a data directory.
pub fn socket_path(data: &Path) -> PathBuf {
    data.join("control.sock")
}

/// A live event stream from the daemon ([`subscribe`]).
#[derive(Debug)]
pub struct EventStream {
    reader: BufReader<UnixStream>,
}

/// Longest event line read, bytes.
const MAX_EVENT_LINE: u64 = 1024 * 1024;

impl EventStream {
    /// The next event line (one JSON object, without its newline); `None` once the daemon
    /// closed the stream (it stopped).
    pub async fn next_line(&mut self) -> std::io::Result<Option<String>> {
        let mut line = String::new();
        let n = (&mut self.reader)
            .take(MAX_EVENT_LINE)
            .read_line(&mut line)
            .await?;
        if n == 0 {
            return Ok(None);
        }
        if !line.ends_with('\n') {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "event line too long or cut short",
            ));
        }
        line.pop();
        Ok(Some(line))
    }

    /// The next event, parsed; `None` once the daemon closed the stream.
    pub async fn next(&mut self) -> std::io::Result<Option<Event>> {
        match self.next_line().await? {
            None => Ok(None),
            Some(line) => serde_json::from_str(&line)
                .map(Some)
                .map_err(std::io::Error::other),
        }
    }
}

/// Subscribes to the live events of the daemon serving `data`; `None` when no daemon answers.
/// Events published after this returns are delivered, in order.
pub async fn subscribe(data: &Path) -> Option<std::io::Result<EventStream>> {
    let mut stream = UnixStream::connect(socket_path(data)).await.ok()?;
    Some(
        async {
            let mut req = serde_json::to_vec(&Request::Events).map_err(std::io::Error::other)?;
            req.push(b'\n');
            stream.write_all(&req).await?;
            let mut events = EventStream {
                reader: BufReader::new(stream),
            };
            let first = events.next_line().await?.ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the daemon closed the connection",
                )
            })?;
            let reply: Reply = serde_json::from_str(&first).map_err(std::io::Error::other)?;
            if !reply.ok {
                return Err(std::io::Error::other(reply.error.unwrap_or_default()));
            }
            Ok(events)
        }
        .await,
    )
}

/// Sends one request to the daemon serving `data`; `None` when no daemon answers.
pub async fn call(data: &Path, req: &Request) -> Option<std::io::Result<Reply>> {
    let stream = UnixStream::connect(socket_path(data)).await.ok()?;
    Some(
        async {
            let (read, mut write) = stream.into_split();
            // may hold a secret value: sized once so no copy is left behind, zeroized on drop
            let mut line = zeroize::Zeroizing::new(Vec::with_capacity(64 * 1024 + 1));
            serde_json::to_writer(&mut *line, req).map_err(std::io::Error::other)?;
            line.push(b'\n');
            write.write_all(&line).await?;
            let mut answer = String::new();
            BufReader::new(read)
                .take(4 * 1024 * 1024)
                .read_line(&mut answer)
                .await?;
            serde_json::from_str(&answer).map_err(std::io::Error::other)
        }
        .await,
    )
}

/// Why `didgated seal` or `didgated export` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The data directory holds no gateway store.
    #[error("{0} holds no gateway store")]
    NoStore(PathBuf),
    /// Another process holds the store and no daemon answers on the control socket.
    #[error(
        "the store {0} is held by another process (a didgated whose control socket does not answer, or another command that has it open); retry once it has stopped"
    )]
    Busy(PathBuf),
    /// The gateway's identity (it signs the checkpoint) could not be loaded.
    #[error("the gateway identity: {0}")]
    Identity(#[source] didgate_io::identity::IdentityError),
    /// The store failed, or its chain is not this gateway's.
    #[error("{}: {why}", path.display())]
    Store {
        /// The store.
        path: PathBuf,
        /// Why.
        #[source]
        why: StoreError,
    },
    /// The export file could not be written.
    #[error(transparent)]
    Export(#[from] ExportError),
    /// The running daemon refused or failed.
    #[error("the daemon refused: {0}")]
    Refused(String),
    /// The control socket failed.
    #[error("control socket: {0}")]
    Control(#[source] std::io::Error),
    /// The running daemon, of an earlier release, exported without sealing (the file was
    /// removed).
    #[error(
        "the running daemon (an earlier release) exported without sealing, so the file was removed: restart the daemon with this release, or stop it and export again"
    )]
    NotSealed,
    /// The blocking task that sealed or exported did not finish (it panicked).
    #[error("sealing did not finish: {0}")]
    Task(#[source] tokio::task::JoinError),
}

impl SealError {
    fn store(path: &Path, source: StoreError) -> Self {
        if source.is_locked() {
            Self::Busy(path.to_path_buf())
        } else {
            Self::Store {
                path: path.to_path_buf(),
                why: source,
            }
        }
    }
}

/// How [`seal`] sealed the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealOutcome {
    /// Through the running daemon (else on the store).
    pub by_daemon: bool,
    /// What was found or done; `None` from a daemon of an earlier release, which sealed (a
    /// forced checkpoint) without saying whether one was needed.
    pub sealed: Option<Sealed>,
}

/// `didgated seal`: seals the gateway chain in `data` through the running daemon, or on the
/// store when none answers ([`seal_store`]). Sealing a sealed chain writes nothing.
pub async fn seal(data: &Path) -> Result<SealOutcome, SealError> {
    if let Some(reply) = call(data, &Request::Checkpoint).await {
        let reply = reply.map_err(SealError::Control)?;
        if !reply.ok {
            return Err(SealError::Refused(reply.error.unwrap_or_default()));
        }
        let sealed = match (reply.sealed, reply.entries, reply.checkpoints) {
            (Some(true), Some(size), Some(written)) => Some(Sealed {
                size,
                written: written > 0,
            }),
            _ => None,
        };
        return Ok(SealOutcome {
            by_daemon: true,
            sealed,
        });
    }
    let data = data.to_path_buf();
    let (_, sealed) = blocking(move || seal_store(&data)).await?;
    Ok(SealOutcome {
        by_daemon: false,
        sealed: Some(sealed),
    })
}

/// Opens the store of a gateway whose daemon is stopped and seals its chain with the gateway's
/// identity (`DATA/identity`): a checkpoint of the head unless one covers it, nothing else
/// ([`Store::seal`]). Returns the open store, for an export.
pub fn seal_store(data: &Path) -> Result<(Store, Sealed), SealError> {
    let d = crate::datadir::DataDir::new(data);
    let dir = d.store();
    if !dir.join("version").is_file() {
        return Err(SealError::NoStore(data.to_path_buf()));
    }
    let store = Store::open(&dir, &[]).map_err(|e| SealError::store(&dir, e))?;
    let identity = didgate_io::identity::load(&d.identity()).map_err(SealError::Identity)?;
    // a node's checkpoint carries its certificate, as its daemon's do (read as it is: a
    // certificate that no longer holds makes the verifier report the checkpoint)
    let node_cert = crate::config::RawConfig::read(&d.config())
        .ok()
        .and_then(|c| c.node)
        .and_then(|n| std::fs::read(data.join(n.certificate)).ok());
    let sealed = store
        .seal_with_node_certificate(
            &identity,
            Role::Gateway,
            didgate_io::now_ms(),
            node_cert.as_deref(),
        )
        .map_err(|e| SealError::store(&dir, e))?;
    Ok((store, sealed))
}

/// `didgated export`: the gateway chain in `data`, sealed, to `out`: through the running daemon
/// (which seals, then exports before any later append), or, when none answers, sealed on the
/// store ([`seal_store`]) and exported. Returns the entries and checkpoints exported.
pub async fn export(data: &Path, out: &Path) -> Result<(u64, u64), SealError> {
    let out = std::path::absolute(out).map_err(ExportError::Io)?;
    let request = Request::Export { out: out.clone() };
    if let Some(reply) = call(data, &request).await {
        let reply = reply.map_err(SealError::Control)?;
        if !reply.ok {
            return Err(SealError::Refused(reply.error.unwrap_or_default()));
        }
        if reply.sealed != Some(true) {
            let _ = std::fs::remove_file(&out);
            return Err(SealError::NotSealed);
        }
        return Ok((reply.entries.unwrap_or(0), reply.checkpoints.unwrap_or(0)));
    }
    let data = data.to_path_buf();
    blocking(move || {
        let (store, _) = seal_store(&data)?;
        Ok(didgate_audit::export::export_sealed(&store, &out)?)
    })
    .await
}

/// `didgated backup`: a consistent copy of the store of `data` in the new directory `out`,
/// through the running daemon (while it serves) or from the store when none runs. Returns the
/// items copied. The copy holds the store only: the identity and the master key are
/// credentials, never copied by didgated (back them up on their own).
pub async fn backup(data: &Path, out: &Path) -> Result<u64, SealError> {
    let out = std::path::absolute(out).map_err(ExportError::Io)?;
    let request = Request::Backup { out: out.clone() };
    if let Some(reply) = call(data, &request).await {
        let reply = reply.map_err(SealError::Control)?;
        if !reply.ok {
            return Err(SealError::Refused(reply.error.unwrap_or_default()));
        }
        return Ok(reply.copied.unwrap_or(0));
    }
    let data = data.to_path_buf();
    blocking(move || {
        let dir = crate::datadir::DataDir::new(&data).store();
        if !dir.join("version").is_file() {
            return Err(SealError::NoStore(data.clone()));
        }
        let store = Store::open(&dir, &[]).map_err(|e| SealError::store(&dir, e))?;
        store.backup(&out).map_err(|e| SealError::store(&dir, e))
    })
    .await
}

/// `didgated restore`: puts the backup `from` (a store [`backup`] wrote) in place of the store
/// of `data`, which no daemon may be serving. The store it replaces is kept beside it as
/// `store.replaced-MS`. Returns that path. In a cluster the node then checks, when it joins,
/// that the restored chain is not shorter than what the cluster saw of it (operation.md,
/// "Cluster", "Backups").
pub async fn restore(data: &Path, from: &Path) -> Result<PathBuf, SealError> {
    if call(data, &Request::Status).await.is_some() {
        return Err(SealError::Refused(
            "a daemon serves this data directory: stop it before restoring".into(),
        ));
    }
    let (data, from) = (data.to_path_buf(), from.to_path_buf());
    blocking(move || {
        // the backup must open as a store with a readable head
        {
            let store = Store::open(&from, &[]).map_err(|e| SealError::store(&from, e))?;
            store.head().map_err(|e| SealError::store(&from, e))?;
        }
        let dir = crate::datadir::DataDir::new(&data).store();
        let aside = dir.with_file_name(format!("store.replaced-{}", didgate_io::now_ms()));
        let io = |e: std::io::Error| SealError::Export(ExportError::Io(e));
        if std::fs::symlink_metadata(&dir).is_ok() {
            std::fs::rename(&dir, &aside).map_err(io)?;
        }
        copy_tree(&from, &dir).map_err(io)?;
        Ok(aside)
    })
    .await
}

/// Copies the directory tree `from` to the new directory `to`, each file synced.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_tree(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), &target)?;
            std::fs::File::open(&target)?.sync_all()?;
        }
    }
    std::fs::File::open(to)?.sync_all()
}

/// Runs `f` on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SealError> + Send + 'static,
) -> Result<T, SealError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(SealError::Task)?
}

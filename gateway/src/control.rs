//! The daemon's local control socket (specs/protocol.md, "Control socket").
//!
//! A store has one process, so admin commands reach a running `didgated` here instead of
//! opening its database. The socket is `DATA/control.sock`, mode 0600, and a connection is
//! served only if its peer runs as the socket's owner (peer credentials checked). The protocol
//! is one JSON request line and one JSON reply line per connection, except `events`: after its
//! reply line the connection stays open and carries one JSON event per line ([`subscribe`]).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, watch};

use crate::events::{Event, EventKind};
use crate::gateway::Gateway;

/// A control request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum Request {
    /// Export the gateway's chain to `out` (an absolute path the daemon can write).
    Export {
        /// Destination file.
        out: PathBuf,
    },
    /// Sign a checkpoint of the chain now.
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
    /// Re-read and validate the policy (`didgated policy reload`, SIGHUP) and swap it in
    /// atomically; on an error the set in force stays.
    PolicyReload,
    /// Stream live events (`didgated events --follow`): the reply `{"ok":true}` once
    /// subscribed, then one [`Event`] per line until the client disconnects or the daemon
    /// stops.
    Events,
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
    /// Entries in the chain (status) or exported (export).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries: Option<u64>,
    /// Checkpoints exported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoints: Option<u64>,
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
}

fn failure(e: impl std::fmt::Display) -> Reply {
    Reply {
        ok: false,
        error: Some(e.to_string()),
        ..Default::default()
    }
}

/// The socket path in a data directory.
pub fn socket_path(data: &Path) -> PathBuf {
    data.join("control.sock")
}

/// Serves the control socket until `stop` changes.
pub async fn serve(
    gw: Arc<Gateway>,
    data: &Path,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let path = socket_path(data);
    if path.exists() {
        // A live daemon answers; a stale socket from a crash does not.
        if UnixStream::connect(&path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another didgated serves this data directory",
            ));
        }
        std::fs::remove_file(&path)?;
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let owner = std::fs::metadata(&path)?.uid();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let gw = gw.clone();
                let stop = stop.clone();
                tokio::spawn(async move { let _ = handle(gw, stream, owner, stop).await; });
            }
            _ = stop.changed() => break,
        }
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

async fn handle(
    gw: Arc<Gateway>,
    stream: UnixStream,
    owner: u32,
    stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let allowed = stream
        .peer_cred()
        .map(|c| c.uid() == owner || c.uid() == 0)
        .unwrap_or(false);
    let (read, mut write) = stream.into_split();
    let reply = if !allowed {
        failure("peer is not the daemon's user")
    } else {
        // may hold a secret value (secret_add, secret_rotate): sized once, zeroized on drop
        let mut line = zeroize::Zeroizing::new(String::with_capacity(64 * 1024 + 1));
        let mut reader = BufReader::new(read).take(64 * 1024);
        reader.read_line(&mut line).await?;
        match serde_json::from_str::<Request>(&line) {
            Err(e) => failure(format!("bad request: {e}")),
            Ok(Request::Events) => {
                return stream_events(&gw, reader.into_inner(), write, stop).await;
            }
            Ok(req) => execute(&gw, req).await,
        }
    };
    write_line(&mut write, &reply).await
}

async fn write_line(write: &mut OwnedWriteHalf, value: &impl Serialize) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(value).unwrap_or_default();
    out.push(b'\n');
    write.write_all(&out).await
}

/// `events`: subscribes, answers `{"ok":true}`, then writes one event per line until the
/// client closes its end, the daemon stops (`stop`), or a write fails. A subscriber that fell
/// behind gets a `lagged` line with the number of events it missed, and the stream goes on.
async fn stream_events(
    gw: &Gateway,
    mut read: BufReader<OwnedReadHalf>,
    mut write: OwnedWriteHalf,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut events = gw.subscribe();
    write_line(
        &mut write,
        &Reply {
            ok: true,
            ..Default::default()
        },
    )
    .await?;
    let mut ignored = [0u8; 512];
    loop {
        let event = tokio::select! {
            got = events.recv() => match got {
                Ok(e) => e,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    Event::new(crate::now_ms(), EventKind::Lagged { missed })
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
            // anything the client sends is ignored; its end closing ends the stream
            n = read.read(&mut ignored) => match n {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            },
            _ = stop.changed() => break,
        };
        write_line(&mut write, &event).await?;
    }
    Ok(())
}

async fn execute(gw: &Arc<Gateway>, req: Request) -> Reply {
    let chain = gw.chain().clone();
    match req {
        req @ (Request::SecretAdd { .. }
        | Request::SecretRotate { .. }
        | Request::SecretDisable { .. }
        | Request::SecretEnable { .. }
        | Request::SecretDelete { .. }
        | Request::SecretList
        | Request::SecretTest { .. }
        | Request::KmsRotate) => {
            let reply = crate::secrets::control(gw.secrets(), Some(gw.config()), &req).await;
            if reply.ok {
                secret_event(gw, &req, &reply);
            }
            reply
        }
        Request::Events => failure("events is served on its own connection"),
        Request::Revoke { did, grant, reason } => {
            match crate::gateway::parse_revoke(did.as_deref(), grant.as_deref()) {
                Ok(target) => match gw.revoke(&target, &reason).await {
                    Ok(entry) => Reply {
                        ok: true,
                        entries: Some(entry.seq + 1),
                        ..Default::default()
                    },
                    Err(e) => failure(e),
                },
                Err(e) => failure(e),
            }
        }
        Request::Status => match chain.head() {
            Ok(h) => Reply {
                ok: true,
                did: Some(gw.did().to_string()),
                entries: Some(h.seq + 1),
                policy: Some(hex::encode(gw.policy().hash())),
                ..Default::default()
            },
            Err(e) => failure(e),
        },
        Request::PolicyReload => {
            let gw = gw.clone();
            match tokio::task::spawn_blocking(move || gw.reload_policy()).await {
                Ok(Ok(hash)) => Reply {
                    ok: true,
                    policy: Some(hex::encode(hash)),
                    ..Default::default()
                },
                Ok(Err(e)) => failure(e),
                Err(e) => failure(e),
            }
        }
        Request::Checkpoint => {
            match tokio::task::spawn_blocking(move || chain.checkpoint()).await {
                Ok(Ok(())) => Reply {
                    ok: true,
                    ..Default::default()
                },
                Ok(Err(e)) => failure(e),
                Err(e) => failure(e),
            }
        }
        Request::Export { out } => {
            if !out.is_absolute() {
                return failure("the export path must be absolute");
            }
            match tokio::task::spawn_blocking(move || {
                didgate_audit::export::export(chain.store(), &out)
            })
            .await
            {
                Ok(Ok((entries, checkpoints))) => Reply {
                    ok: true,
                    entries: Some(entries),
                    checkpoints: Some(checkpoints),
                    ..Default::default()
                },
                Ok(Err(e)) => failure(e),
                Err(e) => failure(e),
            }
        }
    }
}

/// Publishes the event of a successful secret lifecycle command or master-key rotation (never
/// a value or a display form).
fn secret_event(gw: &Gateway, req: &Request, reply: &Reply) {
    let action = match req {
        Request::SecretAdd { .. } => "added",
        Request::SecretRotate { .. } => "rotated",
        Request::SecretDisable { .. } => "disabled",
        Request::SecretEnable { .. } => "enabled",
        Request::SecretDelete { .. } => "deleted",
        Request::KmsRotate => {
            if let Some(k) = &reply.kms {
                gw.emit(|| EventKind::KmsRotation {
                    old_key_id: k.old_key_id.clone(),
                    new_key_id: k.new_key_id.clone(),
                    secrets: k.secrets,
                });
            }
            return;
        }
        _ => return,
    };
    for info in reply.secrets.iter().flatten() {
        gw.emit(|| EventKind::Secret {
            name: info.name.clone(),
            action: action.into(),
            version: info.version,
            status: info.status.clone(),
        });
    }
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

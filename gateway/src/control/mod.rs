//! The daemon's local control socket (specs/protocol.md, "Control socket").
//!
//! A store has one process, so admin commands reach a running `didgated` here instead of
//! opening its database. The socket is `DATA/control.sock`, mode 0600, and a connection is
//! served only if its peer runs as the socket's owner (peer credentials checked). The protocol
//! is one JSON request line and one JSON reply line per connection, except `events`: after its
//! reply line the connection stays open and carries one JSON event per line ([`subscribe`]).

pub mod server;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::events::Event;

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

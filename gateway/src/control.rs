//! The daemon's local control socket (specs/protocol.md, "Control socket").
//!
//! A store has one process, so admin commands reach a running `didgated` here instead of
//! opening its database. The socket is `DATA/control.sock`, mode 0600, and a connection is
//! served only if its peer runs as the socket's owner (peer credentials checked). The protocol
//! is one JSON request line and one JSON reply line per connection.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

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
                tokio::spawn(async move { let _ = handle(gw, stream, owner).await; });
            }
            _ = stop.changed() => break,
        }
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

async fn handle(gw: Arc<Gateway>, stream: UnixStream, owner: u32) -> std::io::Result<()> {
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
            Ok(req) => execute(&gw, req).await,
        }
    };
    let mut out = serde_json::to_vec(&reply).unwrap_or_default();
    out.push(b'\n');
    write.write_all(&out).await
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
            crate::secrets::control(gw.secrets(), Some(gw.config()), &req).await
        }
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

//! The server side of the control socket: accepts a connection from the daemon's own user,
//! reads one request line, and runs it on the gateway (secret and KMS commands through
//! [`crate::admin`]), or streams events. The protocol itself is [`super`]'s.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, watch};

use super::{Reply, Request, socket_path};
use crate::events::{Event, EventKind};
use crate::gateway::Gateway;

fn failure(e: impl std::fmt::Display) -> Reply {
    Reply {
        ok: false,
        error: Some(e.to_string()),
        ..Default::default()
    }
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
                    Event::new(didgate_io::now_ms(), EventKind::Lagged { missed })
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
        | Request::KmsRotate
        | Request::KmsToToken { .. }) => {
            if gw.config().cluster().is_some()
                && matches!(req, Request::KmsRotate | Request::KmsToToken { .. })
            {
                return failure(
                    "this node is a cluster member: every node holds the same master key, and a change of master key is not supported in a cluster yet (specs/operation.md, \"Cluster\")",
                );
            }
            if gw.config().cluster().is_some()
                && let Some(name) = req.secret_written()
            {
                return clustered_secret_command(gw, &req, name).await;
            }
            let upstreams = gw.upstreams();
            let reply = crate::admin::secret_command(gw.secrets(), Some(&upstreams), &req).await;
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
        Request::PolicyReload => match gw.reload_policy_everywhere().await {
            Ok(hash) => Reply {
                ok: true,
                policy: Some(hex::encode(hash)),
                ..Default::default()
            },
            Err(e) => failure(e),
        },
        Request::UpstreamsReload => match gw.reload_upstreams_everywhere().await {
            Ok(hash) => Reply {
                ok: true,
                upstreams: Some(hex::encode(hash)),
                ..Default::default()
            },
            Err(e) => failure(e),
        },
        Request::Checkpoint => match tokio::task::spawn_blocking(move || chain.seal()).await {
            Ok(Ok(sealed)) => Reply {
                ok: true,
                entries: Some(sealed.size),
                checkpoints: Some(u64::from(sealed.written)),
                sealed: Some(true),
                ..Default::default()
            },
            Ok(Err(e)) => failure(e),
            Err(e) => failure(e),
        },
        Request::Export { out } => export(chain, out).await,
        Request::Backup { out } => {
            if !out.is_absolute() {
                return failure("the backup path must be absolute");
            }
            let store = chain.store().clone();
            match tokio::task::spawn_blocking(move || store.backup(&out)).await {
                Ok(Ok(copied)) => Reply {
                    ok: true,
                    copied: Some(copied),
                    ..Default::default()
                },
                Ok(Err(e)) => failure(e),
                Err(e) => failure(e),
            }
        }
    }
}

/// `export`: seals the chain, then exports it on the writer thread before any later append
/// (appends wait meanwhile), so the file ends with a checkpoint covering its last entry.
async fn export(chain: didgate_audit::Chain, out: std::path::PathBuf) -> Reply {
    if !out.is_absolute() {
        return failure("the export path must be absolute");
    }
    let exported = tokio::task::spawn_blocking(move || {
        chain.seal_then(move |store, _| didgate_audit::export::export_sealed(store, &out))
    })
    .await;
    match exported {
        Ok(Ok(Ok((entries, checkpoints)))) => Reply {
            ok: true,
            entries: Some(entries),
            checkpoints: Some(checkpoints),
            sealed: Some(true),
            ..Default::default()
        },
        Ok(Ok(Err(e))) => failure(e),
        Ok(Err(e)) => failure(e),
        Err(e) => failure(e),
    }
}

/// A secret lifecycle command on a cluster member: based on the cluster's record and published
/// to every node ([`crate::shared::SharedSecrets::change`]).
async fn clustered_secret_command(gw: &Arc<Gateway>, req: &Request, name: &str) -> Reply {
    let Some(plane) = gw.cluster() else {
        return failure("this node has not joined its cluster: nothing was changed");
    };
    let upstreams = gw.upstreams();
    let (reply, published) = gw
        .shared
        .change(plane, gw.secrets(), name, || {
            crate::admin::secret_command(gw.secrets(), Some(&upstreams), req)
        })
        .await;
    let Some(reply) = reply else {
        return match published {
            Err(e) => failure(e),
            Ok(()) => failure("nothing was changed"),
        };
    };
    if reply.ok {
        secret_event(gw, req, &reply);
    }
    match (reply.ok, published) {
        (_, Ok(())) => reply,
        (true, Err(e)) => failure(e),
        (false, Err(e)) => failure(format!("{}; {e}", reply.error.unwrap_or_default())),
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
        Request::KmsRotate | Request::KmsToToken { .. } => {
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

//! One home, many processes: the process that holds a home's chain makes the calls of every
//! other didgate process of that home.
//!
//! A chain store can be open in one process only (its lock). So the first process of a home to
//! open `chain/` (a `didgate proxy`, `mcp`, `call`, ...) owns it and listens on
//! `chain.sock` in the home (a Unix socket, mode 0600; the home itself is 0700). Every other
//! process of that home ([`Caller::acquire`]) finds the chain locked, connects, proves it holds
//! the same identity (it signs the owner's fresh challenge with the identity's key, so a
//! passphrase-sealed identity stays sealed to processes that cannot open it), and sends its
//! calls, catalog requests and exports through the owner: one identity keeps one chain for the
//! auditor. The owner signs, records and sends them as its own; the caller checks the gateway's
//! receipt again against its pin.
//!
//! Each operation is one connection. When the owner goes away between operations, the next one
//! acquires the chain afresh (it becomes the owner, or finds the new one). When the owner dies
//! mid-call, the caller gets [`CallError::OwnerLost`]: the call may have executed (the owner's
//! chain records it as sent), so it is never repeated on its own. When the chain stays locked
//! but nobody answers on the socket (an owner that does not serve, or another gateway or DID),
//! the caller falls back to a chain of its own, the first free `chains/N` of the home: the
//! auditor verifies `chain/` and every `chains/N` together (`didgate-audit verify --client
//! HOME` finds them). The framing is private to this module: both ends are this library.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use didgate_audit::entry::Role;
use didgate_audit::store::{Chain, CheckpointPolicy, Store};
use didgate_protocol::message::{self, Receipt, RefusalCode, ResponseHead};
use didgate_protocol::{Did, Identity, Version};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::{Answer, CallError, CallSpec, Client, ClientError, Operation, StreamingAnswer};

/// The owner's socket, in the home.
pub const SOCKET: &str = "chain.sock";
/// The home's chain.
pub const CHAIN: &str = "chain";
/// Where fallback chains live in the home (`chains/1`, `chains/2`, ...).
pub const FALLBACK_CHAINS: &str = "chains";
/// How many fallback chains a home may have.
const MAX_FALLBACK: u32 = 16;
/// How long [`Caller::acquire`] waits for a locked chain's owner to answer (an owner that is
/// closing removes its socket first, then releases the chain) before it falls back.
const ACQUIRE_WAIT: Duration = Duration::from_secs(3);
/// How long either end waits for the other's handshake messages.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a closing owner lets the operations in flight finish.
const DRAIN: Duration = Duration::from_secs(60);
/// What a caller signs: this tag, then the owner's challenge.
const DOMAIN: &[u8] = b"didgate-home-link-v1\0";
/// The largest frame (a catalog or a message); bodies travel in chunks of [`CHUNK`].
const MAX_FRAME: usize = 4 << 20;
const CHUNK: usize = 64 << 10;
/// The largest request body a caller may send through the owner.
const MAX_BODY: u64 = 64 << 20;
const TAG_MESSAGE: u8 = b'M';
const TAG_BYTES: u8 = b'B';

/// One message between a caller and the owner (JSON in a frame).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "m", rename_all = "snake_case")]
enum Msg {
    /// Owner, first: its process and a fresh challenge.
    Hello { v: u32, pid: u32, challenge: String },
    /// Caller: who it is, which gateway it would call, and the signed challenge. `key_id` and
    /// `gateway` are absent for an export (the chain belongs to the key, whoever it acts as).
    Auth {
        key_did: String,
        key_id: Option<String>,
        gateway: Option<(String, String)>,
        signature: String,
    },
    /// Owner: go ahead.
    Ready { pid: u32 },
    /// Owner: this caller must not use this owner (another key, acting DID or gateway).
    Mismatch { why: String },
    /// Caller: make this call; `body_len` bytes follow in byte frames.
    Call {
        upstream: String,
        method: String,
        path: String,
        query: Vec<(String, String)>,
        headers: Vec<(String, String)>,
        body_len: u64,
    },
    /// Caller: the catalog (of one upstream).
    Catalog { upstream: Option<String> },
    /// Caller: seal the chain and export it to this absolute path.
    Export { out: String },
    /// Owner: the answer's head; body chunks follow in byte frames, then `End` or `Failed`.
    Head {
        call: String,
        status: u16,
        headers: Vec<(String, String)>,
    },
    /// Owner: the body ended; the gateway's signed receipt (verified and recorded).
    End { receipt: String },
    /// Owner: the catalog.
    Operations { operations: Vec<Operation> },
    /// Owner: the export was written.
    Exported {
        entries: u64,
        checkpoints: u64,
        sealed_now: bool,
    },
    /// Owner: the operation failed.
    Failed { error: WireError },
}

/// A [`CallError`] as the owner reports it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum WireError {
    Refused {
        code: RefusalCode,
        reason: String,
        gateway_time_ms: u64,
        call: Option<String>,
    },
    Unreachable {
        detail: String,
    },
    ConnectionLost {
        detail: String,
    },
    InvalidAnswer {
        detail: String,
    },
    Audit {
        detail: String,
    },
    VersionUnsupported {
        offered: u64,
    },
    WrongGateway {
        addr: String,
        presented: String,
        pinned: String,
    },
    /// Anything else (an export that failed, an owner's own link error).
    Other {
        detail: String,
    },
}

impl WireError {
    fn from_call(e: &CallError) -> Self {
        match e {
            CallError::Refused {
                code,
                reason,
                gateway_time_ms,
                call,
            } => Self::Refused {
                code: *code,
                reason: reason.clone(),
                gateway_time_ms: *gateway_time_ms,
                call: call.map(hex::encode),
            },
            CallError::Unreachable(d) => Self::Unreachable { detail: d.clone() },
            CallError::ConnectionLost(d) => Self::ConnectionLost { detail: d.clone() },
            CallError::InvalidAnswer(d) => Self::InvalidAnswer { detail: d.clone() },
            CallError::Audit(d) => Self::Audit { detail: d.clone() },
            CallError::VersionUnsupported { offered } => Self::VersionUnsupported {
                offered: offered.as_u64(),
            },
            CallError::WrongGateway {
                addr,
                presented,
                pinned,
            } => Self::WrongGateway {
                addr: addr.to_string(),
                presented: presented.to_string(),
                pinned: pinned.to_string(),
            },
            CallError::OwnerLost { detail, .. } => Self::ConnectionLost {
                detail: detail.clone(),
            },
        }
    }

    fn into_call(self, pid: u32) -> CallError {
        let garbled = |what: &str| CallError::OwnerLost {
            pid,
            detail: format!("the owner reported an unreadable {what}"),
        };
        match self {
            Self::Refused {
                code,
                reason,
                gateway_time_ms,
                call,
            } => CallError::Refused {
                code,
                reason,
                gateway_time_ms,
                call: call.and_then(|c| decode_id(&c)),
            },
            Self::Unreachable { detail } => CallError::Unreachable(detail),
            Self::ConnectionLost { detail } => CallError::ConnectionLost(detail),
            Self::InvalidAnswer { detail } => CallError::InvalidAnswer(detail),
            Self::Audit { detail } | Self::Other { detail } => CallError::Audit(detail),
            Self::VersionUnsupported { offered } => match Version::from_u64(offered) {
                Some(offered) => CallError::VersionUnsupported { offered },
                None => garbled("version"),
            },
            Self::WrongGateway {
                addr,
                presented,
                pinned,
            } => match (addr.parse(), presented.parse(), pinned.parse()) {
                (Ok(addr), Ok(presented), Ok(pinned)) => CallError::WrongGateway {
                    addr,
                    presented,
                    pinned,
                },
                _ => garbled("wrong-gateway error"),
            },
        }
    }
}

fn decode_id(text: &str) -> Option<[u8; 32]> {
    let mut id = [0u8; 32];
    hex::decode_to_slice(text, &mut id).ok().map(|()| id)
}

/// One frame: a message or a chunk of bytes.
enum Frame {
    Msg(Msg),
    Bytes(Vec<u8>),
}

async fn write_frame(
    w: &mut (impl AsyncWrite + Unpin),
    tag: u8,
    payload: &[u8],
) -> std::io::Result<()> {
    let len = u32::try_from(payload.len() + 1)
        .ok()
        .filter(|&l| l as usize <= MAX_FRAME + 1)
        .ok_or_else(|| std::io::Error::other("frame too large"))?;
    let mut head = [0u8; 5];
    head[..4].copy_from_slice(&len.to_be_bytes());
    head[4] = tag;
    w.write_all(&head).await?;
    w.write_all(payload).await
}

async fn write_msg(w: &mut (impl AsyncWrite + Unpin), msg: &Msg) -> std::io::Result<()> {
    let json = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    write_frame(w, TAG_MESSAGE, &json).await
}

async fn write_bytes(w: &mut (impl AsyncWrite + Unpin), bytes: &[u8]) -> std::io::Result<()> {
    for chunk in bytes.chunks(CHUNK) {
        write_frame(w, TAG_BYTES, chunk).await?;
    }
    Ok(())
}

/// The next frame; `None` at a clean end of stream.
async fn read_frame(r: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Option<Frame>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME + 1 {
        return Err(std::io::Error::other(format!("bad frame length {len}")));
    }
    let mut tag = [0u8; 1];
    r.read_exact(&mut tag).await?;
    let mut payload = vec![0u8; len - 1];
    r.read_exact(&mut payload).await?;
    match tag[0] {
        TAG_MESSAGE => serde_json::from_slice(&payload)
            .map(|m| Some(Frame::Msg(m)))
            .map_err(std::io::Error::other),
        TAG_BYTES => Ok(Some(Frame::Bytes(payload))),
        other => Err(std::io::Error::other(format!("bad frame tag {other}"))),
    }
}

/// The next frame, which must be a message.
async fn read_msg(r: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Msg> {
    match read_frame(r).await? {
        Some(Frame::Msg(m)) => Ok(m),
        Some(Frame::Bytes(_)) => Err(std::io::Error::other("bytes where a message was expected")),
        None => Err(std::io::ErrorKind::UnexpectedEof.into()),
    }
}

/// The owner's socket: serves the home's other processes while the chain is held.
#[derive(Debug)]
pub struct Serving {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Serving {
    /// Starts serving `client`'s calls to the other processes of `home`, on
    /// `home/chain.sock`. Call only while holding `home/chain` (a stale socket is replaced).
    pub fn start(client: Arc<Client>, home: &Path) -> std::io::Result<Self> {
        let path = home.join(SOCKET);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let uid = std::fs::metadata(&path)?.uid();
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, client, uid, stopped, path));
        Ok(Self { stop, task })
    }

    /// Stops accepting (the socket is removed) and waits for the operations in flight to end
    /// (at most a minute): call before closing the chain.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn accept_loop(
    listener: UnixListener,
    client: Arc<Client>,
    uid: u32,
    mut stopped: watch::Receiver<bool>,
    path: PathBuf,
) {
    let mut sessions = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let client = client.clone();
                sessions.spawn(async move {
                    if let Err(e) = session(client, stream, uid).await {
                        tracing::debug!(%e, "home link session ended");
                    }
                });
            }
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            _ = stopped.changed() => break,
        }
    }
    drop(listener);
    let _ = std::fs::remove_file(&path);
    let drained = tokio::time::timeout(DRAIN, async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("closing with calls of other processes still in flight");
        sessions.abort_all();
    }
}

/// One caller's operation: challenge, authentication, the request, the answer.
async fn session(client: Arc<Client>, stream: UnixStream, uid: u32) -> std::io::Result<()> {
    let allowed = stream
        .peer_cred()
        .map(|c| c.uid() == uid || c.uid() == 0)
        .unwrap_or(false);
    if !allowed {
        return Err(std::io::Error::other("peer is not this home's user"));
    }
    let (mut r, mut w) = stream.into_split();
    let challenge: [u8; 32] = rand::random();
    let pid = std::process::id();
    let hello = Msg::Hello {
        v: 1,
        pid,
        challenge: hex::encode(challenge),
    };
    write_msg(&mut w, &hello).await?;
    let auth = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_msg(&mut r))
        .await
        .map_err(|_| std::io::Error::other("no authentication in time"))??;
    if let Err(why) = check_auth(&client, &challenge, &auth) {
        return write_msg(&mut w, &Msg::Mismatch { why }).await;
    }
    write_msg(&mut w, &Msg::Ready { pid }).await?;
    let request = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_msg(&mut r))
        .await
        .map_err(|_| std::io::Error::other("no request in time"))??;
    match request {
        Msg::Call {
            upstream,
            method,
            path,
            query,
            headers,
            body_len,
        } => {
            if body_len > MAX_BODY {
                let error = WireError::Other {
                    detail: format!("request body over {MAX_BODY} bytes"),
                };
                return write_msg(&mut w, &Msg::Failed { error }).await;
            }
            let body = read_body(&mut r, body_len).await?;
            let spec = CallSpec {
                upstream,
                method,
                path,
                query,
                headers,
                body,
            };
            serve_call(&client, spec, &mut w).await
        }
        Msg::Catalog { upstream } => {
            let result = match upstream {
                Some(u) => client.catalog_of(&u).await,
                None => client.catalog().await,
            };
            let reply = match result {
                Ok(operations) => Msg::Operations { operations },
                Err(e) => Msg::Failed {
                    error: WireError::from_call(&e),
                },
            };
            write_msg(&mut w, &reply).await
        }
        Msg::Export { out } => {
            let reply = serve_export(&client, PathBuf::from(out)).await;
            write_msg(&mut w, &reply).await
        }
        _ => Err(std::io::Error::other("unexpected request")),
    }
}

/// Whether the caller holds this owner's key (its signature over the challenge) and asks for
/// what this owner does: the same acting DID and gateway.
fn check_auth(client: &Client, challenge: &[u8; 32], auth: &Msg) -> Result<(), String> {
    let Msg::Auth {
        key_did,
        key_id,
        gateway,
        signature,
    } = auth
    else {
        return Err("expected an authentication".into());
    };
    let owner = client.identity.did();
    if key_did != owner.as_str() {
        return Err(format!(
            "this home's chain is held for {owner}, not {key_did}"
        ));
    }
    let mut sig = [0u8; 64];
    hex::decode_to_slice(signature, &mut sig).map_err(|_| "malformed signature".to_string())?;
    let mut message = DOMAIN.to_vec();
    message.extend_from_slice(challenge);
    owner
        .verifying_key()
        .verify_strict(&message, &ed25519_dalek::Signature::from_bytes(&sig))
        .map_err(|_| "the challenge's signature does not verify".to_string())?;
    if let Some(key_id) = key_id
        && *key_id != client.identity.key_id()
    {
        return Err(format!(
            "the owner acts as {}, this process as {key_id}",
            client.identity.key_id()
        ));
    }
    if let Some((addr, did)) = gateway
        && (*addr != client.addr.to_string() || *did != client.gateway.as_str())
    {
        return Err(format!(
            "the owner calls the gateway {} at {}, this process {did} at {addr}",
            client.gateway, client.addr
        ));
    }
    Ok(())
}

async fn read_body(r: &mut OwnedReadHalf, len: u64) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::with_capacity(usize::try_from(len).unwrap_or(0).min(1 << 20));
    while (body.len() as u64) < len {
        match read_frame(r).await? {
            Some(Frame::Bytes(b)) if (body.len() + b.len()) as u64 <= len => {
                body.extend_from_slice(&b);
            }
            _ => return Err(std::io::Error::other("request body cut short")),
        }
    }
    Ok(body)
}

/// Makes the call and relays the answer as it arrives. A caller that goes away mid-body drops
/// the answer, which records the outcome as unknown.
async fn serve_call(
    client: &Client,
    spec: CallSpec,
    w: &mut OwnedWriteHalf,
) -> std::io::Result<()> {
    let mut answer = match client.call_streaming(spec).await {
        Ok(a) => a,
        Err(e) => {
            let error = WireError::from_call(&e);
            return write_msg(w, &Msg::Failed { error }).await;
        }
    };
    let head = Msg::Head {
        call: hex::encode(answer.call()),
        status: answer.status(),
        headers: answer.headers().to_vec(),
    };
    write_msg(w, &head).await?;
    loop {
        match answer.next_chunk().await {
            Ok(Some(chunk)) => write_bytes(w, &chunk).await?,
            Ok(None) => {
                let receipt = hex::encode(answer.receipt_bytes().unwrap_or_default());
                return write_msg(w, &Msg::End { receipt }).await;
            }
            Err(e) => {
                let error = WireError::from_call(&e);
                return write_msg(w, &Msg::Failed { error }).await;
            }
        }
    }
}

/// Seals the chain and exports it to `out` (on the chain's writer thread, so the export ends
/// with the checkpoint just written).
async fn serve_export(client: &Arc<Client>, out: PathBuf) -> Msg {
    if !out.is_absolute() {
        let error = WireError::Other {
            detail: "the export path must be absolute".into(),
        };
        return Msg::Failed { error };
    }
    let client = client.clone();
    let done = tokio::task::spawn_blocking(move || {
        client.chain().seal_then(move |store, sealed| {
            didgate_audit::export::export_sealed(store, &out).map(|n| (n, sealed.written))
        })
    })
    .await;
    let failed = |detail: String| Msg::Failed {
        error: WireError::Other { detail },
    };
    match done {
        Ok(Ok(Ok(((entries, checkpoints), sealed_now)))) => Msg::Exported {
            entries,
            checkpoints,
            sealed_now,
        },
        Ok(Ok(Err(e))) => failed(format!("cannot export: {e}")),
        Ok(Err(e)) => failed(format!("cannot seal the chain: {e}")),
        Err(e) => failed(format!("the export task failed: {e}")),
    }
}

/// Why a link to the owner could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// Nobody answers on the socket (no owner, or it is closing).
    #[error("no owner answers on {path}: {source}")]
    NoOwner {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The owner serves another key, acting DID or gateway.
    #[error("the process holding this home's chain cannot call for this one: {0}")]
    Mismatch(String),
}

/// What an owner did with an export ([`Link::export`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exported {
    /// Entries written.
    pub entries: u64,
    /// Checkpoints written.
    pub checkpoints: u64,
    /// Whether sealing wrote a new checkpoint.
    pub sealed_now: bool,
}

/// A caller's side of the owner's socket.
pub struct Link {
    socket: PathBuf,
    identity: Arc<Identity>,
    /// The gateway this caller would call (`None`: exports only).
    gateway: Option<(std::net::SocketAddr, Did)>,
    version: Version,
    /// The owner's process ID, as last seen.
    pid: std::sync::atomic::AtomicU32,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("socket", &self.socket)
            .field("did", self.identity.did())
            .finish_non_exhaustive()
    }
}

/// One authenticated connection to the owner, for one operation.
struct Session {
    r: OwnedReadHalf,
    w: OwnedWriteHalf,
    pid: u32,
}

/// How an operation through the owner failed: before anything was asked of it (try another
/// route), or with a call error.
enum LinkFailure {
    Reroute(LinkError),
    Call(CallError),
}

impl Link {
    /// A link to the owner of `home`'s chain, for `identity`; `gateway` is the gateway this
    /// caller would call (checked against the owner's), `None` for exports only.
    pub fn new(
        home: &Path,
        identity: Arc<Identity>,
        gateway: Option<(std::net::SocketAddr, Did)>,
    ) -> Self {
        Self {
            socket: home.join(SOCKET),
            identity,
            gateway,
            version: Version::CURRENT,
            pid: 0.into(),
        }
    }

    /// The owner's process ID, as last seen (0 before the first operation).
    pub fn owner_pid(&self) -> u32 {
        self.pid.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Connects and authenticates.
    async fn session(&self, export: bool) -> Result<Session, LinkError> {
        let no_owner = |source: std::io::Error| LinkError::NoOwner {
            path: self.socket.clone(),
            source,
        };
        let stream = UnixStream::connect(&self.socket).await.map_err(no_owner)?;
        let (mut r, mut w) = stream.into_split();
        let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_msg(&mut r))
            .await
            .map_err(|_| no_owner(std::io::ErrorKind::TimedOut.into()))?
            .map_err(no_owner)?;
        let Msg::Hello { challenge, .. } = hello else {
            return Err(no_owner(std::io::Error::other("expected a hello")));
        };
        let mut nonce = [0u8; 32];
        hex::decode_to_slice(&challenge, &mut nonce)
            .map_err(|_| no_owner(std::io::Error::other("malformed challenge")))?;
        let mut message = DOMAIN.to_vec();
        message.extend_from_slice(&nonce);
        let auth = Msg::Auth {
            key_did: self.identity.did().to_string(),
            key_id: (!export).then(|| self.identity.key_id()),
            gateway: match (&self.gateway, export) {
                (Some((addr, did)), false) => Some((addr.to_string(), did.to_string())),
                _ => None,
            },
            signature: hex::encode(self.identity.sign(&message)),
        };
        write_msg(&mut w, &auth).await.map_err(no_owner)?;
        let answer = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_msg(&mut r))
            .await
            .map_err(|_| no_owner(std::io::ErrorKind::TimedOut.into()))?
            .map_err(no_owner)?;
        match answer {
            Msg::Ready { pid } => {
                self.pid.store(pid, std::sync::atomic::Ordering::Relaxed);
                Ok(Session { r, w, pid })
            }
            Msg::Mismatch { why } => Err(LinkError::Mismatch(why)),
            _ => Err(no_owner(std::io::Error::other("expected ready"))),
        }
    }

    /// Checks that an owner answers and will call for this caller.
    pub async fn probe(&self) -> Result<u32, LinkError> {
        self.session(false).await.map(|s| s.pid)
    }

    /// Asks the owner to seal its chain and export it to `out` (made absolute here).
    pub async fn export(&self, out: &Path) -> Result<Exported, ExportThroughError> {
        let out =
            std::path::absolute(out).map_err(|e| ExportThroughError::Failed(e.to_string()))?;
        let mut s = self.session(true).await?;
        let lost = |e: std::io::Error| {
            ExportThroughError::Failed(format!("the owner went away during the export: {e}"))
        };
        let request = Msg::Export {
            out: out.to_string_lossy().into_owned(),
        };
        write_msg(&mut s.w, &request).await.map_err(lost)?;
        match read_msg(&mut s.r).await.map_err(lost)? {
            Msg::Exported {
                entries,
                checkpoints,
                sealed_now,
            } => Ok(Exported {
                entries,
                checkpoints,
                sealed_now,
            }),
            Msg::Failed { error } => Err(ExportThroughError::Failed(
                error.into_call(s.pid).to_string(),
            )),
            _ => Err(ExportThroughError::Failed(
                "unexpected answer to an export".into(),
            )),
        }
    }

    async fn catalog(&self, upstream: Option<&str>) -> Result<Vec<Operation>, LinkFailure> {
        let mut s = self.session(false).await.map_err(LinkFailure::Reroute)?;
        let request = Msg::Catalog {
            upstream: upstream.map(str::to_string),
        };
        let pid = s.pid;
        if let Err(e) = write_msg(&mut s.w, &request).await {
            return Err(LinkFailure::Reroute(LinkError::NoOwner {
                path: self.socket.clone(),
                source: e,
            }));
        }
        match read_msg(&mut s.r).await {
            Ok(Msg::Operations { operations }) => Ok(operations),
            Ok(Msg::Failed { error }) => Err(LinkFailure::Call(error.into_call(pid))),
            Ok(_) => Err(LinkFailure::Call(owner_lost(pid, "unexpected answer"))),
            Err(e) => Err(LinkFailure::Call(owner_lost(pid, &e.to_string()))),
        }
    }

    /// Sends the call; returns once the head (or the failure) came back.
    async fn call_streaming(&self, spec: &CallSpec) -> Result<LinkAnswer, LinkFailure> {
        let mut s = self.session(false).await.map_err(LinkFailure::Reroute)?;
        let request = Msg::Call {
            upstream: spec.upstream.clone(),
            method: spec.method.clone(),
            path: spec.path.clone(),
            query: spec.query.clone(),
            headers: spec.headers.clone(),
            body_len: spec.body.len() as u64,
        };
        // the owner signs only once it read the whole body: a failed send sent nothing
        let sent = async {
            write_msg(&mut s.w, &request).await?;
            write_bytes(&mut s.w, &spec.body).await?;
            s.w.flush().await
        }
        .await;
        if let Err(e) = sent {
            return Err(LinkFailure::Reroute(LinkError::NoOwner {
                path: self.socket.clone(),
                source: e,
            }));
        }
        let pid = s.pid;
        match read_msg(&mut s.r).await {
            Ok(Msg::Head {
                call,
                status,
                headers,
            }) => {
                let call = decode_id(&call)
                    .ok_or_else(|| LinkFailure::Call(owner_lost(pid, "malformed call ID")))?;
                Ok(LinkAnswer {
                    r: s.r,
                    _w: s.w,
                    pid,
                    gateway: self.gateway.as_ref().map(|(_, d)| d.clone()),
                    version: self.version,
                    call,
                    head: ResponseHead {
                        v: self.version.as_u64(),
                        status,
                        headers,
                    },
                    hasher: blake3::Hasher::new(),
                    len: 0,
                    receipt: None,
                    done: false,
                })
            }
            Ok(Msg::Failed { error }) => Err(LinkFailure::Call(error.into_call(pid))),
            Ok(_) => Err(LinkFailure::Call(owner_lost(pid, "unexpected answer"))),
            Err(e) => Err(LinkFailure::Call(owner_lost(pid, &e.to_string()))),
        }
    }
}

fn owner_lost(pid: u32, detail: &str) -> CallError {
    CallError::OwnerLost {
        pid,
        detail: detail.to_string(),
    }
}

/// Why an export through the owner failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportThroughError {
    /// No owner to ask, or it will not export for this identity.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The owner could not export.
    #[error("{0}")]
    Failed(String),
}

/// A call's answer relayed by the owner: the head, then the body as it arrives, then the
/// receipt, verified here too against the pinned gateway, the body's length and digest.
pub struct LinkAnswer {
    r: OwnedReadHalf,
    /// Kept open until the answer ends (closing it tells the owner this caller went away).
    _w: OwnedWriteHalf,
    pid: u32,
    gateway: Option<Did>,
    version: Version,
    call: [u8; 32],
    head: ResponseHead,
    hasher: blake3::Hasher,
    len: u64,
    receipt: Option<message::Signed<Receipt>>,
    done: bool,
}

impl LinkAnswer {
    async fn next_chunk(&mut self) -> Result<Option<bytes::Bytes>, CallError> {
        if self.done {
            return Ok(None);
        }
        let frame = read_frame(&mut self.r).await;
        if let Ok(Some(Frame::Bytes(b))) = frame {
            self.hasher.update(&b);
            self.len += b.len() as u64;
            return Ok(Some(bytes::Bytes::from(b)));
        }
        self.done = true;
        let msg = match frame {
            Ok(Some(Frame::Msg(m))) => m,
            Ok(Some(Frame::Bytes(_))) | Ok(None) => {
                return Err(owner_lost(self.pid, "the owner went away mid-answer"));
            }
            Err(e) => return Err(owner_lost(self.pid, &e.to_string())),
        };
        match msg {
            Msg::End { receipt } => {
                let bytes =
                    hex::decode(receipt).map_err(|_| owner_lost(self.pid, "malformed receipt"))?;
                let gateway = self
                    .gateway
                    .as_ref()
                    .ok_or_else(|| owner_lost(self.pid, "no gateway to check the receipt"))?;
                let signed = message::open_from::<Receipt>(&bytes, gateway)
                    .map_err(|e| CallError::InvalidAnswer(e.to_string()))?;
                if signed.message.v != self.version.as_u64() {
                    return Err(CallError::InvalidAnswer(
                        "a receipt of another version".into(),
                    ));
                }
                let b3 = *self.hasher.finalize().as_bytes();
                crate::check_receipt(self.call, Some(&self.head), self.len, &b3, &signed.message)
                    .map_err(CallError::InvalidAnswer)?;
                self.receipt = Some(signed);
                Ok(None)
            }
            Msg::Failed { error } => Err(error.into_call(self.pid)),
            _ => Err(owner_lost(self.pid, "unexpected message mid-answer")),
        }
    }
}

/// A call's answer as it arrives, from this process's own connection or through the owner
/// ([`Caller::call_streaming`]).
pub enum CallStream<'a> {
    /// This process holds the chain.
    Own(StreamingAnswer<'a>),
    /// The owner of the chain makes the call.
    Through(LinkAnswer),
}

impl std::fmt::Debug for CallStream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallStream")
            .field("call", &hex::encode(self.call()))
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

impl CallStream<'_> {
    /// The call ID.
    pub fn call(&self) -> [u8; 32] {
        match self {
            Self::Own(a) => a.call(),
            Self::Through(a) => a.call,
        }
    }

    /// Upstream HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            Self::Own(a) => a.status(),
            Self::Through(a) => a.head.status,
        }
    }

    /// Response headers.
    pub fn headers(&self) -> &[(String, String)] {
        match self {
            Self::Own(a) => a.headers(),
            Self::Through(a) => &a.head.headers,
        }
    }

    /// The next body chunk; `Ok(None)` once the receipt was verified (and recorded, by this
    /// process or the owner). See [`StreamingAnswer::next_chunk`].
    pub async fn next_chunk(&mut self) -> Result<Option<bytes::Bytes>, CallError> {
        match self {
            Self::Own(a) => a.next_chunk().await,
            Self::Through(a) => a.next_chunk().await,
        }
    }

    /// The verified receipt and its signed bytes, once the body ended.
    fn receipt(&self) -> Option<(Receipt, Vec<u8>)> {
        match self {
            Self::Own(a) => Some((a.receipt()?.clone(), a.receipt_bytes()?.to_vec())),
            Self::Through(a) => a
                .receipt
                .as_ref()
                .map(|r| (r.message.clone(), r.bytes.clone())),
        }
    }
}

/// Why a caller could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AcquireError {
    /// A chain could not be opened (not for being held by another process).
    #[error("cannot open the chain {path}: {source}")]
    Chain {
        /// The chain's directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: ClientError,
    },
    /// A fallback chain's directory could not be made.
    #[error("cannot create {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The chain is held by a process that does not answer, and every fallback chain too.
    #[error(
        "{home}: the chain and all {MAX_FALLBACK} fallback chains are held by other processes ({why})"
    )]
    AllHeld {
        /// The home.
        home: PathBuf,
        /// Why the main chain's owner could not be used.
        why: String,
    },
}

/// What [`Caller::acquire`] needs to acquire again after the owner went away.
struct Acquire {
    home: PathBuf,
    identity: Arc<Identity>,
    addr: std::net::SocketAddr,
    gateway: Did,
    connect_timeout: Duration,
}

/// How a process of a home makes its calls: with the chain it holds (serving the home's other
/// processes while it does), or through the process that holds it (module docs).
pub struct Caller {
    acquire: Option<Acquire>,
    /// Set once this process holds a chain; never unset.
    own: OnceLock<Arc<Client>>,
    /// The owner's socket this process is serving, while it serves.
    serving: Mutex<Option<Serving>>,
    /// The link to the owner, while another process holds the chain.
    link: Mutex<Option<Arc<Link>>>,
    /// Serializes acquiring.
    acquiring: tokio::sync::Mutex<()>,
    /// Set when this process uses a fallback chain: why.
    fallback: OnceLock<(PathBuf, String)>,
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller")
            .field("owner", &self.own.get().is_some())
            .finish_non_exhaustive()
    }
}

/// The route of one operation.
enum Route<'a> {
    Own(&'a Client),
    Through(Arc<Link>),
}

impl From<Client> for Caller {
    fn from(client: Client) -> Self {
        Self::from_client(Arc::new(client))
    }
}

impl Caller {
    /// A caller over a client this process opened itself (it serves no other process).
    pub fn from_client(client: Arc<Client>) -> Self {
        let own = OnceLock::new();
        let _ = own.set(client);
        Self {
            acquire: None,
            own,
            serving: Mutex::new(None),
            link: Mutex::new(None),
            acquiring: tokio::sync::Mutex::new(()),
            fallback: OnceLock::new(),
        }
    }

    /// Opens `home`'s chain and serves the home's other processes, or, if another process
    /// holds it, calls through that process; falls back to a chain of this process's own
    /// (`chains/N`) when the holder does not answer within a few seconds or serves another
    /// acting DID or gateway.
    pub async fn acquire(
        home: &Path,
        identity: Identity,
        addr: std::net::SocketAddr,
        gateway: Did,
        connect_timeout: Duration,
    ) -> Result<Self, AcquireError> {
        let caller = Self {
            acquire: Some(Acquire {
                home: home.to_path_buf(),
                identity: Arc::new(identity),
                addr,
                gateway,
                connect_timeout,
            }),
            own: OnceLock::new(),
            serving: Mutex::new(None),
            link: Mutex::new(None),
            acquiring: tokio::sync::Mutex::new(()),
            fallback: OnceLock::new(),
        };
        caller.reacquire(None).await?;
        Ok(caller)
    }

    /// The chain this process uses instead of the home's, and why, if it fell back.
    pub fn fallback(&self) -> Option<(&Path, &str)> {
        self.fallback.get().map(|(p, w)| (p.as_path(), w.as_str()))
    }

    /// Whether this process holds a chain (its own calls go straight to the gateway).
    pub fn is_owner(&self) -> bool {
        self.own.get().is_some()
    }

    /// The process ID of the chain's owner this process calls through, if any.
    pub fn owner_pid(&self) -> Option<u32> {
        if self.is_owner() {
            return None;
        }
        self.link
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|l| l.owner_pid())
    }

    /// This identity's DID.
    pub fn did(&self) -> &Did {
        match (self.own.get(), &self.acquire) {
            (Some(c), _) => c.did(),
            (None, Some(a)) => a.identity.did(),
            (None, None) => unreachable!("a caller without a client has an acquire"),
        }
    }

    /// The gateway's address.
    pub fn gateway_addr(&self) -> std::net::SocketAddr {
        match (self.own.get(), &self.acquire) {
            (Some(c), _) => c.gateway_addr(),
            (None, Some(a)) => a.addr,
            (None, None) => unreachable!("a caller without a client has an acquire"),
        }
    }

    /// Acquires a route again unless another task already replaced `stale`.
    async fn reacquire(&self, stale: Option<&Arc<Link>>) -> Result<(), AcquireError> {
        let _guard = self.acquiring.lock().await;
        if self.own.get().is_some() {
            return Ok(());
        }
        {
            let link = self.link.lock().unwrap_or_else(PoisonError::into_inner);
            if let (Some(current), Some(stale)) = (link.as_ref(), stale)
                && !Arc::ptr_eq(current, stale)
            {
                return Ok(());
            }
        }
        let a = self
            .acquire
            .as_ref()
            .expect("a caller without a client has an acquire");
        let deadline = Instant::now() + ACQUIRE_WAIT;
        let chain = a.home.join(CHAIN);
        let why = loop {
            match open_client(a, &chain) {
                Ok(client) => {
                    let client = Arc::new(client);
                    match Serving::start(client.clone(), &a.home) {
                        Ok(s) => {
                            *self.serving.lock().unwrap_or_else(PoisonError::into_inner) = Some(s);
                        }
                        Err(e) => tracing::warn!(
                            %e,
                            "cannot serve the home's other processes: they will use chains of their own"
                        ),
                    }
                    let _ = self.own.set(client);
                    *self.link.lock().unwrap_or_else(PoisonError::into_inner) = None;
                    return Ok(());
                }
                Err(ClientError::Store(e)) if e.is_locked() => {}
                Err(source) => {
                    return Err(AcquireError::Chain {
                        path: chain,
                        source,
                    });
                }
            }
            let link = Link::new(
                &a.home,
                a.identity.clone(),
                Some((a.addr, a.gateway.clone())),
            );
            match link.probe().await {
                Ok(pid) => {
                    tracing::info!(
                        pid,
                        "calling through the process that holds this home's chain"
                    );
                    *self.link.lock().unwrap_or_else(PoisonError::into_inner) =
                        Some(Arc::new(link));
                    return Ok(());
                }
                Err(LinkError::Mismatch(why)) => break why,
                Err(e) if Instant::now() >= deadline => break e.to_string(),
                Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
            }
        };
        self.fall_back(a, why)
    }

    /// Opens the first free `chains/N` of the home.
    fn fall_back(&self, a: &Acquire, why: String) -> Result<(), AcquireError> {
        let dir = a.home.join(FALLBACK_CHAINS);
        for n in 1..=MAX_FALLBACK {
            let path = dir.join(n.to_string());
            if let Err(source) = std::fs::create_dir_all(&path) {
                return Err(AcquireError::Io { path, source });
            }
            match open_client(a, &path) {
                Ok(client) => {
                    tracing::warn!(chain = %path.display(), %why, "using a chain of this process's own");
                    let _ = self.fallback.set((path, why));
                    let _ = self.own.set(Arc::new(client));
                    *self.link.lock().unwrap_or_else(PoisonError::into_inner) = None;
                    return Ok(());
                }
                Err(ClientError::Store(e)) if e.is_locked() => {}
                Err(source) => return Err(AcquireError::Chain { path, source }),
            }
        }
        Err(AcquireError::AllHeld {
            home: a.home.clone(),
            why,
        })
    }

    fn route(&self) -> Result<Route<'_>, CallError> {
        if let Some(c) = self.own.get() {
            return Ok(Route::Own(c));
        }
        self.link
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .map(Route::Through)
            .ok_or_else(|| CallError::Audit("no chain to record the call in".into()))
    }

    /// After a failure before anything was asked of the owner: acquire again.
    async fn reroute(&self, link: &Arc<Link>, e: &LinkError) -> Result<(), CallError> {
        tracing::info!(%e, "the chain's owner went away: acquiring the chain again");
        self.reacquire(Some(link))
            .await
            .map_err(|e| CallError::Audit(e.to_string()))
    }

    /// [`Client::call_streaming`], here or through the owner.
    pub async fn call_streaming(&self, spec: CallSpec) -> Result<CallStream<'_>, CallError> {
        for _ in 0..3 {
            match self.route()? {
                Route::Own(c) => return c.call_streaming(spec).await.map(CallStream::Own),
                Route::Through(link) => match link.call_streaming(&spec).await {
                    Ok(a) => return Ok(CallStream::Through(a)),
                    Err(LinkFailure::Call(e)) => return Err(e),
                    Err(LinkFailure::Reroute(e)) => self.reroute(&link, &e).await?,
                },
            }
        }
        Err(CallError::Audit(
            "the home's chain changed hands three times during one call".into(),
        ))
    }

    /// [`Client::call`], here or through the owner.
    pub async fn call(&self, spec: CallSpec) -> Result<Answer, CallError> {
        if let Route::Own(c) = self.route()? {
            return c.call(spec).await;
        }
        let mut stream = self.call_streaming(spec).await?;
        let mut body = Vec::new();
        while let Some(chunk) = stream.next_chunk().await? {
            body.extend_from_slice(&chunk);
        }
        let (receipt, receipt_bytes) = stream
            .receipt()
            .ok_or_else(|| CallError::InvalidAnswer("no receipt".into()))?;
        let (status, headers) = (stream.status(), stream.headers().to_vec());
        Ok(Answer {
            call: stream.call(),
            status,
            headers,
            body,
            receipt,
            receipt_bytes,
        })
    }

    /// [`Client::catalog`] (or [`Client::catalog_of`] with `upstream`), here or through the
    /// owner.
    pub async fn catalog(&self, upstream: Option<&str>) -> Result<Vec<Operation>, CallError> {
        for _ in 0..3 {
            match self.route()? {
                Route::Own(c) => {
                    return match upstream {
                        Some(u) => c.catalog_of(u).await,
                        None => c.catalog().await,
                    };
                }
                Route::Through(link) => match link.catalog(upstream).await {
                    Ok(ops) => return Ok(ops),
                    Err(LinkFailure::Call(e)) => return Err(e),
                    Err(LinkFailure::Reroute(e)) => self.reroute(&link, &e).await?,
                },
            }
        }
        Err(CallError::Audit(
            "the home's chain changed hands three times during one request".into(),
        ))
    }

    /// Stops serving the home's other processes (their calls in flight end first), then closes
    /// the connection and the chain, if this process holds it.
    pub async fn close(&self) {
        let serving = self
            .serving
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(s) = serving {
            s.stop().await;
        }
        if let Some(c) = self.own.get() {
            c.close().await;
        }
    }
}

/// Opens the chain at `path` for a client of `a`.
fn open_client(a: &Acquire, path: &Path) -> Result<Client, ClientError> {
    let store = Store::open(path, &[crate::PENDING])?;
    let chain = Chain::open(
        store,
        a.identity.clone(),
        Role::Client,
        crate::now_ms(),
        CheckpointPolicy::default(),
    )?;
    Ok(
        Client::with_chain(a.identity.clone(), chain, a.addr, a.gateway.clone())?
            .with_connect_timeout(a.connect_timeout),
    )
}

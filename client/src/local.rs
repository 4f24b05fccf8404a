//! One home, many processes: the process that holds a home's chain makes the calls of every
//! other didgate process of that home.
//!
//! A chain store can be open in one process only (its lock). So the first process of a home to
//! open `chain/` (a `didgate proxy`, `mcp`, `call`, ...) owns it and listens on
//! `chain.sock` in the home (a Unix socket, mode 0600; the home itself is 0700). Every other
//! process of that home ([`Caller::acquire`]) finds the chain locked, connects, and sends its
//! calls, catalog requests and exports through the owner: one identity keeps one chain for the
//! auditor. Each operation is signed by the caller with the identity's key over the owner's
//! fresh challenge and the operation itself (its body by digest), so only a process that can
//! open the identity (a passphrase-sealed one stays sealed) makes calls through the owner, and
//! a signature relayed by a process in the middle authorises nothing but the operation it was
//! made for. The owner signs, records and sends the call as its own; the caller checks what
//! comes back as if it had made the call: the signed request is its own key's and is its call,
//! and the gateway's receipt or refusal is signed by the pinned gateway and names that call (a
//! process of the same user that took the owner's place can withhold answers, never forge one).
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use didgate_audit::entry::Role;
use didgate_audit::store::{Chain, CheckpointPolicy, Store};
use didgate_protocol::message::{self, Receipt, Refusal, RefusalCode, Request, ResponseHead};
use didgate_protocol::node;
use didgate_protocol::{Did, Identity, Version};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

pub use crate::error::{AcquireError, LinkError};
use crate::error::{AuditError, InvalidAnswer, Lost, Unreachable};
pub use crate::home::{CHAIN, FALLBACK_CHAINS, SOCKET};
use crate::home::{Home, MAX_FALLBACK, Pin};
use crate::{Answer, CallError, CallSpec, Client, ClientError, Operation, StreamingAnswer};

/// How long [`Caller::acquire`] waits for a locked chain's owner to answer before it falls
/// back.
const ACQUIRE_WAIT: Duration = Duration::from_secs(3);
/// How long it waits for an owner that says it is closing (it lets the operations in flight
/// end, at most [`DRAIN`], then releases the chain).
const CLOSING_WAIT: Duration = Duration::from_secs(65);
/// How long either end waits for each frame of a request (the owner) or of the handshake (the
/// caller).
const FRAME_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a closing owner lets the operations in flight finish.
const DRAIN: Duration = Duration::from_secs(60);
/// Operations an owner serves at once; more connections wait.
const SESSIONS: usize = 64;
/// What a caller signs: this tag, the owner's challenge, then the BLAKE3 digest of its request
/// message as sent.
const DOMAIN: &[u8] = b"didgate-home-link-v2\0";
/// The version of this framing.
const LINK_VERSION: u32 = 2;
/// The largest frame (a catalog or a message); bodies travel in chunks of [`CHUNK`].
const MAX_FRAME: usize = 4 << 20;
const CHUNK: usize = 64 << 10;
/// The largest request body a caller may send through the owner.
pub const MAX_BODY: u64 = 64 << 20;
const TAG_MESSAGE: u8 = b'M';
const TAG_BYTES: u8 = b'B';

/// What a caller asks of the owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Op {
    /// Whether the owner would make this caller's calls (nothing else).
    Probe,
    /// Make this call (its body follows in byte frames).
    Call {
        upstream: String,
        method: String,
        path: String,
        query: Vec<(String, String)>,
        headers: Vec<(String, String)>,
    },
    /// The catalog (of one upstream).
    Catalog { upstream: Option<String> },
    /// Seal the chain and export it to this absolute path.
    Export { out: String },
}

/// One message between a caller and the owner (JSON in a frame).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "m", rename_all = "snake_case")]
enum Msg {
    /// Owner, first: its process and a fresh challenge.
    Hello { v: u32, pid: u32, challenge: String },
    /// Caller: the operation, who asks it, for which gateway, and the body's length and digest
    /// (`key_id` and `gateway` are required but for an export: a chain belongs to its key,
    /// whoever it acts as).
    Request {
        op: Op,
        key_did: String,
        key_id: Option<String>,
        gateway: Option<(String, String)>,
        body_len: u64,
        body_b3: String,
    },
    /// Caller, after the body: the signature of `DOMAIN || challenge || BLAKE3(request)`.
    Proof { signature: String },
    /// Owner: it would (answer to a probe).
    Ready { pid: u32 },
    /// Owner: it is closing; acquire again in a moment.
    Closing { pid: u32 },
    /// Owner: this caller must not use this owner (another key, acting DID or gateway, or a
    /// signature that does not verify).
    Mismatch { why: String },
    /// Owner: the call's signed request and the answer's head; body chunks follow in byte
    /// frames, then `End`, `Refused` or `Failed`.
    Head {
        request: String,
        status: u16,
        headers: Vec<(String, String)>,
    },
    /// Owner: the body ended; the gateway's signed receipt (verified and recorded).
    End { receipt: String },
    /// Owner: the gateway refused the call: the signed request (before a head) and the
    /// gateway's signed refusal.
    Refused { request: String, refusal: String },
    /// Owner: the catalog.
    Operations { operations: Vec<Operation> },
    /// Owner: the export was written.
    Exported {
        entries: u64,
        checkpoints: u64,
        sealed_now: bool,
    },
    /// Owner: the operation failed without a signed answer to relay.
    Failed { error: WireError },
}

/// A [`CallError`] as the owner reports it (never a call's refusal: those travel signed).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum WireError {
    /// A catalog request's refusal (nothing executes; relayed as the owner states it).
    Refused {
        code: RefusalCode,
        reason: String,
        gateway_time_ms: u64,
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
    /// Anything else (an export that failed, a body over the limit).
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
                ..
            } => Self::Refused {
                code: *code,
                reason: reason.clone(),
                gateway_time_ms: *gateway_time_ms,
            },
            CallError::Unreachable(d) => Self::Unreachable {
                detail: d.to_string(),
            },
            CallError::ConnectionLost(d) | CallError::OwnerLost { source: d, .. } => {
                Self::ConnectionLost {
                    detail: d.to_string(),
                }
            }
            CallError::InvalidAnswer(d) => Self::InvalidAnswer {
                detail: d.to_string(),
            },
            CallError::Audit(d) => Self::Audit {
                detail: d.to_string(),
            },
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
        }
    }

    /// The error as the caller reports it; `signed_only`: a refusal must come signed (a call),
    /// so an unsigned one is an invalid answer.
    fn into_call(self, pid: u32, signed_only: bool) -> CallError {
        let garbled = |what: &'static str| CallError::OwnerLost {
            pid,
            source: Lost::Owner(what),
        };
        match self {
            Self::Refused { .. } if signed_only => {
                CallError::InvalidAnswer(InvalidAnswer::Relay("an unsigned refusal"))
            }
            Self::Refused {
                code,
                reason,
                gateway_time_ms,
            } => CallError::Refused {
                code,
                reason,
                gateway_time_ms,
                call: None,
            },
            Self::Unreachable { detail } => CallError::Unreachable(Unreachable::Relayed(detail)),
            Self::ConnectionLost { detail } => CallError::ConnectionLost(Lost::Relayed(detail)),
            Self::InvalidAnswer { detail } => {
                CallError::InvalidAnswer(InvalidAnswer::Relayed(detail))
            }
            Self::Audit { detail } | Self::Other { detail } => {
                CallError::Audit(AuditError::Relayed(detail))
            }
            Self::VersionUnsupported { offered } => match Version::from_u64(offered) {
                Some(offered) => CallError::VersionUnsupported { offered },
                None => garbled("the owner reported an unreadable version"),
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
                _ => garbled("the owner reported an unreadable wrong-gateway error"),
            },
        }
    }
}

/// One frame: a message (with its payload as sent, which a proof covers) or a chunk of bytes.
// one lives per frame read, briefly: boxing the message would only add an allocation
#[allow(clippy::large_enum_variant)]
enum Frame {
    Msg(Msg, Vec<u8>),
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

/// Writes `msg`; returns its payload as sent.
async fn write_msg(w: &mut (impl AsyncWrite + Unpin), msg: &Msg) -> std::io::Result<Vec<u8>> {
    let json = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    write_frame(w, TAG_MESSAGE, &json).await?;
    Ok(json)
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
            .map(|m| Some(Frame::Msg(m, payload)))
            .map_err(std::io::Error::other),
        TAG_BYTES => Ok(Some(Frame::Bytes(payload))),
        other => Err(std::io::Error::other(format!("bad frame tag {other}"))),
    }
}

/// The next frame, which must be a message, within [`FRAME_TIMEOUT`].
async fn read_msg(r: &mut (impl AsyncRead + Unpin)) -> std::io::Result<(Msg, Vec<u8>)> {
    let frame = tokio::time::timeout(FRAME_TIMEOUT, read_frame(r))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    match frame {
        Some(Frame::Msg(m, payload)) => Ok((m, payload)),
        Some(Frame::Bytes(_)) => Err(std::io::Error::other("bytes where a message was expected")),
        None => Err(std::io::ErrorKind::UnexpectedEof.into()),
    }
}

/// What a caller signs for `request` (the payload as sent) under `challenge`.
fn proof_message(challenge: &[u8; 32], request: &[u8]) -> Vec<u8> {
    let mut message = DOMAIN.to_vec();
    message.extend_from_slice(challenge);
    message.extend_from_slice(blake3::hash(request).as_bytes());
    message
}

fn hex32(text: &str) -> Option<[u8; 32]> {
    let mut id = [0u8; 32];
    hex::decode_to_slice(text, &mut id).ok().map(|()| id)
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
    pub fn start(client: Arc<Client>, home: &Home) -> std::io::Result<Self> {
        let path = home.socket_path();
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

    /// Stops taking operations (a caller that connects now is told the owner is closing, and
    /// acquires again once the chain is released), waits for the operations in flight to end
    /// (at most a minute), then removes the socket: call before closing the chain.
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
    let closing = Arc::new(AtomicBool::new(false));
    let slots = Arc::new(tokio::sync::Semaphore::new(SESSIONS));
    let mut sessions = tokio::task::JoinSet::new();
    let mut drain: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // out of descriptors: wait rather than spin
                        tracing::warn!(%e, "home link: cannot accept");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let client = client.clone();
                let closing = closing.clone();
                let slots = slots.clone();
                sessions.spawn(async move {
                    let Ok(_slot) = slots.acquire_owned().await else { return };
                    if let Err(e) = session(client, stream, uid, &closing).await {
                        tracing::debug!(%e, "home link session ended");
                    }
                });
            }
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {
                if drain.is_some() && sessions.is_empty() {
                    break;
                }
            }
            _ = stopped.changed(), if drain.is_none() => {
                closing.store(true, Ordering::Release);
                if sessions.is_empty() {
                    break;
                }
                drain = Some(Box::pin(tokio::time::sleep(DRAIN)));
            }
            () = async { if let Some(d) = drain.as_mut() { d.await } }, if drain.is_some() => {
                tracing::warn!("closing with calls of other processes still in flight");
                sessions.abort_all();
                break;
            }
        }
    }
    drop(listener);
    let _ = std::fs::remove_file(&path);
}

/// One caller's operation: challenge, request, body, proof, answer.
async fn session(
    client: Arc<Client>,
    stream: UnixStream,
    uid: u32,
    closing: &AtomicBool,
) -> std::io::Result<()> {
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
        v: LINK_VERSION,
        pid,
        challenge: hex::encode(challenge),
    };
    write_msg(&mut w, &hello).await?;
    let (request, payload) = read_msg(&mut r).await?;
    let Msg::Request {
        op,
        key_did,
        key_id,
        gateway,
        body_len,
        body_b3,
    } = request
    else {
        return Err(std::io::Error::other("expected a request"));
    };
    if body_len > MAX_BODY || (body_len > 0 && !matches!(op, Op::Call { .. })) {
        let error = WireError::Other {
            detail: format!("request body over {MAX_BODY} bytes, or a body without a call"),
        };
        return write_msg(&mut w, &Msg::Failed { error }).await.map(drop);
    }
    let body = read_body(&mut r, body_len).await?;
    if hex32(&body_b3) != Some(*blake3::hash(&body).as_bytes()) {
        return Err(std::io::Error::other("the body is not the one announced"));
    }
    let (proof, _) = read_msg(&mut r).await?;
    let Msg::Proof { signature } = proof else {
        return Err(std::io::Error::other("expected a proof"));
    };
    let auth = Auth {
        key_did: &key_did,
        key_id: key_id.as_deref(),
        gateway: gateway.as_ref(),
        signature: &signature,
        export: matches!(op, Op::Export { .. }),
    };
    if let Err(why) = auth.check(&client, &challenge, &payload) {
        return write_msg(&mut w, &Msg::Mismatch { why }).await.map(drop);
    }
    if closing.load(Ordering::Acquire) {
        return write_msg(&mut w, &Msg::Closing { pid }).await.map(drop);
    }
    match op {
        Op::Probe => write_msg(&mut w, &Msg::Ready { pid }).await.map(drop),
        Op::Call {
            upstream,
            method,
            path,
            query,
            headers,
        } => {
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
        Op::Catalog { upstream } => {
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
            write_msg(&mut w, &reply).await.map(drop)
        }
        Op::Export { out } => {
            let reply = serve_export(&client, PathBuf::from(out)).await;
            write_msg(&mut w, &reply).await.map(drop)
        }
    }
}

/// Who a request says it comes from, and its proof.
struct Auth<'a> {
    key_did: &'a str,
    key_id: Option<&'a str>,
    gateway: Option<&'a (String, String)>,
    signature: &'a str,
    export: bool,
}

impl Auth<'_> {
    /// Whether the caller holds this owner's key (its signature over the challenge and the
    /// request) and asks for what this owner does: the same acting DID and gateway (an export
    /// needs the key only).
    fn check(&self, client: &Client, challenge: &[u8; 32], request: &[u8]) -> Result<(), String> {
        let owner = client.identity.did();
        if self.key_did != owner.as_str() {
            return Err(format!(
                "this home's chain is held for {owner}, not {}",
                self.key_did
            ));
        }
        let mut sig = [0u8; 64];
        hex::decode_to_slice(self.signature, &mut sig)
            .map_err(|_| "malformed signature".to_string())?;
        owner
            .verifying_key()
            .verify_strict(
                &proof_message(challenge, request),
                &ed25519_dalek::Signature::from_bytes(&sig),
            )
            .map_err(|_| "the request's signature does not verify".to_string())?;
        if self.export {
            return Ok(());
        }
        let owner_kid = client.identity.key_id();
        match self.key_id {
            Some(kid) if kid == owner_kid => {}
            Some(kid) => {
                return Err(format!(
                    "the owner acts as {owner_kid}, this process as {kid}"
                ));
            }
            None => return Err("a call names the DID it acts as".into()),
        }
        match self.gateway {
            Some((addr, did))
                if *addr == client.addr.to_string() && *did == client.gateway.as_str() => {}
            Some((addr, did)) => {
                return Err(format!(
                    "the owner calls the gateway {} at {}, this process {did} at {addr}",
                    client.gateway, client.addr
                ));
            }
            None => return Err("a call names its gateway".into()),
        }
        Ok(())
    }
}

async fn read_body(r: &mut OwnedReadHalf, len: u64) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::with_capacity(usize::try_from(len).unwrap_or(0).min(1 << 20));
    while (body.len() as u64) < len {
        let frame = tokio::time::timeout(FRAME_TIMEOUT, read_frame(r))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        match frame {
            Some(Frame::Bytes(b)) if (body.len() + b.len()) as u64 <= len => {
                body.extend_from_slice(&b);
            }
            _ => return Err(std::io::Error::other("request body cut short")),
        }
    }
    Ok(body)
}

/// What the owner says when the gateway refused call `call`: the signed request and refusal,
/// or, without a signed refusal to relay, the error.
fn refusal_or_failure(client: &Client, request: &[u8], call: [u8; 32], e: &CallError) -> Msg {
    if matches!(e, CallError::Refused { .. })
        && let Some(refusal) = client.take_refusal(call)
    {
        return Msg::Refused {
            request: hex::encode(request),
            refusal: hex::encode(refusal),
        };
    }
    Msg::Failed {
        error: WireError::from_call(e),
    }
}

/// Makes the call and relays the answer as it arrives. A caller that goes away mid-body drops
/// the answer, which records the outcome as unknown.
async fn serve_call(
    client: &Client,
    spec: CallSpec,
    w: &mut OwnedWriteHalf,
) -> std::io::Result<()> {
    let (request, call, answer) = client.call_streaming_signed(spec).await;
    let mut answer = match answer {
        Ok(a) => a,
        Err(e) => {
            let reply = refusal_or_failure(client, &request, call, &e);
            return write_msg(w, &reply).await.map(drop);
        }
    };
    let head = Msg::Head {
        request: hex::encode(&request),
        status: answer.status(),
        headers: answer.headers().to_vec(),
    };
    write_msg(w, &head).await?;
    loop {
        match answer.next_chunk().await {
            Ok(Some(chunk)) => write_bytes(w, &chunk).await?,
            Ok(None) => {
                let receipt = hex::encode(answer.receipt_bytes().unwrap_or_default());
                return write_msg(w, &Msg::End { receipt }).await.map(drop);
            }
            Err(e) => {
                let reply = refusal_or_failure(client, &request, call, &e);
                return write_msg(w, &reply).await.map(drop);
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
    /// The home's newest node revocation list (what relayed answers are judged with too).
    revocations_file: PathBuf,
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

/// One connection to the owner after the operation was sent (request, body, proof).
struct Session {
    r: OwnedReadHalf,
    w: OwnedWriteHalf,
    pid: u32,
}

/// How an operation through the owner failed: before the owner could act on it (try another
/// route), or with a call error.
enum LinkFailure {
    Reroute(LinkError),
    Call(CallError),
}

impl Link {
    /// A link to the owner of `home`'s chain, for `identity`; `gateway` is the gateway this
    /// caller would call (checked against the owner's), `None` for exports only.
    pub fn new(
        home: &Home,
        identity: Arc<Identity>,
        gateway: Option<(std::net::SocketAddr, Did)>,
    ) -> Self {
        Self {
            socket: home.socket_path(),
            revocations_file: home.node_revocations(),
            identity,
            gateway,
            version: Version::CURRENT,
            pid: 0.into(),
        }
    }

    /// The owner's process ID, as last seen (0 before the first operation).
    pub fn owner_pid(&self) -> u32 {
        self.pid.load(Ordering::Relaxed)
    }

    fn no_owner(&self, source: std::io::Error) -> LinkError {
        LinkError::NoOwner {
            path: self.socket.clone(),
            source,
        }
    }

    /// Connects and sends `op` with `body` and its proof. A failure here is one the owner
    /// cannot have acted on (it acts only on a whole request with its proof), except a failure
    /// while the proof itself is written, which is reported as the owner lost.
    async fn send(&self, op: Op, body: &[u8]) -> Result<Session, LinkFailure> {
        let reroute = |e| LinkFailure::Reroute(self.no_owner(e));
        let stream = UnixStream::connect(&self.socket).await.map_err(reroute)?;
        let (mut r, mut w) = stream.into_split();
        let (hello, _) = read_msg(&mut r).await.map_err(reroute)?;
        let Msg::Hello { challenge, pid, .. } = hello else {
            return Err(reroute(std::io::Error::other("expected a hello")));
        };
        let challenge = hex32(&challenge)
            .ok_or_else(|| reroute(std::io::Error::other("malformed challenge")))?;
        self.pid.store(pid, Ordering::Relaxed);
        let export = matches!(op, Op::Export { .. });
        let request = Msg::Request {
            op,
            key_did: self.identity.did().to_string(),
            key_id: (!export).then(|| self.identity.key_id()),
            gateway: match (&self.gateway, export) {
                (Some((addr, did)), false) => Some((addr.to_string(), did.to_string())),
                _ => None,
            },
            body_len: body.len() as u64,
            body_b3: hex::encode(blake3::hash(body).as_bytes()),
        };
        let payload = write_msg(&mut w, &request).await.map_err(reroute)?;
        write_bytes(&mut w, body).await.map_err(reroute)?;
        let proof = Msg::Proof {
            signature: hex::encode(self.identity.sign(&proof_message(&challenge, &payload))),
        };
        if let Err(e) = write_msg(&mut w, &proof).await {
            return Err(LinkFailure::Call(owner_lost(pid, Lost::Link(e))));
        }
        Ok(Session { r, w, pid })
    }

    /// Checks that an owner answers and will call for this caller.
    pub async fn probe(&self) -> Result<u32, LinkError> {
        let mut s = match self.send(Op::Probe, b"").await {
            Ok(s) => s,
            Err(LinkFailure::Reroute(e)) => return Err(e),
            Err(LinkFailure::Call(e)) => {
                return Err(self.no_owner(std::io::Error::other(e)));
            }
        };
        match read_msg(&mut s.r).await {
            Ok((Msg::Ready { pid }, _)) => Ok(pid),
            Ok((Msg::Closing { pid }, _)) => Err(LinkError::Closing { pid }),
            Ok((Msg::Mismatch { why }, _)) => Err(LinkError::Mismatch(why)),
            Ok(_) => Err(self.no_owner(std::io::Error::other("unexpected answer to a probe"))),
            Err(e) => Err(self.no_owner(e)),
        }
    }

    /// Asks the owner to seal its chain and export it to `out` (made absolute here).
    pub async fn export(&self, out: &Path) -> Result<Exported, ExportThroughError> {
        let out = std::path::absolute(out).map_err(ExportThroughError::Path)?;
        let op = Op::Export {
            out: out.to_string_lossy().into_owned(),
        };
        let mut s = match self.send(op, b"").await {
            Ok(s) => s,
            Err(LinkFailure::Reroute(e)) => return Err(e.into()),
            Err(LinkFailure::Call(e)) => return Err(ExportThroughError::Call(e)),
        };
        let lost = ExportThroughError::OwnerLost;
        // an export of a long chain takes a while: no frame timeout on its answer
        let frame = read_frame(&mut s.r).await.map_err(lost)?;
        match frame {
            Some(Frame::Msg(
                Msg::Exported {
                    entries,
                    checkpoints,
                    sealed_now,
                },
                _,
            )) => Ok(Exported {
                entries,
                checkpoints,
                sealed_now,
            }),
            Some(Frame::Msg(Msg::Closing { pid }, _)) => {
                Err(ExportThroughError::Link(LinkError::Closing { pid }))
            }
            Some(Frame::Msg(Msg::Mismatch { why }, _)) => {
                Err(ExportThroughError::Link(LinkError::Mismatch(why)))
            }
            Some(Frame::Msg(Msg::Failed { error }, _)) => {
                Err(ExportThroughError::Call(error.into_call(s.pid, false)))
            }
            None => Err(lost(std::io::ErrorKind::UnexpectedEof.into())),
            Some(_) => Err(ExportThroughError::Unexpected),
        }
    }

    /// The catalog through the owner. Nothing executes, so any failure to hear the owner's
    /// answer is worth another route.
    async fn catalog(&self, upstream: Option<&str>) -> Result<Vec<Operation>, LinkFailure> {
        let op = Op::Catalog {
            upstream: upstream.map(str::to_string),
        };
        let mut s = match self.send(op, b"").await {
            Ok(s) => s,
            Err(LinkFailure::Call(e)) => {
                return Err(LinkFailure::Reroute(
                    self.no_owner(std::io::Error::other(e)),
                ));
            }
            Err(reroute) => return Err(reroute),
        };
        let frame = read_frame(&mut s.r).await;
        match frame {
            Ok(Some(Frame::Msg(Msg::Operations { operations }, _))) => Ok(operations),
            Ok(Some(Frame::Msg(Msg::Failed { error }, _))) => {
                Err(LinkFailure::Call(error.into_call(s.pid, false)))
            }
            Ok(Some(Frame::Msg(Msg::Closing { pid }, _))) => {
                Err(LinkFailure::Reroute(LinkError::Closing { pid }))
            }
            Ok(Some(Frame::Msg(Msg::Mismatch { why }, _))) => {
                Err(LinkFailure::Reroute(LinkError::Mismatch(why)))
            }
            Ok(_) => Err(LinkFailure::Reroute(self.no_owner(std::io::Error::other(
                "unexpected answer to a catalog request",
            )))),
            Err(e) => Err(LinkFailure::Reroute(self.no_owner(e))),
        }
    }

    /// Sends the call; returns once the head (or the failure) came back.
    async fn call_streaming(&self, spec: &CallSpec) -> Result<LinkAnswer, LinkFailure> {
        if spec.body.len() as u64 > MAX_BODY {
            return Err(LinkFailure::Call(CallError::Audit(
                AuditError::BodyTooLarge { limit: MAX_BODY },
            )));
        }
        let gateway = self
            .gateway
            .as_ref()
            .map(|(_, d)| d.clone())
            .ok_or_else(|| {
                LinkFailure::Call(CallError::Audit(AuditError::NoChain("no gateway pinned")))
            })?;
        let op = Op::Call {
            upstream: spec.upstream.clone(),
            method: spec.method.clone(),
            path: spec.path.clone(),
            query: spec.query.clone(),
            headers: spec.headers.clone(),
        };
        let mut s = self.send(op, &spec.body).await?;
        let pid = s.pid;
        let lost = |detail| LinkFailure::Call(owner_lost(pid, detail));
        // no frame timeout: an upstream may take long to answer
        let frame = read_frame(&mut s.r).await;
        let revocations = held_revocations(&self.revocations_file, &gateway);
        let check = Check {
            identity: &self.identity,
            gateway: &gateway,
            version: self.version,
            spec,
            revocations: revocations.as_ref(),
        };
        match frame {
            Ok(Some(Frame::Msg(
                Msg::Head {
                    request,
                    status,
                    headers,
                },
                _,
            ))) => {
                let call = check.request(&request).map_err(LinkFailure::Call)?;
                Ok(LinkAnswer {
                    r: s.r,
                    _w: s.w,
                    pid,
                    gateway,
                    revocations,
                    identity: self.identity.clone(),
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
            Ok(Some(Frame::Msg(Msg::Refused { request, refusal }, _))) => {
                let call = check.request(&request).map_err(LinkFailure::Call)?;
                Err(LinkFailure::Call(check.refusal(call, &refusal)))
            }
            Ok(Some(Frame::Msg(Msg::Failed { error }, _))) => {
                Err(LinkFailure::Call(error.into_call(pid, true)))
            }
            Ok(Some(Frame::Msg(Msg::Closing { pid }, _))) => {
                Err(LinkFailure::Reroute(LinkError::Closing { pid }))
            }
            Ok(Some(Frame::Msg(Msg::Mismatch { why }, _))) => {
                Err(LinkFailure::Reroute(LinkError::Mismatch(why)))
            }
            Ok(Some(_)) => Err(lost(Lost::Owner("unexpected answer"))),
            Ok(None) => Err(lost(Lost::Owner("the owner went away before the answer"))),
            Err(e) => Err(lost(Lost::Link(e))),
        }
    }
}

/// The checks a caller makes on what the owner relays, as if it had made the call itself.
struct Check<'a> {
    identity: &'a Identity,
    gateway: &'a Did,
    version: Version,
    spec: &'a CallSpec,
    /// The home's newest node revocation list, if any.
    revocations: Option<&'a node::NodeRevocations>,
}

/// The node revocation list kept in `path` (the home's), if the pinned `gateway` signed it.
fn held_revocations(path: &Path, gateway: &Did) -> Option<node::NodeRevocations> {
    let bytes = std::fs::read(path).ok()?;
    node::NodeRevocations::open(&bytes, gateway).ok()
}

impl Check<'_> {
    /// The relayed signed request (hex): this identity's signature over this call to the
    /// pinned gateway with this body. Returns the call ID.
    fn request(&self, hex_bytes: &str) -> Result<[u8; 32], CallError> {
        let invalid = |why| CallError::InvalidAnswer(InvalidAnswer::Relay(why));
        let bytes = hex::decode(hex_bytes).map_err(|_| invalid("an unreadable request"))?;
        let signed = message::open_from::<Request>(&bytes, self.identity.did())
            .map_err(|_| invalid("a request this identity did not sign"))?;
        if !crate::request_matches(signed.message(), self.spec, self.gateway, self.version) {
            return Err(invalid("a request for another call"));
        }
        Ok(signed.envelope().digest())
    }

    /// The relayed refusal (hex) of `call`: signed by the pinned gateway, for that call.
    fn refusal(&self, call: [u8; 32], hex_bytes: &str) -> CallError {
        let invalid = |why| CallError::InvalidAnswer(InvalidAnswer::Relay(why));
        let Ok(bytes) = hex::decode(hex_bytes) else {
            return invalid("an unreadable refusal");
        };
        let Ok((r, _)) = node::open_signed::<Refusal>(&bytes, self.gateway, None, self.revocations)
        else {
            return invalid("a refusal the pinned gateway did not sign");
        };
        if r.message().call != Some(call) || r.message().v != self.version.as_u64() {
            return invalid("a refusal of another call");
        }
        let r = r.into_message();
        CallError::Refused {
            code: r.code,
            reason: r.reason,
            gateway_time_ms: r.time_ms,
            call: r.call,
        }
    }
}

fn owner_lost(pid: u32, source: Lost) -> CallError {
    CallError::OwnerLost { pid, source }
}

/// Why an export through the owner failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportThroughError {
    /// No owner to ask, or it will not export for this identity.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The export path could not be made absolute.
    #[error("{0}")]
    Path(#[source] std::io::Error),
    /// The owner could not export (its error, or the operation's).
    #[error("{0}")]
    Call(#[source] CallError),
    /// The owner went away during the export.
    #[error("the owner went away during the export: {0}")]
    OwnerLost(#[source] std::io::Error),
    /// The owner answered something else than an export's outcome.
    #[error("unexpected answer to an export")]
    Unexpected,
}

/// A call's answer relayed by the owner: the head, then the body as it arrives, then the
/// receipt, verified here too against the pinned gateway, this call, this client, the body's
/// length and digest.
pub struct LinkAnswer {
    r: OwnedReadHalf,
    /// Kept open until the answer ends (closing it tells the owner this caller went away).
    _w: OwnedWriteHalf,
    pid: u32,
    gateway: Did,
    /// The home's newest node revocation list when the call began, if any.
    revocations: Option<node::NodeRevocations>,
    identity: Arc<Identity>,
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
            Ok(Some(Frame::Msg(m, _))) => m,
            Ok(Some(Frame::Bytes(_)) | None) => {
                return Err(owner_lost(
                    self.pid,
                    Lost::Owner("the owner went away mid-answer"),
                ));
            }
            Err(e) => return Err(owner_lost(self.pid, Lost::Link(e))),
        };
        let invalid = |why| CallError::InvalidAnswer(InvalidAnswer::Relay(why));
        match msg {
            Msg::End { receipt } => {
                let bytes = hex::decode(receipt).map_err(|_| invalid("an unreadable receipt"))?;
                let (signed, _) =
                    node::open_signed::<Receipt>(&bytes, &self.gateway, None, None)
                        .map_err(|_| invalid("a receipt the pinned gateway did not sign"))?;
                if signed.message().v != self.version.as_u64()
                    || signed.message().client != self.identity.did().as_str()
                {
                    return Err(invalid("a receipt for another client or version"));
                }
                let b3 = *self.hasher.finalize().as_bytes();
                crate::check_receipt(self.call, Some(&self.head), self.len, &b3, signed.message())
                    .map_err(|why| CallError::InvalidAnswer(InvalidAnswer::Mismatch(why)))?;
                self.receipt = Some(signed);
                Ok(None)
            }
            Msg::Refused { refusal, .. } => Err(self.refusal(&refusal)),
            Msg::Failed { error } => Err(error.into_call(self.pid, true)),
            _ => Err(owner_lost(
                self.pid,
                Lost::Owner("unexpected message mid-answer"),
            )),
        }
    }

    /// A refusal after the head: signed by the pinned gateway, for this call.
    fn refusal(&self, hex_bytes: &str) -> CallError {
        let invalid = |why| CallError::InvalidAnswer(InvalidAnswer::Relay(why));
        let Ok(bytes) = hex::decode(hex_bytes) else {
            return invalid("an unreadable refusal");
        };
        match node::open_signed::<Refusal>(&bytes, &self.gateway, None, self.revocations.as_ref()) {
            Ok((r, _))
                if r.message().call == Some(self.call)
                    && r.message().v == self.version.as_u64() =>
            {
                let r = r.into_message();
                CallError::Refused {
                    code: r.code,
                    reason: r.reason,
                    gateway_time_ms: r.time_ms,
                    call: r.call,
                }
            }
            _ => invalid("a refusal the pinned gateway did not sign for this call"),
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
                .map(|r| (r.message().clone(), r.bytes().to_vec())),
        }
    }
}

/// What [`Caller::acquire`] needs to acquire again after the owner went away.
struct Acquire {
    home: Home,
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
                home: Home::open(home),
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

    /// [`Caller::acquire`] for `home`'s chain, `identity` and the gateway `pin`, each
    /// connection attempt bounded by `connect_timeout` ([`crate::CONNECT_TIMEOUT`] by default).
    pub async fn from_home(
        home: &Home,
        identity: Identity,
        pin: &Pin,
        connect_timeout: Duration,
    ) -> Result<Self, AcquireError> {
        Self::acquire(
            home.dir(),
            identity,
            pin.addr,
            pin.did.clone(),
            connect_timeout,
        )
        .await
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
        let started = Instant::now();
        let mut deadline = started + ACQUIRE_WAIT;
        let chain = a.home.chain_dir();
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
                Err(e @ LinkError::Mismatch(_)) => break e,
                Err(e) if Instant::now() >= deadline => break e,
                Err(LinkError::Closing { .. }) => {
                    // it releases the chain once its operations in flight end
                    deadline = deadline.max(started + CLOSING_WAIT);
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
            }
        };
        self.fall_back(a, why)
    }

    /// Opens the first free `chains/N` of the home.
    fn fall_back(&self, a: &Acquire, why: LinkError) -> Result<(), AcquireError> {
        let dir = a.home.fallback_chains_dir();
        for n in 1..=MAX_FALLBACK {
            let path = dir.join(n.to_string());
            if let Err(source) = std::fs::create_dir_all(&path) {
                return Err(AcquireError::Io { path, source });
            }
            match open_client(a, &path) {
                Ok(client) => {
                    tracing::warn!(chain = %path.display(), %why, "using a chain of this process's own");
                    let _ = self.fallback.set((path, why.to_string()));
                    let _ = self.own.set(Arc::new(client));
                    *self.link.lock().unwrap_or_else(PoisonError::into_inner) = None;
                    return Ok(());
                }
                Err(ClientError::Store(e)) if e.is_locked() => {}
                Err(source) => return Err(AcquireError::Chain { path, source }),
            }
        }
        Err(AcquireError::AllHeld {
            home: a.home.dir().to_path_buf(),
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
            .ok_or(CallError::Audit(AuditError::NoChain(
                "no chain to record the call in",
            )))
    }

    /// After a failure before anything was asked of the owner: acquire again.
    async fn reroute(&self, link: &Arc<Link>, e: &LinkError) -> Result<(), CallError> {
        tracing::info!(%e, "the chain's owner went away: acquiring the chain again");
        self.reacquire(Some(link))
            .await
            .map_err(|e| CallError::Audit(AuditError::Acquire(Box::new(e))))
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
        Err(CallError::Audit(AuditError::NoChain(
            "the home's chain changed hands three times during one call",
        )))
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
        let (receipt, receipt_bytes) =
            stream
                .receipt()
                .ok_or(CallError::InvalidAnswer(InvalidAnswer::Mismatch(
                    "no receipt",
                )))?;
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
        Err(CallError::Audit(AuditError::NoChain(
            "the home's chain changed hands three times during one request",
        )))
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
    crate::close_pending(&chain)?;
    // the home's newest node revocation list: read now, kept newer as handshakes bring one
    Client::with_chain(a.identity.clone(), chain, a.addr, a.gateway.clone())?
        .with_connect_timeout(a.connect_timeout)
        .with_revocations_file(a.home.node_revocations())
}

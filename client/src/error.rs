//! What can go wrong: [`CallError`] for a call (each variant says what to do, and carries what
//! went wrong below it as its [`std::error::Error::source`]), [`ClientError`] for setting a
//! client up, [`LinkError`] and [`AcquireError`] for sharing a home's chain (both re-exported
//! by [`crate::local`]). Below every other module of the crate: it names none of them but the
//! home's layout.
//!
//! A cause that crossed the socket of the process holding a home's chain ([`crate::local`])
//! arrives as text: it is the `Relayed` variant of its cause type, worded as that process
//! reported it.

use std::net::SocketAddr;
use std::time::Duration;

use didgate_audit::store::{AppendError, StoreError};
use didgate_io::tls::TlsError;
use didgate_io::wire::WireError;
use didgate_protocol::cbor::DecodeError;
use didgate_protocol::frame::{FrameError, FrameType};
use didgate_protocol::message::{OpenError, RefusalCode};
use didgate_protocol::{Did, Version};

use std::path::PathBuf;

use crate::home::MAX_FALLBACK;

/// Why a call did not produce a verified answer. Each variant says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// The gateway refused the call with a signed, typed reason (recorded in the chain).
    #[error("refused by the gateway ({code}): {reason}")]
    Refused {
        /// The typed reason.
        code: RefusalCode,
        /// The gateway's explanation.
        reason: String,
        /// The gateway's clock when it refused (compare with yours on `clock_skew`).
        gateway_time_ms: u64,
        /// The refused call's ID, as the refusal names it (None when the gateway could not
        /// read the request, and for catalog requests).
        call: Option<[u8; 32]>,
    },
    /// The gateway could not be reached, or its handshake failed (check the address; a gateway
    /// presenting another DID than the pinned one is [`CallError::WrongGateway`]).
    #[error("gateway unreachable: {0}")]
    Unreachable(#[source] Unreachable),
    /// The connection was lost mid-call: the outcome is unknown (recorded as such). Do not
    /// retry with a fresh signature blindly: the call may have executed.
    #[error("connection lost, outcome unknown: {0}")]
    ConnectionLost(#[source] Lost),
    /// The gateway's answer is not valid (bad signature, wrong call, digest mismatch).
    #[error("invalid answer from the gateway: {0}")]
    InvalidAnswer(#[source] InvalidAnswer),
    /// The local audit chain could not be written: the call was not sent.
    #[error("local audit chain unavailable: {0}")]
    Audit(#[source] AuditError),
    /// The handshake was refused for want of a common protocol version (TLS alert
    /// `no_application_protocol` to the ALPN id `didgate/N`): the gateway runs an older release,
    /// or this client is configured for a version it no longer serves. The call was recorded
    /// as sent with an unknown outcome, but no request left this process. The close is not
    /// authenticated (QUIC's first packets are not): never fall back to an older version on
    /// the strength of this error alone.
    #[error(
        "the gateway refused protocol version {offered} (ALPN didgate/{offered}) in the handshake: it runs an older release, or something on the path refused it (this close is not authenticated)"
    )]
    VersionUnsupported {
        /// The version this client offered.
        offered: Version,
    },
    /// Something answers at the gateway's address, but its certificate is not the pinned
    /// gateway DID's: another gateway, a gateway whose identity was replaced, or an impostor.
    /// The handshake was abandoned before any request left this process.
    #[error("the gateway at {addr} presented DID {presented}, not the pinned DID {pinned}")]
    WrongGateway {
        /// The address connected to.
        addr: SocketAddr,
        /// The DID its certificate carries.
        presented: Did,
        /// The DID this client pinned (and trusts).
        pinned: Did,
    },
    /// Another process of this home holds its chain and was making this call for this one
    /// ([`crate::local`]); it went away before the answer was complete. The outcome is unknown: it
    /// may have sent the call (its chain records it as sent). Not retried on its own.
    #[error(
        "the didgate process holding this home's chain (pid {pid}) went away mid-call, outcome unknown: {source}"
    )]
    OwnerLost {
        /// The owner's process ID.
        pid: u32,
        /// What was seen.
        #[source]
        source: Lost,
    },
}

impl CallError {
    /// The wait a refusal's reason advises before the call is made again (`retry in N ms`:
    /// specs/operation.md, "Limits and egress"), if it states one.
    pub fn retry_in(&self) -> Option<Duration> {
        let Self::Refused { reason, .. } = self else {
            return None;
        };
        let (_, rest) = reason.split_once("retry in ")?;
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || !rest[digits..].starts_with(" ms") {
            return None;
        }
        rest[..digits].parse().ok().map(Duration::from_millis)
    }

    /// The gateway's refusal code, if the gateway refused the call.
    pub fn refusal_code(&self) -> Option<RefusalCode> {
        match self {
            Self::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether trying the same intent again later, as a new call, can succeed without anyone
    /// changing anything (rate limits, a draining or unreachable gateway). Never true for an
    /// unknown outcome: the call may have executed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Refused { code, .. } => matches!(
                code,
                RefusalCode::RateLimited
                    | RefusalCode::ShuttingDown
                    | RefusalCode::AuditUnavailable
                    | RefusalCode::GrantExpired
            ),
            Self::Unreachable(_) => true,
            _ => false,
        }
    }

    /// What to do about this error, in one sentence.
    pub fn advice(&self) -> &'static str {
        match self {
            Self::Refused { code, .. } => match code {
                RefusalCode::Policy => {
                    "policy does not allow this DID this call: ask the operator to allow it, or call an operation `catalog()` lists"
                }
                RefusalCode::Revoked => {
                    "this DID (or grant) is revoked: stop, and ask the operator; a new call will be refused too"
                }
                RefusalCode::RateLimited => {
                    "a rate or concurrency limit was hit: wait, then make the call again (no grant was consumed)"
                }
                RefusalCode::ClockSkew => {
                    "your clock differs from the gateway's (its time is in the refusal): fix the clock"
                }
                RefusalCode::UnknownUpstream => {
                    "the gateway has no upstream of that name: check the name (`catalog()` lists them)"
                }
                RefusalCode::NotCanonical | RefusalCode::BodyMismatch | RefusalCode::Malformed => {
                    "the request was not accepted as written: fix the path, query, headers or body"
                }
                RefusalCode::ShuttingDown | RefusalCode::AuditUnavailable => {
                    "the gateway cannot take calls now: try again later"
                }
                RefusalCode::ControlPlaneUnavailable => {
                    "this node of the gateway cannot reach its control plane, so nothing was admitted: try again later or another node"
                }
                RefusalCode::Handover => {
                    "this caller's home node changed moments ago and is waiting out the previous one's window: make the call again after the time in the reason"
                }
                RefusalCode::Moved => {
                    "the node could not be followed to this caller's home node: try again"
                }
                RefusalCode::KmsUnavailable => {
                    "the gateway's key store is unavailable, so the secret could not be opened (the grant was consumed; the upstream was not called): try again later"
                }
                RefusalCode::UpstreamFailed
                | RefusalCode::SecretUnavailable
                | RefusalCode::ResponseTooLarge => {
                    "the call was admitted but the upstream part failed (the grant was consumed): check before repeating it"
                }
                RefusalCode::GrantExpired => "the grant expired: ask for a new one",
                RefusalCode::GrantInvalid | RefusalCode::Replay => {
                    "this signed request or grant was already used: make a new call if you still mean it"
                }
                _ => "the gateway refused the call: see its reason",
            },
            Self::Unreachable(_) => {
                "check the gateway address and that the gateway is running, then try again; nothing was sent"
            }
            Self::ConnectionLost(_) => {
                "the outcome is unknown and the call may have executed: check (for example with the upstream) before repeating it"
            }
            Self::InvalidAnswer(_) => {
                "the gateway's answer or receipt did not verify: keep the chain as evidence and tell the operator"
            }
            Self::Audit(_) => {
                "the local chain could not be written, so nothing was sent: free disk space or fix its permissions"
            }
            Self::VersionUnsupported { .. } => {
                "no request was sent: ask the operator which protocol versions the gateway serves, and upgrade the older side"
            }
            Self::WrongGateway { .. } => {
                "nothing was sent: check the address; if the operator confirms the gateway's new DID (out of band), pin it (`didgate pin`)"
            }
            Self::OwnerLost { .. } => {
                "the outcome is unknown and the call may have executed (the owner's chain records it as sent): check before repeating it; the next call acquires the chain again"
            }
        }
    }
}

/// Why a client could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The local chain could not be opened (another process holds it?).
    #[error("local chain: {0}")]
    Store(#[from] StoreError),
    /// The TLS configuration could not be made.
    #[error("transport: {0}")]
    Tls(#[source] TlsError),
    /// The client's UDP socket could not be bound.
    #[error("transport: {0}")]
    Socket(#[source] std::io::Error),
    /// A call left unanswered by a process that ended mid-call could not be closed.
    #[error("cannot close a call left unanswered in the chain: {0}")]
    Recover(#[source] AppendError),
    /// A file of the home (the node revocation list) could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Why the gateway could not be reached ([`CallError::Unreachable`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Unreachable {
    /// No connection attempt could be made (a bad address, no usable socket).
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The gateway's address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: quinn::ConnectError,
    },
    /// No handshake completed within the connect timeout.
    #[error("no handshake with {addr} within {timeout:?} (is the gateway running there?)")]
    NoHandshake {
        /// The gateway's address.
        addr: SocketAddr,
        /// The timeout.
        timeout: Duration,
    },
    /// The gateway refused the connection for its connection limits.
    #[error(
        "the gateway at {addr} refused the connection: too many new or open connections from this address (try again later)"
    )]
    TooManyConnections {
        /// The gateway's address.
        addr: SocketAddr,
    },
    /// The handshake failed.
    #[error("{addr}: {source}")]
    Handshake {
        /// The gateway's address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: quinn::ConnectionError,
    },
    /// The server presented a node certificate of the pinned gateway that does not hold now:
    /// expired, not yet valid, revoked, for another key, or not signed by the pinned DID
    /// (specs/protocol.md, "Nodes"). Nothing was sent.
    #[error("the node at {addr} ({presented}) is refused: {source}")]
    NodeCertificate {
        /// The node's address.
        addr: SocketAddr,
        /// The key the node presented.
        presented: Did,
        /// Why its certificate is refused.
        #[source]
        source: didgate_protocol::node::NodeCertError,
    },
    /// As the process holding this home's chain reported it (module docs).
    #[error("{0}")]
    Relayed(String),
}

/// How a connection, or the process holding this home's chain, was lost mid-call
/// ([`CallError::ConnectionLost`], [`CallError::OwnerLost`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Lost {
    /// The answer's stream could not be read.
    #[error("{0}")]
    Read(#[source] WireError),
    /// No stream could be opened on the connection.
    #[error("{0}")]
    Stream(#[source] quinn::ConnectionError),
    /// The stream ended before the gateway's receipt.
    #[error("stream ended without a receipt")]
    NoReceipt,
    /// Nothing more is known.
    #[error("outcome unknown")]
    Unknown,
    /// The socket to the process holding this home's chain failed.
    #[error("{0}")]
    Link(#[source] std::io::Error),
    /// What the process holding this home's chain did instead of answering.
    #[error("{0}")]
    Owner(&'static str),
    /// The server presented a node certificate of the pinned gateway that does not hold now:
    /// expired, not yet valid, revoked, for another key, or not signed by the pinned DID
    /// (specs/protocol.md, "Nodes"). Nothing was sent.
    #[error("the node at {addr} ({presented}) is refused: {source}")]
    NodeCertificate {
        /// The node's address.
        addr: SocketAddr,
        /// The key the node presented.
        presented: Did,
        /// Why its certificate is refused.
        #[source]
        source: didgate_protocol::node::NodeCertError,
    },
    /// As the process holding this home's chain reported it (module docs).
    #[error("{0}")]
    Relayed(String),
}

/// Why the gateway's answer is not valid ([`CallError::InvalidAnswer`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidAnswer {
    /// A frame did not decode.
    #[error("{0}")]
    Decode(#[source] DecodeError),
    /// A signed answer did not verify (signature, signer, version).
    #[error("{0}")]
    Open(#[source] OpenError),
    /// The request's frame could not be encoded.
    #[error("{0}")]
    Encode(#[source] FrameError),
    /// A frame of a kind that has no place in an answer.
    #[error("unexpected frame {0:?}")]
    Frame(FrameType),
    /// A frame of a kind that has no place in a catalog answer.
    #[error("unexpected frame {0:?} in a catalog answer")]
    CatalogFrame(FrameType),
    /// The answer does not fit the call (a receipt for another call, a body that does not
    /// match its digest, frames out of order).
    #[error("{0}")]
    Mismatch(&'static str),
    /// What the process holding this home's chain relayed does not verify.
    #[error("the process holding this home's chain relayed {0}")]
    Relay(&'static str),
    /// The server presented a node certificate of the pinned gateway that does not hold now:
    /// expired, not yet valid, revoked, for another key, or not signed by the pinned DID
    /// (specs/protocol.md, "Nodes"). Nothing was sent.
    #[error("the node at {addr} ({presented}) is refused: {source}")]
    NodeCertificate {
        /// The node's address.
        addr: SocketAddr,
        /// The key the node presented.
        presented: Did,
        /// Why its certificate is refused.
        #[source]
        source: didgate_protocol::node::NodeCertError,
    },
    /// As the process holding this home's chain reported it (module docs).
    #[error("{0}")]
    Relayed(String),
}

/// Why the local audit chain could not record a call ([`CallError::Audit`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The chain's head could not be read.
    #[error("{0}")]
    Head(#[source] StoreError),
    /// An entry could not be appended.
    #[error("{0}")]
    Append(#[source] AppendError),
    /// The home's chain could not be acquired again after its owner went away.
    #[error("{0}")]
    Acquire(#[source] Box<AcquireError>),
    /// A request body too large for the socket of the process holding this home's chain.
    #[error(
        "a request body over {limit} bytes cannot be sent through the process holding this home's chain"
    )]
    BodyTooLarge {
        /// The largest body it carries.
        limit: u64,
    },
    /// No chain to record in (the home's chain changed hands, no gateway pinned).
    #[error("{0}")]
    NoChain(&'static str),
    /// The server presented a node certificate of the pinned gateway that does not hold now:
    /// expired, not yet valid, revoked, for another key, or not signed by the pinned DID
    /// (specs/protocol.md, "Nodes"). Nothing was sent.
    #[error("the node at {addr} ({presented}) is refused: {source}")]
    NodeCertificate {
        /// The node's address.
        addr: SocketAddr,
        /// The key the node presented.
        presented: Did,
        /// Why its certificate is refused.
        #[source]
        source: didgate_protocol::node::NodeCertError,
    },
    /// As the process holding this home's chain reported it (module docs).
    #[error("{0}")]
    Relayed(String),
}

/// Why a link to the owner could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// Nobody answers on the socket (no owner), or it failed before the operation was asked.
    #[error("no owner answers on {path}: {source}")]
    NoOwner {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The owner is closing: it releases the chain once its operations in flight end.
    #[error("the process holding this home's chain (pid {pid}) is closing")]
    Closing {
        /// Its process ID.
        pid: u32,
    },
    /// The owner serves another key, acting DID or gateway.
    #[error("the process holding this home's chain cannot call for this one: {0}")]
    Mismatch(String),
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
        #[source]
        why: LinkError,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(code: RefusalCode, reason: &str) -> CallError {
        CallError::Refused {
            code,
            reason: reason.into(),
            gateway_time_ms: 0,
            call: None,
        }
    }

    #[test]
    fn the_wait_a_refusal_advises_is_read_from_its_reason() {
        let wait = |reason: &str| refused(RefusalCode::Handover, reason).retry_in();
        assert_eq!(
            wait("requests stamped before 5 ms are refused (retry in 1 ms)"),
            Some(Duration::from_millis(1))
        );
        assert_eq!(
            wait("rate limit exceeded (retry in 491 ms)"),
            Some(Duration::from_millis(491))
        );
        for reason in [
            "no wait stated",
            "retry in ms",
            "retry in 12 seconds",
            "retry in 99999999999999999999999 ms",
        ] {
            assert_eq!(wait(reason), None, "{reason}");
        }
        assert_eq!(
            CallError::Unreachable(Unreachable::NoHandshake {
                addr: "127.0.0.1:1".parse().expect("addr"),
                timeout: Duration::from_secs(1),
            })
            .retry_in(),
            None
        );
    }
}

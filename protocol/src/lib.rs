//! didgate's wire protocol, sans-IO: no sockets, no clock, no disk.
//!
//! Owns: Ed25519 `did:key` identities ([`did`]), COSE_Sign1 envelopes with per-kind domain
//! separation ([`envelope`]), the versioned CBOR messages ([`message`]), stream framing
//! ([`frame`]), the catalog of named operations ([`catalog`]), and the canonical-request checks the gateway applies before policy
//! ([`canonical`]), the format versions and their rule ([`version`]), node certificates ([`node`]), and the wrapper that keeps another library's error as a `Clone` source ([`error`]). It does not own transport, storage, policy or time: callers pass `now`.
//! The byte-level specification is `specs/protocol.md`.
//!
//! ```
//! use didgate_protocol::{Identity, message::{self, SignedMessage, Refusal, RefusalCode}};
//! let gateway = Identity::from_seed(&[7; 32]);
//! let refusal = Refusal { v: 1, call: None, code: RefusalCode::Policy,
//!     reason: "no rule allows this".into(), time_ms: 0, entry: None, node_cert: None,
//!     home: None };
//! let bytes = refusal.sign(&gateway);
//! let opened = message::open_from::<Refusal>(&bytes, gateway.did()).unwrap();
//! assert_eq!(opened.message().code, RefusalCode::Policy);
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod canonical;
pub mod catalog;
pub mod cbor;
pub mod chain;
pub mod did;
pub mod envelope;
pub mod error;
pub mod frame;
pub mod identity;
pub mod message;
pub mod node;
#[cfg(any(test, feature = "test-util"))]
pub mod test_util;
pub mod version;
pub mod web;

pub use did::{Did, DidError};
pub use identity::Identity;
pub use version::Version;
pub use web::{Caller, Principal, WebDid};

/// The ALPN protocol id of version 1 connections ([`Version::alpn`] names every version's).
pub const ALPN: &[u8] = Version::V1.alpn();

/// The QUIC application close code of a connection a draining gateway closes once no call is
/// in flight (specs/protocol.md, "Transport"): a stream it left unanswered claimed nothing, so
/// a client may send that request again, as it is, to another node.
pub const DRAINED_CLOSE: u32 = 4;

//! The messages of the didgate protocol (specs/protocol.md, "Messages").
//!
//! Every message is a versioned CBOR map with text keys. Signed kinds travel inside a
//! COSE_Sign1 envelope ([`crate::envelope`]); their types here are the decoded payloads.
//! Decoding is strict: unknown fields, unknown versions and trailing bytes are refused. Every
//! version of [`Version::ALL`] decodes; what a decoded message's `v` may be in a given place
//! (the connection's version, a chain's) is the caller's rule.

use serde::{Deserialize, Serialize};

use crate::cbor::{self, DecodeError, PlainReader, fixed, fixed_opt};
use crate::did::Did;
use crate::envelope::{self, EnvelopeError, Kind, Verified};
use crate::identity::Identity;
use crate::version::Version;

/// A 32-byte BLAKE3 digest.
pub type Digest = [u8; 32];

/// Where a chain stood: its id (hash of its first entry), the seq and hash of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainHead {
    /// The chain id: the hash of its entry 0.
    #[serde(with = "fixed")]
    pub chain: Digest,
    /// The seq of the entry.
    pub seq: u64,
    /// The hash of the entry.
    #[serde(with = "fixed")]
    pub hash: Digest,
}

/// A position in a chain: the seq and hash of one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntryRef {
    /// The entry's seq.
    pub seq: u64,
    /// The entry's hash.
    #[serde(with = "fixed")]
    pub hash: Digest,
}

/// A client's call request (signed by the client, [`Kind::Request`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Message version, 1.
    pub v: u64,
    /// The gateway DID this request is addressed to (a request for one gateway is refused by
    /// another).
    pub aud: String,
    /// The upstream's name in the gateway's configuration.
    pub upstream: String,
    /// HTTP method, upper case.
    pub method: String,
    /// Absolute path under the upstream's base URL, starting with `/`.
    pub path: String,
    /// Query parameters in order, not percent-decoded.
    pub query: Vec<(String, String)>,
    /// Headers the caller sets, names in lower case.
    pub headers: Vec<(String, String)>,
    /// Length of the request body in bytes.
    pub body_len: u64,
    /// BLAKE3 (plain hash) of the request body.
    #[serde(with = "fixed")]
    pub body_b3: Digest,
    /// A fresh random 128-bit nonce.
    #[serde(with = "fixed")]
    pub nonce: [u8; 16],
    /// The client's clock, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The client's chain head before this request's own entry.
    pub head: ChainHead,
}

/// A single-use grant minted by the gateway for one call ([`Kind::Grant`] when signed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantBody {
    /// Message version, 1.
    pub v: u64,
    /// Random grant id, also sent upstream as `Idempotency-Key`.
    #[serde(with = "fixed")]
    pub id: [u8; 16],
    /// The call ID of the request it answers.
    #[serde(with = "fixed")]
    pub call: Digest,
    /// The subject DID.
    pub subject: String,
    /// Exact scope: upstream name.
    pub upstream: String,
    /// Exact scope: method.
    pub method: String,
    /// Exact scope: path.
    pub path: String,
    /// Expiry, milliseconds since the Unix epoch.
    pub expires_ms: u64,
    /// The node certificate of the node that signed (amendment 2.7, version 2 only): absent
    /// when the gateway's own key signed ([`crate::node`]).
    #[serde(
        default,
        with = "crate::cbor::bytes_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub node_cert: Option<Vec<u8>>,
}

/// A gateway's receipt for an executed call ([`Kind::Receipt`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    /// Message version, 1.
    pub v: u64,
    /// The call ID.
    #[serde(with = "fixed")]
    pub call: Digest,
    /// The grant consumed by the call.
    #[serde(with = "fixed")]
    pub grant: [u8; 16],
    /// The client DID.
    pub client: String,
    /// The upstream's HTTP status.
    pub status: u16,
    /// Length of the response body as relayed.
    pub resp_len: u64,
    /// BLAKE3 (plain hash) of the response body as relayed.
    #[serde(with = "fixed")]
    pub resp_b3: Digest,
    /// The gateway entry that closed the call ("executed").
    pub entry: EntryRef,
    /// Reserved: the gateway's Merkle root at `entry.seq + 1` entries.
    #[serde(with = "fixed_opt", default)]
    pub root: Option<Digest>,
    /// Gateway time, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The node certificate of the node that signed (amendment 2.7, version 2 only): absent
    /// when the gateway's own key signed ([`crate::node`]).
    #[serde(
        default,
        with = "crate::cbor::bytes_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub node_cert: Option<Vec<u8>>,
}

/// Why the gateway refused a call. The wire name is the snake_case string.
///
/// The codes of each version are listed in specs/protocol.md ("Refusal codes"). A code this
/// release does not know (a newer gateway's) decodes as [`RefusalCode::Other`] with its text,
/// so a client can still report it; the text must match [`CodeText`]'s grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RefusalCode {
    /// The frame or envelope is malformed or oversized.
    Malformed,
    /// The signature does not verify.
    BadSignature,
    /// The TLS peer DID is not the request's signer.
    PeerMismatch,
    /// The request is addressed to another gateway.
    WrongAudience,
    /// The request time is outside the skew window.
    ClockSkew,
    /// The call ID or (DID, nonce) was already seen.
    Replay,
    /// The path, query or headers are not canonical or not allowed.
    NotCanonical,
    /// The upstream is not configured.
    UnknownUpstream,
    /// Policy does not allow the call.
    Policy,
    /// The DID is revoked.
    Revoked,
    /// The client's chain head contradicts one already seen (a fork).
    ChainFork,
    /// The body does not match its signed digest or length, or exceeds the limit.
    BodyMismatch,
    /// The audit log could not be written: the gateway fails closed.
    AuditUnavailable,
    /// The upstream secret is unavailable (missing, disabled, cannot be decrypted).
    SecretUnavailable,
    /// The upstream failed (connection, timeout, bad response) after the grant was consumed.
    UpstreamFailed,
    /// Too many requests.
    RateLimited,
    /// The gateway is shutting down.
    ShuttingDown,
    /// The presented grant has expired.
    GrantExpired,
    /// The presented grant is unknown, not issued to this caller, or already used.
    GrantInvalid,
    /// The upstream's response exceeded the gateway's `max_response_bytes` (the grant was
    /// consumed; the relayed part is not covered by a receipt).
    ResponseTooLarge,
    /// The caller's did:web could not be resolved to a document listing its key for
    /// authentication (domain not named by policy, fetch failed, key not listed).
    DidUnresolved,
    /// The KMS that holds the master key (a PKCS#11 token) cannot be used now: the call's
    /// secret could not be decrypted; the grant was consumed (version 2 amendment 2.6; a
    /// version 1 connection gets [`RefusalCode::SecretUnavailable`] instead).
    KmsUnavailable,
    /// A node of a cluster has not heard from its control plane (etcd) within its bound, so
    /// it cannot know what other nodes revoked: it refuses until etcd answers again (version 2
    /// amendment 2.8; a version 1 connection gets [`RefusalCode::ShuttingDown`] instead).
    ControlPlaneUnavailable,
    /// This node of a cluster is not the caller's home node: the refusal's `home` names the
    /// node that is, where the client sends the same request (version 2 amendment 2.11;
    /// nothing was claimed or recorded in the caller's name here).
    Moved,
    /// This node became the caller's home node recently and refuses requests stamped before
    /// the end of the handover, when the previous home can no longer have claimed them
    /// (version 2 amendment 2.11): the caller signs a new request and tries again after the
    /// time the reason names.
    Handover,
    /// A code this release does not know (a later version's), with its wire text. Never sent
    /// by this release.
    Other(CodeText),
}

/// The wire text of a refusal code: 1 to 32 bytes, `[a-z][a-z0-9_]*` (specs/protocol.md,
/// "Refusal codes"). Kept inline so that [`RefusalCode`] stays `Copy`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CodeText {
    len: u8,
    bytes: [u8; CodeText::MAX],
}

impl CodeText {
    /// Longest code text.
    pub const MAX: usize = 32;

    /// The text, if it is a well-formed code.
    pub fn new(text: &str) -> Option<Self> {
        let b = text.as_bytes();
        let well_formed = !b.is_empty()
            && b.len() <= Self::MAX
            && b[0].is_ascii_lowercase()
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_');
        if !well_formed {
            return None;
        }
        let mut bytes = [0; Self::MAX];
        bytes[..b.len()].copy_from_slice(b);
        Some(Self {
            len: b.len() as u8,
            bytes,
        })
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // built only from ASCII checked in `new`
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("")
    }
}

impl std::fmt::Debug for CodeText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl RefusalCode {
    /// Every code of version 1, in the order of the specs' table.
    pub const V1: [RefusalCode; 21] = [
        Self::Malformed,
        Self::BadSignature,
        Self::PeerMismatch,
        Self::WrongAudience,
        Self::ClockSkew,
        Self::UnknownUpstream,
        Self::NotCanonical,
        Self::BodyMismatch,
        Self::Policy,
        Self::Replay,
        Self::ChainFork,
        Self::AuditUnavailable,
        Self::SecretUnavailable,
        Self::UpstreamFailed,
        Self::ResponseTooLarge,
        Self::Revoked,
        Self::GrantExpired,
        Self::GrantInvalid,
        Self::DidUnresolved,
        Self::RateLimited,
        Self::ShuttingDown,
    ];

    /// The codes version 2 added by amendment, in order (specs/protocol.md, "Format
    /// evolution").
    pub const V2_ADDED: [RefusalCode; 4] = [
        Self::KmsUnavailable,
        Self::ControlPlaneUnavailable,
        Self::Moved,
        Self::Handover,
    ];

    /// Every code this release knows: [`RefusalCode::V1`], then [`RefusalCode::V2_ADDED`].
    pub const ALL: [RefusalCode; 25] = {
        let mut all = [Self::Malformed; 25];
        let mut i = 0;
        while i < Self::V1.len() {
            all[i] = Self::V1[i];
            i += 1;
        }
        let mut j = 0;
        while j < Self::V2_ADDED.len() {
            all[Self::V1.len() + j] = Self::V2_ADDED[j];
            j += 1;
        }
        all
    };

    /// Whether a message of version `v` may carry this code: version 1's refusals name only
    /// version 1's codes.
    pub fn in_version(&self, v: u64) -> bool {
        v != Version::V1.as_u64() || Self::V1.contains(self)
    }

    /// This code as a message of version `v` may carry it: a code `v` lacks becomes its
    /// version 1 counterpart (`kms_unavailable` -> `secret_unavailable`).
    pub fn for_version(self, v: u64) -> Self {
        match self {
            Self::KmsUnavailable if !self.in_version(v) => Self::SecretUnavailable,
            Self::ControlPlaneUnavailable | Self::Moved | Self::Handover if !self.in_version(v) => {
                Self::ShuttingDown
            }
            c => c,
        }
    }

    /// The wire name.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Malformed => "malformed",
            Self::BadSignature => "bad_signature",
            Self::PeerMismatch => "peer_mismatch",
            Self::WrongAudience => "wrong_audience",
            Self::ClockSkew => "clock_skew",
            Self::Replay => "replay",
            Self::NotCanonical => "not_canonical",
            Self::UnknownUpstream => "unknown_upstream",
            Self::Policy => "policy",
            Self::Revoked => "revoked",
            Self::ChainFork => "chain_fork",
            Self::BodyMismatch => "body_mismatch",
            Self::AuditUnavailable => "audit_unavailable",
            Self::SecretUnavailable => "secret_unavailable",
            Self::UpstreamFailed => "upstream_failed",
            Self::RateLimited => "rate_limited",
            Self::ShuttingDown => "shutting_down",
            Self::GrantExpired => "grant_expired",
            Self::GrantInvalid => "grant_invalid",
            Self::ResponseTooLarge => "response_too_large",
            Self::DidUnresolved => "did_unresolved",
            Self::KmsUnavailable => "kms_unavailable",
            Self::ControlPlaneUnavailable => "control_plane_unavailable",
            Self::Moved => "moved",
            Self::Handover => "handover",
            Self::Other(text) => text.as_str(),
        }
    }

    /// The code named `text`: a known one, or [`RefusalCode::Other`] if `text` is a
    /// well-formed code this release does not know.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|c| c.as_str() == text)
            .or_else(|| CodeText::new(text).map(Self::Other))
    }

    /// Whether this release knows the code (it is not [`RefusalCode::Other`]).
    pub fn is_known(&self) -> bool {
        !matches!(self, Self::Other(_))
    }
}

impl Serialize for RefusalCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for RefusalCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).ok_or_else(|| {
            serde::de::Error::invalid_value(
                serde::de::Unexpected::Str(&text),
                &"a refusal code ([a-z][a-z0-9_]*, at most 32 bytes)",
            )
        })
    }
}

impl std::fmt::Display for RefusalCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A gateway's signed refusal ([`Kind::Refusal`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refusal {
    /// Message version, 1.
    pub v: u64,
    /// The call ID, when the request's signature verified.
    #[serde(with = "fixed_opt", default)]
    pub call: Option<Digest>,
    /// The reason, typed.
    pub code: RefusalCode,
    /// A human-readable explanation (never policy text or secrets).
    pub reason: String,
    /// Gateway time, milliseconds since the Unix epoch (lets a client see its skew).
    pub time_ms: u64,
    /// The gateway entry recording this refusal, when it has one of its own.
    pub entry: Option<EntryRef>,
    /// The node certificate of the node that signed (amendment 2.7, version 2 only): absent
    /// when the gateway's own key signed ([`crate::node`]).
    #[serde(
        default,
        with = "crate::cbor::bytes_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub node_cert: Option<Vec<u8>>,
    /// The caller's home node, with the code `moved` only (amendment 2.11, version 2 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home: Option<Home>,
}

/// Where a caller's home node serves (a `moved` refusal's `home`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Home {
    /// The home node's key, as a did:key: the key its TLS certificate must hold.
    pub node: String,
    /// Its UDP address, `host:port`.
    pub addr: String,
}

/// A chain owner's signed checkpoint ([`Kind::Checkpoint`]): the chain had `size` entries,
/// the last with hash `head`, and Merkle root `root` (specs/audit-log.md, "Checkpoints").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// Message version, 1.
    pub v: u64,
    /// The chain owner's DID.
    pub log: String,
    /// The chain id (hash of entry 0).
    #[serde(with = "fixed")]
    pub chain: Digest,
    /// Number of entries covered.
    pub size: u64,
    /// Hash of entry `size - 1`.
    #[serde(with = "fixed")]
    pub head: Digest,
    /// Merkle root over the first `size` entries.
    #[serde(with = "fixed")]
    pub root: Digest,
    /// Owner's clock, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The node certificate of the node that signed (amendment 2.7, version 2 only): absent
    /// when the gateway's own key signed ([`crate::node`]).
    #[serde(
        default,
        with = "crate::cbor::bytes_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub node_cert: Option<Vec<u8>>,
}

/// The response head, sent unsigned before the body (the receipt binds status and body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseHead {
    /// Message version, 1.
    pub v: u64,
    /// HTTP status.
    pub status: u16,
    /// Response headers, names in lower case.
    pub headers: Vec<(String, String)>,
}

/// A versioned CBOR message.
pub trait Message: Serialize + serde::de::DeserializeOwned {
    /// The message's version field.
    fn version(&self) -> u64;

    /// Encodes the payload.
    fn encode(&self) -> Vec<u8> {
        cbor::to_vec(self)
    }

    /// Decodes a payload strictly, in any version this release speaks (the field tables of
    /// every version are the same so far, so one type reads them all).
    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let m: Self = cbor::from_slice(bytes)?;
        if Version::from_u64(m.version()).is_none() {
            return Err(DecodeError::Version(m.version()));
        }
        m.check_version()?;
        Ok(m)
    }

    /// What a version's table forbids beyond its fields (a v1 refusal names a v1 code).
    fn check_version(&self) -> Result<(), DecodeError> {
        Ok(())
    }

    /// Decodes a payload strictly and requires version `v` (a message on a connection of that
    /// version, say).
    fn decode_v(bytes: &[u8], v: Version) -> Result<Self, DecodeError> {
        let m = Self::decode(bytes)?;
        if m.version() != v.as_u64() {
            return Err(DecodeError::Version(m.version()));
        }
        Ok(m)
    }
}

/// A message that travels signed, with its envelope kind (domain tag).
pub trait SignedMessage: Message {
    /// The envelope kind.
    const KIND: Kind;

    /// Signs this message.
    fn sign(&self, identity: &Identity) -> Vec<u8> {
        envelope::sign(identity, Self::KIND, self.encode())
    }

    /// Signs this message and returns its digest too (for a request, the call ID), without
    /// verifying the envelope ([`envelope::sign_with_digest`]).
    fn sign_with_digest(&self, identity: &Identity) -> (Vec<u8>, [u8; 32]) {
        envelope::sign_with_digest(identity, Self::KIND, self.encode())
    }
}

macro_rules! message {
    ($t:ty) => {
        impl Message for $t {
            fn version(&self) -> u64 {
                self.v
            }
        }
    };
    ($t:ty, $k:expr) => {
        message!($t);
        impl SignedMessage for $t {
            const KIND: Kind = $k;
        }
    };
    ($t:ty, $k:expr, node_cert) => {
        impl Message for $t {
            fn version(&self) -> u64 {
                self.v
            }

            fn check_version(&self) -> Result<(), DecodeError> {
                no_node_cert_in_v1(self.v, &self.node_cert)
            }
        }
        impl SignedMessage for $t {
            const KIND: Kind = $k;
        }
    };
}

impl Message for Refusal {
    fn version(&self) -> u64 {
        self.v
    }

    /// Version 1 is frozen: its refusals name one of its codes. Later versions may name a
    /// code added after this release ([`RefusalCode::Other`]).
    fn check_version(&self) -> Result<(), DecodeError> {
        if !self.code.in_version(self.v) {
            return Err(DecodeError::Field("code"));
        }
        // amendment 2.11: a `moved` refusal names the home node, and no other known code
        // does (a later amendment may give it to a code this release does not know)
        let moved = self.code == RefusalCode::Moved;
        if moved != self.home.is_some() && (moved || self.code.is_known()) {
            return Err(DecodeError::Field("home"));
        }
        no_node_cert_in_v1(self.v, &self.node_cert)
    }
}

/// Amendment 2.7: `node_cert` is a version 2 field; a version 1 message carrying it does not
/// decode.
fn no_node_cert_in_v1(v: u64, node_cert: &Option<Vec<u8>>) -> Result<(), DecodeError> {
    if v == Version::V1.as_u64() && node_cert.is_some() {
        return Err(DecodeError::Field("node_cert"));
    }
    Ok(())
}

impl SignedMessage for Refusal {
    const KIND: Kind = Kind::Refusal;
}
message!(Request, Kind::Request);
message!(GrantBody, Kind::Grant, node_cert);
message!(Receipt, Kind::Receipt, node_cert);
message!(Checkpoint, Kind::Checkpoint, node_cert);
message!(ResponseHead);

// The fast decoders beside the strict ones: the audit verifier reads millions of requests and
// receipts, all in the plain encoding their signers write. Each gives the strict decoder's
// value on that encoding and `None` on anything else, for the caller to use the strict
// decoder then (whose verdict and error stand); the agreement is tested below and fuzzed.

impl ChainHead {
    /// Reads a chain head in the plain encoding ([`PlainReader`]): a map of `chain`, `seq`
    /// and `hash`, in any order, once each; `None` for anything else.
    pub fn read_plain(r: &mut PlainReader<'_>) -> Option<Self> {
        let (mut chain, mut seq, mut hash) = (None, None, None);
        for _ in 0..r.head(5)? {
            match r.text()? {
                "chain" if chain.is_none() => chain = Some(r.fixed()?),
                "seq" if seq.is_none() => seq = Some(r.uint()?),
                "hash" if hash.is_none() => hash = Some(r.fixed()?),
                _ => return None,
            }
        }
        Some(Self {
            chain: chain?,
            seq: seq?,
            hash: hash?,
        })
    }
}

impl EntryRef {
    /// Reads an entry reference in the plain encoding ([`PlainReader`]): a map of `seq` and
    /// `hash`, in any order, once each; `None` for anything else.
    pub fn read_plain(r: &mut PlainReader<'_>) -> Option<Self> {
        let (mut seq, mut hash) = (None, None);
        for _ in 0..r.head(5)? {
            match r.text()? {
                "seq" if seq.is_none() => seq = Some(r.uint()?),
                "hash" if hash.is_none() => hash = Some(r.fixed()?),
                _ => return None,
            }
        }
        Some(Self {
            seq: seq?,
            hash: hash?,
        })
    }
}

/// Fills a map field once: a repeated key, or a value that did not decode, is `None`.
fn once<T>(slot: &mut Option<T>, value: Option<T>) -> Option<()> {
    if slot.is_some() {
        return None;
    }
    *slot = Some(value?);
    Some(())
}

impl Request {
    /// [`Message::decode`] for the plain encoding ([`PlainReader`]; `query` and `headers` as
    /// arrays of two-text arrays), faster; `None` for anything else, which the caller then
    /// decodes with [`Message::decode`]. Whatever this accepts, `Message::decode` accepts with
    /// the same value.
    pub fn decode_plain(bytes: &[u8]) -> Option<Self> {
        let mut r = PlainReader::new(bytes);
        let (mut v, mut aud, mut upstream, mut method, mut path) = (None, None, None, None, None);
        let (mut query, mut headers, mut body_len, mut body_b3) = (None, None, None, None);
        let (mut nonce, mut time_ms, mut head) = (None, None, None);
        for _ in 0..r.head(5)? {
            match r.text()? {
                "v" => once(&mut v, r.uint())?,
                "aud" => once(&mut aud, r.string())?,
                "upstream" => once(&mut upstream, r.string())?,
                "method" => once(&mut method, r.string())?,
                "path" => once(&mut path, r.string())?,
                "query" => once(&mut query, r.pairs())?,
                "headers" => once(&mut headers, r.pairs())?,
                "body_len" => once(&mut body_len, r.uint())?,
                "body_b3" => once(&mut body_b3, r.fixed())?,
                "nonce" => once(&mut nonce, r.fixed())?,
                "time_ms" => once(&mut time_ms, r.uint())?,
                "head" => once(&mut head, ChainHead::read_plain(&mut r))?,
                _ => return None,
            }
        }
        if !r.at_end() || v.and_then(Version::from_u64).is_none() {
            return None;
        }
        Some(Self {
            v: v?,
            aud: aud?,
            upstream: upstream?,
            method: method?,
            path: path?,
            query: query?,
            headers: headers?,
            body_len: body_len?,
            body_b3: body_b3?,
            nonce: nonce?,
            time_ms: time_ms?,
            head: head?,
        })
    }
}

impl Receipt {
    /// [`Message::decode`] for the plain encoding ([`PlainReader`]), faster; `None` for
    /// anything else, which the caller then decodes with [`Message::decode`]. Whatever this
    /// accepts, `Message::decode` accepts with the same value.
    pub fn decode_plain(bytes: &[u8]) -> Option<Self> {
        let mut r = PlainReader::new(bytes);
        let (mut v, mut call, mut grant, mut client, mut status) = (None, None, None, None, None);
        let (mut resp_len, mut resp_b3, mut entry, mut root, mut time_ms) =
            (None, None, None, None, None);
        let mut node_cert = None;
        for _ in 0..r.head(5)? {
            match r.text()? {
                "v" => once(&mut v, r.uint())?,
                "call" => once(&mut call, r.fixed())?,
                "grant" => once(&mut grant, r.fixed())?,
                "client" => once(&mut client, r.string())?,
                "status" => once(&mut status, r.uint().and_then(|s| u16::try_from(s).ok()))?,
                "resp_len" => once(&mut resp_len, r.uint())?,
                "resp_b3" => once(&mut resp_b3, r.fixed())?,
                "entry" => once(&mut entry, EntryRef::read_plain(&mut r))?,
                "root" => once(&mut root, r.opt(PlainReader::fixed))?,
                "time_ms" => once(&mut time_ms, r.uint())?,
                "node_cert" => once(&mut node_cert, r.bytes().map(<[u8]>::to_vec))?,
                _ => return None,
            }
        }
        let v = v?;
        if !r.at_end() || Version::from_u64(v).is_none() {
            return None;
        }
        if v == Version::V1.as_u64() && node_cert.is_some() {
            return None;
        }
        Some(Self {
            v,
            call: call?,
            grant: grant?,
            client: client?,
            status: status?,
            resp_len: resp_len?,
            resp_b3: resp_b3?,
            entry: entry?,
            root: root.flatten(),
            time_ms: time_ms?,
            node_cert,
        })
    }
}

/// Why a signed message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The envelope failed.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    /// The payload failed to decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// Signed by someone other than the expected DID.
    #[error("signed by {got}, expected {expected}")]
    Signer {
        /// Who signed.
        got: Box<Did>,
        /// Who should have.
        expected: Box<Did>,
    },
}

/// A signed message whose signature verified and whose payload decoded: made only by
/// [`open`] and its variants, so its fields are read through accessors and never replaced.
#[derive(Debug, Clone)]
pub struct Signed<T> {
    envelope: Verified,
    message: T,
    bytes: Vec<u8>,
}

impl<T> Signed<T> {
    /// The envelope facts (signer, digest).
    pub fn envelope(&self) -> &Verified {
        &self.envelope
    }

    /// The decoded message.
    pub fn message(&self) -> &T {
        &self.message
    }

    /// The exact bytes received.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The decoded message, dropping the rest.
    pub fn into_message(self) -> T {
        self.message
    }

    /// The envelope facts, the decoded message and the exact bytes received.
    pub fn into_parts(self) -> (Verified, T, Vec<u8>) {
        (self.envelope, self.message, self.bytes)
    }
}

/// Verifies `bytes` as a signed `T` and decodes it.
pub fn open<T: SignedMessage>(bytes: &[u8]) -> Result<Signed<T>, OpenError> {
    open_with(bytes, |_, _| None)
}

/// Like [`open`], and also accepts a did:web signer (see [`envelope::verify_with`]).
pub fn open_with<T: SignedMessage>(
    bytes: &[u8],
    web_key: impl FnOnce(&crate::WebDid, &str) -> Option<Did>,
) -> Result<Signed<T>, OpenError> {
    open_full(bytes, None, web_key)
}

/// [`open_with`] with the likely signer's decoded key ([`envelope::verify_full`]).
pub fn open_full<T: SignedMessage>(
    bytes: &[u8],
    likely: Option<&Did>,
    web_key: impl FnOnce(&crate::WebDid, &str) -> Option<Did>,
) -> Result<Signed<T>, OpenError> {
    let envelope = envelope::verify_full(bytes, T::KIND, likely, web_key)?;
    let message = T::decode(envelope.payload())?;
    Ok(Signed {
        envelope,
        message,
        bytes: bytes.to_vec(),
    })
}

/// Like [`open`], using the already decoded key of the DID that most likely signed
/// ([`envelope::verify_likely_from`]); same result as [`open`] for every input.
pub fn open_likely_from<T: SignedMessage>(
    bytes: &[u8],
    likely: &Did,
) -> Result<Signed<T>, OpenError> {
    let envelope = envelope::verify_likely_from(bytes, T::KIND, likely)?;
    let message = T::decode(envelope.payload())?;
    Ok(Signed {
        envelope,
        message,
        bytes: bytes.to_vec(),
    })
}

/// Like [`open`], and also requires the signer to be `expected`.
pub fn open_from<T: SignedMessage>(bytes: &[u8], expected: &Did) -> Result<Signed<T>, OpenError> {
    let signed = open_likely_from::<T>(bytes, expected)?;
    if signed.envelope.signer() != expected {
        return Err(OpenError::Signer {
            got: Box::new(signed.envelope.signer().clone()),
            expected: Box::new(expected.clone()),
        });
    }
    Ok(signed)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample_request() -> Request {
        Request {
            v: 1,
            aud: Identity::from_seed(&[9; 32]).did().to_string(),
            upstream: "payments".into(),
            method: "POST".into(),
            path: "/v1/charges".into(),
            query: vec![("expand".into(), "customer".into())],
            headers: vec![("content-type".into(), "application/json".into())],
            body_len: 2,
            body_b3: *blake3::hash(b"{}").as_bytes(),
            nonce: [7; 16],
            time_ms: 1_700_000_000_000,
            head: ChainHead {
                chain: [1; 32],
                seq: 0,
                hash: [1; 32],
            },
        }
    }

    #[test]
    fn request_round_trip_signed() {
        let id = Identity::from_seed(&[1; 32]);
        let req = sample_request();
        let bytes = req.sign(&id);
        let signed = open::<Request>(&bytes).expect("opens");
        assert_eq!(signed.message, req);
        assert_eq!(signed.envelope.signer(), id.did());
        assert!(open_from::<Request>(&bytes, Identity::from_seed(&[2; 32]).did()).is_err());
    }

    #[test]
    fn every_message_round_trips() {
        let receipt = Receipt {
            v: 1,
            call: [2; 32],
            grant: [3; 16],
            client: "did:key:z".into(),
            status: 200,
            resp_len: 5,
            resp_b3: [4; 32],
            entry: EntryRef {
                seq: 9,
                hash: [5; 32],
            },
            root: None,
            time_ms: 1,
            node_cert: None,
        };
        assert_eq!(Receipt::decode(&receipt.encode()), Ok(receipt));
        let refusal = Refusal {
            v: 1,
            call: Some([1; 32]),
            code: RefusalCode::Policy,
            reason: "no rule".into(),
            time_ms: 3,
            entry: None,
            node_cert: None,
            home: None,
        };
        assert_eq!(Refusal::decode(&refusal.encode()), Ok(refusal));
        let head = ResponseHead {
            v: 1,
            status: 201,
            headers: vec![("a".into(), "b".into())],
        };
        assert_eq!(ResponseHead::decode(&head.encode()), Ok(head));
        let grant = GrantBody {
            v: 1,
            id: [1; 16],
            call: [2; 32],
            subject: "did".into(),
            upstream: "u".into(),
            method: "GET".into(),
            path: "/".into(),
            expires_ms: 5,
            node_cert: None,
        };
        assert_eq!(GrantBody::decode(&grant.encode()), Ok(grant));
    }

    #[test]
    fn strict_decoding() {
        let mut req = sample_request();
        let mut bytes = req.encode();
        bytes.push(0);
        assert_eq!(Request::decode(&bytes), Err(DecodeError::Trailing(1)));
        req.v = 2;
        assert_eq!(Request::decode(&req.encode()), Ok(req.clone()));
        assert_eq!(
            Request::decode_v(&req.encode(), Version::V1),
            Err(DecodeError::Version(2))
        );
        req.v = 3;
        assert_eq!(Request::decode(&req.encode()), Err(DecodeError::Version(3)));
        req.v = 0;
        assert_eq!(Request::decode(&req.encode()), Err(DecodeError::Version(0)));
        // an unknown field
        let mut map: ciborium::Value =
            ciborium::from_reader(sample_request().encode().as_slice()).expect("cbor");
        if let ciborium::Value::Map(m) = &mut map {
            m.push((
                ciborium::Value::Text("extra".into()),
                ciborium::Value::Integer(1.into()),
            ));
        }
        let bytes = cbor::to_vec(&map);
        assert!(matches!(
            Request::decode(&bytes),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn a_moved_refusal_names_the_home_node_and_no_other_refusal_does() {
        let home = Home {
            node: "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK".into(),
            addr: "192.0.2.7:4433".into(),
        };
        let moved = Refusal {
            v: 2,
            call: None,
            code: RefusalCode::Moved,
            reason: "r".into(),
            time_ms: 1,
            entry: None,
            node_cert: None,
            home: Some(home.clone()),
        };
        assert_eq!(Refusal::decode(&moved.encode()), Ok(moved.clone()));
        let mut bad = moved.clone();
        bad.home = None;
        assert_eq!(
            Refusal::decode(&bad.encode()),
            Err(DecodeError::Field("home"))
        );
        let mut bad = moved.clone();
        bad.code = RefusalCode::Policy;
        assert_eq!(
            Refusal::decode(&bad.encode()),
            Err(DecodeError::Field("home"))
        );
        // version 1 has neither the code nor the field
        let mut bad = moved.clone();
        bad.v = 1;
        assert_eq!(
            Refusal::decode(&bad.encode()),
            Err(DecodeError::Field("code"))
        );
        assert_eq!(RefusalCode::Moved.for_version(1), RefusalCode::ShuttingDown);
        assert_eq!(
            RefusalCode::Handover.for_version(1),
            RefusalCode::ShuttingDown
        );
        assert_eq!(RefusalCode::parse("moved"), Some(RefusalCode::Moved));
        assert_eq!(RefusalCode::parse("handover"), Some(RefusalCode::Handover));
    }

    #[test]
    fn unknown_refusal_codes_keep_their_text() {
        let gateway = Identity::from_seed(&[3; 32]);
        let mut raw: ciborium::Value = ciborium::from_reader(
            Refusal {
                v: 2,
                call: None,
                code: RefusalCode::Policy,
                reason: "r".into(),
                time_ms: 1,
                entry: None,
                node_cert: None,
                home: None,
            }
            .encode()
            .as_slice(),
        )
        .expect("cbor");
        let set_code = |raw: &mut ciborium::Value, code: &str| {
            if let ciborium::Value::Map(m) = raw {
                for (k, v) in m.iter_mut() {
                    if k.as_text() == Some("code") {
                        *v = ciborium::Value::Text(code.into());
                    }
                }
            }
            cbor::to_vec(raw)
        };
        let bytes = envelope::sign(
            &gateway,
            Kind::Refusal,
            set_code(&mut raw, "budget_exceeded"),
        );
        let opened = open_from::<Refusal>(&bytes, gateway.did()).expect("opens");
        assert_eq!(opened.message.code.as_str(), "budget_exceeded");
        assert!(!opened.message.code.is_known());
        // version 1 is frozen: its refusals name its own codes only
        if let ciborium::Value::Map(m) = &mut raw {
            for (k, v) in m.iter_mut() {
                if k.as_text() == Some("v") {
                    *v = ciborium::Value::Integer(1.into());
                }
            }
        }
        assert_eq!(
            Refusal::decode(&set_code(&mut raw, "budget_exceeded")),
            Err(DecodeError::Field("code"))
        );
        assert!(Refusal::decode(&set_code(&mut raw, "policy")).is_ok());
        // a code version 2 added (amendment 2.6) is not one of version 1's
        assert_eq!(
            Refusal::decode(&set_code(&mut raw, "kms_unavailable")),
            Err(DecodeError::Field("code"))
        );
        assert_eq!(
            RefusalCode::parse("kms_unavailable"),
            Some(RefusalCode::KmsUnavailable)
        );
        assert!(RefusalCode::KmsUnavailable.in_version(2));
        assert!(!RefusalCode::KmsUnavailable.in_version(1));
        assert_eq!(
            RefusalCode::KmsUnavailable.for_version(1),
            RefusalCode::SecretUnavailable
        );
        assert_eq!(
            RefusalCode::KmsUnavailable.for_version(2),
            RefusalCode::KmsUnavailable
        );
        for code in RefusalCode::V1 {
            assert_eq!(code.for_version(1), code);
        }
        assert_eq!(
            RefusalCode::parse("budget_exceeded"),
            Some(opened.message.code)
        );
        for bad in ["", "Policy", "9lives", "with space", &"x".repeat(33)] {
            assert!(
                Refusal::decode(&set_code(&mut raw, bad)).is_err(),
                "{bad:?} is not a code"
            );
        }
        for code in RefusalCode::V1 {
            assert!(code.is_known());
            assert_eq!(RefusalCode::parse(code.as_str()), Some(code));
        }
    }

    /// The fast request and receipt decoders give `Message::decode`'s value on what the signer
    /// encodes, and whenever they accept altered bytes, `Message::decode` agrees.
    #[test]
    fn fast_payload_decoders_agree_with_message_decode() {
        const VERSION: u64 = Version::CURRENT.as_u64();
        let mut rng = crate::test_util::Rng(0x1234_5678_9abc_def1);
        let mut accepted_altered = 0;
        for n in 0..1500u64 {
            let req = Request {
                v: VERSION,
                aud: rng.text(),
                upstream: rng.text(),
                method: rng.text(),
                path: rng.text(),
                query: (0..rng.below(4))
                    .map(|_| (rng.text(), rng.text()))
                    .collect(),
                headers: (0..rng.below(3))
                    .map(|_| (rng.text(), rng.text()))
                    .collect(),
                body_len: rng.int(),
                body_b3: rng.digest(),
                nonce: [rng.next() as u8; 16],
                time_ms: rng.int(),
                head: ChainHead {
                    chain: rng.digest(),
                    seq: rng.int(),
                    hash: rng.digest(),
                },
            };
            let receipt = Receipt {
                v: VERSION,
                call: rng.digest(),
                grant: [rng.next() as u8; 16],
                client: rng.text(),
                status: rng.int() as u16,
                resp_len: rng.int(),
                resp_b3: rng.digest(),
                entry: EntryRef {
                    seq: rng.int(),
                    hash: rng.digest(),
                },
                root: (n % 2 == 0).then(|| rng.digest()),
                time_ms: rng.int(),
                node_cert: None,
            };
            let (rb, cb) = (req.encode(), receipt.encode());
            assert_eq!(Request::decode_plain(&rb), Some(req));
            assert_eq!(Receipt::decode_plain(&cb), Some(receipt));
            for bytes in [rb, cb] {
                for _ in 0..15 {
                    let mut altered = bytes.clone();
                    let i = rng.below(altered.len() as u64) as usize;
                    match rng.below(3) {
                        0 => altered[i] ^= 1 << rng.below(8),
                        1 => altered[i] = rng.next() as u8,
                        _ => altered.truncate(i),
                    }
                    accepted_altered += plain_decoders_agree(&altered);
                }
            }
        }
        assert!(accepted_altered > 100, "{accepted_altered}");
    }

    /// Whenever a plain decoder accepts `bytes`, `Message::decode` gives the same value; the
    /// number of plain decoders that accepted them.
    fn plain_decoders_agree(bytes: &[u8]) -> usize {
        let mut accepted = 0;
        if let Some(fast) = Request::decode_plain(bytes) {
            accepted += 1;
            assert_eq!(Request::decode(bytes), Ok(fast));
        }
        if let Some(fast) = Receipt::decode_plain(bytes) {
            accepted += 1;
            assert_eq!(Receipt::decode(bytes), Ok(fast));
        }
        accepted
    }

    /// On the payloads of the spec's vectors' signed messages and the committed fuzz corpus, the
    /// plain decoders agree with `Message::decode` whenever they accept one, and they accept
    /// every request and receipt of the vectors.
    #[test]
    fn plain_decoders_agree_on_the_vectors_and_the_fuzz_corpus() {
        let (mut requests_and_receipts, mut accepted) = (0, 0);
        for bytes in crate::test_util::vector_signed_messages() {
            let p = envelope::parse_plain(&bytes).expect("the plain layout");
            if matches!(p.kind, Kind::Request | Kind::Receipt) {
                requests_and_receipts += 1;
            }
            accepted += plain_decoders_agree(p.payload);
        }
        assert_eq!(accepted, requests_and_receipts);
        assert!(accepted > 100, "{accepted}");
        let corpus = crate::test_util::fuzz_corpus("messages");
        let accepted: usize = corpus.iter().map(|p| plain_decoders_agree(p)).sum();
        assert!(accepted > 0, "{accepted} of {}", corpus.len());
    }

    proptest::proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = Request::decode(&bytes);
            let _ = Receipt::decode(&bytes);
            let _ = Refusal::decode(&bytes);
            let _ = ResponseHead::decode(&bytes);
            let _ = open::<Request>(&bytes);
        }
    }
}

//! Evidence bundles (specs/audit-log.md, "Evidence bundles"): a self-contained file showing
//! that one call was signed by a client and executed by a gateway, checkable by someone who
//! holds neither party's database.
//!
//! A [`Bundle`] holds the client's signed request (whose signed digest is the call ID), the
//! gateway's signed receipt for it, the gateway's closing (`executed`) entry that the receipt
//! names, and the inclusion proof of that entry's leaf under the Merkle root the receipt signs
//! (the gateway's root at `receipt.entry.seq + 1` entries). [`build`] assembles one from a
//! client chain and the gateway chain (records or a [`Store`]); [`check`] verifies one with
//! nothing else and returns a [`Verdict`], or the [`EvidenceError`] naming the check that
//! failed. A receipt signed by a node of the gateway carries the node's certificate
//! (amendment 2.7), so the bundle still needs nothing else; [`check_with`] also applies the
//! gateway's node revocation lists, when the checker has them.
//!
//! ```no_run
//! # fn demo(client: &didgate_audit::ChainRecords, gateway: &didgate_audit::ChainRecords,
//! #         call: [u8; 32]) -> Result<(), didgate_audit::evidence::EvidenceError> {
//! use didgate_audit::evidence;
//! let bytes = evidence::build(client, gateway, call)?.encode();
//! let verdict = evidence::check(&bytes)?;
//! println!("{} called {} {} through {}", verdict.client, verdict.method, verdict.path,
//!     verdict.gateway);
//! # Ok(()) }
//! ```

use didgate_protocol::cbor::{self, DecodeError};
use didgate_protocol::message::{self, Digest, OpenError, Receipt, Request, Signed};
use didgate_protocol::node::NodeCertError;
use serde::{Deserialize, Serialize};

use crate::entry::{Entry, EntryKind, Outcome, entry_hash};
use crate::merkle::{self, Hash};
use crate::nodes::{Revocations, SignerRule};
use crate::receipt::Fault;
use crate::store::{Store, StoreError};
use crate::verify::ChainRecords;

/// The format tag: the value of the bundle's `t` field.
pub const FORMAT: &str = "didgate-evidence";

/// The only bundle version this implementation reads and writes.
pub const VERSION: u64 = 1;

/// Longest bundle [`check`] accepts, in bytes (two envelopes of at most 60 KiB each, one
/// entry and a proof fit well within it).
pub const MAX_BUNDLE: usize = 1 << 20;

/// Evidence for one call. Encoded ([`Bundle::encode`]) as a CBOR map with text keys:
/// `t` (tstr, [`FORMAT`]), `v` (uint), `request`, `receipt`, `entry` (bstr), `proof` (array
/// of bstr(32)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// Bundle version, [`VERSION`].
    pub v: u64,
    /// The client's signed request (COSE_Sign1 bytes, kind request), byte for byte.
    pub request: Vec<u8>,
    /// The gateway's signed receipt for the call (COSE_Sign1 bytes, kind receipt).
    pub receipt: Vec<u8>,
    /// The gateway's closing (`executed`) entry, its stored bytes at `receipt.entry.seq`.
    pub entry: Vec<u8>,
    /// The inclusion proof (RFC 9162 PATH, leaf side first) of that entry's leaf at index
    /// `receipt.entry.seq` in the gateway's tree of `receipt.entry.seq + 1` entries.
    pub proof: Vec<Hash>,
}

/// The wire form: the bundle and its format tag, in encoding order.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    t: String,
    v: u64,
    #[serde(with = "strict_bytes")]
    request: Vec<u8>,
    #[serde(with = "strict_bytes")]
    receipt: Vec<u8>,
    #[serde(with = "strict_bytes")]
    entry: Vec<u8>,
    proof: Vec<Node>,
}

/// One proof hash: a byte string of exactly 32 bytes.
#[derive(Serialize, Deserialize)]
#[serde(transparent)]
struct Node(#[serde(with = "strict_hash")] Hash);

impl Bundle {
    /// Encodes the bundle (see [`Bundle`] for the map).
    pub fn encode(&self) -> Vec<u8> {
        cbor::to_vec(&Wire {
            t: FORMAT.to_string(),
            v: self.v,
            request: self.request.clone(),
            receipt: self.receipt.clone(),
            entry: self.entry.clone(),
            proof: self.proof.iter().copied().map(Node).collect(),
        })
    }

    /// Decodes a bundle strictly: at most [`MAX_BUNDLE`] bytes, exactly one CBOR map with
    /// exactly the six fields (no unknown or duplicate ones) of the right types, no trailing
    /// bytes, `t` == [`FORMAT`] and `v` == [`VERSION`]. Nothing is verified yet: see
    /// [`Bundle::check`].
    pub fn decode(bytes: &[u8]) -> Result<Self, EvidenceError> {
        if bytes.len() > MAX_BUNDLE {
            return Err(EvidenceError::TooLarge(bytes.len()));
        }
        let w: Wire = cbor::from_slice(bytes).map_err(EvidenceError::Malformed)?;
        if w.t != FORMAT {
            return Err(EvidenceError::NotEvidence(w.t));
        }
        if w.v != VERSION {
            return Err(EvidenceError::Version(w.v));
        }
        Ok(Self {
            v: w.v,
            request: w.request,
            receipt: w.receipt,
            entry: w.entry,
            proof: w.proof.into_iter().map(|n| n.0).collect(),
        })
    }

    /// Verifies the bundle with nothing else (the checks of [`check`], after decoding).
    pub fn check(&self) -> Result<Verdict, EvidenceError> {
        self.check_with(&Revocations::new())
    }

    /// [`Bundle::check`], a node-signed receipt's certificate also judged against the
    /// revocation list `revocations` holds for the request's gateway, if any.
    pub fn check_with(&self, revocations: &Revocations) -> Result<Verdict, EvidenceError> {
        if self.v != VERSION {
            return Err(EvidenceError::Version(self.v));
        }
        // 1. The request: signature, then its call ID.
        let request = message::open::<Request>(&self.request).map_err(EvidenceError::Request)?;
        let call = request.envelope().digest();
        // 2. The receipt: signature, and that it answers this request from this client,
        //    signed by the gateway the request was addressed to or by a node it certified.
        let receipt = message::open::<Receipt>(&self.receipt).map_err(EvidenceError::Receipt)?;
        let node = answered(&request, &receipt, &SignerRule::new(revocations))?;
        let r = receipt.message();
        // 3. The closing entry: the one the receipt names, closing this call as signed.
        if entry_hash(&self.entry) != r.entry.hash {
            return Err(EvidenceError::EntryHash);
        }
        let entry = Entry::decode(&self.entry).map_err(EvidenceError::EntryMalformed)?;
        crate::receipt::closed_by(r, r.entry.seq, &entry).map_err(|f| match f {
            Fault::NotExecuted(kind) => EvidenceError::EntryKind(kind),
            Fault::Seq => EvidenceError::EntrySeq {
                entry: entry.seq,
                receipt: r.entry.seq,
            },
            Fault::EntryCall => EvidenceError::EntryCall,
            Fault::Outcome(field) => EvidenceError::EntryOutcome(field),
            _ => EvidenceError::EntryCall,
        })?;
        // 4. The inclusion proof under the root the receipt signs.
        let root = r.root.ok_or(EvidenceError::NoRoot)?;
        let seq = r.entry.seq;
        let size = seq.checked_add(1).ok_or(EvidenceError::Inclusion)?;
        let expected = path_len(seq, size);
        if self.proof.len() != expected {
            return Err(EvidenceError::ProofLength {
                expected,
                got: self.proof.len(),
            });
        }
        let leaf = merkle::leaf_hash(&r.entry.hash);
        if !merkle::verify_inclusion(&leaf, seq, size, &self.proof, &root) {
            return Err(EvidenceError::Inclusion);
        }
        let q = request.message();
        Ok(Verdict {
            client: request.envelope().signer().to_string(),
            gateway: q.aud.clone(),
            node,
            call,
            upstream: q.upstream.clone(),
            method: q.method.clone(),
            path: q.path.clone(),
            request_time_ms: q.time_ms,
            status: r.status,
            resp_len: r.resp_len,
            resp_b3: r.resp_b3,
            seq,
            root,
            receipt_time_ms: r.time_ms,
        })
    }
}

/// Steps 4 to 6: the receipt answers the request's call, names its signer, and is signed by
/// the gateway the request's `aud` names or by a node that gateway certified
/// ([`crate::receipt::answers`]). Returns the node's DID when a node signed.
fn answered(
    request: &Signed<Request>,
    receipt: &Signed<Receipt>,
    rule: &SignerRule<'_>,
) -> Result<Option<String>, EvidenceError> {
    let (r, aud) = (receipt.message(), &request.message().aud);
    let signer = request.envelope().signer();
    let signed_by = receipt.envelope().signer();
    let cert = crate::receipt::answers(
        r,
        signed_by,
        &request.envelope().digest(),
        signer,
        aud,
        rule,
    )
    .map_err(|f| match f {
        Fault::Call => EvidenceError::CallMismatch {
            request: request.envelope().digest(),
            receipt: r.call,
        },
        Fault::Client => EvidenceError::ClientMismatch {
            receipt: r.client.clone(),
            signer: signer.to_string(),
        },
        Fault::NodeCertificate(e) => EvidenceError::NodeCertificate(e),
        _ => EvidenceError::AudienceMismatch {
            aud: aud.clone(),
            gateway: signed_by.to_string(),
        },
    })?;
    Ok(cert.map(|_| signed_by.to_string()))
}

/// What a valid bundle shows: `client` signed a request for `method upstream path` addressed
/// to `gateway`, and `gateway` signed that it executed it (status, response digest) and that
/// its chain holds the closing entry at `seq` under `root` (at `seq + 1` entries).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// The client DID (the request's signer).
    pub client: String,
    /// The gateway DID (the request's audience: the receipt's signer, or the gateway that
    /// certified the node that signed it).
    pub gateway: String,
    /// The node's DID (the receipt's signer) when a node of the gateway signed the receipt,
    /// under a certificate the gateway signed (absent from JSON otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The call ID (the request's signed digest).
    #[serde(serialize_with = "hex_digest")]
    pub call: Digest,
    /// The upstream named by the request.
    pub upstream: String,
    /// The HTTP method of the request.
    pub method: String,
    /// The path of the request.
    pub path: String,
    /// The client's clock in the request, ms since the Unix epoch.
    pub request_time_ms: u64,
    /// The upstream status, as signed in the receipt and recorded in the entry.
    pub status: u16,
    /// The response body length relayed.
    pub resp_len: u64,
    /// BLAKE3 of the response body relayed.
    #[serde(serialize_with = "hex_digest")]
    pub resp_b3: Digest,
    /// The seq of the gateway's closing entry.
    pub seq: u64,
    /// The gateway's Merkle root at `seq + 1` entries, as signed in the receipt.
    #[serde(serialize_with = "hex_digest")]
    pub root: Digest,
    /// The gateway's clock in the receipt, ms since the Unix epoch.
    pub receipt_time_ms: u64,
}

fn hex_digest<S: serde::Serializer>(d: &Digest, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(d))
}

/// Why a bundle could not be built, or which check it failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EvidenceError {
    /// Decoding: the bundle exceeds [`MAX_BUNDLE`].
    #[error("bundle of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// Decoding: not a CBOR map of the bundle's fields and types, or trailing bytes.
    #[error("not an evidence bundle: {0}")]
    Malformed(#[source] DecodeError),
    /// Decoding: the format tag `t` is not [`FORMAT`].
    #[error("not an evidence bundle: format tag {0:?}")]
    NotEvidence(String),
    /// Decoding: a bundle version this implementation does not read.
    #[error("unsupported bundle version {0}")]
    Version(u64),
    /// The request does not open: bad envelope, signature, or payload.
    #[error("request: {0}")]
    Request(#[source] OpenError),
    /// The receipt does not open: bad envelope, signature, or payload.
    #[error("receipt: {0}")]
    Receipt(#[source] OpenError),
    /// The receipt answers another call than the request's.
    #[error("the receipt answers call {}, the request's call ID is {}",
        hex::encode(.receipt), hex::encode(.request))]
    CallMismatch {
        /// The request's call ID.
        request: Digest,
        /// The receipt's `call`.
        receipt: Digest,
    },
    /// The receipt names another client than the request's signer.
    #[error("the receipt names client {receipt}, the request is signed by {signer}")]
    ClientMismatch {
        /// The receipt's `client`.
        receipt: String,
        /// The request's signer.
        signer: String,
    },
    /// The request is addressed to another gateway than the receipt's signer, and the
    /// receipt carries no node certificate.
    #[error("the request is addressed to {aud}, the receipt is signed by {gateway}")]
    AudienceMismatch {
        /// The request's `aud`.
        aud: String,
        /// The receipt's signer.
        gateway: String,
    },
    /// The receipt carries a node certificate that does not make its signer a node of the
    /// gateway the request addressed at the receipt's time (signed by another key, altered,
    /// for another key, naming another gateway, not valid then, or revoked then).
    #[error("the receipt's node certificate does not hold: {0}")]
    NodeCertificate(#[source] NodeCertError),
    /// The entry's hash is not the one the receipt names.
    #[error("the entry's hash differs from the receipt's entry hash")]
    EntryHash,
    /// The entry does not decode.
    #[error("the entry does not decode: {0}")]
    EntryMalformed(#[source] DecodeError),
    /// The entry is not an `executed` entry.
    #[error("the entry is of kind {0:?}, not executed")]
    EntryKind(EntryKind),
    /// The entry's seq is not the one the receipt names.
    #[error("the entry's seq is {entry}, the receipt names seq {receipt}")]
    EntrySeq {
        /// The entry's `seq`.
        entry: u64,
        /// The receipt's `entry.seq`.
        receipt: u64,
    },
    /// The entry closes another call (or none).
    #[error("the entry does not close the request's call")]
    EntryCall,
    /// The entry's `status`, `resp_len` or `resp_b3` (named) differs from the receipt's.
    #[error("the entry's {0} differs from the receipt's")]
    EntryOutcome(&'static str),
    /// The receipt signs no Merkle root (a receipt from before roots).
    #[error("the receipt signs no Merkle root")]
    NoRoot,
    /// The proof has the wrong number of hashes for the entry's index and tree size.
    #[error("the proof has {got} hashes, the tree needs {expected}")]
    ProofLength {
        /// The number of hashes the path has.
        expected: usize,
        /// The number in the bundle.
        got: usize,
    },
    /// The proof does not lead from the entry's leaf to the receipt's root.
    #[error("the inclusion proof does not verify under the receipt's root")]
    Inclusion,
    /// Building: the client chain holds no request entry for the call.
    #[error("the client chain holds no request for call {}", hex::encode(.0))]
    NoRequest(Digest),
    /// Building: the client chain holds no result entry with a receipt for the call (the call
    /// was refused, its outcome is unknown, or it is unanswered).
    #[error("the client chain holds no receipt for call {}", hex::encode(.0))]
    NoReceipt(Digest),
    /// Building: the gateway chain lacks this entry (or an earlier one the proof needs).
    #[error("the gateway chain has no entry {0}")]
    GatewayEntryMissing(u64),
    /// Building: the gateway store cannot produce the inclusion proof for this entry.
    #[error("the gateway store cannot prove entry {0}")]
    ProofUnavailable(u64),
    /// Building: the gateway store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl EvidenceError {
    /// Whether the bytes are not a bundle this implementation reads (too large, malformed,
    /// another format or version), as opposed to a bundle that fails a check.
    pub fn is_undecodable(&self) -> bool {
        matches!(
            self,
            Self::TooLarge(_) | Self::Malformed(_) | Self::NotEvidence(_) | Self::Version(_)
        )
    }

    /// A short snake_case name of the error (for JSON output and reports).
    pub fn name(&self) -> &'static str {
        match self {
            Self::TooLarge(_) => "too_large",
            Self::Malformed(_) => "malformed",
            Self::NotEvidence(_) => "not_evidence",
            Self::Version(_) => "version",
            Self::Request(_) => "request",
            Self::Receipt(_) => "receipt",
            Self::CallMismatch { .. } => "call_mismatch",
            Self::ClientMismatch { .. } => "client_mismatch",
            Self::AudienceMismatch { .. } => "audience_mismatch",
            Self::NodeCertificate(_) => "node_certificate",
            Self::EntryHash => "entry_hash",
            Self::EntryMalformed(_) => "entry_malformed",
            Self::EntryKind(_) => "entry_kind",
            Self::EntrySeq { .. } => "entry_seq",
            Self::EntryCall => "entry_call",
            Self::EntryOutcome(_) => "entry_outcome",
            Self::NoRoot => "no_root",
            Self::ProofLength { .. } => "proof_length",
            Self::Inclusion => "inclusion",
            Self::NoRequest(_) => "no_request",
            Self::NoReceipt(_) => "no_receipt",
            Self::GatewayEntryMissing(_) => "gateway_entry_missing",
            Self::ProofUnavailable(_) => "proof_unavailable",
            Self::Store(_) => "store",
        }
    }
}

/// Verifies `bytes` as an evidence bundle with nothing else: decodes it strictly
/// ([`Bundle::decode`]) and checks it ([`Bundle::check`]).
pub fn check(bytes: &[u8]) -> Result<Verdict, EvidenceError> {
    Bundle::decode(bytes)?.check()
}

/// [`check`] with the node revocation lists the checker holds ([`Bundle::check_with`]).
pub fn check_with(bytes: &[u8], revocations: &Revocations) -> Result<Verdict, EvidenceError> {
    Bundle::decode(bytes)?.check_with(revocations)
}

/// Builds the bundle for `call` from a client chain and the gateway chain's records (an export
/// or a store, see [`crate::load_records`]). The proof is computed from the gateway's entries
/// `0..=receipt.entry.seq`, which must all be present. The bundle is checked before it is
/// returned, so a chain that does not back the receipt gives the failing check's error.
pub fn build(
    client: &ChainRecords,
    gateway: &ChainRecords,
    call: Digest,
) -> Result<Bundle, EvidenceError> {
    assemble(client, call, |seq| {
        let n = usize::try_from(seq)
            .ok()
            .and_then(|s| s.checked_add(1))
            .ok_or(EvidenceError::GatewayEntryMissing(seq))?;
        let mut leaves = Vec::with_capacity(n.min(gateway.entries.len()));
        for (i, (key, bytes)) in (0u64..).zip(gateway.entries.iter().take(n)) {
            if *key != i {
                return Err(EvidenceError::GatewayEntryMissing(i));
            }
            leaves.push(merkle::leaf_hash(&entry_hash(bytes)));
        }
        if leaves.len() < n {
            return Err(EvidenceError::GatewayEntryMissing(leaves.len() as u64));
        }
        let entry = gateway
            .entries
            .get(n - 1)
            .map(|(_, b)| b.clone())
            .ok_or(EvidenceError::GatewayEntryMissing(seq))?;
        let proof = merkle::inclusion_proof(leaves.as_slice(), seq, seq.saturating_add(1))
            .ok_or(EvidenceError::ProofUnavailable(seq))?;
        Ok((entry, proof))
    })
}

/// Like [`build`], reading the closing entry and the proof (O(log n) lookups) from the
/// gateway's store, which its process must not hold open.
pub fn build_from_store(
    client: &ChainRecords,
    gateway: &Store,
    call: Digest,
) -> Result<Bundle, EvidenceError> {
    assemble(client, call, |seq| {
        let entry = gateway
            .entry_bytes(seq)?
            .ok_or(EvidenceError::GatewayEntryMissing(seq))?;
        let size = seq
            .checked_add(1)
            .ok_or(EvidenceError::ProofUnavailable(seq))?;
        let proof = gateway
            .inclusion_proof(seq, size)
            .ok_or(EvidenceError::ProofUnavailable(seq))?;
        Ok((entry, proof))
    })
}

/// Finds the call's request and receipt in the client chain, gets the gateway's closing entry
/// and proof from `gateway(seq)`, and checks the result.
fn assemble(
    client: &ChainRecords,
    call: Digest,
    gateway: impl FnOnce(u64) -> Result<(Vec<u8>, Vec<Hash>), EvidenceError>,
) -> Result<Bundle, EvidenceError> {
    let mut request = None;
    let mut receipt = None;
    for (_, bytes) in &client.entries {
        let Ok(e) = Entry::decode(bytes) else {
            continue;
        };
        if e.call != Some(call) {
            continue;
        }
        match (e.kind, e.outcome) {
            (EntryKind::Request, _) if request.is_none() => request = e.signed,
            (EntryKind::Result, Some(Outcome::Receipt)) if receipt.is_none() => {
                receipt = e.signed;
            }
            _ => {}
        }
    }
    let request = request.ok_or(EvidenceError::NoRequest(call))?;
    let receipt = receipt.ok_or(EvidenceError::NoReceipt(call))?;
    let seq = message::open::<Receipt>(&receipt)
        .map_err(EvidenceError::Receipt)?
        .message()
        .entry
        .seq;
    let (entry, proof) = gateway(seq)?;
    let bundle = Bundle {
        v: VERSION,
        request,
        receipt,
        entry,
        proof,
    };
    bundle.check()?;
    Ok(bundle)
}

/// The number of hashes in the inclusion path of leaf `index` in a tree of `size` leaves
/// (RFC 9162 section 2.1.3.1); `index < size`.
fn path_len(index: u64, size: u64) -> usize {
    let (mut start, mut end) = (0u64, size);
    let mut n = 0;
    while end.saturating_sub(start) > 1 {
        let width = end - start;
        let k = 1u64 << (63 - (width - 1).leading_zeros());
        if index < start + k {
            end = start + k;
        } else {
            start += k;
        }
        n += 1;
    }
    n
}

/// Byte strings that must be CBOR byte strings (not arrays of integers).
mod strict_bytes {
    use serde::{Deserializer, Serializer, de};

    pub(super) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(Visitor)
    }

    pub(super) struct Visitor;

    impl<'de> de::Visitor<'de> for Visitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
    }
}

/// 32-byte hashes that must be CBOR byte strings of exactly 32 bytes.
mod strict_hash {
    use serde::{Deserializer, Serializer, de::Error};

    pub(super) fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let v = d.deserialize_byte_buf(super::strict_bytes::Visitor)?;
        v.as_slice()
            .try_into()
            .map_err(|_| D::Error::invalid_length(v.len(), &"a 32-byte byte string"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use didgate_protocol::Identity;
    use didgate_protocol::message::{ChainHead, EntryRef, SignedMessage};

    use super::*;

    struct Fixture {
        bundle: Bundle,
        client: ChainRecords,
        gateway: ChainRecords,
        call: Digest,
    }

    fn records(label: &str, entries: Vec<Vec<u8>>) -> ChainRecords {
        ChainRecords {
            label: label.into(),
            entries: (0u64..).zip(entries).collect(),
            head: None,
            checkpoints: Vec::new(),
            documents: Vec::new(),
            sealed: false,
        }
    }

    /// A gateway chain of `n` filler entries then an executed entry, and a client chain with
    /// the request and its receipt.
    fn fixture(n: u64) -> Fixture {
        fixture_signed(n, &Identity::from_seed(&[2; 32]), None)
    }

    /// [`fixture`] with the receipt signed by `signer` carrying `node_cert` (the request is
    /// addressed to the seed `02..02` gateway).
    fn fixture_signed(n: u64, signer: &Identity, node_cert: Option<Vec<u8>>) -> Fixture {
        let (client, gateway, call) = chains_signed(n, signer, node_cert);
        let bundle = build(&client, &gateway, call).unwrap();
        Fixture {
            bundle,
            client,
            gateway,
            call,
        }
    }

    /// The client and gateway chains of [`fixture_signed`], and the call.
    fn chains_signed(
        n: u64,
        signer: &Identity,
        node_cert: Option<Vec<u8>>,
    ) -> (ChainRecords, ChainRecords, Digest) {
        let client_id = Identity::from_seed(&[1; 32]);
        let gw_id = Identity::from_seed(&[2; 32]);
        let req = Request {
            v: 1,
            aud: gw_id.did().to_string(),
            upstream: "payments".into(),
            method: "GET".into(),
            path: "/v1/balance".into(),
            query: vec![],
            headers: vec![],
            body_len: 0,
            body_b3: *blake3::hash(b"").as_bytes(),
            nonce: [3; 16],
            time_ms: 10,
            head: ChainHead {
                chain: [4; 32],
                seq: 0,
                hash: [4; 32],
            },
        };
        let signed_req = req.sign(&client_id);
        let call = message::open::<Request>(&signed_req)
            .unwrap()
            .envelope()
            .digest();
        let mut gw = Vec::new();
        for i in 0..n {
            let mut e = Entry::new(EntryKind::Refusals, i);
            e.seq = i;
            gw.push(e.encode());
        }
        let mut closing = Entry::new(EntryKind::Executed, 99);
        closing.seq = n;
        closing.call = Some(call);
        closing.status = Some(200);
        closing.resp_len = Some(5);
        closing.resp_b3 = Some(*blake3::hash(b"hello").as_bytes());
        let closing = closing.encode();
        gw.push(closing.clone());
        let leaves: Vec<Hash> = gw
            .iter()
            .map(|b| merkle::leaf_hash(&entry_hash(b)))
            .collect();
        let receipt = Receipt {
            // node_cert is a version 2 field
            v: if node_cert.is_some() { 2 } else { 1 },
            call,
            grant: [5; 16],
            client: client_id.did().to_string(),
            status: 200,
            resp_len: 5,
            resp_b3: *blake3::hash(b"hello").as_bytes(),
            entry: EntryRef {
                seq: n,
                hash: entry_hash(&closing),
            },
            root: Some(merkle::root(&leaves)),
            time_ms: 11,
            node_cert,
        }
        .sign(signer);
        let mut request_entry = Entry::new(EntryKind::Request, 1);
        request_entry.seq = 1;
        request_entry.call = Some(call);
        request_entry.signed = Some(signed_req.clone());
        let mut result_entry = Entry::new(EntryKind::Result, 2);
        result_entry.seq = 2;
        result_entry.call = Some(call);
        result_entry.outcome = Some(Outcome::Receipt);
        result_entry.signed = Some(receipt.clone());
        let client = records(
            "client",
            vec![
                Entry::new(EntryKind::Genesis, 0).encode(),
                request_entry.encode(),
                result_entry.encode(),
            ],
        );
        (client, records("gateway", gw), call)
    }

    #[test]
    fn builds_and_checks_for_many_sizes() {
        for n in 0..40 {
            let f = fixture(n);
            let v = check(&f.bundle.encode()).unwrap();
            assert_eq!((v.seq, v.status, v.call), (n, 200, f.call));
            assert_eq!(f.bundle.proof.len(), path_len(n, n + 1));
        }
    }

    /// A node certificate by the seed `02..02` gateway for `node`, valid from 10 ms to 20 ms.
    fn node_certificate(by: &Identity, node: &Identity) -> Vec<u8> {
        didgate_protocol::node::NodeCertificate {
            v: 2,
            gateway: Identity::from_seed(&[2; 32]).did().to_string(),
            node: node.did().to_string(),
            serial: 5,
            not_before_ms: 10,
            not_after_ms: 20,
            addr: None,
        }
        .sign(by)
    }

    /// Issue 22: a receipt signed by a node the request's gateway certified is evidence of the
    /// call; a certificate the gateway did not sign, or one revoked at the receipt's time, is
    /// the new failure `node_certificate`.
    #[test]
    fn a_receipt_of_a_certified_node_is_evidence() {
        let (gw, node) = (Identity::from_seed(&[2; 32]), Identity::from_seed(&[7; 32]));
        let f = fixture_signed(4, &node, Some(node_certificate(&gw, &node)));
        let v = check(&f.bundle.encode()).unwrap();
        assert_eq!(v.gateway, gw.did().as_str());
        assert_eq!(v.node.as_deref(), Some(node.did().as_str()));
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["node"], node.did().as_str());
        // the gateway's own receipt names no node
        let own = check(&fixture(4).bundle.encode()).unwrap();
        assert!(own.node.is_none());
        assert!(serde_json::to_value(&own).unwrap().get("node").is_none());
        // revoked from the receipt's time (11 ms), with the gateway's list
        let list = didgate_protocol::node::NodeRevocations {
            v: 2,
            gateway: gw.did().to_string(),
            seq: 1,
            time_ms: 11,
            revoked: vec![didgate_protocol::node::Revoked {
                serial: 5,
                time_ms: 11,
            }],
        };
        let mut revocations = Revocations::new();
        revocations.add(&list.sign(&gw)).unwrap();
        let e = check_with(&f.bundle.encode(), &revocations).unwrap_err();
        assert!(
            matches!(
                e,
                EvidenceError::NodeCertificate(NodeCertError::Revoked { serial: 5, .. })
            ),
            "{e:?}"
        );
        assert_eq!(e.name(), "node_certificate");
    }

    #[test]
    fn a_receipt_with_a_tampered_node_certificate_is_not_evidence() {
        let (gw, node) = (Identity::from_seed(&[2; 32]), Identity::from_seed(&[7; 32]));
        let mut tampered = node_certificate(&gw, &node);
        let at = tampered.len() - 1;
        tampered[at] ^= 1;
        let foreign = node_certificate(&Identity::from_seed(&[8; 32]), &node);
        let other_key = node_certificate(&gw, &Identity::from_seed(&[9; 32]));
        for cert in [tampered, foreign, other_key] {
            // `build` checks the bundle it assembles
            let (client, gateway, call) = chains_signed(4, &node, Some(cert.clone()));
            let e = build(&client, &gateway, call).unwrap_err();
            assert!(matches!(e, EvidenceError::NodeCertificate(_)), "{e:?}");
            // and the same receipt in a bundle built around a good one
            let good = fixture_signed(4, &node, Some(node_certificate(&gw, &node)));
            let mut bundle = good.bundle.clone();
            let mut r = message::open::<Receipt>(&bundle.receipt)
                .unwrap()
                .into_message();
            r.node_cert = Some(cert);
            bundle.receipt = r.sign(&node);
            let e = check(&bundle.encode()).unwrap_err();
            assert!(matches!(e, EvidenceError::NodeCertificate(_)), "{e:?}");
            assert_eq!(e.name(), "node_certificate");
        }
        // a node receipt without a certificate: the audience does not match, as before
        let mut bundle = fixture(4).bundle;
        let mut r = message::open::<Receipt>(&bundle.receipt)
            .unwrap()
            .into_message();
        r.node_cert = None;
        bundle.receipt = r.sign(&node);
        let e = check(&bundle.encode()).unwrap_err();
        assert!(matches!(e, EvidenceError::AudienceMismatch { .. }), "{e:?}");
    }

    #[test]
    fn decode_is_strict() {
        let f = fixture(5);
        let bytes = f.bundle.encode();
        assert_eq!(Bundle::decode(&bytes).unwrap(), f.bundle);
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(matches!(
            check(&trailing),
            Err(EvidenceError::Malformed(DecodeError::Trailing(1)))
        ));
        let mut v2 = f.bundle.clone();
        v2.v = 2;
        assert!(matches!(
            check(&v2.encode()),
            Err(EvidenceError::Version(2))
        ));
        // another tag, an extra field, an array where a byte string belongs
        let mut value: ciborium::Value = ciborium::from_reader(bytes.as_slice()).unwrap();
        let ciborium::Value::Map(m) = &mut value else {
            panic!("not a map")
        };
        let original = m.clone();
        m[0].1 = ciborium::Value::Text("didgate-audit-export".into());
        assert!(matches!(
            check(&cbor::to_vec(&value)),
            Err(EvidenceError::NotEvidence(_))
        ));
        let mut extra = original.clone();
        extra.push((
            ciborium::Value::Text("x".into()),
            ciborium::Value::Integer(1.into()),
        ));
        let e = check(&cbor::to_vec(&ciborium::Value::Map(extra))).unwrap_err();
        assert!(e.is_undecodable(), "{e}");
        let mut dup = original.clone();
        dup.push(original[1].clone());
        let e = check(&cbor::to_vec(&ciborium::Value::Map(dup))).unwrap_err();
        assert!(e.is_undecodable(), "{e}");
        let mut array = original.clone();
        let ciborium::Value::Bytes(entry) = array[4].1.clone() else {
            panic!("entry is not bytes")
        };
        array[4].1 = ciborium::Value::Array(
            entry
                .iter()
                .map(|b| ciborium::Value::Integer((*b).into()))
                .collect(),
        );
        let e = check(&cbor::to_vec(&ciborium::Value::Map(array))).unwrap_err();
        assert!(e.is_undecodable(), "{e}");
        // key order and integer width carry no meaning
        let mut reversed = original.clone();
        reversed.reverse();
        assert_eq!(
            Bundle::decode(&cbor::to_vec(&ciborium::Value::Map(reversed))).unwrap(),
            f.bundle
        );
        let v_one = [0x61, b'v', 0x01];
        let at = bytes.windows(3).position(|w| w == v_one).unwrap();
        let mut wide = bytes[..at + 2].to_vec();
        wide.extend_from_slice(&[0x1b, 0, 0, 0, 0, 0, 0, 0, 1]);
        wide.extend_from_slice(&bytes[at + 3..]);
        assert_eq!(Bundle::decode(&wide).unwrap(), f.bundle);
        let mut short = original;
        short[5].1 = ciborium::Value::Array(vec![ciborium::Value::Bytes(vec![0; 31])]);
        let e = check(&cbor::to_vec(&ciborium::Value::Map(short))).unwrap_err();
        assert!(e.is_undecodable(), "{e}");
    }

    #[test]
    fn build_reports_what_is_missing() {
        let f = fixture(3);
        assert!(matches!(
            build(&f.client, &f.gateway, [0; 32]),
            Err(EvidenceError::NoRequest(_))
        ));
        let mut no_result = f.client.clone();
        no_result.entries.pop();
        assert!(matches!(
            build(&no_result, &f.gateway, f.call),
            Err(EvidenceError::NoReceipt(_))
        ));
        let mut short = f.gateway.clone();
        short.entries.pop();
        assert!(matches!(
            build(&f.client, &short, f.call),
            Err(EvidenceError::GatewayEntryMissing(3))
        ));
        let mut gap = f.gateway.clone();
        gap.entries.remove(1);
        assert!(matches!(
            build(&f.client, &gap, f.call),
            Err(EvidenceError::GatewayEntryMissing(1))
        ));
        let mut altered = f.gateway.clone();
        altered.entries[0].1.push(0);
        assert!(matches!(
            build(&f.client, &altered, f.call),
            Err(EvidenceError::Inclusion)
        ));
    }

    #[test]
    fn path_len_matches_the_proofs() {
        for size in 1..70u64 {
            let leaves: Vec<Hash> = (0..size)
                .map(|i| merkle::leaf_hash(&i.to_be_bytes()))
                .collect();
            for index in 0..size {
                let proof = merkle::inclusion_proof(leaves.as_slice(), index, size).unwrap();
                assert_eq!(proof.len(), path_len(index, size), "{index} of {size}");
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn check_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..2048)) {
            let _ = check(&bytes);
        }
    }
}

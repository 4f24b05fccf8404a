//! COSE_Sign1 signed envelopes (RFC 9052, alg EdDSA), specs/protocol.md "Signed envelopes".
//!
//! Owns signing and verification of every message that carries authority. The signature is
//! checked over the received bytes before the payload is decoded, so no canonical re-encoding
//! is ever needed. Each message kind has its own domain tag, carried both as the COSE external
//! AAD and as the protected `content type`, so a signature made for one kind never verifies as
//! another.

use coset::{
    CborSerializable, CoseSign1, CoseSign1Builder, HeaderBuilder, TaggedCborSerializable, iana,
};
use ed25519_dalek::Signature;

use crate::cbor::PlainReader;
use crate::did::{Did, DidError};
use crate::error::Shared;
use crate::identity::Identity;
use crate::web::{Caller, Principal, PrincipalError, WebDid};

/// Longest envelope accepted (also bounded by the frame limit).
pub const MAX_ENVELOPE: usize = 60 * 1024;

/// The kind of a signed message; its domain tag separates the signatures of each kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Kind {
    /// A client's call request.
    Request,
    /// A gateway's grant.
    Grant,
    /// A gateway's receipt.
    Receipt,
    /// A gateway's refusal.
    Refusal,
    /// A chain owner's checkpoint (reserved for signed checkpoints).
    Checkpoint,
    /// A gateway's certificate for one of its nodes (version 2, [`crate::node`]).
    Node,
    /// A gateway's list of revoked node certificates (version 2, [`crate::node`]).
    NodeRevocations,
}

impl Kind {
    /// The domain tag: COSE external AAD and protected content type.
    pub fn tag(self) -> &'static str {
        match self {
            Kind::Request => "application/didgate-request+cbor;v=1",
            Kind::Grant => "application/didgate-grant+cbor;v=1",
            Kind::Receipt => "application/didgate-receipt+cbor;v=1",
            Kind::Refusal => "application/didgate-refusal+cbor;v=1",
            Kind::Checkpoint => "application/didgate-checkpoint+cbor;v=1",
            Kind::Node => "application/didgate-node+cbor;v=1",
            Kind::NodeRevocations => "application/didgate-node-revocations+cbor;v=1",
        }
    }
}

/// Why an envelope was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// Larger than [`MAX_ENVELOPE`].
    #[error("envelope of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// Not a tagged COSE_Sign1, or trailing bytes: the COSE decoder's error.
    #[error("not a well-formed COSE_Sign1: {0}")]
    Malformed(#[source] Shared<coset::CoseError>),
    /// The protected header does not name EdDSA.
    #[error("algorithm is not EdDSA")]
    Algorithm,
    /// The content type is not the one expected for this message kind.
    #[error("content type is not {expected}")]
    ContentType {
        /// The expected tag.
        expected: &'static str,
    },
    /// The unprotected header is not empty, or the protected header has unexpected fields.
    #[error("unexpected header parameters")]
    Header,
    /// The `kid` is not a did:key DID URL.
    #[error("bad kid: {0}")]
    Kid(#[source] DidError),
    /// The `kid` is not a did:key or did:web DID URL.
    #[error("bad kid: {0}")]
    KidMethod(#[source] PrincipalError),
    /// The `kid` names a did:web verification method that the resolved document does not
    /// list for authentication (or no document was resolved).
    #[error("the kid names no key of the resolved DID document")]
    UnknownKey,
    /// The payload is absent (detached payloads are not used).
    #[error("no payload")]
    NoPayload,
    /// The signature does not verify under the kid's key.
    #[error("signature does not verify")]
    Signature,
}

/// An envelope whose signature has been checked. The payload is still undecoded bytes.
#[derive(Clone)]
pub struct Verified {
    signer: Did,
    principal: Principal,
    payload: Vec<u8>,
    digest: [u8; 32],
    kind: Kind,
}

impl Verified {
    /// The key that signed, as a did:key (for a did:key signer, its DID).
    pub fn signer(&self) -> &Did {
        &self.signer
    }
    /// The DID the `kid` names: the signer's did:key, or the did:web it acts as.
    pub fn principal(&self) -> &Principal {
        &self.principal
    }
    /// The signer as a caller: principal and key.
    pub fn caller(&self) -> Caller {
        match &self.principal {
            Principal::Key(d) => Caller::key_only(d.clone()),
            Principal::Web(w) => Caller::web(w.clone(), self.signer.clone()),
        }
    }
    /// The signed payload bytes.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }
    /// BLAKE3 over exactly what the signature covers (see [`signed_digest`]): for a request,
    /// its call ID.
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }
    /// The message kind.
    pub fn kind(&self) -> Kind {
        self.kind
    }
}

impl std::fmt::Debug for Verified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verified")
            .field("signer", &self.signer)
            .field("kind", &self.kind)
            .field("digest", &hex_short(&self.digest))
            .finish()
    }
}

fn hex_short(b: &[u8]) -> String {
    b.iter().take(8).map(|x| format!("{x:02x}")).collect()
}

/// The digest of a signed message: BLAKE3 in derive-key mode with context
/// `"didgate 2026 signed-digest v1"` over `u64be(len(protected)) || protected || payload`,
/// i.e. over exactly the bytes the signature covers. For a request this is the call ID.
pub fn signed_digest(protected: &[u8], payload: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("didgate 2026 signed-digest v1");
    h.update(&(protected.len() as u64).to_be_bytes());
    h.update(protected);
    h.update(payload);
    *h.finalize().as_bytes()
}

/// Signs `payload` as a message of `kind`, returning the tagged COSE_Sign1 bytes. An identity
/// acting as a did:web signs requests as that DID (`kid` `did:web:...#fragment`); everything
/// else (a chain's checkpoints) is signed as its did:key, which owns the chain.
pub fn sign(identity: &Identity, kind: Kind, payload: Vec<u8>) -> Vec<u8> {
    sign_with_digest(identity, kind, payload).0
}

/// Like [`sign`], and also returns the message's [`signed_digest`] (for a request, its call ID)
/// over the protected header just encoded, so a signer learns it without verifying its own
/// envelope (one Ed25519 verification less per call).
pub fn sign_with_digest(identity: &Identity, kind: Kind, payload: Vec<u8>) -> (Vec<u8>, [u8; 32]) {
    let kid = match kind {
        Kind::Request => identity.key_id(),
        _ => identity.did().key_id(),
    };
    let protected = HeaderBuilder::new()
        .algorithm(iana::Algorithm::EdDSA)
        .key_id(kid.into_bytes())
        .content_type(kind.tag().to_string())
        .build();
    // the bytes COSE puts in the protected bstr of a built (not parsed) header
    let protected_bytes = protected
        .clone()
        .to_vec()
        .unwrap_or_else(|_| unreachable!("encoding a built header cannot fail"));
    let digest = signed_digest(&protected_bytes, &payload);
    let sign1 = CoseSign1Builder::new()
        .protected(protected)
        .payload(payload)
        .create_signature(kind.tag().as_bytes(), |data| identity.sign(data).to_vec())
        .build();
    let bytes = sign1
        .to_tagged_vec()
        .unwrap_or_else(|_| unreachable!("encoding a built COSE_Sign1 cannot fail"));
    (bytes, digest)
}

/// Verifies a tagged COSE_Sign1 of the expected `kind` over the received bytes. The `kid` must
/// be a did:key DID URL: a did:web signer needs [`verify_with`] and its resolved document.
pub fn verify(bytes: &[u8], kind: Kind) -> Result<Verified, EnvelopeError> {
    verify_full(bytes, kind, None, |_, _| None)
}

/// Like [`verify`], and also accepts a did:web `kid`: `web_key(did, fragment)` returns the
/// key the DID's resolved document lists for authentication under that fragment.
pub fn verify_with(
    bytes: &[u8],
    kind: Kind,
    web_key: impl FnOnce(&WebDid, &str) -> Option<Did>,
) -> Result<Verified, EnvelopeError> {
    verify_full(bytes, kind, None, web_key)
}

/// Like [`verify`], with the DID that most likely signed (a connection's peer, a pinned
/// gateway): when the `kid` names it, its already decoded key is used instead of parsing the
/// `kid` again. The result is the same as [`verify`]'s for every input; only the work differs.
pub fn verify_likely_from(
    bytes: &[u8],
    kind: Kind,
    likely: &Did,
) -> Result<Verified, EnvelopeError> {
    verify_full(bytes, kind, Some(likely), |_, _| None)
}

/// [`verify_with`] with the hint of [`verify_likely_from`].
pub fn verify_full(
    bytes: &[u8],
    kind: Kind,
    likely: Option<&Did>,
    web_key: impl FnOnce(&WebDid, &str) -> Option<Did>,
) -> Result<Verified, EnvelopeError> {
    if bytes.len() > MAX_ENVELOPE {
        return Err(EnvelopeError::TooLarge(bytes.len()));
    }
    let sign1 =
        CoseSign1::from_tagged_slice(bytes).map_err(|e| EnvelopeError::Malformed(e.into()))?;
    if !sign1.unprotected.is_empty() {
        return Err(EnvelopeError::Header);
    }
    let header = &sign1.protected.header;
    if header.alg
        != Some(coset::RegisteredLabelWithPrivate::Assigned(
            iana::Algorithm::EdDSA,
        ))
    {
        return Err(EnvelopeError::Algorithm);
    }
    if header.content_type != Some(coset::ContentType::Text(kind.tag().to_string())) {
        return Err(EnvelopeError::ContentType {
            expected: kind.tag(),
        });
    }
    if !header.crit.is_empty()
        || !header.iv.is_empty()
        || !header.partial_iv.is_empty()
        || !header.rest.is_empty()
        || !header.counter_signatures.is_empty()
    {
        return Err(EnvelopeError::Header);
    }
    let kid =
        std::str::from_utf8(&header.key_id).map_err(|_| EnvelopeError::Kid(DidError::NotDidKey))?;
    let (principal, signer) = if kid.starts_with("did:web:") {
        let (principal, fragment) =
            Principal::from_key_id(kid).map_err(EnvelopeError::KidMethod)?;
        let Principal::Web(web) = &principal else {
            return Err(EnvelopeError::UnknownKey);
        };
        let key = web_key(web, fragment).ok_or(EnvelopeError::UnknownKey)?;
        (principal, key)
    } else {
        let did = match likely {
            Some(d) if d.is_key_id(kid) => d.clone(),
            _ => Did::from_key_id(kid).map_err(EnvelopeError::Kid)?,
        };
        (Principal::Key(did.clone()), did)
    };
    let payload = sign1.payload.as_deref().ok_or(EnvelopeError::NoPayload)?;
    let key = signer.verifying_key();
    sign1.verify_signature(kind.tag().as_bytes(), |sig, data| {
        let sig: [u8; 64] = sig.try_into().map_err(|_| EnvelopeError::Signature)?;
        key.verify_strict(data, &Signature::from_bytes(&sig))
            .map_err(|_| EnvelopeError::Signature)
    })?;
    let protected = sign1.protected.original_data.as_deref().unwrap_or_default();
    let digest = signed_digest(protected, payload);
    Ok(Verified {
        signer,
        principal,
        payload: payload.to_vec(),
        digest,
        kind,
    })
}

/// The parts of a COSE_Sign1 in the one plain layout [`sign`] writes, as [`parse_plain`] reads
/// them. Nothing here is verified: the signature is still to be checked over
/// [`sig_structure`]`(protected, kind.tag(), payload)` under the key `kid` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlainSign1<'b> {
    /// The protected header bucket, as stored.
    pub protected: &'b [u8],
    /// The kind its content type names.
    pub kind: Kind,
    /// The `kid`, not empty.
    pub kid: &'b [u8],
    /// The payload.
    pub payload: &'b [u8],
    /// The signature.
    pub signature: [u8; 64],
}

/// Every kind, for [`parse_plain`] to find one by its tag.
const KINDS: [Kind; 7] = [
    Kind::Request,
    Kind::Grant,
    Kind::Receipt,
    Kind::Refusal,
    Kind::Checkpoint,
    Kind::Node,
    Kind::NodeRevocations,
];

/// Reads a COSE_Sign1 laid out exactly as [`sign`] writes it, faster than coset (the audit
/// verifier's fast path): tag 18, an array of four; the protected header a byte string holding
/// a map of alg (1) = EdDSA (-8), content type (3) = one of the didgate tags, and a non-empty
/// kid (4), in any order, once each; an empty unprotected map; a byte-string payload; a 64-byte
/// signature; nothing after; every length in its shortest form. `None` for anything else (then
/// coset reads it, as [`verify`] does).
///
/// Everything accepted here coset reads to the same header, payload and signature, and
/// [`verify`]'s header checks pass on it (the tags are non-empty `type/subtype` strings
/// without surrounding spaces, as coset requires).
pub fn parse_plain(bytes: &[u8]) -> Option<PlainSign1<'_>> {
    if bytes.len() > MAX_ENVELOPE {
        return None;
    }
    let mut r = PlainReader::new(bytes);
    r.skip(0xd2)?;
    r.skip(0x84)?;
    let protected = r.bytes()?;
    r.skip(0xa0)?;
    let payload = r.bytes()?;
    let signature: [u8; 64] = r.fixed()?;
    if !r.at_end() {
        return None;
    }
    let mut h = PlainReader::new(protected);
    if h.head(5)? != 3 {
        return None;
    }
    let (mut alg, mut kind, mut kid) = (false, None, None);
    for _ in 0..3 {
        match h.uint()? {
            1 if !alg && h.peek() == Some(0x27) => {
                h.skip(0x27)?;
                alg = true;
            }
            3 if kind.is_none() => {
                let tag = h.text()?;
                kind = Some(KINDS.into_iter().find(|k| k.tag() == tag)?);
            }
            4 if kid.is_none() => kid = Some(h.bytes().filter(|k| !k.is_empty())?),
            _ => return None,
        }
    }
    if !h.at_end() || !alg {
        return None;
    }
    Some(PlainSign1 {
        protected,
        kind: kind?,
        kid: kid?,
        payload,
        signature,
    })
}

/// The COSE Sig_structure for a COSE_Sign1 (RFC 9052 section 4.4), encoded as coset encodes
/// it: `["Signature1", protected, external_aad, payload]`; what the signature of a message
/// [`parse_plain`] read covers, with the kind's tag as `external_aad`.
pub fn sig_structure(protected: &[u8], aad: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(protected.len() + aad.len() + payload.len() + 32);
    out.push(0x84);
    out.push(0x6a);
    out.extend_from_slice(b"Signature1");
    for b in [protected, aad, payload] {
        let len = b.len() as u64;
        match len {
            0..=23 => out.push(0x40 | len as u8),
            24..=0xff => out.extend_from_slice(&[0x58, len as u8]),
            0x100..=0xffff => {
                out.push(0x59);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            0x1_0000..=0xffff_ffff => {
                out.push(0x5a);
                out.extend_from_slice(&(len as u32).to_be_bytes());
            }
            _ => {
                out.push(0x5b);
                out.extend_from_slice(&len.to_be_bytes());
            }
        }
        out.extend_from_slice(b);
    }
    out
}

/// Re-serialises a parsed envelope for tests that tamper with its fields (feature
/// `test-util`: not part of the API).
#[cfg(any(test, feature = "test-util"))]
pub fn reencode_for_tests(sign1: CoseSign1) -> Vec<u8> {
    sign1.to_tagged_vec().unwrap_or_default()
}

/// Parses without verifying, for tests that tamper with fields (feature `test-util`).
#[cfg(any(test, feature = "test-util"))]
pub fn parse_for_tests(bytes: &[u8]) -> Option<CoseSign1> {
    CoseSign1::from_tagged_slice(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> Identity {
        Identity::from_seed(&[1; 32])
    }

    #[test]
    fn round_trip() {
        let bytes = sign(&alice(), Kind::Request, b"hello".to_vec());
        let v = verify(&bytes, Kind::Request).expect("verifies");
        assert_eq!(v.signer(), alice().did());
        assert_eq!(v.payload(), b"hello");
    }

    #[test]
    fn sign_with_digest_matches_the_verified_digest() {
        for kind in [
            Kind::Request,
            Kind::Grant,
            Kind::Receipt,
            Kind::Refusal,
            Kind::Checkpoint,
        ] {
            for payload in [Vec::new(), b"hello".to_vec(), vec![7u8; 5000]] {
                let (bytes, digest) = sign_with_digest(&alice(), kind, payload);
                let v = verify(&bytes, kind).expect("verifies");
                assert_eq!(v.digest(), digest, "{kind:?}");
            }
        }
    }

    #[test]
    fn a_likely_signer_changes_no_result() {
        let (a, b) = (alice(), Identity::from_seed(&[2; 32]));
        let good = sign(&a, Kind::Request, b"hello".to_vec());
        let mut bad = parse_for_tests(&good).expect("parses");
        bad.signature[3] ^= 1;
        let bad = reencode_for_tests(bad);
        for bytes in [&good, &bad] {
            let plain = verify(bytes, Kind::Request).map(|v| (v.signer().clone(), v.digest()));
            for likely in [a.did(), b.did()] {
                let hinted = verify_likely_from(bytes, Kind::Request, likely)
                    .map(|v| (v.signer().clone(), v.digest()));
                assert_eq!(hinted, plain);
            }
        }
        assert!(a.did().is_key_id(&a.did().key_id()));
        assert!(!a.did().is_key_id(&b.did().key_id()));
        assert!(!a.did().is_key_id(a.did().as_str()));
    }

    #[test]
    fn domain_separation() {
        let bytes = sign(&alice(), Kind::Request, b"hello".to_vec());
        assert!(matches!(
            verify(&bytes, Kind::Receipt),
            Err(EnvelopeError::ContentType { .. })
        ));
    }

    #[test]
    fn tampered_payload_refused() {
        let bytes = sign(&alice(), Kind::Request, b"hello".to_vec());
        let mut s = parse_for_tests(&bytes).expect("parses");
        s.payload = Some(b"hellp".to_vec());
        assert_eq!(
            verify(&reencode_for_tests(s), Kind::Request).map(|_| ()),
            Err(EnvelopeError::Signature)
        );
    }

    /// What the gateway refuses although a batch verifier may accept it: a signature by the key's
    /// own holder whose nonce point carries a torsion component of order 2. The cofactored
    /// equation holds, so ed25519-dalek's `verify_batch` (cofactorless, random coefficients)
    /// accepts it whenever the coefficient it draws is even; `verify_strict` never does. The
    /// gateway admits exactly what `verify_strict` admits (docs/performance.md, "Calls": why requests
    /// are not batch-verified).
    #[test]
    fn a_signature_only_a_batch_could_accept_is_refused() {
        use curve25519_dalek::constants::ED25519_BASEPOINT_POINT as B;
        use curve25519_dalek::edwards::CompressedEdwardsY;
        use curve25519_dalek::scalar::Scalar;
        use curve25519_dalek::traits::IsIdentity;
        use sha2::{Digest, Sha512};

        let id = alice();
        let honest = sign(&id, Kind::Request, b"POST /v1/charges".to_vec());
        let mut sign1 = parse_for_tests(&honest).expect("parses");
        let tbs = sign1.tbs_data(Kind::Request.tag().as_bytes());
        // the secret scalar, derived from the seed as RFC 8032 section 5.1.5 does
        let expanded = Sha512::digest(*id.seed());
        let mut clamped = [0u8; 32];
        clamped.copy_from_slice(&expanded[..32]);
        clamped[0] &= 248;
        clamped[31] &= 127;
        clamped[31] |= 64;
        let a = Scalar::from_bytes_mod_order(clamped);
        let public = *id.did().public_key_bytes();
        assert_eq!((a * B).compress().to_bytes(), public);
        // (0, -1), the point of order 2: y = p - 1, little-endian
        let mut y = [0xff; 32];
        y[0] = 0xec;
        y[31] = 0x7f;
        let t2 = CompressedEdwardsY(y).decompress().expect("on the curve");
        assert!(!t2.is_identity() && (t2 + t2).is_identity());
        let r = Scalar::from_bytes_mod_order([7; 32]);
        let nonce = (r * B + t2).compress();
        let k = Scalar::from_bytes_mod_order_wide(
            &Sha512::new()
                .chain_update(nonce.as_bytes())
                .chain_update(public)
                .chain_update(&tbs)
                .finalize()
                .into(),
        );
        let s = r + k * a;
        let residue = s * B - k * (a * B) - nonce.decompress().expect("a point");
        assert!(!residue.is_identity(), "the cofactorless equation fails");
        assert!(
            residue.mul_by_cofactor().is_identity(),
            "the cofactored equation holds"
        );
        let mut signature = nonce.to_bytes().to_vec();
        signature.extend_from_slice(s.as_bytes());
        // a batch of one accepts it when its random coefficient is even: at least once in 64
        // tries, except with probability 2^-64
        let sig = Signature::from_slice(&signature).expect("64 bytes");
        let vk = ed25519_dalek::VerifyingKey::from_bytes(&public).expect("a key");
        assert!(
            (0..64).any(|_| ed25519_dalek::verify_batch(&[&tbs], &[sig], &[vk]).is_ok()),
            "a batch accepts it"
        );
        assert!(vk.verify_strict(&tbs, &sig).is_err());
        sign1.signature = signature;
        let forged = reencode_for_tests(sign1);
        assert!(matches!(
            verify(&forged, Kind::Request),
            Err(EnvelopeError::Signature)
        ));
    }

    #[test]
    fn tampered_signature_refused() {
        let bytes = sign(&alice(), Kind::Request, b"hello".to_vec());
        let mut s = parse_for_tests(&bytes).expect("parses");
        s.signature[10] ^= 1;
        assert_eq!(
            verify(&reencode_for_tests(s), Kind::Request).map(|_| ()),
            Err(EnvelopeError::Signature)
        );
    }

    #[test]
    fn swapped_kid_refused() {
        let bytes = sign(&alice(), Kind::Request, b"hello".to_vec());
        let mut s = parse_for_tests(&bytes).expect("parses");
        let mallory = Identity::from_seed(&[2; 32]);
        s.protected.header.key_id = mallory.did().key_id().into_bytes();
        s.protected.original_data = None;
        assert_eq!(
            verify(&reencode_for_tests(s), Kind::Request).map(|_| ()),
            Err(EnvelopeError::Signature)
        );
    }

    #[test]
    fn unprotected_header_refused() {
        let bytes = sign(&alice(), Kind::Request, b"hello".to_vec());
        let mut s = parse_for_tests(&bytes).expect("parses");
        s.unprotected.key_id = b"x".to_vec();
        assert_eq!(
            verify(&reencode_for_tests(s), Kind::Request).map(|_| ()),
            Err(EnvelopeError::Header)
        );
    }

    #[test]
    fn a_cose_decode_error_is_the_source_of_malformed() {
        let e = verify(b"not COSE", Kind::Request).expect_err("refused");
        let source = std::error::Error::source(&e).expect("a source");
        assert!(source.is::<Shared<coset::CoseError>>(), "{source:?}");
        assert_eq!(
            e.to_string(),
            format!("not a well-formed COSE_Sign1: {source}")
        );
    }

    #[test]
    fn trailing_bytes_refused() {
        let mut bytes = sign(&alice(), Kind::Request, b"hello".to_vec());
        bytes.push(0);
        assert!(matches!(
            verify(&bytes, Kind::Request),
            Err(EnvelopeError::Malformed(_))
        ));
    }

    #[test]
    fn digest_covers_signed_bytes_only() {
        let bytes = sign(&alice(), Kind::Request, b"hello".to_vec());
        let a = verify(&bytes, Kind::Request).expect("ok").digest();
        let b = verify(
            &sign(&alice(), Kind::Request, b"hello".to_vec()),
            Kind::Request,
        )
        .expect("ok")
        .digest();
        // Ed25519 is deterministic, so the same message gives the same digest
        assert_eq!(a, b);
        let c = verify(
            &sign(&alice(), Kind::Request, b"hellp".to_vec()),
            Kind::Request,
        )
        .expect("ok")
        .digest();
        assert_ne!(a, c);
    }

    /// What coset reads from a message [`parse_plain`] accepted is what it read: the same
    /// header, payload and signature, and headers [`verify`]'s checks pass.
    pub(crate) fn assert_coset_agrees(bytes: &[u8], p: &PlainSign1<'_>) {
        let s = CoseSign1::from_tagged_slice(bytes).expect("coset accepts it too");
        let h = &s.protected.header;
        assert!(s.unprotected.is_empty() && h.crit.is_empty() && h.rest.is_empty());
        assert_eq!(
            h.alg,
            Some(coset::RegisteredLabelWithPrivate::Assigned(
                iana::Algorithm::EdDSA
            ))
        );
        assert_eq!(
            h.content_type,
            Some(coset::ContentType::Text(p.kind.tag().to_string()))
        );
        assert_eq!(Some(p.protected), s.protected.original_data.as_deref());
        assert_eq!(p.kid, h.key_id.as_slice());
        assert_eq!(Some(p.payload), s.payload.as_deref());
        assert_eq!(p.signature.as_slice(), s.signature.as_slice());
    }

    /// The plain COSE reader agrees with coset on what didgate signs, on its Sig_structure, and
    /// on any altered message it still accepts.
    #[test]
    fn plain_cose_reader_agrees_with_coset() {
        let id = Identity::from_seed(&[3; 32]);
        let mut rng = crate::test_util::Rng(0x2545_f491_4f6c_dd1d);
        let mut accepted_altered = 0;
        for n in 0..400usize {
            let kind = KINDS[n % KINDS.len()];
            let payload: Vec<u8> = (0..(n * 37) % 700).map(|i| (i * 7 + n) as u8).collect();
            let bytes = sign(&id, kind, payload);
            let parts = parse_plain(&bytes).expect("plain layout");
            let sign1 = CoseSign1::from_tagged_slice(&bytes).expect("coset");
            assert_eq!(parts.kind, kind);
            assert_eq!(
                Some(parts.protected),
                sign1.protected.original_data.as_deref()
            );
            assert_eq!(parts.kid, sign1.protected.header.key_id.as_slice());
            assert_eq!(Some(parts.payload), sign1.payload.as_deref());
            assert_eq!(parts.signature.as_slice(), sign1.signature.as_slice());
            assert_eq!(
                sig_structure(parts.protected, kind.tag().as_bytes(), parts.payload),
                sign1.tbs_data(kind.tag().as_bytes())
            );
            for _ in 0..20 {
                let mut altered = bytes.clone();
                let i = rng.below(altered.len() as u64) as usize;
                match rng.below(3) {
                    0 => altered[i] ^= 1 << rng.below(8),
                    1 => altered[i] = rng.next() as u8,
                    _ => altered.truncate(i),
                }
                if let Some(p) = parse_plain(&altered) {
                    accepted_altered += 1;
                    assert_coset_agrees(&altered, &p);
                }
            }
        }
        assert!(accepted_altered > 100, "{accepted_altered}");
    }

    /// On the signed messages of the spec's vectors and of the committed fuzz corpora, the plain
    /// reader agrees with coset (header, payload, signature, Sig_structure) whenever it accepts
    /// one; it accepts every message of the vectors (all written by [`sign`]).
    #[test]
    fn plain_cose_reader_agrees_on_the_vectors_and_the_fuzz_corpus() {
        let agrees = |bytes: &[u8]| {
            let p = parse_plain(bytes)?;
            assert_coset_agrees(bytes, &p);
            let sign1 = CoseSign1::from_tagged_slice(bytes).expect("coset");
            assert_eq!(
                sig_structure(p.protected, p.kind.tag().as_bytes(), p.payload),
                sign1.tbs_data(p.kind.tag().as_bytes())
            );
            Some(())
        };
        let vectors = crate::test_util::vector_signed_messages();
        let accepted = vectors.iter().filter_map(|b| agrees(b)).count();
        assert_eq!(accepted, vectors.len());
        assert!(accepted > 200, "{accepted}");
        let mut corpus = crate::test_util::fuzz_corpus("envelope");
        corpus.extend(crate::test_util::fuzz_corpus("messages"));
        let accepted = corpus.iter().filter_map(|b| agrees(b)).count();
        assert!(accepted > 0, "{accepted} of {}", corpus.len());
    }

    proptest::proptest! {
        #[test]
        fn verify_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = verify(&bytes, Kind::Request);
        }
    }
}

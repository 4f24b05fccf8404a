//! `did:web` identifiers, the two DID methods a caller may act as, and DID documents
//! (specs/protocol.md, "did:web callers").
//!
//! Owns the syntax of `did:web` (a DNS name, an optional percent-encoded port, optional path
//! segments), the document URL it maps to, [`Principal`] (a did:key or a did:web) and
//! [`Caller`] (a principal with the Ed25519 key it proved). It also reads the authentication
//! keys out of a DID document with the ssi DID crates (`ssi-dids-core` for the document model,
//! `ssi-jwk` for `publicKeyJwk`). Fetching documents is not here: that is I/O, and only the
//! gateway's resolver does it.

use std::fmt;
use std::future::Future;

use ed25519_dalek::VerifyingKey;
use ssi_dids_core::Document;

use crate::did::{Did, DidError};
use crate::error::Shared;

/// Longest did:web accepted, in bytes.
pub const MAX_WEB_DID: usize = 256;
/// Largest DID document accepted, in bytes.
pub const MAX_DOCUMENT: usize = 64 * 1024;

/// Why a string is not an acceptable did:web.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WebDidError {
    /// The string does not start with `did:web:`.
    #[error("not a did:web (expected the prefix `did:web:`)")]
    NotDidWeb,
    /// Longer than [`MAX_WEB_DID`].
    #[error("did:web longer than {MAX_WEB_DID} bytes")]
    TooLong,
    /// The host is not a lowercase DNS name or IPv4 address.
    #[error("did:web host {0:?} is not a lowercase DNS name")]
    Host(String),
    /// The percent-encoded port is not a number in 1..=65535.
    #[error("did:web port is not a number in 1..=65535")]
    Port,
    /// A path segment is empty or holds a character outside `[A-Za-z0-9._~-]`.
    #[error("did:web path segment {0:?} is not allowed")]
    Segment(String),
}

/// A `did:web` identifier. Always valid: [`WebDid::parse`] is the only constructor.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WebDid {
    text: String,
    host: String,
    port: Option<u16>,
    path: Vec<String>,
}

impl WebDid {
    /// Parses and validates a did:web string.
    pub fn parse(s: &str) -> Result<Self, WebDidError> {
        if s.len() > MAX_WEB_DID {
            return Err(WebDidError::TooLong);
        }
        let rest = s.strip_prefix("did:web:").ok_or(WebDidError::NotDidWeb)?;
        let mut parts = rest.split(':');
        let authority = parts.next().unwrap_or_default();
        let (host, port) = match authority.split_once("%3A") {
            Some((h, p)) => {
                let port: u16 = p.parse().map_err(|_| WebDidError::Port)?;
                if port == 0 || p.starts_with('0') || p.starts_with('+') {
                    return Err(WebDidError::Port);
                }
                (h, Some(port))
            }
            None => (authority, None),
        };
        check_host(host)?;
        let path = parts
            .map(|seg| {
                let ok = !seg.is_empty()
                    && seg != "."
                    && seg != ".."
                    && seg
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._~-".contains(&b));
                if ok {
                    Ok(seg.to_string())
                } else {
                    Err(WebDidError::Segment(seg.to_string()))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            text: s.to_string(),
            host: host.to_string(),
            port,
            path,
        })
    }

    /// The DID text, `did:web:example.com:agents:a1`.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The host name (a DNS name, `localhost`, or an IPv4 literal).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port, when the DID names one (`%3A8443`).
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// Whether the host is an IP literal or `localhost`: refused unless the gateway is
    /// configured for tests.
    pub fn is_local_name(&self) -> bool {
        self.host == "localhost"
            || self.host.ends_with(".localhost")
            || self.host.parse::<std::net::Ipv4Addr>().is_ok()
    }

    /// The HTTPS URL of the DID document: `https://host[:port]/.well-known/did.json` without
    /// a path, `https://host[:port]/seg/.../did.json` with one.
    pub fn document_url(&self) -> String {
        let port = self.port.map(|p| format!(":{p}")).unwrap_or_default();
        if self.path.is_empty() {
            format!("https://{}{port}/.well-known/did.json", self.host)
        } else {
            format!(
                "https://{}{port}/{}/did.json",
                self.host,
                self.path.join("/")
            )
        }
    }
}

fn check_host(host: &str) -> Result<(), WebDidError> {
    let bad = || WebDidError::Host(host.to_string());
    if host.is_empty() || host.len() > 253 {
        return Err(bad());
    }
    for label in host.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(bad());
        }
    }
    Ok(())
}

impl fmt::Display for WebDid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for WebDid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WebDid({})", self.text)
    }
}

/// The DID a caller acts as: its own did:key, or an organisation's did:web whose document
/// lists the caller's key for authentication.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Principal {
    /// A did:key: the DID is the key.
    Key(Did),
    /// A did:web: the key is whatever the resolved document lists.
    Web(WebDid),
}

/// Why a string is neither an Ed25519 did:key nor an acceptable did:web.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PrincipalError {
    /// A malformed did:key.
    #[error(transparent)]
    Key(#[from] DidError),
    /// A malformed did:web.
    #[error(transparent)]
    Web(#[from] WebDidError),
    /// Another DID method.
    #[error("unsupported DID method (did:key and did:web are accepted)")]
    Method,
}

impl Principal {
    /// Parses a did:key or a did:web.
    pub fn parse(s: &str) -> Result<Self, PrincipalError> {
        if s.starts_with("did:key:") {
            Ok(Self::Key(Did::parse(s)?))
        } else if s.starts_with("did:web:") {
            Ok(Self::Web(WebDid::parse(s)?))
        } else {
            Err(PrincipalError::Method)
        }
    }

    /// The DID text.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Key(d) => d.as_str(),
            Self::Web(w) => w.as_str(),
        }
    }

    /// Parses a COSE `kid`: `did:key:z..#z..`, or `did:web:...#fragment` (the fragment names a
    /// verification method of the document). Returns the principal and the fragment.
    pub fn from_key_id(kid: &str) -> Result<(Self, &str), PrincipalError> {
        if kid.starts_with("did:key:") {
            let did = Did::from_key_id(kid)?;
            let fragment = kid.split_once('#').map(|(_, f)| f).unwrap_or_default();
            return Ok((Self::Key(did), fragment));
        }
        let (did, fragment) = kid.split_once('#').ok_or(PrincipalError::Method)?;
        let fragment_ok = !fragment.is_empty()
            && fragment.len() <= 64
            && fragment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._~-".contains(&b));
        if !fragment_ok {
            return Err(PrincipalError::Web(WebDidError::Segment(fragment.into())));
        }
        Ok((Self::Web(WebDid::parse(did)?), fragment))
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Principal({})", self.as_str())
    }
}

impl std::str::FromStr for Principal {
    type Err = PrincipalError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A caller: the principal it acts as and the Ed25519 key it proved, both in the TLS
/// handshake and in each signature. For a did:key the two are the same DID.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Caller {
    principal: Principal,
    key: Did,
}

impl Caller {
    /// A did:key caller.
    pub fn key_only(key: Did) -> Self {
        Self {
            principal: Principal::Key(key.clone()),
            key,
        }
    }

    /// A did:web caller holding `key`. Whether the document lists the key is checked by the
    /// resolver before a request is admitted.
    pub fn web(did: WebDid, key: Did) -> Self {
        Self {
            principal: Principal::Web(did),
            key,
        }
    }

    /// The DID the caller acts as: the policy principal, the audit subject, what is revoked.
    pub fn principal(&self) -> &Principal {
        &self.principal
    }

    /// The Ed25519 key, as a did:key.
    pub fn key(&self) -> &Did {
        &self.key
    }

    /// The principal's DID text.
    pub fn as_str(&self) -> &str {
        self.principal.as_str()
    }

    /// The raw key bytes (replay and head keys are per key, so a rotated key starts fresh).
    pub fn public_key_bytes(&self) -> &[u8; 32] {
        self.key.public_key_bytes()
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.principal {
            Principal::Key(d) => write!(f, "Caller({d})"),
            Principal::Web(w) => write!(f, "Caller({w} with {})", self.key),
        }
    }
}

/// Why a DID document was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DocumentError {
    /// Larger than [`MAX_DOCUMENT`].
    #[error("DID document larger than {MAX_DOCUMENT} bytes")]
    TooLarge,
    /// Not a JSON DID document (or, writing one, JSON that would not serialize).
    #[error("not a DID document: {0}")]
    Malformed(#[source] Shared<serde_json::Error>),
    /// Resolving a did:key's document: the text is not a DID.
    #[error("not a DID document: {0}")]
    InvalidDid(#[source] Shared<ssi_dids_core::InvalidDID<String>>),
    /// Resolving a did:key's document failed.
    #[error("not a DID document: {0}")]
    Resolution(#[source] Shared<ssi_dids_core::resolution::Error>),
    /// Resolving a did:key's document did not complete at once (it needs no I/O, so always
    /// does).
    #[error("not a DID document: did:key resolution did not complete")]
    Pending,
    /// The document's `id` is not the DID it was fetched for.
    #[error("the document's id {got:?} is not {expected:?}")]
    WrongId {
        /// The id in the document.
        got: String,
        /// The DID resolved.
        expected: String,
    },
}

/// An Ed25519 key a DID document lists for authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthenticationKey {
    /// The verification method's fragment (`key-1` of `did:web:example.com#key-1`).
    pub fragment: String,
    /// The key.
    pub key: Did,
}

/// A DID document checked against the DID it belongs to, with its authentication keys.
#[derive(Debug, Clone)]
pub struct DidDocument {
    did: WebDid,
    bytes: Vec<u8>,
    hash: [u8; 32],
    keys: Vec<AuthenticationKey>,
}

impl DidDocument {
    /// Parses document bytes fetched for `did`: JSON through `ssi-dids-core`, `id` equal to
    /// the DID, and every Ed25519 verification method referenced (or embedded) under
    /// `authentication`, given as `publicKeyJwk` (OKP, Ed25519) or `publicKeyMultibase` (the
    /// did:key multicodec form). Other key types are ignored, never an error.
    pub fn parse(did: &WebDid, bytes: &[u8]) -> Result<Self, DocumentError> {
        if bytes.len() > MAX_DOCUMENT {
            return Err(DocumentError::TooLarge);
        }
        let doc: Document = Document::from_json_bytes(bytes)
            .map_err(|e| DocumentError::Malformed(e.into()))?
            .into_document();
        if doc.id.as_str() != did.as_str() {
            return Err(DocumentError::WrongId {
                got: doc.id.as_str().to_string(),
                expected: did.as_str().to_string(),
            });
        }
        let mut keys = Vec::new();
        for entry in &doc.verification_relationships.authentication {
            let reference = entry.id();
            let id = reference.resolve(&doc.id);
            let Some((base, fragment)) = id.as_str().split_once('#') else {
                continue;
            };
            if base != did.as_str() {
                continue;
            }
            let method = entry.as_value().or_else(|| {
                doc.verification_method
                    .iter()
                    .find(|m| m.id.as_str() == id.as_str())
            });
            if let Some(key) = method.and_then(method_key) {
                keys.push(AuthenticationKey {
                    fragment: fragment.to_string(),
                    key,
                });
            }
        }
        Ok(Self {
            did: did.clone(),
            hash: document_hash(bytes),
            bytes: bytes.to_vec(),
            keys,
        })
    }

    /// The DID the document belongs to.
    pub fn did(&self) -> &WebDid {
        &self.did
    }

    /// The exact bytes served.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// BLAKE3 of the exact bytes (see [`document_hash`]), recorded in audit entries.
    pub fn hash(&self) -> [u8; 32] {
        self.hash
    }

    /// The Ed25519 keys listed for authentication.
    pub fn authentication_keys(&self) -> &[AuthenticationKey] {
        &self.keys
    }

    /// Whether `key` is listed for authentication under `fragment`.
    pub fn authenticates(&self, fragment: &str, key: &Did) -> bool {
        self.keys
            .iter()
            .any(|k| k.fragment == fragment && &k.key == key)
    }

    /// Whether `key` is listed for authentication under any fragment.
    pub fn lists_key(&self, key: &Did) -> bool {
        self.keys.iter().any(|k| &k.key == key)
    }
}

/// The hash that names a DID document in the audit log: BLAKE3 in derive-key mode with
/// context `"didgate 2026 did-document v1"` over the exact bytes served.
pub fn document_hash(bytes: &[u8]) -> [u8; 32] {
    blake3::derive_key("didgate 2026 did-document v1", bytes)
}

fn method_key(m: &ssi_dids_core::document::DIDVerificationMethod) -> Option<Did> {
    if let Some(jwk) = m.properties.get("publicKeyJwk") {
        let jwk: ssi_jwk::JWK = serde_json::from_value(jwk.clone()).ok()?;
        let ssi_jwk::Params::OKP(okp) = &jwk.params else {
            return None;
        };
        let key = VerifyingKey::try_from(okp).ok()?;
        return Some(Did::from_verifying_key(&key));
    }
    let mb = m.properties.get("publicKeyMultibase")?.as_str()?;
    Did::parse(&format!("did:key:{mb}")).ok()
}

/// The DID document of a did:key, as `did-method-key` resolves it (for `didgate whoami
/// --document`).
pub fn did_key_document(did: &Did) -> Result<String, DocumentError> {
    use ssi_dids_core::DIDResolver;
    let did_buf = ssi_dids_core::DIDBuf::from_string(did.as_str().to_string())
        .map_err(|e| DocumentError::InvalidDid(e.into()))?;
    let resolved = poll_once(did_method_key::DIDKey.resolve(&did_buf))
        .ok_or(DocumentError::Pending)?
        .map_err(|e| DocumentError::Resolution(e.into()))?;
    serde_json::to_string_pretty(resolved.document.document())
        .map_err(|e| DocumentError::Malformed(e.into()))
}

/// A did:web document template listing `key` for authentication under `fragment`, for an
/// organisation to publish at [`WebDid::document_url`].
pub fn did_web_document(did: &WebDid, fragment: &str, key: &Did) -> String {
    let jwk = ssi_jwk::JWK::from(key.verifying_key());
    let vm = format!("{}#{fragment}", did.as_str());
    let doc = serde_json::json!({
        "@context": ["https://www.w3.org/ns/did/v1", "https://w3id.org/security/suites/jws-2020/v1"],
        "id": did.as_str(),
        "verificationMethod": [{
            "id": vm,
            "type": "JsonWebKey2020",
            "controller": did.as_str(),
            "publicKeyJwk": jwk,
        }],
        "authentication": [vm],
    });
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

/// did:key resolution is pure computation: its future never waits, so one poll completes
/// it (`None` if it ever did wait, instead of blocking).
fn poll_once<F: Future>(fut: F) -> Option<F::Output> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(fut).poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Identity;

    #[test]
    fn parses_did_web_forms() {
        let d = WebDid::parse("did:web:example.com").expect("test value");
        assert_eq!(d.document_url(), "https://example.com/.well-known/did.json");
        let d = WebDid::parse("did:web:example.com%3A8443:agents:a1").expect("test value");
        assert_eq!(d.port(), Some(8443));
        assert_eq!(
            d.document_url(),
            "https://example.com:8443/agents/a1/did.json"
        );
        assert!(!d.is_local_name());
        assert!(
            WebDid::parse("did:web:localhost%3A1")
                .expect("test value")
                .is_local_name()
        );
        assert!(
            WebDid::parse("did:web:127.0.0.1")
                .expect("test value")
                .is_local_name()
        );
    }

    #[test]
    fn refuses_bad_did_web() {
        for bad in [
            "did:web:",
            "did:web:Example.com",
            "did:web:ex ample.com",
            "did:web:example.com%3A0",
            "did:web:example.com%3A99999",
            "did:web:example.com%3A",
            "did:web:example.com::a",
            "did:web:example.com:..",
            "did:web:example.com:a%2Fb",
            "did:web:example.com/x",
            "did:web:user@example.com",
            "did:web:-a.com",
            "did:key:z6Mk",
        ] {
            assert!(WebDid::parse(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(
            WebDid::parse(&format!("did:web:{}", "a".repeat(300))),
            Err(WebDidError::TooLong)
        );
    }

    #[test]
    fn principal_and_kid() {
        let id = Identity::from_seed(&[1; 32]);
        let kid = id.did().key_id();
        let (p, f) = Principal::from_key_id(&kid).expect("test value");
        assert_eq!(p, Principal::Key(id.did().clone()));
        assert!(f.starts_with("z6Mk"));
        let (p, f) = Principal::from_key_id("did:web:example.com:a#key-1").expect("test value");
        assert_eq!(p.as_str(), "did:web:example.com:a");
        assert_eq!(f, "key-1");
        assert!(Principal::from_key_id("did:web:example.com#").is_err());
        assert!(Principal::from_key_id("did:web:example.com#a/b").is_err());
        assert!(Principal::from_key_id("did:example:123#k").is_err());
        assert_eq!(Principal::parse("did:plc:x"), Err(PrincipalError::Method));
    }

    #[test]
    fn document_template_round_trips() {
        let id = Identity::from_seed(&[2; 32]);
        let did = WebDid::parse("did:web:example.com:agents:a1").expect("test value");
        let text = did_web_document(&did, "key-1", id.did());
        let doc = DidDocument::parse(&did, text.as_bytes()).expect("test value");
        assert!(doc.authenticates("key-1", id.did()));
        assert!(!doc.authenticates("key-2", id.did()));
        let other = Identity::from_seed(&[3; 32]);
        assert!(!doc.lists_key(other.did()));
        assert_eq!(doc.hash(), document_hash(text.as_bytes()));
    }

    #[test]
    fn document_checks() {
        let did = WebDid::parse("did:web:example.com").expect("test value");
        let other = WebDid::parse("did:web:evil.example").expect("test value");
        let id = Identity::from_seed(&[4; 32]);
        let text = did_web_document(&other, "k", id.did());
        assert!(matches!(
            DidDocument::parse(&did, text.as_bytes()),
            Err(DocumentError::WrongId { .. })
        ));
        assert!(matches!(
            DidDocument::parse(&did, b"{not json"),
            Err(DocumentError::Malformed(_))
        ));
        assert_eq!(
            DidDocument::parse(&did, &vec![b' '; MAX_DOCUMENT + 1]).expect_err("refused"),
            DocumentError::TooLarge
        );
        // A key listed only in verificationMethod, not under authentication, does not count;
        // a multibase key under authentication does.
        let mb = &id.did().as_str()["did:key:".len()..];
        let text = serde_json::json!({
            "id": "did:web:example.com",
            "verificationMethod": [
                {"id": "did:web:example.com#a", "type": "Ed25519VerificationKey2020",
                 "controller": "did:web:example.com", "publicKeyMultibase": mb},
                {"id": "did:web:example.com#b", "type": "Ed25519VerificationKey2020",
                 "controller": "did:web:example.com", "publicKeyMultibase": mb}
            ],
            "authentication": ["#b"]
        })
        .to_string();
        let doc = DidDocument::parse(&did, text.as_bytes()).expect("test value");
        assert!(!doc.authenticates("a", id.did()));
        assert!(doc.authenticates("b", id.did()));
    }

    proptest::proptest! {
        /// Untrusted text (a certificate's SAN, a kid, a policy) and untrusted document bytes
        /// never panic the parsers; what parses prints back as read.
        #[test]
        fn parsers_never_panic(text in "\\PC{0,300}", bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..2048)) {
            if let Ok(w) = WebDid::parse(&text) {
                proptest::prop_assert_eq!(w.as_str(), text.as_str());
                let _ = w.document_url();
            }
            let _ = Principal::parse(&text);
            let _ = Principal::from_key_id(&text);
            let did = WebDid::parse("did:web:example.com").expect("test value");
            let _ = DidDocument::parse(&did, &bytes);
            let _ = DidDocument::parse(&did, text.as_bytes());
        }

        /// did:web strings built from the grammar parse, and their document URL holds the host.
        #[test]
        fn grammar_parses(host in "[a-z0-9]{1,10}(\\.[a-z0-9]{1,10}){0,3}", port in proptest::option::of(1u16..), segs in proptest::collection::vec("[A-Za-z0-9_~-]{1,8}", 0..4)) {
            let mut s = format!("did:web:{host}");
            if let Some(p) = port {
                s.push_str(&format!("%3A{p}"));
            }
            for seg in &segs {
                s.push(':');
                s.push_str(seg);
            }
            let w = WebDid::parse(&s).expect("grammar");
            proptest::prop_assert_eq!(w.host(), host.as_str());
            let prefix = format!("https://{host}");
            proptest::prop_assert!(w.document_url().starts_with(&prefix));
        }
    }

    #[test]
    fn did_key_document_names_the_key() {
        let id = Identity::from_seed(&[5; 32]);
        let doc = did_key_document(id.did()).expect("test value");
        assert!(doc.contains(id.did().as_str()));
        assert!(doc.contains("authentication"));
    }
}

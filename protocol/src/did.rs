//! `did:key` identities for Ed25519 (specs/protocol.md, "Identities").
//!
//! Owns the hot-path did:key codec: multibase base58btc (`z`) over the multicodec varint
//! `0xed 0x01` followed by the 32-byte public key. It does not resolve other DID methods.

use std::fmt;

use ed25519_dalek::VerifyingKey;

/// The multicodec prefix of an Ed25519 public key (varint of 0xed).
const ED25519_MULTICODEC: [u8; 2] = [0xed, 0x01];
/// The DID method prefix including the multibase code for base58btc.
const PREFIX: &str = "did:key:z";
/// Longest method-specific id we try to decode (the valid one is 48 characters).
const MAX_ID_CHARS: usize = 64;

/// Why a string is not an Ed25519 did:key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DidError {
    /// The string does not start with `did:key:`.
    #[error("not a did:key (expected the prefix `did:key:`)")]
    NotDidKey,
    /// The multibase prefix is not `z` (base58btc).
    #[error("unsupported multibase prefix {0:?} (expected 'z', base58btc)")]
    Multibase(char),
    /// A character outside the base58btc alphabet, or an over-long identifier.
    #[error("invalid base58btc in did:key")]
    Base58,
    /// The multicodec is not Ed25519 public key (0xed 0x01).
    #[error("unsupported multicodec 0x{0:02x}{1:02x} (only Ed25519, 0xed01, is accepted)")]
    Multicodec(u8, u8),
    /// The decoded key is not 32 bytes.
    #[error("wrong key length {0} (an Ed25519 key has 32 bytes)")]
    Length(usize),
    /// The 32 bytes are not a valid Ed25519 point.
    #[error("the key bytes are not a valid Ed25519 public key")]
    InvalidKey,
}

/// An Ed25519 `did:key`. Always valid: [`Did::parse`] and [`Did::from_verifying_key`] are the
/// only constructors.
///
/// The decompressed public key is kept (shared, so a clone stays small) and verifying a
/// signature of a known DID does not decompress the point again. The text is canonical, so
/// equality, ordering and hashing use it alone.
#[derive(Clone)]
pub struct Did {
    text: String,
    key: std::sync::Arc<VerifyingKey>,
}

impl PartialEq for Did {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for Did {}

impl std::hash::Hash for Did {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.text.hash(state);
    }
}

impl PartialOrd for Did {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Did {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.text.cmp(&other.text)
    }
}

impl Did {
    /// Parses and validates a did:key string.
    pub fn parse(s: &str) -> Result<Self, DidError> {
        let rest = s.strip_prefix("did:key:").ok_or(DidError::NotDidKey)?;
        let mut chars = rest.chars();
        match chars.next() {
            Some('z') => {}
            Some(c) => return Err(DidError::Multibase(c)),
            None => return Err(DidError::Base58),
        }
        let id = chars.as_str();
        if id.is_empty() || id.len() > MAX_ID_CHARS {
            return Err(DidError::Base58);
        }
        let raw = bs58::decode(id).into_vec().map_err(|_| DidError::Base58)?;
        match raw.as_slice() {
            [a, b, ..] if [*a, *b] != ED25519_MULTICODEC => Err(DidError::Multicodec(*a, *b)),
            [_, _, key @ ..] => {
                let key: [u8; 32] = key.try_into().map_err(|_| DidError::Length(key.len()))?;
                let vk = VerifyingKey::from_bytes(&key).map_err(|_| DidError::InvalidKey)?;
                // Re-encode so the stored text is canonical (base58 has one encoding per value,
                // but leading-zero handling is checked by the round trip).
                let did = Self::from_key(vk);
                if did.text != s {
                    return Err(DidError::Base58);
                }
                Ok(did)
            }
            _ => Err(DidError::Length(raw.len().saturating_sub(2))),
        }
    }

    /// The DID of an Ed25519 public key.
    pub fn from_verifying_key(key: &VerifyingKey) -> Self {
        Self::from_key(*key)
    }

    fn from_key(vk: VerifyingKey) -> Self {
        let mut raw = Vec::with_capacity(34);
        raw.extend_from_slice(&ED25519_MULTICODEC);
        raw.extend_from_slice(vk.as_bytes());
        let text = format!("{PREFIX}{}", bs58::encode(raw).into_string());
        Self {
            text,
            key: std::sync::Arc::new(vk),
        }
    }

    /// The DID text, `did:key:z6Mk...`.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The raw 32-byte Ed25519 public key.
    pub fn public_key_bytes(&self) -> &[u8; 32] {
        self.key.as_bytes()
    }

    /// The public key, ready to verify signatures.
    pub fn verifying_key(&self) -> VerifyingKey {
        // decompressed (and so checked) once, in the constructor
        *self.key
    }

    /// Whether `kid` is this DID's [`Did::key_id`] (compared without building it).
    pub fn is_key_id(&self, kid: &str) -> bool {
        let fragment = &self.text["did:key:".len()..];
        kid.split_once('#')
            .is_some_and(|(did, frag)| did == self.text && frag == fragment)
    }

    /// The DID URL of the key's verification method (`did:key:z..#z..`), used as COSE `kid`.
    pub fn key_id(&self) -> String {
        let fragment = &self.text["did:key:".len()..];
        format!("{}#{}", self.text, fragment)
    }

    /// Parses a DID URL produced by [`Did::key_id`] and returns its DID.
    pub fn from_key_id(kid: &str) -> Result<Self, DidError> {
        let (did, fragment) = kid.split_once('#').ok_or(DidError::NotDidKey)?;
        let parsed = Self::parse(did)?;
        if fragment != &did["did:key:".len()..] {
            return Err(DidError::NotDidKey);
        }
        Ok(parsed)
    }
}

impl fmt::Display for Did {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Did {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Did({})", self.text)
    }
}

impl std::str::FromStr for Did {
    type Err = DidError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    const VECTORS: &str = include_str!("../../specs/vectors/public/did-key-ed25519.json");

    #[test]
    fn public_vectors_both_ways() {
        let doc: serde_json::Value = serde_json::from_str(VECTORS).expect("vector file is JSON");
        let vectors = doc["vectors"].as_array().expect("vectors array");
        assert!(!vectors.is_empty());
        for v in vectors {
            let seed: [u8; 32] = hex::decode(v["seed"].as_str().expect("seed"))
                .expect("hex")
                .try_into()
                .expect("32 bytes");
            let want = v["did"].as_str().expect("did");
            let identity = Identity::from_seed(&seed);
            assert_eq!(identity.did().as_str(), want, "seed -> DID");
            let parsed = Did::parse(want).expect("vector DID parses");
            let pk = bs58::decode(v["publicKeyBase58"].as_str().expect("pk"))
                .into_vec()
                .expect("b58");
            assert_eq!(
                parsed.public_key_bytes().as_slice(),
                pk.as_slice(),
                "DID -> key"
            );
            assert_eq!(
                parsed.key_id(),
                v["verificationMethod"].as_str().expect("vm")
            );
            assert_eq!(Did::from_key_id(&parsed.key_id()), Ok(parsed));
        }
    }

    fn encode(prefix: &[u8], key_len: usize) -> String {
        let mut raw = prefix.to_vec();
        raw.extend(std::iter::repeat_n(7u8, key_len));
        format!("did:key:z{}", bs58::encode(raw).into_string())
    }

    #[test]
    fn typed_errors() {
        let good = Identity::from_seed(&[3; 32]).did().to_string();
        assert_eq!(Did::parse("did:web:example.com"), Err(DidError::NotDidKey));
        assert_eq!(
            Did::parse(&good.replacen(":z", ":m", 1)),
            Err(DidError::Multibase('m'))
        );
        assert_eq!(
            Did::parse(&good.replacen("6Mk", "6M0", 1)),
            Err(DidError::Base58)
        );
        assert_eq!(Did::parse("did:key:z"), Err(DidError::Base58));
        assert_eq!(
            Did::parse(&encode(&[0xec, 0x01], 32)),
            Err(DidError::Multicodec(0xec, 0x01))
        );
        assert_eq!(
            Did::parse(&encode(&[0xed, 0x01], 31)),
            Err(DidError::Length(31))
        );
        assert_eq!(
            Did::parse(&encode(&[0xed, 0x01], 33)),
            Err(DidError::Length(33))
        );
        assert_eq!(Did::parse(&encode(&[0xed], 0)), Err(DidError::Length(0)));
        assert!(Did::parse(&format!("{good}x")).is_err());
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC*") {
            let _ = Did::parse(&s);
            let _ = Did::parse(&format!("did:key:z{s}"));
        }
    }
}

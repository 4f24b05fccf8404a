//! A private Ed25519 signing identity ([`Identity`]): its did:key, and optionally the did:web
//! it acts as (specs/protocol.md, "Identities"). Zeroized on drop, redacted in `Debug`.

use std::fmt;

use ed25519_dalek::{Signer, SigningKey};
use zeroize::Zeroizing;

use crate::did::Did;
use crate::web::{Principal, WebDid};

/// A private Ed25519 signing identity and its DID. Zeroized on drop, redacted in `Debug`,
/// never compared or cloned implicitly.
pub struct Identity {
    key: SigningKey,
    did: Did,
    /// The did:web this key acts as, and the fragment naming the key in its document.
    web: Option<(WebDid, String)>,
}

impl Identity {
    /// A fresh identity from the operating system's random source.
    pub fn generate() -> Self {
        Self::from_seed(&rand::random())
    }

    /// The identity for a 32-byte private seed.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        let key = SigningKey::from_bytes(seed);
        let did = Did::from_verifying_key(&key.verifying_key());
        Self {
            key,
            did,
            web: None,
        }
    }

    /// This key acting as `did`, whose document lists it for authentication under
    /// `#fragment`: requests are signed with `kid` `did#fragment` and the TLS certificate names
    /// `did`.
    pub fn acting_as(mut self, did: WebDid, fragment: &str) -> Self {
        self.web = Some((did, fragment.to_string()));
        self
    }

    /// The DID this identity acts as: its did:web if any, else its did:key.
    pub fn principal(&self) -> Principal {
        match &self.web {
            Some((w, _)) => Principal::Web(w.clone()),
            None => Principal::Key(self.did.clone()),
        }
    }

    /// The COSE `kid` of this identity's signatures.
    pub fn key_id(&self) -> String {
        match &self.web {
            Some((w, fragment)) => format!("{w}#{fragment}"),
            None => self.did.key_id(),
        }
    }

    /// This identity's DID.
    pub fn did(&self) -> &Did {
        &self.did
    }

    /// The private seed, for writing the identity file. Keep it in the narrowest scope.
    pub fn seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.key.to_bytes())
    }

    /// The PKCS#8 v2 DER of the key, for the TLS certificate's key pair.
    pub fn pkcs8_der(&self) -> Zeroizing<Vec<u8>> {
        use ed25519_dalek::pkcs8::EncodePrivateKey;
        let doc = self
            .key
            .to_pkcs8_der()
            .unwrap_or_else(|_| unreachable!("Ed25519 PKCS#8 encoding cannot fail"));
        Zeroizing::new(doc.as_bytes().to_vec())
    }

    /// Signs `message` with this identity.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("did", &self.did)
            .field("web", &self.web.as_ref().map(|(w, _)| w))
            .field("key", &"<redacted>")
            .finish()
    }
}

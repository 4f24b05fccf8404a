//! Signer keys: each COSE `kid` parsed once into its key (a did:key, or a did:web verification
//! method listed for authentication by a DID document kept beside the chains), shared by the
//! opening threads.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use didgate_protocol::message::Digest;
use didgate_protocol::web::DidDocument;
use didgate_protocol::{Did, Principal, WebDid};
use ed25519_dalek::VerifyingKey;

use super::report::ChainRecords;

/// A signer key (from a COSE `kid`), parsed once per distinct kid.
pub(super) struct Key {
    pub(super) did: Arc<Did>,
    pub(super) vk: VerifyingKey,
    /// Of small order: `verify_strict` refuses every signature by it.
    pub(super) weak: bool,
}

impl Key {
    fn new(did: Did) -> Self {
        let vk = did.verifying_key();
        Self {
            weak: vk.is_weak(),
            vk,
            did: Arc::new(did),
        }
    }
}

/// Signer keys by COSE `kid`, shared by the opening threads (each also keeps its own map).
#[derive(Default)]
pub(super) struct Keys {
    map: RwLock<HashMap<Vec<u8>, Option<Arc<Key>>>>,
    pub(super) web: Arc<WebKeys>,
}

/// The did:web keys the documents kept beside the chains list for authentication: DID URL
/// (`did:web:...#fragment`) -> key, and document hash -> document. A DID URL that two
/// documents bind to different keys names no key (its signatures cannot be attributed).
#[derive(Default)]
pub(super) struct WebKeys {
    by_kid: HashMap<String, Option<Did>>,
    /// The documents by hash (what a gateway entry's `did_doc` names).
    pub(super) docs: HashMap<Digest, DidDocument>,
}

impl WebKeys {
    /// The keys and documents kept beside the chains of `records`.
    pub(super) fn new(records: &[&ChainRecords]) -> Self {
        let mut out = Self::default();
        for bytes in records.iter().flat_map(|r| &r.documents) {
            let id = serde_json::from_slice::<serde_json::Value>(bytes)
                .ok()
                .and_then(|v| v.get("id")?.as_str().map(str::to_string));
            let Some(did) = id.and_then(|id| WebDid::parse(&id).ok()) else {
                continue;
            };
            let Ok(doc) = DidDocument::parse(&did, bytes) else {
                continue;
            };
            for k in doc.authentication_keys() {
                let kid = format!("{did}#{}", k.fragment);
                out.by_kid
                    .entry(kid)
                    .and_modify(|e| {
                        if e.as_ref() != Some(&k.key) {
                            *e = None;
                        }
                    })
                    .or_insert_with(|| Some(k.key.clone()));
            }
            out.docs.insert(doc.hash(), doc);
        }
        out
    }

    /// The key a did:web DID URL names.
    pub(super) fn key(&self, web: &WebDid, fragment: &str) -> Option<Did> {
        self.by_kid
            .get(&format!("{web}#{fragment}"))
            .cloned()
            .flatten()
    }
}

impl Keys {
    /// No kid parsed yet; did:web kids name the keys of `web`.
    pub(super) fn new(web: Arc<WebKeys>) -> Self {
        Self {
            web,
            ..Self::default()
        }
    }

    /// The key a `kid` names, as `envelope::verify` reads it; `None` if it names none.
    pub(super) fn get(&self, kid: &[u8]) -> Option<Arc<Key>> {
        if let Ok(map) = self.map.read()
            && let Some(k) = map.get(kid)
        {
            return k.clone();
        }
        let key = std::str::from_utf8(kid)
            .ok()
            .and_then(|s| match Principal::from_key_id(s).ok()? {
                (Principal::Key(did), _) => Some(did),
                (Principal::Web(web), fragment) => self.web.key(&web, fragment),
            })
            .map(|did| Arc::new(Key::new(did)));
        match self.map.write() {
            Ok(mut map) => map.entry(kid.to_vec()).or_insert(key).clone(),
            Err(_) => key,
        }
    }
}

//! A node's TLS certificate and a client's trust in a gateway's nodes (specs/protocol.md,
//! "Nodes").
//!
//! Owns the node leaf ([`node_leaf`]): a self-signed Ed25519 certificate of the node's own key
//! that carries, in two X.509 extensions, its node certificate (signed by the gateway DID) and
//! the newest revocation list the node has; reading them back ([`leaf_extensions`]); and
//! [`GatewayTrust`], what a client pinned to a gateway DID accepts: a leaf whose key is the
//! pinned DID, or a leaf whose node certificate the pinned DID signed, valid now and not
//! revoked in the newest list seen. The checks themselves are `didgate_protocol::node`'s.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use didgate_protocol::node::{self, NodeCertError, NodeCertificate, NodeRevocations};
use didgate_protocol::{Did, Identity};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::cert::{SERVER_NAME, TlsError, caller_from_cert};

/// The content octets of the OID of the extension holding a node certificate:
/// `2.25.320112733608280063880670032677581775293.1` (a UUID OID, ITU-T X.667, with arc 1).
pub const NODE_CERT_OID: [u8; 21] = [
    0x69, 0x83, 0xe1, 0xd3, 0xbc, 0x93, 0x9d, 0x97, 0xca, 0x96, 0xe7, 0xa3, 0xd7, 0xb4, 0xa2, 0xd2,
    0x82, 0xa9, 0xc3, 0x3d, 0x01,
];

/// The content octets of the OID of the extension holding a revocation list: the same UUID
/// OID with arc 2.
pub const NODE_REVOCATIONS_OID: [u8; 21] = [
    0x69, 0x83, 0xe1, 0xd3, 0xbc, 0x93, 0x9d, 0x97, 0xca, 0x96, 0xe7, 0xa3, 0xd7, 0xb4, 0xa2, 0xd2,
    0x82, 0xa9, 0xc3, 0x3d, 0x02,
];

const ED25519: [u64; 4] = [1, 3, 101, 112];
const COMMON_NAME: [u64; 4] = [2, 5, 4, 3];
const SUBJECT_ALT_NAME: [u64; 4] = [2, 5, 29, 17];
/// UTCTime 1975-01-01T00:00:00Z (notBefore: the peer does not check dates).
const NOT_BEFORE: &[u8] = b"\x17\x0d750101000000Z";
/// GeneralizedTime 9999-12-31T23:59:59Z (RFC 5280: no well-defined expiration).
const NOT_AFTER: &[u8] = b"\x18\x0f99991231235959Z";

/// What a node presents beside its key: its certificate and, when it has one, the newest
/// revocation list of its gateway (both COSE_Sign1 bytes as the gateway signed them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCredentials {
    /// The node certificate.
    pub certificate: Vec<u8>,
    /// The revocation list the node staples, if any.
    pub revocations: Option<Vec<u8>>,
}

/// The node's self-signed TLS certificate and its private key: subject and issuer CN the
/// node's did:key, subjectAltName dNSName `didgate` and URI the node's did:key, and the two
/// extensions of `credentials` (non-critical; the list only when there is one).
pub fn node_leaf(
    identity: &Identity,
    credentials: &NodeCredentials,
) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let did = identity.did().as_str();
    let ed25519 = yasna::models::ObjectIdentifier::from_slice(&ED25519);
    let name = |w: yasna::DERWriter<'_>| {
        w.write_sequence(|w| {
            w.next().write_set(|w| {
                w.next().write_sequence(|w| {
                    w.next()
                        .write_oid(&yasna::models::ObjectIdentifier::from_slice(&COMMON_NAME));
                    w.next().write_utf8_string(did);
                });
            });
        });
    };
    let san = yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next()
                .write_tagged_implicit(yasna::Tag::context(2), |w| w.write_ia5_string(SERVER_NAME));
            w.next()
                .write_tagged_implicit(yasna::Tag::context(6), |w| w.write_ia5_string(did));
        });
    });
    // a positive serial that differs with the key and what is stapled
    let mut h = blake3::Hasher::new();
    h.update(identity.did().public_key_bytes());
    h.update(&credentials.certificate);
    if let Some(r) = &credentials.revocations {
        h.update(r);
    }
    let serial =
        u64::from_be_bytes(h.finalize().as_bytes()[..8].try_into().unwrap_or([1; 8])) >> 1 | 1;
    let tbs = yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next()
                .write_tagged(yasna::Tag::context(0), |w| w.write_u8(2));
            w.next().write_u64(serial);
            w.next().write_sequence(|w| w.next().write_oid(&ed25519));
            name(w.next());
            w.next().write_sequence(|w| {
                w.next().write_der(NOT_BEFORE);
                w.next().write_der(NOT_AFTER);
            });
            name(w.next());
            w.next().write_sequence(|w| {
                w.next().write_sequence(|w| w.next().write_oid(&ed25519));
                w.next()
                    .write_bitvec_bytes(identity.did().public_key_bytes(), 256);
            });
            w.next().write_tagged(yasna::Tag::context(3), |w| {
                w.write_sequence(|w| {
                    w.next().write_sequence(|w| {
                        w.next()
                            .write_oid(&yasna::models::ObjectIdentifier::from_slice(
                                &SUBJECT_ALT_NAME,
                            ));
                        w.next().write_bytes(&san);
                    });
                    extension(w.next(), &NODE_CERT_OID, &credentials.certificate);
                    if let Some(list) = &credentials.revocations {
                        extension(w.next(), &NODE_REVOCATIONS_OID, list);
                    }
                });
            });
        });
    });
    let signature = identity.sign(&tbs);
    let der = yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next().write_der(&tbs);
            w.next().write_sequence(|w| w.next().write_oid(&ed25519));
            w.next().write_bitvec_bytes(&signature, 512);
        });
    });
    let key = PrivatePkcs8KeyDer::from(identity.pkcs8_der().to_vec());
    (CertificateDer::from(der), PrivateKeyDer::Pkcs8(key))
}

/// One extension: `SEQUENCE { OID, OCTET STRING (DER of OCTET STRING (value)) }`.
fn extension(w: yasna::DERWriter<'_>, oid: &[u8], value: &[u8]) {
    let mut oid_tlv = Vec::with_capacity(oid.len() + 2);
    oid_tlv.push(0x06);
    oid_tlv.push(u8::try_from(oid.len()).unwrap_or(0));
    oid_tlv.extend_from_slice(oid);
    let inner = yasna::construct_der(|w| w.write_bytes(value));
    w.write_sequence(|w| {
        w.next().write_der(&oid_tlv);
        w.next().write_bytes(&inner);
    });
}

/// The node extensions of a leaf certificate (each absent when the leaf has none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeafExtensions {
    /// The node certificate's bytes.
    pub certificate: Option<Vec<u8>>,
    /// The stapled revocation list's bytes.
    pub revocations: Option<Vec<u8>>,
}

/// Reads the node extensions of a DER certificate (one of each at most; each value an OCTET
/// STRING holding the COSE_Sign1 bytes).
pub fn leaf_extensions(der: &[u8]) -> Result<LeafExtensions, TlsError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|_| TlsError::Certificate("not DER X.509"))?;
    let mut found = LeafExtensions::default();
    for ext in cert.extensions() {
        let slot = match ext.oid.as_bytes() {
            o if o == NODE_CERT_OID => &mut found.certificate,
            o if o == NODE_REVOCATIONS_OID => &mut found.revocations,
            _ => continue,
        };
        if slot.is_some() {
            return Err(TlsError::Certificate("a node extension twice"));
        }
        let value = yasna::parse_der(ext.value, |r| r.read_bytes())
            .map_err(|_| TlsError::Certificate("a node extension is not an OCTET STRING"))?;
        *slot = Some(value);
    }
    Ok(found)
}

/// What a server's leaf certificate showed a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presented {
    /// The leaf's key, as a did:key.
    pub key: Did,
    /// The node certificate, when the leaf's key is not the pinned DID but a node of it.
    pub node: Option<NodeCertificate>,
}

/// Why a client refused a server's leaf certificate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LeafError {
    /// Not a self-signed Ed25519 certificate, or a malformed node extension.
    #[error(transparent)]
    Certificate(#[from] TlsError),
    /// Another key than the pinned DID, with no node certificate.
    #[error("the gateway presented {presented}, not the pinned DID, and no node certificate")]
    NotPinned {
        /// The key presented.
        presented: Did,
    },
    /// A node certificate that does not hold for the pinned gateway now.
    #[error("the node {presented}'s certificate is refused: {source}")]
    Node {
        /// The key presented.
        presented: Did,
        /// Why.
        #[source]
        source: NodeCertError,
    },
}

impl LeafError {
    /// The key the server presented, when its certificate parsed.
    pub fn presented(&self) -> Option<&Did> {
        match self {
            Self::Certificate(_) => None,
            Self::NotPinned { presented } | Self::Node { presented, .. } => Some(presented),
        }
    }
}

/// A revocation list as opened and as signed.
pub type HeldRevocations = Arc<(NodeRevocations, Vec<u8>)>;

/// How many opened node certificates a [`GatewayTrust`] remembers.
const CERT_CACHE: usize = 64;

/// A client's trust in one gateway DID and its nodes: the pinned DID, the newest revocation
/// list of that gateway seen (given, or stapled by any node), and the node certificates
/// already verified. Shared by a client's TLS verifier and its answer checks.
#[derive(Debug)]
pub struct GatewayTrust {
    gateway: Did,
    revocations: RwLock<Option<HeldRevocations>>,
    /// Certificates whose gateway signature verified, by their bytes' BLAKE3 hash.
    opened: RwLock<HashMap<[u8; 32], NodeCertificate>>,
}

impl GatewayTrust {
    /// Trust in `gateway` with no revocation list yet.
    pub fn new(gateway: Did) -> Self {
        Self {
            gateway,
            revocations: RwLock::new(None),
            opened: RwLock::new(HashMap::new()),
        }
    }

    /// The pinned gateway DID.
    pub fn gateway(&self) -> &Did {
        &self.gateway
    }

    /// Takes `bytes` as the gateway's revocation list if the gateway signed it and it is newer
    /// (greater `seq`) than the one held. `Ok(true)` when it replaced it.
    pub fn learn_revocations(&self, bytes: &[u8]) -> Result<bool, NodeCertError> {
        let list = NodeRevocations::open(bytes, &self.gateway)?;
        let mut held = self
            .revocations
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if held.as_ref().is_some_and(|h| h.0.seq >= list.seq) {
            return Ok(false);
        }
        *held = Some(Arc::new((list, bytes.to_vec())));
        Ok(true)
    }

    /// The newest revocation list held and its bytes.
    pub fn revocations(&self) -> Option<HeldRevocations> {
        self.revocations
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Opens a node certificate of this gateway (its signature checked once per distinct
    /// certificate), without the time and key checks.
    fn open_cert(&self, bytes: &[u8]) -> Result<NodeCertificate, NodeCertError> {
        let hash = *blake3::hash(bytes).as_bytes();
        if let Some(c) = self
            .opened
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&hash)
        {
            return Ok(c.clone());
        }
        let cert = node::open(bytes, &self.gateway)?;
        let mut opened = self.opened.write().unwrap_or_else(PoisonError::into_inner);
        if opened.len() >= CERT_CACHE {
            opened.clear();
        }
        opened.insert(hash, cert.clone());
        Ok(cert)
    }

    /// Judges a server's leaf certificate at `now_ms`: its key is the pinned DID, or its node
    /// certificate (after learning the list it staples) holds for the pinned gateway and that
    /// key now.
    pub fn check_leaf(&self, der: &[u8], now_ms: u64) -> Result<Presented, LeafError> {
        let key = caller_from_cert(der)?.key().clone();
        if key == self.gateway {
            return Ok(Presented { key, node: None });
        }
        let ext = leaf_extensions(der)?;
        let Some(cert) = ext.certificate else {
            return Err(LeafError::NotPinned { presented: key });
        };
        if let Some(list) = &ext.revocations {
            // a list the gateway did not sign is ignored, never trusted
            let _ = self.learn_revocations(list);
        }
        match self.check_node(&cert, &key, now_ms) {
            Ok(node) => Ok(Presented {
                key,
                node: Some(node),
            }),
            Err(source) => Err(LeafError::Node {
                presented: key,
                source,
            }),
        }
    }

    /// Checks a node certificate for `key` at `at_ms` against the newest list held.
    pub fn check_node(
        &self,
        cert: &[u8],
        key: &Did,
        at_ms: u64,
    ) -> Result<NodeCertificate, NodeCertError> {
        let opened = self.open_cert(cert)?;
        let list = self.revocations();
        node::valid_for(&opened, key, at_ms, list.as_deref().map(|l| &l.0))?;
        Ok(opened)
    }

    /// The signer rule for an answer: `signer` is the pinned gateway with no certificate, or
    /// `node_cert` holds for it at `at_ms` ([`node::check_signer`]).
    pub fn check_signer(
        &self,
        signer: &Did,
        node_cert: Option<&[u8]>,
        at_ms: u64,
    ) -> Result<Option<NodeCertificate>, NodeCertError> {
        match node_cert {
            None => node::check_signer(signer, &self.gateway, None, at_ms, None),
            Some(cert) => self.check_node(cert, signer, at_ms).map(Some),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use didgate_protocol::message::SignedMessage;
    use didgate_protocol::node::Revoked;

    fn gateway() -> Identity {
        Identity::from_seed(&[0; 32])
    }

    fn cert(node: &Identity, serial: u64, from: u64, to: u64) -> Vec<u8> {
        NodeCertificate {
            v: 2,
            gateway: gateway().did().to_string(),
            node: node.did().to_string(),
            serial,
            not_before_ms: from,
            not_after_ms: to,
            addr: None,
        }
        .sign(&gateway())
    }

    fn list(seq: u64, serials: &[u64]) -> Vec<u8> {
        NodeRevocations {
            v: 2,
            gateway: gateway().did().to_string(),
            seq,
            time_ms: 10,
            revoked: serials
                .iter()
                .map(|&serial| Revoked {
                    serial,
                    time_ms: 10,
                })
                .collect(),
        }
        .sign(&gateway())
    }

    #[test]
    fn a_node_leaf_carries_its_certificate_and_list_and_is_a_did_certificate() {
        let node = Identity::from_seed(&[4; 32]);
        let creds = NodeCredentials {
            certificate: cert(&node, 1, 0, 100),
            revocations: Some(list(1, &[])),
        };
        let (leaf, _) = node_leaf(&node, &creds);
        assert_eq!(
            caller_from_cert(leaf.as_ref()).expect("caller").key(),
            node.did()
        );
        let ext = leaf_extensions(leaf.as_ref()).expect("extensions");
        assert_eq!(ext.certificate, Some(creds.certificate.clone()));
        assert_eq!(ext.revocations, creds.revocations);
        // the single-node leaf has neither
        let (plain, _) = crate::cert::self_signed(&node).expect("leaf");
        assert_eq!(
            leaf_extensions(plain.as_ref()).expect("extensions"),
            LeafExtensions::default()
        );
    }

    #[test]
    fn a_client_takes_the_pinned_key_or_a_node_certified_by_it_now() {
        let g = gateway();
        let trust = GatewayTrust::new(g.did().clone());
        let (own, _) = crate::cert::self_signed(&g).expect("leaf");
        assert_eq!(
            trust.check_leaf(own.as_ref(), 5).expect("pinned").node,
            None
        );
        let node = Identity::from_seed(&[4; 32]);
        let leaf = |c: Vec<u8>, l: Option<Vec<u8>>| {
            node_leaf(
                &node,
                &NodeCredentials {
                    certificate: c,
                    revocations: l,
                },
            )
            .0
        };
        let good = leaf(cert(&node, 1, 0, 100), None);
        assert!(trust.check_leaf(good.as_ref(), 50).is_ok());
        assert!(matches!(
            trust.check_leaf(good.as_ref(), 100),
            Err(LeafError::Node {
                source: NodeCertError::Expired { .. },
                ..
            })
        ));
        // signed by another key
        let foreign = Identity::from_seed(&[8; 32]);
        let mut forged =
            didgate_protocol::message::open::<NodeCertificate>(&cert(&node, 1, 0, 100))
                .expect("cert")
                .into_message();
        forged.serial = 2;
        let forged = leaf(forged.sign(&foreign), None);
        assert!(matches!(
            trust.check_leaf(forged.as_ref(), 50),
            Err(LeafError::Node {
                source: NodeCertError::Open(_),
                ..
            })
        ));
        // a node with no certificate
        let (bare, _) = crate::cert::self_signed(&node).expect("leaf");
        assert!(matches!(
            trust.check_leaf(bare.as_ref(), 50),
            Err(LeafError::NotPinned { .. })
        ));
        // revoked: a list stapled by another node is learnt, and refuses serial 1 from then on
        let other = Identity::from_seed(&[5; 32]);
        let stapling = node_leaf(
            &other,
            &NodeCredentials {
                certificate: cert(&other, 2, 0, 100),
                revocations: Some(list(3, &[1])),
            },
        )
        .0;
        assert!(trust.check_leaf(stapling.as_ref(), 50).is_ok());
        assert!(matches!(
            trust.check_leaf(good.as_ref(), 50),
            Err(LeafError::Node {
                source: NodeCertError::Revoked { serial: 1, .. },
                ..
            })
        ));
        // an older list stapled by the revoked node does not undo it
        let stale = leaf(cert(&node, 1, 0, 100), Some(list(2, &[])));
        assert!(trust.check_leaf(stale.as_ref(), 50).is_err());
        assert_eq!(trust.revocations().expect("list").0.seq, 3);
    }
}

//! Node certificates: one gateway identity served by many nodes (specs/protocol.md, "Nodes").
//!
//! Owns the two messages the gateway key signs for its nodes, [`NodeCertificate`] (this node
//! key may speak for the gateway DID from `not_before_ms` to `not_after_ms`) and
//! [`NodeRevocations`] (these serials no longer may, from a given time), and the pure checks
//! that every party applies to them: [`check`] (is this certificate valid for this key, for
//! this gateway, at this time, given what is revoked) and [`check_signer`] (the signer rule of
//! receipts, refusals, grants and checkpoints: the gateway itself, or a node it certified).
//! No clock, no I/O: callers pass `at_ms`.

use serde::{Deserialize, Serialize};

use crate::cbor::DecodeError;
use crate::did::Did;
use crate::envelope::Kind;
use crate::message::{
    self, Checkpoint, GrantBody, Message, OpenError, Receipt, Refusal, Signed, SignedMessage,
};
use crate::version::Version;

/// The longest validity window a node certificate may have: 30 days. Certificates are short
/// lived so that a stolen node key stops working by itself, even for a client that never
/// learns of a revocation.
pub const MAX_VALIDITY_MS: u64 = 30 * 24 * 3600 * 1000;

/// The most serials one revocation list holds (bounds the list a node staples).
pub const MAX_REVOKED: usize = 1024;

/// A gateway's statement that a node key speaks for it ([`Kind::Node`], signed by the gateway
/// DID). Version 2 only (amendment 2.7).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeCertificate {
    /// Message version: 2.
    pub v: u64,
    /// The gateway DID (the signer; what clients pin and requests name in `aud`).
    pub gateway: String,
    /// The node's did:key: the key of its TLS certificate and of what it signs.
    pub node: String,
    /// The serial, unique per gateway: what a revocation names.
    pub serial: u64,
    /// Valid from this time (ms since the epoch, inclusive).
    pub not_before_ms: u64,
    /// Valid until this time (ms since the epoch, exclusive).
    pub not_after_ms: u64,
    /// The UDP socket address the node may serve on (`host:port`), when constrained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
}

/// One revoked serial and the time from which it is revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revoked {
    /// The certificate serial.
    pub serial: u64,
    /// Revoked from this time (ms since the epoch): messages the node signed at or after it
    /// are refused; earlier ones stand.
    pub time_ms: u64,
}

/// The gateway's list of revoked node certificates ([`Kind::NodeRevocations`], signed by the
/// gateway DID). A list with a greater `seq` replaces one with a smaller. Version 2 only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRevocations {
    /// Message version: 2.
    pub v: u64,
    /// The gateway DID (the signer).
    pub gateway: String,
    /// Increases with every list the gateway signs.
    pub seq: u64,
    /// When the gateway signed it (ms since the epoch).
    pub time_ms: u64,
    /// The revoked serials, in increasing serial order, each once.
    pub revoked: Vec<Revoked>,
}

impl Message for NodeCertificate {
    fn version(&self) -> u64 {
        self.v
    }

    fn check_version(&self) -> Result<(), DecodeError> {
        if self.v < Version::V2.as_u64() {
            return Err(DecodeError::Version(self.v));
        }
        Ok(())
    }
}

impl SignedMessage for NodeCertificate {
    const KIND: Kind = Kind::Node;
}

impl Message for NodeRevocations {
    fn version(&self) -> u64 {
        self.v
    }

    fn check_version(&self) -> Result<(), DecodeError> {
        if self.v < Version::V2.as_u64() {
            return Err(DecodeError::Version(self.v));
        }
        if self.revoked.len() > MAX_REVOKED {
            return Err(DecodeError::Field("revoked"));
        }
        if self.revoked.windows(2).any(|w| w[0].serial >= w[1].serial) {
            return Err(DecodeError::Field("revoked"));
        }
        Ok(())
    }
}

impl SignedMessage for NodeRevocations {
    const KIND: Kind = Kind::NodeRevocations;
}

impl NodeRevocations {
    /// When `serial` is revoked from, if it is.
    pub fn revoked_from(&self, serial: u64) -> Option<u64> {
        self.revoked
            .binary_search_by_key(&serial, |r| r.serial)
            .ok()
            .map(|i| self.revoked[i].time_ms)
    }

    /// Opens a signed list and requires the signer and its `gateway` to be `gateway`.
    pub fn open(bytes: &[u8], gateway: &Did) -> Result<Self, NodeCertError> {
        let signed = message::open_from::<NodeRevocations>(bytes, gateway)?;
        let list = signed.into_message();
        if list.gateway != gateway.as_str() {
            return Err(NodeCertError::Gateway);
        }
        Ok(list)
    }
}

/// Why a node certificate (or a message's signer) is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NodeCertError {
    /// The certificate's envelope or payload failed, or another key signed it.
    #[error("node certificate does not open: {0}")]
    Open(#[from] OpenError),
    /// Its `gateway` field is not the gateway that signed it, or not the one expected.
    #[error("node certificate names another gateway")]
    Gateway,
    /// It certifies another key than the one that presented it or signed the message.
    #[error("node certificate is for another key")]
    Node,
    /// Its window is empty or longer than [`MAX_VALIDITY_MS`].
    #[error("node certificate validity window is empty or longer than 30 days")]
    Window,
    /// Not valid yet at the time checked.
    #[error("node certificate not valid before {not_before_ms} (checked at {at_ms})")]
    NotYetValid {
        /// Its start.
        not_before_ms: u64,
        /// The time checked.
        at_ms: u64,
    },
    /// Expired at the time checked.
    #[error("node certificate expired at {not_after_ms} (checked at {at_ms})")]
    Expired {
        /// Its end.
        not_after_ms: u64,
        /// The time checked.
        at_ms: u64,
    },
    /// Revoked (serial), from a time at or before the time checked.
    #[error("node certificate serial {serial} revoked from {from_ms}")]
    Revoked {
        /// The serial.
        serial: u64,
        /// Revoked from.
        from_ms: u64,
    },
    /// Signed by a key that is neither the gateway nor a node certified by it.
    #[error("signed by {signer}, which is neither the gateway {gateway} nor a node it certified")]
    Uncertified {
        /// Who signed.
        signer: Box<Did>,
        /// The gateway expected.
        gateway: Box<Did>,
    },
}

/// Checks a node certificate: signed by `gateway` (strictly, naming it in `gateway`), for
/// `node`, with a window of at most [`MAX_VALIDITY_MS`] that holds `at_ms`, and its serial not
/// revoked at `at_ms` in `revocations` (a list of `gateway`'s, already opened). Returns the
/// certificate.
pub fn check(
    bytes: &[u8],
    gateway: &Did,
    node: &Did,
    at_ms: u64,
    revocations: Option<&NodeRevocations>,
) -> Result<NodeCertificate, NodeCertError> {
    let cert = open(bytes, gateway)?;
    valid_for(&cert, node, at_ms, revocations)?;
    Ok(cert)
}

/// Opens a node certificate signed by `gateway` and checks what does not depend on time or
/// key: the signer, the `gateway` field, the window's shape.
pub fn open(bytes: &[u8], gateway: &Did) -> Result<NodeCertificate, NodeCertError> {
    let cert = message::open_from::<NodeCertificate>(bytes, gateway)?.into_message();
    if cert.gateway != gateway.as_str() {
        return Err(NodeCertError::Gateway);
    }
    if cert.not_after_ms <= cert.not_before_ms
        || cert.not_after_ms - cert.not_before_ms > MAX_VALIDITY_MS
    {
        return Err(NodeCertError::Window);
    }
    Ok(cert)
}

/// The time- and key-dependent half of [`check`], for a certificate already opened.
pub fn valid_for(
    cert: &NodeCertificate,
    node: &Did,
    at_ms: u64,
    revocations: Option<&NodeRevocations>,
) -> Result<(), NodeCertError> {
    if cert.node != node.as_str() {
        return Err(NodeCertError::Node);
    }
    if at_ms < cert.not_before_ms {
        return Err(NodeCertError::NotYetValid {
            not_before_ms: cert.not_before_ms,
            at_ms,
        });
    }
    if at_ms >= cert.not_after_ms {
        return Err(NodeCertError::Expired {
            not_after_ms: cert.not_after_ms,
            at_ms,
        });
    }
    if let Some(from_ms) = revocations.and_then(|r| r.revoked_from(cert.serial))
        && at_ms >= from_ms
    {
        return Err(NodeCertError::Revoked {
            serial: cert.serial,
            from_ms,
        });
    }
    Ok(())
}

/// The signer rule of what a gateway signs (receipts, refusals, grants, checkpoints): `signer`
/// is `gateway` itself with no certificate, or `node_cert` is a certificate by `gateway` for
/// `signer`, valid at `at_ms` (the message's time) and not revoked then. Returns the
/// certificate when a node signed.
pub fn check_signer(
    signer: &Did,
    gateway: &Did,
    node_cert: Option<&[u8]>,
    at_ms: u64,
    revocations: Option<&NodeRevocations>,
) -> Result<Option<NodeCertificate>, NodeCertError> {
    match node_cert {
        None if signer == gateway => Ok(None),
        None => Err(NodeCertError::Uncertified {
            signer: Box::new(signer.clone()),
            gateway: Box::new(gateway.clone()),
        }),
        Some(bytes) => check(bytes, gateway, signer, at_ms, revocations).map(Some),
    }
}

/// A message a gateway or one of its nodes signs: receipts, refusals, grants, checkpoints.
/// Says where its node certificate is and at which time the certificate must hold.
pub trait GatewaySigned: SignedMessage {
    /// The node certificate it carries (absent when the gateway's own key signed).
    fn node_cert(&self) -> Option<&[u8]>;
    /// The time the signer's certificate must be valid at: the message's `time_ms`; for a
    /// grant, its `expires_ms` (a node never issues a grant that outlives its certificate).
    fn signed_at_ms(&self) -> u64;
}

macro_rules! gateway_signed {
    ($t:ty, $at:ident) => {
        impl GatewaySigned for $t {
            fn node_cert(&self) -> Option<&[u8]> {
                self.node_cert.as_deref()
            }

            fn signed_at_ms(&self) -> u64 {
                self.$at
            }
        }
    };
}

gateway_signed!(Receipt, time_ms);
gateway_signed!(Refusal, time_ms);
gateway_signed!(Checkpoint, time_ms);
gateway_signed!(GrantBody, expires_ms);

/// Why a message that should come from a gateway was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignerError {
    /// The envelope or the payload failed.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// The signer is neither the gateway nor a node it certified for the message's time.
    #[error(transparent)]
    Node(#[from] NodeCertError),
}

/// Opens `bytes` as a `T` signed by `gateway` or by a node it certified ([`check_signer`] at
/// the message's [`GatewaySigned::signed_at_ms`]). `likely` is the key that most likely
/// signed (the connection's peer), to skip parsing the `kid` again. Returns the message and,
/// when a node signed, its certificate.
pub fn open_signed<T: GatewaySigned>(
    bytes: &[u8],
    gateway: &Did,
    likely: Option<&Did>,
    revocations: Option<&NodeRevocations>,
) -> Result<(Signed<T>, Option<NodeCertificate>), SignerError> {
    let signed = message::open_full::<T>(bytes, likely.or(Some(gateway)), |_, _| None)?;
    let m = signed.message();
    let cert = check_signer(
        signed.envelope().signer(),
        gateway,
        m.node_cert(),
        m.signed_at_ms(),
        revocations,
    )?;
    Ok((signed, cert))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Identity;

    fn gateway() -> Identity {
        Identity::from_seed(&[0; 32])
    }

    fn node() -> Identity {
        Identity::from_seed(&[3; 32])
    }

    fn cert(serial: u64) -> NodeCertificate {
        NodeCertificate {
            v: 2,
            gateway: gateway().did().to_string(),
            node: node().did().to_string(),
            serial,
            not_before_ms: 1_000,
            not_after_ms: 1_000 + 3_600_000,
            addr: None,
        }
    }

    #[test]
    fn a_certificate_holds_inside_its_window_only() {
        let bytes = cert(7).sign(&gateway());
        let (g, n) = (gateway(), node());
        assert_eq!(check(&bytes, g.did(), n.did(), 1_000, None), Ok(cert(7)));
        assert_eq!(
            check(&bytes, g.did(), n.did(), 999, None),
            Err(NodeCertError::NotYetValid {
                not_before_ms: 1_000,
                at_ms: 999
            })
        );
        assert!(matches!(
            check(&bytes, g.did(), n.did(), 3_601_000, None),
            Err(NodeCertError::Expired { .. })
        ));
        // for another key
        assert_eq!(
            check(&bytes, g.did(), g.did(), 2_000, None),
            Err(NodeCertError::Node)
        );
    }

    #[test]
    fn a_certificate_by_another_key_or_naming_another_gateway_is_refused() {
        let (g, n) = (gateway(), node());
        let foreign = Identity::from_seed(&[9; 32]);
        let bytes = cert(1).sign(&foreign);
        assert!(matches!(
            check(&bytes, g.did(), n.did(), 2_000, None),
            Err(NodeCertError::Open(OpenError::Signer { .. }))
        ));
        let mut c = cert(1);
        c.gateway = foreign.did().to_string();
        assert_eq!(
            check(&c.sign(&g), g.did(), n.did(), 2_000, None),
            Err(NodeCertError::Gateway)
        );
        let mut long = cert(1);
        long.not_after_ms = long.not_before_ms + MAX_VALIDITY_MS + 1;
        assert_eq!(
            check(&long.sign(&g), g.did(), n.did(), 2_000, None),
            Err(NodeCertError::Window)
        );
    }

    #[test]
    fn a_revoked_serial_is_refused_from_its_revocation_time() {
        let (g, n) = (gateway(), node());
        let list = NodeRevocations {
            v: 2,
            gateway: g.did().to_string(),
            seq: 1,
            time_ms: 5_000,
            revoked: vec![Revoked {
                serial: 7,
                time_ms: 5_000,
            }],
        };
        let list = NodeRevocations::open(&list.sign(&g), g.did()).expect("list");
        let bytes = cert(7).sign(&g);
        assert!(check(&bytes, g.did(), n.did(), 4_999, Some(&list)).is_ok());
        assert_eq!(
            check(&bytes, g.did(), n.did(), 5_000, Some(&list)),
            Err(NodeCertError::Revoked {
                serial: 7,
                from_ms: 5_000
            })
        );
        assert!(check(&cert(8).sign(&g), g.did(), n.did(), 6_000, Some(&list)).is_ok());
    }

    #[test]
    fn version_1_and_unsorted_lists_do_not_decode() {
        let g = gateway();
        let mut c = cert(1);
        c.v = 1;
        assert!(check(&c.sign(&g), g.did(), node().did(), 2_000, None).is_err());
        let list = NodeRevocations {
            v: 2,
            gateway: g.did().to_string(),
            seq: 1,
            time_ms: 0,
            revoked: vec![
                Revoked {
                    serial: 2,
                    time_ms: 0,
                },
                Revoked {
                    serial: 2,
                    time_ms: 0,
                },
            ],
        };
        assert!(NodeRevocations::open(&list.sign(&g), g.did()).is_err());
    }

    #[test]
    fn the_signer_rule_takes_the_gateway_or_a_certified_node() {
        let (g, n) = (gateway(), node());
        assert_eq!(check_signer(g.did(), g.did(), None, 0, None), Ok(None));
        assert!(matches!(
            check_signer(n.did(), g.did(), None, 2_000, None),
            Err(NodeCertError::Uncertified { .. })
        ));
        let bytes = cert(3).sign(&g);
        assert_eq!(
            check_signer(n.did(), g.did(), Some(&bytes), 2_000, None),
            Ok(Some(cert(3)))
        );
    }

    #[test]
    fn node_cert_is_a_version_2_field_of_what_a_gateway_signs() {
        use crate::message::{EntryRef, Receipt};
        let mut r = Receipt {
            v: 2,
            call: [1; 32],
            grant: [2; 16],
            client: node().did().to_string(),
            status: 200,
            resp_len: 0,
            resp_b3: [3; 32],
            entry: EntryRef {
                seq: 4,
                hash: [5; 32],
            },
            root: None,
            time_ms: 6,
            node_cert: Some(cert(1).sign(&gateway())),
        };
        let bytes = r.encode();
        assert_eq!(Receipt::decode(&bytes), Ok(r.clone()));
        assert_eq!(Receipt::decode_plain(&bytes), Some(r.clone()));
        r.v = 1;
        let bytes = r.encode();
        assert!(Receipt::decode(&bytes).is_err());
        assert_eq!(Receipt::decode_plain(&bytes), None);
        // absent when the gateway signs: the encoding has no such key
        r.node_cert = None;
        assert!(!r.encode().windows(9).any(|w| w == b"node_cert"));
    }
}

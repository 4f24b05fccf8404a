//! Node certificates as the readers of chains apply them (issue 22, amendment 2.7;
//! specs/protocol.md "Nodes", specs/audit-log.md "Receipt checks").
//!
//! Owns the node revocation lists a reader is given ([`Revocations`]: signed lists, the newest
//! `seq` per gateway) and the signer rule as the verifier and the evidence check apply it
//! ([`SignerRule`]): [`node::check_signer`] with each distinct certificate opened once per
//! gateway, so a chain of many receipts from one node checks the gateway's signature on the
//! node's certificate once. It does not own the certificate and list formats nor the rule
//! itself: those are `didgate_protocol::node`'s. No clock: times are the messages' own.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

use didgate_protocol::message::{self, OpenError};
use didgate_protocol::node::{self, NodeCertError, NodeCertificate, NodeRevocations};
use didgate_protocol::{Did, DidError};

/// The node revocation lists given to a reader, at most one per gateway: of the lists given for
/// one gateway, the one with the greatest `seq` (the first given among equal ones). Each was
/// opened under the gateway it names, so only that gateway's signature puts a list here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revocations {
    /// Gateway DID -> its newest list.
    lists: BTreeMap<Did, NodeRevocations>,
}

/// Why a revocation list was not taken ([`Revocations::add`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RevocationsError {
    /// Not a signed node revocation list: the envelope, the signature or the payload fails.
    #[error("not a signed node revocation list: {0}")]
    Open(#[source] OpenError),
    /// Its `gateway` is not a did:key.
    #[error("the list names a gateway that is not a did:key: {0}")]
    Gateway(#[source] DidError),
    /// It is not signed by the gateway it names.
    #[error("the list is not signed by the gateway it names: {0}")]
    Signer(#[source] NodeCertError),
}

impl Revocations {
    /// No list: no certificate is revoked.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes a signed list (the COSE bytes a gateway signs, kind `node-revocations`), which
    /// must open under the gateway its `gateway` field names ([`NodeRevocations::open`]). It
    /// replaces that gateway's list if its `seq` is greater. Returns the list as opened.
    pub fn add(&mut self, bytes: &[u8]) -> Result<NodeRevocations, RevocationsError> {
        let claimed = message::open::<NodeRevocations>(bytes)
            .map_err(RevocationsError::Open)?
            .into_message();
        let gateway = Did::parse(&claimed.gateway).map_err(RevocationsError::Gateway)?;
        let list = NodeRevocations::open(bytes, &gateway).map_err(RevocationsError::Signer)?;
        match self.lists.get(&gateway) {
            Some(held) if held.seq >= list.seq => {}
            _ => {
                self.lists.insert(gateway, list.clone());
            }
        }
        Ok(list)
    }

    /// The list held for `gateway`, if one was given.
    pub fn of(&self, gateway: &Did) -> Option<&NodeRevocations> {
        self.lists.get(gateway)
    }

    /// Whether no list is held.
    pub fn is_empty(&self) -> bool {
        self.lists.is_empty()
    }

    /// The lists held, one per gateway, in gateway DID order.
    pub fn iter(&self) -> impl Iterator<Item = &NodeRevocations> {
        self.lists.values()
    }
}

/// Certificates opened under a gateway: bytes -> gateway -> the verdict of [`node::open`].
type Opened = HashMap<Vec<u8>, HashMap<Did, Result<NodeCertificate, NodeCertError>>>;

/// The signer rule of what a gateway signs (receipts, refusals, grants, checkpoints) with the
/// revocation lists given: [`node::check_signer`], each distinct certificate opened (its
/// signature checked) once per gateway and kept for the rest of the run. Not for sharing
/// between threads; one per run.
#[derive(Debug)]
pub struct SignerRule<'a> {
    revocations: &'a Revocations,
    opened: RefCell<Opened>,
}

impl<'a> SignerRule<'a> {
    /// The rule under `revocations`.
    pub fn new(revocations: &'a Revocations) -> Self {
        Self {
            revocations,
            opened: RefCell::new(HashMap::new()),
        }
    }

    /// The revocation lists it applies.
    pub fn revocations(&self) -> &'a Revocations {
        self.revocations
    }

    /// [`node::check_signer`] with the list given for `gateway`: `signer` is `gateway` with no
    /// certificate, or `node_cert` is a certificate by `gateway` for `signer`, valid at `at_ms`
    /// and not revoked then. Returns the certificate when a node signed.
    pub fn check(
        &self,
        signer: &Did,
        gateway: &Did,
        node_cert: Option<&[u8]>,
        at_ms: u64,
    ) -> Result<Option<NodeCertificate>, NodeCertError> {
        let revoked = self.revocations.of(gateway);
        let Some(bytes) = node_cert else {
            return node::check_signer(signer, gateway, None, at_ms, revoked);
        };
        // node::check is node::open then node::valid_for; the first half is kept
        let cert = self.open(bytes, gateway)?;
        node::valid_for(&cert, signer, at_ms, revoked)?;
        Ok(Some(cert))
    }

    /// A certificate checked against the gateway it names itself (its own `gateway` field), for
    /// a message no request ties to a gateway (a checkpoint): it must open under that gateway
    /// and hold for `signer` at `at_ms`, not revoked in that gateway's list. A `gateway` that is
    /// not a did:key fails as [`NodeCertError::Gateway`].
    pub fn check_named(
        &self,
        signer: &Did,
        node_cert: &[u8],
        at_ms: u64,
    ) -> Result<NodeCertificate, NodeCertError> {
        let claimed = message::open::<NodeCertificate>(node_cert)?.into_message();
        let gateway = Did::parse(&claimed.gateway).map_err(|_| NodeCertError::Gateway)?;
        self.check(signer, &gateway, Some(node_cert), at_ms)?
            .ok_or(NodeCertError::Gateway)
    }

    /// [`node::open`] of `bytes` under `gateway`, from the memo when it was opened before.
    fn open(&self, bytes: &[u8], gateway: &Did) -> Result<NodeCertificate, NodeCertError> {
        let mut opened = self.opened.borrow_mut();
        if let Some(verdict) = opened.get(bytes).and_then(|per| per.get(gateway)) {
            return verdict.clone();
        }
        let verdict = node::open(bytes, gateway);
        opened
            .entry(bytes.to_vec())
            .or_default()
            .insert(gateway.clone(), verdict.clone());
        verdict
    }
}

#[cfg(test)]
mod tests {
    use didgate_protocol::Identity;
    use didgate_protocol::message::SignedMessage;
    use didgate_protocol::node::Revoked;

    use super::*;

    fn gateway() -> Identity {
        Identity::from_seed(&[0x40; 32])
    }

    fn node_key() -> Identity {
        Identity::from_seed(&[0x41; 32])
    }

    fn cert(serial: u64, by: &Identity) -> Vec<u8> {
        NodeCertificate {
            v: 2,
            gateway: gateway().did().to_string(),
            node: node_key().did().to_string(),
            serial,
            not_before_ms: 1_000,
            not_after_ms: 10_000,
            addr: None,
        }
        .sign(by)
    }

    fn list(seq: u64, revoked: Vec<Revoked>, by: &Identity) -> Vec<u8> {
        NodeRevocations {
            v: 2,
            gateway: gateway().did().to_string(),
            seq,
            time_ms: 5_000,
            revoked,
        }
        .sign(by)
    }

    #[test]
    fn the_newest_list_of_each_gateway_wins() {
        let g = gateway();
        let mut r = Revocations::new();
        let seven = Revoked {
            serial: 7,
            time_ms: 5_000,
        };
        r.add(&list(2, vec![seven], &g)).expect("list 2");
        r.add(&list(1, vec![], &g)).expect("list 1");
        assert_eq!(r.of(g.did()).map(|l| l.seq), Some(2));
        r.add(&list(3, vec![], &g)).expect("list 3");
        assert_eq!(r.of(g.did()).map(|l| l.revoked.len()), Some(0));
        assert_eq!(r.iter().count(), 1);
    }

    #[test]
    fn a_list_that_does_not_open_under_the_gateway_it_names_is_refused() {
        let mut r = Revocations::new();
        assert!(matches!(
            r.add(&list(1, vec![], &node_key())),
            Err(RevocationsError::Signer(_))
        ));
        assert!(matches!(
            r.add(b"not a list"),
            Err(RevocationsError::Open(_))
        ));
        // a certificate is not a list
        assert!(matches!(
            r.add(&cert(1, &gateway())),
            Err(RevocationsError::Open(_))
        ));
        assert!(r.is_empty());
    }

    /// The rule with a memo agrees with the protocol's `check_signer`, first time and again.
    #[test]
    fn the_rule_is_the_protocols_check_signer() {
        let (g, n, foreign) = (gateway(), node_key(), Identity::from_seed(&[0x42; 32]));
        let mut revocations = Revocations::new();
        let revoked = Revoked {
            serial: 7,
            time_ms: 5_000,
        };
        revocations.add(&list(1, vec![revoked], &g)).expect("list");
        let rule = SignerRule::new(&revocations);
        let certs = [
            cert(7, &g),
            cert(8, &g),
            cert(8, &foreign),
            b"junk".to_vec(),
        ];
        for _ in 0..2 {
            for bytes in certs.iter().map(|c| Some(c.as_slice())).chain([None]) {
                for signer in [g.did(), n.did(), foreign.did()] {
                    for gw in [g.did(), foreign.did()] {
                        for at in [999, 1_000, 4_999, 5_000, 9_999, 10_000] {
                            assert_eq!(
                                rule.check(signer, gw, bytes, at),
                                node::check_signer(signer, gw, bytes, at, revocations.of(gw)),
                                "{signer} {gw} {at}"
                            );
                        }
                    }
                }
            }
        }
        assert_eq!(
            rule.check_named(n.did(), &certs[1], 2_000)
                .map(|c| c.serial),
            Ok(8)
        );
        assert!(rule.check_named(n.did(), &certs[0], 6_000).is_err());
        assert!(rule.check_named(n.did(), &certs[2], 2_000).is_err());
        assert!(rule.check_named(g.did(), &certs[1], 2_000).is_err());
    }
}

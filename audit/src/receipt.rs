//! The rules a receipt must satisfy (specs/audit-log.md, "Receipt checks"), in one place for
//! both users: the chain verifier ([`crate::verify`]) and the evidence check
//! ([`crate::evidence`]). A receipt answers a request when it names the request's call and
//! signer and its signer speaks for the gateway the request addressed ([`answers`]); it is
//! closed by an entry when that entry is the call's `executed` entry at the receipt's seq with
//! the receipt's outcome ([`closed_by`]).
//!
//! The signer rule (amendment 2.7, issue 22; [`signed_for`]) is shared with refusals and
//! grants: the message is signed by the DID the request's `aud` names and carries no
//! `node_cert`, or it carries a `node_cert` that is a node certificate signed by that gateway
//! for the message's signer key, valid at the message's time (a receipt's or refusal's
//! `time_ms`, a grant's `expires_ms`) and not revoked at that time in the revocation list given
//! for that gateway, if any ([`didgate_protocol::node::check_signer`]).

use didgate_protocol::Did;
use didgate_protocol::message::{Digest, Receipt};
use didgate_protocol::node::{NodeCertError, NodeCertificate};

use crate::entry::{Entry, EntryKind};
use crate::nodes::SignerRule;

/// Which rule a receipt breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// Its `call` is not the request's call ID.
    Call,
    /// Its `client` is not the request's signer (the did:key that signed it).
    Client,
    /// It carries no node certificate and is signed by another key than the gateway the
    /// request's `aud` names (or `aud` is not a did:key).
    Audience,
    /// It carries a node certificate that does not make its signer a node of the gateway the
    /// request's `aud` names at the message's time: signed by another key, altered, for
    /// another key, naming another gateway, not valid then, or revoked then.
    NodeCertificate(NodeCertError),
    /// The entry it names is not an `executed` entry (it is of this kind).
    NotExecuted(EntryKind),
    /// The entry it names sits at another seq than the receipt's `entry.seq`.
    Seq,
    /// The entry it names closes another call.
    EntryCall,
    /// The entry's outcome differs: `status`, `resp_len` or `resp_b3`.
    Outcome(&'static str),
}

/// Whether `receipt`, signed by the key `signed_by`, answers the request with call ID `call`,
/// signed by `signer` and addressed to `aud`, under `rule` (the revocation lists given).
/// Checked in this order: call, client, signer ([`signed_for`] at the receipt's `time_ms`).
/// Returns the node certificate when a node of the `aud` gateway signed.
pub fn answers(
    receipt: &Receipt,
    signed_by: &Did,
    call: &Digest,
    signer: &Did,
    aud: &str,
    rule: &SignerRule<'_>,
) -> Result<Option<NodeCertificate>, Fault> {
    if receipt.call != *call {
        return Err(Fault::Call);
    }
    if receipt.client != signer.as_str() {
        return Err(Fault::Client);
    }
    signed_for(
        signed_by,
        aud,
        receipt.node_cert.as_deref(),
        receipt.time_ms,
        rule,
    )
}

/// The signer rule of what a gateway signs in answer to a request addressed to `aud`: with no
/// `node_cert`, `signed_by` must be the DID `aud` names ([`Fault::Audience`]); with one, it must
/// be a certificate by that gateway for `signed_by`, valid at `at_ms` and not revoked then in
/// the list `rule` holds for that gateway ([`Fault::NodeCertificate`]; an `aud` that is not a
/// did:key then fails as [`NodeCertError::Gateway`]). Returns the certificate when a node
/// signed.
pub fn signed_for(
    signed_by: &Did,
    aud: &str,
    node_cert: Option<&[u8]>,
    at_ms: u64,
    rule: &SignerRule<'_>,
) -> Result<Option<NodeCertificate>, Fault> {
    let Ok(gateway) = Did::parse(aud) else {
        return Err(match node_cert {
            None => Fault::Audience,
            Some(_) => Fault::NodeCertificate(NodeCertError::Gateway),
        });
    };
    rule.check(signed_by, &gateway, node_cert, at_ms)
        .map_err(|e| match e {
            NodeCertError::Uncertified { .. } => Fault::Audience,
            e => Fault::NodeCertificate(e),
        })
}

/// Whether `entry`, stored at `seq` of the gateway's chain (the one the receipt names by seq
/// and hash; the hash is the caller's to check), closes the receipt's call with its outcome.
/// Checked in this order: kind, seq, call, status, resp_len, resp_b3.
pub fn closed_by(receipt: &Receipt, seq: u64, entry: &Entry) -> Result<(), Fault> {
    if entry.kind != EntryKind::Executed {
        return Err(Fault::NotExecuted(entry.kind));
    }
    if entry.seq != seq || seq != receipt.entry.seq {
        return Err(Fault::Seq);
    }
    if entry.call != Some(receipt.call) {
        return Err(Fault::EntryCall);
    }
    if entry.status != Some(receipt.status) {
        return Err(Fault::Outcome("status"));
    }
    if entry.resp_len != Some(receipt.resp_len) {
        return Err(Fault::Outcome("resp_len"));
    }
    if entry.resp_b3 != Some(receipt.resp_b3) {
        return Err(Fault::Outcome("resp_b3"));
    }
    Ok(())
}

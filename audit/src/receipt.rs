//! The rules a receipt must satisfy (specs/audit-log.md, "Receipt checks"), in one place for
//! both users: the chain verifier ([`crate::verify`]) and the evidence check
//! ([`crate::evidence`]). A receipt answers a request when it names the request's call and
//! signer and is signed by the gateway the request addressed; it is closed by an entry when
//! that entry is the call's `executed` entry at the receipt's seq with the receipt's outcome.

use didgate_protocol::Did;
use didgate_protocol::message::{Digest, Receipt};

use crate::entry::{Entry, EntryKind};

/// Which rule a receipt breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Its `call` is not the request's call ID.
    Call,
    /// Its `client` is not the request's signer (the did:key that signed it).
    Client,
    /// It is signed by another gateway than the request's `aud` names.
    Audience,
    /// The entry it names is not an `executed` entry (it is of this kind).
    NotExecuted(EntryKind),
    /// The entry it names sits at another seq than the receipt's `entry.seq`.
    Seq,
    /// The entry it names closes another call.
    EntryCall,
    /// The entry's outcome differs: `status`, `resp_len` or `resp_b3`.
    Outcome(&'static str),
}

/// Whether `receipt`, signed by `gateway`, answers the request with call ID `call`, signed by
/// `signer` and addressed to `aud`. Checked in this order: call, client, audience.
///
/// The signer rule is today's: the receipt's signer is the DID the request's `aud` names. (A
/// later version may also accept a node the `aud` gateway certified; see "Format evolution".)
pub fn answers(
    receipt: &Receipt,
    gateway: &Did,
    call: &Digest,
    signer: &Did,
    aud: &str,
) -> Result<(), Fault> {
    if receipt.call != *call {
        return Err(Fault::Call);
    }
    if receipt.client != signer.as_str() {
        return Err(Fault::Client);
    }
    if aud != gateway.as_str() {
        return Err(Fault::Audience);
    }
    Ok(())
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

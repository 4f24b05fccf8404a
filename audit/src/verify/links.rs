//! Cross-links between chains: each receipt and refusal a client chain holds against the
//! gateway chain that signed it (the entry it names, the call, the digests, the Merkle root a
//! receipt carries), and each executing gateway entry against the client chain its request
//! names (the request recorded there, the client head it carried). Also the signer rule of
//! what a gateway signs in answer to a request (receipts, refusals, grants): the node
//! certificate it carries, against the gateway the request addressed.

use std::collections::{HashMap, HashSet};

use didgate_protocol::Did;
use didgate_protocol::message::{Digest, Receipt, Refusal, Request};

use super::chain::Checked;
use super::findings::Ctx;
use super::gateway::Executing;
use super::report::ViolationKind;
use super::signatures::{Opened, Sigs};
use crate::entry::Entry;
use crate::nodes::SignerRule;
use crate::receipt::{self, Fault};

/// The given gateway chains, as the cross-link checks read them.
pub(super) struct Gateways<'a> {
    /// The checked gateway chains.
    pub(super) chains: &'a [Checked],
    /// Index in `chains` of each gateway's DID.
    pub(super) dids: &'a HashMap<Did, usize>,
    /// Their executing entries by call.
    pub(super) executing: &'a Executing<'a>,
    /// The signer rule, with the node revocation lists given.
    pub(super) rule: &'a SignerRule<'a>,
}

impl Gateways<'_> {
    /// The chain of the gateway `signer` names, if it was given.
    fn of(&self, signer: &Did) -> Option<&Checked> {
        self.dids.get(signer).map(|i| &self.chains[*i])
    }
}

/// A client's receipt (`bytes`, in its result entry `e`) against the request it answers
/// (`asked`: the request's `aud` and signer) and against the chain of the gateway that signed
/// it.
pub(super) fn check_receipt(
    c: &Checked,
    e: &Entry,
    bytes: &[u8],
    asked: Option<&(String, Did)>,
    gateways: &Gateways<'_>,
    sigs: &Sigs<'_>,
    cx: &mut Ctx,
) {
    let seq = Some(e.seq);
    let receipt = match sigs.open::<Receipt>(bytes) {
        Ok(r) => r,
        Err(err) => {
            return cx.flag(
                &c.label,
                seq,
                ViolationKind::BadSignature,
                format!("receipt: {err}"),
            );
        }
    };
    check_receipt_answers(c, e, &receipt, asked, gateways.rule, cx);
    if e.peer_entry != Some(receipt.message.entry) {
        cx.flag(
            &c.label,
            seq,
            ViolationKind::DigestMismatch,
            "recorded gateway entry differs from the receipt's",
        );
    }
    let Some(g) = gateways.of(receipt.envelope.signer()) else {
        if !gateways.chains.is_empty() {
            cx.flag(
                &c.label,
                seq,
                ViolationKind::BadSignature,
                "receipt signed by no given gateway",
            );
        }
        return;
    };
    check_receipt_entry(c, e, g, &receipt.message, cx);
    if !gateways.executing.contains_key(&receipt.message.call) {
        cx.flag(
            &c.label,
            seq,
            ViolationKind::ReceiptMismatch,
            format!("{} has no executing entry for this call", g.label),
        );
    }
    check_receipt_root(c, e, g, &receipt, gateways.dids, cx);
}

/// The receipt answers the request: its call, the client that signed the request and the
/// gateway the request addressed, directly or through a node it certified
/// ([`receipt::answers`]). Without the request, its call and, when it carries one, its node
/// certificate against the gateway that certificate names.
fn check_receipt_answers(
    c: &Checked,
    e: &Entry,
    receipt: &Opened<'_, Receipt>,
    asked: Option<&(String, Did)>,
    rule: &SignerRule<'_>,
    cx: &mut Ctx,
) {
    let seq = Some(e.seq);
    let r = &receipt.message;
    let fault = match (asked, e.call) {
        (Some((aud, signer)), Some(call)) => {
            receipt::answers(r, receipt.envelope.signer(), &call, signer, aud, rule).err()
        }
        _ if Some(r.call) != e.call => Some(Fault::Call),
        _ => unasked(
            receipt.envelope.signer(),
            r.node_cert.as_deref(),
            r.time_ms,
            rule,
        ),
    };
    match fault {
        Some(Fault::Call) => cx.flag(
            &c.label,
            seq,
            ViolationKind::CallIdMismatch,
            "receipt is for another call",
        ),
        Some(Fault::Client) => cx.flag(
            &c.label,
            seq,
            ViolationKind::ReceiptMismatch,
            format!(
                "the receipt names client {}, the request is signed by {}",
                receipt.message.client,
                asked.map_or("?".into(), |(_, s)| s.to_string())
            ),
        ),
        Some(Fault::NodeCertificate(err)) => cx.flag(
            &c.label,
            seq,
            ViolationKind::BadNodeCertificate,
            format!("the receipt's node certificate does not hold: {err}"),
        ),
        Some(_) => cx.flag(
            &c.label,
            seq,
            ViolationKind::BadSignature,
            "receipt signed by another gateway than the request addressed",
        ),
        None => {}
    }
}

/// The node certificate of an answer whose request is unknown (its chain holds no request for
/// the call: reported apart): checked against the gateway it names itself.
fn unasked(
    signer: &Did,
    node_cert: Option<&[u8]>,
    at_ms: u64,
    rule: &SignerRule<'_>,
) -> Option<Fault> {
    let cert = node_cert?;
    rule.check_named(signer, cert, at_ms)
        .err()
        .map(Fault::NodeCertificate)
}

/// A signed answer other than a receipt (a refusal, a grant), as the signer rule sees it.
pub(super) struct Answer<'m> {
    /// What it is, for the report: `refusal`, `grant`.
    pub(super) what: &'static str,
    /// The key that signed it.
    pub(super) signer: &'m Did,
    /// The node certificate it carries.
    pub(super) node_cert: Option<&'m [u8]>,
    /// The time the certificate must hold at: a refusal's `time_ms`, a grant's `expires_ms`.
    pub(super) at_ms: u64,
}

/// The node certificate a refusal or grant carries, if any: the signer rule against the
/// request's `aud` (`asked`) at the answer's time ([`receipt::signed_for`]), or, without the
/// request, against the gateway the certificate names; `bad_node_certificate` if it fails.
/// An answer without a certificate is not judged here.
pub(super) fn check_answer_node_cert(
    c: &Checked,
    e: &Entry,
    answer: &Answer<'_>,
    asked: Option<&(String, Did)>,
    rule: &SignerRule<'_>,
    cx: &mut Ctx,
) {
    if answer.node_cert.is_none() {
        return;
    }
    let fault = match asked {
        Some((aud, _)) => {
            receipt::signed_for(answer.signer, aud, answer.node_cert, answer.at_ms, rule).err()
        }
        None => unasked(answer.signer, answer.node_cert, answer.at_ms, rule),
    };
    if let Some(fault) = fault {
        let why = match fault {
            Fault::NodeCertificate(err) => err.to_string(),
            other => format!("{other:?}"),
        };
        cx.flag(
            &c.label,
            Some(e.seq),
            ViolationKind::BadNodeCertificate,
            format!(
                "the {}'s node certificate does not hold: {why}",
                answer.what
            ),
        );
    }
}

/// The gateway entry a receipt names is in the gateway's chain `g` and is this call's
/// executed entry, with the receipt's status and digests ([`receipt::closed_by`]).
fn check_receipt_entry(c: &Checked, e: &Entry, g: &Checked, r: &Receipt, cx: &mut Ctx) {
    let seq = Some(e.seq);
    match g.at(r.entry.seq) {
        Some(it) if it.hash == r.entry.hash => match receipt::closed_by(r, it.key, &it.entry) {
            Ok(()) => {}
            Err(Fault::Outcome(field)) => cx.flag(
                &c.label,
                seq,
                ViolationKind::DigestMismatch,
                format!("{field} differs from the gateway's entry"),
            ),
            Err(_) => cx.flag(
                &c.label,
                seq,
                ViolationKind::ReceiptMismatch,
                format!(
                    "{} seq {} is not this call's executed entry",
                    g.label, r.entry.seq
                ),
            ),
        },
        _ => cx.flag(
            &c.label,
            seq,
            ViolationKind::ReceiptMismatch,
            format!("{} seq {} is missing or different", g.label, r.entry.seq),
        ),
    }
}

/// The Merkle root a receipt carries: recorded as a root its gateway signed (two roots for one
/// size are a fork), and equal to the gateway chain's root at the receipt's size (precomputed
/// by [`Sigs::receipt_roots`]), unless the chain's positions are unknown.
fn check_receipt_root(
    c: &Checked,
    e: &Entry,
    g: &Checked,
    receipt: &Opened<'_, Receipt>,
    dids: &HashMap<Did, usize>,
    cx: &mut Ctx,
) {
    let r = &receipt.message;
    let Some(root) = r.root else { return };
    let size = r.entry.seq + 1;
    let mut roots = std::mem::take(&mut cx.roots);
    roots.record(
        receipt.envelope.signer().as_str(),
        size,
        root,
        format!("{} seq {} (receipt)", c.label, e.seq),
        &c.label,
        cx,
    );
    cx.roots = roots;
    let have = match (receipt.root_at, dids.get(receipt.envelope.signer())) {
        (Some((i, precomputed)), Some(gi)) if i == *gi => precomputed,
        _ => g.tree.root_at(size),
    };
    if g.gaps {
        *cx.receipt_roots_unchecked
            .entry(g.label.clone())
            .or_default() += 1;
    } else if have.is_some_and(|have| have != root) {
        cx.flag(
            &c.label,
            Some(e.seq),
            ViolationKind::ReceiptMismatch,
            format!(
                "the receipt's root differs from {}'s root at size {size}",
                g.label
            ),
        );
    }
}

/// A client's refusal (`bytes`, in its result entry `e`): for this call, its node
/// certificate if it carries one (against the request's `aud`, `asked`), and recorded by the
/// gateway entry it names, when it names one.
pub(super) fn check_refusal(
    c: &Checked,
    e: &Entry,
    bytes: &[u8],
    asked: Option<&(String, Did)>,
    gateways: &Gateways<'_>,
    sigs: &Sigs<'_>,
    cx: &mut Ctx,
) {
    let seq = Some(e.seq);
    let refusal = match sigs.open::<Refusal>(bytes) {
        Ok(r) => r,
        Err(err) => {
            return cx.flag(
                &c.label,
                seq,
                ViolationKind::BadSignature,
                format!("refusal: {err}"),
            );
        }
    };
    if refusal.message.call.is_some() && refusal.message.call != e.call {
        cx.flag(
            &c.label,
            seq,
            ViolationKind::CallIdMismatch,
            "refusal is for another call",
        );
    }
    let answer = Answer {
        what: "refusal",
        signer: refusal.envelope.signer(),
        node_cert: refusal.message.node_cert.as_deref(),
        at_ms: refusal.message.time_ms,
    };
    check_answer_node_cert(c, e, &answer, asked, gateways.rule, cx);
    let (Some(g), Some(at)) = (
        gateways.of(refusal.envelope.signer()),
        refusal.message.entry,
    ) else {
        if !gateways.chains.is_empty() && gateways.of(refusal.envelope.signer()).is_none() {
            cx.flag(
                &c.label,
                seq,
                ViolationKind::BadSignature,
                "refusal signed by no given gateway",
            );
        }
        return;
    };
    match g.at(at.seq) {
        Some(it) if it.hash == at.hash && it.entry.call == refusal.message.call => {}
        _ => cx.flag(
            &c.label,
            seq,
            ViolationKind::ReceiptMismatch,
            format!("{} seq {} does not record this refusal", g.label, at.seq),
        ),
    }
}

/// Gateway -> client links, for clients whose chains were given: each executing entry, in
/// gateway and seq order, against the client chain its request's head names (the request
/// recorded there, byte for byte, and the head in that chain). Returns the links checked.
pub(super) fn check_gateway_to_client(
    gws: &[Checked],
    cls: &[Checked],
    executing: &Executing<'_>,
    client_requests: &HashMap<Digest, &[u8]>,
    sigs: &Sigs<'_>,
    cx: &mut Ctx,
) -> u64 {
    let mut cross_links = 0u64;
    let client_by_id: HashMap<Digest, &Checked> =
        cls.iter().filter_map(|c| c.id.map(|id| (id, c))).collect();
    let client_owners: HashSet<&Did> = cls.iter().filter_map(|c| c.owner.as_ref()).collect();
    let mut exec: Vec<_> = executing.iter().collect();
    exec.sort_by_key(|(_, (gi, s, _, _))| (*gi, *s));
    for (call, (gi, seq, bytes, head)) in exec {
        let g = &gws[*gi];
        let Some(h) = head else { continue };
        let Some(client) = client_by_id.get(&h.chain) else {
            // the client's chain was not given; it is checked only if its owner was
            if let Ok(r) = sigs.open::<Request>(bytes)
                && client_owners.contains(r.envelope.signer())
            {
                cx.flag(
                    &g.label,
                    Some(*seq),
                    ViolationKind::HeadNotInClientChain,
                    "names a chain id the client does not have",
                );
            }
            continue;
        };
        cross_links += 1;
        match client_requests.get(call) {
            Some(b) if b == bytes => {}
            Some(_) => cx.flag(
                &g.label,
                Some(*seq),
                ViolationKind::DigestMismatch,
                "request bytes differ from the client's",
            ),
            None => cx.flag(
                &g.label,
                Some(*seq),
                ViolationKind::RequestNotInClientChain,
                format!("{} never recorded this request", client.label),
            ),
        }
        match client.at(h.seq) {
            Some(it) if it.hash == h.hash => {}
            _ => cx.flag(
                &g.label,
                Some(*seq),
                ViolationKind::HeadNotInClientChain,
                format!("{} seq {} differs or is missing", client.label, h.seq),
            ),
        }
    }
    cross_links
}

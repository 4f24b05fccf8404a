//! Client chains, one after another: every request the owner signed (its signer, call ID and
//! chain), each request answered by a result, grants answered before their call closes, and
//! each result's signed answer, whose receipt or refusal is a cross-link to a gateway chain
//! ([`super::links`]).

use std::collections::{HashMap, HashSet};

use didgate_protocol::Did;
use didgate_protocol::message::{Digest, GrantBody, Request};

use super::chain::Checked;
use super::findings::Ctx;
use super::links::{self, Gateways};
use super::report::ViolationKind;
use super::signatures::Sigs;
use crate::entry::{Entry, EntryKind, Outcome};

/// What the client chains recorded, across chains.
pub(super) struct ClientCalls<'a> {
    /// The signed requests by call.
    pub(super) requests: HashMap<Digest, &'a [u8]>,
    /// Per call: the request's `aud` and signer, which its receipt must match.
    auds: HashMap<Digest, (String, Did)>,
    /// Calls (request entries) per client chain.
    pub(super) calls: Vec<u64>,
    /// Receipts and refusals checked against the gateway chains.
    pub(super) cross_links: u64,
}

/// One client chain's calls still open as its entries are read.
#[derive(Default)]
struct Pending {
    /// Requests without their result: call -> (seq, answered by a grant).
    requests: HashMap<Digest, (u64, bool)>,
    /// Calls made through a grant whose first answer was recorded.
    presented: HashSet<Digest>,
}

/// Checks every client chain's calls ([`ClientCalls`]) in chain order, and each receipt and
/// refusal against the `gateways`.
pub(super) fn check_all<'a>(
    cls: &'a [Checked],
    gateways: &Gateways<'_>,
    sigs: &Sigs<'_>,
    cx: &mut Ctx,
) -> ClientCalls<'a> {
    let cl_entries = cls.iter().map(|c| c.items.len()).sum::<usize>() / 2;
    let mut calls = ClientCalls {
        requests: HashMap::with_capacity(cl_entries),
        auds: HashMap::with_capacity(cl_entries),
        calls: vec![0u64; cls.len()],
        cross_links: 0,
    };
    for (ci, c) in cls.iter().enumerate() {
        calls.check_chain(ci, c, gateways, sigs, cx);
    }
    calls
}

impl<'a> ClientCalls<'a> {
    /// One client chain's entries in order; then the requests no result answered.
    fn check_chain(
        &mut self,
        ci: usize,
        c: &'a Checked,
        gateways: &Gateways<'_>,
        sigs: &Sigs<'_>,
        cx: &mut Ctx,
    ) {
        let mut pending = Pending::default();
        for item in &c.items {
            let e = &item.entry;
            match e.kind {
                EntryKind::Request => {
                    self.calls[ci] += 1;
                    self.request_entry(c, e, sigs, &mut pending, cx);
                }
                EntryKind::Result if e.outcome == Some(Outcome::Grant) => {
                    self.grant_result(c, e, gateways, sigs, &mut pending, cx);
                }
                EntryKind::Result => self.result_entry(c, e, gateways, sigs, &mut pending, cx),
                _ => {}
            }
        }
        for (_, (s, granted)) in pending.requests {
            if granted {
                continue; // a grant not (yet) executed: nothing is missing
            }
            cx.flag(
                &c.label,
                Some(s),
                ViolationKind::UnansweredRequest,
                "request without a result entry",
            );
        }
    }

    /// A request entry: the request is signed by the chain's owner, for this chain, and the
    /// entry's call ID is its digest; the call is then pending.
    fn request_entry(
        &mut self,
        c: &Checked,
        e: &'a Entry,
        sigs: &Sigs<'_>,
        pending: &mut Pending,
        cx: &mut Ctx,
    ) {
        let seq = Some(e.seq);
        let Some(bytes) = &e.signed else {
            cx.flag(
                &c.label,
                seq,
                ViolationKind::BadSignature,
                "request entry without the signed request",
            );
            return;
        };
        let req = match (&c.owner, sigs.open::<Request>(bytes)) {
            (Some(owner), Ok(r)) if r.envelope.signer() == owner => r,
            (_, Ok(_)) => {
                cx.flag(
                    &c.label,
                    seq,
                    ViolationKind::BadSignature,
                    "request not signed by the chain's owner",
                );
                return;
            }
            (_, Err(err)) => {
                cx.flag(
                    &c.label,
                    seq,
                    ViolationKind::BadSignature,
                    format!("request: {err}"),
                );
                return;
            }
        };
        let call = req.envelope.digest();
        if e.call != Some(call) {
            cx.flag(
                &c.label,
                seq,
                ViolationKind::CallIdMismatch,
                "call ID is not the request's digest",
            );
        }
        if Some(req.message.head.chain) != c.id {
            cx.flag(
                &c.label,
                seq,
                ViolationKind::DigestMismatch,
                "request names another chain",
            );
        }
        pending.requests.insert(call, (e.seq, false));
        self.requests.insert(call, bytes.as_slice());
        self.auds.insert(
            call,
            (req.message.aud.clone(), req.envelope.signer().clone()),
        );
    }

    /// A result other than a grant: it closes its pending call (or answers a grant presented
    /// again), and its signed receipt or refusal is checked against the gateway chains.
    fn result_entry(
        &mut self,
        c: &Checked,
        e: &Entry,
        gateways: &Gateways<'_>,
        sigs: &Sigs<'_>,
        pending: &mut Pending,
        cx: &mut Ctx,
    ) {
        let seq = Some(e.seq);
        let Some(call) = e.call else { return };
        match pending.requests.remove(&call) {
            Some((_, granted)) => {
                if granted {
                    pending.presented.insert(call);
                }
            }
            // a grant presented again after its call closed: the refusal it got is recorded
            // like any answer
            None if pending.presented.contains(&call) && e.outcome != Some(Outcome::Receipt) => {}
            None => cx.flag(
                &c.label,
                seq,
                ViolationKind::UnansweredRequest,
                "result without a request",
            ),
        }
        match (e.outcome, &e.signed) {
            (Some(Outcome::Receipt), Some(bytes)) => {
                self.cross_links += 1;
                let asked = e.call.and_then(|c| self.auds.get(&c));
                links::check_receipt(c, e, bytes, asked, gateways, sigs, cx);
            }
            (Some(Outcome::Refusal), Some(bytes)) => {
                self.cross_links += 1;
                let asked = e.call.and_then(|c| self.auds.get(&c));
                links::check_refusal(c, e, bytes, asked, gateways, sigs, cx);
            }
            (Some(Outcome::Unknown), _) => {}
            _ => cx.flag(
                &c.label,
                seq,
                ViolationKind::BadSignature,
                "result without its signed answer",
            ),
        }
    }

    /// A grant result: it answers its pending request for now (a later result closes the
    /// call), with a valid signed grant for that call, whose node certificate, if it carries
    /// one, holds at its `expires_ms` for the gateway the request addressed.
    fn grant_result(
        &self,
        c: &Checked,
        e: &Entry,
        gateways: &Gateways<'_>,
        sigs: &Sigs<'_>,
        pending: &mut Pending,
        cx: &mut Ctx,
    ) {
        let granted = e.call.and_then(|call| pending.requests.get_mut(&call));
        let grant = e.signed.as_deref().map(|b| sigs.open::<GrantBody>(b));
        match (granted, grant) {
            (Some(p), Some(Ok(g))) if !p.1 && Some(g.message.call) == e.call => {
                p.1 = true;
                let answer = links::Answer {
                    what: "grant",
                    signer: g.envelope.signer(),
                    node_cert: g.message.node_cert.as_deref(),
                    at_ms: g.message.expires_ms,
                };
                let asked = e.call.and_then(|c| self.auds.get(&c));
                links::check_answer_node_cert(c, e, &answer, asked, gateways.rule, cx);
            }
            (None, _) | (Some((_, true)), _) => cx.flag(
                &c.label,
                Some(e.seq),
                ViolationKind::UnansweredRequest,
                "grant without a pending request",
            ),
            _ => cx.flag(
                &c.label,
                Some(e.seq),
                ViolationKind::BadSignature,
                "grant result without a valid signed grant for this call",
            ),
        }
    }
}

//! Gateway chains, one after another: every signed request an entry holds (its signature, call
//! ID, subject and recorded client head), client heads that fork across the gateway's entries,
//! each executing entry closed exactly once, and the secret versions executed entries name.
//! Indexes the executing entries by call for the cross-links.

use std::collections::HashMap;

use didgate_protocol::Did;
use didgate_protocol::message::{ChainHead, Digest, Request};

use super::chain::Checked;
use super::findings::Ctx;
use super::keys::WebKeys;
use super::report::ViolationKind;
use super::secrets::SecretLedger;
use super::signatures::{Opened, Sigs};
use crate::entry::{Entry, EntryKind};

/// Executing entries by call: (gateway index, seq, signed request, client head).
pub(super) type Executing<'a> = HashMap<Digest, (usize, u64, &'a [u8], Option<ChainHead>)>;

/// A client head as the gateway's fork claim keys it: signer key, chain id, seq.
type HeadKey = ([u8; 32], Digest, u64);

/// What the gateway chains recorded, across chains.
pub(super) struct GatewayCalls<'a> {
    /// Executing entries by call.
    pub(super) executing: Executing<'a>,
    /// Closing entries by call: (gateway index, seq).
    closed: HashMap<Digest, (usize, u64)>,
    /// Client heads that executed calls committed to, keyed as the gateway's fork claim is:
    /// signer key, chain id, seq (a caller that names another client's chain in its head
    /// forks nothing of that client's); with the chain and seq that recorded each.
    heads_seen: HashMap<HeadKey, (Digest, &'a str, u64)>,
    /// Calls (executing entries) per gateway chain.
    pub(super) calls: Vec<u64>,
    /// Entries that claimed a caller's request on a cluster's home node (`home_rev`), per
    /// gateway (the request's `aud`) and caller.
    homes: std::collections::BTreeMap<(String, &'a str), Vec<HomeClaim>>,
}

/// One entry that claimed a request as the caller's home: (gateway index, seq, `home_rev`,
/// the request's `time_ms`).
type HomeClaim = (usize, u64, u64, u64);

/// Checks every gateway chain's calls ([`GatewayCalls`]), in chain order.
pub(super) fn check_all<'a>(gws: &'a [Checked], sigs: &Sigs<'_>, cx: &mut Ctx) -> GatewayCalls<'a> {
    // sized up front: at a million calls, growing these maps costs as much as using them
    let gw_entries = gws.iter().map(|g| g.items.len()).sum::<usize>() / 2;
    let mut calls = GatewayCalls {
        executing: HashMap::with_capacity(gw_entries),
        closed: HashMap::with_capacity(gw_entries),
        heads_seen: HashMap::with_capacity(gw_entries),
        calls: vec![0u64; gws.len()],
        homes: std::collections::BTreeMap::new(),
    };
    for (gi, g) in gws.iter().enumerate() {
        calls.check_chain(gi, g, sigs, cx);
    }
    calls.check_homes(gws, cx);
    calls
}

impl<'a> GatewayCalls<'a> {
    /// One gateway chain's entries in order; then the executing entries it never closed.
    fn check_chain(&mut self, gi: usize, g: &'a Checked, sigs: &Sigs<'_>, cx: &mut Ctx) {
        // open calls: call -> seq of its executing entry
        let mut open: HashMap<Digest, u64> = HashMap::new();
        let mut secrets = SecretLedger::default();
        for item in &g.items {
            let e = &item.entry;
            match e.kind {
                EntryKind::Secret => secrets.declare(e),
                EntryKind::Executing | EntryKind::Granted | EntryKind::Refused => {
                    self.request_entry(gi, g, e, sigs, &mut open, cx);
                }
                EntryKind::Executed | EntryKind::Failed | EntryKind::Abandoned => {
                    self.close_entry(gi, g, e, &secrets, &mut open, cx);
                }
                _ => {}
            }
        }
        for (_, s) in open {
            cx.flag(
                &g.label,
                Some(s),
                ViolationKind::UnclosedCall,
                "executing entry never closed",
            );
        }
    }

    /// An entry that holds a signed request (executing, granted, refused): the request opens,
    /// agrees with the entry, and commits to no forking client head; an executing entry opens
    /// its call.
    fn request_entry(
        &mut self,
        gi: usize,
        g: &'a Checked,
        e: &'a Entry,
        sigs: &Sigs<'_>,
        open: &mut HashMap<Digest, u64>,
        cx: &mut Ctx,
    ) {
        let seq = Some(e.seq);
        let Some(bytes) = &e.signed else {
            if e.kind == EntryKind::Executing {
                cx.flag(
                    &g.label,
                    seq,
                    ViolationKind::BadSignature,
                    "executing entry without the signed request",
                );
            }
            return;
        };
        let req = match sigs.open::<Request>(bytes) {
            Ok(r) => r,
            Err(err) => {
                cx.flag(
                    &g.label,
                    seq,
                    ViolationKind::BadSignature,
                    format!("embedded request: {err}"),
                );
                return;
            }
        };
        check_request(&g.label, e, &req, &sigs.web, cx);
        self.check_head(g, e, &req, cx);
        if let (Some(rev), Some(subject)) = (e.home_rev, e.subject.as_deref()) {
            // by the request's own time: the handover fence orders those strictly
            self.homes
                .entry((req.message.aud.clone(), subject))
                .or_default()
                .push((gi, e.seq, rev, req.message.time_ms));
        }
        if e.kind == EntryKind::Executing {
            self.calls[gi] += 1;
            let call = req.envelope.digest();
            if self
                .executing
                .insert(call, (gi, e.seq, bytes.as_slice(), Some(req.message.head)))
                .is_some()
            {
                cx.flag(
                    &g.label,
                    seq,
                    ViolationKind::DuplicateCall,
                    "call executed twice",
                );
            }
            open.insert(call, e.seq);
        }
    }

    /// Two nodes claiming one caller's requests under overlapping ownership (amendment 2.12;
    /// specs/audit-log.md, "Home revisions"): an entry of one node whose view of the members
    /// (`home_rev`) is older than that of another node's entry for the same caller of the same
    /// gateway, yet whose request is stamped no earlier. A node that lost the caller to a newer
    /// membership claimed only requests stamped before the new home's handover fence, and the
    /// new home only requests stamped at or after it, so this is a node that kept claiming on
    /// a stale view: cut off from etcd without failing closed, or a clock off by more than the
    /// window allows. Each caller is reported once, naming the first such pair.
    fn check_homes(&mut self, gws: &[Checked], cx: &mut Ctx) {
        for ((_, subject), claims) in &mut self.homes {
            claims.sort_unstable_by_key(|&(_, _, rev, time)| (rev, time));
            // per node, its latest claim among those of lower revisions: (time, seq)
            let mut before: HashMap<usize, (u64, u64)> = HashMap::new();
            let mut i = 0;
            'caller: while i < claims.len() {
                let rev = claims[i].2;
                let group = claims[i..]
                    .iter()
                    .take_while(|c| c.2 == rev)
                    .copied()
                    .collect::<Vec<_>>();
                for &(gi, seq, _, time) in &group {
                    let stale = before
                        .iter()
                        .filter(|(ogi, (otime, _))| **ogi != gi && *otime >= time)
                        .min_by_key(|(ogi, _)| **ogi);
                    if let Some((&ogi, &(otime, oseq))) = stale {
                        cx.flag(
                            &gws[ogi].label,
                            Some(oseq),
                            ViolationKind::OverlappingOwnership,
                            format!(
                                "claimed a request of {subject} stamped {otime} ms on an older view of the cluster's members than {} seq {seq} (revision {rev}) claimed one stamped {time} ms: two nodes were its home at once",
                                gws[gi].label
                            ),
                        );
                        break 'caller;
                    }
                }
                for &(gi, seq, _, time) in &group {
                    let slot = before.entry(gi).or_insert((time, seq));
                    if time >= slot.0 {
                        *slot = (time, seq);
                    }
                }
                i += group.len();
            }
        }
    }

    /// The client head a request names, against the heads earlier executed calls committed
    /// to. Only executed calls commit the gateway to a client head: a refusal may be the
    /// gateway correctly refusing a forking head.
    fn check_head(&mut self, g: &'a Checked, e: &Entry, req: &Opened<'_, Request>, cx: &mut Ctx) {
        let h = req.message.head;
        let commits = matches!(e.kind, EntryKind::Executing | EntryKind::Granted);
        let prior = if commits {
            self.heads_seen
                .get(&(*req.envelope.signer().public_key_bytes(), h.chain, h.seq))
                .cloned()
        } else {
            None
        };
        match prior {
            Some((hash, other, oseq)) if hash != h.hash => cx.flag(
                &g.label,
                Some(e.seq),
                ViolationKind::HeadFork,
                format!(
                    "client head seq {} forks from the one recorded at {other} seq {oseq}",
                    h.seq
                ),
            ),
            _ if commits => {
                self.heads_seen.insert(
                    (*req.envelope.signer().public_key_bytes(), h.chain, h.seq),
                    (h.hash, g.label.as_str(), e.seq),
                );
            }
            _ => {}
        }
    }

    /// An entry that closes a call (executed, failed, abandoned): it closes an open executing
    /// entry, once, and an executed entry names a secret version that was declared.
    fn close_entry(
        &mut self,
        gi: usize,
        g: &Checked,
        e: &Entry,
        secrets: &SecretLedger,
        open: &mut HashMap<Digest, u64>,
        cx: &mut Ctx,
    ) {
        let seq = Some(e.seq);
        let Some(call) = e.call else {
            cx.flag(
                &g.label,
                seq,
                ViolationKind::UnclosedCall,
                "close without a call ID",
            );
            return;
        };
        let began = open.remove(&call);
        if e.kind == EntryKind::Executed
            && let Err(why) = secrets.check_use(e, began)
        {
            cx.flag(&g.label, seq, ViolationKind::SecretMismatch, why);
        }
        if began.is_none() {
            let kind = if self.closed.contains_key(&call) {
                ViolationKind::DuplicateCall
            } else {
                ViolationKind::UnclosedCall
            };
            cx.flag(&g.label, seq, kind, "closes no open executing entry");
        }
        self.closed.insert(call, (gi, e.seq));
    }
}

/// A signed request against the gateway entry that holds it: the entry's call ID is the
/// request's digest, its subject the request's signer, its client head the signed one.
fn check_request(label: &str, e: &Entry, req: &Opened<'_, Request>, web: &WebKeys, cx: &mut Ctx) {
    let seq = Some(e.seq);
    if e.call != Some(req.envelope.digest()) {
        cx.flag(
            label,
            seq,
            ViolationKind::CallIdMismatch,
            "call ID is not the request's digest",
        );
    }
    if let Err((kind, why)) =
        subject_matches(e.subject.as_deref(), req.envelope.signer(), e.did_doc, web)
    {
        cx.flag(label, seq, kind, why);
    }
    if e.peer_head.as_ref() != Some(&req.message.head) {
        cx.flag(
            label,
            seq,
            ViolationKind::DigestMismatch,
            "recorded client head differs from the signed one",
        );
    }
}

/// Whether a gateway entry's subject names the request's signer: the signer's did:key (and
/// no document), or a did:web whose document, named by `did_doc` and kept beside the chain,
/// lists the signer's key for authentication.
fn subject_matches(
    subject: Option<&str>,
    signer: &Did,
    did_doc: Option<Digest>,
    web: &WebKeys,
) -> Result<(), (ViolationKind, &'static str)> {
    let wrong = (
        ViolationKind::BadSignature,
        "subject is not the request's signer",
    );
    match (subject, did_doc) {
        (Some(s), None) if s == signer.as_str() => Ok(()),
        (Some(s), Some(hash)) if s.starts_with("did:web:") => match web.docs.get(&hash) {
            None => Err((
                ViolationKind::MissingDocument,
                "the entry's DID document is not kept beside the chain",
            )),
            Some(d) if d.did().as_str() == s && d.lists_key(signer) => Ok(()),
            Some(_) => Err((
                ViolationKind::MissingDocument,
                "the entry's DID document does not list the request's key for its subject",
            )),
        },
        (Some(s), None) if s.starts_with("did:web:") => Err((
            ViolationKind::MissingDocument,
            "a did:web subject without its DID document hash",
        )),
        _ => Err(wrong),
    }
}

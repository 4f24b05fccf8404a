//! Opening the signed messages in parallel: each distinct message parsed (didgate's plain
//! COSE layout by the protocol crate's fast reader, anything else by coset), checked as
//! `envelope::verify` and `message::open` check it short of the signature, and its signature
//! checked in batches with ed25519-dalek's `verify_batch`. Whatever the fast path does not
//! accept, and every message of a batch that fails, is opened by the protocol crate itself for
//! its exact verdict.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coset::{CoseSign1, TaggedCborSerializable, iana};
use didgate_protocol::envelope::{self, Kind, PlainSign1};
use didgate_protocol::message::{
    Checkpoint, GrantBody, Message, OpenError, Receipt, Refusal, Request,
};
use ed25519_dalek::{Signature, VerifyingKey};

use super::keys::{Key, Keys};
use super::parallel::par_map;
use super::signatures::{Cached, KINDS, OpenedMsg, Payload, Sigs, open_exact_kind};

impl Sigs<'_> {
    /// Opens every distinct message on `threads` threads, in batches of [`BATCH`]; returns the
    /// time the threads spent, by step, summed.
    pub(super) fn open_all(&mut self, threads: usize) -> Busy {
        let keys = Keys::new(self.web.clone());
        let web = &*self.web;
        let blobs = &self.blobs;
        let ranges: Vec<(usize, usize)> = (0..blobs.len())
            .step_by(BATCH)
            .map(|start| (start, (start + BATCH).min(blobs.len())))
            .collect();
        let done = par_map(&ranges, threads, |&(start, end)| {
            let mut local = HashMap::new();
            let mut busy = Busy::default();
            let steps: Vec<Step> = blobs[start..end]
                .iter()
                .map(|b| parse_blob(b, &keys, &mut local, &mut busy))
                .collect();
            let t = Instant::now();
            let verdicts = check_batch(&steps);
            busy.sig += t.elapsed();
            let t = Instant::now();
            let opened: Vec<_> = steps
                .into_iter()
                .zip(verdicts)
                .zip(&blobs[start..end])
                .map(|((step, ok), bytes)| match step {
                    Step::Done(r) => r,
                    Step::Check { kind, opened, .. } if ok => Some((kind, Ok(opened))),
                    // refused (or a batch with a bad one in it, re-checked singly): the protocol
                    // crate gives the exact verdict and error
                    Step::Check { kind, .. } => {
                        open_exact_kind(bytes, kind, web).map(|r| (kind, r))
                    }
                })
                .collect();
            busy.exact += t.elapsed();
            (opened, busy)
        });
        self.opened = Vec::with_capacity(blobs.len());
        let mut total = Busy::default();
        for (opened, b) in done {
            self.opened.extend(opened);
            total.parse += b.parse;
            total.sig += b.sig;
            total.exact += b.exact;
        }
        total
    }
}

/// Time one opening thread spent, by step.
#[derive(Default)]
pub(super) struct Busy {
    /// COSE parsing, header checks, payload decoding, digests.
    pub(super) parse: Duration,
    /// Ed25519 signature checks.
    pub(super) sig: Duration,
    /// Messages the fast path did not accept, opened by the protocol crate.
    pub(super) exact: Duration,
}

/// Signatures checked together by one `verify_batch` call.
const BATCH: usize = 128;

/// One signed message after parsing: decided already, or waiting for its signature check.
enum Step {
    /// Opened by the protocol crate (unusual layout, or no known kind: `None`).
    Done(Option<(Kind, Result<OpenedMsg, OpenError>)>),
    /// Parsed by the fast path; valid if its signature checks.
    Check {
        kind: Kind,
        key: Arc<Key>,
        tbs: Vec<u8>,
        sig: [u8; 64],
        opened: OpenedMsg,
    },
}

/// Parses one signed message: the kind its content type names, then the same checks as
/// `envelope::verify` and `message::open` except the signature, which [`check_batch`] checks.
/// Anything the fast path does not accept is opened by the protocol crate for its exact
/// verdict.
fn parse_blob(
    bytes: &[u8],
    keys: &Keys,
    local: &mut HashMap<Vec<u8>, Option<Arc<Key>>>,
    busy: &mut Busy,
) -> Step {
    let t = Instant::now();
    let step = if let Some(parts) = envelope::parse_plain(bytes) {
        match fast_parts_plain(&parts, keys, local) {
            Some((key, tbs, opened)) => Step::Check {
                kind: parts.kind,
                key,
                tbs,
                sig: parts.signature,
                opened,
            },
            None => {
                Step::Done(open_exact_kind(bytes, parts.kind, &keys.web).map(|r| (parts.kind, r)))
            }
        }
    } else {
        let sign1 = (bytes.len() <= envelope::MAX_ENVELOPE)
            .then(|| CoseSign1::from_tagged_slice(bytes).ok())
            .flatten();
        let kind = sign1
            .as_ref()
            .and_then(|s| match &s.protected.header.content_type {
                Some(coset::ContentType::Text(tag)) => KINDS.into_iter().find(|k| k.tag() == tag),
                _ => None,
            });
        match sign1.zip(kind) {
            None => Step::Done(None),
            Some((sign1, kind)) => match fast_parts(&sign1, kind, keys, local) {
                Some((key, tbs, sig, opened)) => Step::Check {
                    kind,
                    key,
                    tbs,
                    sig,
                    opened,
                },
                None => Step::Done(open_exact_kind(bytes, kind, &keys.web).map(|r| (kind, r))),
            },
        }
    };
    busy.parse += t.elapsed();
    step
}

/// Checks the signatures of the waiting steps with ed25519-dalek's `verify_batch`; when the
/// batch fails, or a key is of small order (which `verify_strict` refuses and a batch would
/// not), each is checked alone with `verify_strict`. One verdict per step (`true` for `Done`).
///
/// A batch accepts exactly the signatures `verify_strict` accepts, except one a key's own
/// holder can make on purpose: a nonce point with a small torsion component can pass the batch
/// equation for some batches (specs/audit-log.md, "Signature checks"). Nobody else can produce
/// a signature that passes, so what a chain's signatures attribute is unchanged.
fn check_batch(steps: &[Step]) -> Vec<bool> {
    let waiting: Vec<(usize, &Arc<Key>, &[u8], Signature)> = steps
        .iter()
        .enumerate()
        .filter_map(|(i, s)| match s {
            Step::Check { key, tbs, sig, .. } => {
                Some((i, key, tbs.as_slice(), Signature::from_bytes(sig)))
            }
            Step::Done(_) => None,
        })
        .collect();
    let mut verdicts = vec![true; steps.len()];
    let weak = waiting.iter().any(|(_, k, _, _)| k.weak);
    let batch_ok = !waiting.is_empty() && !weak && {
        let msgs: Vec<&[u8]> = waiting.iter().map(|w| w.2).collect();
        let sigs: Vec<Signature> = waiting.iter().map(|w| w.3).collect();
        let vks: Vec<VerifyingKey> = waiting.iter().map(|w| w.1.vk).collect();
        ed25519_dalek::verify_batch(&msgs, &sigs, &vks).is_ok()
    };
    if !batch_ok {
        for (i, key, msg, sig) in &waiting {
            verdicts[*i] = key.vk.verify_strict(msg, sig).is_ok();
        }
    }
    verdicts
}

/// [`fast_parts`] for a message [`envelope::parse_plain`] read: the key, the signed bytes and the
/// opened message; `None` if the kid names no key or the payload does not decode.
fn fast_parts_plain(
    parts: &PlainSign1<'_>,
    keys: &Keys,
    local: &mut HashMap<Vec<u8>, Option<Arc<Key>>>,
) -> Option<(Arc<Key>, Vec<u8>, OpenedMsg)> {
    let key = match local.get(parts.kid) {
        Some(k) => k.clone(),
        None => {
            let k = keys.get(parts.kid);
            local.insert(parts.kid.to_vec(), k.clone());
            k
        }
    }?;
    let payload = decode_payload(parts.kind, parts.payload)?;
    let tbs = envelope::sig_structure(parts.protected, parts.kind.tag().as_bytes(), parts.payload);
    let opened = OpenedMsg {
        signer: key.did.clone(),
        digest: envelope::signed_digest(parts.protected, parts.payload),
        payload,
        root_at: None,
    };
    Some((key, tbs, opened))
}

/// Decodes a payload as the message of `kind` (`Message::decode`).
fn decode_payload(kind: Kind, payload: &[u8]) -> Option<Payload> {
    Some(match kind {
        Kind::Request => Request::decode_plain(payload)
            .or_else(|| Request::decode(payload).ok())?
            .wrap(),
        Kind::Grant => GrantBody::decode(payload).ok()?.wrap(),
        Kind::Receipt => Receipt::decode_plain(payload)
            .or_else(|| Receipt::decode(payload).ok())?
            .wrap(),
        Kind::Refusal => Refusal::decode(payload).ok()?.wrap(),
        Kind::Checkpoint => Checkpoint::decode(payload).ok()?.wrap(),
        _ => return None,
    })
}

/// The key, the signed bytes (COSE Sig_structure), the signature and the opened message.
type FastParts = (Arc<Key>, Vec<u8>, [u8; 64], OpenedMsg);

/// `envelope::verify`'s checks short of the signature, and the payload decoded: the key, the
/// signed bytes (COSE Sig_structure), the signature and the opened message. `None` when any
/// check fails.
fn fast_parts(
    sign1: &CoseSign1,
    kind: Kind,
    keys: &Keys,
    local: &mut HashMap<Vec<u8>, Option<Arc<Key>>>,
) -> Option<FastParts> {
    if !sign1.unprotected.is_empty() {
        return None;
    }
    let header = &sign1.protected.header;
    if header.alg
        != Some(coset::RegisteredLabelWithPrivate::Assigned(
            iana::Algorithm::EdDSA,
        ))
    {
        return None;
    }
    if !matches!(&header.content_type, Some(coset::ContentType::Text(t)) if t == kind.tag()) {
        return None;
    }
    if !header.crit.is_empty()
        || !header.iv.is_empty()
        || !header.partial_iv.is_empty()
        || !header.rest.is_empty()
        || !header.counter_signatures.is_empty()
    {
        return None;
    }
    let key = match local.get(&header.key_id) {
        Some(k) => k.clone(),
        None => {
            let k = keys.get(&header.key_id);
            local.insert(header.key_id.clone(), k.clone());
            k
        }
    }?;
    let payload = sign1.payload.as_deref()?;
    let sig: [u8; 64] = sign1.signature.as_slice().try_into().ok()?;
    let tbs = sign1.tbs_data(kind.tag().as_bytes());
    let protected = sign1.protected.original_data.as_deref().unwrap_or_default();
    let digest = envelope::signed_digest(protected, payload);
    let payload = decode_payload(kind, payload)?;
    let opened = OpenedMsg {
        signer: key.did.clone(),
        digest,
        payload,
        root_at: None,
    };
    Some((key, tbs, sig, opened))
}

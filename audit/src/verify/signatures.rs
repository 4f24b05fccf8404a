//! Signatures: every signed message of the chains (requests, grants, receipts, refusals,
//! checkpoints) registered per copy and opened once per distinct content ([`super::batch`]),
//! and handed back to the checks exactly as `message::open` would return it, from the cache.
//! Also each receipt's gateway root, precomputed in parallel.

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::Arc;

use didgate_protocol::Did;
use didgate_protocol::envelope::Kind;
use didgate_protocol::message::{
    self, Checkpoint, Digest, GrantBody, OpenError, Receipt, Refusal, Request, SignedMessage,
};

use super::chain::{Chains, Checked};
use super::keys::WebKeys;
use super::parallel::par_map;
use super::report::ChainRecords;

/// A signed message's payload, by kind.
pub(super) enum Payload {
    Request(Request),
    Grant(GrantBody),
    Receipt(Receipt),
    Refusal(Refusal),
    Checkpoint(Checkpoint),
}

/// The signed message kinds the cache holds.
pub(super) const KINDS: [Kind; 5] = [
    Kind::Request,
    Kind::Grant,
    Kind::Receipt,
    Kind::Refusal,
    Kind::Checkpoint,
];

/// A message type the cache can hand back.
pub(super) trait Cached: SignedMessage + Clone {
    /// The message, if `p` holds one of this type.
    fn peek(p: &Payload) -> Option<&Self>;
    /// The message as a payload.
    fn wrap(self) -> Payload;
}

macro_rules! cached {
    ($t:ty, $v:ident) => {
        impl Cached for $t {
            fn peek(p: &Payload) -> Option<&Self> {
                match p {
                    Payload::$v(m) => Some(m),
                    _ => None,
                }
            }
            fn wrap(self) -> Payload {
                Payload::$v(self)
            }
        }
    };
}
cached!(Request, Request);
cached!(GrantBody, Grant);
cached!(Receipt, Receipt);
cached!(Refusal, Refusal);
cached!(Checkpoint, Checkpoint);

/// A signed message opened once: what [`message::open`] returns, minus the bytes.
pub(super) struct OpenedMsg {
    pub(super) signer: Arc<Did>,
    pub(super) digest: Digest,
    pub(super) payload: Payload,
    /// For a receipt with a root: the index of the given gateway that signed it and that
    /// gateway's root at the receipt's size, precomputed.
    pub(super) root_at: Option<(usize, Option<Digest>)>,
}

/// The envelope facts of an opened message, as [`message::Signed::envelope`] gives them.
pub(super) struct EnvelopeView<'s> {
    signer: Cow<'s, Did>,
    digest: Digest,
}

impl EnvelopeView<'_> {
    /// The key that signed, as a did:key.
    pub(super) fn signer(&self) -> &Did {
        &self.signer
    }
    /// The message's digest (for a request, its call ID).
    pub(super) fn digest(&self) -> Digest {
        self.digest
    }
}

/// An opened message, borrowed from the cache (or owned when it was not cached).
pub(super) struct Opened<'s, T: Clone> {
    pub(super) envelope: EnvelopeView<'s>,
    pub(super) message: Cow<'s, T>,
    /// See [`OpenedMsg::root_at`].
    pub(super) root_at: Option<(usize, Option<Digest>)>,
}

/// Opens `bytes` as a `T` with the protocol crate, the reference the cache must agree with.
fn open_exact<T: Cached>(bytes: &[u8], web: &WebKeys) -> Result<OpenedMsg, OpenError> {
    let (envelope, message, _) = message::open_with::<T>(bytes, |w, f| web.key(w, f))?.into_parts();
    Ok(OpenedMsg {
        signer: Arc::new(envelope.signer().clone()),
        digest: envelope.digest(),
        payload: message.wrap(),
        root_at: None,
    })
}

/// [`open_exact`] as the message type of `kind`; `None` for a kind the cache does not hold.
pub(super) fn open_exact_kind(
    bytes: &[u8],
    kind: Kind,
    web: &WebKeys,
) -> Option<Result<OpenedMsg, OpenError>> {
    Some(match kind {
        Kind::Request => open_exact::<Request>(bytes, web),
        Kind::Grant => open_exact::<GrantBody>(bytes, web),
        Kind::Receipt => open_exact::<Receipt>(bytes, web),
        Kind::Refusal => open_exact::<Refusal>(bytes, web),
        Kind::Checkpoint => open_exact::<Checkpoint>(bytes, web),
        _ => return None,
    })
}

/// Every signed message of the chains, opened once per distinct content, in parallel, before
/// the sequential checks; [`Sigs::open`] is a drop-in for [`message::open`].
#[derive(Default)]
pub(super) struct Sigs<'a> {
    /// The distinct messages.
    pub(super) blobs: Vec<&'a [u8]>,
    /// A message's length and last 16 bytes (of its signature, when well-formed) -> index in
    /// `blobs` of the first message with them; the whole message is compared on a match.
    by_content: HashMap<(usize, &'a [u8]), usize>,
    /// Address and length of every registered copy -> index in `blobs`. The copies are borrowed
    /// for `'a`, so an address cannot be reused for other bytes while this lives.
    by_addr: HashMap<(usize, usize), usize, BuildHasherDefault<AddrHasher>>,
    /// Per distinct message: its kind (from its content type) and the verdict, when its
    /// content type names a kind.
    pub(super) opened: Vec<Option<(Kind, Result<OpenedMsg, OpenError>)>>,
    /// Copies registered.
    pub(super) refs: u64,
    /// did:web keys from the documents kept beside the chains.
    pub(super) web: Arc<WebKeys>,
}

impl<'a> Sigs<'a> {
    /// Registers every signed message of the chains: those their entries hold (gateway chains
    /// first), then their checkpoints. None is opened yet ([`Sigs::open_all`]).
    pub(super) fn collect(
        gateways: &'a [ChainRecords],
        clients: &'a [ChainRecords],
        (gws, cls): &'a Chains,
    ) -> Self {
        let mut sigs = Sigs {
            web: Arc::new(WebKeys::new(
                &gateways.iter().chain(clients).collect::<Vec<_>>(),
            )),
            ..Sigs::default()
        };
        let refs = gws
            .iter()
            .chain(cls)
            .map(|c| c.items.iter().filter(|i| i.entry.signed.is_some()).count())
            .sum::<usize>()
            + gateways
                .iter()
                .chain(clients)
                .map(|r| r.checkpoints.len())
                .sum::<usize>();
        sigs.by_addr.reserve(refs);
        sigs.by_content.reserve(refs);
        sigs.blobs.reserve(refs);
        for c in gws.iter().chain(cls) {
            for item in &c.items {
                if let Some(bytes) = &item.entry.signed {
                    sigs.add(bytes);
                }
            }
        }
        for rec in gateways.iter().chain(clients) {
            for bytes in &rec.checkpoints {
                sigs.add(bytes);
            }
        }
        sigs
    }

    /// Registers a copy of a signed message.
    fn add(&mut self, bytes: &'a [u8]) {
        self.refs += 1;
        let key = (bytes.len(), tail(bytes));
        let index = match self.by_content.get(&key) {
            Some(&i) if self.blobs[i] == bytes => i,
            Some(_) => {
                // same tail, other content: kept apart, looked up by address only
                self.blobs.push(bytes);
                self.blobs.len() - 1
            }
            None => {
                self.blobs.push(bytes);
                self.by_content.insert(key, self.blobs.len() - 1);
                self.blobs.len() - 1
            }
        };
        self.by_addr
            .insert((bytes.as_ptr() as usize, bytes.len()), index);
    }

    fn index_of(&self, bytes: &[u8]) -> Option<usize> {
        if let Some(&i) = self.by_addr.get(&(bytes.as_ptr() as usize, bytes.len())) {
            return Some(i);
        }
        // an unregistered copy (say, a clone): find it by content
        self.by_content
            .get(&(bytes.len(), tail(bytes)))
            .copied()
            .filter(|&i| self.blobs[i] == bytes)
    }

    /// Exactly what `message::open::<T>(bytes)` returns, from the cache when it holds the
    /// message as a `T`.
    pub(super) fn open<T: Cached>(&self, bytes: &[u8]) -> Result<Opened<'_, T>, OpenError> {
        let cached = self
            .index_of(bytes)
            .and_then(|i| self.opened.get(i))
            .and_then(Option::as_ref)
            .filter(|(kind, _)| *kind == T::KIND);
        if let Some((_, verdict)) = cached {
            return match verdict {
                Ok(o) => match T::peek(&o.payload) {
                    Some(m) => Ok(Opened {
                        envelope: EnvelopeView {
                            signer: Cow::Borrowed(&o.signer),
                            digest: o.digest,
                        },
                        message: Cow::Borrowed(m),
                        root_at: o.root_at,
                    }),
                    None => self.uncached(bytes),
                },
                Err(e) => Err(e.clone()),
            };
        }
        self.uncached(bytes)
    }

    fn uncached<'s, T: Cached>(&self, bytes: &[u8]) -> Result<Opened<'s, T>, OpenError> {
        let (envelope, message, _) =
            message::open_with::<T>(bytes, |w, f| self.web.key(w, f))?.into_parts();
        Ok(Opened {
            envelope: EnvelopeView {
                signer: Cow::Owned(envelope.signer().clone()),
                digest: envelope.digest(),
            },
            message: Cow::Owned(message),
            root_at: None,
        })
    }

    /// Computes, on `threads` threads, each receipt's gateway root at the receipt's size (what
    /// [`super::links::check_receipt`] compares the receipt's root with).
    pub(super) fn receipt_roots(
        &mut self,
        gws: &[Checked],
        dids: &HashMap<Did, usize>,
        threads: usize,
    ) {
        let jobs: Vec<(usize, usize, u64)> = self
            .opened
            .iter()
            .enumerate()
            .filter_map(|(i, o)| {
                let Some((_, Ok(m))) = o else { return None };
                let Payload::Receipt(r) = &m.payload else {
                    return None;
                };
                r.root?;
                let gi = *dids.get(&*m.signer)?;
                let g = gws.get(gi)?;
                (!g.gaps).then_some((i, gi, r.entry.seq.wrapping_add(1)))
            })
            .collect();
        let roots = par_map(&jobs, threads, |(_, gi, size)| {
            gws.get(*gi).and_then(|g| g.tree.root_at(*size))
        });
        for ((i, gi, _), root) in jobs.into_iter().zip(roots) {
            if let Some(Some((_, Ok(m)))) = self.opened.get_mut(i) {
                m.root_at = Some((gi, root));
            }
        }
    }
}

/// Hashes the (address, length) keys of [`Sigs::by_addr`]. Addresses come from the allocator,
/// not from the chains, so a fast unkeyed mix is enough.
#[derive(Default)]
struct AddrHasher(u64);

impl std::hash::Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        let x = (self.0 ^ (self.0 >> 31)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x ^ (x >> 32)
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(23) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

/// The last 16 bytes of a message (all of it if shorter).
fn tail(bytes: &[u8]) -> &[u8] {
    &bytes[bytes.len().saturating_sub(16)..]
}

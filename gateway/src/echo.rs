//! The response scanner: finds the credential a call injected wherever the upstream reflects
//! it, in the response headers and in the body as it streams, and redacts it (specs/operation.md,
//! "Secret echoes").
//!
//! Owns the forms of one credential an upstream could send back ([`Needles`]) and the
//! streaming redactor over a body cut into arbitrary chunks ([`Redactor`]). Pure: no I/O, no
//! clock. Every form is kept in zeroized memory and searched with `memchr::memmem` borrowing
//! it, so no searcher keeps a copy of the credential.
//!
//! Redaction replaces each occurrence with as many `*` bytes, so lengths stay valid (the
//! receipt's response digest covers the redacted bytes). Memory is bounded by the longest
//! form: the redactor holds back at most `longest - 1` bytes, and only while they could still
//! be the start of an occurrence (an SSE event that ends a chunk is not delayed).

use zeroize::Zeroizing;

use crate::config::Auth;

/// Derived forms shorter than this are not searched (they would match by chance); the raw
/// credential always is.
const MIN_FORM: usize = 8;

/// The byte a redacted occurrence is replaced with.
pub const REDACTED: u8 = b'*';

/// Every form of one call's credential that the scanner looks for.
pub struct Needles {
    forms: Vec<Zeroizing<Vec<u8>>>,
    longest: usize,
}

impl std::fmt::Debug for Needles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Needles")
            .field("forms", &self.forms.len())
            .finish_non_exhaustive()
    }
}

/// Percent-encoding of every byte but RFC 3986 unreserved ones, with `upper` or lower hex; with
/// `plus`, a space becomes `+` (form encoding). The upstream executor injects a query
/// credential with it (upper hex, no `+`), so that form is always among the [`Needles`].
pub(crate) fn percent(s: &[u8], upper: bool, plus: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() * 3);
    for &b in s {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b);
        } else if plus && b == b' ' {
            out.push(b'+');
        } else if upper {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        } else {
            out.extend_from_slice(format!("%{b:02x}").as_bytes());
        }
    }
    out
}

/// JSON string escaping: `minimal` escapes only what JSON requires (`"`, `\`, controls);
/// otherwise also `/` as `\/` and every non-alphanumeric byte as `\u00XX` (`upper` hex).
fn json(s: &[u8], minimal: bool, slash: bool, upper: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() * 2);
    for &b in s {
        match b {
            b'"' if minimal => out.extend_from_slice(b"\\\""),
            b'\\' if minimal => out.extend_from_slice(b"\\\\"),
            b'/' if slash => out.extend_from_slice(b"\\/"),
            b if b.is_ascii_alphanumeric() || (minimal && (0x20..0x7f).contains(&b)) => out.push(b),
            b if upper => out.extend_from_slice(format!("\\u{:04X}", b).as_bytes()),
            b => out.extend_from_slice(format!("\\u{:04x}", b).as_bytes()),
        }
    }
    out
}

/// The base64 characters of `data` that do not depend on what surrounds it, for each of the
/// three alignments it can have inside a longer encoded text: character `i` carries bits
/// `6i..6i+6` of the encoded bytes, so with `k` bytes before the data it is the data's alone
/// when `6i >= 8k` and `6i + 6 <= 8(k + len)`.
fn base64_cores(data: &[u8], engine: &impl base64::Engine) -> Vec<Vec<u8>> {
    (0..3usize)
        .map(|k| {
            let mut padded = vec![0u8; k];
            padded.extend_from_slice(data);
            let text = Zeroizing::new(engine.encode(&padded));
            let start = (8 * k).div_ceil(6);
            let end = (8 * (k + data.len())) / 6;
            let core = text.as_bytes().get(start..end).unwrap_or_default().to_vec();
            padded.iter_mut().for_each(|b| *b = 0);
            core
        })
        .collect()
}

/// Texts up to this long are searched without building a searcher per form
/// ([`short_occurrences`]): `memmem`'s set-up cost more than the search in a short response
/// (most JSON answers and header blocks).
const SHORT_TEXT: usize = 1024;

/// The non-overlapping occurrences of `form` in `buf`, left to right (what
/// `memchr::memmem::find_iter` yields), found from the positions of its first byte.
fn short_occurrences<'a>(buf: &'a [u8], form: &'a [u8]) -> impl Iterator<Item = usize> + 'a {
    let first = form.first().copied().unwrap_or_default();
    let mut next = 0;
    memchr::memchr_iter(first, buf).filter(move |&at| {
        let hit = !form.is_empty() && at >= next && buf[at..].starts_with(form);
        if hit {
            next = at + form.len();
        }
        hit
    })
}

impl Needles {
    /// The forms of `secret` as injected by `auth`: raw; percent-encoded (upper and lower hex,
    /// and form encoding with `+`); JSON-escaped (minimal, `\/`, `\u00XX` with upper and lower
    /// hex); the alignment-independent cores of its base64 and base64url, and, for `basic`, of
    /// `user:secret` (the `Basic` header value). A `Bearer` header value holds the raw form.
    pub fn new(secret: &str, auth: &Auth) -> Self {
        let raw = secret.as_bytes();
        let mut forms: Vec<Zeroizing<Vec<u8>>> = Vec::new();
        let add = |form: Vec<u8>, forms: &mut Vec<Zeroizing<Vec<u8>>>| {
            let form = Zeroizing::new(form);
            if (form.len() >= MIN_FORM || form.as_slice() == raw)
                && !form.is_empty()
                && !forms.iter().any(|f| f.as_slice() == form.as_slice())
            {
                forms.push(form);
            }
        };
        add(raw.to_vec(), &mut forms);
        for (upper, plus) in [(true, false), (false, false), (true, true), (false, true)] {
            add(percent(raw, upper, plus), &mut forms);
        }
        for (minimal, slash, upper) in [
            (true, false, false),
            (true, true, false),
            (false, true, false),
            (false, true, true),
            (false, false, false),
            (false, false, true),
        ] {
            add(json(raw, minimal, slash, upper), &mut forms);
        }
        let mut encoded: Vec<Zeroizing<Vec<u8>>> = vec![Zeroizing::new(raw.to_vec())];
        if let Auth::Basic { user } = auth {
            encoded.push(Zeroizing::new(format!("{user}:{secret}").into_bytes()));
        }
        for data in &encoded {
            for engine in [
                &base64::engine::general_purpose::STANDARD,
                &base64::engine::general_purpose::URL_SAFE,
            ] {
                for core in base64_cores(data, engine) {
                    add(core, &mut forms);
                }
            }
        }
        let longest = forms.iter().map(|f| f.len()).max().unwrap_or(1);
        Self { forms, longest }
    }

    /// How many forms are searched.
    pub fn len(&self) -> usize {
        self.forms.len()
    }

    /// Whether there is none (never: the raw form always is).
    pub fn is_empty(&self) -> bool {
        self.forms.is_empty()
    }

    /// Redacts every occurrence of every form in `buf`; returns how many were found.
    pub fn redact(&self, buf: &mut [u8]) -> u64 {
        let mut ranges = Vec::new();
        for f in &self.forms {
            if buf.len() <= SHORT_TEXT {
                ranges.extend(short_occurrences(buf, f).map(|at| at..at + f.len()));
            } else {
                ranges.extend(
                    memchr::memmem::find_iter(buf, f.as_slice()).map(|at| at..at + f.len()),
                );
            }
        }
        // overlapping occurrences (one form inside another) count once
        ranges.sort_by_key(|r| (r.start, std::cmp::Reverse(r.end)));
        let mut hits = 0;
        let mut covered = 0;
        for r in ranges {
            if r.start >= covered {
                hits += 1;
            }
            if r.end > covered {
                let from = r.start.max(covered);
                buf[from..r.end].fill(REDACTED);
                covered = r.end;
            }
        }
        hits
    }

    /// Redacts every occurrence in each of `values` (header values: no value holds a newline),
    /// scanned as one text so the searchers are set up once; returns how many were found.
    pub fn redact_all(&self, values: &mut [Vec<u8>]) -> u64 {
        let mut joined = Zeroizing::new(values.join(&b'\n'));
        let hits = self.redact(&mut joined);
        if hits > 0 {
            for (v, redacted) in values.iter_mut().zip(joined.split(|b| *b == b'\n')) {
                v.copy_from_slice(redacted);
            }
        }
        hits
    }

    /// The length of the longest suffix of `buf` (shorter than the longest form) that is a
    /// proper prefix of some form: bytes that may still become an occurrence.
    fn open_suffix(&self, buf: &[u8]) -> usize {
        let max = (self.longest - 1).min(buf.len());
        (1..=max)
            .rev()
            .find(|&n| {
                let tail = &buf[buf.len() - n..];
                self.forms
                    .iter()
                    .any(|f| f.len() > n && f.starts_with(tail))
            })
            .unwrap_or(0)
    }
}

/// Redacts a body that arrives in chunks: what it releases never holds an occurrence of a
/// form, whatever the chunk boundaries.
#[derive(Debug)]
pub struct Redactor<'n> {
    needles: &'n Needles,
    /// Bytes held back: a suffix that could still start an occurrence.
    held: Zeroizing<Vec<u8>>,
    hits: u64,
}

impl<'n> Redactor<'n> {
    /// A redactor for one body.
    pub fn new(needles: &'n Needles) -> Self {
        Self {
            needles,
            held: Zeroizing::new(Vec::new()),
            hits: 0,
        }
    }

    /// Takes the next chunk; returns the bytes that may be relayed now (redacted).
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        let mut buf = std::mem::take(&mut *self.held);
        buf.extend_from_slice(chunk);
        self.hits += self.needles.redact(&mut buf);
        let keep = self.needles.open_suffix(&buf);
        let held = buf.split_off(buf.len() - keep);
        *self.held = held;
        buf
    }

    /// The end of the body: the bytes still held (they cannot become an occurrence now).
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut *self.held)
    }

    /// Occurrences redacted so far.
    pub fn hits(&self) -> u64 {
        self.hits
    }
}

/// Why a coded body could not be decoded for scanning.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeFailure {
    /// The decoded body exceeds what may still be relayed.
    #[error("the decoded response exceeds max_response_bytes")]
    TooLarge,
    /// The coded bytes are not valid for their coding.
    #[error("the {0} response body does not decode: {1}")]
    Corrupt(&'static str, #[source] std::io::Error),
}

/// A response body's content coding, undone as the body streams so that the scanner sees the
/// bytes an upstream meant (specs/operation.md, "Secret echoes"). The gateway asks for
/// `identity`; an upstream that codes its body anyway with `gzip` or `deflate` is decoded and
/// relayed decoded (without `content-encoding`); any other coding fails the call.
#[derive(Debug)]
pub enum Decoding {
    /// No coding.
    Identity,
    /// `gzip` (or `x-gzip`).
    Gzip(Box<flate2::write::GzDecoder<Vec<u8>>>),
    /// `deflate` (zlib, RFC 9110 8.4.1.2).
    Deflate(Box<flate2::write::ZlibDecoder<Vec<u8>>>),
}

/// Coded input is fed to the decoder this many bytes at a time, so one step's output stays
/// bounded (deflate expands at most about 1032 to 1) and the size limit is checked between.
const DECODE_STEP: usize = 1024;

impl Decoding {
    /// The decoding for a `content-encoding` header value (absent: identity); `Err` names a
    /// coding the gateway cannot undo.
    pub fn for_header(value: Option<&[u8]>) -> Result<Self, String> {
        let text = String::from_utf8_lossy(value.unwrap_or_default())
            .trim()
            .to_ascii_lowercase();
        match text.as_str() {
            "" | "identity" => Ok(Self::Identity),
            "gzip" | "x-gzip" => Ok(Self::Gzip(Box::new(flate2::write::GzDecoder::new(
                Vec::new(),
            )))),
            "deflate" => Ok(Self::Deflate(Box::new(flate2::write::ZlibDecoder::new(
                Vec::new(),
            )))),
            _ => Err(text),
        }
    }

    /// Whether the body is relayed as it came.
    pub fn is_identity(&self) -> bool {
        matches!(self, Self::Identity)
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Identity => "identity",
            Self::Gzip(_) => "gzip",
            Self::Deflate(_) => "deflate",
        }
    }

    /// Decodes the next coded chunk; at most `budget` decoded bytes may come out.
    pub fn push(&mut self, chunk: &[u8], budget: u64) -> Result<Vec<u8>, DecodeFailure> {
        use std::io::Write;
        let name = self.name();
        let mut out = Vec::new();
        for step in chunk.chunks(DECODE_STEP) {
            let produced = match self {
                Self::Identity => {
                    out.extend_from_slice(step);
                    continue;
                }
                // flushed after each step: what the decoder holds is what the next bytes need
                Self::Gzip(d) => d
                    .write_all(step)
                    .and_then(|()| d.flush())
                    .map(|()| std::mem::take(d.get_mut())),
                Self::Deflate(d) => d
                    .write_all(step)
                    .and_then(|()| d.flush())
                    .map(|()| std::mem::take(d.get_mut())),
            }
            .map_err(|e| DecodeFailure::Corrupt(name, e))?;
            out.extend_from_slice(&produced);
            if out.len() as u64 > budget {
                return Err(DecodeFailure::TooLarge);
            }
        }
        if out.len() as u64 > budget {
            return Err(DecodeFailure::TooLarge);
        }
        Ok(out)
    }

    /// The end of the coded body: what the decoder still held; a body cut short is corrupt.
    pub fn finish(self) -> Result<Vec<u8>, DecodeFailure> {
        let name = self.name();
        match self {
            Self::Identity => Ok(Vec::new()),
            Self::Gzip(d) => d.finish(),
            Self::Deflate(d) => d.finish(),
        }
        .map_err(|e| DecodeFailure::Corrupt(name, e))
    }
}

/// What the gateway relays of an upstream body: decoded ([`Decoding`]), held to
/// `max_response_bytes`, and redacted ([`Redactor`]), chunk by chunk.
#[derive(Debug)]
pub struct BodyFilter<'n> {
    decoding: Decoding,
    redactor: Redactor<'n>,
    /// Decoded bytes so far, and the most there may be (`u64::MAX`: unlimited).
    decoded: u64,
    max: u64,
}

impl<'n> BodyFilter<'n> {
    /// A filter for one body coded as `decoding`, of at most `max` decoded bytes (0 = no limit).
    pub fn new(decoding: Decoding, needles: &'n Needles, max: u64) -> Self {
        Self {
            decoding,
            redactor: Redactor::new(needles),
            decoded: 0,
            max: if max == 0 { u64::MAX } else { max },
        }
    }

    /// The bytes to relay for the next coded `chunk`; with `last`, the body ends with it and
    /// everything the decoder and the redactor held comes out too.
    pub fn push(&mut self, chunk: &[u8], last: bool) -> Result<Vec<u8>, DecodeFailure> {
        let budget = self.max - self.decoded;
        // an unencoded chunk goes to the redactor as it is (the hot path: no copy here)
        let decoded: std::borrow::Cow<'_, [u8]> = if self.decoding.is_identity() {
            chunk.into()
        } else {
            let mut decoded = self.decoding.push(chunk, budget)?;
            if last {
                let decoding = std::mem::replace(&mut self.decoding, Decoding::Identity);
                decoded.extend(decoding.finish()?);
            }
            decoded.into()
        };
        if decoded.len() as u64 > budget {
            return Err(DecodeFailure::TooLarge);
        }
        self.decoded += decoded.len() as u64;
        let mut out = self.redactor.push(&decoded);
        if last {
            out.extend(self.redactor.finish());
        }
        Ok(out)
    }

    /// Occurrences of the credential redacted so far.
    pub fn hits(&self) -> u64 {
        self.redactor.hits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    const KEY: &str = "sk-live-4f/9+c=Z\"q\\x 7";

    fn relay(needles: &Needles, body: &[u8], cuts: &[usize]) -> (Vec<u8>, u64) {
        let mut r = Redactor::new(needles);
        let mut out = Vec::new();
        let mut at = 0;
        for &c in cuts {
            out.extend(r.push(&body[at..c]));
            at = c;
        }
        out.extend(r.push(&body[at..]));
        out.extend(r.finish());
        (out, r.hits())
    }

    #[test]
    fn every_form_is_found_and_lengths_are_kept() {
        let needles = Needles::new(
            KEY,
            &Auth::Basic {
                user: "acct".into(),
            },
        );
        let b64 = base64::engine::general_purpose::STANDARD;
        let forms: Vec<Vec<u8>> = vec![
            KEY.into(),
            percent(KEY.as_bytes(), true, false),
            percent(KEY.as_bytes(), false, true),
            serde_json::to_string(KEY).expect("json").into_bytes(),
            json(KEY.as_bytes(), false, true, false),
            b64.encode(KEY).into_bytes(),
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(KEY)
                .into_bytes(),
            format!("Basic {}", b64.encode(format!("acct:{KEY}"))).into_bytes(),
            // inside a longer base64 text, at each alignment
            b64.encode(format!("x{KEY}yz")).into_bytes(),
            b64.encode(format!("xy{KEY}")).into_bytes(),
        ];
        for form in forms {
            let body = [b"{\"error\": \"".as_slice(), &form, b"\"}"].concat();
            let mut redacted = body.clone();
            let hits = needles.redact(&mut redacted);
            assert!(hits >= 1, "{}", String::from_utf8_lossy(&form));
            assert_eq!(redacted.len(), body.len());
            for f in &needles.forms {
                assert!(memchr::memmem::find(&redacted, f).is_none());
            }
        }
        let mut clean = b"nothing to see here, sk-live- alone".to_vec();
        assert_eq!(needles.redact(&mut clean), 0);
        let mut values = vec![
            b"text/plain".to_vec(),
            format!("Bearer {KEY}").into_bytes(),
            Vec::new(),
            format!("{KEY}, {KEY}").into_bytes(),
        ];
        let lengths: Vec<usize> = values.iter().map(Vec::len).collect();
        assert_eq!(needles.redact_all(&mut values), 3);
        assert_eq!(values[0], b"text/plain");
        assert_eq!(values.iter().map(Vec::len).collect::<Vec<_>>(), lengths);
        assert!(
            values
                .iter()
                .all(|v| memchr::memmem::find(v, KEY.as_bytes()).is_none())
        );
    }

    #[test]
    fn chunk_boundaries_change_nothing() {
        let needles = Needles::new(KEY, &Auth::Bearer);
        let body = format!("data: {{\"echo\":\"{KEY}\"}}\n\ndata: {KEY}{KEY}\n\n").into_bytes();
        let whole = relay(&needles, &body, &[]);
        assert_eq!(whole.1, 3);
        for a in 0..=body.len() {
            for b in a..=body.len().min(a + 40) {
                assert_eq!(relay(&needles, &body, &[a, b]), whole, "cut at {a}, {b}");
            }
        }
    }

    #[test]
    fn only_a_possible_start_is_held_back() {
        let needles = Needles::new(KEY, &Auth::Bearer);
        let mut r = Redactor::new(&needles);
        // an SSE event that ends its chunk is released whole
        assert_eq!(r.push(b"data: {}\n\n"), b"data: {}\n\n");
        // the start of the key is held until it is known not to be the key
        assert_eq!(r.push(b"data: sk-li"), b"data: ");
        assert_eq!(r.push(b"ght\n\n"), b"sk-light\n\n");
        assert_eq!(r.hits(), 0);
    }

    #[test]
    fn gzip_bodies_are_decoded_in_bounded_steps() {
        use std::io::Write;
        let body = format!("{{\"echo\": \"{KEY}\"}}").repeat(50).into_bytes();
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&body).expect("gzip");
        let coded = enc.finish().expect("gzip");
        let mut d = Decoding::for_header(Some(b" GZip ")).expect("gzip is decoded");
        let mut out = Vec::new();
        for part in coded.chunks(7) {
            out.extend(d.push(part, u64::MAX).expect("decodes"));
        }
        out.extend(d.finish().expect("complete"));
        assert_eq!(out, body);
        let mut d = Decoding::for_header(Some(b"gzip")).expect("gzip");
        assert!(matches!(d.push(&coded, 100), Err(DecodeFailure::TooLarge)));
        let mut d = Decoding::for_header(Some(b"gzip")).expect("gzip");
        let _ = d.push(&coded[..coded.len() / 2], u64::MAX);
        assert!(matches!(d.finish(), Err(DecodeFailure::Corrupt("gzip", _))));
        assert!(Decoding::for_header(Some(b"br")).is_err());
        assert!(Decoding::for_header(Some(b"gzip, br")).is_err());
        assert!(Decoding::for_header(None).expect("none").is_identity());
    }

    #[test]
    fn a_body_filter_decodes_limits_and_redacts() {
        use std::io::Write;
        let needles = Needles::new(KEY, &Auth::Bearer);
        let body = format!("{{\"echo\": \"{KEY}\"}}").into_bytes();
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&body).expect("gzip");
        let coded = enc.finish().expect("gzip");
        let coding = || Decoding::for_header(Some(b"gzip")).expect("gzip");
        let mut f = BodyFilter::new(coding(), &needles, 0);
        let (head, tail) = coded.split_at(coded.len() / 2);
        let mut out = f.push(head, false).expect("decodes");
        out.extend(f.push(tail, false).expect("decodes"));
        out.extend(f.push(&[], true).expect("ends"));
        assert_eq!(out.len(), body.len());
        assert_eq!(f.hits(), 1);
        assert!(memchr::memmem::find(&out, KEY.as_bytes()).is_none());
        let mut f = BodyFilter::new(coding(), &needles, body.len() as u64 - 1);
        assert!(matches!(f.push(&coded, true), Err(DecodeFailure::TooLarge)));
        let mut f = BodyFilter::new(Decoding::Identity, &needles, body.len() as u64);
        assert!(matches!(f.push(&body, true).map(|o| o.len()), Ok(n) if n == body.len()));
    }

    proptest::proptest! {
        #[test]
        fn nothing_released_holds_a_form(
            noise in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
            at in 0usize..200,
            cuts in proptest::collection::vec(0usize..260, 0..6),
        ) {
            let needles = Needles::new(KEY, &Auth::Bearer);
            let at = at.min(noise.len());
            let body = [&noise[..at], KEY.as_bytes(), &noise[at..]].concat();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(body.len())).collect();
            cuts.sort_unstable();
            let (out, hits) = relay(&needles, &body, &cuts);
            proptest::prop_assert_eq!(out.len(), body.len());
            proptest::prop_assert!(hits >= 1);
            proptest::prop_assert!(memchr::memmem::find(&out, KEY.as_bytes()).is_none());
        }

        #[test]
        fn the_short_text_search_finds_what_memmem_finds(
            buf in proptest::collection::vec(0u8..3, 0..300),
            form in proptest::collection::vec(0u8..3, 1..6),
        ) {
            // a three-letter alphabet: occurrences, overlapping ones among them, are common
            let short: Vec<usize> = short_occurrences(&buf, &form).collect();
            let memmem: Vec<usize> = memchr::memmem::find_iter(&buf, &form).collect();
            proptest::prop_assert_eq!(short, memmem);
        }
    }
}

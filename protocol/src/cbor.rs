//! Strict CBOR encoding of our serde types (RFC 8949) with ciborium.
//!
//! Decoding rejects trailing bytes and oversize input; encoding of our own types cannot fail.
//!
//! [`PlainReader`] reads the plain subset of CBOR that didgate's own writers produce, for the
//! fast decoders that sit beside the strict ones (`decode_plain` of a request, a receipt or an
//! audit entry, [`crate::envelope::parse_plain`]): whatever it does not read is left to the
//! strict decoder, whose verdict stands.

use serde::{Serialize, de::DeserializeOwned};

use crate::error::Shared;

/// The error of the CBOR decoder (ciborium) reading from a byte slice or a reader.
pub type CborError = ciborium::de::Error<std::io::Error>;

/// Why bytes did not decode as the expected message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Not CBOR of the expected shape: the CBOR decoder's error.
    #[error("malformed CBOR: {0}")]
    Malformed(#[source] Shared<CborError>),
    /// CBOR outside the strict encoding a decoder requires (an audit entry's: definite
    /// lengths, shortest arguments, no tag, ...): `what` was found at byte `at`.
    #[error("malformed CBOR: {what} at byte {at}")]
    Encoding {
        /// What was found (`"an indefinite length"`).
        what: &'static str,
        /// Its byte offset in the input.
        at: usize,
    },
    /// Fields that the message's table does not allow for its kind and version, lacks, or holds
    /// in another CBOR type than the table's (a reason for a person, naming kind and field).
    #[error("malformed CBOR: {0}")]
    Fields(String),
    /// Bytes left over after the item.
    #[error("{0} trailing bytes after the CBOR item")]
    Trailing(usize),
    /// A version this implementation does not speak.
    #[error("unsupported version {0}")]
    Version(u64),
    /// A field is outside its allowed range.
    #[error("invalid field {0}")]
    Field(&'static str),
}

/// Encodes a value as CBOR.
pub fn to_vec<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    ciborium::into_writer(value, &mut out)
        .unwrap_or_else(|e| unreachable!("CBOR encoding into a Vec cannot fail: {e}"));
    out
}

/// Decodes exactly one CBOR item; trailing bytes are an error.
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let mut rest = bytes;
    let value = ciborium::de::from_reader_with_recursion_limit(&mut rest, 32)
        .map_err(|e: CborError| DecodeError::Malformed(e.into()))?;
    if !rest.is_empty() {
        return Err(DecodeError::Trailing(rest.len()));
    }
    Ok(value)
}

/// A visitor that takes a CBOR byte string and nothing else: an array of integers, which
/// serde's byte-buffer types also accept, is refused (a second encoding of one value would let
/// two different messages carry the same field).
struct ByteString;

impl<'de> serde::de::Visitor<'de> for ByteString {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a byte string")
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
        Ok(v.to_vec())
    }

    fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
        Ok(v)
    }
}

/// A byte string, or null.
struct OptionalByteString;

impl<'de> serde::de::Visitor<'de> for OptionalByteString {
    type Value = Option<Vec<u8>>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a byte string or null")
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_byte_buf(ByteString).map(Some)
    }
}

/// Byte strings (`Vec<u8>`) encoded as CBOR byte strings, decoded strictly (never from an
/// array of integers).
pub mod bytes {
    use serde::{Deserializer, Serializer};

    /// Serialises bytes as a byte string.
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    /// Deserialises a byte string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(super::ByteString)
    }
}

/// Optional byte strings, decoded strictly.
pub mod bytes_opt {
    use serde::{Deserializer, Serializer};

    /// Serialises `Option<Vec<u8>>` as a byte string or null.
    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_bytes(v),
            None => s.serialize_none(),
        }
    }

    /// Deserialises a byte string or null.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        d.deserialize_option(super::OptionalByteString)
    }
}

/// Fixed-size byte strings encoded as CBOR byte strings.
pub mod fixed {
    use serde::{Deserializer, Serializer, de::Error};

    /// Serialises `[u8; N]` as a byte string.
    pub fn serialize<S: Serializer, const N: usize>(v: &[u8; N], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    /// Deserialises a byte string of exactly N bytes (never an array of integers).
    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        d: D,
    ) -> Result<[u8; N], D::Error> {
        let v = d.deserialize_byte_buf(super::ByteString)?;
        v.as_slice()
            .try_into()
            .map_err(|_| D::Error::invalid_length(v.len(), &"a fixed-size byte string"))
    }
}

/// Optional fixed-size byte strings.
pub mod fixed_opt {
    use serde::{Deserializer, Serializer, de::Error};

    /// Serialises `Option<[u8; N]>` as a byte string or null.
    pub fn serialize<S: Serializer, const N: usize>(
        v: &Option<[u8; N]>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_bytes(v),
            None => s.serialize_none(),
        }
    }

    /// Deserialises a byte string of exactly N bytes, or null (never an array of integers).
    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        d: D,
    ) -> Result<Option<[u8; N]>, D::Error> {
        let v = d.deserialize_option(super::OptionalByteString)?;
        v.map(|v| {
            v.as_slice()
                .try_into()
                .map_err(|_| D::Error::invalid_length(v.len(), &"a fixed-size byte string"))
        })
        .transpose()
    }
}

/// A reader of the plain CBOR subset didgate's writers produce: definite lengths, every
/// argument in its shortest form, no tags, text strings of at most 1024 bytes. Each read
/// returns `None` on anything else and leaves the reader where it stopped; a fast decoder
/// built on it then gives up, and its caller uses the strict decoder (whose verdict and error
/// stand). Everything it reads, ciborium reads to the same value.
#[derive(Debug, Clone)]
pub struct PlainReader<'b> {
    bytes: &'b [u8],
    at: usize,
}

impl<'b> PlainReader<'b> {
    /// A reader at the start of `bytes`.
    #[inline]
    pub fn new(bytes: &'b [u8]) -> Self {
        Self { bytes, at: 0 }
    }

    /// Whether every byte was read.
    #[inline]
    pub fn at_end(&self) -> bool {
        self.at == self.bytes.len()
    }

    /// The next byte, not read.
    #[inline]
    pub fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    /// Reads the next byte if it is `byte`; `None` (nothing read) if it is not.
    #[inline]
    pub fn skip(&mut self, byte: u8) -> Option<()> {
        if self.peek() != Some(byte) {
            return None;
        }
        self.at += 1;
        Some(())
    }

    /// A head of major type `major` with its argument in the shortest form; not indefinite.
    #[inline]
    pub fn head(&mut self, major: u8) -> Option<u64> {
        let first = *self.bytes.get(self.at)?;
        if first >> 5 != major {
            return None;
        }
        let info = first & 0x1f;
        let (len, min) = match info {
            0..=23 => {
                self.at += 1;
                return Some(u64::from(info));
            }
            24 => (1, 24),
            25 => (2, 0x100),
            26 => (4, 0x1_0000),
            27 => (8, 0x1_0000_0000),
            _ => return None,
        };
        let raw = self.bytes.get(self.at + 1..self.at + 1 + len)?;
        let value = raw.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        if value < min {
            return None;
        }
        self.at += 1 + len;
        Some(value)
    }

    /// An unsigned integer.
    #[inline]
    pub fn uint(&mut self) -> Option<u64> {
        self.head(0)
    }

    /// A byte string.
    #[inline]
    pub fn bytes(&mut self) -> Option<&'b [u8]> {
        let len = usize::try_from(self.head(2)?).ok()?;
        let out = self.bytes.get(self.at..self.at.checked_add(len)?)?;
        self.at += len;
        Some(out)
    }

    /// A byte string of exactly `N` bytes.
    #[inline]
    pub fn fixed<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes()?.try_into().ok()
    }

    /// A text string of at most 1024 bytes (read by ciborium in one piece).
    #[inline]
    pub fn text(&mut self) -> Option<&'b str> {
        let len = usize::try_from(self.head(3)?).ok()?;
        if len > 1024 {
            return None;
        }
        let out = self.bytes.get(self.at..self.at + len)?;
        self.at += len;
        std::str::from_utf8(out).ok()
    }

    /// A text string, owned.
    #[inline]
    pub fn string(&mut self) -> Option<String> {
        self.text().map(str::to_string)
    }

    /// Null as `None`, else the value read by `f`; `None` if neither.
    #[inline]
    pub fn opt<T>(&mut self, f: impl FnOnce(&mut Self) -> Option<T>) -> Option<Option<T>> {
        if self.skip(0xf6).is_some() {
            return Some(None);
        }
        f(self).map(Some)
    }

    /// An array of two-text arrays (serde's `Vec<(String, String)>`).
    pub fn pairs(&mut self) -> Option<Vec<(String, String)>> {
        let n = self.head(4)?;
        let mut out = Vec::with_capacity(usize::try_from(n).ok()?.min(64));
        for _ in 0..n {
            if self.head(4)? != 2 {
                return None;
            }
            out.push((self.string()?, self.string()?));
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cbor_decode_error_is_the_source_of_malformed() {
        let e = from_slice::<u64>(b"\xff").expect_err("a break is no item");
        let source = std::error::Error::source(&e).expect("a source");
        let cbor = source
            .downcast_ref::<Shared<CborError>>()
            .expect("the CBOR decoder's error");
        assert_eq!(e.to_string(), format!("malformed CBOR: {}", cbor.get()));
        assert_eq!(e.clone(), e, "still Clone and PartialEq");
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Record {
        #[serde(with = "bytes")]
        blob: Vec<u8>,
        #[serde(with = "bytes_opt", default)]
        maybe: Option<Vec<u8>>,
        #[serde(with = "fixed")]
        id: [u8; 4],
    }

    /// `record` with its `field` replaced by `value`, encoded.
    fn with(record: &Record, field: &str, value: ciborium::Value) -> Vec<u8> {
        let mut map: ciborium::Value = from_slice(&to_vec(record)).expect("own encoding");
        for (k, v) in map.as_map_mut().expect("a map") {
            if k.as_text() == Some(field) {
                *v = value.clone();
            }
        }
        to_vec(&map)
    }

    #[test]
    fn byte_strings_of_any_length_decode_and_arrays_do_not() {
        // longer than ciborium's 4 KiB scratch buffer (a signed request in an entry can be)
        let r = Record {
            blob: vec![7; 10_000],
            maybe: Some(vec![8; 5_000]),
            id: [1, 2, 3, 4],
        };
        assert_eq!(from_slice::<Record>(&to_vec(&r)), Ok(r));
        let r = Record {
            blob: vec![7; 3],
            maybe: None,
            id: [1, 2, 3, 4],
        };
        let ints = |b: &[u8]| ciborium::Value::Array(b.iter().map(|&x| x.into()).collect());
        // regression (issue 18): an array of integers where a byte string belongs
        for (field, value) in [
            ("blob", ints(&[7, 7, 7])),
            ("maybe", ints(&[8])),
            ("id", ints(&[1, 2, 3, 4])),
        ] {
            let bytes = with(&r, field, value);
            assert!(
                matches!(from_slice::<Record>(&bytes), Err(DecodeError::Malformed(_))),
                "{field}"
            );
        }
    }
}

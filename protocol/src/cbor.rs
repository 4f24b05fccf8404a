//! Strict CBOR encoding of our serde types (RFC 8949) with ciborium.
//!
//! Decoding rejects trailing bytes and oversize input; encoding of our own types cannot fail.

use serde::{Serialize, de::DeserializeOwned};

/// Why bytes did not decode as the expected message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Not CBOR of the expected shape.
    #[error("malformed CBOR: {0}")]
    Malformed(String),
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
        .map_err(|e: ciborium::de::Error<std::io::Error>| DecodeError::Malformed(e.to_string()))?;
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

#[cfg(test)]
mod tests {
    use super::*;

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

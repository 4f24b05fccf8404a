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

/// Fixed-size byte strings encoded as CBOR byte strings.
pub mod fixed {
    use serde::{Deserializer, Serializer, de::Error};

    /// Serialises `[u8; N]` as a byte string.
    pub fn serialize<S: Serializer, const N: usize>(v: &[u8; N], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    /// Deserialises a byte string of exactly N bytes.
    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        d: D,
    ) -> Result<[u8; N], D::Error> {
        let v: serde_bytes::ByteBuf = serde::Deserialize::deserialize(d)?;
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

    /// Deserialises a byte string of exactly N bytes, or null.
    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        d: D,
    ) -> Result<Option<[u8; N]>, D::Error> {
        let v: Option<serde_bytes::ByteBuf> = serde::Deserialize::deserialize(d)?;
        v.map(|v| {
            v.as_slice()
                .try_into()
                .map_err(|_| D::Error::invalid_length(v.len(), &"a fixed-size byte string"))
        })
        .transpose()
    }
}

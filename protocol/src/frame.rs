//! Framing on a QUIC stream (specs/protocol.md, "Frames").
//!
//! A frame is `type (1 byte) || length (u32, big-endian) || payload`, the payload at most
//! [`MAX_FRAME`] bytes. [`FrameDecoder`] is sans-IO: feed it bytes, take whole frames out.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The hard limit on a frame's payload.
pub const MAX_FRAME: usize = 64 * 1024;
/// Bytes of frame header.
pub const HEADER_LEN: usize = 5;

/// The type of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameType {
    /// Client -> gateway: the signed request (COSE_Sign1).
    Request = 1,
    /// Either way: a chunk of body.
    Body = 2,
    /// Gateway -> client: the response head (CBOR [`crate::message::ResponseHead`]).
    Head = 3,
    /// Gateway -> client: the signed receipt, last frame of a successful call.
    Receipt = 4,
    /// Gateway -> client: a signed refusal, last frame of a refused or failed call.
    Refusal = 5,
    /// Client -> gateway: a signed request asking for a grant (two-step flow), no body.
    GrantRequest = 6,
    /// Gateway -> client: the signed grant, last frame of a grant request.
    Grant = 7,
    /// Client -> gateway: a signed grant presented for execution, then the body frames.
    Execute = 8,
    /// Client -> gateway: asks for the operations this DID may call (CBOR
    /// [`crate::catalog::CatalogRequest`]).
    CatalogRequest = 9,
    /// Gateway -> client: part of the answer to a catalog request (CBOR
    /// [`crate::catalog::Catalog`]); one or more, then FIN.
    Catalog = 10,
    /// Member -> node, version 2 (amendment 2.10): asks for the node's audit chain (CBOR
    /// [`crate::chain::ChainRequest`]).
    ChainRequest = 11,
    /// Node -> member, version 2: the next bytes of the node's sealed export file; one or
    /// more, then FIN.
    ChainPart = 12,
}

impl FrameType {
    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Request,
            2 => Self::Body,
            3 => Self::Head,
            4 => Self::Receipt,
            5 => Self::Refusal,
            6 => Self::GrantRequest,
            7 => Self::Grant,
            8 => Self::Execute,
            9 => Self::CatalogRequest,
            10 => Self::Catalog,
            11 => Self::ChainRequest,
            12 => Self::ChainPart,
            _ => return None,
        })
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Its type.
    pub kind: FrameType,
    /// Its payload.
    pub payload: Bytes,
}

/// Why a byte stream is not a valid frame sequence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// Unknown frame type byte.
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// Declared length above [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame")]
    Truncated,
}

/// Encodes a frame into `out`. Payloads longer than [`MAX_FRAME`] are a caller bug; use
/// [`encode_chunks`] for bodies.
pub fn encode(kind: FrameType, payload: &[u8], out: &mut BytesMut) -> Result<(), FrameError> {
    if payload.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(payload.len()));
    }
    out.reserve(HEADER_LEN + payload.len());
    out.put_u8(kind as u8);
    out.put_u32(payload.len() as u32);
    out.put_slice(payload);
    Ok(())
}

/// Encodes `body` as a sequence of [`FrameType::Body`] frames.
pub fn encode_chunks(body: &[u8], out: &mut BytesMut) {
    for chunk in body.chunks(MAX_FRAME) {
        out.put_u8(FrameType::Body as u8);
        out.put_u32(chunk.len() as u32);
        out.put_slice(chunk);
    }
}

/// Incremental frame decoder.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: BytesMut,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Takes the next whole frame, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let kind = FrameType::from_byte(self.buf[0]).ok_or(FrameError::UnknownType(self.buf[0]))?;
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        self.buf.advance(HEADER_LEN);
        let payload = self.buf.split_to(len).freeze();
        Ok(Some(Frame { kind, payload }))
    }

    /// Call at end of stream: errors if a partial frame is left.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_byte_by_byte() {
        let mut out = BytesMut::new();
        encode(FrameType::Request, b"abc", &mut out).expect("fits");
        encode_chunks(&vec![9u8; MAX_FRAME + 3], &mut out);
        let mut d = FrameDecoder::new();
        let mut frames = Vec::new();
        for b in out.iter() {
            d.push(&[*b]);
            while let Some(f) = d.next_frame().expect("valid") {
                frames.push(f);
            }
        }
        d.finish().expect("complete");
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[0].payload.as_ref(), b"abc");
        assert_eq!(frames[1].payload.len(), MAX_FRAME);
        assert_eq!(frames[2].payload.len(), 3);
    }

    #[test]
    fn oversize_and_unknown_refused() {
        let mut d = FrameDecoder::new();
        d.push(&[2, 0, 1, 0, 1]);
        assert_eq!(d.next_frame(), Err(FrameError::TooLarge(65537)));
        let mut d = FrameDecoder::new();
        d.push(&[13, 0, 0, 0, 0]);
        assert_eq!(d.next_frame(), Err(FrameError::UnknownType(13)));
        let mut d = FrameDecoder::new();
        d.push(&[2, 0, 0, 0, 4, 1]);
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(d.finish(), Err(FrameError::Truncated));
        assert!(
            encode(
                FrameType::Body,
                &vec![0; MAX_FRAME + 1],
                &mut BytesMut::new()
            )
            .is_err()
        );
    }

    proptest::proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let mut d = FrameDecoder::new();
            d.push(&bytes);
            while let Ok(Some(_)) = d.next_frame() {}
        }
    }
}

//! Async frame I/O on quinn streams, shared by the client and the gateway. The frame format
//! itself is sans-IO in `didgate_protocol::frame`.

use bytes::BytesMut;
use didgate_protocol::frame::{self, Frame, FrameDecoder, FrameError, FrameType};

/// Why a stream could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The byte stream is not valid framing.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// Reading failed (connection closed, reset, timeout).
    #[error("read: {0}")]
    Read(#[from] quinn::ReadError),
    /// Writing failed.
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    /// The stream was already finished.
    #[error("stream closed")]
    Closed,
}

/// Reads the next frame; `None` at a clean end of stream.
pub async fn next_frame(
    recv: &mut quinn::RecvStream,
    dec: &mut FrameDecoder,
) -> Result<Option<Frame>, WireError> {
    loop {
        if let Some(f) = dec.next_frame()? {
            return Ok(Some(f));
        }
        match recv.read_chunk(frame::MAX_FRAME, true).await? {
            Some(chunk) => dec.push(&chunk.bytes),
            None => {
                dec.finish()?;
                return Ok(None);
            }
        }
    }
}

/// Writes one frame.
pub async fn write_frame(
    send: &mut quinn::SendStream,
    kind: FrameType,
    payload: &[u8],
) -> Result<(), WireError> {
    let mut out = BytesMut::with_capacity(payload.len() + frame::HEADER_LEN);
    frame::encode(kind, payload, &mut out)?;
    send.write_all(&out).await.map_err(|e| match e {
        quinn::WriteError::ClosedStream => WireError::Closed,
        e => WireError::Write(e),
    })
}

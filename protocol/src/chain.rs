//! The chain exchange of a cluster (specs/protocol.md, "Chain export", amendment 2.10): a
//! member of the gateway's cluster asks a node for its audit chain, and the node answers with
//! its sealed export file in [`crate::frame::FrameType::ChainPart`] frames.
//!
//! Owns the request ([`ChainRequest`]); the export file the answer carries is
//! specs/audit-log.md's "Export files", unchanged. Sans-IO like the rest of the crate.

use serde::{Deserialize, Serialize};

use crate::Version;
use crate::cbor::DecodeError;
use crate::message::Message;

/// Frame `ChainRequest` payload: asks the node for its whole chain, sealed. Unsigned: the
/// requester is the TLS peer, which the node must find among its cluster's members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainRequest {
    /// Message version: 2 (the exchange does not exist in version 1).
    pub v: u64,
}

impl ChainRequest {
    /// The request of the current version.
    pub fn new() -> Self {
        Self {
            v: Version::V2.as_u64(),
        }
    }
}

impl Default for ChainRequest {
    fn default() -> Self {
        Self::new()
    }
}

impl Message for ChainRequest {
    fn version(&self) -> u64 {
        self.v
    }

    /// Version 1 has no chain exchange.
    fn check_version(&self) -> Result<(), DecodeError> {
        if self.v == Version::V1.as_u64() {
            return Err(DecodeError::Version(self.v));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_request_is_version_2_only_and_strict() {
        let req = ChainRequest::new();
        // {"v": 2}
        assert_eq!(req.encode(), [0xa1, 0x61, 0x76, 0x02]);
        assert_eq!(ChainRequest::decode(&req.encode()), Ok(req));
        assert_eq!(
            ChainRequest::decode(&[0xa1, 0x61, 0x76, 0x01]),
            Err(DecodeError::Version(1))
        );
        // an unknown field is refused
        assert!(ChainRequest::decode(&[0xa2, 0x61, 0x76, 0x02, 0x61, 0x78, 0x00]).is_err());
    }
}

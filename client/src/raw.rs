//! What one stream returned, before the client library judges it (re-exported by
//! [`crate::low_level`]).

use didgate_protocol::message::{GrantBody, Receipt, Refusal, ResponseHead, Signed};

/// The gateway's last word on one stream, unverified beyond its signature.
#[derive(Debug)]
pub enum RawFinal {
    /// A receipt (signature verified, signer = pinned gateway).
    Receipt(Signed<Receipt>),
    /// A refusal (signature verified, signer = pinned gateway).
    Refusal(Signed<Refusal>),
    /// A grant (two-step flow; signature verified, signer = pinned gateway).
    Grant(Signed<GrantBody>),
}

/// Everything one stream returned.
#[derive(Debug)]
pub struct RawAnswer {
    /// The response head, if any.
    pub head: Option<ResponseHead>,
    /// The body bytes.
    pub body: Vec<u8>,
    /// The final frame.
    pub last: RawFinal,
}

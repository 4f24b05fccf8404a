//! Signed request bytes and raw exchanges: for tests, the benchmark and the independent-client
//! vectors; not needed by an agent.
//!
//! [`RawExchange`] signs a request without sending or recording it, and sends already signed
//! bytes on a stream of their own, returning what came back with only the final frame's
//! signature checked: nothing is recorded in the chain (an agent uses [`Client::call`], which
//! records). Also here: the TLS setup and frame I/O the client shares with the gateway
//! ([`tls`], [`wire`], both from `didgate_io`) and the clock the chain records ([`now_ms`]).

use std::future::Future;

use didgate_protocol::frame::FrameType;

use crate::{CallError, CallSpec, Client};

/// The I/O shared with the gateway ([`didgate_io`]).
pub use didgate_io::{now_ms, tls, wire};

pub use crate::raw::{RawAnswer, RawFinal};

/// A [`Client`]'s low-level operations (module docs): import the trait to use them.
pub trait RawExchange {
    /// Builds and signs a request for `spec` against the current chain head, without sending
    /// or recording it. Returns the signed bytes and the call ID.
    fn sign(&self, spec: &CallSpec) -> Result<(Vec<u8>, [u8; 32]), CallError>;

    /// Sends already signed request bytes and a body on a new stream and returns what came
    /// back, checking only that the final frame is signed by the pinned gateway. Records
    /// nothing in the chain ([`Client::call`] does).
    fn send_signed(
        &self,
        request: &[u8],
        body: &[u8],
    ) -> impl Future<Output = Result<RawAnswer, CallError>> + Send;

    /// One stream carrying a first frame of `kind` and the body; returns the answer, checked
    /// as by [`RawExchange::send_signed`].
    fn exchange(
        &self,
        kind: FrameType,
        first: &[u8],
        body: &[u8],
    ) -> impl Future<Output = Result<RawAnswer, CallError>> + Send;
}

impl RawExchange for Client {
    fn sign(&self, spec: &CallSpec) -> Result<(Vec<u8>, [u8; 32]), CallError> {
        self.sign_request(spec)
    }

    fn send_signed(
        &self,
        request: &[u8],
        body: &[u8],
    ) -> impl Future<Output = Result<RawAnswer, CallError>> + Send {
        self.exchange_raw(FrameType::Request, request, body)
    }

    fn exchange(
        &self,
        kind: FrameType,
        first: &[u8],
        body: &[u8],
    ) -> impl Future<Output = Result<RawAnswer, CallError>> + Send {
        self.exchange_raw(kind, first, body)
    }
}

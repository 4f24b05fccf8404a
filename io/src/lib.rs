//! The I/O both sides of didgate share, over the sans-I/O protocol crate (the way quinn sits
//! over quinn-proto): a DID bound to a TLS certificate and the one rustls crypto provider
//! ([`tls`]), protocol frames over QUIC streams ([`wire`]), identity files ([`identity`]),
//! process and file hardening ([`hardening`]), and the clock ([`now_ms`]).
//!
//! The client library and the gateway both import it; neither imports the other.

pub mod hardening;
pub mod identity;
pub mod tls;
pub mod wire;

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch by the system clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

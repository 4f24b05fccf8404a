//! The I/O both sides of didgate share, over the sans-I/O protocol crate (the way quinn sits
//! over quinn-proto): a DID bound to a TLS certificate and the one rustls crypto provider
//! ([`tls`]), a node's certificate and a client's trust in a gateway's nodes ([`node`]), protocol frames over QUIC streams ([`wire`]), identity files ([`identity`]),
//! process and file hardening ([`hardening`]), and the clock ([`now_ms`], [`fmt_utc`]).
//!
//! The client library and the gateway both import it; neither imports the other.

pub mod cert;
pub mod hardening;
pub mod identity;
pub mod node;
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

/// `YYYY-MM-DDTHH:MM:SSZ` for ms since the Unix epoch.
pub fn fmt_utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // civil_from_days (H. Hinnant)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fmt_utc_known_dates() {
        assert_eq!(fmt_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(fmt_utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(fmt_utc(1_700_000_000_123), "2023-11-14T22:13:20Z");
    }
}

//! Admission of incoming QUIC connections, before any handshake work (specs/operation.md,
//! "Handshake floods"): the decision to accept, validate (QUIC Retry, RFC 9000 8.1.2) or
//! refuse a new connection, from its source address, whether QUIC has validated that address,
//! the gateway-wide rate of new connections, and the per-address counts this module keeps.
//! Pure: every decision takes `now` (ms of a monotonic clock); the QUIC loop
//! ([`crate::server`]) applies it to quinn's `Incoming` and reports back when a handshake ends
//! and when a connection closes.
//!
//! The rules, in order, for one incoming connection:
//!
//! 1. its address is not validated: Retry when the rate of new connections over the last
//!    second is above `retry_above_per_sec` (0: always), or when its address is over a
//!    per-address limit (a spoofed address cannot answer a Retry, so it is never refused and
//!    never charged in someone else's name); otherwise accept it, uncharged;
//! 2. its address is validated: refuse it when the address has `max_in_flight_per_address`
//!    handshakes in flight, or `max_open_per_address` connections open, or its
//!    `rate_per_address` bucket is empty; otherwise accept it, charged (one handshake in flight,
//!    one token).
//!
//! A handshake that completes counts as an open connection of its address until it closes,
//! charged or not: completing a handshake proves the address. Addresses are IPv4 addresses and
//! IPv6 /64 prefixes (one host commonly holds a whole /64).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};

use crate::config::Handshakes;
use crate::limits::TokenBucket;

/// What to do with one incoming connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Go on with the handshake; `charged` when it counts as a handshake in flight of its
    /// address (report its end with `charged`).
    Accept {
        /// Whether the address's in-flight count and bucket were charged.
        charged: bool,
    },
    /// Answer with a QUIC Retry: the client proves its address by echoing a token.
    Retry,
    /// Refuse the connection (QUIC CONNECTION_REFUSED).
    Refuse(Limit),
}

/// The per-address limit a refused connection is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `max_in_flight_per_address`.
    InFlight,
    /// `max_open_per_address`.
    Open,
    /// `rate_per_address`.
    Rate,
}

impl Limit {
    /// The limit's configuration key.
    pub fn key(self) -> &'static str {
        match self {
            Limit::InFlight => "max_in_flight_per_address",
            Limit::Open => "max_open_per_address",
            Limit::Rate => "rate_per_address",
        }
    }
}

/// One address's counts.
#[derive(Debug)]
struct Address {
    in_flight: u64,
    open: u64,
    bucket: Option<TokenBucket>,
}

/// The gateway-wide count of new connections, in one-second windows.
#[derive(Debug, Default)]
struct RateWindow {
    /// Start of the current window, ms.
    start: u64,
    current: u64,
    previous: u64,
}

impl RateWindow {
    /// Counts one new connection at `now` and returns the rate over the last second: this
    /// window's count plus the previous window's, weighted by how much of it the last second
    /// still covers.
    fn record(&mut self, now: u64) -> f64 {
        let elapsed = now.saturating_sub(self.start);
        if elapsed >= 2000 {
            self.previous = 0;
            self.current = 0;
            self.start = now;
        } else if elapsed >= 1000 {
            self.previous = self.current;
            self.current = 0;
            self.start += 1000;
        }
        self.current += 1;
        let into = now.saturating_sub(self.start).min(1000) as f64 / 1000.0;
        self.previous as f64 * (1.0 - into) + self.current as f64
    }
}

/// Most addresses tracked at once; past it, idle ones are dropped.
const MAX_ADDRESSES: usize = 65_536;

/// The admission state of one gateway.
#[derive(Debug)]
pub struct Admission {
    limits: Handshakes,
    window: RateWindow,
    addresses: HashMap<IpAddr, Address>,
}

/// The address a connection is counted under: IPv4 (also IPv4-mapped IPv6) as is, IPv6 by
/// its /64 prefix.
pub fn counted_as(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
    }
}

impl Admission {
    /// Admission under `limits`.
    pub fn new(limits: &Handshakes) -> Self {
        Self {
            limits: limits.clone(),
            window: RateWindow::default(),
            addresses: HashMap::new(),
        }
    }

    /// Decides for a new connection from `ip` at `now`: `validated` when QUIC validated its
    /// address (a Retry token echoed), `may_retry` when a Retry can still be sent.
    pub fn decide(&mut self, ip: IpAddr, validated: bool, may_retry: bool, now: u64) -> Decision {
        let ip = counted_as(ip);
        let rate = self.window.record(now);
        let over = self.over_limit(ip, now);
        if !validated && may_retry {
            let busy = self.limits.retry_above_per_sec == 0
                || rate > self.limits.retry_above_per_sec as f64;
            return if busy || over.is_some() {
                Decision::Retry
            } else {
                Decision::Accept { charged: false }
            };
        }
        if let Some(limit) = over {
            return Decision::Refuse(limit);
        }
        if self.addresses.len() >= MAX_ADDRESSES && !self.addresses.contains_key(&ip) {
            self.addresses.retain(|_, a| !Self::idle(a, now));
        }
        let a = self.address(ip, now);
        if let Some(b) = a.bucket.as_mut() {
            b.try_take(now);
        }
        a.in_flight += 1;
        Decision::Accept { charged: true }
    }

    /// The counts of `ip`, new ones (a full bucket) if it has none.
    fn address(&mut self, ip: IpAddr, now: u64) -> &mut Address {
        let rate = self.limits.rate_per_address;
        self.addresses.entry(ip).or_insert_with(|| Address {
            in_flight: 0,
            open: 0,
            bucket: (rate.burst > 0).then(|| TokenBucket::new(rate, now)),
        })
    }

    /// The limit `ip` is over at `now`, if any (nothing charged).
    fn over_limit(&mut self, ip: IpAddr, now: u64) -> Option<Limit> {
        let a = self.addresses.get_mut(&ip)?;
        let (max_in_flight, max_open) = (
            self.limits.max_in_flight_per_address,
            self.limits.max_open_per_address,
        );
        if max_in_flight > 0 && a.in_flight >= max_in_flight {
            return Some(Limit::InFlight);
        }
        if max_open > 0 && a.open >= max_open {
            return Some(Limit::Open);
        }
        let spent = a.bucket.as_mut().is_some_and(|b| !b.can_take(now));
        spent.then_some(Limit::Rate)
    }

    /// A handshake of `ip` ended: `charged` as decided, `established` when it completed (the
    /// connection then counts as open until [`Admission::closed`]).
    pub fn handshake_ended(&mut self, ip: IpAddr, charged: bool, established: bool, now: u64) {
        let ip = counted_as(ip);
        if !charged && !established {
            return;
        }
        let a = self.address(ip, now);
        if charged {
            a.in_flight = a.in_flight.saturating_sub(1);
        }
        if established {
            a.open += 1;
        }
        self.forget_if_idle(ip, now);
    }

    /// An open connection of `ip` closed.
    pub fn closed(&mut self, ip: IpAddr, now: u64) {
        let ip = counted_as(ip);
        if let Some(a) = self.addresses.get_mut(&ip) {
            a.open = a.open.saturating_sub(1);
        }
        self.forget_if_idle(ip, now);
    }

    /// Open connections counted for `ip`.
    pub fn open(&self, ip: IpAddr) -> u64 {
        self.addresses.get(&counted_as(ip)).map_or(0, |a| a.open)
    }

    /// Handshakes in flight counted for `ip`.
    pub fn in_flight(&self, ip: IpAddr) -> u64 {
        self.addresses
            .get(&counted_as(ip))
            .map_or(0, |a| a.in_flight)
    }

    /// Addresses tracked.
    pub fn addresses(&self) -> usize {
        self.addresses.len()
    }

    fn idle(a: &mut Address, now: u64) -> bool {
        a.in_flight == 0 && a.open == 0 && a.bucket.as_mut().is_none_or(|b| b.is_full(now))
    }

    fn forget_if_idle(&mut self, ip: IpAddr, now: u64) {
        if self
            .addresses
            .get_mut(&ip)
            .is_some_and(|a| Self::idle(a, now))
        {
            self.addresses.remove(&ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RateLimit;

    fn limits() -> Handshakes {
        Handshakes {
            retry_above_per_sec: 10,
            max_in_flight_per_address: 2,
            max_open_per_address: 3,
            rate_per_address: RateLimit {
                burst: 5,
                per_sec: 1.0,
            },
        }
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn quiet_unvalidated_connections_are_accepted_uncharged() {
        let mut adm = Admission::new(&limits());
        for i in 0..10 {
            assert_eq!(
                adm.decide(A, false, true, i * 100),
                Decision::Accept { charged: false }
            );
        }
        assert_eq!(adm.in_flight(A), 0);
        assert_eq!(
            adm.addresses(),
            0,
            "nothing is kept for an unvalidated address"
        );
    }

    #[test]
    fn above_the_rate_unvalidated_connections_get_a_retry() {
        let mut adm = Admission::new(&limits());
        let decisions: Vec<_> = (0..12).map(|_| adm.decide(A, false, true, 500)).collect();
        assert!(
            decisions[..10]
                .iter()
                .all(|d| *d == Decision::Accept { charged: false })
        );
        assert_eq!(decisions[10..], [Decision::Retry, Decision::Retry]);
        // two seconds of quiet: the rate is back under the threshold
        assert_eq!(
            adm.decide(A, false, true, 2600),
            Decision::Accept { charged: false }
        );
    }

    #[test]
    fn the_previous_second_still_weighs_on_the_rate() {
        let mut adm = Admission::new(&limits());
        for _ in 0..10 {
            adm.decide(A, false, true, 900);
        }
        // 100 ms into the next window, 90% of the 10 previous still count: 9 + 1 + 1 > 10
        adm.decide(A, false, true, 1100);
        assert_eq!(adm.decide(A, false, true, 1100), Decision::Retry);
    }

    #[test]
    fn zero_threshold_always_validates() {
        let mut adm = Admission::new(&Handshakes {
            retry_above_per_sec: 0,
            ..limits()
        });
        assert_eq!(adm.decide(A, false, true, 0), Decision::Retry);
        assert_eq!(
            adm.decide(A, true, false, 1),
            Decision::Accept { charged: true }
        );
    }

    #[test]
    fn validated_addresses_are_refused_over_handshakes_in_flight() {
        let mut adm = Admission::new(&limits());
        assert_eq!(
            adm.decide(A, true, false, 0),
            Decision::Accept { charged: true }
        );
        assert_eq!(
            adm.decide(A, true, false, 0),
            Decision::Accept { charged: true }
        );
        assert_eq!(
            adm.decide(A, true, false, 0),
            Decision::Refuse(Limit::InFlight)
        );
        // another address is not affected
        assert_eq!(
            adm.decide(B, true, false, 0),
            Decision::Accept { charged: true }
        );
        // an unvalidated connection from an address over a limit is validated, not refused
        assert_eq!(adm.decide(A, false, true, 0), Decision::Retry);
        adm.handshake_ended(A, true, false, 0);
        assert_eq!(adm.in_flight(A), 1);
        assert_eq!(
            adm.decide(A, true, false, 0),
            Decision::Accept { charged: true }
        );
    }

    #[test]
    fn open_connections_are_counted_until_closed() {
        let mut adm = Admission::new(&Handshakes {
            rate_per_address: RateLimit {
                burst: 0,
                per_sec: 0.0,
            },
            ..limits()
        });
        for _ in 0..3 {
            assert_eq!(
                adm.decide(A, true, false, 0),
                Decision::Accept { charged: true }
            );
            adm.handshake_ended(A, true, true, 0);
        }
        assert_eq!(adm.open(A), 3);
        assert_eq!(adm.decide(A, true, false, 0), Decision::Refuse(Limit::Open));
        // an uncharged handshake that completes counts as open too
        adm.handshake_ended(A, false, true, 0);
        assert_eq!(adm.open(A), 4);
        for _ in 0..4 {
            adm.closed(A, 0);
        }
        assert_eq!(adm.addresses(), 0, "an idle address is forgotten");
        assert_eq!(
            adm.decide(A, true, false, 0),
            Decision::Accept { charged: true }
        );
    }

    #[test]
    fn the_per_address_rate_refuses_without_refilling_in_the_test() {
        let mut adm = Admission::new(&Handshakes {
            max_in_flight_per_address: 0,
            ..limits()
        });
        for _ in 0..5 {
            assert_eq!(
                adm.decide(A, true, false, 0),
                Decision::Accept { charged: true }
            );
            adm.handshake_ended(A, true, false, 0);
        }
        assert_eq!(adm.decide(A, true, false, 0), Decision::Refuse(Limit::Rate));
        // one token a second
        assert_eq!(
            adm.decide(A, true, false, 1000),
            Decision::Accept { charged: true }
        );
    }

    #[test]
    fn ipv6_is_counted_by_its_64_prefix() {
        let a: IpAddr = "2001:db8:1:2::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("ip");
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().expect("ip");
        assert_eq!(counted_as(a), counted_as(b));
        assert_eq!(counted_as(mapped), A);
        let mut adm = Admission::new(&limits());
        adm.decide(a, true, false, 0);
        adm.decide(b, true, false, 0);
        assert_eq!(
            adm.decide(a, true, false, 0),
            Decision::Refuse(Limit::InFlight)
        );
    }
}

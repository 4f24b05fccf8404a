//! Rate and concurrency limits (specs/operation.md, "Limits and egress").
//!
//! [`TokenBucket`] is pure: time is passed in, so tests drive a virtual clock. [`Limits`] keeps
//! the buckets (per DID, per upstream, per DID on one upstream) and the concurrency counters
//! behind one mutex, and hands out RAII [`Permit`]s that give their slots back when dropped.
//! Memory is bounded: buckets that are full again carry no state and are evicted, and the
//! table never holds more than [`Limits::max_entries`] buckets (a new key beyond that is
//! refused, fail closed).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub use crate::config::RateLimit;

/// How many buckets [`Limits::new`] keeps at most by default.
pub const DEFAULT_MAX_ENTRIES: usize = 100_000;

/// How often (ms of the limiter's clock) idle full buckets are swept while new keys arrive.
const SWEEP_EVERY_MS: u64 = 60_000;

/// When the table is full, the shortest interval (ms) between two sweeps looking for room.
const FULL_SWEEP_EVERY_MS: u64 = 1_000;

/// A token bucket over a caller-supplied clock (milliseconds, any origin, non-decreasing;
/// a clock that goes back is treated as standing still).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBucket {
    /// Most tokens held.
    pub capacity: u64,
    /// Tokens added per second.
    pub refill_per_sec: f64,
    /// Tokens held at `last_ms`.
    pub tokens: f64,
    /// When `tokens` was last brought up to date.
    pub last_ms: u64,
}

impl TokenBucket {
    /// A full bucket for `rate` at `now_ms`.
    pub fn new(rate: RateLimit, now_ms: u64) -> Self {
        Self {
            capacity: rate.burst,
            refill_per_sec: rate.per_sec.max(0.0),
            tokens: rate.burst as f64,
            last_ms: now_ms,
        }
    }

    /// Adds the tokens earned since `last_ms`, up to the capacity.
    pub fn refill(&mut self, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.last_ms);
        if elapsed > 0 {
            let earned = elapsed as f64 / 1000.0 * self.refill_per_sec;
            self.tokens = (self.tokens + earned).min(self.capacity as f64);
            self.last_ms = now_ms;
        }
    }

    /// Whether a token is available at `now_ms` (refills first; takes nothing).
    pub fn can_take(&mut self, now_ms: u64) -> bool {
        self.refill(now_ms);
        self.tokens >= 1.0
    }

    /// Takes one token if one is available at `now_ms`.
    pub fn try_take(&mut self, now_ms: u64) -> bool {
        if self.can_take(now_ms) {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket is full at `now_ms` (then it carries no state and may be forgotten).
    pub fn is_full(&mut self, now_ms: u64) -> bool {
        self.refill(now_ms);
        self.tokens >= self.capacity as f64
    }

    /// Milliseconds until a token is available, `None` if it never will be (no refill).
    pub fn wait_ms(&self) -> Option<u64> {
        if self.tokens >= 1.0 {
            return Some(0);
        }
        if self.refill_per_sec <= 0.0 {
            return None;
        }
        Some(((1.0 - self.tokens) / self.refill_per_sec * 1000.0).ceil() as u64)
    }
}

/// What a limit is counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// One caller DID, across all upstreams.
    Did(String),
    /// One upstream, across all callers.
    Upstream(String),
    /// One caller DID on one upstream.
    DidOnUpstream(String, String),
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Did(_) => f.write_str("this DID"),
            Self::Upstream(u) => write!(f, "upstream {u}"),
            Self::DidOnUpstream(_, u) => write!(f, "this DID on upstream {u}"),
        }
    }
}

/// One limit to check for a call: a rate (a token is taken) and/or a concurrency cap (a slot is
/// held by the [`Permit`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// What is counted.
    pub scope: Scope,
    /// Take a token from this scope's bucket, if limited.
    pub rate: Option<RateLimit>,
    /// Hold one of at most this many slots (0 = unlimited).
    pub max_concurrent: u64,
}

/// Why a call is over a limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Exceeded {
    /// The scope's token bucket is empty.
    #[error("rate limit of {scope} exceeded ({})", match retry_after_ms {
        Some(ms) => format!("retry in {ms} ms"),
        None => "no refill".to_string(),
    })]
    Rate {
        /// The scope whose bucket is empty.
        scope: Scope,
        /// When a token will be available, `None` if never.
        retry_after_ms: Option<u64>,
    },
    /// The scope already has its maximum of calls in flight.
    #[error("too many concurrent calls for {scope} (at most {max})")]
    Concurrency {
        /// The scope that is busy.
        scope: Scope,
        /// Its cap.
        max: u64,
    },
    /// The limiter's table is full of buckets that are still draining (fail closed).
    #[error("rate limiter table is full; retry later")]
    TableFull,
}

#[derive(Debug)]
struct State {
    buckets: HashMap<Scope, TokenBucket>,
    running: HashMap<Scope, u64>,
    last_sweep_ms: u64,
}

/// Rate buckets and concurrency counters, shared by all calls.
#[derive(Debug, Clone)]
pub struct Limits {
    state: Arc<Mutex<State>>,
    max_entries: usize,
    origin: Instant,
}

impl Default for Limits {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_ENTRIES)
    }
}

impl Limits {
    /// An empty limiter keeping at most `max_entries` buckets.
    pub fn new(max_entries: usize) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                buckets: HashMap::new(),
                running: HashMap::new(),
                last_sweep_ms: 0,
            })),
            max_entries: max_entries.max(1),
            origin: Instant::now(),
        }
    }

    /// The most buckets kept.
    pub fn max_entries(&self) -> usize {
        self.max_entries
    }

    /// Milliseconds of the limiter's monotonic clock (since it was made); what the gateway
    /// passes as `now_ms`.
    pub fn clock_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// Number of buckets held (for tests and metrics).
    pub fn buckets(&self) -> usize {
        self.lock().buckets.len()
    }

    /// Calls in flight counted against `scope`.
    pub fn running(&self, scope: &Scope) -> u64 {
        self.lock().running.get(scope).copied().unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks every limit of `checks` at `now_ms` and, only if all pass, takes a token from
    /// each rated scope and a slot in each capped scope, all under one lock: a refused call
    /// takes nothing. The slots are given back when the returned permit is dropped.
    pub fn acquire(&self, checks: &[Check], now_ms: u64) -> Result<Permit, Exceeded> {
        let mut st = self.lock();
        // concurrency first: a busy scope costs no token
        for c in checks {
            if c.max_concurrent > 0 {
                let n = st.running.get(&c.scope).copied().unwrap_or(0);
                if n >= c.max_concurrent {
                    return Err(Exceeded::Concurrency {
                        scope: c.scope.clone(),
                        max: c.max_concurrent,
                    });
                }
            }
        }
        let rated: Vec<(&Scope, RateLimit)> = checks
            .iter()
            .filter_map(|c| c.rate.filter(RateLimit::is_limited).map(|r| (&c.scope, r)))
            .collect();
        let new_keys = rated
            .iter()
            .filter(|(s, _)| !st.buckets.contains_key(*s))
            .count();
        if new_keys > 0 {
            self.make_room(&mut st, new_keys, now_ms)?;
        }
        for (scope, rate) in &rated {
            let bucket = st
                .buckets
                .entry((*scope).clone())
                .or_insert_with(|| TokenBucket::new(*rate, now_ms));
            // a configuration change (restart) keeps no bucket, but stay exact anyway
            bucket.capacity = rate.burst;
            bucket.refill_per_sec = rate.per_sec.max(0.0);
            if !bucket.can_take(now_ms) {
                let retry_after_ms = bucket.wait_ms();
                return Err(Exceeded::Rate {
                    scope: (*scope).clone(),
                    retry_after_ms,
                });
            }
        }
        for (scope, _) in &rated {
            if let Some(b) = st.buckets.get_mut(*scope) {
                b.try_take(now_ms);
            }
        }
        let mut held = Vec::new();
        for c in checks {
            if c.max_concurrent > 0 {
                *st.running.entry(c.scope.clone()).or_default() += 1;
                held.push(c.scope.clone());
            }
        }
        Ok(Permit {
            state: self.state.clone(),
            held,
        })
    }

    /// Evicts full buckets (no state lost) periodically, or when `extra` new keys would not
    /// fit; refuses when the table stays full.
    fn make_room(&self, st: &mut State, extra: usize, now_ms: u64) -> Result<(), Exceeded> {
        let full = st.buckets.len() + extra > self.max_entries;
        let since = now_ms.saturating_sub(st.last_sweep_ms);
        if since >= SWEEP_EVERY_MS || (full && since >= FULL_SWEEP_EVERY_MS) {
            st.buckets.retain(|_, b| !b.is_full(now_ms));
            st.last_sweep_ms = now_ms;
        }
        if st.buckets.len() + extra > self.max_entries {
            return Err(Exceeded::TableFull);
        }
        Ok(())
    }
}

/// Concurrency slots held by one call; given back on drop.
#[derive(Debug)]
#[must_use = "the slots are given back when the permit is dropped"]
pub struct Permit {
    state: Arc<Mutex<State>>,
    held: Vec<Scope>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for scope in self.held.drain(..) {
            if let Some(n) = st.running.get_mut(&scope) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    st.running.remove(&scope);
                }
            }
        }
    }
}

/// Which limits a stage of a call is subject to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// A pipelined call: tokens are taken and slots held until its terminal frame.
    Call,
    /// A grant request (two-step flow): tokens are taken, no slot is held (nothing runs).
    Grant,
    /// Executing an issued grant: slots are held, no token is taken (the grant request took
    /// them).
    Execute,
}

/// The checks of a catalog request of `did`: its per-DID rate (a token taken, as for a
/// request), no slot held (nothing runs upstream).
pub fn catalog_checks(settings: &crate::config::Settings, did: &str) -> Vec<Check> {
    let check = Check {
        scope: Scope::Did(did.to_string()),
        rate: Some(settings.rate_per_did),
        max_concurrent: 0,
    };
    if settings.rate_per_did.is_limited() {
        vec![check]
    } else {
        Vec::new()
    }
}

/// The checks for a call of `did` to `up` at `stage`, from the configuration: the
/// `[gateway]` per-DID limits, the upstream's limits (its own values, else the `[gateway]`
/// defaults) and the upstream's per-DID limits.
pub fn checks(
    settings: &crate::config::Settings,
    up: &crate::config::Upstream,
    did: &str,
    stage: Stage,
) -> Vec<Check> {
    let rate = |r: Option<RateLimit>| if stage == Stage::Execute { None } else { r };
    let slots = |n: u64| if stage == Stage::Grant { 0 } else { n };
    let mut out = vec![
        Check {
            scope: Scope::Did(did.to_string()),
            rate: rate(Some(settings.rate_per_did)),
            max_concurrent: slots(settings.max_concurrent_per_did),
        },
        Check {
            scope: Scope::Upstream(up.name().to_string()),
            rate: rate(Some(
                up.rate_per_upstream().unwrap_or(settings.rate_per_upstream),
            )),
            max_concurrent: slots(
                up.max_concurrent_per_upstream()
                    .unwrap_or(settings.max_concurrent_per_upstream),
            ),
        },
    ];
    if up.rate_per_did().is_some() || up.max_concurrent_per_did().is_some() {
        out.push(Check {
            scope: Scope::DidOnUpstream(did.to_string(), up.name().to_string()),
            rate: rate(up.rate_per_did()),
            max_concurrent: slots(up.max_concurrent_per_did().unwrap_or(0)),
        });
    }
    out.retain(|c| c.rate.is_some_and(|r| r.is_limited()) || c.max_concurrent > 0);
    out
}

/// Scales the per-upstream limit of `checks` to `share` of it (a cluster node's part,
/// didgate_cluster::shares): its rate and burst, and its concurrency cap, each at least 1 when
/// limited. A share of 1 changes nothing.
pub fn scale_upstream(checks: &mut [Check], share: f64) {
    if share >= 1.0 || !share.is_finite() {
        return;
    }
    let share = share.max(0.0);
    let part = |n: u64| ((n as f64 * share).round() as u64).max(1);
    for c in checks.iter_mut() {
        if !matches!(c.scope, Scope::Upstream(_)) {
            continue;
        }
        if let Some(r) = c.rate.as_mut()
            && r.is_limited()
        {
            r.per_sec *= share;
            r.burst = part(r.burst);
        }
        if c.max_concurrent > 0 {
            c.max_concurrent = part(c.max_concurrent);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rate(burst: u64, per_sec: f64) -> RateLimit {
        RateLimit { burst, per_sec }
    }

    #[test]
    fn a_share_scales_the_upstream_limits_only() {
        let mut checks = vec![
            did_check("did:key:a", Some(rate(10, 5.0)), 4),
            Check {
                scope: Scope::Upstream("u".into()),
                rate: Some(rate(20, 40.0)),
                max_concurrent: 8,
            },
        ];
        scale_upstream(&mut checks, 0.25);
        assert_eq!(checks[0], did_check("did:key:a", Some(rate(10, 5.0)), 4));
        assert_eq!(checks[1].rate, Some(rate(5, 10.0)));
        assert_eq!(checks[1].max_concurrent, 2);
        // never below one call; unlimited stays unlimited
        let mut tiny = vec![Check {
            scope: Scope::Upstream("u".into()),
            rate: Some(rate(0, 0.0)),
            max_concurrent: 1,
        }];
        scale_upstream(&mut tiny, 0.01);
        assert_eq!(tiny[0].rate, Some(rate(0, 0.0)));
        assert_eq!(tiny[0].max_concurrent, 1);
    }

    fn did_check(did: &str, r: Option<RateLimit>, max: u64) -> Check {
        Check {
            scope: Scope::Did(did.into()),
            rate: r,
            max_concurrent: max,
        }
    }

    #[test]
    fn bucket_burst_then_refill_on_a_virtual_clock() {
        let mut b = TokenBucket::new(rate(3, 2.0), 1_000);
        assert!(b.try_take(1_000));
        assert!(b.try_take(1_000));
        assert!(b.try_take(1_000));
        assert!(!b.try_take(1_000), "burst spent");
        assert_eq!(b.wait_ms(), Some(500));
        assert!(!b.try_take(1_499), "half a token is not a token");
        assert!(b.try_take(1_500), "2/s refills one token in 500 ms");
        assert!(!b.try_take(1_500));
        // a long idle time refills to the capacity, never beyond
        assert!(b.is_full(60_000));
        assert_eq!(b.tokens, 3.0);
        // a clock going back counts as standing still
        assert!(b.try_take(10));
        assert_eq!(b.last_ms, 60_000);
    }

    #[test]
    fn bucket_without_refill_stays_empty() {
        let mut b = TokenBucket::new(rate(2, 0.0), 0);
        assert!(b.try_take(0));
        assert!(b.try_take(5));
        assert!(!b.try_take(u64::MAX));
        assert_eq!(b.wait_ms(), None);
    }

    #[test]
    fn acquire_takes_all_or_nothing() {
        let l = Limits::new(100);
        let checks = [
            did_check("a", Some(rate(5, 0.0)), 0),
            Check {
                scope: Scope::Upstream("u".into()),
                rate: Some(rate(1, 0.0)),
                max_concurrent: 0,
            },
        ];
        drop(l.acquire(&checks, 0).unwrap());
        let err = l.acquire(&checks, 0).unwrap_err();
        assert!(matches!(
            err,
            Exceeded::Rate {
                scope: Scope::Upstream(_),
                retry_after_ms: None
            }
        ));
        // the DID's bucket lost only the one token of the admitted call
        for _ in 0..4 {
            drop(l.acquire(&checks[..1], 0).unwrap());
        }
        assert!(l.acquire(&checks[..1], 0).is_err());
    }

    #[test]
    fn unlimited_rates_keep_no_bucket() {
        let l = Limits::new(1);
        for i in 0..10 {
            drop(
                l.acquire(&[did_check(&i.to_string(), Some(rate(0, 0.0)), 0)], 0)
                    .unwrap(),
            );
        }
        assert_eq!(l.buckets(), 0);
    }

    #[test]
    fn concurrency_slots_come_back_on_drop() {
        let l = Limits::new(10);
        let c = [did_check("a", None, 2)];
        let p1 = l.acquire(&c, 0).unwrap();
        let p2 = l.acquire(&c, 0).unwrap();
        assert_eq!(l.running(&Scope::Did("a".into())), 2);
        assert_eq!(
            l.acquire(&c, 0).unwrap_err(),
            Exceeded::Concurrency {
                scope: Scope::Did("a".into()),
                max: 2
            }
        );
        // other scopes are unaffected
        drop(l.acquire(&[did_check("b", None, 2)], 0).unwrap());
        drop(p1);
        let p3 = l.acquire(&c, 0).unwrap();
        drop((p2, p3));
        assert_eq!(l.running(&Scope::Did("a".into())), 0);
        assert!(l.lock().running.is_empty(), "idle counters are removed");
    }

    #[test]
    fn busy_scope_takes_no_token() {
        let l = Limits::new(10);
        let c = [did_check("a", Some(rate(2, 0.0)), 1)];
        let held = l.acquire(&c, 0).unwrap();
        assert!(matches!(
            l.acquire(&c, 0),
            Err(Exceeded::Concurrency { .. })
        ));
        drop(held);
        // one token left: the refused attempt took none
        drop(l.acquire(&c, 0).unwrap());
        assert!(matches!(l.acquire(&c, 0), Err(Exceeded::Rate { .. })));
    }

    #[test]
    fn memory_is_bounded_and_full_buckets_are_evicted() {
        let l = Limits::new(3);
        let take = |did: &str, now| {
            l.acquire(&[did_check(did, Some(rate(2, 1.0)), 0)], now)
                .map(drop)
        };
        take("a", 0).unwrap();
        take("b", 0).unwrap();
        take("c", 0).unwrap();
        assert_eq!(l.buckets(), 3);
        // full of draining buckets: a new key is refused (fail closed), known keys still work
        assert_eq!(take("d", 500), Err(Exceeded::TableFull));
        take("a", 500).unwrap();
        // one second later b and c are full again (1 token/s); a is not (taken twice)
        take("d", 1_600).unwrap();
        assert_eq!(l.buckets(), 2, "b and c evicted, d added");
        // idle buckets are swept periodically even below the cap
        take("e", 100_000).unwrap();
        assert_eq!(l.buckets(), 1);
    }

    #[test]
    fn stages_select_tokens_and_slots() {
        use crate::config::{RawUpstream, Settings};
        let mut s = Settings::new("127.0.0.1:1".parse().unwrap());
        s.rate_per_did = rate(10, 1.0);
        s.max_concurrent_per_did = 4;
        s.max_concurrent_per_upstream = 0;
        let up = RawUpstream {
            allow_headers: vec![],
            max_concurrent_per_upstream: Some(7),
            rate_per_did: Some(rate(1, 0.0)),
            ..RawUpstream::new("u", "https://api.example.com", "k")
        }
        .validate()
        .unwrap();
        let call = checks(&s, &up, "d", Stage::Call);
        assert_eq!(call.len(), 3);
        assert_eq!(call[1].max_concurrent, 7, "the upstream's own value wins");
        assert_eq!(call[2].scope, Scope::DidOnUpstream("d".into(), "u".into()));
        let grant = checks(&s, &up, "d", Stage::Grant);
        assert!(
            grant
                .iter()
                .all(|c| c.max_concurrent == 0 && c.rate.is_some())
        );
        let exec = checks(&s, &up, "d", Stage::Execute);
        assert!(
            exec.iter()
                .all(|c| c.rate.is_none() && c.max_concurrent > 0)
        );
        assert_eq!(exec.len(), 2);
    }
}

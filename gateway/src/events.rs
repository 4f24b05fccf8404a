//! Live operator events (specs/operation.md, "Events and metrics").
//!
//! The gateway publishes one [`Event`] per access, two-step grant, refusal, failed call,
//! revocation, secret lifecycle command, master-key rotation and policy reload on a bounded
//! [`tokio::sync::broadcast`] channel ([`crate::Gateway::subscribe`]). Publishing never blocks
//! and never fails a call: with no subscriber the event is dropped, and a subscriber that falls
//! behind by more than [`CAPACITY`] events misses the oldest ones (the control socket tells it
//! with a [`EventKind::Lagged`] line). Events are not audit records: the chain is the record;
//! events are for watching.
//!
//! An event never holds a secret value, a secret's display form, policy text or a request body,
//! header or query: only DIDs, ids, names, methods, paths, status codes, refusal codes and the
//! reasons the caller is sent anyway.

use std::fmt::Write as _;

use didgate_protocol::message::RefusalCode;
use serde::{Deserialize, Serialize};

/// Events buffered per subscriber before the oldest are dropped for it.
pub const CAPACITY: usize = 1024;

/// One event: when, and what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Gateway time, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// What happened (serialized flat, tagged by `kind`).
    #[serde(flatten)]
    pub kind: EventKind,
}

/// What happened. JSON: an object tagged by `kind` (the snake_case variant name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum EventKind {
    /// A call was executed: the upstream answered and the `executed` entry is durable.
    Access {
        /// The caller's DID.
        did: String,
        /// Upstream name.
        upstream: String,
        /// HTTP method.
        method: String,
        /// Request path (no query).
        path: String,
        /// The upstream's HTTP status.
        status: u16,
        /// Call ID, 64 hex digits.
        call: String,
        /// The grant consumed, 32 hex digits.
        grant: String,
        /// Response body bytes relayed.
        resp_len: u64,
        /// From the call's stream opening to its `executed` entry, milliseconds.
        latency_ms: u64,
    },
    /// A two-step grant was issued (its `granted` entry is durable).
    Grant {
        /// The grant's subject DID.
        did: String,
        /// Grant id, 32 hex digits.
        grant: String,
        /// Call ID of the request it answers, 64 hex digits.
        call: String,
        /// Upstream name.
        upstream: String,
        /// HTTP method.
        method: String,
        /// Request path.
        path: String,
        /// Expiry, ms since the Unix epoch.
        expires_ms: u64,
    },
    /// A call was refused before any grant was consumed.
    Refusal {
        /// The TLS peer's DID (absent only outside a call).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        did: Option<String>,
        /// Refusal code.
        code: RefusalCode,
        /// The reason sent to the caller.
        reason: String,
        /// Call ID, when the request's signature verified.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        call: Option<String>,
        /// Upstream named by a verified request.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        upstream: Option<String>,
        /// Method of a verified request.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        method: Option<String>,
        /// Path of a verified request.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<String>,
    },
    /// A call whose grant was consumed closed without a receipt (its `failed` entry is written,
    /// or the audit log could not be written: code `audit_unavailable`).
    Failed {
        /// The caller's DID.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        did: Option<String>,
        /// Call ID, 64 hex digits.
        call: String,
        /// Refusal code sent to the caller.
        code: RefusalCode,
        /// Why (as recorded in the entry and sent to the caller).
        cause: String,
        /// From the call's stream opening to its closing, milliseconds.
        latency_ms: u64,
    },
    /// The upstream's response to a call held the call's credential (the response scanner,
    /// specs/operation.md "Secret echoes"): redacted, or the call failed (`action`).
    SecretEcho {
        /// The caller's DID.
        did: String,
        /// Upstream name.
        upstream: String,
        /// Call ID, 64 hex digits.
        call: String,
        /// Occurrences found (headers and body).
        count: u64,
        /// `redacted` or `failed`.
        action: String,
    },
    /// A DID or a grant was revoked (its `revocation` entry is durable).
    Revocation {
        /// The DID revoked.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        did: Option<String>,
        /// The grant revoked, 32 hex digits.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        grant: Option<String>,
        /// The operator's reason.
        reason: String,
    },
    /// A secret lifecycle command through the control socket succeeded.
    Secret {
        /// Secret name.
        name: String,
        /// `added`, `rotated`, `disabled`, `enabled` or `deleted`.
        action: String,
        /// Current version after the command.
        version: u64,
        /// `enabled`, `disabled` or `deleted` after the command.
        status: String,
    },
    /// The master key was rotated through the control socket.
    KmsRotation {
        /// Id of the key replaced, hex.
        old_key_id: String,
        /// Id of the new key, hex.
        new_key_id: String,
        /// Secret records rewrapped.
        secrets: u64,
    },
    /// A new policy set is in force.
    PolicyReload {
        /// Its hash, 64 hex digits.
        policy: String,
    },
    /// Written by the control socket only: this subscriber fell behind and missed events.
    Lagged {
        /// How many.
        missed: u64,
    },
}

impl Event {
    /// An event at `time_ms`.
    pub fn new(time_ms: u64, kind: EventKind) -> Self {
        Self { time_ms, kind }
    }

    /// The `kind` tag (`access`, `grant`, `refusal`, ...).
    pub fn name(&self) -> &'static str {
        match &self.kind {
            EventKind::Access { .. } => "access",
            EventKind::Grant { .. } => "grant",
            EventKind::Refusal { .. } => "refusal",
            EventKind::Failed { .. } => "failed",
            EventKind::Revocation { .. } => "revocation",
            EventKind::SecretEcho { .. } => "secret_echo",
            EventKind::Secret { .. } => "secret",
            EventKind::KmsRotation { .. } => "kms_rotation",
            EventKind::PolicyReload { .. } => "policy_reload",
            EventKind::Lagged { .. } => "lagged",
        }
    }

    /// One JSON object, no newline.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// One human-readable line, no newline: `TIME KIND details`. Text that came from a caller
    /// (paths, reasons) has its control characters escaped, so a line is always one line.
    pub fn human(&self) -> String {
        let mut s = format!("{} {:<13}", fmt_time(self.time_ms), self.name());
        let _ = match &self.kind {
            EventKind::Access {
                did,
                upstream,
                method,
                path,
                status,
                call,
                grant: _,
                resp_len,
                latency_ms,
            } => write!(
                s,
                " {did} {upstream} {method} {} -> {status} ({resp_len} bytes, {latency_ms} ms) call={call}",
                clean(path)
            ),
            EventKind::Grant {
                did,
                grant,
                call: _,
                upstream,
                method,
                path,
                expires_ms,
            } => write!(
                s,
                " {did} {upstream} {method} {} grant={grant} expires={}",
                clean(path),
                fmt_time(*expires_ms)
            ),
            EventKind::Refusal {
                did,
                code,
                reason,
                call,
                upstream,
                method,
                path,
            } => {
                let _ = write!(s, " {code} {}", did.as_deref().unwrap_or("-"));
                if let (Some(u), Some(m), Some(p)) = (upstream, method, path) {
                    let _ = write!(s, " {} {} {}", clean(u), clean(m), clean(p));
                }
                let _ = write!(s, ": {}", clean(reason));
                match call {
                    Some(c) => write!(s, " call={c}"),
                    None => Ok(()),
                }
            }
            EventKind::Failed {
                did,
                call,
                code,
                cause,
                latency_ms,
            } => write!(
                s,
                " {code} {} call={call} ({latency_ms} ms): {}",
                did.as_deref().unwrap_or("-"),
                clean(cause)
            ),
            EventKind::SecretEcho {
                did,
                upstream,
                call,
                count,
                action,
            } => write!(
                s,
                " {did} {} {count} occurrence(s) of the credential in the response, {action} call={call}",
                clean(upstream)
            ),
            EventKind::Revocation { did, grant, reason } => {
                let target = match (did, grant) {
                    (Some(d), _) => format!("did {d}"),
                    (None, Some(g)) => format!("grant {g}"),
                    (None, None) => "-".into(),
                };
                write!(s, " {target}: {}", clean(reason))
            }
            EventKind::Secret {
                name,
                action,
                version,
                status,
            } => write!(s, " {} {action} (version {version}, {status})", clean(name)),
            EventKind::KmsRotation {
                old_key_id,
                new_key_id,
                secrets,
            } => write!(
                s,
                " master key {old_key_id} -> {new_key_id} ({secrets} secrets rewrapped)"
            ),
            EventKind::PolicyReload { policy } => write!(s, " {policy}"),
            EventKind::Lagged { missed } => write!(s, " {missed} events missed"),
        };
        s
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn fmt_time(ms: u64) -> String {
    let secs = didgate_io::fmt_utc(ms);
    match secs.strip_suffix('Z') {
        Some(base) => format!("{base}.{:03}Z", ms % 1000),
        None => secs,
    }
}

/// Escapes control characters (and nothing else) of text a caller chose.
fn clean(s: &str) -> std::borrow::Cow<'_, str> {
    if s.chars().any(char::is_control) {
        s.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect::<String>()
            .into()
    } else {
        s.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_flat_tagged_and_round_trips() {
        let events = [
            Event::new(
                1_700_000_000_123,
                EventKind::Access {
                    did: "did:key:z6Mk".into(),
                    upstream: "payments".into(),
                    method: "GET".into(),
                    path: "/v1/balance".into(),
                    status: 200,
                    call: "ab".repeat(32),
                    grant: "cd".repeat(16),
                    resp_len: 17,
                    latency_ms: 3,
                },
            ),
            Event::new(
                5,
                EventKind::Refusal {
                    did: None,
                    code: RefusalCode::Policy,
                    reason: "no\nnewline".into(),
                    call: None,
                    upstream: None,
                    method: None,
                    path: None,
                },
            ),
            Event::new(6, EventKind::Lagged { missed: 4 }),
        ];
        for e in &events {
            let json = e.to_json();
            let v: serde_json::Value = serde_json::from_str(&json).expect("json");
            assert_eq!(v["kind"], e.name());
            assert_eq!(v["time_ms"], e.time_ms);
            assert_eq!(
                serde_json::from_str::<Event>(&json).expect("parses"),
                *e,
                "{json}"
            );
            assert!(!e.human().contains('\n'), "{}", e.human());
        }
        assert!(
            events[0]
                .human()
                .starts_with("2023-11-14T22:13:20.123Z access")
        );
        assert!(events[1].human().contains("no\\nnewline"));
        let v: serde_json::Value = serde_json::from_str(&events[1].to_json()).expect("json");
        assert!(v.get("did").is_none(), "absent options are left out");
        assert_eq!(v["code"], "policy");
    }
}

//! The catalog (specs/protocol.md, "Catalog"): each upstream's named operations from
//! `gateway.toml`, answered to a caller filtered by the policy in force for its DID.
//!
//! Owns the pure filter ([`allowed_operations`]) and the framing of its answer
//! ([`encode_frames`]); the operations' configuration is [`OperationConfig`] in
//! [`crate::config`], and the stream handler is the gateway's. Policy text is never sent: a
//! caller learns only which of the configured operations it may call.

use didgate_protocol::Version;
use didgate_protocol::catalog::{Catalog, Operation};
use didgate_protocol::frame;
use didgate_protocol::message::Message;

use crate::config::Upstream;
pub use crate::config::{MAX_DESCRIPTION, OperationConfig};
use crate::policy::{PolicySet, RequestContext};

/// The operations `did` may call under `policy` at `now_ms`, in configuration order. Each is
/// decided like a call to its path template as written (each `{param}` a segment of its own),
/// with no body, headers or query: the list is advice, each real call is decided on its own.
pub fn allowed_operations(
    upstreams: &[Upstream],
    policy: &PolicySet,
    did: &str,
    only: Option<&str>,
    now_ms: u64,
) -> Vec<Operation> {
    let ctx = RequestContext {
        time_ms: now_ms,
        body_len: 0,
        headers: Vec::new(),
        query: Vec::new(),
    };
    upstreams
        .iter()
        .filter(|u| only.is_none_or(|o| o == u.name))
        .flat_map(|u| u.operations.iter().map(move |op| (u, op)))
        .filter(|(u, op)| {
            policy
                .decide(did, &u.name, &op.method, &op.path, &ctx)
                .refusal_reason()
                .is_none()
        })
        .map(|(u, op)| Operation {
            upstream: u.name.clone(),
            name: op.name.clone(),
            method: op.method.clone(),
            path: op.path.clone(),
            description: op.description.clone(),
        })
        .collect()
}

/// Splits operations into Catalog frame payloads of at most [`frame::MAX_FRAME`] bytes (one
/// payload, possibly empty, if there are none).
pub fn encode_frames(ops: Vec<Operation>, version: Version) -> Vec<Vec<u8>> {
    let mut payloads = Vec::new();
    let mut part = Catalog {
        v: version.as_u64(),
        operations: Vec::new(),
    };
    for op in ops {
        part.operations.push(op);
        if part.encode().len() > frame::MAX_FRAME && part.operations.len() > 1 {
            let last = part.operations.pop();
            payloads.push(part.encode());
            part.operations = last.into_iter().collect();
        }
    }
    payloads.push(part.encode());
    payloads
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(i: usize) -> Operation {
        Operation {
            upstream: "u".into(),
            name: format!("op{i}"),
            method: "GET".into(),
            path: "/v1/x".into(),
            description: "d".repeat(1000),
        }
    }

    fn config(operations: &str) -> Result<crate::config::Config, String> {
        let text = format!(
            r#"
[gateway]
listen = "127.0.0.1:7443"

[[upstream]]
name = "payments"
base_url = "https://api.example.com"
auth = {{ kind = "bearer" }}
secret = "k"
allowed_hosts = ["api.example.com"]
{operations}
"#
        );
        let cfg: crate::config::Config = toml::from_str(&text).map_err(|e| e.to_string())?;
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }

    #[test]
    fn operations_parse_and_bad_ones_are_refused_at_load() {
        let cfg = config(
            r#"
[[upstream.operation]]
name = "get_charge"
method = "GET"
path = "/v1/charges/{id}"
description = "One charge"
"#,
        )
        .expect("valid");
        assert_eq!(cfg.upstreams[0].operations[0].path, "/v1/charges/{id}");
        let op = |name: &str, method: &str, path: &str| {
            format!(
                "[[upstream.operation]]\nname = {name:?}\nmethod = {method:?}\npath = {path:?}\n"
            )
        };
        for (bad, why) in [
            (op("a.b", "GET", "/x"), "name"),
            (op("a", "get", "/x"), "upper case"),
            (op("a", "GET", "/x/{id"), "whole segment"),
            (op("a", "GET", "x"), "start with /"),
            (op("a", "GET", "/x") + &op("a", "POST", "/y"), "twice"),
            (op("a", "GET", "/x") + "unknown = 1\n", "unknown"),
        ] {
            let err = config(&bad).expect_err(&bad);
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn frames_stay_under_the_limit_and_keep_every_operation() {
        let ops: Vec<Operation> = (0..200).map(op).collect();
        let frames = encode_frames(ops.clone(), Version::CURRENT);
        assert!(frames.len() > 1);
        let mut back = Vec::new();
        for f in &frames {
            assert!(f.len() <= frame::MAX_FRAME);
            back.extend(Catalog::decode(f).expect("decode").operations);
        }
        assert_eq!(back, ops);
        assert_eq!(encode_frames(Vec::new(), Version::CURRENT).len(), 1);
    }
}

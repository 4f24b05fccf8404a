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
pub use didgate_protocol::catalog::BodyMode;

/// The operations `did` may call under `policy` at `now_ms`, in configuration order. Each is
/// decided like a call to its path template as written (each `{param}` a segment of its own),
/// with no body, headers or query: the list is advice, each real call is decided on its own.
pub fn allowed_operations<'u>(
    upstreams: impl IntoIterator<Item = &'u Upstream>,
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
        .into_iter()
        .filter(|u| only.is_none_or(|o| o == u.name()))
        .flat_map(|u| u.operations().iter().map(move |op| (u, op)))
        .filter(|(u, op)| {
            policy
                .decide(did, u.name(), &op.method, &op.path, &ctx)
                .refusal_reason()
                .is_none()
        })
        .map(|(u, op)| Operation {
            upstream: u.name().to_string(),
            name: op.name.clone(),
            method: op.method.clone(),
            path: op.path.clone(),
            description: op.description.clone(),
            title: op.title.clone(),
            destructive: op.destructive,
            body: op.body,
            body_schema: op.body_schema.clone(),
        })
        .collect()
}

/// Splits operations into Catalog frame payloads of at most [`frame::MAX_FRAME`] bytes (one
/// payload, possibly empty, if there are none). A version 1 Catalog carries only the fields of
/// version 1 (its table is frozen): the version 2 ones (`title`, `destructive`, `body`,
/// `body_schema`) are left out.
pub fn encode_frames(ops: Vec<Operation>, version: Version) -> Vec<Vec<u8>> {
    let mut payloads = Vec::new();
    let mut part = Catalog {
        v: version.as_u64(),
        operations: Vec::new(),
    };
    for op in ops {
        let op = if version == Version::V1 {
            op.without_v2_fields()
        } else {
            op
        };
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
            ..Operation::default()
        }
    }

    fn config(operations: &str) -> Result<crate::config::RawConfig, String> {
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
        let cfg: crate::config::RawConfig = toml::from_str(&text).map_err(|e| e.to_string())?;
        cfg.clone().validate().map_err(|e| e.to_string())?;
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
            (op("a", "GET", "/x") + "title = \"\"\n", "title"),
            (op("a", "GET", "/x") + "title = \"a\\nb\"\n", "title"),
            (op("a", "POST", "/x") + "body = \"sometimes\"\n", "body"),
            (
                op("a", "POST", "/x") + "destructive = \"yes\"\n",
                "destructive",
            ),
            (
                op("a", "POST", "/x") + "body_schema = \"[1]\"\n",
                "body_schema",
            ),
            (
                op("a", "POST", "/x") + "body_schema = \"{\"\n",
                "body_schema",
            ),
            (op("a", "POST", "/x") + "body_schema = 3\n", "body_schema"),
            (
                op("a", "GET", "/x") + "body_schema = { type = \"object\" }\n",
                "has no body",
            ),
            (
                op("a", "POST", "/x") + "body = \"none\"\nbody_schema = { type = \"object\" }\n",
                "body = \"none\"",
            ),
        ] {
            let err = config(&bad).expect_err(&bad);
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn hints_and_body_schemas_parse_from_tables_and_json_text() {
        let cfg = config(
            r#"
[[upstream.operation]]
name = "create_charge"
method = "POST"
path = "/v1/charges"
title = "Create a charge"
destructive = false
body_schema = { type = "object", required = ["amount"], properties = { amount = { type = "integer", minimum = 1 } } }

[[upstream.operation]]
name = "refund_charge"
method = "DELETE"
path = "/v1/charges/{id}"
destructive = true
body = "optional"
body_schema = '{"type": "object", "properties": {"reason": {"enum": ["duplicate", null]}}}'

[[upstream.operation]]
name = "capture"
method = "POST"
path = "/v1/charges/{id}/capture"
body = "none"
"#,
        )
        .expect("valid");
        let ops = &cfg.upstreams[0].operations;
        assert_eq!(ops[0].title.as_deref(), Some("Create a charge"));
        assert_eq!(ops[0].destructive, Some(false));
        assert_eq!(ops[0].body, None);
        let schema: serde_json::Value =
            serde_json::from_str(ops[0].body_schema.as_deref().expect("schema")).expect("json");
        assert_eq!(schema["properties"]["amount"]["minimum"], 1);
        assert_eq!(schema["required"], serde_json::json!(["amount"]));
        assert_eq!(ops[1].body, Some(BodyMode::Optional));
        assert_eq!(ops[1].destructive, Some(true));
        assert!(
            ops[1]
                .body_schema
                .as_deref()
                .is_some_and(|s| s.contains("null"))
        );
        assert_eq!(ops[2].body, Some(BodyMode::None));
        // what the gateway writes back (a schema with a JSON null has no TOML table form) reads
        // back the same
        let text = toml::to_string(&cfg).expect("toml");
        let again: crate::config::RawConfig = toml::from_str(&text).expect("parse");
        assert_eq!(again.upstreams[0].operations, *ops);

        // version 2 catalogs carry the hints, version 1 catalogs only the fields of version 1
        let listed: Vec<Operation> = ops
            .iter()
            .map(|o| Operation {
                upstream: "payments".into(),
                name: o.name.clone(),
                method: o.method.clone(),
                path: o.path.clone(),
                description: o.description.clone(),
                title: o.title.clone(),
                destructive: o.destructive,
                body: o.body,
                body_schema: o.body_schema.clone(),
            })
            .collect();
        let v2 = Catalog::decode(&encode_frames(listed.clone(), Version::V2)[0]).expect("v2");
        assert_eq!(v2.operations, listed);
        let v1 = Catalog::decode(&encode_frames(listed.clone(), Version::V1)[0]).expect("v1");
        assert_eq!(
            v1.operations,
            listed
                .into_iter()
                .map(Operation::without_v2_fields)
                .collect::<Vec<_>>()
        );
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

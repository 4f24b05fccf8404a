//! The catalog (specs/protocol.md, "Catalog"): each upstream's named operations from
//! `gateway.toml`, answered to a caller filtered by the policy in force for its DID.
//!
//! Owns the configuration of operations ([`OperationConfig`], validated by [`validate`]), the
//! pure filter ([`allowed_operations`]) and the stream handler ([`answer`]). Policy text is never
//! sent: a caller learns only which of the configured operations it may call.

use bytes::BytesMut;
use didgate_protocol::Caller;
use didgate_protocol::Version;
use didgate_protocol::catalog::{self, Catalog, CatalogRequest, Operation};
use didgate_protocol::frame::{self, FrameType};
use didgate_protocol::message::{Message, RefusalCode};
use serde::{Deserialize, Serialize};

use crate::config::Upstream;
use crate::gateway::Gateway;
use crate::policy::{PolicySet, RequestContext};

/// One named operation of an upstream (`[[upstream.operation]]` in `gateway.toml`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperationConfig {
    /// Name, unique within the upstream: 1 to 48 of `a-z A-Z 0-9 _ -`.
    pub name: String,
    /// HTTP method, upper case.
    pub method: String,
    /// Path template: a canonical path whose whole segments may be `{param}`.
    pub path: String,
    /// What it does (shown to callers and, through `didgate mcp`, to agents).
    #[serde(default)]
    pub description: String,
}

/// Largest description accepted, bytes (keeps one operation well inside a frame).
pub const MAX_DESCRIPTION: usize = 2048;

/// Checks an upstream's operations: names valid and unique, methods upper-case ASCII letters,
/// path templates well formed, descriptions at most [`MAX_DESCRIPTION`] bytes.
pub fn validate(up: &Upstream) -> Result<(), String> {
    let mut seen = std::collections::BTreeSet::new();
    for op in &up.operations {
        let at = format!("upstream {} operation {:?}", up.name, op.name);
        catalog::check_operation_name(&op.name).map_err(|e| format!("{at}: {e}"))?;
        if !seen.insert(op.name.as_str()) {
            return Err(format!("{at}: the name is used twice"));
        }
        if op.method.is_empty() || !op.method.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(format!("{at}: method must be upper case, e.g. GET"));
        }
        catalog::check_path_template(&op.path).map_err(|e| format!("{at}: {e}"))?;
        if op.description.len() > MAX_DESCRIPTION {
            return Err(format!(
                "{at}: description longer than {MAX_DESCRIPTION} bytes"
            ));
        }
    }
    Ok(())
}

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

/// Answers a CatalogRequest frame on one stream: Catalog frames, then FIN; a refusal (signed,
/// audited like any refusal before a call) for a malformed request or a revoked DID.
pub(crate) async fn answer(
    gw: &Gateway,
    peer: &Caller,
    mut send: quinn::SendStream,
    payload: &[u8],
) {
    let version = crate::gateway::call_version();
    let request = match CatalogRequest::decode_v(payload, version) {
        Ok(r) => r,
        Err(_) => {
            return gw
                .refuse_unverified(
                    &mut send,
                    RefusalCode::Malformed,
                    "the catalog request does not decode (as a message of the connection's version)",
                )
                .await;
        }
    };
    if gw.did_revoked(peer) {
        return gw
            .refuse_unverified(&mut send, RefusalCode::Revoked, "this DID is revoked")
            .await;
    }
    // a did:web caller's claim is checked against its document first, as for a call
    if let Err(r) = gw.web_document(peer).await {
        return gw.refuse_unverified(&mut send, r.code, &r.reason).await;
    }
    let ops = allowed_operations(
        &gw.config().upstreams,
        &gw.policy(),
        peer.as_str(),
        request.upstream.as_deref(),
        crate::now_ms(),
    );
    let mut out = BytesMut::new();
    for payload in encode_frames(ops, version) {
        // a single operation is bounded by validate(), so each payload fits a frame
        if frame::encode(FrameType::Catalog, &payload, &mut out).is_err() {
            tracing::warn!("catalog: an operation does not fit a frame");
        }
    }
    let _ = send.write_all(&out).await;
    let _ = send.finish();
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

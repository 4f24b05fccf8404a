//! `didgate mcp`: a Model Context Protocol server over stdio (the official Rust SDK, `rmcp`)
//! whose tools are the gateway's catalog for this DID, each tool call a signed call through the
//! gateway (specs/client-tools.md, "MCP server").
//!
//! Owns the mapping from catalog operations to MCP tools (name `UPSTREAM__NAME`, a title,
//! read-only and destructive hints, an input schema with one string per `{param}` of the path
//! template, plus `query` and, unless the operation has no body, a typed `body`, required when
//! the operation needs one) and from tool results back to MCP content: a refusal or a failed
//! call (an unreachable gateway included) is a tool result with `isError` true that the model
//! reads; only an unknown tool or bad arguments are JSON-RPC errors. The agent's process never
//! holds a key; the client chain records every call.

use std::sync::Arc;

use didgate_client::local::Caller;
use didgate_client::{CallError, CallSpec, Operation};
use didgate_protocol::catalog::{BodyMode, check_path_template, fill_path_template};
use didgate_protocol::message::RefusalCode;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
    ToolAnnotations,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler, ServiceExt};
use serde_json::{Map, Value, json};

/// Separates the upstream and the operation name in a tool name.
const SEPARATOR: &str = "__";

/// The JSON types a body may have when the operator declared no schema: an object or an array
/// is sent as JSON, a string as is.
const DEFAULT_BODY_TYPES: [&str; 3] = ["object", "array", "string"];

/// The `body` property's description when the operator's schema has none.
const BODY_DESCRIPTION: &str =
    "request body: a JSON object or array is sent as application/json, a string as is";

/// The MCP server state: the client that signs and records every call, and the catalog as
/// the last `tools/list` read it.
pub(crate) struct DidgateMcp {
    client: Arc<Caller>,
    /// The operations of the last catalog read: a tool call uses them, and reads the catalog
    /// again only for a tool it does not find (the gateway rate-limits catalog requests like
    /// calls, so a session does not spend a token per tool call on it).
    known: tokio::sync::Mutex<Option<Vec<Operation>>>,
}

impl DidgateMcp {
    pub(crate) fn new(client: Arc<Caller>) -> Self {
        Self {
            client,
            known: tokio::sync::Mutex::new(None),
        }
    }

    /// Serves MCP on stdin/stdout until the client closes stdin.
    pub(crate) async fn run(self) -> anyhow::Result<()> {
        let running = self
            .serve(rmcp::transport::stdio())
            .await
            .map_err(|e| anyhow::anyhow!("MCP initialization failed: {e}"))?;
        running.waiting().await?;
        Ok(())
    }

    /// Reads the catalog from the gateway and remembers it.
    async fn operations(&self) -> Result<Vec<Operation>, CallError> {
        let ops = self.client.catalog(None).await?;
        *self.known.lock().await = Some(ops.clone());
        Ok(ops)
    }

    /// The operation of tool `name`: from the last catalog read, else from a fresh one.
    async fn operation(&self, name: &str) -> Lookup {
        let find = |ops: &[Operation]| ops.iter().find(|op| tool_name(op) == name).cloned();
        let listed = {
            let known = self.known.lock().await;
            if let Some(op) = known.as_deref().and_then(find) {
                return Lookup::Found(op);
            }
            known.is_some()
        };
        match self.operations().await {
            Ok(ops) => find(&ops).map_or(Lookup::Unknown(None), Lookup::Found),
            Err(e) if listed => Lookup::Unknown(Some(e)),
            Err(e) => Lookup::Unreadable(e),
        }
    }
}

/// What a tool name stands for.
enum Lookup {
    /// An operation of the catalog.
    Found(Operation),
    /// Not in the catalog, or (the error) not in the last one read, the gateway's being
    /// unreadable now.
    Unknown(Option<CallError>),
    /// No catalog was ever read in this session, and the gateway's cannot be read now.
    Unreadable(CallError),
}

/// The MCP tool name of an operation.
pub(crate) fn tool_name(op: &Operation) -> String {
    format!("{}{SEPARATOR}{}", op.upstream, op.name)
}

/// The tool's title: the operator's, else the name in words and the upstream ("Get charge
/// (payments)").
fn title(op: &Operation) -> String {
    if let Some(t) = &op.title {
        return t.clone();
    }
    let words = op.name.replace(['_', '-'], " ");
    let mut chars = words.trim().chars();
    let words = match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    };
    format!("{words} ({})", op.upstream)
}

/// Whether the tool only reads: GET and HEAD, unless the operator marked it destructive.
fn read_only(op: &Operation) -> bool {
    matches!(op.method.as_str(), "GET" | "HEAD") && op.destructive != Some(true)
}

/// The tool's annotations (hints): its title; `readOnlyHint` true for GET and HEAD, with
/// `destructiveHint` false; for other methods `readOnlyHint` false and `destructiveHint` as
/// the operator said (absent when it did not: MCP clients then assume it may be destructive).
fn annotations(op: &Operation) -> ToolAnnotations {
    let hints = ToolAnnotations::with_title(title(op));
    if read_only(op) {
        hints.read_only(true).destructive(false)
    } else {
        let hints = hints.read_only(false);
        match op.destructive {
            Some(d) => hints.destructive(d),
            None => hints,
        }
    }
}

/// The schema of the `body` argument: the operator's (`body_schema`), else one of
/// [`DEFAULT_BODY_TYPES`]; a description is added when it has none.
fn body_schema(op: &Operation) -> Map<String, Value> {
    let declared = op
        .body_schema
        .as_deref()
        .and_then(|text| serde_json::from_str::<Map<String, Value>>(text).ok());
    let mut schema = declared.unwrap_or_else(|| {
        let mut m = Map::new();
        m.insert("type".into(), json!(DEFAULT_BODY_TYPES));
        m
    });
    schema
        .entry("description")
        .or_insert_with(|| json!(BODY_DESCRIPTION));
    schema
}

/// The MCP tool for one operation.
pub(crate) fn tool(op: &Operation) -> Tool {
    let params = check_path_template(&op.path).unwrap_or_default();
    let mut properties = Map::new();
    for p in &params {
        properties.insert(
            p.clone(),
            json!({"type": "string", "description": format!("path segment {{{p}}} of {}", op.path)}),
        );
    }
    properties.insert(
        "query".into(),
        json!({
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "query parameters (each name once)"
        }),
    );
    let mut required = params.clone();
    match op.body_mode() {
        BodyMode::None => {}
        mode => {
            properties.insert("body".into(), Value::Object(body_schema(op)));
            if mode == BodyMode::Required {
                required.push("body".into());
            }
        }
    }
    let mut schema = Map::new();
    schema.insert("type".into(), json!("object"));
    schema.insert("properties".into(), Value::Object(properties));
    schema.insert("required".into(), json!(required));
    schema.insert("additionalProperties".into(), json!(false));
    let description = format!(
        "{} ({} {} on {}, signed and audited by didgate)",
        op.description, op.method, op.path, op.upstream
    );
    Tool::new(tool_name(op), description, Arc::new(schema))
        .with_title(title(op))
        .with_annotations(annotations(op))
}

/// The JSON type of a value, as JSON Schema names it (`integer` for whole numbers).
fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Checks the body against its schema's top-level `type` (the rest of the schema is the
/// upstream's to enforce).
fn check_body_type(schema: &Map<String, Value>, body: &Value) -> Result<(), String> {
    let types: Vec<&str> = match schema.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => return Ok(()),
    };
    let actual = json_type(body);
    if types
        .iter()
        .any(|t| *t == actual || (*t == "number" && actual == "integer"))
    {
        Ok(())
    } else {
        Err(format!(
            "body must be {} (its schema's type), not {actual}",
            types.join(" or ")
        ))
    }
}

/// Builds the call for a tool invocation, or says which argument is wrong.
pub(crate) fn call_spec(op: &Operation, args: &Map<String, Value>) -> Result<CallSpec, String> {
    let params = check_path_template(&op.path).map_err(|e| e.to_string())?;
    let mode = op.body_mode();
    for key in args.keys() {
        let known = params.iter().any(|p| p == key)
            || key == "query"
            || (key == "body" && mode != BodyMode::None);
        if !known {
            return Err(format!("unknown argument {key:?}"));
        }
    }
    let path = fill_path_template(&op.path, |name| args.get(name).and_then(Value::as_str))
        .map_err(|e| e.to_string())?;
    let mut spec = CallSpec::new(&op.upstream, &op.method, &path);
    if let Some(q) = args.get("query") {
        let q = q.as_object().ok_or("query must be an object")?;
        for (k, v) in q {
            let v = v
                .as_str()
                .ok_or_else(|| format!("query parameter {k:?} must be a string"))?;
            spec.query.push((k.clone(), v.to_string()));
        }
    }
    match args.get("body") {
        None | Some(Value::Null) if mode == BodyMode::Required => {
            return Err("missing argument \"body\" (this operation needs a request body)".into());
        }
        None | Some(Value::Null) => {}
        Some(v) => {
            check_body_type(&body_schema(op), v)?;
            spec = match v {
                Value::String(s) => spec.body(s.as_bytes().to_vec()),
                v => spec
                    .body(serde_json::to_vec(v).map_err(|e| e.to_string())?)
                    .header("content-type", "application/json"),
            };
        }
    }
    Ok(spec)
}

/// A short code for a failure, as the local proxy names it (`refused` codes are the gateway's).
fn failure_code(e: &CallError) -> &str {
    match e {
        CallError::Refused { code, .. } => code.as_str(),
        CallError::Unreachable(_) => "gateway_unreachable",
        CallError::ConnectionLost(_) | CallError::OwnerLost { .. } => "outcome_unknown",
        CallError::InvalidAnswer(_) => "invalid_answer",
        CallError::Audit(_) => "local_audit_unavailable",
        CallError::VersionUnsupported { .. } => "version_unsupported",
        CallError::WrongGateway { .. } => "wrong_gateway",
        _ => "call_failed",
    }
}

/// A refusal or failure as a tool error the model reads: what happened and what to do as
/// text, and `{"refused": CODE, ...}` (the gateway refused) or `{"failed": CODE, ...}` (no
/// verified answer) as structured content.
fn failure_result(context: &str, e: &CallError) -> CallToolResult {
    let text = format!("{context}{e} ({})", advice(e));
    let kind = if matches!(e, CallError::Refused { .. }) {
        "refused"
    } else {
        "failed"
    };
    let reason = match e {
        CallError::Refused { reason, .. } => reason.clone(),
        other => other.to_string(),
    };
    let mut structured = json!({
        kind: failure_code(e),
        "reason": reason,
        "retryable": e.is_retryable(),
    });
    if let CallError::Refused {
        call: Some(call), ..
    } = e
    {
        structured["call"] = json!(hex::encode(call));
    }
    let mut r = CallToolResult::error(vec![ContentBlock::text(text)]);
    r.structured_content = Some(structured);
    r
}

/// What to do about a failure, in the agent's terms (tools rather than the library's calls).
fn advice(e: &CallError) -> &'static str {
    match e.refusal_code() {
        Some(RefusalCode::Policy) => {
            "policy does not allow this DID this call: use the tools tools/list shows, or ask the operator to allow it"
        }
        Some(RefusalCode::UnknownUpstream) => {
            "the gateway has no such upstream any more: list the tools again"
        }
        _ => e.advice(),
    }
}

impl ServerHandler for DidgateMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("didgate", env!("CARGO_PKG_VERSION")))
            .with_instructions(format!(
                "Each tool is an API operation this DID ({}) may call through the didgate \
                 gateway; every call is signed, checked by policy and audited. The result holds \
                 the HTTP status and the response body.",
                self.client.did()
            ))
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let ops = self.operations().await.map_err(|e| {
            ErrorData::internal_error(
                format!("cannot read the gateway's catalog: {e} ({})", advice(&e)),
                None,
            )
        })?;
        Ok(ListToolsResult::with_all_items(
            ops.iter().map(tool).collect(),
        ))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let op = match self.operation(&request.name).await {
            Lookup::Found(op) => op,
            Lookup::Unknown(why) => {
                let why = why
                    .map(|e| format!("; the catalog could not be read again: {e}"))
                    .unwrap_or_default();
                return Err(ErrorData::invalid_params(
                    format!(
                        "no tool {:?} (this DID may call only the tools tools/list shows){why}",
                        request.name
                    ),
                    None,
                ));
            }
            // no listing to go by, and the gateway is unreachable or refused the catalog
            // request: a tool error, so the model reads why
            Lookup::Unreadable(e) => {
                let context = format!(
                    "no call was made: reading the gateway's catalog to find {} failed: ",
                    request.name
                );
                return Ok(failure_result(&context, &e).into());
            }
        };
        let args = request.arguments.unwrap_or_default();
        let spec = call_spec(&op, &args)
            .map_err(|why| ErrorData::invalid_params(format!("{}: {why}", request.name), None))?;
        let result = match self.client.call(spec).await {
            Ok(answer) => {
                let text = String::from_utf8_lossy(&answer.body).into_owned();
                let body = serde_json::from_slice::<Value>(&answer.body)
                    .unwrap_or_else(|_| Value::String(text.clone()));
                let mut r = CallToolResult::success(vec![ContentBlock::text(text)]);
                r.structured_content = Some(json!({
                    "status": answer.status,
                    "call": hex::encode(answer.call),
                    "body": body,
                }));
                r.is_error = Some(answer.status >= 400);
                r
            }
            Err(e) => failure_result("", &e),
        };
        Ok(result.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(method: &str, path: &str) -> Operation {
        Operation {
            upstream: "payments".into(),
            name: "x".into(),
            method: method.into(),
            path: path.into(),
            description: "d".into(),
            ..Operation::default()
        }
    }

    #[test]
    fn arguments_become_calls() {
        let o = op("POST", "/v1/charges/{id}/refunds");
        let args = json!({"id": "ch_1", "query": {"a": "1"}, "body": {"amount": 5}});
        let spec = call_spec(&o, args.as_object().expect("object")).expect("spec");
        assert_eq!(spec.path, "/v1/charges/ch_1/refunds");
        assert_eq!(spec.query, [("a".to_string(), "1".to_string())]);
        assert_eq!(spec.body, br#"{"amount":5}"#);
        assert!(spec.headers.iter().any(|(k, _)| k == "content-type"));
        let bad = |v: Value| call_spec(&o, v.as_object().expect("object")).expect_err("bad");
        assert!(bad(json!({})).contains("missing"));
        assert!(bad(json!({"id": "a/b"})).contains("segment"));
        assert!(bad(json!({"id": "a", "extra": 1})).contains("unknown"));
        assert!(bad(json!({"id": "a", "query": {"q": 1}})).contains("string"));
        let get = op("GET", "/v1/balance");
        assert!(call_spec(&get, json!({"body": "x"}).as_object().expect("o")).is_err());
        let t = tool(&o);
        assert_eq!(t.name, "payments__x");
        assert_eq!(t.input_schema["required"], json!(["id", "body"]));
    }

    #[test]
    fn titles_and_hints_follow_the_method_and_the_operator() {
        let get = tool(&Operation {
            name: "get_charge".into(),
            ..op("GET", "/v1/charges/{id}")
        });
        assert_eq!(get.title.as_deref(), Some("Get charge (payments)"));
        let hints = get.annotations.expect("annotations");
        assert_eq!(hints.title.as_deref(), Some("Get charge (payments)"));
        assert_eq!(hints.read_only_hint, Some(true));
        assert_eq!(hints.destructive_hint, Some(false));

        let post = tool(&Operation {
            title: Some("Create a charge".into()),
            ..op("POST", "/v1/charges")
        });
        assert_eq!(post.title.as_deref(), Some("Create a charge"));
        let hints = post.annotations.expect("annotations");
        assert_eq!(hints.read_only_hint, Some(false));
        assert_eq!(
            hints.destructive_hint, None,
            "not said: the MCP default (true) applies"
        );

        for (method, destructive) in [("DELETE", true), ("POST", false), ("GET", true)] {
            let t = tool(&Operation {
                destructive: Some(destructive),
                ..op(method, "/v1/x")
            });
            let hints = t.annotations.expect("annotations");
            assert_eq!(hints.read_only_hint, Some(false), "{method}");
            assert_eq!(hints.destructive_hint, Some(destructive), "{method}");
        }
    }

    #[test]
    fn body_is_typed_required_and_follows_the_declared_schema() {
        // POST: required, one of the default types
        let post = op("POST", "/v1/charges");
        let t = tool(&post);
        assert_eq!(t.input_schema["required"], json!(["body"]));
        assert_eq!(
            t.input_schema["properties"]["body"]["type"],
            json!(["object", "array", "string"])
        );
        let spec = |o: &Operation, v: Value| call_spec(o, v.as_object().expect("object"));
        assert!(
            spec(&post, json!({}))
                .expect_err("no body")
                .contains("body")
        );
        assert!(spec(&post, json!({"body": null})).is_err());
        assert!(
            spec(&post, json!({"body": 5}))
                .expect_err("number")
                .contains("integer")
        );
        assert_eq!(
            spec(&post, json!({"body": "a=1"})).expect("string").body,
            b"a=1"
        );
        assert_eq!(
            spec(&post, json!({"body": [1]})).expect("array").body,
            b"[1]"
        );

        // a declared schema is the body's schema (a description added), its type checked
        let declared = Operation {
            body_schema: Some(
                r#"{"type": "object", "required": ["amount"], "properties": {"amount": {"type": "integer"}}}"#
                    .into(),
            ),
            ..post.clone()
        };
        let t = tool(&declared);
        let body = &t.input_schema["properties"]["body"];
        assert_eq!(body["type"], "object");
        assert_eq!(body["required"], json!(["amount"]));
        assert_eq!(body["properties"]["amount"]["type"], "integer");
        assert_eq!(body["description"], BODY_DESCRIPTION);
        assert!(
            spec(&declared, json!({"body": "{}"}))
                .expect_err("string")
                .contains("object")
        );
        assert!(spec(&declared, json!({"body": {"amount": 5}})).is_ok());
        let number = Operation {
            body_schema: Some(r#"{"type": "number", "description": "cents"}"#.into()),
            ..post.clone()
        };
        assert_eq!(
            tool(&number).input_schema["properties"]["body"]["description"],
            "cents"
        );
        assert!(
            spec(&number, json!({"body": 5})).is_ok(),
            "an integer is a number"
        );

        // the operator's body mode
        let optional = Operation {
            body: Some(BodyMode::Optional),
            ..post.clone()
        };
        assert_eq!(tool(&optional).input_schema["required"], json!([]));
        assert!(spec(&optional, json!({})).is_ok());
        let none = Operation {
            body: Some(BodyMode::None),
            ..post.clone()
        };
        assert!(tool(&none).input_schema["properties"].get("body").is_none());
        assert!(
            spec(&none, json!({"body": {}}))
                .expect_err("no body")
                .contains("unknown")
        );
        let delete = Operation {
            body: Some(BodyMode::Optional),
            ..op("DELETE", "/v1/x")
        };
        assert!(
            tool(&delete).input_schema["properties"]
                .get("body")
                .is_some()
        );
    }

    #[test]
    fn failures_are_tool_errors_with_a_code_and_advice() {
        let r = failure_result(
            "",
            &CallError::Refused {
                code: RefusalCode::Policy,
                reason: "no permit matched (default deny)".into(),
                gateway_time_ms: 0,
                call: Some([7; 32]),
            },
        );
        assert_eq!(r.is_error, Some(true));
        assert_eq!(
            r.structured_content,
            Some(json!({
                "refused": "policy",
                "reason": "no permit matched (default deny)",
                "retryable": false,
                "call": "07".repeat(32),
            }))
        );
        let text = serde_json::to_value(&r.content).expect("json").to_string();
        assert!(text.contains("use the tools tools/list shows"), "{text}");
        let r = failure_result(
            "no call was made: ",
            &CallError::Unreachable(didgate_client::Unreachable::Relayed("timed out".into())),
        );
        assert_eq!(r.is_error, Some(true));
        let sc = r.structured_content.expect("structured");
        assert_eq!(sc["failed"], "gateway_unreachable");
        assert_eq!(sc["retryable"], true);
        let text = serde_json::to_value(&r.content).expect("json").to_string();
        assert!(
            text.contains("no call was made: gateway unreachable: timed out"),
            "{text}"
        );
        assert!(text.contains("check the gateway address"), "{text}");
    }
}

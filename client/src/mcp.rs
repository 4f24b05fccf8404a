//! `didgate mcp`: a Model Context Protocol server over stdio (the official Rust SDK, `rmcp`)
//! whose tools are the gateway's catalog for this DID, each tool call a signed call through the
//! gateway (specs/protocol.md, "MCP server").
//!
//! Owns the mapping from catalog operations to MCP tools (name `UPSTREAM__NAME`, an input
//! schema with one string per `{param}` of the path template, plus `query` and, for methods
//! that carry one, `body`) and from tool results back to MCP content. The agent's process never
//! holds a key; the client chain records every call.

use std::sync::Arc;

use didgate_client::{CallError, CallSpec, Client, Operation};
use didgate_protocol::catalog::{check_path_template, fill_path_template};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler, ServiceExt};
use serde_json::{Map, Value, json};

/// Separates the upstream and the operation name in a tool name.
const SEPARATOR: &str = "__";

/// The MCP server state: the client that signs and records every call, and the catalog as
/// the last `tools/list` read it.
pub(crate) struct DidgateMcp {
    client: Arc<Client>,
    /// The operations of the last catalog read: a tool call uses them, and reads the catalog
    /// again only for a tool it does not find (the gateway rate-limits catalog requests like
    /// calls, so a session does not spend a token per tool call on it).
    known: tokio::sync::Mutex<Option<Vec<Operation>>>,
}

impl DidgateMcp {
    pub(crate) fn new(client: Arc<Client>) -> Self {
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
    async fn operations(&self) -> Result<Vec<Operation>, ErrorData> {
        let ops = self.client.catalog().await.map_err(|e| {
            ErrorData::internal_error(format!("cannot read the gateway's catalog: {e}"), None)
        })?;
        *self.known.lock().await = Some(ops.clone());
        Ok(ops)
    }

    /// The operation of tool `name`: from the last catalog read, else from a fresh one.
    async fn operation(&self, name: &str) -> Result<Option<Operation>, ErrorData> {
        let find = |ops: &[Operation]| ops.iter().find(|op| tool_name(op) == name).cloned();
        if let Some(op) = self.known.lock().await.as_deref().and_then(find) {
            return Ok(Some(op));
        }
        Ok(find(&self.operations().await?))
    }
}

/// The MCP tool name of an operation.
pub(crate) fn tool_name(op: &Operation) -> String {
    format!("{}{SEPARATOR}{}", op.upstream, op.name)
}

fn carries_body(method: &str) -> bool {
    !matches!(method, "GET" | "HEAD" | "DELETE" | "OPTIONS")
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
    if carries_body(&op.method) {
        properties.insert(
            "body".into(),
            json!({
                "description": "request body: a JSON value is sent as application/json, a string as is"
            }),
        );
    }
    let mut schema = Map::new();
    schema.insert("type".into(), json!("object"));
    schema.insert("properties".into(), Value::Object(properties));
    schema.insert("required".into(), json!(params));
    schema.insert("additionalProperties".into(), json!(false));
    let description = format!(
        "{} ({} {} on {}, signed and audited by didgate)",
        op.description, op.method, op.path, op.upstream
    );
    Tool::new(tool_name(op), description, Arc::new(schema))
}

/// Builds the call for a tool invocation, or says which argument is wrong.
pub(crate) fn call_spec(op: &Operation, args: &Map<String, Value>) -> Result<CallSpec, String> {
    let params = check_path_template(&op.path).map_err(|e| e.to_string())?;
    for key in args.keys() {
        let known = params.iter().any(|p| p == key)
            || key == "query"
            || (key == "body" && carries_body(&op.method));
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
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => spec = spec.body(s.as_bytes().to_vec()),
        Some(v) => {
            spec = spec
                .body(serde_json::to_vec(v).map_err(|e| e.to_string())?)
                .header("content-type", "application/json");
        }
    }
    Ok(spec)
}

/// What a refusal or failure means for the agent, as a tool error.
fn call_error_text(e: &CallError) -> String {
    match e {
        CallError::Refused { code, reason, .. } => {
            format!("refused by the gateway ({}): {reason}", code.as_str())
        }
        other => other.to_string(),
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
        let ops = self.operations().await?;
        Ok(ListToolsResult::with_all_items(
            ops.iter().map(tool).collect(),
        ))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let Some(op) = self.operation(&request.name).await? else {
            return Err(ErrorData::invalid_params(
                format!(
                    "no tool {:?} (this DID may call only the tools tools/list shows)",
                    request.name
                ),
                None,
            ));
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
            Err(e) => {
                let mut r = CallToolResult::success(vec![ContentBlock::text(call_error_text(&e))]);
                r.is_error = Some(true);
                if let CallError::Refused { code, reason, .. } = &e {
                    r.structured_content = Some(json!({
                        "refused": code.as_str(),
                        "reason": reason,
                    }));
                }
                r
            }
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
        assert_eq!(t.input_schema["required"], json!(["id"]));
    }
}

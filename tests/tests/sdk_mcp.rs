//! The official MCP Python SDK (mcp, pinned in tests/requirements.txt) driving the real
//! `didgate mcp` over stdio against a real gateway (specs/client-tools.md, "MCP server"): the tools
//! the SDK lists carry titles, read-only and destructive hints and a typed, required body with
//! the schema the operator declared; a working call answers; a policy refusal, a gateway that
//! stops under a listed session, and a fresh session with no gateway are tool results with
//! `isError` true and a reason the model can read, never JSON-RPC errors. (tests/tests/mcp.rs
//! drives the same server with hand-written JSON-RPC lines.)
//!
//! The script (tests/sdk/mcp_session.py) prints `{"ready": true}` once the live calls are done
//! and waits; the test stops the gateway, answers, and reads the script's one line of results.
//! Every wait is bounded by a deadline; nothing is judged by timing.
//!
//! The operator's hints are version 2 Catalog fields (amendment 2.5): a version 1 client gets
//! the same catalog without them (`the_operators_hints_reach_version_2_clients_only`).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use didgate_audit::entry::{Entry, EntryKind, Outcome};
use didgate_audit::{load_records, verify};
use didgate_gateway::catalog::{BodyMode, OperationConfig};
use didgate_tests::{Harness, alice, alice_home, bin, python_with};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{ChildStdout, Command};

/// The Python script the test runs.
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/sdk/mcp_session.py");

/// Longest any one step may take before the test fails (never reached when things work).
const DEADLINE: Duration = Duration::from_secs(180);

/// The body schema the operator declares for `create_charge`.
const CHARGE_SCHEMA: &str = r#"{"type": "object", "required": ["amount", "currency"], "properties": {"amount": {"type": "integer", "minimum": 1, "description": "cents"}, "currency": {"type": "string", "enum": ["usd", "eur"]}}, "additionalProperties": false}"#;

/// The payments catalog of this test, with the operator's hints.
fn operations() -> Vec<OperationConfig> {
    let op = |name: &str, method: &str, path: &str, description: &str| OperationConfig {
        name: name.into(),
        method: method.into(),
        path: path.into(),
        description: description.into(),
        ..OperationConfig::default()
    };
    vec![
        OperationConfig {
            title: Some("Account balance".into()),
            ..op(
                "get_balance",
                "GET",
                "/v1/balance",
                "The account's available balance.",
            )
        },
        OperationConfig {
            destructive: Some(false),
            body_schema: Some(CHARGE_SCHEMA.into()),
            ..op("create_charge", "POST", "/v1/charges", "Create a charge.")
        },
        op(
            "get_charge",
            "GET",
            "/v1/charges/{id}",
            "One charge by its id.",
        ),
        OperationConfig {
            destructive: Some(true),
            ..op(
                "refund_charge",
                "DELETE",
                "/v1/charges/{id}",
                "Refund a charge.",
            )
        },
        OperationConfig {
            body: Some(BodyMode::Optional),
            ..op(
                "capture_charge",
                "POST",
                "/v1/charges/{id}/capture",
                "Capture a charge.",
            )
        },
    ]
}

/// Alice may GET, POST and DELETE on payments, never with an `expand` query parameter (the
/// catalog is judged without a query, so the tools are listed and the call is refused).
fn use_policy(h: &Harness) -> anyhow::Result<()> {
    let alice_did = alice().did().to_string();
    h.use_policy(&format!(
            r#"
@id("alice-payments")
permit (principal == Did::"{alice_did}", action in [Action::"GET", Action::"POST", Action::"DELETE"], resource in Upstream::"payments");

@id("no-expand")
forbid (principal, action, resource) when {{ context.query.contains("expand") }};
"#
    ))
}

/// The script's next line on stdout, as JSON.
async fn next_json(lines: &mut Lines<BufReader<ChildStdout>>) -> anyhow::Result<Value> {
    let line = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .map_err(|_| anyhow::anyhow!("the MCP script printed nothing within {DEADLINE:?}"))??
        .ok_or_else(|| anyhow::anyhow!("the MCP script ended early (its stderr is above)"))?;
    serde_json::from_str(&line).map_err(|e| anyhow::anyhow!("not JSON: {line:?}: {e}"))
}

/// The tool named `name` in the SDK's listing.
fn tool<'a>(tools: &'a Value, name: &str) -> &'a Value {
    tools
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["name"] == name))
        .unwrap_or_else(|| panic!("no tool {name} in {tools}"))
}

/// The text content of a tool result.
fn text(result: &Value) -> String {
    result["content"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["text"].as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

fn check_tools(tools: &Value) {
    let names: Vec<&str> = tools
        .as_array()
        .expect("tools/list answered")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "payments__get_balance",
            "payments__create_charge",
            "payments__get_charge",
            "payments__refund_charge",
            "payments__capture_charge",
        ]
    );

    // GET: read-only (so not destructive), the operator's title, no body
    let balance = tool(tools, "payments__get_balance");
    assert_eq!(balance["title"], "Account balance", "{balance}");
    assert_eq!(balance["annotations"]["title"], "Account balance");
    assert_eq!(balance["annotations"]["readOnlyHint"], true);
    assert_eq!(balance["annotations"]["destructiveHint"], false);
    assert!(balance["inputSchema"]["properties"].get("body").is_none());
    assert_eq!(balance["inputSchema"]["required"], json!([]));
    let get_charge = tool(tools, "payments__get_charge");
    assert_eq!(get_charge["title"], "Get charge (payments)", "{get_charge}");
    assert_eq!(get_charge["annotations"]["readOnlyHint"], true);
    assert_eq!(get_charge["inputSchema"]["required"], json!(["id"]));

    // POST marked not destructive: a required body whose schema is the declared one
    let create = tool(tools, "payments__create_charge");
    assert_eq!(create["annotations"]["readOnlyHint"], false, "{create}");
    assert_eq!(create["annotations"]["destructiveHint"], false);
    assert_eq!(create["inputSchema"]["required"], json!(["body"]));
    let mut declared: Value = serde_json::from_str(CHARGE_SCHEMA).expect("schema");
    declared["description"] = create["inputSchema"]["properties"]["body"]["description"].clone();
    assert!(declared["description"].is_string(), "{create}");
    assert_eq!(create["inputSchema"]["properties"]["body"], declared);

    // DELETE marked destructive: no body by default
    let refund = tool(tools, "payments__refund_charge");
    assert_eq!(refund["annotations"]["readOnlyHint"], false, "{refund}");
    assert_eq!(refund["annotations"]["destructiveHint"], true);
    assert!(refund["inputSchema"]["properties"].get("body").is_none());

    // POST the operator said nothing about: no destructiveHint (MCP's default, true, applies);
    // body optional, of the default JSON types
    let capture = tool(tools, "payments__capture_charge");
    assert_eq!(capture["annotations"]["readOnlyHint"], false, "{capture}");
    assert!(capture["annotations"].get("destructiveHint").is_none());
    assert_eq!(capture["inputSchema"]["required"], json!(["id"]));
    assert_eq!(
        capture["inputSchema"]["properties"]["body"]["type"],
        json!(["object", "array", "string"])
    );
}

/// The call outcomes of the client chain in `home`, in order.
fn outcomes(home: &Path) -> anyhow::Result<Vec<Outcome>> {
    let client = load_records(&home.join("chain"))?;
    Ok(client
        .entries
        .iter()
        .map(|(_, b)| Entry::decode(b))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|e| e.kind == EntryKind::Result)
        .filter_map(|e| e.outcome)
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_sdk_sees_hinted_tools_and_refusals_and_a_gone_gateway_as_tool_errors()
-> anyhow::Result<()> {
    let Some(python) = python_with("mcp")? else {
        return Ok(());
    };
    let mut h = Harness::start_with(|c| c.upstreams[0].operations = operations()).await?;
    use_policy(&h)?;
    let home = alice_home(&h)?;
    let mut script = Command::new(python)
        .arg(SCRIPT)
        .arg(bin("didgate")?)
        .arg(&home)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = script.stdin.take().expect("stdin");
    let mut lines = BufReader::new(script.stdout.take().expect("stdout")).lines();

    // the live part is done: stop the gateway under the session, and let the script go on
    let ready = next_json(&mut lines).await?;
    assert_eq!(ready, json!({"ready": true}));
    let addr = h.addr;
    h.stop().await;
    stdin.write_all(b"stopped\n").await?;
    stdin.flush().await?;
    let out = next_json(&mut lines).await?;
    let status = tokio::time::timeout(DEADLINE, script.wait())
        .await
        .map_err(|_| anyhow::anyhow!("the MCP script did not exit"))??;
    assert!(status.success(), "{status}");
    println!("{}", serde_json::to_string_pretty(&out)?);

    check_tools(&out["tools"]);
    let calls = &out["calls"];

    // a call that works
    let r = &calls["balance"]["result"];
    assert_eq!(r["isError"], false, "{calls}");
    assert_eq!(r["structuredContent"]["status"], 200);
    assert_eq!(
        r["structuredContent"]["body"]["available"][0]["amount"],
        12345
    );
    let r = &calls["charge"]["result"];
    assert_eq!(r["isError"], false, "{calls}");
    assert_eq!(r["structuredContent"]["body"]["amount"], 1234);

    // a policy refusal: a tool result the model reads, not a protocol error
    let r = &calls["refused"]["result"];
    assert_eq!(r["isError"], true, "{calls}");
    assert_eq!(r["structuredContent"]["refused"], "policy");
    assert_eq!(r["structuredContent"]["retryable"], false);
    let t = text(r);
    assert!(
        t.contains("refused by the gateway") && t.contains("no-expand"),
        "{t}"
    );

    // a missing required body: bad arguments, a protocol error, nothing signed
    let e = &calls["no_body"]["jsonrpc_error"];
    assert_eq!(e["code"], -32602, "{calls}");
    assert!(e["message"].as_str().is_some_and(|m| m.contains("body")));

    // the gateway stopped under a session that had listed its tools: the call fails as a tool
    // error (the connection was closed, or no handshake answers)
    let r = &calls["listed_then_down"]["result"];
    assert_eq!(r["isError"], true, "{calls}");
    let failed = r["structuredContent"]["failed"]
        .as_str()
        .unwrap_or_default();
    assert!(
        ["gateway_unreachable", "outcome_unknown"].contains(&failed),
        "{r}"
    );
    let t = text(r);
    assert!(
        t.contains("gateway unreachable") || t.contains("connection lost"),
        "{t}"
    );

    // a tool the listing did not show, the catalog unreadable: an unknown tool (a protocol
    // error) that says why the catalog could not be checked again
    let e = &calls["unlisted_down"]["jsonrpc_error"];
    assert_eq!(e["code"], -32602, "{calls}");
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("no tool") && m.contains("gateway unreachable")),
        "{calls}"
    );

    // a fresh session with no gateway: the catalog cannot be read, the call is a tool error
    // saying so (no call made), and tools/list is a protocol error that names the reason
    let r = &calls["fresh_down"]["result"];
    assert_eq!(r["isError"], true, "{calls}");
    assert_eq!(r["structuredContent"]["failed"], "gateway_unreachable");
    assert_eq!(r["structuredContent"]["retryable"], true);
    let t = text(r);
    assert!(
        t.contains("no call was made") && t.contains("gateway unreachable"),
        "{t}"
    );
    let e = &calls["list_down"]["jsonrpc_error"];
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("gateway's catalog") && m.contains("gateway unreachable")),
        "{calls}"
    );

    // what reached the upstream, and both chains
    let seen = h.upstream.seen();
    let paths: Vec<&str> = seen.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(paths, ["/v1/balance", "/v1/charges"]);
    let report = verify::verify(
        &[load_records(&h.gw_dir())?],
        &[load_records(&home.join("chain"))?],
    );
    assert!(report.ok(), "{:?}", report.violations);
    assert_eq!(
        outcomes(&home)?,
        [
            Outcome::Receipt,
            Outcome::Refusal,
            Outcome::Receipt,
            Outcome::Unknown
        ],
        "the call after the gateway stopped is recorded with an unknown outcome ({addr})"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_hints_reach_version_2_clients_only() -> anyhow::Result<()> {
    let mut h = Harness::start_with(|c| c.upstreams[0].operations = operations()).await?;
    let v2 = h.client("v2", alice()).await?;
    let v1 = h
        .client("v1", alice())
        .await?
        .speaking(didgate_protocol::Version::V1)?;
    let hinted = v2.catalog().await?;
    let create = hinted
        .iter()
        .find(|o| o.name == "create_charge")
        .expect("listed");
    assert_eq!(create.destructive, Some(false));
    assert_eq!(create.body_schema.as_deref(), Some(CHARGE_SCHEMA));
    assert_eq!(hinted[0].title.as_deref(), Some("Account balance"));
    // a version 1 Catalog has the frozen table's fields only (its decoder refuses others)
    let plain = v1.catalog().await?;
    assert_eq!(
        plain,
        hinted
            .into_iter()
            .map(|o| o.without_v2_fields())
            .collect::<Vec<_>>()
    );
    for c in [v1, v2] {
        c.close().await;
    }
    h.stop().await;
    Ok(())
}

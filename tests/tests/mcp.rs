//! `didgate mcp` as a process, driven by a real MCP session over stdio (JSON-RPC lines as any
//! MCP client sends them): initialize, tools/list (the gateway's catalog for this DID),
//! tools/call (signed calls through a real gateway to the real demo upstream), refusals as tool
//! errors, and every call in the client's chain with its receipt.

use std::process::Stdio;
use std::time::Duration;

use didgate_audit::entry::{Entry, EntryKind, Outcome};
use didgate_audit::{load_records, verify};
use didgate_gateway::limits::RateLimit;
use didgate_tests::{Harness, alice_home, bin};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{ChildStdin, ChildStdout, Command};

/// How long one answer may take before the test fails (a bound, not a timing assumption).
const ANSWER_DEADLINE: Duration = Duration::from_secs(30);

struct Session {
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    next_id: u64,
}

impl Session {
    async fn send(&mut self, message: Value) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(&message)?;
        line.push(b'\n');
        self.stdin.write_all(&line).await?;
        self.stdin.flush().await?;
        Ok(())
    }

    /// Sends a request and returns its response (notifications in between are skipped).
    async fn request(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
            .await?;
        loop {
            let line = tokio::time::timeout(ANSWER_DEADLINE, self.stdout.next_line())
                .await
                .map_err(|_| anyhow::anyhow!("no answer to {method} within {ANSWER_DEADLINE:?}"))??
                .ok_or_else(|| anyhow::anyhow!("didgate mcp closed stdout"))?;
            let v: Value = serde_json::from_str(&line)
                .map_err(|e| anyhow::anyhow!("not JSON-RPC: {line:?}: {e}"))?;
            if v["id"] == json!(id) {
                return Ok(v);
            }
        }
    }

    async fn call_tool(&mut self, name: &str, arguments: Value) -> anyhow::Result<Value> {
        self.request("tools/call", json!({"name": name, "arguments": arguments}))
            .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_session_lists_the_catalog_and_calls_tools_through_the_gateway() -> anyhow::Result<()> {
    // one catalog read (tools/list: it takes a token like a call) and three calls, then the
    // per-DID rate limit refuses (never refills: no timing assumption); tool calls use the
    // catalog tools/list read
    let mut h = Harness::start_with(|c| {
        c.gateway.rate_per_did = RateLimit {
            burst: 4,
            per_sec: 0.0,
        }
    })
    .await?;
    let home = alice_home(&h)?;
    let mut child = Command::new(bin("didgate")?)
        .arg("--home")
        .arg(&home)
        .arg("mcp")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let mut s = Session {
        stdin: child.stdin.take().expect("stdin"),
        stdout: BufReader::new(child.stdout.take().expect("stdout")).lines(),
        next_id: 0,
    };
    initialize(&mut s).await?;
    lists_the_catalog(&mut s).await?;
    calls_tools(&mut s).await?;

    // the client closes stdin: the server ends and closes its chain
    drop(s);
    let status = tokio::time::timeout(ANSWER_DEADLINE, child.wait())
        .await
        .map_err(|_| anyhow::anyhow!("didgate mcp did not exit after stdin closed"))??;
    assert!(status.success(), "{status}");

    let seen = h.upstream.seen();
    let paths: Vec<&str> = seen.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(paths, ["/v1/balance", "/v1/charges", "/v1/charges/ch_9"]);
    h.stop().await;
    let client = load_records(&home.join("chain"))?;
    let report = verify::verify(&[load_records(&h.gw_dir())?], std::slice::from_ref(&client));
    assert!(report.ok(), "{:?}", report.violations);
    let outcomes: Vec<Outcome> = client
        .entries
        .iter()
        .map(|(_, b)| Entry::decode(b))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|e| e.kind == EntryKind::Result)
        .filter_map(|e| e.outcome)
        .collect();
    assert_eq!(
        outcomes,
        [
            Outcome::Receipt,
            Outcome::Receipt,
            Outcome::Receipt,
            Outcome::Refusal
        ]
    );
    Ok(())
}

/// The MCP handshake: `initialize` names the server and its tools capability, then the
/// client's `notifications/initialized`.
async fn initialize(s: &mut Session) -> anyhow::Result<()> {
    let init = s
        .request(
            "initialize",
            json!({
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "didgate-tests", "version": "0"}
            }),
        )
        .await?;
    assert_eq!(init["result"]["serverInfo"]["name"], "didgate", "{init}");
    assert!(
        init["result"]["capabilities"]["tools"].is_object(),
        "{init}"
    );
    s.send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        .await
}

/// `tools/list` is the gateway's catalog as alice's policy filters it, with input schemas and
/// descriptions.
async fn lists_the_catalog(s: &mut Session) -> anyhow::Result<()> {
    let list = s.request("tools/list", json!({})).await?;
    let tools = list["result"]["tools"].as_array().expect("tools");
    let names: Vec<&str> = tools.iter().filter_map(|t| t["name"].as_str()).collect();
    assert_eq!(
        names,
        [
            "payments__get_balance",
            "payments__create_charge",
            "payments__get_charge"
        ],
        "the catalog filtered by alice's policy (no refund_charge: DELETE is not allowed)"
    );
    let get_charge = &tools[2];
    assert_eq!(get_charge["inputSchema"]["required"], json!(["id"]));
    assert!(
        get_charge["description"]
            .as_str()
            .is_some_and(|d| d.contains("One charge by its id."))
    );
    Ok(())
}

/// Three tool calls through the gateway, then a refusal (a tool error naming the reason), a
/// tool this DID may not call and bad arguments (protocol errors, nothing signed).
async fn calls_tools(s: &mut Session) -> anyhow::Result<()> {
    let r = s.call_tool("payments__get_balance", json!({})).await?;
    assert_eq!(r["result"]["isError"], false, "{r}");
    assert_eq!(r["result"]["structuredContent"]["status"], 200, "{r}");
    assert_eq!(
        r["result"]["structuredContent"]["body"]["available"][0]["amount"],
        12345
    );
    let r = s
        .call_tool(
            "payments__create_charge",
            json!({"body": {"amount": 1234, "currency": "usd"}}),
        )
        .await?;
    assert_eq!(
        r["result"]["structuredContent"]["body"]["amount"], 1234,
        "{r}"
    );
    let r = s
        .call_tool("payments__get_charge", json!({"id": "ch_9"}))
        .await?;
    assert_eq!(
        r["result"]["structuredContent"]["body"]["id"], "ch_9",
        "{r}"
    );
    // a refusal by the gateway is a tool error naming the reason
    let r = s.call_tool("payments__get_balance", json!({})).await?;
    assert_eq!(r["result"]["isError"], true, "{r}");
    assert_eq!(
        r["result"]["structuredContent"]["refused"], "rate_limited",
        "{r}"
    );
    // a tool this DID may not call, and bad arguments: protocol errors, nothing signed
    let r = s
        .call_tool("payments__refund_charge", json!({"id": "ch_1"}))
        .await?;
    assert!(r["error"]["message"].is_string(), "{r}");
    let r = s
        .call_tool("payments__get_charge", json!({"id": "../admin"}))
        .await?;
    assert!(
        r["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("id")),
        "{r}"
    );
    Ok(())
}

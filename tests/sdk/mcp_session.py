"""Drives `didgate mcp` with the official MCP Python SDK over stdio (tests/tests/sdk_mcp.rs).

Usage: mcp_session.py DIDGATE HOME. Starts `DIDGATE --home HOME mcp` as the SDK's stdio
server, twice:

1. with the gateway running: initialize, tools/list, then the calls of CALLS below; prints
   {"ready": true} and waits for one line on stdin (the test stops the gateway, then writes
   it); then calls `payments__get_balance` again in the same session (its tools are listed),
   and a tool the listing did not show;
2. a fresh session with the gateway still stopped: `payments__get_balance` without listing
   first (the catalog cannot be read), then tools/list.

Prints one JSON line of results: {"tools": [Tool as the SDK parsed it], "calls": {NAME:
OUTCOME}}, where OUTCOME is {"result": CallToolResult} or {"jsonrpc_error": {"code",
"message"}} (an MCP protocol error), or {"exception": TEXT} for anything else. Each step is
bounded by DEADLINE; the SDK never gets an answer it does not wait for.
"""

import json
import sys

import anyio
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.shared.exceptions import MCPError

# Longest one step may take (the gateway-down steps wait for the client's connect timeout).
DEADLINE = 60

# The calls made while the gateway runs: (result name, tool, arguments).
CALLS = [
    ("balance", "payments__get_balance", {}),
    ("refused", "payments__get_balance", {"query": {"expand": "all"}}),
    ("charge", "payments__create_charge", {"body": {"amount": 1234, "currency": "usd"}}),
    ("no_body", "payments__create_charge", {}),
]


def dump(model):
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


async def outcome(step):
    """Runs one SDK call: its result, or the MCP error it raised."""
    try:
        with anyio.fail_after(DEADLINE):
            return {"result": dump(await step())}
    except MCPError as e:
        return {"jsonrpc_error": {"code": e.code, "message": e.message}}
    except Exception as e:  # reported, for the test to show
        return {"exception": f"{type(e).__name__}: {e}"}


def server(didgate, home):
    return StdioServerParameters(command=didgate, args=["--home", home, "mcp"])


async def main() -> None:
    didgate, home = sys.argv[1], sys.argv[2]
    out = {"tools": None, "calls": {}}

    async with stdio_client(server(didgate, home)) as (read, write):
        async with ClientSession(read, write) as session:
            with anyio.fail_after(DEADLINE):
                await session.initialize()
            listed = await outcome(session.list_tools)
            out["tools"] = listed.get("result", listed).get("tools", listed)
            for name, tool, args in CALLS:
                out["calls"][name] = await outcome(lambda: session.call_tool(tool, args))

            print(json.dumps({"ready": True}), flush=True)
            # the test stops the gateway, then answers
            await anyio.to_thread.run_sync(sys.stdin.readline)
            out["calls"]["listed_then_down"] = await outcome(
                lambda: session.call_tool("payments__get_balance", {})
            )
            out["calls"]["unlisted_down"] = await outcome(
                lambda: session.call_tool("payments__delete_everything", {})
            )

    async with stdio_client(server(didgate, home)) as (read, write):
        async with ClientSession(read, write) as session:
            with anyio.fail_after(DEADLINE):
                await session.initialize()
            out["calls"]["fresh_down"] = await outcome(
                lambda: session.call_tool("payments__get_balance", {})
            )
            out["calls"]["list_down"] = await outcome(session.list_tools)

    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    anyio.run(main)

"""One MCP session of the official MCP Python SDK against `didgate mcp` (tests/tests/home.rs).

Usage: mcp_call.py DIDGATE HOME. Starts `DIDGATE --home HOME mcp` as the SDK's stdio server,
initializes, lists the tools, calls `payments__get_balance`, and prints one JSON line:
{"tools": [NAME, ...], "balance": CallToolResult} or {"exception": TEXT}. Each step is bounded.
"""

import json
import sys

import anyio
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

# Longest one step may take (never reached when things work).
DEADLINE = 60


async def main() -> None:
    didgate, home = sys.argv[1], sys.argv[2]
    params = StdioServerParameters(command=didgate, args=["--home", home, "mcp"])
    try:
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as session:
                with anyio.fail_after(DEADLINE):
                    await session.initialize()
                    tools = await session.list_tools()
                    result = await session.call_tool("payments__get_balance", {})
        out = {
            "tools": [t.name for t in tools.tools],
            "balance": result.model_dump(mode="json", by_alias=True, exclude_none=True),
        }
    except Exception as e:  # reported, for the test to show
        out = {"exception": f"{type(e).__name__}: {e}"}
    print(json.dumps(out), flush=True)


anyio.run(main)

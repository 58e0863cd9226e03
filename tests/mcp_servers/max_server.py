"""A stdio MCP server with one tool, ``max_of``: the tiny "max of a list" task's tool, served over
MCP for the golden tool-use run (tests/test_golden_runs.py).

Written with the SDK's low-level server so that the tool's input schema is exactly the one
``rlft.testing.pretrained`` rendered when it taught the tiny model to call ``max_of`` (FastMCP would add
titles, and the tiny model, trained on one schema text, garbles its calls under another)."""

import asyncio

import mcp.types as types
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server

SCHEMA = {"type": "object",
          "properties": {"numbers": {"description": "the numbers to compare.", "items": {"type": "integer"},
                                     "type": "array"}},
          "required": ["numbers"], "additionalProperties": False}
server = Server("max")


@server.list_tools()
async def list_tools() -> list[types.Tool]:
    return [types.Tool(name="max_of", description="Return the largest of the numbers.", inputSchema=SCHEMA)]


@server.call_tool()
async def call_tool(name: str, arguments: dict) -> list[types.TextContent]:
    if name != "max_of":
        raise ValueError(f"unknown tool {name}")
    return [types.TextContent(type="text", text=str(max(arguments["numbers"])))]


async def main() -> None:
    async with stdio_server() as (read, write):
        await server.run(read, write, server.create_initialization_options())


if __name__ == "__main__":
    asyncio.run(main())

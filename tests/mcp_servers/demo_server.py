"""A FastMCP server for rlft's MCP tests.

    python demo_server.py                 # stdio
    python demo_server.py --http PORT     # streamable HTTP on 127.0.0.1:PORT, path /mcp

Environment knobs (read at start-up):
- DEMO_PID_FILE: write this process's PID there once the tools are registered.
- DEMO_LINGER: seconds a non-daemon thread keeps the process alive after stdin closes,
  to play a server that ignores EOF (only a signal stops it early).
"""

import asyncio
import os
import sys
import threading
import time

from mcp.server.fastmcp import FastMCP

port = int(sys.argv[sys.argv.index("--http") + 1]) if "--http" in sys.argv else 8000
server = FastMCP("demo", host="127.0.0.1", port=port, log_level="WARNING")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def echo(text: str) -> str:
    """Return the text unchanged."""
    return text


@server.tool()
def fail(message: str = "it broke") -> str:
    """Always raise, with the given message."""
    raise ValueError(message)


@server.tool()
async def slow(seconds: float, value: str = "") -> str:
    """Sleep, then return value."""
    await asyncio.sleep(seconds)
    return value


@server.tool()
def pid() -> int:
    """This server's process id."""
    return os.getpid()


@server.tool()
def crash() -> str:
    """Exit the process at once, without answering."""
    os._exit(3)


if __name__ == "__main__":
    if os.environ.get("DEMO_PID_FILE"):
        with open(os.environ["DEMO_PID_FILE"], "w") as f:
            f.write(str(os.getpid()))
    if os.environ.get("DEMO_LINGER"):
        threading.Thread(target=time.sleep, args=(float(os.environ["DEMO_LINGER"]),), daemon=False).start()
    server.run("streamable-http" if "--http" in sys.argv else "stdio")

"""MCP servers as environment tools.

- ``server.py``: ``MCPServer``, how to reach one server (stdio or streamable HTTP), a value;
- ``client.py``: its live connection: session, tool calls, restarts, clean-up;
- ``launch.py``: the launcher a stdio server is started through (a parent-death signal), run as
  a file, importing nothing from rlft;
- ``stderr.py``: a stdio server's stderr, logged line by line, its tail quoted in errors.
"""

from rlft.mcp.client import MCPConnectError, MCPConnection, MCPToolError
from rlft.mcp.server import MCPServer

__all__ = ["MCPConnectError", "MCPConnection", "MCPServer", "MCPToolError"]

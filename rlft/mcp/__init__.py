"""MCP servers as environment tools.

- ``client.py``: ``MCPServer`` (stdio or streamable HTTP), its connection and tools;
- ``launch.py``: the launcher a stdio server is started through (a parent-death signal), run as
  a file, importing nothing from rlft;
- ``stderr.py``: a stdio server's stderr, logged line by line, its tail quoted in errors.
"""

from rlft.mcp.client import MCPConnectError, MCPConnection, MCPServer, MCPToolError

__all__ = ["MCPConnectError", "MCPConnection", "MCPServer", "MCPToolError"]

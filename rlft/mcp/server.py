"""``MCPServer``: how to reach one MCP server, as a value (stdio command or streamable-HTTP URL),
and the common ``{"mcpServers": {...}}`` config style it is read from.

Building one starts nothing and needs no ``mcp`` package: ``server.connect()`` makes the live
connection (``rlft.mcp.client``: the session, calls, restarts and clean-up). Left out: every
transport detail, which lives with the connection.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from rlft.mcp.client import MCPConnection

# Keys of the mcpServers config style that we understand, and keys other clients write that
# have no meaning here (ignored rather than rejected, so a config copied from them loads).
_CONFIG_KEYS = {"command", "args", "env", "cwd", "url", "headers", "isolated", "timeout", "tools", "startup_timeout",
                "restart", "max_restarts"}
_IGNORED_CONFIG_KEYS = {"autoApprove", "alwaysAllow", "description", "disabledTools"}
_HTTP_TYPES = {"http", "streamable-http", "streamable_http", "streamableHttp"}


@dataclass(frozen=True)
class MCPServer:
    """How to reach one MCP server: stdio (``command``, ``args``, ``env``, ``cwd``) or
    streamable HTTP (``url``, ``headers``).

    ``name`` labels errors and logs (default: the command's or host's name). ``isolated``:
    the environment should open one connection (so, for stdio, one server process) per
    rollout instead of one shared by all. ``timeout``: seconds allowed for each tool call;
    ``startup_timeout``: for the start-up handshake (a server starting on a loaded machine can
    be slow; at least ``timeout``). ``tools``: expose only these tool names (an unknown one fails
    ``connect()``, so a typo does not silently drop a tool).
    """

    command: str | None = None
    args: Sequence[str] = ()
    env: Mapping[str, str] | None = None
    cwd: str | os.PathLike[str] | None = None
    url: str | None = None
    headers: Mapping[str, str] | None = None
    name: str | None = None
    isolated: bool = False
    timeout: float = 30.0
    tools: Sequence[str] | None = None
    startup_timeout: float = 20.0
    restart: bool = True  # start the server again when it dies (see the module docstring)
    max_restarts: int = 5  # per connection; then it stays down

    def __post_init__(self) -> None:
        if (self.command is None) == (self.url is None):
            raise ValueError("MCPServer needs exactly one of command= (stdio) or url= (streamable HTTP)")
        if isinstance(self.args, str) or isinstance(self.tools, str):
            raise TypeError("MCPServer args= and tools= are lists of strings, not one string")
        if self.url is not None and (self.args or self.env is not None or self.cwd is not None):
            raise ValueError("MCPServer args=, env= and cwd= apply to stdio servers, not to url=")
        if self.command is not None and self.headers is not None:
            raise ValueError("MCPServer headers= applies to url= servers, not to stdio")
        if not self.timeout > 0:
            raise ValueError(f"MCPServer timeout must be > 0, got {self.timeout!r}")
        # Normalised copies: the value must not change when the caller's list/dict does.
        set_ = object.__setattr__
        set_(self, "args", tuple(str(a) for a in self.args))
        if self.tools is not None:
            set_(self, "tools", tuple(self.tools))
        if self.env is not None:
            set_(self, "env", {str(k): str(v) for k, v in self.env.items()})
        if self.headers is not None:
            set_(self, "headers", {str(k): str(v) for k, v in self.headers.items()})
        if self.name is None:
            default = os.path.basename(self.command) if self.command else urlsplit(self.url).netloc or self.url
            set_(self, "name", default)

    def __hash__(self) -> int:  # env/headers are dicts; hash their items so servers can key a dict
        return hash((self.command, self.args, _items(self.env), self.cwd and os.fspath(self.cwd), self.url,
                     _items(self.headers), self.name, self.isolated, self.timeout, self.tools, self.startup_timeout,
                     self.restart, self.max_restarts))

    @property
    def transport(self) -> str:
        return "stdio" if self.command is not None else "http"

    def describe(self) -> str:
        """The command line or URL, for messages."""
        if self.command is not None:
            import shlex

            return shlex.join([self.command, *self.args])
        return str(self.url)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | str | os.PathLike[str], **defaults: Any) -> list[MCPServer]:
        """Servers from the common config style: ``{"mcpServers": {name: {"command": ..., "args":
        [...], "env": {...}}}}`` or the inner mapping alone, or a path to such a JSON file.

        Entries may also use ``url``/``headers`` (streamable HTTP), ``cwd``, and rlft's
        ``isolated``/``timeout``/``tools``; ``"disabled": true`` skips an entry. ``defaults``
        apply to every entry that does not set the field (e.g. ``isolated=True``).
        """
        if isinstance(config, (str, os.PathLike)):
            with open(config, encoding="utf-8") as f:
                config = json.load(f)
        if not isinstance(config, Mapping):
            raise TypeError(f"MCP config must be a mapping, got {type(config).__name__}")
        servers = config.get("mcpServers", config)
        out = []
        for name, entry in servers.items():
            if not isinstance(entry, Mapping):
                raise ValueError(f"MCP server {name!r}: config entry must be a mapping, got {type(entry).__name__}")
            entry = dict(entry)
            if entry.pop("disabled", False):
                continue
            kind = entry.pop("type", None) or entry.pop("transport", None)
            if kind is not None and kind != "stdio" and kind not in _HTTP_TYPES:
                raise ValueError(f"MCP server {name!r}: transport {kind!r} is not supported "
                                 "(stdio and streamable HTTP are)")
            for key in _IGNORED_CONFIG_KEYS:
                entry.pop(key, None)
            unknown = sorted(set(entry) - _CONFIG_KEYS)
            if unknown:
                raise ValueError(f"MCP server {name!r}: unknown config key(s) {unknown}; known: {sorted(_CONFIG_KEYS)}")
            out.append(cls(name=str(name), **{**defaults, **entry}))
        return out

    def connect(self) -> MCPConnection:
        """A new connection; use it as ``async with server.connect() as conn: conn.tools``.
        Each call starts a new server process (stdio) or a new MCP session (HTTP)."""
        from rlft.mcp.client import MCPConnection

        return MCPConnection(self)


def _items(mapping: Mapping[str, str] | None) -> tuple[tuple[str, str], ...] | None:
    return None if mapping is None else tuple(sorted(mapping.items()))


__all__ = ["MCPServer"]

"""MCP servers as rlft tools, through the official ``mcp`` SDK (``pip install 'rlft[mcp]'``).

What it does
------------
- ``MCPServer`` (``rlft.mcp.server``) is a value that describes one server: a stdio server (``command``/``args``/
  ``env``/``cwd``) or a streamable-HTTP one (``url``/``headers``). ``MCPServer.from_config``
  reads the common ``{"mcpServers": {name: {...}}}`` style. ``tools=`` restricts which of the
  server's tools are exposed; ``isolated=True`` tells the environment to open one server per
  rollout (a private database, a scratch directory) instead of one shared by all rollouts.
- ``async with server.connect() as conn:`` starts the server (stdio) or opens a session
  (HTTP), runs the MCP handshake, lists the tools, and gives ``conn.tools``: ``rlft.tools.Tool``
  values whose schemas are the server's ``inputSchema`` and whose names are the server's own
  (no prefix). Calling a tool sends ``tools/call`` and returns its text content (non-text
  content is described in a short bracket, e.g. ``[image image/png, 1234 bytes]``).
- One connection serves any number of concurrent calls (requests are multiplexed by id), so
  a shared server needs no lock and no pool: the environment opens a shared server once for
  the run and an ``isolated`` one in each rollout's setup (closing it in teardown).
- Failures: a result with ``isError`` or a JSON-RPC error raises ``MCPToolError`` carrying
  the server's message (the rollout's tool message shows it and the rollout goes on); no
  answer within ``timeout`` raises ``TimeoutError``; a connection that is gone (process
  exited, HTTP server unreachable) raises ``rlft.tools.FatalToolError`` at once, never a
  hang, so the rollout ends with ``Termination.TOOL_ERROR``. A server that fails to start
  raises ``MCPConnectError`` from ``connect()`` with the tail of its stderr.

Cleanup (the part that is easy to get wrong)
--------------------------------------------
- The SDK's transport and session live in one background task per connection that enters
  and exits them itself. Anyio cancel scopes must be exited by the task that entered them,
  and a crashing transport cancels its host task; keeping both inside our own task means a
  dying server can neither cancel the caller's task nor break on exit from another task.
- On exit of the ``async with`` (normally, by exception or by cancellation) the SDK (1.30)
  closes the server's stdin, waits 2 s, then SIGTERMs and SIGKILLs its process group;
  ``__aexit__`` waits for that even if cancelled again, because it is bounded and a
  half-closed server is an orphan.
- When the Python process is SIGKILLed no cleanup code runs. On Linux stdio servers are
  therefore started through ``rlft/mcp/launch.py``, which sets ``PR_SET_PDEATHSIG=SIGTERM``
  and then execs the server (same PID, stdio and environment): the kernel signals the server
  when its parent dies. See that file for the limits (parent *thread*, grandchildren).
  Elsewhere the server is started directly and relies on the EOF of its stdin.
- A server's stderr is captured, not passed through: FastMCP servers log a line per request,
  which would bury training logs. Each line is logged at DEBUG on the ``rlft.mcp`` logger,
  and the last few KB are quoted in startup and "server gone" errors.

What it leaves out
------------------
- Only tools: no resources, prompts, sampling, elicitation or roots.
- Transports: stdio and streamable HTTP only (no legacy SSE, no websocket); no OAuth flow
  (put a token in ``headers``). With the SDK's HTTP transport an HTTP error status on any
  request ends the connection (every later call raises ``FatalToolError``).
- Restarts: a server that dies (its process exits, its HTTP session ends) fails the calls in
  flight with ``FatalToolError`` (one of them may be what killed it: it is not retried), and the
  next call starts it again (stdio: a new process; HTTP: a new session) after a bounded
  backoff (0.5 s, doubling, at most 8 s), up to ``max_restarts`` times per connection; then it
  stays down and an error is logged. ``restart=False`` fails fast (``mcp_restart = false``).
- A call cancelled by the caller (rollout timeout) is not forwarded to the server as
  ``notifications/cancelled``; the server finishes it and the answer is dropped.
- Like the SDK and other MCP clients, a stdio server gets only a safe part of our
  environment (``HOME``, ``PATH``, ``USER``...) plus ``env``; pass what it needs.
- A connection belongs to the event loop that opened it (no cross-thread use).

``mcp`` is imported only when a connection is opened: ``import rlft`` and building
``MCPServer`` values work without the extra installed.

Why one module: a connection's owner task, its calls, restarts and clean-up share the
connection's state and the cancellation rules above, which only hold when read together; the
server description (``server.py``), the launcher and stderr capture already stand apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from datetime import timedelta
from typing import Any

from rlft.mcp.server import MCPServer
from rlft.mcp.stderr import STDERR_TAIL_BYTES, StderrTail
from rlft.tools import FatalToolError, Tool

__all__ = ["MCPConnectError", "MCPConnection", "MCPToolError"]

log = logging.getLogger(__name__)

_LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launch.py")
_FATAL_TAIL_CHARS = 1500  # quoted in FatalToolError: it is stored on every affected rollout
_CONNECTION_CLOSED = -32000  # mcp.types.CONNECTION_CLOSED (not defined in every SDK version)
_REQUEST_TIMEOUT = 408  # the code the SDK's send_request uses for a read timeout

class MCPConnectError(RuntimeError):
    """The server could not be started or did not complete the MCP handshake."""


class MCPToolError(RuntimeError):
    """The server answered a tool call with an error (``isError`` or a JSON-RPC error)."""


class MCPConnection:
    """One live MCP session with one server. ``tools`` is filled on entering ``async with``.

    Safe for concurrent calls from many tasks of the loop that opened it.
    """

    def __init__(self, server: MCPServer) -> None:
        self.server = server
        self.tools: list[Tool] = []
        self._session: Any = None
        self._owner: asyncio.Task[None] | None = None
        self._closed: asyncio.Event | None = None  # set once no call can succeed any more
        self._reason = ""
        self._stderr = StderrTail(server.name or "mcp")
        self._closed_by_us = False
        self._restart_lock: asyncio.Lock | None = None
        self.restarts = 0  # times the server was started again after it died

    # -- lifecycle -----------------------------------------------------------------------
    async def __aenter__(self) -> MCPConnection:
        if self._owner is not None:
            raise RuntimeError("an MCPConnection can be entered only once; call server.connect() again")
        _require_mcp()
        self._closed = asyncio.Event()
        ready: asyncio.Future[list[Tool]] = asyncio.get_running_loop().create_future()
        ready.add_done_callback(_consume_exception)  # unread when we were cancelled meanwhile
        self._owner = asyncio.create_task(self._serve(ready), name=f"rlft.mcp:{self.server.name}")
        try:
            self.tools = await asyncio.shield(ready)
        except asyncio.CancelledError:
            # Cancelled while starting: the owner may be blocked in the handshake; stop it now.
            self._mark_closed("the connection was cancelled while starting")
            await self._wait_owner(cancel=True)
            raise
        except BaseException:
            await self._wait_owner()
            raise
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the session and stop the server (stdio). Idempotent."""
        if self._owner is None:
            return
        self._closed_by_us = True
        self._mark_closed("the connection was closed")
        await self._wait_owner()

    @property
    def closed(self) -> bool:
        """True once calls can no longer succeed (closed by us, or the server is gone)."""
        return self._closed is not None and self._closed.is_set()

    # -- calls ---------------------------------------------------------------------------
    async def call_tool(self, name: str, arguments: Mapping[str, Any] | None = None) -> str:
        """Call one tool and return its text. Raises ``MCPToolError`` (the server's message),
        ``TimeoutError`` (no answer within ``server.timeout``) or ``FatalToolError`` (gone)."""
        from mcp.shared.exceptions import McpError

        if self._owner is None or self._closed is None:
            raise RuntimeError("MCP connection not open: use `async with server.connect() as conn`")
        if self._closed.is_set():
            await self._restart(name)  # FatalToolError when it may not, or cannot, come back
        call = asyncio.ensure_future(self._session.call_tool(
            name, dict(arguments or {}), read_timeout_seconds=timedelta(seconds=self.server.timeout)))
        call.add_done_callback(_consume_exception)  # a call we abandon must not warn later
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            # Race the answer against the connection's end: when the SDK transport crashes its
            # pending requests are not always answered, and waiting on them would hang.
            await asyncio.wait({call, closed}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the caller was cancelled (rollout timeout): drop the call
            call.cancel()
            raise
        finally:
            closed.cancel()
        if not call.done():
            call.cancel()
            raise FatalToolError(self._gone_message(name))
        try:
            result = call.result()
        except McpError as exc:
            code = getattr(exc.error, "code", None)
            if code == _CONNECTION_CLOSED or self._closed.is_set():
                # the transport can end before the owner task notices: mark it, so the next call restarts
                self._mark_closed("the connection closed")
                raise FatalToolError(self._gone_message(name)) from exc
            if code == _REQUEST_TIMEOUT:
                raise TimeoutError(f"MCP tool {name!r} on server {self.server.name!r} did not answer "
                                   f"within {self.server.timeout:g}s") from exc
            raise MCPToolError(exc.error.message) from exc
        except Exception as exc:
            if self._closed.is_set() or _is_closed_stream_error(exc):
                self._mark_closed(f"the connection broke ({type(exc).__name__})")
                raise FatalToolError(self._gone_message(name)) from exc
            raise
        text = _result_text(result)
        if result.isError:
            raise MCPToolError(text or f"tool {name!r} reported an error without a message")
        return text

    def _make_tool(self, spec: Any) -> Tool:
        name = spec.name

        async def call(**arguments: Any) -> str:
            return await self.call_tool(name, arguments)

        parameters = dict(spec.inputSchema or {})
        parameters.setdefault("type", "object")
        if parameters["type"] == "object":
            parameters.setdefault("properties", {})
        meta: dict[str, Any] = {"mcp_server": self.server.name}
        annotations = getattr(spec, "annotations", None)
        if annotations is not None:
            meta["mcp_annotations"] = annotations.model_dump(exclude_none=True)
        return Tool(name=name, description=spec.description or "", parameters=parameters, fn=call,
                    timeout=self.server.timeout, meta=meta)

    async def _restart(self, tool: str) -> None:
        """Start the dead server again (one restart for all callers waiting here), after the
        backoff; ``FatalToolError`` when restarts are off, used up, or the start fails."""
        if self._restart_lock is None:
            self._restart_lock = asyncio.Lock()
        async with self._restart_lock:
            if not self._closed.is_set():  # another call restarted it while this one waited
                return
            if self._closed_by_us or not self.server.restart:
                raise FatalToolError(self._gone_message(tool))
            if self.restarts >= self.server.max_restarts:
                log.error("MCP server %r died again after %d restarts: it stays down (%s)", self.server.name,
                          self.restarts, self._reason)
                raise FatalToolError(self._gone_message(tool) + f" (gave up after {self.restarts} restarts)")
            self.restarts += 1
            delay = min(0.5 * 2 ** (self.restarts - 1), 8.0)
            log.warning("MCP server %r died (%s); restart %d of %d in %.1f s", self.server.name, self._reason,
                        self.restarts, self.server.max_restarts, delay)
            await asyncio.sleep(delay)
            # the dead session's clean-up is bounded (see the module docstring); an owner still
            # holding a broken session (its stream closed, its process alive) is cancelled
            await self._wait_owner(cancel=True)
            self._closed, self._session, self._reason = asyncio.Event(), None, ""
            self._stderr = StderrTail(self.server.name or "mcp")
            ready: asyncio.Future[list[Tool]] = asyncio.get_running_loop().create_future()
            ready.add_done_callback(_consume_exception)
            self._owner = asyncio.create_task(self._serve(ready), name=f"rlft.mcp:{self.server.name}")
            try:
                await asyncio.shield(ready)  # the tools keep their names: the Tool objects stay valid
            except MCPConnectError as e:
                raise FatalToolError(f"{e} (restart {self.restarts} of {self.server.max_restarts})") from e

    # -- the owner task --------------------------------------------------------------------
    async def _serve(self, ready: asyncio.Future[list[Tool]]) -> None:
        """Own the transport and session for the connection's whole life (see module doc)."""
        failure: BaseException | None = None
        try:
            async with contextlib.AsyncExitStack() as stack:
                read, write = await self._open_transport(stack)
                read = self._watch_end(stack, read)
                session = await stack.enter_async_context(self._new_session(read, write))
                await session.initialize()
                tools = await self._list_tools(session)
                self._session = session
                if not ready.done():
                    ready.set_result(tools)
                await self._closed.wait()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - CancelledError and exception groups included: we report them
            failure = exc
        finally:
            if failure is not None:
                self._mark_closed(_describe(failure))
            self._mark_closed("the connection ended")
            if not ready.done():
                await self._stderr.wait_eof(0.5)  # the server's last words explain most failures
                if failure is None:
                    what = "closed before it was ready"
                elif any(getattr(getattr(e, "error", None), "code", None) == _REQUEST_TIMEOUT
                         for e in _leaves(failure)):
                    wait = max(self.server.timeout, self.server.startup_timeout)
                    what = f"no answer to the MCP handshake within {wait:g}s"
                else:
                    what = _describe(failure)
                ready.set_exception(MCPConnectError(self._message(f"failed to start: {what}", STDERR_TAIL_BYTES)))
            self._stderr.close()

    async def _open_transport(self, stack: contextlib.AsyncExitStack) -> tuple[Any, Any]:
        s = self.server
        if s.command is not None:
            from mcp.client.stdio import StdioServerParameters, stdio_client

            command, args = s.command, list(s.args)
            if sys.platform.startswith("linux") and sys.executable:
                args = ["-I", "-S", _LAUNCHER, "--parent", str(os.getpid()), "--", command, *args]
                command = sys.executable
            params = StdioServerParameters(command=command, args=args, env=s.env, cwd=s.cwd)
            errlog = await self._stderr.open()
            try:
                read, write = await stack.enter_async_context(stdio_client(params, errlog=errlog))
            finally:
                self._stderr.child_started()
            return read, write

        import httpx

        try:
            from mcp.client.streamable_http import streamable_http_client
        except ImportError:  # older mcp releases have only the older spelling
            from mcp.client.streamable_http import streamablehttp_client

            read, write, _ = await stack.enter_async_context(
                streamablehttp_client(s.url, headers=s.headers, timeout=s.timeout,
                                      sse_read_timeout=max(300.0, s.timeout + 30)))
            return read, write
        # The httpx read timeout must outlast our per-call timeout: a slow tool that trips it
        # would crash the SDK transport and with it the whole (possibly shared) connection.
        client = await stack.enter_async_context(httpx.AsyncClient(
            headers=s.headers, timeout=httpx.Timeout(s.timeout, read=max(300.0, s.timeout + 30))))
        read, write, _ = await stack.enter_async_context(streamable_http_client(s.url, http_client=client))
        return read, write

    def _watch_end(self, stack: contextlib.AsyncExitStack, read: Any) -> Any:
        """Relay the transport's incoming messages to the session, and notice when they end
        (stdio: the server exited), so calls fail at once instead of after a timeout."""
        import anyio

        send, recv = anyio.create_memory_object_stream(0)

        async def relay() -> None:
            try:
                async with send:
                    async for item in read:
                        await send.send(item)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass
            finally:
                self._mark_closed("the server closed the connection (its process exited)"
                                  if self.server.command is not None else "the server closed the connection")

        task = asyncio.create_task(relay(), name=f"rlft.mcp.relay:{self.server.name}")

        async def stop_relay() -> None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        stack.push_async_callback(stop_relay)
        return recv

    def _new_session(self, read: Any, write: Any) -> Any:
        from mcp import ClientSession, types

        try:
            from rlft import __version__ as version
        except ImportError:
            version = "0"
        # The handshake gets startup_timeout (a server starting on a loaded machine is slow);
        # each tool call gets exactly server.timeout (passed per request).
        startup = max(self.server.timeout, self.server.startup_timeout)
        return ClientSession(read, write, read_timeout_seconds=timedelta(seconds=startup),
                             client_info=types.Implementation(name="rlft", version=version))

    async def _list_tools(self, session: Any) -> list[Tool]:
        specs, cursor = [], None
        while True:
            page = await session.list_tools(cursor) if cursor else await session.list_tools()
            specs.extend(page.tools)
            cursor = page.nextCursor
            if not cursor:
                break
        if self.server.tools is not None:
            offered = [t.name for t in specs]
            missing = [n for n in self.server.tools if n not in offered]
            if missing:
                raise MCPConnectError(f"no tool(s) named {missing}; it offers {offered}")
            specs = [t for t in specs if t.name in self.server.tools]
        return [self._make_tool(t) for t in specs]

    async def _wait_owner(self, cancel: bool = False) -> None:
        owner = self._owner
        assert owner is not None
        if cancel:
            owner.cancel()
        cancelled = False
        while not owner.done():
            try:
                await asyncio.shield(owner)
            except asyncio.CancelledError:
                # Cancelled again while cleaning up: finish anyway. It is bounded (the SDK
                # escalates to SIGKILL within ~4 s) and giving up here leaves an orphan.
                cancelled = cancelled or not owner.done()
            except BaseException:  # noqa: BLE001 - whatever ended the wait, stop waiting
                break
        if cancelled:
            raise asyncio.CancelledError()

    # -- messages --------------------------------------------------------------------------
    def _mark_closed(self, reason: str) -> None:
        if self._closed is not None and not self._closed.is_set():
            self._reason = reason
            self._closed.set()

    def _message(self, what: str, tail_chars: int) -> str:
        msg = f"MCP server {self.server.name!r} ({self.server.describe()}) {what}"
        tail = self._stderr.text()[-tail_chars:].strip()
        if tail:
            msg += f"\n--- end of its stderr ---\n{tail}"
        return msg

    def _gone_message(self, tool: str) -> str:
        return self._message(f"is gone, cannot call {tool!r}: {self._reason or 'connection closed'}", _FATAL_TAIL_CHARS)


# -- helpers -------------------------------------------------------------------------------
def _require_mcp() -> None:
    try:
        import mcp  # noqa: F401
    except ImportError as exc:
        raise ImportError("MCP servers need the `mcp` package: pip install 'rlft[mcp]'") from exc


def _result_text(result: Any) -> str:
    """The text of a CallToolResult: text blocks joined by newlines, other blocks described."""
    parts: list[str] = []
    for block in result.content or ():
        kind = getattr(block, "type", None)
        if kind == "text":
            parts.append(block.text)
        elif kind in ("image", "audio"):
            size = len(block.data) * 3 // 4  # base64
            parts.append(f"[{kind} {block.mimeType}, {size} bytes]")
        elif kind == "resource_link":
            parts.append(f"[resource link {block.uri}]")
        elif kind == "resource":
            res = block.resource
            text = getattr(res, "text", None)
            parts.append(text if text is not None else f"[resource {res.uri}, {res.mimeType or 'binary'}]")
        else:
            parts.append(f"[{kind} content]")
    structured = getattr(result, "structuredContent", None)
    if not parts and structured is not None:
        parts.append(json.dumps(structured, ensure_ascii=False))
    return "\n".join(parts)


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    inner = getattr(exc, "exceptions", None)  # (Base)ExceptionGroup, also the 3.10 backport
    if inner:
        for e in inner:
            yield from _leaves(e)
    else:
        yield exc


def _describe(exc: BaseException) -> str:
    leaves = list(_leaves(exc))
    real = [e for e in leaves if not isinstance(e, asyncio.CancelledError)] or leaves
    return "; ".join(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__ for e in real)


def _is_closed_stream_error(exc: BaseException) -> bool:
    try:
        import anyio
    except ImportError:
        return False
    return isinstance(exc, (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream,
                            BrokenPipeError, ConnectionError))


def _consume_exception(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()

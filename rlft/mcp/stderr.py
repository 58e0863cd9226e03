"""The stderr of a stdio MCP server: logged line by line at DEBUG, its tail kept for errors.

A server that fails to start, or dies mid-run, usually says why on stderr; ``StderrTail`` reads
the pipe on the event loop (no thread), logs each line under ``rlft.mcp`` and keeps the last
``STDERR_TAIL_BYTES`` so that ``MCPConnectError`` and the "server is gone" tool error can quote
it. Left out: Windows (the server then writes to our own stderr).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from typing import Any

__all__ = ["StderrTail", "STDERR_TAIL_BYTES"]

log = logging.getLogger("rlft.mcp")
STDERR_TAIL_BYTES = 8192  # quoted in startup errors


class StderrTail:
    """The read end of a stdio server's stderr pipe: logs each line at DEBUG and keeps the
    last few KB for error messages. POSIX only; elsewhere the server writes to our stderr."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._tail = bytearray()
        self._partial = b""
        self._child_fd: int | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._eof: asyncio.Event | None = None

    async def open(self) -> Any:
        if os.name != "posix":
            return sys.stderr
        r, w = os.pipe()
        self._child_fd = w
        self._eof = asyncio.Event()
        try:
            self._transport, _ = await asyncio.get_running_loop().connect_read_pipe(
                lambda: _StderrProtocol(self), os.fdopen(r, "rb", buffering=0))
        except BaseException:
            os.close(r)
            self.child_started()
            raise
        return w  # subprocess accepts a file descriptor for stderr

    def child_started(self) -> None:
        """Close our copy of the write end, so the pipe ends when the server does."""
        if self._child_fd is not None:
            os.close(self._child_fd)
            self._child_fd = None

    def feed(self, data: bytes) -> None:
        self._tail += data
        del self._tail[:-STDERR_TAIL_BYTES]
        *lines, self._partial = (self._partial + data).split(b"\n")
        if len(self._partial) > STDERR_TAIL_BYTES:
            lines.append(self._partial)
            self._partial = b""
        if log.isEnabledFor(logging.DEBUG):
            for line in lines:
                log.debug("[mcp %s] %s", self._name, line.decode("utf-8", "replace").rstrip())

    def eof(self) -> None:
        if self._eof is not None:
            self._eof.set()

    async def wait_eof(self, timeout: float) -> None:
        if self._eof is not None and self._transport is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._eof.wait(), timeout)

    def text(self) -> str:
        return self._tail.decode("utf-8", "replace")

    def close(self) -> None:
        self.child_started()
        if self._transport is not None:
            self._transport.close()


class _StderrProtocol(asyncio.Protocol):
    def __init__(self, sink: StderrTail) -> None:
        self._sink = sink

    def data_received(self, data: bytes) -> None:
        self._sink.feed(data)

    def eof_received(self) -> bool | None:
        self._sink.eof()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._sink.eof()

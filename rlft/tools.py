"""Tools the model may call: ``@tool`` turns a typed, documented function into a JSON schema.

SKELETON (being completed): the ``Tool`` dataclass and ``ToolResult`` below are the agreed
interface used by ``rlft.env`` and ``rlft.mcp``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable


class FatalToolError(Exception):
    """Raised by a tool whose backend is gone (e.g. its MCP server died): the rollout ends with
    ``Termination.TOOL_ERROR`` instead of going on."""


@dataclass
class ToolResult:
    """What a tool call gave back to the conversation.

    ``content`` is the text of the tool message the model sees (already truncated); ``error``
    is set when the call failed (the content then tells the model what went wrong); ``fatal``
    marks failures the rollout cannot continue from (a dead MCP server)."""

    content: str
    error: str | None = None
    traceback: str = ""
    fatal: bool = False


@dataclass
class Tool:
    """A callable tool with its OpenAI-style function schema.

    ``fn`` is called with the validated keyword arguments (plus ``rollout=`` when
    ``needs_rollout``); sync or async; its return value is turned into text."""

    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object
    fn: Callable[..., Any] | Callable[..., Awaitable[Any]]
    timeout: float | None = None  # seconds; None = the environment's default
    needs_rollout: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    def schema(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

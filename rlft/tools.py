"""Tools the model may call: ``@tool`` turns a typed, documented function into a schema, and
``execute_tool_call`` runs one parsed call so that every failure becomes a tool message.

- Schema: from the signature through pydantic (str/int/float/bool, Optional, Literal, Enum,
  list/dict, pydantic models, TypedDict (from ``typing_extensions`` on Python < 3.12, a pydantic
  rule); a default makes a parameter optional; no annotation = any value). Descriptions: the
  docstring's prose before its first section, and per-parameter lines in Google (``Args:``),
  NumPy (``Parameters`` + dashes) or reST (``:param x:``) style. A parameter named ``rollout``
  or annotated ``Rollout`` is injected at call time and hidden from the model.
- ``execute_tool_call`` never raises for a tool's problem (unknown name, undecodable or invalid
  arguments, exception, timeout, unprintable result): the ``ToolResult`` tells the model what
  went wrong and carries ``error``/``traceback`` for the run store.

Left out on purpose: retries; isolation (tools run in this process with its rights: untrusted
code belongs in a sandbox or subprocess); killing a sync tool that timed out (impossible for a
thread: it runs on in the background, daemon so it never blocks exit, and its result is
dropped); timing out an async tool that blocks the event loop (``time.sleep`` in ``async def``);
return-value schemas; OpenAI "strict" mode; ``*args``/``**kwargs``/positional-only parameters.
Recording errors on the rollout and counting calls is ``rlft.env``'s job; MCP servers become
``Tool`` values in ``rlft.mcp``. Type hints, pydantic's schema made flat, and docstring parsing
live in ``rlft.tool_schema`` (this module puts them together in ``Tool.from_function``).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import json
import threading
import time
import traceback as _tb
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic_core import to_jsonable_python

from rlft.tool_schema import clean_schema, is_rollout_param, parse_docstring, type_hints
from rlft.types import Rollout, ToolCall


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
    ``needs_rollout``); sync or async; its return value is turned into text.
    ``arguments_model`` validates the arguments before the call; a ``Tool`` built by hand
    (e.g. from an MCP server's schema) may leave it ``None`` and validate on its own side."""

    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object
    fn: Callable[..., Any] | Callable[..., Awaitable[Any]]
    timeout: float | None = None  # seconds; None = the environment's default
    needs_rollout: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    rollout_param: str = "rollout"  # keyword the rollout is passed as, when needs_rollout
    arguments_model: type[BaseModel] | None = field(default=None, repr=False, compare=False)

    def schema(self) -> dict[str, Any]:
        fn = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": fn}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped function directly (so a decorated tool stays usable in user tests)."""
        return self.fn(*args, **kwargs)

    def validate(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments for ``fn``; raises ``pydantic.ValidationError`` when invalid."""
        if self.arguments_model is None:
            return dict(arguments)
        validated = self.arguments_model.model_validate(arguments)
        # Fields have internal names and the parameter name as alias (see from_function).
        return {f.alias or key: getattr(validated, key) for key, f in type(validated).model_fields.items()}

    @classmethod
    def from_function(
        cls, fn: Callable[..., Any], *, name: str | None = None, description: str | None = None,
        timeout: float | None = None,
    ) -> Tool:
        """Build a tool from a plain sync or async function (or a bound method)."""
        tool_name = name or getattr(fn, "__name__", None)
        if not tool_name:
            raise TypeError(f"{fn!r} has no __name__: pass name=")
        documented = fn.func if isinstance(fn, functools.partial) else fn  # its doc and hints, not partial's
        doc_description, param_docs = parse_docstring(getattr(documented, "__doc__", None))
        hints = type_hints(documented)
        fields: dict[str, Any] = {}
        rollout_param = None
        for i, p in enumerate(inspect.signature(fn).parameters.values()):
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
                raise TypeError(f"tool {tool_name!r}: parameter {p.name!r} must be a plain named parameter "
                                "(the model calls tools with a JSON object of named arguments)")
            ann = hints.get(p.name, p.annotation)
            if is_rollout_param(p.name, ann):
                if rollout_param is not None:
                    raise TypeError(f"tool {tool_name!r}: two rollout parameters ({rollout_param!r}, {p.name!r})")
                rollout_param = p.name
                continue
            if isinstance(ann, str):
                raise TypeError(f"tool {tool_name!r}: cannot resolve the annotation {ann!r} of {p.name!r} "
                                "(define the type at module level)")
            extra = {"description": param_docs[p.name]} if p.name in param_docs else {}
            default = ... if p.default is p.empty else p.default
            # Internal field names + alias: a parameter may be called `json`, `copy`, `model_x`...
            # which would shadow BaseModel attributes as field names.
            fields[f"arg{i}"] = (Any if ann is p.empty else ann, Field(default, alias=p.name, **extra))
        try:
            model = create_model(f"{tool_name}_arguments", __config__=ConfigDict(extra="forbid"), **fields)
            parameters = clean_schema(model.model_json_schema(by_alias=True))
        except Exception as exc:  # PydanticUserError, PydanticSchemaGenerationError, ...
            raise TypeError(f"tool {tool_name!r}: cannot build a JSON schema from its signature: {exc}") from exc
        return cls(tool_name, description or doc_description or tool_name, parameters, fn, timeout=timeout,
                   needs_rollout=rollout_param is not None, rollout_param=rollout_param or "rollout",
                   arguments_model=model)


def tool(fn: Callable[..., Any] | None = None, *, name: str | None = None, description: str | None = None,
         timeout: float | None = None) -> Any:
    """Decorator: ``@tool`` or ``@tool(name=..., description=..., timeout=...)``; returns a ``Tool``."""
    def wrap(f: Callable[..., Any]) -> Tool:
        return Tool.from_function(f, name=name, description=description, timeout=timeout)
    return wrap(fn) if fn is not None else wrap


def tool_schemas(tools: Mapping[str, Tool] | Iterable[Tool]) -> list[dict[str, Any]]:
    """OpenAI-style ``{"type": "function", "function": {...}}`` entries, for the chat template."""
    return [t.schema() for t in (tools.values() if isinstance(tools, Mapping) else tools)]


# -- execution -------------------------------------------------------------------------------

class _ToolTimeout(Exception):
    """Our own timeout, distinct from a TimeoutError the tool itself raises."""


async def execute_tool_call(
    tools: Mapping[str, Tool], call: ToolCall, *, rollout: Rollout | None = None,
    timeout: float | None = 30.0, max_output_chars: int | None = 4000,
) -> ToolResult:
    """Run one parsed tool call. Never raises for a tool's problem: every failure becomes a
    ``ToolResult`` whose content tells the model what went wrong (cancellation still propagates).

    ``tool.timeout`` overrides ``timeout`` (None = no limit). Sync tools run in their own daemon
    thread so the event loop keeps going; on timeout the caller gets its answer on time but the
    thread cannot be killed and finishes in the background (its result is dropped)."""

    def result(content: str, error: str | None = None, tb: str = "", fatal: bool = False) -> ToolResult:
        if max_output_chars is not None and len(content) > max_output_chars:
            content = content[:max_output_chars] + f"\n...[truncated {len(content) - max_output_chars} chars]"
        return ToolResult(content, error, tb, fatal)

    t = tools.get(call.name)
    if t is None:
        available = ", ".join(sorted(tools)) or "(none)"
        return result(f"Error: unknown tool {call.name!r}. Available tools: {available}.",
                      error=f"unknown tool: {call.name}")
    if call.error:
        return result(f"Error: the arguments of the call to {call.name!r} could not be decoded: {call.error}. "
                      "Send the arguments as one JSON object.", error=f"malformed call: {call.error}"[:200])
    if not isinstance(call.arguments, dict):
        return result(f"Error: the arguments of {call.name!r} must be a JSON object, got "
                      f"{type(call.arguments).__name__}.", error="arguments not an object")
    try:
        kwargs = t.validate(call.arguments)
    except ValidationError as exc:
        bad = sorted({".".join(map(str, e["loc"])) or "(arguments)" for e in exc.errors()})
        return result(_validation_message(t, exc), error=f"invalid arguments: {', '.join(bad)}"[:200])
    if t.needs_rollout:
        kwargs[t.rollout_param] = rollout
    limit = t.timeout if t.timeout is not None else timeout
    try:
        value = await _run(t, kwargs, limit)
        text = _to_text(value)
    except _ToolTimeout:
        return result(f"Error: tool {t.name!r} timed out after {limit:g} s.", error="timeout")
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - a tool's failure (sys.exit too) must not end the run
        exc = exc.__cause__ if isinstance(exc, _ToolExit) else exc
        msg = f"{type(exc).__name__}: {exc}"
        tb = "".join(_tb.format_exception(type(exc), exc, exc.__traceback__))
        return result(f"Error: {msg}", error=msg[:200], tb=tb, fatal=isinstance(exc, FatalToolError))
    return result(text)


def _validation_message(t: Tool, exc: ValidationError) -> str:
    props = t.parameters.get("properties", {})
    lines = [f"Error: invalid arguments for tool {t.name!r}:"]
    for e in exc.errors(include_url=False):
        where = ".".join(map(str, e["loc"])) or "(arguments)"
        if e["type"] == "missing" and len(e["loc"]) == 1:  # say what to send: the property's schema
            lines.append(f"- {where}: missing required argument, expected {json.dumps(props.get(where, {}))}")
        elif e["type"] == "extra_forbidden" and len(e["loc"]) == 1:
            lines.append(f"- {where}: unexpected argument (this tool takes: {', '.join(props) or 'nothing'})")
        else:
            got = repr(e["input"])
            lines.append(f"- {where}: {e['msg']} (got {got[:80] + '...' if len(got) > 80 else got})")
    return "\n".join(lines)


class _ToolExit(Exception):
    """Carries a SystemExit out of an async tool's Task: escaping a Task, SystemExit is re-raised
    by the event loop itself and would end the whole run."""


async def _contain_exit(coro: Awaitable[Any]) -> Any:
    try:
        return await coro
    except SystemExit as exc:
        raise _ToolExit() from exc


async def _run(t: Tool, kwargs: dict[str, Any], limit: float | None) -> Any:
    start = time.monotonic()
    fn = t.fn
    is_async = inspect.iscoroutinefunction(fn) or (
        not inspect.isroutine(fn) and inspect.iscoroutinefunction(type(fn).__call__))  # an object with async __call__
    if is_async:
        value = await _wait(asyncio.ensure_future(_contain_exit(fn(**kwargs))), limit)
    else:
        value = await _wait(_in_daemon_thread(fn, kwargs, t.name), limit)
    if inspect.isawaitable(value):  # a sync callable that returned a coroutine (lambda, wrapper)
        remaining = None if limit is None else max(0.0, limit - (time.monotonic() - start))
        value = await _wait(asyncio.ensure_future(_contain_exit(value)), remaining)
    return value


async def _wait(fut: asyncio.Future[Any], limit: float | None) -> Any:
    # asyncio.wait rather than wait_for: wait_for cannot tell our timeout from a TimeoutError
    # raised by the tool, and it waits for the cancelled task to finish (a tool that swallows
    # cancellation would then overrun its limit).
    try:
        done, _ = await asyncio.wait({fut}, timeout=limit)
    except asyncio.CancelledError:
        fut.cancel()  # the rollout was cancelled: don't leave the tool running
        raise
    if not done:
        fut.cancel()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # no "never retrieved" noise
        raise _ToolTimeout
    return fut.result()


def _in_daemon_thread(fn: Callable[..., Any], kwargs: dict[str, Any], name: str) -> asyncio.Future[Any]:
    """Run a sync tool in a fresh daemon thread. Not asyncio.to_thread: its default executor is
    joined by asyncio.run at shutdown (one hung tool would keep the program from exiting) and
    has min(32, cpus + 4) workers, which a few hung tools would use up for every other tool."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()
    ctx = contextvars.copy_context()  # as to_thread does: contextvars reach the tool

    def settle(ok: bool, value: Any) -> None:
        if not fut.done():  # cancelled on timeout: drop the late result
            fut.set_result(value) if ok else fut.set_exception(value)

    def target() -> None:
        try:
            ok, value = True, ctx.run(fn, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's loop, which re-raises it there
            ok, value = False, exc
        try:
            loop.call_soon_threadsafe(settle, ok, value)
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting for this result any more

    threading.Thread(target=target, name=f"rlft-tool-{name}", daemon=True).start()
    return fut


def _to_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    try:  # dicts, lists, numbers; dataclasses, models, enums and datetimes nested inside them
        return json.dumps(value, ensure_ascii=False, default=to_jsonable_python)
    except (TypeError, ValueError):
        return str(value)


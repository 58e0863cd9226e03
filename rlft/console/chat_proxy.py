"""The chat tab's server side: a proxy to an OpenAI-compatible server (``rlft serve``) that runs
the run's environment, through the same multi-turn loop as training.

``models`` lists ``<serve-url>/v1/models`` and picks a default for a run: its
``ft:<base>:<run>:latest`` checkpoint, else its newest ``ft:<base>:<run>:<step>``, else the first
model. ``open_stream`` forwards a chat request with ``stream: true`` to
``<serve-url>/v1/chat/completions`` and relays the SSE events as they arrive, so the browser
sees tokens as they are sampled. Upstream failures of the first request become
:class:`ChatError` with a status and a message that says what to do (the server is not running,
the model is unknown, ...); later failures become an SSE ``{"error": {...}}`` event.

With the run's :class:`~rlft.env.Environment` (``EnvCache``: loaded from the run's config ``env``
with :func:`rlft.loader.load_environment`, once per run) a chat is an episode of that
environment (``env.episode``, starting from the request's messages, with its system prompt when
the conversation has none), run by the loop of :mod:`rlft.episode` with this module's turn
source: each assistant turn is one streamed request, the tool schemas sent with it. So the chat
does what a rollout does: ``setup``/``teardown``, MCP servers (shared ones per request, since
the console holds no session), ``step`` (the tools, or a custom one), ``max_turns``,
``max_tool_calls``, ``rollout_timeout``. Its own events are ``data: {"rlft": {"type": ...}}``
lines mixed with the relayed chunks: ``env`` (loaded or not, and why), ``tool_call``,
``tool_result``, ``turn`` (a new assistant turn starts) and ``done`` (the messages to append to
the history, and why it stopped early, if it did), then ``data: [DONE]``. Without a run the
stream is relayed untouched.

Left out: rewards; token budgets and seeds beyond what the request sets (a streamed reply
reports no usage). A custom ``step`` sees an empty ``example`` (a chat has no dataset row). An
environment that cannot be loaded (its file moved, an import fails) means plain chat, and the
``env`` event says so. Loading the environment runs the user's module in the console process
(the trainer and torch are never imported by the console itself).

Why one module: the model list, the streamed relay and the episode's turn source share one
upstream client and one SSE event format; split, that format would be spread over files.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from rlft.engines.base import SamplingParams
    from rlft.env import Environment
    from rlft.episode import Episode, Turn
    from rlft.types import Rollout

ALLOWED_FIELDS = {"model", "messages", "temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens",
                  "stop", "seed", "tools", "tool_choice"}
CONNECT_TIMEOUT = 5.0


class ChatError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def parse_ft_name(name: str) -> tuple[str, str, str] | None:
    """``ft:<base>:<run>:<step|latest>`` -> (base, run, step); None for other names."""
    if not name.startswith("ft:"):
        return None
    parts = name[3:].rsplit(":", 2)
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 else None


def default_model(names: list[str], run_id: str | None) -> str | None:
    if not names:
        return None
    if run_id:
        mine = [(p[2], n) for n in names if (p := parse_ft_name(n)) and p[1] == run_id]
        for step, n in mine:
            if step == "latest":
                return n
        numbered = [(int(s), n) for s, n in mine if s.isdigit()]
        if numbered:
            return max(numbered)[1]
    return names[0]


class ChatProxy:
    """Talks to one OpenAI-compatible server; ``api_key`` is sent as a bearer token if given."""

    def __init__(self, serve_url: str, api_key: str | None = None):
        self.serve_url = serve_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _hint(self) -> str:
        return (f"cannot reach the model server at {self.serve_url}: start one with "
                f"`rlft serve --runs-dir <runs>` (or pass --serve-url to the console)")

    async def models(self, run_id: str | None = None) -> dict[str, Any]:
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=CONNECT_TIMEOUT)) as client:
                resp = await client.get(f"{self.serve_url}/v1/models", headers=self.headers)
        except httpx.HTTPError as e:
            raise ChatError(502, f"{self._hint()} ({type(e).__name__})") from e
        if resp.status_code != 200:
            raise ChatError(502, f"{self.serve_url}/v1/models answered {resp.status_code}: {_error_text(resp.content)}")
        names = [m.get("id") for m in (resp.json().get("data") or []) if isinstance(m, dict) and m.get("id")]
        if run_id:  # this run's checkpoints first, newest first; then everything else
            def order(n: str) -> tuple[int, int]:
                p = parse_ft_name(n)
                if not p or p[1] != run_id:
                    return (2, 0)
                return (0, 0) if p[2] == "latest" else (1, -int(p[2]) if p[2].isdigit() else 0)
            names = sorted(names, key=order)
        return {"serve_url": self.serve_url, "models": names, "default": default_model(names, run_id)}

    async def _send(self, client: httpx.AsyncClient, payload: dict[str, Any]) -> httpx.Response:
        """POST one streaming chat request; failures raise ChatError (the response is open)."""
        try:
            req = client.build_request("POST", f"{self.serve_url}/v1/chat/completions", json=payload,
                                       headers=self.headers)
            resp = await client.send(req, stream=True)
        except httpx.HTTPError as e:
            raise ChatError(502, f"{self._hint()} ({type(e).__name__})") from e
        if resp.status_code != 200:
            content = await resp.aread()
            await resp.aclose()
            raise ChatError(resp.status_code if 400 <= resp.status_code < 500 else 502,
                            f"the model server answered {resp.status_code}: {_error_text(content)}")
        return resp

    async def open_stream(self, body: dict[str, Any], env: Environment | None = None,
                          env_info: dict[str, Any] | None = None) -> AsyncIterator[bytes]:
        """Start the upstream request (errors raise here, before any byte is sent, unless the
        environment has MCP servers to start first) and return an iterator over the SSE bytes
        that closes the connection when done.

        ``env``: the run's Environment (its tools are run, see the module docstring);
        ``env_info``: the ``env`` event to send first (None: no run was named, plain relay)."""
        payload = {k: v for k, v in body.items() if k in ALLOWED_FIELDS}
        if not payload.get("model"):
            raise ChatError(400, "pick a model")
        if not isinstance(payload.get("messages"), list) or not payload["messages"]:
            raise ChatError(400, "messages must be a non-empty list")
        payload["stream"] = True
        client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT))
        if env is None and env_info is None:  # plain relay
            try:
                resp = await self._send(client, payload)
            except BaseException:
                await client.aclose()
                raise

            async def relay() -> AsyncIterator[bytes]:
                try:
                    async for chunk in resp.aiter_raw():
                        yield chunk
                except httpx.HTTPError as e:
                    yield _sse({"error": {"message": f"stream broken: {type(e).__name__}"}})
                finally:
                    await resp.aclose()
                    await client.aclose()

            return relay()

        messages = list(payload["messages"])
        if env is not None and env.system_prompt and not any(
                isinstance(m, dict) and m.get("role") == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": env.system_prompt})
            env_info = dict(env_info or {}, system_prompt_added=True)
        payload["messages"] = messages
        first: httpx.Response | None = None
        if env is None or not env.mcp_servers:  # the tools are known without starting a server
            if env is not None and env.function_tools and "tools" not in payload:
                from rlft.tools import tool_schemas

                payload["tools"] = tool_schemas(env.function_tools)
            try:
                first = await self._send(client, payload)
            except BaseException:
                await client.aclose()
                raise
        return self._converse(client, payload, env, env_info or {}, first)

    async def _converse(self, client: httpx.AsyncClient, payload: dict[str, Any], env: Environment | None,
                        env_info: dict[str, Any], first: httpx.Response | None) -> AsyncIterator[bytes]:
        """The SSE stream of one chat: with an environment, an episode of it run through the
        training loop (``rlft.episode``) with turns streamed from the server; without one, one
        relayed turn whose tool calls are not run."""
        events: asyncio.Queue[bytes | None] = asyncio.Queue()
        turns = _StreamedTurns(self, client, payload, first, events.put_nowait, run_tools=env is not None)
        try:
            yield _sse({"rlft": {"type": "env", **env_info}})
            first_messages = list(payload["messages"])
            episode = env.episode({}, messages=first_messages) if env is not None else None
            turns.episode = episode
            task = asyncio.ensure_future(episode.run(turns) if episode is not None else _one_turn(turns))
            async with contextlib.aclosing(_relay_while(task, events)) as relayed:
                async for chunk in relayed:
                    yield chunk
            if episode is not None:
                for chunk in _outcome(env, episode, turns, len(first_messages)):
                    yield chunk
            elif (reply := task.result()) is not None:
                stopped = "no environment: tool calls not run" if reply.calls else None
                yield _sse({"rlft": {"type": "done", "messages": [reply.message], "stopped": stopped}})
        except Exception as e:  # noqa: BLE001 - a bug below us: tell the page
            yield _sse({"error": {"message": f"chat with the environment failed: {type(e).__name__}: {e}"}})
        finally:
            await turns.close()
            await client.aclose()
        yield b"data: [DONE]\n\n"


class _StreamedTurns:
    """The console's turn source: each assistant turn is one streaming request to the server,
    its SSE lines relayed (``emit``) as they arrive, and the page told about tool calls and
    results (``rlft`` events). Single-use: it is its own sampler (``open`` returns it).

    The request's own settings (temperature, max_tokens, ...) stand: the loop's per-turn limits
    and seeds are not sent, and a streamed reply carries no usage, so ``sampled_tokens`` is 0."""

    def __init__(self, proxy: ChatProxy, client: httpx.AsyncClient, payload: dict[str, Any],
                 first: httpx.Response | None, emit: Callable[[bytes], None], *, run_tools: bool):
        from rlft.engines.base import SamplingParams

        self.params, self.policy_version = SamplingParams(), 0
        self.proxy, self.client, self.payload, self.emit = proxy, client, payload, emit
        self.response = first  # the first turn's request, sent before streaming began
        self.run_tools = run_tools
        self.episode: Episode | None = None  # the episode it serves (its tool results are streamed)
        self.rollout: Rollout | None = None
        self.turns = 0
        self.failure: str | None = None  # why the last request failed, for the page
        self._shown_results = 0

    def open(self, rollout: Rollout, schemas: list[dict] | None) -> _StreamedTurns:
        self.rollout = rollout
        if schemas and "tools" not in self.payload:  # a request's own tools win
            self.payload["tools"] = schemas
        return self

    def room(self) -> int | None:
        return None  # the server enforces the model's context window

    async def next_turn(self, params: SamplingParams) -> Turn:
        from rlft.episode import Turn

        if self.turns:
            self.emit(_sse({"rlft": {"type": "turn", "turn": self.turns + 1}}))
        self.turns += 1
        if self.rollout is not None:
            self.payload["messages"] = list(self.rollout.messages)
        resp, self.response = self.response, None
        if resp is None:
            try:
                resp = await self.proxy._send(self.client, self.payload)
            except ChatError as e:
                self.failure = e.message
                raise
        reply = _Turn()
        try:
            async for line in resp.aiter_lines():
                data = line[5:].strip() if line.startswith("data:") else None
                if data == "[DONE]":
                    continue
                if data:
                    reply.feed(data)
                self.emit((line + "\n").encode())
        except httpx.HTTPError as e:
            self.failure = f"stream broken: {type(e).__name__}"
            raise
        finally:
            await resp.aclose()
        calls = reply.tool_calls()  # names the calls' ids first
        finish = reply.finish or "stop"
        if self.run_tools and finish != "length":
            for c, raw in zip(calls, reply.calls):
                event = {"type": "tool_call", "id": c.id, "name": c.name, "arguments": raw["arguments"]}
                self.emit(_sse({"rlft": event}))
        return Turn(reply.message(), calls, finish, 0)

    def extend(self, history: list[dict[str, Any]], answer: list[dict[str, Any]]) -> None:
        self.show_results()

    def show_results(self) -> None:
        """A tool_result event for each call the episode ran since the last ones shown."""
        ran = self.episode.tool_results if self.episode is not None else []
        for call, res in ran[self._shown_results:]:
            self.emit(_sse({"rlft": {"type": "tool_result", "id": call.id, "name": call.name,
                                     "content": res.content, "error": res.error}}))
        self._shown_results = len(ran)

    async def close(self) -> None:
        if self.response is not None:  # never read (the episode failed before its first turn)
            await self.response.aclose()
            self.response = None


async def _one_turn(turns: _StreamedTurns) -> Turn | None:
    """One relayed turn (no environment); None when it failed (the page was told why)."""
    try:
        return await turns.next_turn(turns.params)
    except (ChatError, httpx.HTTPError):
        turns.emit(_sse({"error": {"message": turns.failure}}))
        return None


async def _relay_while(task: asyncio.Future[Any], events: asyncio.Queue[bytes | None]) -> AsyncIterator[bytes]:
    """What ``task`` emits, as it emits it, until it is done; cancelled if the page goes away."""
    task.add_done_callback(lambda _: events.put_nowait(None))
    try:
        while (chunk := await events.get()) is not None:
            yield chunk
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _outcome(env: Environment, episode: Episode, turns: _StreamedTurns, n_first: int) -> list[bytes]:
    """The events that close an episode: the results not shown yet (a fatal one ends the loop
    before the answer), then ``done`` with the messages to append, or the error that ended it."""
    from rlft.types import Termination

    ro = episode.rollout
    turns.show_results()
    failed = {Termination.SETUP_ERROR: "setup", Termination.ERROR: "environment", Termination.MODEL_ERROR: "model"}
    out = []
    if ro.termination in failed:
        where = failed[ro.termination]
        err = next((e for e in reversed(ro.errors) if e.where == where), None)
        message = turns.failure if ro.termination == Termination.MODEL_ERROR and turns.failure else (
            f"chat with the environment failed: {err.message if err else ro.termination.value}")
        out.append(_sse({"error": {"message": message}}))
    else:
        stopped = {Termination.MAX_TURNS: f"max_turns ({env.max_turns}) reached",
                   Termination.MAX_TOOL_CALLS: f"max_tool_calls ({env.max_tool_calls}) reached",
                   Termination.TOOL_ERROR: "a tool's backend failed",
                   Termination.TIMEOUT: f"rollout_timeout ({env.rollout_timeout}s) reached"}.get(ro.termination)
        out.append(_sse({"rlft": {"type": "done", "messages": ro.messages[n_first:], "stopped": stopped}}))
    for err in ro.errors:
        if err.where == "teardown":
            out.append(_sse({"error": {"message": f"chat with the environment failed: {err.message}"}}))
    return out


class _Turn:
    """One streamed assistant reply: its text, its tool calls (by delta index), its finish reason."""

    def __init__(self) -> None:
        self.content = ""
        self.calls: list[dict[str, str]] = []
        self.finish: str | None = None

    def feed(self, data: str) -> None:
        try:
            ev = json.loads(data)
            ch = (ev.get("choices") or [None])[0]
        except (ValueError, AttributeError, TypeError):
            return
        if not isinstance(ch, dict):
            return
        delta = ch.get("delta") or {}
        if isinstance(delta.get("content"), str):
            self.content += delta["content"]
        for tc in delta.get("tool_calls") or []:
            if not isinstance(tc, dict):
                continue
            i = tc.get("index")
            i = i if isinstance(i, int) and 0 <= i < 64 else len(self.calls)
            while len(self.calls) <= i:
                self.calls.append({"id": "", "name": "", "arguments": ""})
            fn = tc.get("function") or {}
            call = self.calls[i]
            call["id"] = tc.get("id") or call["id"]
            call["name"] += fn.get("name") or ""
            args = fn.get("arguments")
            call["arguments"] += args if isinstance(args, str) else (json.dumps(args) if args else "")
        if ch.get("finish_reason"):
            self.finish = ch["finish_reason"]

    def tool_calls(self) -> list[Any]:
        from rlft.types import ToolCall

        out = []
        for k, c in enumerate(self.calls):
            c["id"] = c["id"] or f"call_{secrets.token_hex(4)}_{k}"
            error = None
            try:
                args = json.loads(c["arguments"]) if c["arguments"].strip() else {}
            except ValueError as e:
                args, error = {}, str(e)
            out.append(ToolCall(name=c["name"], arguments=args, id=c["id"], error=error))
        return out

    def message(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.calls:
            msg["tool_calls"] = [{"id": c["id"], "type": "function",
                                  "function": {"name": c["name"], "arguments": c["arguments"]}} for c in self.calls]
        return msg


class EnvCache:
    """The environments of runs, loaded from their config's ``env`` on first use and kept.

    ``get(run_id, config)`` -> (environment or None, the ``env`` event's fields). A failed load
    is not kept (the file may come back)."""

    def __init__(self) -> None:
        self.envs: dict[str, Any] = {}
        self.lock = threading.Lock()

    def get(self, run_id: str, config: dict[str, Any] | None) -> tuple[Any, dict[str, Any]]:
        spec = (config or {}).get("env")
        with self.lock:
            env = self.envs.get(run_id)
            if env is None:
                if not spec or not isinstance(spec, str):
                    return None, {"loaded": False, "run": run_id,
                                  "message": "the run's config names no environment: plain chat, tools are not run"}
                try:
                    from rlft.loader import load_environment

                    env = load_environment(spec)[0]
                except BaseException as e:
                    if isinstance(e, (KeyboardInterrupt, GeneratorExit)):
                        raise
                    return None, {"loaded": False, "run": run_id, "spec": spec,
                                  "message": f"could not load the run's environment {spec!r} "
                                             f"({type(e).__name__}: {str(e)[:300]}): plain chat, tools are not run"}
                self.envs[run_id] = env
        names = sorted(env.function_tools) + [f"{type(s).__name__} (MCP)" for s in env.mcp_servers]
        tools = f"tools {', '.join(names)} run here" if names else "no tools"
        return env, {"loaded": True, "run": run_id, "spec": spec, "name": env.name, "tools": names,
                     "max_turns": env.max_turns,
                     "message": f"environment {env.name!r}: {tools}, up to {env.max_turns} turns"}


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def _error_text(content: bytes) -> str:
    try:
        data = json.loads(content)
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:500]
        if isinstance(data, dict) and data.get("detail"):
            return str(data["detail"])[:500]
    except ValueError:
        pass
    return content.decode("utf-8", "replace")[:500]

"""The Environment (a value) and the async multi-turn rollout loop.

``Environment(system_prompt=..., tools=[search], rewards=[correct, Reward(concise, weight=0.2)])``
is all most tasks need. One rollout: render the chat, sample an assistant turn, parse its tool
calls, answer them (``step``), append the answer as template-rendered tokens, repeat until the
model answers without a tool call or a limit is hit. Every rollout ends with a ``Termination``.

Custom multi-turn control: subclass and override ``step(rollout, message, calls)``, which
returns the messages that answer an assistant turn (tool results, a simulated user's reply) or
``None`` to end the rollout. The default runs the tool calls and ends on a plain answer.

Per-rollout isolation: ``setup(rollout)`` / ``teardown(rollout)`` (sync or async) run around
each rollout, e.g. to copy a SQLite database into ``rollout.state``; tools see the rollout by
declaring a ``rollout`` parameter. MCP servers with ``isolated=True`` are started per rollout,
others once per ``session()``.

Failure isolation: an exception in setup, the engine, a tool or ``step`` ends only that rollout
(with its termination reason and the traceback recorded); sibling rollouts and the step go on.
Left out here: training, storage, and reward scoring internals (``rlft.rewards``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from rlft.renderer import Renderer
from rlft.engines.base import Engine, SamplingParams
from rlft.rewards import Reward, as_reward, score_group
from rlft.tools import Tool, execute_tool_call, tool
from rlft.types import Group, Message, Rollout, RolloutError, Termination, ToolCall


@dataclass
class Sampler:
    """What a rollout samples with: an engine, the renderer for its tokenizer, sampling params
    and the model's context limit."""

    engine: Engine
    renderer: Renderer
    params: SamplingParams = field(default_factory=SamplingParams)
    max_seq_len: int = 4096
    policy_version: int = 0


async def _maybe_await(fn: Callable[..., Any], *args: Any) -> Any:
    result = fn(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


@dataclass
class Environment:
    system_prompt: str | None = None  # prepended to every conversation
    tools: list[Any] = field(default_factory=list)  # @tool functions, plain typed functions, MCPServer(...)
    rewards: list[Any] = field(default_factory=list)  # functions of a Rollout, or Reward(fn, weight=...)
    max_turns: int = 4  # assistant turns per rollout
    max_tool_calls: int = 8  # tool calls per rollout; more ends it with max_tool_calls
    max_tokens: int = 512  # sampled tokens per rollout, all turns together
    max_tokens_per_turn: int | None = None  # per assistant turn; None = what is left of max_tokens
    setup: Callable[[Rollout], Any] | None = None  # per-rollout, before the first turn
    teardown: Callable[[Rollout], Any] | None = None  # per-rollout, always run after setup
    tool_timeout: float = 30.0  # seconds per tool call (a tool's own timeout wins)
    reward_timeout: float = 60.0  # seconds per reward call
    rollout_timeout: float | None = None  # wall-clock seconds for a whole rollout
    max_tool_output_chars: int = 4000  # longer tool outputs are truncated, with a marker
    name: str = "environment"

    def __post_init__(self):
        self.tools = list(self.tools)
        self.rewards = [as_reward(r) for r in self.rewards]
        self._static_tools: dict[str, Tool] = {}
        self._servers: list[Any] = []  # MCP servers (anything with .connect() and .isolated)
        for t in self.tools:
            if isinstance(t, Tool):
                self._add_tool(self._static_tools, t)
            elif hasattr(t, "connect") and hasattr(t, "isolated"):
                self._servers.append(t)
            elif callable(t):
                self._add_tool(self._static_tools, tool(t))
            else:
                raise TypeError(f"Environment tools: {t!r} is neither a function, a Tool nor an MCP server")
        self._shared_tools: dict[str, Tool] = {}
        self._session_depth = 0
        self._session_stack: contextlib.AsyncExitStack | None = None

    @staticmethod
    def _add_tool(into: dict[str, Tool], t: Tool) -> None:
        if t.name in into:
            raise ValueError(f"two tools are named {t.name!r}; tool names must be unique")
        into[t.name] = t

    # -- shared resources --------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def session(self):
        """Open the shared MCP servers for the duration (re-entrant). Rollouts outside a session
        open one for themselves."""
        if self._session_depth == 0:
            stack = contextlib.AsyncExitStack()
            await stack.__aenter__()
            try:
                shared: dict[str, Tool] = dict(self._static_tools)
                for server in self._servers:
                    if not server.isolated:
                        conn = await stack.enter_async_context(server.connect())
                        for t in conn.tools:
                            self._add_tool(shared, t)
            except BaseException:
                await stack.aclose()
                raise
            self._shared_tools, self._session_stack = shared, stack
        self._session_depth += 1
        try:
            yield self
        finally:
            self._session_depth -= 1
            if self._session_depth == 0 and self._session_stack is not None:
                stack, self._session_stack = self._session_stack, None
                self._shared_tools = {}
                await stack.aclose()

    async def open_tools(self, stack: contextlib.AsyncExitStack) -> dict[str, Tool]:
        """The tools one rollout (or one chat) sees: shared ones, plus its own connections to
        isolated MCP servers, closed with ``stack``. Opens a session first when none is open."""
        if self._session_depth == 0:  # called outside a session: open one just for this caller
            await stack.enter_async_context(self.session())
        tools = dict(self._shared_tools)
        for server in self._servers:
            if server.isolated:
                conn = await stack.enter_async_context(server.connect())
                for t in conn.tools:
                    self._add_tool(tools, t)
        return tools

    def tool_schemas(self, tools: dict[str, Tool]) -> list[dict]:
        return [t.schema() for t in tools.values()]

    # -- the rollout -------------------------------------------------------------------------
    def initial_messages(self, example: dict[str, Any]) -> list[Message]:
        from rlft.data import initial_messages

        return initial_messages(example, self.system_prompt)

    async def step(self, rollout: Rollout, message: Message, calls: list[ToolCall]) -> list[Message] | None:
        """Answer one assistant turn: the messages to append, or None to end the rollout.

        Override for custom control (a simulated user, a game): return
        ``[{"role": "user", "content": ...}]`` to continue, ``None`` to stop; call
        ``await self.run_tools(rollout, calls)`` to keep the default tool handling."""
        if not calls:
            return None
        return await self.run_tools(rollout, calls)

    async def run_tools(self, rollout: Rollout, calls: list[ToolCall]) -> list[Message] | None:
        """Run the calls concurrently; each becomes a tool message, failures included."""
        if rollout.tool_calls + len(calls) > self.max_tool_calls:
            rollout.termination = Termination.MAX_TOOL_CALLS
            return None
        rollout.tool_calls += len(calls)
        tools = rollout.state["_tools"]
        results = await asyncio.gather(*(
            execute_tool_call(tools, c, rollout=rollout, timeout=self.tool_timeout, max_output_chars=self.max_tool_output_chars)
            for c in calls))
        out = []
        for call, res in zip(calls, results):
            if res.error:
                rollout.errors.append(_tool_error(call, res))
            if res.fatal:
                rollout.termination = Termination.TOOL_ERROR
                return None
            msg: Message = {"role": "tool", "content": res.content, "tool_call_id": call.id}
            if call.name:
                msg["name"] = call.name
            out.append(msg)
        return out

    async def rollout(self, example: dict[str, Any], sampler: Sampler, *, example_id: int = 0,
                      group_index: int = 0) -> Rollout:
        """Run one rollout to its end. Never raises for the rollout's own failures."""
        ro = Rollout(example=example, example_id=example_id, group_index=group_index,
                     policy_version=sampler.policy_version)
        t0 = time.perf_counter()
        async with contextlib.AsyncExitStack() as stack:
            try:
                ro.state["_tools"] = await self.open_tools(stack)
                ro.messages = self.initial_messages(example)
                if self.setup is not None:
                    await _maybe_await(self.setup, ro)
            except Exception as e:  # noqa: BLE001
                ro.record_error("setup", e)
                ro.termination = Termination.SETUP_ERROR
            else:
                try:
                    if self.rollout_timeout:
                        await asyncio.wait_for(self._loop(ro, sampler), self.rollout_timeout)
                    else:
                        await self._loop(ro, sampler)
                except asyncio.TimeoutError:
                    ro.termination = Termination.TIMEOUT
                    ro.errors.append(_err("rollout", f"rollout exceeded rollout_timeout={self.rollout_timeout}s"))
                except Exception as e:  # noqa: BLE001 - a custom step() that raised
                    ro.record_error("environment", e)
                    ro.termination = Termination.ERROR
                finally:
                    if self.teardown is not None:
                        try:
                            await _maybe_await(self.teardown, ro)
                        except Exception as e:  # noqa: BLE001
                            ro.record_error("teardown", e)
            finally:
                ro.state.pop("_tools", None)
        ro.metrics["time/rollout"] = time.perf_counter() - t0
        return ro

    async def _loop(self, ro: Rollout, sampler: Sampler) -> None:
        if hasattr(sampler.engine, "chat"):  # an external chat model: messages, no tokens
            return await self._chat_loop(ro, sampler)
        renderer, tools = sampler.renderer, ro.state["_tools"]
        schemas = self.tool_schemas(tools) or None
        ro.prompt_ids = renderer.render_prompt(ro.messages, schemas)
        ro.prompt_text = renderer.decode(ro.prompt_ids)  # what the model saw, for transcripts
        budget = self.max_tokens
        while True:
            if ro.turns >= self.max_turns:
                ro.termination = Termination.MAX_TURNS
                return
            room = sampler.max_seq_len - len(ro.prompt_ids) - len(ro.completion_ids)
            if room <= 0 or budget <= 0:
                ro.termination = Termination.CONTEXT_EXCEEDED if room <= 0 else Termination.LENGTH
                return
            turn_limit = min(budget, self.max_tokens_per_turn or budget)
            n = min(turn_limit, room)
            params = replace(sampler.params, max_new_tokens=n)
            if params.seed is not None:  # distinct, reproducible randomness per rollout and turn
                params.seed = derive_seed(params.seed, ro.example_id, ro.group_index, ro.turns)
            try:
                sample = await sampler.engine.generate(ro.prompt_ids + ro.completion_ids, params)
            except Exception as e:  # noqa: BLE001
                ro.record_error("model", e)
                ro.termination = Termination.MODEL_ERROR
                return
            ro.completion_ids += sample.tokens
            ro.logprobs += sample.logprobs
            ro.mask += [1] * len(sample.tokens)
            ro.policy_version = sample.policy_version
            ro.turns += 1
            budget -= len(sample.tokens)
            message, calls = renderer.assistant_message(renderer.decode(sample.tokens))
            ro.messages.append(message)
            if sample.finish_reason == "length":
                ro.termination = Termination.CONTEXT_EXCEEDED if room < turn_limit else Termination.LENGTH
                return
            history = list(ro.messages)
            new = await self.step(ro, message, calls)
            if new is None or ro.termination is not None:
                ro.termination = ro.termination or Termination.FINISHED
                return
            ro.messages.extend(new)
            ended_with_eot = bool(sample.tokens) and sample.tokens[-1] in renderer.eos_token_ids
            cont = renderer.continuation_ids(history, new, schemas, ended_with_eot)
            ro.completion_ids += cont
            ro.logprobs += [0.0] * len(cont)
            ro.mask += [0] * len(cont)

    async def _chat_loop(self, ro: Rollout, sampler: Sampler) -> None:
        """The same loop at the message level, for external chat engines (eval only: such
        rollouts carry no token ids, so they cannot be trained on)."""
        schemas = self.tool_schemas(ro.state["_tools"]) or None
        budget = self.max_tokens
        while True:
            if ro.turns >= self.max_turns:
                ro.termination = Termination.MAX_TURNS
                return
            if budget <= 0:
                ro.termination = Termination.LENGTH
                return
            params = replace(sampler.params, max_new_tokens=min(budget, self.max_tokens_per_turn or budget))
            if params.seed is not None:
                params.seed = derive_seed(params.seed, ro.example_id, ro.group_index, ro.turns)
            try:
                reply = await sampler.engine.chat(ro.messages, schemas, params)
            except Exception as e:  # noqa: BLE001
                ro.record_error("model", e)
                ro.termination = Termination.MODEL_ERROR
                return
            ro.turns += 1
            budget -= reply.completion_tokens
            for key, value in (("usage/prompt_tokens", reply.prompt_tokens), ("usage/completion_tokens", reply.completion_tokens),
                               ("usage/requests", 1), ("usage/cost", reply.cost), ("usage/latency", reply.latency)):
                ro.metrics[key] = ro.metrics.get(key, 0.0) + value
            ro.messages.append(reply.message)
            if reply.finish_reason == "length":
                ro.termination = Termination.LENGTH
                return
            new = await self.step(ro, reply.message, reply.calls)
            if new is None or ro.termination is not None:
                ro.termination = ro.termination or Termination.FINISHED
                return
            ro.messages.extend(new)

    async def run_groups(self, examples: list[dict[str, Any]], sampler: Sampler, group_size: int, *,
                         max_concurrency: int = 256, example_ids: list[int] | None = None) -> list[Group]:
        """All rollouts of a step, concurrently (at most ``max_concurrency`` in flight), each
        group scored as soon as its rollouts are done so that scoring overlaps generation."""
        sem = asyncio.Semaphore(max_concurrency)
        ids = example_ids if example_ids is not None else [ex.get("example_id", i) for i, ex in enumerate(examples)]

        async def limited(ex: dict[str, Any], eid: int, g: int) -> Rollout:
            async with sem:
                return await self.rollout(ex, sampler, example_id=eid, group_index=g)

        async def group(ex: dict[str, Any], eid: int) -> Group:
            rollouts = list(await asyncio.gather(*(limited(ex, eid, g) for g in range(group_size))))
            await score_group(rollouts, self.rewards, self.reward_timeout)
            return Group(example=ex, rollouts=rollouts, example_id=eid)

        async with self.session():
            return list(await asyncio.gather(*(group(ex, eid) for ex, eid in zip(examples, ids))))


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts, the same on every platform and Python version."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def _err(where: str, message: str) -> RolloutError:
    return RolloutError(where=where, message=message)


def _tool_error(call: ToolCall, res: Any) -> RolloutError:
    return RolloutError(where=f"tool:{call.name or '?'}", message=res.error or "", traceback=res.traceback or "")


__all__ = ["Environment", "Sampler", "Reward"]

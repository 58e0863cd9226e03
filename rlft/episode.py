"""One rollout's life (``Episode``) and the one multi-turn loop every conversation runs.

An :class:`Episode` is made by ``Environment.episode(example, ...)`` and run once
(``await episode.run(sampler)``; a second run raises). It holds what belongs to that rollout
only: its tools (the session's shared ones plus its own connections to isolated MCP servers),
its :class:`~rlft.types.Rollout` (``state`` is the user's scratch), the tool calls it ran, and
the exit stack that closes them all. ``run`` opens the tools, builds the first messages, runs
``setup``, the loop and ``teardown``, and records every failure on the rollout (never raises
for one): setup, model, environment, timeout, teardown.

The loop asks a *turn source* for the next assistant turn, lets the environment answer it
(``Environment.step``: tool results, a simulated user's reply, or None to stop), and repeats
until done or a limit (``max_turns``, ``max_tokens``, the context window). Seeds are derived per
rollout and turn (``derive_seed(params.seed, example_id, group_index, turn)``). A sampler opens
one turn source per episode:

- :class:`Sampler` (an :class:`~rlft.engines.base.Engine` and its renderer): token level. It
  keeps the exact sampled ids, their logprobs and the trained-on mask, and appends the
  environment's answers as template-rendered tokens (``Renderer.continuation_ids``). Training.
- :class:`ChatSampler` (a :class:`~rlft.engines.base.ChatEngine`): message level, with usage and
  cost metrics and no token ids, so its rollouts serve evals only.
- the console's chat proxy streams turns from an OpenAI-compatible server
  (``rlft.console.chat_proxy``).

Left out: the session's shared resources and the default ``step`` (``rlft.env``), rewards
(scored after the episode by ``rlft.rewards``), rendering and parsing (``rlft.renderer``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from rlft.engines.base import ChatEngine, Engine, SamplingParams
from rlft.renderer import Renderer
from rlft.tools import Tool, ToolResult, execute_tool_call, tool_schemas
from rlft.types import Message, Rollout, RolloutError, Termination, ToolCall

if TYPE_CHECKING:
    from rlft.env import Environment


@dataclass
class Turn:
    """One assistant turn as the loop sees it."""

    message: Message  # the canonical assistant message (appended to the conversation)
    calls: list[ToolCall]  # its parsed tool calls (malformed ones carry an error)
    finish_reason: str  # "stop", or "length" when the turn hit its token limit
    sampled_tokens: int  # counted against max_tokens (0 where the source cannot tell)


class TurnSource(Protocol):
    """One episode's supply of assistant turns, opened by a :class:`TurnSampler`."""

    def room(self) -> int | None:
        """Tokens left in the model's context window (None: no window to respect here)."""
        ...

    async def next_turn(self, params: SamplingParams) -> Turn:
        """Sample the next assistant turn of the rollout's messages and record what the rollout
        keeps of it (token ids, usage). Raises when the model fails."""
        ...

    def extend(self, history: list[Message], answer: list[Message]) -> None:
        """The environment answered the last turn with ``answer`` (``history``: the messages up to
        and including that turn), already appended to the rollout's messages."""
        ...


class TurnSampler(Protocol):
    """What rollouts sample with: settings shared by every rollout of a step, one
    :class:`TurnSource` per episode."""

    params: SamplingParams
    policy_version: int

    def open(self, rollout: Rollout, schemas: list[dict] | None) -> TurnSource:
        """The turn source of one episode (``schemas``: the tools offered, None for none)."""
        ...


@dataclass
class Sampler:
    """Token-level sampling: an engine, the renderer for its tokenizer, sampling params and the
    model's context limit. ``params`` and ``policy_version`` may change between steps."""

    engine: Engine
    renderer: Renderer
    params: SamplingParams = field(default_factory=SamplingParams)
    max_seq_len: int = 4096
    policy_version: int = 0

    def open(self, rollout: Rollout, schemas: list[dict] | None) -> TurnSource:
        return _TokenTurns(self, rollout, schemas)


class _TokenTurns:
    """Renders the conversation once, then grows it token by token: sampled ids are kept as
    sampled (never re-tokenized), the environment's answers appended as the template renders
    them, with logprob 0 and mask 0 (not trained on)."""

    def __init__(self, sampler: Sampler, rollout: Rollout, schemas: list[dict] | None):
        self.sampler, self.rollout, self.schemas = sampler, rollout, schemas
        self.ended_with_eot = False
        rollout.prompt_ids = sampler.renderer.render_prompt(rollout.messages, schemas)
        rollout.prompt_text = sampler.renderer.decode(rollout.prompt_ids)  # what the model saw, for transcripts

    def room(self) -> int | None:
        ro = self.rollout
        return self.sampler.max_seq_len - len(ro.prompt_ids) - len(ro.completion_ids)

    async def next_turn(self, params: SamplingParams) -> Turn:
        ro, renderer = self.rollout, self.sampler.renderer
        sample = await self.sampler.engine.generate(ro.prompt_ids + ro.completion_ids, params)
        ro.completion_ids += sample.tokens
        ro.logprobs += sample.logprobs
        ro.mask += [1] * len(sample.tokens)
        ro.policy_version = sample.policy_version
        self.ended_with_eot = bool(sample.tokens) and sample.tokens[-1] in renderer.eos_token_ids
        message, calls = renderer.assistant_message(renderer.decode(sample.tokens))
        return Turn(message, calls, sample.finish_reason, len(sample.tokens))

    def extend(self, history: list[Message], answer: list[Message]) -> None:
        ro = self.rollout
        cont = self.sampler.renderer.continuation_ids(history, answer, self.schemas, self.ended_with_eot)
        ro.completion_ids += cont
        ro.logprobs += [0.0] * len(cont)
        ro.mask += [0] * len(cont)


@dataclass
class ChatSampler:
    """Message-level sampling through an external chat model (``rlft.engines.external_chat``):
    no token ids, so its rollouts are for evals and baselines, never for training."""

    engine: ChatEngine
    params: SamplingParams = field(default_factory=SamplingParams)
    policy_version: int = 0

    def open(self, rollout: Rollout, schemas: list[dict] | None) -> TurnSource:
        return _ChatTurns(self.engine, rollout, schemas)


class _ChatTurns:
    """Sends the conversation as messages; adds each request's usage and cost to the rollout's
    metrics. The messages are the whole record: nothing to append after an answer."""

    def __init__(self, engine: ChatEngine, rollout: Rollout, schemas: list[dict] | None):
        self.engine, self.rollout, self.schemas = engine, rollout, schemas

    def room(self) -> int | None:
        return None  # the server enforces its own context window

    async def next_turn(self, params: SamplingParams) -> Turn:
        ro = self.rollout
        reply = await self.engine.chat(ro.messages, self.schemas, params)
        usage = (("usage/prompt_tokens", reply.prompt_tokens), ("usage/completion_tokens", reply.completion_tokens),
                 ("usage/requests", 1), ("usage/cost", reply.cost), ("usage/latency", reply.latency))
        for key, value in usage:
            ro.metrics[key] = ro.metrics.get(key, 0.0) + value
        return Turn(reply.message, reply.calls, reply.finish_reason, reply.completion_tokens)

    def extend(self, history: list[Message], answer: list[Message]) -> None:
        pass


# The episode running in this task (and the tasks it starts): how ``Environment.run_tools``,
# which is given only the rollout, finds that rollout's tools.
_RUNNING: contextvars.ContextVar[Episode | None] = contextvars.ContextVar("rlft_running_episode", default=None)


class Episode:
    """One rollout, from its first message to its termination; run once.

    ``tools``: the tools this rollout sees (filled while it runs); ``tool_results``: every call
    it ran with its result, in order; ``rollout.state``: the user's per-rollout scratch."""

    def __init__(self, env: Environment, rollout: Rollout, messages: list[Message] | None = None):
        self.env = env
        self.rollout = rollout
        self.tools: dict[str, Tool] = {}
        self.tool_results: list[tuple[ToolCall, ToolResult]] = []
        self._first_messages = messages  # None: the environment's initial_messages(example)
        self._ran = False

    @property
    def state(self) -> dict[str, Any]:
        return self.rollout.state

    @staticmethod
    def of(rollout: Rollout) -> Episode:
        """The running episode of ``rollout`` (for code that is handed only the rollout)."""
        episode = _RUNNING.get()
        if episode is None or episode.rollout is not rollout:
            raise RuntimeError("this rollout has no running episode: tools run only inside Episode.run "
                               "(env.rollout, env.run_groups)")
        return episode

    async def call_tools(self, calls: list[ToolCall]) -> list[ToolResult]:
        """Run the calls concurrently on this episode's tools; failures are results too."""
        env = self.env
        results = await asyncio.gather(*(
            execute_tool_call(self.tools, c, rollout=self.rollout, timeout=env.tool_timeout,
                              max_output_chars=env.max_tool_output_chars)
            for c in calls))
        self.tool_results += zip(calls, results)
        return list(results)

    async def run(self, sampler: TurnSampler) -> Rollout:
        """Run the rollout to its end. Never raises for the rollout's own failures."""
        if self._ran:
            raise RuntimeError("an Episode runs once: ask the environment for a new one (env.episode)")
        self._ran = True
        env, ro = self.env, self.rollout
        t0 = time.perf_counter()
        running = _RUNNING.set(self)
        try:
            async with contextlib.AsyncExitStack() as stack:
                try:
                    self.tools = await self._open_tools(stack)
                    ro.messages = (list(self._first_messages) if self._first_messages is not None
                                   else env.initial_messages(ro.example))
                    if env.setup is not None:
                        await _maybe_await(env.setup, ro)
                except Exception as e:  # noqa: BLE001
                    ro.record_error("setup", e)
                    ro.termination = Termination.SETUP_ERROR
                else:
                    try:
                        if env.rollout_timeout:
                            await asyncio.wait_for(self._loop(sampler), env.rollout_timeout)
                        else:
                            await self._loop(sampler)
                    except asyncio.TimeoutError:
                        ro.termination = Termination.TIMEOUT
                        message = f"rollout exceeded rollout_timeout={env.rollout_timeout}s"
                        ro.errors.append(RolloutError("rollout", message))
                    except Exception as e:  # noqa: BLE001 - a custom step() that raised
                        ro.record_error("environment", e)
                        ro.termination = Termination.ERROR
                    finally:
                        if env.teardown is not None:
                            try:
                                await _maybe_await(env.teardown, ro)
                            except Exception as e:  # noqa: BLE001
                                ro.record_error("teardown", e)
                finally:
                    self.tools = {}
        finally:
            _RUNNING.reset(running)
        ro.metrics["time/rollout"] = time.perf_counter() - t0
        return ro

    async def _open_tools(self, stack: contextlib.AsyncExitStack) -> dict[str, Tool]:
        # Entering the session re-uses the open one (or opens one for this episode alone) and
        # keeps it open until this episode's tools are closed.
        session = await stack.enter_async_context(self.env.session())
        tools = dict(session.tools)
        for server in self.env.mcp_servers:
            if server.isolated:
                conn = await stack.enter_async_context(server.connect())
                for t in conn.tools:
                    add_tool(tools, t)
        return tools

    async def _loop(self, sampler: TurnSampler) -> None:
        env, ro = self.env, self.rollout
        turns = sampler.open(ro, tool_schemas(self.tools) or None)
        budget = env.max_tokens
        while True:
            if ro.turns >= env.max_turns:
                ro.termination = Termination.MAX_TURNS
                return
            room = turns.room()
            if room is not None and room <= 0:
                ro.termination = Termination.CONTEXT_EXCEEDED
                return
            if budget <= 0:
                ro.termination = Termination.LENGTH
                return
            turn_limit = min(budget, env.max_tokens_per_turn or budget)
            params = replace(sampler.params, max_new_tokens=turn_limit if room is None else min(turn_limit, room))
            if params.seed is not None:  # distinct, reproducible randomness per rollout and turn
                params.seed = derive_seed(params.seed, ro.example_id, ro.group_index, ro.turns)
            try:
                turn = await turns.next_turn(params)
            except Exception as e:  # noqa: BLE001
                ro.record_error("model", e)
                ro.termination = Termination.MODEL_ERROR
                return
            ro.turns += 1
            budget -= turn.sampled_tokens
            ro.messages.append(turn.message)
            if turn.finish_reason == "length":
                cut_by_window = room is not None and room < turn_limit
                ro.termination = Termination.CONTEXT_EXCEEDED if cut_by_window else Termination.LENGTH
                return
            history = list(ro.messages)
            answer = await env.step(ro, turn.message, turn.calls)
            if answer is None or ro.termination is not None:
                ro.termination = ro.termination or Termination.FINISHED
                return
            ro.messages.extend(answer)
            turns.extend(history, answer)


def add_tool(into: dict[str, Tool], t: Tool) -> None:
    if t.name in into:
        raise ValueError(f"two tools are named {t.name!r}; tool names must be unique")
    into[t.name] = t


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts, the same on every platform and Python version."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


async def _maybe_await(fn: Callable[..., Any], *args: Any) -> Any:
    result = fn(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


__all__ = ["ChatSampler", "Episode", "Sampler", "Turn", "TurnSampler", "TurnSource", "derive_seed"]

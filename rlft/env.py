"""The Environment: a task's configuration (prompt, tools, rewards, limits), its shared session,
and the default way it answers an assistant turn.

``Environment(system_prompt=..., tools=[search], rewards=[correct, Reward(concise, weight=0.2)])``
is all most tasks need. An Environment is a value: it holds configuration only, so two built
from the same arguments share nothing. Each rollout is an :class:`~rlft.episode.Episode` it
creates (``episode(example, ...)``), run once through the one multi-turn loop of
``rlft.episode``: sample an assistant turn, answer it (``step``), repeat until the model answers
without a tool call or a limit is hit. Every rollout ends with a ``Termination``.

Custom multi-turn control: subclass and override ``step(rollout, message, calls)``, which
returns the messages that answer an assistant turn (tool results, a simulated user's reply) or
``None`` to end the rollout. The default runs the tool calls and ends on a plain answer.

Per-rollout isolation: ``setup(rollout)`` / ``teardown(rollout)`` (sync or async) run around
each rollout, e.g. to copy a SQLite database into ``rollout.state``; tools see the rollout by
declaring a ``rollout`` parameter. MCP servers with ``isolated=True`` are started per rollout,
others once per ``session()`` (an :class:`EnvSession`, shared by everything that enters it
while it is open; a rollout outside one opens one for itself).

Demonstrations: ``demonstrate=fn`` (optional) returns, for a dataset row, the assistant turns
that solve it; ``rlft sft --env`` and the ``sft_data = "demonstrate"`` warm-up play them through
the environment and train on the result (``rlft.sft.demonstrations``).

Failure isolation: an exception in setup, the engine, a tool or ``step`` ends only that rollout
(with its termination reason and the traceback recorded); sibling rollouts and the step go on.
Left out here: the loop and the samplers (``rlft.episode``), training, storage, and reward
scoring internals (``rlft.rewards``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from rlft.episode import (
    ChatSampler,
    Episode,
    Sampler,
    TurnSampler,
    add_tool,
    derive_seed,
)
from rlft.mcp.server import MCPServer  # a value: the MCP SDK loads when a server connects
from rlft.rewards import Reward, as_reward, score_group
from rlft.tools import Tool, tool
from rlft.types import Group, Message, Rollout, RolloutError, Termination, ToolCall


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
    # example -> the assistant's turns that solve it (a string, a list of messages, or None):
    # SFT warm-up demonstrations, played through this environment (rlft.sft.demonstrations)
    demonstrate: Callable[[dict[str, Any]], Any] | None = None

    def __post_init__(self):
        self.tools = list(self.tools)
        self.rewards = [as_reward(r) for r in self.rewards]
        function_tools: dict[str, Tool] = {}
        servers: list[Any] = []
        for t in self.tools:
            if isinstance(t, Tool):
                add_tool(function_tools, t)
            elif isinstance(t, MCPServer):
                servers.append(t)
            elif callable(t):
                add_tool(function_tools, tool(t))
            else:
                raise TypeError(f"Environment tools: {t!r} is neither a function, a Tool nor an MCP server")
        self._function_tools = function_tools
        self._mcp_servers: tuple[MCPServer, ...] = tuple(servers)
        # The one thing an Environment remembers besides its configuration: which session is
        # open, so that rollouts run inside ``async with env.session()`` share it.
        self._open_session: EnvSession | None = None

    # -- what the tools are (the console shows them) -------------------------------------------
    @property
    def function_tools(self) -> Mapping[str, Tool]:
        """The tools that are plain functions, by name (known without starting anything)."""
        return MappingProxyType(self._function_tools)

    @property
    def mcp_servers(self) -> tuple[MCPServer, ...]:
        """The MCP servers whose tools a session (shared) or each rollout (isolated) connects to."""
        return self._mcp_servers

    # -- shared resources --------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[EnvSession]:
        """Open the shared MCP servers for the duration and yield the :class:`EnvSession`.
        Re-entrant, and concurrent callers share one session, closed when the last one leaves."""
        session = self._open_session
        opener = session is None
        if session is None:
            # registered before its first await, so that callers arriving meanwhile share it
            session = self._open_session = EnvSession(self)
        session.users += 1
        try:
            await (session.open() if opener else session.wait_open())
            yield session
        finally:
            session.users -= 1
            if session.users == 0:
                if self._open_session is session:
                    self._open_session = None
                await session.close()

    # -- one rollout -------------------------------------------------------------------------
    def episode(self, example: dict[str, Any], *, example_id: int = 0, group_index: int = 0,
                policy_version: int = 0, messages: list[Message] | None = None) -> Episode:
        """A new, unstarted episode of ``example`` (run it once with ``await episode.run(sampler)``).
        ``messages``: the conversation to start from instead of ``initial_messages(example)``."""
        ro = Rollout(example=example, example_id=example_id, group_index=group_index, policy_version=policy_version)
        return Episode(self, ro, messages)

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
        """Run the calls concurrently on the rollout's tools; each becomes a tool message,
        failures included. None (and the rollout's termination set) when it cannot go on."""
        if rollout.tool_calls + len(calls) > self.max_tool_calls:
            rollout.termination = Termination.MAX_TOOL_CALLS
            return None
        rollout.tool_calls += len(calls)
        results = await Episode.of(rollout).call_tools(calls)
        out = []
        for call, res in zip(calls, results):
            if res.error:
                rollout.errors.append(RolloutError(where=f"tool:{call.name or '?'}", message=res.error or "",
                                                   traceback=res.traceback or ""))
            if res.fatal:
                rollout.termination = Termination.TOOL_ERROR
                return None
            msg: Message = {"role": "tool", "content": res.content, "tool_call_id": call.id}
            if call.name:
                msg["name"] = call.name
            out.append(msg)
        return out

    async def rollout(self, example: dict[str, Any], sampler: TurnSampler, *, example_id: int = 0,
                      group_index: int = 0) -> Rollout:
        """Run one rollout to its end (a new episode). Never raises for the rollout's own failures."""
        episode = self.episode(example, example_id=example_id, group_index=group_index,
                               policy_version=sampler.policy_version)
        return await episode.run(sampler)

    async def run_groups(self, examples: list[dict[str, Any]], sampler: TurnSampler, group_size: int, *,
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


class EnvSession:
    """An open ``Environment.session()``: the function tools plus one connection to each shared
    (not isolated) MCP server, as ``tools``; closed when its last user leaves."""

    def __init__(self, env: Environment):
        self.env = env
        self.tools: dict[str, Tool] = {}
        self.users = 0  # callers inside ``async with env.session()`` (and running episodes)
        self._stack = contextlib.AsyncExitStack()
        self._opened = asyncio.Event()
        self._failure: BaseException | None = None

    async def open(self) -> None:
        try:
            tools = dict(self.env.function_tools)
            for server in self.env.mcp_servers:
                if not server.isolated:
                    conn = await self._stack.enter_async_context(server.connect())
                    for t in conn.tools:
                        add_tool(tools, t)
            self.tools = tools
        except BaseException as e:
            self._failure = e
            if self.env._open_session is self:  # the next caller starts afresh
                self.env._open_session = None
            raise
        finally:
            self._opened.set()

    async def wait_open(self) -> None:
        """Wait for the caller that opens this session; raise if it failed."""
        await self._opened.wait()
        if self._failure is not None:
            raise RuntimeError(f"the environment's shared tools failed to start: "
                               f"{type(self._failure).__name__}: {self._failure}") from self._failure

    async def close(self) -> None:
        self.tools = {}
        await self._stack.aclose()


__all__ = ["ChatSampler", "EnvSession", "Environment", "Episode", "Reward", "Sampler", "derive_seed"]

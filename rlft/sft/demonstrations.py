"""Demonstrations an environment's author writes: ``demonstrate(example)``, played through the
environment, become SFT transcripts.

A task author often knows the answers (the recipes generate their data), so an environment can
carry ``demonstrate=fn``: ``fn(example)`` returns what the assistant should say for that row:

- a string: one final assistant answer;
- a list of assistant turns, each a string or a message (``{"content": ..., "tool_calls": [...]}``,
  ``role`` optional; ``tool_calls`` in the OpenAI shape, arguments a dict or a JSON string);
- ``None``: no demonstration for this row.

The author writes only the assistant's side. Each demonstration is then *played* as an episode of
the environment, exactly as an RL rollout runs: the scripted turns stand in for the model, the
environment's tools run on the scripted calls and their real results are appended, ``setup`` /
``teardown`` and the multi-turn limits apply, and the environment's rewards score the result. So a
transcript holds the tool outputs the model will actually see, and a demonstration that does not
solve its row (a wrong call, a reward below ``min_reward``) is reported and left out instead of
taught. Rows come from wherever the caller takes them; the trainer passes the train split only,
so held-out rows never become demonstrations.

Left out: writing transcripts to disk (``rlft.sft.transcripts.write_transcripts``), rendering and
training (``rlft.sft.prepare`` / ``rlft.training.warmup``), and rollouts harvested from a run or a
teacher model (``rlft.sft.harvest``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rlft.engines.base import SamplingParams
from rlft.episode import Turn
from rlft.errors import UserError
from rlft.sft.transcripts import Transcript
from rlft.types import Message, Rollout, Termination, ToolCall


class DemonstrationError(UserError):
    """``demonstrate`` returned something that is not a demonstration (named row and field)."""


@dataclass
class Demonstrations:
    """What playing the demonstrations gave: transcripts to train on, one sentence per row left
    out, and the reward and played episode of each kept transcript (same order)."""

    transcripts: list[Transcript] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    played: list[Rollout] = field(default_factory=list)
    rows: int = 0  # rows asked for a demonstration


def as_script(value: Any, where: str) -> list[Message] | None:
    """The assistant turns of one ``demonstrate`` return value, checked; None for no demonstration."""
    if value is None:
        return None
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if not isinstance(value, Sequence) or not value:
        raise DemonstrationError(f"{where}: demonstrate returned {type(value).__name__}; expected a string, a "
                                 "non-empty list of assistant messages, or None")
    turns = []
    for i, m in enumerate(value):
        if isinstance(m, str):
            m = {"content": m}
        if not isinstance(m, dict):
            raise DemonstrationError(f"{where}: message {i} is a {type(m).__name__}, not a dict")
        if m.get("role", "assistant") != "assistant":
            raise DemonstrationError(f"{where}: message {i} has role {m.get('role')!r}: write only the assistant's "
                                     "turns (the environment adds tool results and replies by running them)")
        calls = [_call(tc, f"{where}: message {i} tool_calls[{j}]") for j, tc in enumerate(m.get("tool_calls") or [])]
        msg: Message = {"role": "assistant", "content": m.get("content") or ""}
        if calls:
            msg["tool_calls"] = [c.to_openai() for c in calls]
        turns.append(msg)
    return turns


def _call(tc: Any, where: str) -> ToolCall:
    fn = tc.get("function") if isinstance(tc, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise DemonstrationError(f"{where}: expected {{\"function\": {{\"name\": ..., \"arguments\": {{...}}}}}}")
    args = fn.get("arguments") or {}
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            raise DemonstrationError(f"{where}.function.arguments: not JSON ({e})") from None
    if not isinstance(args, dict):
        raise DemonstrationError(f"{where}.function.arguments: a {type(args).__name__}, not an object")
    return ToolCall(name=fn["name"], arguments=args, id=str(tc.get("id") or ""))


@dataclass
class ScriptedTurns:
    """A turn sampler (``rlft.episode.TurnSampler``) that answers each episode with its row's
    scripted assistant turns, by ``example_id``; it also keeps the tool schemas each episode was
    offered (they belong in the transcript)."""

    scripts: dict[int, list[Message]]
    params: SamplingParams = field(default_factory=SamplingParams)
    policy_version: int = 0
    schemas: dict[int, list[dict] | None] = field(default_factory=dict)

    def open(self, rollout: Rollout, schemas: list[dict] | None) -> _Replay:
        self.schemas[rollout.example_id] = schemas
        return _Replay(list(self.scripts[rollout.example_id]), rollout)


class _Replay:
    def __init__(self, turns: list[Message], rollout: Rollout):
        self.turns, self.rollout = turns, rollout
        self.played = 0

    def room(self) -> int | None:
        return None

    async def next_turn(self, params: SamplingParams) -> Turn:
        if self.played >= len(self.turns):
            raise RuntimeError(f"the demonstration has {len(self.turns)} assistant turn(s) but the environment "
                               "asked for another (it answered the last one instead of ending)")
        msg = self.turns[self.played]
        self.played += 1
        self.rollout.state["_demo_turns_left"] = len(self.turns) - self.played
        calls = [ToolCall(name=tc["function"]["name"], arguments=tc["function"]["arguments"], id=tc.get("id", ""))
                 for tc in msg.get("tool_calls") or []]
        return Turn(dict(msg), calls, "stop", 0)

    def extend(self, history: list[Message], answer: list[Message]) -> None:
        pass


async def play(env: Any, examples: Sequence[dict[str, Any]], *, example_ids: Sequence[int] | None = None,
               min_reward: float | None = None, max_concurrency: int = 16) -> Demonstrations:
    """Play ``env.demonstrate`` on each of ``examples`` through ``env``; keep the demonstrations
    that end cleanly, use every scripted turn and (with ``min_reward``) score at least it."""
    if env.demonstrate is None:
        raise UserError(f"environment {env.name!r} has no demonstrate function: pass "
                        "Environment(..., demonstrate=fn) where fn(example) returns the assistant's turns")
    ids = list(example_ids) if example_ids is not None else list(range(len(examples)))
    out = Demonstrations(rows=len(examples))
    scripts, todo = {}, []
    for ex, eid in zip(examples, ids):
        where = f"demonstrate(example {eid})"
        try:
            script = as_script(env.demonstrate(ex), where)
        except DemonstrationError:
            raise
        except Exception as e:  # noqa: BLE001 - the author's function failed on this row: report it, go on
            out.problems.append(f"{where} raised {type(e).__name__}: {e}")
            continue
        if script is None:
            out.problems.append(f"{where}: no demonstration (returned None)")
            continue
        scripts[eid] = script
        todo.append((ex, eid))
    if not todo:
        return out
    sampler = ScriptedTurns(scripts)
    groups = await env.run_groups([ex for ex, _ in todo], sampler, 1, max_concurrency=max_concurrency,
                                  example_ids=[eid for _, eid in todo])
    for g in groups:
        ro = g.rollouts[0]
        where = f"demonstrate(example {g.example_id})"
        if ro.errors or ro.termination is not Termination.FINISHED:
            first = ro.errors[0] if ro.errors else None
            why = f"{first.where}: {first.message}" if first is not None else f"termination {ro.termination.value}"
            out.problems.append(f"{where}: the played demonstration ended with {why}")
            continue
        if ro.state.get("_demo_turns_left"):
            out.problems.append(f"{where}: the environment ended the episode with {ro.state['_demo_turns_left']} "
                                "scripted turn(s) unplayed (max_turns / max_tool_calls?)")
            continue
        if min_reward is not None and ro.reward < min_reward:
            out.problems.append(f"{where}: scored {ro.reward:.3f} < min_reward {min_reward:g}: not a solution, "
                                "left out")
            continue
        meta = {"source": "demonstrate", "example_id": g.example_id, "reward": ro.reward}
        out.transcripts.append(Transcript(messages=_clean(ro.messages), tools=sampler.schemas.get(g.example_id),
                                          meta=meta))
        out.rewards.append(ro.reward)
        out.played.append(ro)
    return out


def _clean(messages: list[Message]) -> list[Message]:
    """The conversation as a transcript row: JSON-able, tool-call arguments as the OpenAI JSON text."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{**tc, "function": {**tc["function"], "arguments": _json(tc["function"]["arguments"])}}
                               for tc in m["tool_calls"]]
        out.append(m)
    return out


def _json(args: Any) -> str:
    return args if isinstance(args, str) else json.dumps(args)


__all__ = ["DemonstrationError", "Demonstrations", "ScriptedTurns", "as_script", "play"]

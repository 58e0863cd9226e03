"""Demonstrations from rollouts: the best rollouts of an rlft run (expert iteration), or of an
OpenAI-compatible teacher driven through an environment, turned into SFT transcripts.

- :func:`harvest_run` reads a run's stored *train* rollouts (``RunStore.rollouts``) and keeps
  those that reach ``min_reward``;
- :func:`harvest_teacher` runs an environment's train examples with a chat engine (a teacher
  behind an OpenAI-compatible endpoint) through the same episode loop as RL (``run_groups``: the
  environment's tools executed, its rewards scored) and keeps the rollouts that reach
  ``min_reward``.

Both go through :func:`select`, which applies these rules in order:

1. held-out examples never become demonstrations: a rollout whose example has the prompt (or
   ``id``) of an eval-split example (the run's eval split reloaded from its config, plus every
   example of its stored eval rollouts) is dropped, even if it was sampled as a train rollout;
2. only finished rollouts (the model answered without a tool call) are kept: one cut by a limit
   ends mid-thought, and SFT would teach it to stop there;
3. ``reward >= min_reward``;
4. per example, best reward first (then the latest step), identical conversations kept once
   (tool-call ids ignored, arguments compared as JSON), at most ``top_k_per_example`` (0: all);
5. the transcript must pass ``rlft.sft.checks`` (a malformed tool call leaves a tool result that
   answers no call: dropped), and, with a ``renderer``, render and parse back as RL would
   (``render_transcripts``).

A transcript is the rollout's messages (system prompt included, tool-call arguments as JSON
text), the environment's tool schemas (the same list, in the same order, that the rollout's
prompt rendered), and meta ``source``, ``reward``, ``rewards``, ``example_id`` and ``step``.
Left out: writing files, choosing the model and training (``rlft.cli.sft_harvest``), and
rollouts of runs whose environment was passed as an object (pass ``environment=`` and
``held_out=`` from Python).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlft.errors import UserError
from rlft.sft.checks import transcript_problems
from rlft.sft.transcripts import Transcript

__all__ = ["HarvestError", "HarvestResult", "environment_tool_schemas", "example_keys", "harvest_run",
           "harvest_teacher", "run_environment", "select"]

_MESSAGE_KEYS = ("role", "content", "tool_calls", "tool_call_id", "name")
_ROLLOUT_PAGE = 1000


class HarvestError(UserError):
    """Nothing to harvest, or the source cannot be read: names the run and what to change."""


@dataclass
class HarvestResult:
    """The kept transcripts (per example, best first), how many rollouts each rule dropped, and
    the best reward among the rollouts that were eligible (not held out)."""

    transcripts: list[Transcript]
    counts: dict[str, int] = field(default_factory=dict)
    best_reward: float | None = None
    problems: list[str] = field(default_factory=list)
    summary_line: str = ""  # a source with its own account (demonstrations) gives it here

    def summary(self, min_reward: float) -> str:
        if self.summary_line:
            return self.summary_line
        c = self.counts
        skipped = (f" ({c['skipped_examples']} held-out examples not sampled)"
                   if c.get("skipped_examples") else "")
        return (f"{c['read']} rollouts read{skipped}, {c['kept']} kept from {c['examples']} examples; dropped: "
                f"{c['held_out']} of held-out examples, {c['unfinished']} unfinished, {c['below']} below reward "
                f"{min_reward:g}, {c['duplicate']} duplicates, {c['over_top_k']} over the per-example limit, "
                f"{c['malformed']} malformed")


# -- which example a rollout belongs to ---------------------------------------------------------


def example_keys(example: dict[str, Any]) -> set[str]:
    """What identifies an example across splits: its prompt (``prompt`` or ``messages``, as
    canonical JSON) and its ``id`` field when it has one. ``example_id`` is a position within
    one split, so it identifies nothing across splits."""
    keys = set()
    prompt = example.get("messages", example.get("prompt"))
    if prompt is not None:
        keys.add("prompt:" + json.dumps(prompt, sort_keys=True, ensure_ascii=False))
    if example.get("id") is not None:
        keys.add("id:" + json.dumps(example["id"], sort_keys=True))
    return keys


def _prompt_key(example: dict[str, Any]) -> str:
    keys = sorted(example_keys(example))
    return next((k for k in keys if k.startswith("prompt:")), keys[0] if keys else "")


# -- rollouts to transcripts --------------------------------------------------------------------


def _message(m: dict[str, Any]) -> dict[str, Any]:
    """The transcript form of a stored message: OpenAI keys only, tool-call arguments as JSON text."""
    out = {k: m[k] for k in _MESSAGE_KEYS if m.get(k) is not None}
    if out.get("role") == "assistant" and "content" not in out:
        out["content"] = ""
    if out.get("tool_calls"):
        out["tool_calls"] = [{"id": tc.get("id") or f"call_{j}", "type": "function",
                              "function": {"name": tc["function"]["name"],
                                           "arguments": _json_text(tc["function"].get("arguments"))}}
                             for j, tc in enumerate(out["tool_calls"])]
    return out


def _json_text(args: Any) -> str:
    return args if isinstance(args, str) else json.dumps(args if args is not None else {}, ensure_ascii=False)


def _conversation_key(messages: list[dict[str, Any]]) -> str:
    """Equal for conversations that differ only in tool-call ids (and argument formatting)."""
    def norm(m: dict[str, Any]) -> dict[str, Any]:
        m = {k: v for k, v in m.items() if k != "tool_call_id"}
        if m.get("tool_calls"):
            m["tool_calls"] = [(tc["function"]["name"], _json_value(tc["function"]["arguments"]))
                               for tc in m["tool_calls"]]
        return m
    return json.dumps([norm(m) for m in messages], sort_keys=True, ensure_ascii=False)


def _json_value(args: str) -> Any:
    try:
        return json.loads(args)
    except json.JSONDecodeError:
        return args


def select(rows: list[dict[str, Any]], *, min_reward: float, tools: list[dict] | None, held_out: set[str],
           top_k_per_example: int = 0, source: str = "", renderer: Any = None) -> HarvestResult:
    """Apply the module's rules to rollouts in the run store's row form (``messages``,
    ``reward``, ``rewards``, ``termination``, ``example``, ``example_id``, ``step``)."""
    counts = dict.fromkeys(("read", "held_out", "unfinished", "below", "duplicate", "over_top_k", "malformed",
                            "kept", "examples"), 0)
    counts["read"] = len(rows)
    best: float | None = None
    by_example: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        example = row.get("example") or {}
        if example_keys(example) & held_out:
            counts["held_out"] += 1
            continue
        reward = row.get("reward")
        if row.get("termination") != "finished":
            counts["unfinished"] += 1
            continue
        if reward is not None:
            best = reward if best is None else max(best, reward)
        if reward is None or reward < min_reward:
            counts["below"] += 1
        else:
            by_example.setdefault(_prompt_key(example), []).append(row)
    kept: list[tuple[str, Transcript]] = []
    problems: list[str] = []
    for example_key, group in by_example.items():
        group.sort(key=lambda r: (-r["reward"], -int(r.get("step") or 0), int(r.get("group_index") or 0)))
        seen: set[str] = set()
        taken = 0
        for row in group:
            messages = [_message(m) for m in row.get("messages") or []]
            key = _conversation_key(messages)
            if key in seen:
                counts["duplicate"] += 1
                continue
            if top_k_per_example and taken >= top_k_per_example:
                counts["over_top_k"] += 1
                continue
            where = f"{source} step {row.get('step')} example {row.get('example_id')} rollout {row.get('group_index')}"
            meta = {"source": source, "reward": row["reward"], "rewards": row.get("rewards") or {},
                    "example_id": row.get("example_id"), "step": row.get("step")}
            transcript = Transcript(messages=messages, tools=tools or None, meta=meta)
            problem = _problem(transcript, renderer)
            if problem:
                counts["malformed"] += 1
                problems.append(f"{where}: {problem}")
                continue
            kept.append((example_key, transcript))
            seen.add(key)  # only once kept: a malformed copy must not shadow a good one
            taken += 1
    counts["kept"], counts["examples"] = len(kept), len({key for key, _ in kept})
    return HarvestResult(transcripts=[t for _, t in kept], counts=counts, best_reward=best, problems=problems)


def _problem(t: Transcript, renderer: Any) -> str:
    """Why ``t`` cannot be a demonstration ("" if it can): a check of ``rlft.sft.checks``, or,
    with a renderer, what the trainer would report and leave out (``render_transcripts``)."""
    found = transcript_problems(t.to_row())
    if found:
        return f"field {found[0][0]!r}: {found[0][1]}"
    if renderer is None:
        return ""
    from rlft.sft.transcripts import render_transcripts

    return next(iter(render_transcripts(renderer, [t])[1]), "")


# -- an environment's tools and held-out examples -------------------------------------------------


def environment_tool_schemas(env: Any) -> list[dict]:
    """The tool schemas a rollout of ``env`` renders in its prompt, in the same order
    (``Episode``: function tools, shared MCP servers' tools, then isolated servers')."""
    from rlft.tools import tool_schemas

    if not env.mcp_servers:
        return tool_schemas(env.function_tools)

    async def listed() -> list[dict]:
        async with contextlib.AsyncExitStack() as stack:
            session = await stack.enter_async_context(env.session())
            tools = dict(session.tools)
            for server in env.mcp_servers:
                if server.isolated:
                    conn = await stack.enter_async_context(server.connect())
                    tools.update({t.name: t for t in conn.tools})
            return tool_schemas(tools)

    return asyncio.run(listed())


def run_environment(config: dict[str, Any], what: str) -> tuple[Any, Any, Any]:
    """(environment, train split, eval split) of a run's (or an RL config's) recorded keys."""
    from rlft.loader import load_data, load_environment

    spec = config.get("env") or ""
    if not spec:
        raise HarvestError(f"{what} has no environment file in its config (it was given an Environment object): "
                           "harvest it from Python with harvest_run(..., environment=env, held_out=eval_rows)")
    path = Path(spec.partition(":")[0])
    if path.suffix == ".py" and not path.exists():
        raise HarvestError(f"{what}: its environment file {path} no longer exists; restore it to harvest the run")
    env, module, _ = load_environment(spec)
    train_set, eval_set = load_data(config.get("data") or None, module=module, eval_data=config.get("eval_data", ""),
                                    eval_size=int(config.get("eval_size", 0)),
                                    eval_fraction=float(config.get("eval_fraction", 0.2)),
                                    seed=int(config.get("seed", 0)))
    return env, train_set, eval_set


# -- the two sources ----------------------------------------------------------------------------


def harvest_run(store: Any, run: str, min_reward: float, *, top_k_per_example: int = 0, environment: Any = None,
                held_out: list[dict[str, Any]] | None = None, renderer: Any = None) -> HarvestResult:
    """The best train rollouts of ``run`` (id, name or prefix) as transcripts. ``environment``
    and ``held_out`` (eval rows) default to the run's, reloaded from its config. Raises
    ``UnknownRunError`` or :class:`HarvestError` (no train rollouts, none reaches the reward)."""
    run_id = store.resolve(run)
    info = store.get_run(run_id)
    if info.get("kind") == "sft":
        raise HarvestError(f"run {run_id} is an SFT run: it has no rollouts; pass an RL run to --from-run")
    total = store.count_rollouts(run_id, split="train")
    if not total:
        raise HarvestError(f"run {run_id} has no train rollouts (status {info.get('status')}, step "
                           f"{info.get('step')}): nothing to harvest")
    if environment is None or held_out is None:
        env, _, eval_set = run_environment(info.get("config") or {}, f"run {run_id}")
        environment = environment if environment is not None else env
        held_out = held_out if held_out is not None else list(eval_set)
    keys = set().union(*(example_keys(r) for r in held_out)) if held_out else set()
    for offset in range(0, store.count_rollouts(run_id, split="eval"), _ROLLOUT_PAGE):
        for r in store.rollouts(run_id, split="eval", limit=_ROLLOUT_PAGE, offset=offset):
            keys |= example_keys(r.get("example") or {})
    rows = [r for offset in range(0, total, _ROLLOUT_PAGE)
            for r in store.rollouts(run_id, split="train", limit=_ROLLOUT_PAGE, offset=offset)]
    result = select(rows, min_reward=min_reward, tools=environment_tool_schemas(environment), held_out=keys,
                    top_k_per_example=top_k_per_example, source=f"run:{run_id}", renderer=renderer)
    _check_kept(result, min_reward, f"run {run_id}", "train rollouts")
    return result


def harvest_teacher(env: Any, examples: list[dict[str, Any]], engine: Any, min_reward: float, *, samples: int = 1,
                    held_out: list[dict[str, Any]] | None = None, top_k_per_example: int = 0, params: Any = None,
                    max_concurrency: int = 16, source: str = "teacher", renderer: Any = None) -> HarvestResult:
    """Drive ``engine`` (a ``ChatEngine``, e.g. ``OpenAIChatEngine``) through ``env`` on
    ``examples`` (``samples`` rollouts each, tools executed, rewards scored) and keep the best
    as transcripts. Examples whose prompt or id is among ``held_out`` are not even sampled."""
    from rlft.env import ChatSampler

    keys = set().union(*(example_keys(r) for r in held_out)) if held_out else set()
    allowed = [ex for ex in examples if not example_keys(ex) & keys]
    if not allowed:
        raise HarvestError(f"{source}: every one of the {len(examples)} examples is held out: nothing to sample")
    sampler = ChatSampler(engine, params) if params is not None else ChatSampler(engine)
    ids = [int(ex.get("example_id", i)) for i, ex in enumerate(allowed)]
    groups = asyncio.run(env.run_groups(allowed, sampler, samples, max_concurrency=max_concurrency, example_ids=ids))
    rows = [{"messages": r.messages, "reward": r.reward, "rewards": r.rewards, "example": r.example,
             "termination": str(r.termination), "example_id": r.example_id, "group_index": r.group_index, "step": None}
            for g in groups for r in g.rollouts]
    result = select(rows, min_reward=min_reward, tools=environment_tool_schemas(env), held_out=keys,
                    top_k_per_example=top_k_per_example, source=source, renderer=renderer)
    result.counts["skipped_examples"] = len(examples) - len(allowed)
    errors = [e for g in groups for r in g.rollouts for e in r.errors if e.where == "model"]
    if errors and not result.transcripts:
        raise HarvestError(f"{source}: {len(errors)} of {len(rows)} rollouts failed to get a reply from the teacher; "
                           f"the first: {errors[0].message}")
    _check_kept(result, min_reward, source, "rollouts")
    return result


def _check_kept(result: HarvestResult, min_reward: float, what: str, rollouts: str) -> None:
    if result.transcripts:
        return
    c = result.counts
    if result.best_reward is None:
        raise HarvestError(f"{what}: none of its {c['read']} {rollouts} can be a demonstration ({c['held_out']} "
                           f"belong to held-out examples, {c['unfinished']} did not finish)")
    finished = c["read"] - c["held_out"] - c["unfinished"]
    if result.best_reward < min_reward:
        raise HarvestError(f"{what}: no finished rollout reaches reward {min_reward:g} (best reward found: "
                           f"{result.best_reward:g} over {finished} finished {rollouts}): lower --min-reward")
    raise HarvestError(f"{what}: no transcript left ({result.summary(min_reward)}); the first problem: "
                       + (result.problems[0] if result.problems else "none"))

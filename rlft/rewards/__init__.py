"""Rewards: plain functions of a ``Rollout``, wrapped as ``Reward`` and scored safely.

A reward function is sync or async and returns a float, a bool, or a dict of named components.
``Reward(fn, weight=1.0, name=None)``: weight 0 logs the component without training on it; a
negative weight makes it a penalty. ``Reward(fn, group=True)`` sees all G sibling rollouts of
one prompt at once (ranking, diversity) and returns one value (or dict) per rollout.

Scoring never lets one bad function hurt anything else: an exception, a timeout, a NaN or an
infinity scores 0 for that component on that rollout, records the error with its traceback on
the rollout, and leaves sibling rollouts and other components alone. One exception: the code
sandbox refusing to run untrusted code here (``SandboxRefusedError``: no namespaces, and no
``sandbox_unconfined = true``) stops the step, since every rollout would silently score 0. Rollouts that already
failed (setup, model, timeout, fatal tool errors) are not scored: all their components are 0.
Ready-made graders live in ``rlft.rewards.checks`` (and ``sql``), the code sandbox in
``rlft.rewards.sandbox``, LLM-judge rubrics in ``rlft.rewards.judge``.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlft.rewards.sandbox import SandboxRefusedError
from rlft.types import Rollout, Termination

# Rollouts ending with these never reached a state worth scoring.
FAILED = {Termination.SETUP_ERROR, Termination.MODEL_ERROR, Termination.TIMEOUT, Termination.TOOL_ERROR,
          Termination.ERROR}


@dataclass
class Reward:
    fn: Callable[..., Any]
    weight: float = 1.0
    name: str | None = None
    group: bool = False  # fn(list[Rollout]) -> list of values, one per sibling
    timeout: float | None = None  # seconds; None = the environment's reward_timeout

    def __post_init__(self):
        if isinstance(self.fn, Reward):
            raise TypeError("Reward(Reward(...)): pass the function, not a Reward")
        if not callable(self.fn):
            raise TypeError(f"a reward must be callable, got {type(self.fn).__name__}")
        self.name = self.name or getattr(self.fn, "__name__", type(self.fn).__name__)


def as_reward(r: Reward | Callable[..., Any]) -> Reward:
    return r if isinstance(r, Reward) else Reward(r)


class RewardValueError(ValueError):
    pass


def _to_float(value: Any, where: str) -> float:
    if isinstance(value, bool):
        return float(value)
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise RewardValueError(f"{where} returned {type(value).__name__} {value!r:.80}, expected a number") from None
    if not math.isfinite(x):
        raise RewardValueError(f"{where} returned {x}, expected a finite number")
    return x


def _components(reward: Reward, value: Any) -> dict[str, float]:
    if isinstance(value, dict):
        return {str(k): _to_float(v, f"reward {reward.name!r}[{k!r}]") for k, v in value.items()}
    return {reward.name: _to_float(value, f"reward {reward.name!r}")}


async def _call(fn: Callable[..., Any], arg: Any, timeout: float | None) -> Any:
    # an async __call__ method (not a callable check: B004)
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None)):  # noqa: B004
        coro = fn(arg)
    else:  # a sync function runs in a thread so that slow graders overlap with each other
        coro = asyncio.to_thread(fn, arg)
    result = await asyncio.wait_for(coro, timeout) if timeout else await coro
    if inspect.isawaitable(result):
        result = await (asyncio.wait_for(result, timeout) if timeout else result)
    return result


async def score_rollout(rollout: Rollout, rewards: list[Reward], timeout: float | None) -> dict[str, float]:
    """Score one rollout with the non-group rewards (in place); returns each component's weight."""
    weights: dict[str, float] = {}
    if rollout.termination in FAILED:
        return weights

    async def one(r: Reward) -> None:
        try:
            value = await _call(r.fn, rollout, r.timeout or timeout)
            comps = _components(r, value)
        except asyncio.TimeoutError as e:
            rollout.record_error(f"reward:{r.name}",
                                 TimeoutError(f"reward {r.name!r} timed out after {r.timeout or timeout}s"))
            comps = {r.name: 0.0}
            del e
        except SandboxRefusedError:  # not this rollout's fault: no rollout could be scored
            raise
        except Exception as e:  # noqa: BLE001 - a broken reward must not break the step
            rollout.record_error(f"reward:{r.name}", e)
            comps = {r.name: 0.0}
        for k, v in comps.items():
            rollout.rewards[k] = v
            weights[k] = r.weight

    await asyncio.gather(*(one(r) for r in rewards if not r.group))
    return weights


async def score_group(rollouts: list[Rollout], rewards: list[Reward], timeout: float | None = 60.0) -> None:
    """Score the G siblings of one prompt: per-rollout rewards concurrently, then group rewards,
    then totals. Components missing on a rollout (a failed one, or a dict reward that raised)
    are filled with 0 so every sibling reports the same components."""
    rewards = [as_reward(r) for r in rewards]
    weights: dict[str, float] = {r.name: r.weight for r in rewards}
    for w in await asyncio.gather(*(score_rollout(r, rewards, timeout) for r in rollouts)):
        weights.update(w)
    for rw in (r for r in rewards if r.group):
        scorable = [ro for ro in rollouts if ro.termination not in FAILED]
        if not scorable:
            continue
        try:
            values = await _call(rw.fn, scorable, rw.timeout or timeout)
            if len(values) != len(scorable):
                raise RewardValueError(
                    f"group reward {rw.name!r} returned {len(values)} values for {len(scorable)} rollouts")
            per = [_components(rw, v) for v in values]
        except SandboxRefusedError:
            raise
        except Exception as e:  # noqa: BLE001
            if isinstance(e, asyncio.TimeoutError):
                e = TimeoutError(f"group reward {rw.name!r} timed out after {rw.timeout or timeout}s")
            for ro in scorable:
                ro.record_error(f"reward:{rw.name}", e)
            per = [{rw.name: 0.0} for _ in scorable]
        for ro, comps in zip(scorable, per):
            ro.rewards.update(comps)
            weights.update({k: rw.weight for k in comps})
    # Every sibling reports the union of components (a dict reward that raised reports its
    # own name at 0), so per-component means are over the whole group.
    names = {k for ro in rollouts for k in ro.rewards}
    for ro in rollouts:
        for k in names:
            ro.rewards.setdefault(k, 0.0)
        ro.reward = sum(weights.get(k, 1.0) * v for k, v in ro.rewards.items())
        if (ro.errors and ro.termination == Termination.FINISHED
                and any(e.where.startswith("reward:") for e in ro.errors)):
            ro.termination = Termination.REWARD_ERROR


__all__ = ["Reward", "as_reward", "score_group", "score_rollout", "RewardValueError"]

"""Evaluation and validation of an environment with a sampler (any engine).

``evaluate`` samples k rollouts for each eval prompt and reports reward mean, pass@k, max@k,
solve rate, per-component means, lengths and termination counts. ``validate`` runs one group
of 2 rollouts end to end and says what is wrong (a failed rollout, a missing component, a
traceback) before any compute is spent on training. ``signal_report`` answers "is there
anything to learn?": the share of groups whose rewards all tie gives GRPO no gradient.
Left out: model loading and storage (the callers do that).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

from rlft.env import Environment
from rlft.episode import TurnSampler
from rlft.metrics import group_metrics, zero_variance_share
from rlft.rewards import FAILED
from rlft.types import Group, Termination


async def evaluate(env: Environment, examples: list[dict[str, Any]], sampler: TurnSampler, *, k: int = 4,
                   temperature: float | None = None, success_threshold: float = 0.0,
                   max_concurrency: int = 256) -> tuple[dict[str, float], list[Group]]:
    """(metrics, groups) for k samples per example."""
    if temperature is not None:
        sampler = replace(sampler, params=replace(sampler.params, temperature=temperature))
    t0 = time.perf_counter()
    groups = await env.run_groups(examples, sampler, k, max_concurrency=max_concurrency)
    metrics = group_metrics(groups, success_threshold)
    metrics["time/eval"] = time.perf_counter() - t0
    metrics["examples"] = float(len(examples))
    metrics["k"] = float(k)
    return metrics, groups


@dataclass
class ValidationReport:
    groups: list[Group]
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


async def validate(env: Environment, example: dict[str, Any], sampler: TurnSampler,
                   group_size: int = 2) -> ValidationReport:
    """One group of ``group_size`` rollouts end to end; problems listed in plain words."""
    groups = await env.run_groups([example], sampler, group_size)
    problems = []
    for ro in groups[0].rollouts:
        tag = f"rollout {ro.group_index}"
        if ro.termination in FAILED:
            problems.append(f"{tag} failed: {ro.termination} ({ro.termination.__doc__ or ''})".rstrip())
        for err in ro.errors:
            if err.where.startswith("reward:") or err.where in ("setup", "model", "environment", "teardown"):
                problems.append(f"{tag}: error in {err.where}: {err.message}")
    if not env.rewards:
        problems.append("the environment has no rewards: add at least one reward function")
    return ValidationReport(groups=groups, problems=problems)


@dataclass
class SignalReport:
    metrics: dict[str, float]
    zero_variance_share: float
    warnings: list[str]


def signal_report(groups: list[Group], success_threshold: float = 0.0, threshold: float = 0.5) -> SignalReport:
    """Base reward, pass@k, max@k and the share of tied groups, with advice when there is little signal."""
    metrics = group_metrics(groups, success_threshold)
    share = zero_variance_share(groups)
    warnings = []
    if share > threshold:
        mean = metrics.get("reward/mean", 0.0)
        why = "almost nothing succeeds" if metrics.get("pass@k", 0) < 0.2 else "almost everything ties"
        warnings.append(
            f"{share:.0%} of groups have identical rewards for all rollouts ({why}; mean reward {mean:.3f}): "
            "GRPO gets no gradient from them. Try easier prompts, partial-credit rewards, a larger group_size, "
            "or a higher temperature.")
    if metrics.get("response/truncated_ratio", 0) > 0.3:
        warnings.append(f"{metrics['response/truncated_ratio']:.0%} of rollouts were truncated: raise max_tokens "
                        "or ask for shorter answers.")
    failed = sum(r.termination in FAILED for g in groups for r in g.rollouts)
    if failed:
        warnings.append(f"{failed} rollouts failed (see their errors): they score 0.")
    return SignalReport(metrics=metrics, zero_variance_share=share, warnings=warnings)


def format_transcript(ro, *, tracebacks: bool = True) -> str:
    """Plain-text transcript of one rollout (for the terminal); ``tracebacks=False``: errors by
    their message only (the run's logs keep the tracebacks)."""
    lines = [f"--- rollout {ro.group_index}: {ro.termination}, reward {ro.reward:.3f} {ro.rewards}"]
    for m in ro.messages:
        role = m.get("role", "?")
        content = m.get("content") or ""
        lines.append(f"[{role}] {content}")
        for tc in m.get("tool_calls") or []:
            fn = tc.get("function", {})
            lines.append(f"  -> call {fn.get('name')}({fn.get('arguments')})")
    for err in ro.errors:
        lines.append(f"!! {err.where}: {err.message}")
        if err.traceback and tracebacks:
            lines.append(err.traceback.rstrip())
    return "\n".join(lines)


__all__ = ["evaluate", "validate", "ValidationReport", "signal_report", "SignalReport", "format_transcript", "Termination"]

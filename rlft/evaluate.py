"""Evaluation and validation of an environment with a sampler (any engine).

``evaluate`` samples k rollouts for each eval prompt and reports reward mean, pass@k, max@k,
solve rate, per-component means, lengths and termination counts. ``validate`` runs one group
of 2 rollouts end to end and says what is wrong (a failed rollout, a missing component, a
traceback) before any compute is spent on training. ``signal_report`` answers "is there
anything to learn?": the share of groups whose rewards all tie gives GRPO no gradient.
Left out: model loading and storage (the callers do that).
"""

from __future__ import annotations

import math
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


def signal_report(groups: list[Group], success_threshold: float = 0.0, threshold: float = 0.5,
                  tools: int = 0) -> SignalReport:
    """Base reward, pass@k, max@k and the share of tied groups, with advice when there is little
    signal. ``tools``: how many tools the environment offers (warns when none is ever called validly)."""
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
    warnings += tool_warnings(groups, tools)
    failed = sum(r.termination in FAILED for g in groups for r in g.rollouts)
    if failed:
        warnings.append(f"{failed} rollouts failed (see their errors): they score 0.")
    return SignalReport(metrics=metrics, zero_variance_share=share, warnings=warnings)


def tool_warnings(groups: list[Group], tools: int) -> list[str]:
    """The "tools never used" advice (docs/health.md) over sampled groups, as a warning line."""
    from rlft.health.diagnoses import SFT_ADVICE
    from rlft.metrics import valid_tool_calls

    rollouts = [r for g in groups for r in g.rollouts]
    if not tools or not rollouts or any(valid_tool_calls(r) for r in rollouts):
        return []
    attempted = sum(r.tool_calls for r in rollouts)
    return [f"the environment offers {tools} tool(s) but none of the {len(rollouts)} rollouts made a valid tool call"
            + (f" ({attempted} invalid attempts)" if attempted else "") + f": RL cannot reinforce a call it never "
            f"samples. {SFT_ADVICE[0].upper()}{SFT_ADVICE[1:]}."]


def add_usage_totals(metrics: dict[str, float], rollouts: list[Any], *, priced: bool) -> None:
    """``rlft eval``'s token totals into ``metrics``: an external chat model's from its reported
    usage (and, when ``priced``, ``cost/total_usd`` and ``cost/per_request_usd``; without a price
    the cost is unknown, so no cost figure is written rather than a 0), an in-process model's from
    its prompts and sampled tokens."""
    requests = sum(r.metrics.get("usage/requests", 0) for r in rollouts)
    if not requests:
        metrics["tokens/prompt"] = float(sum(len(r.prompt_ids) for r in rollouts))
        metrics["tokens/completion"] = float(sum(r.num_sampled_tokens for r in rollouts))
        return
    metrics["tokens/prompt"] = float(sum(r.metrics.get("usage/prompt_tokens", 0) for r in rollouts))
    metrics["tokens/completion"] = float(sum(r.metrics.get("usage/completion_tokens", 0) for r in rollouts))
    if priced:
        metrics["cost/total_usd"] = sum(r.metrics.get("usage/cost", 0) for r in rollouts)
        metrics["cost/per_request_usd"] = metrics["cost/total_usd"] / requests
    else:
        metrics.pop("usage/cost", None)


def metric_text(key: str, value: float) -> str:
    """A metric as the eval table shows it: USD amounts with three significant digits however small
    (a request costs ~1e-5 USD: ``$0.0000135``, not ``0.0000``), anything else to 4 decimals."""
    if not (key.endswith("_usd") or key == "usage/cost"):
        return f"{value:.4f}"
    if value == 0:
        return "$0"
    decimals = max(2, 2 - math.floor(math.log10(abs(value))))
    return f"${value:.{decimals}f}"


def message_lines(messages: list[dict[str, Any]], prompt_text: str = "") -> list[str]:
    """A conversation as terminal lines. With ``prompt_text`` (the rendered prompt the model saw:
    template, system prompt, tool schemas), that text replaces the messages before the first
    assistant turn, so the transcript shows what the model was given, not the environment's plain text."""
    lines: list[str] = []
    if prompt_text:
        first = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), len(messages))
        lines += ["[prompt as the model saw it: chat template, system prompt and tool schemas]", prompt_text.rstrip()]
        messages = messages[first:]
    for m in messages:
        lines.append(f"[{m.get('role', '?')}] {m.get('content') or ''}")
        for tc in m.get("tool_calls") or []:
            fn = tc.get("function", tc) if isinstance(tc, dict) else {}
            lines.append(f"  -> call {fn.get('name')}({fn.get('arguments')})")
    return lines


def format_transcript(ro, *, tracebacks: bool = True) -> str:
    """Plain-text transcript of one rollout (for the terminal); ``tracebacks=False``: errors by
    their message only (the run's logs keep the tracebacks)."""
    lines = [f"--- rollout {ro.group_index}: {ro.termination}, reward {ro.reward:.3f} {ro.rewards}"]
    lines += message_lines(ro.messages, getattr(ro, "prompt_text", ""))
    for err in ro.errors:
        lines.append(f"!! {err.where}: {err.message}")
        if err.traceback and tracebacks:
            lines.append(err.traceback.rstrip())
    return "\n".join(lines)


__all__ = ["evaluate", "validate", "message_lines", "metric_text", "add_usage_totals", "tool_warnings",
           "ValidationReport", "signal_report",
           "SignalReport", "format_transcript", "Termination"]

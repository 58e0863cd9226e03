"""Metric names (one list, used by trainer, eval, store and console) and group statistics.

pass@k = share of prompts where at least one of the k rollouts succeeds (reward > the success
threshold); max@k = mean over prompts of the best reward among k; solve rate = share of all
rollouts that succeed. Left out: anything that needs a model or the store.
"""

from __future__ import annotations

import re
from collections import Counter
from statistics import fmean, pstdev

from rlft.types import Group

# group_metrics(): a batch's reward and rollout statistics, for training steps and evals alike.
# time/rollout is the mean of a per-rollout number the environment records for every rollout.
GROUP_KEYS = [
    "reward/mean", "reward/std", "reward/max", "pass@k", "max@k", "solve_rate",
    "response/length", "response/truncated_ratio", "rollout/turns", "rollout/tool_calls", "rollout/valid_tool_calls",
    "rollout/errors", "batch/zero_variance_groups", "time/rollout",
]
# evaluate() adds these to the group statistics; the trainer stores every eval key as eval/<key>
EVAL_KEYS = ["time/eval", "examples", "k"]
# The fixed keys the trainer stores as metric series (display order): the step's group statistics,
# the update's (rlft.training.update), the weight sync's (rlft.training.sync), the loop's clocks,
# then the evals'. Checked against a real run by tests/test_metrics_keys.py.
KEYS = GROUP_KEYS + [
    "loss/policy", "loss/kl", "policy/entropy", "policy/clip_ratio", "optim/grad_norm", "optim/lr",
    "batch/skipped_groups", "batch/trained_sequences", "batch/forward_tokens",
    "batch/recomputed_micro_batches", "batch/guided_groups",
    "sync/logprob_diff_mean", "sync/logprob_diff_max", "sync/policy_lag", "sync/policy_lag_max",
    "sync/probe_logprob_diff", "sync/probe_logprob_diff_max", "rollout/worker",
    "time/generate", "time/train", "time/step", "throughput/tokens_per_s",
    "env/tools",  # tool entries the environment offers (rlft.health's Monitor; tools_never_used reads it)
] + [f"eval/{k}" for k in GROUP_KEYS + EVAL_KEYS]
# KEYS that only some configurations emit, and why (every other entry is in every run's metrics)
OPTIONAL = {
    "sync/probe_logprob_diff": "the engine holds its own copy of the weights (overlap, LoRA's merged copy, a "
                               "server or vLLM) and sync_check is on; a full finetune's HF engine without overlap "
                               "runs the trainer's own module: nothing to probe. On-policy untruncated runs probe "
                               "only at the start and before evals (the rollouts check the other syncs)",
    "sync/probe_logprob_diff_max": "as sync/probe_logprob_diff",
    "rollout/worker": "rollout_workers > 0: the Ray rollout pool records each rollout's actor (rlft.ray_workers)",
    "batch/guided_groups": "guidance = \"demonstrate\" (rlft.training.guidance): unsolved groups given a demonstration",
}
# Families whose names depend on the environment, its judges and external models (<...>: any one
# path segment), in the step's metrics and, prefixed eval/, in the evals'.
PATTERNS = [
    "reward/<component>",      # mean of each reward function's score (its name)
    "termination/<reason>",    # share of rollouts that ended so (rlft.types.Termination values)
    "judge/<stat>",            # LLM judges, per rollout (rlft.rewards.judge): requests, tokens, cache_hits, ...
    "judge/<stat>_total",      # the same summed over the batch (all but judge/latency and JUDGE_NOT_SUMMED):
                               # judge/seconds_total = the step's judge time, judge/requests_total its calls
    "usage/<stat>",            # an external chat model's prompt/completion tokens, requests, cost, latency
]
# `rlft eval` also writes cost/total_usd, cost/per_request_usd, tokens/prompt and tokens/completion to its
# eval row (rlft.cli.main); those are not metric series.
# logprob judges' per-rubric figures (rlft.rewards.logprob_judge): a mean per rollout, no sum
JUDGE_NOT_SUMMED = ("judge/mass_", "judge/position_bias_")
_PATTERN_RES = [re.compile("(eval/)?" + re.sub("<[^>]+>", "[^/]+", re.escape(p))) for p in PATTERNS]


def is_known(key: str) -> bool:
    """Whether ``key`` is one of KEYS or matches one of PATTERNS (alone or under eval/)."""
    return key in KEYS or any(r.fullmatch(key) for r in _PATTERN_RES)


def group_metrics(groups: list[Group], success_threshold: float = 0.0) -> dict[str, float]:
    """Reward and rollout statistics of a batch of groups (reward/<component> included)."""
    rollouts = [r for g in groups for r in g.rollouts]
    if not rollouts:
        return {}
    rewards = [r.reward for r in rollouts]
    out: dict[str, float] = {
        "reward/mean": fmean(rewards),
        "reward/std": pstdev(rewards) if len(rewards) > 1 else 0.0,
        "reward/max": max(rewards),
        "pass@k": fmean(float(any(r.reward > success_threshold for r in g.rollouts)) for g in groups),
        "max@k": fmean(max(r.reward for r in g.rollouts) for g in groups),
        "solve_rate": fmean(float(r.reward > success_threshold) for r in rollouts),
        # sampled tokens; a rollout of an external chat model has none of ours: its usage's completion tokens
        "response/length": fmean(r.num_sampled_tokens or r.metrics.get("usage/completion_tokens", 0)
                                 for r in rollouts),
        "response/truncated_ratio": fmean(float(r.truncated) for r in rollouts),
        "rollout/turns": fmean(r.turns for r in rollouts),
        "rollout/tool_calls": fmean(r.tool_calls for r in rollouts),
        "rollout/valid_tool_calls": fmean(valid_tool_calls(r) for r in rollouts),
        "rollout/errors": fmean(float(bool(r.errors)) for r in rollouts),
        "batch/zero_variance_groups": float(sum(len({r.reward for r in g.rollouts}) == 1 for g in groups)),
    }
    components = sorted({k for r in rollouts for k in r.rewards})
    for c in components:
        out[f"reward/{c}"] = fmean(r.rewards.get(c, 0.0) for r in rollouts)
    # per-rollout numbers recorded by the environment, tools and judges (time/rollout,
    # judge/requests, judge/latency, ...): mean per rollout; judge/* also as step totals
    for key in sorted({k for r in rollouts for k in r.metrics}):
        values = [r.metrics.get(key, 0.0) for r in rollouts]
        out[key] = fmean(values)
        if key.startswith("judge/") and key != "judge/latency" and not key.startswith(JUDGE_NOT_SUMMED):
            out[key + "_total"] = sum(values)
    for reason, n in Counter(str(r.termination) for r in rollouts).items():
        out[f"termination/{reason}"] = n / len(rollouts)
    return out


# tool errors that mean the call itself was invalid (rlft.tools.execute_tool_call's error texts),
# as opposed to a valid call whose tool failed or timed out
INVALID_CALL_ERRORS = ("unknown tool", "malformed call", "arguments not an object", "invalid arguments")


def valid_tool_calls(rollout) -> int:
    """Tool calls that named a tool of the environment with well-formed arguments."""
    invalid = sum(e.where.startswith("tool:") and e.message.startswith(INVALID_CALL_ERRORS) for e in rollout.errors)
    return max(rollout.tool_calls - invalid, 0)


def zero_variance_share(groups: list[Group]) -> float:
    return sum(len({r.reward for r in g.rollouts}) == 1 for g in groups) / max(len(groups), 1)

"""The training-health diagnoses: pure functions over a run's stored metric series.

Each ``diagnose_*`` takes the series (``{key: [(step, value), ...]}``, as ``RunStore.metrics``
returns them) and a :class:`Context` (a few config values, whether the environment has tools,
and a callable that names the most common error message in a step window), and returns a
:class:`Finding` or ``None``. ``diagnose(series, ctx)`` runs them all; ``diagnose_eval`` runs
the ones that apply to a single eval (an external model's, say). Thresholds live in
``rlft.health.thresholds``; docs/health.md explains every finding. Left out: reading the store
(``rlft.health.source``), printing, and the reward audit (``rlft.health.audit``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from statistics import fmean

from rlft.health.findings import Evidence, Finding, sort_findings
from rlft.health.thresholds import MIN_STEPS, THRESHOLDS, WINDOW_FRACTION, WINDOW_MIN

Series = dict[str, list[tuple[int, float | None]]]
Points = list[tuple[int, float]]
NOT_COMPONENTS = {"mean", "std", "max"}  # reward/mean etc. are statistics, not components
ERROR_KEYS = ("rollout/errors", "termination/timeout", "termination/tool_error", "termination/reward_error",
              "termination/model_error", "termination/setup_error", "termination/error")


@dataclass
class Context:
    groups: float | None = None  # groups (prompts) per step: the config's batch_size
    learning_rate: float | None = None
    tools: int | None = None  # tools the environment offers (None: unknown, tools_never_used stays silent)
    # (first step, last step) -> (message, rollouts with it, rollouts with any error) or None
    top_error: Callable[[int, int], tuple[str, int, int] | None] | None = None


def points(series: Series, key: str, *, from_step: int = 1) -> Points:
    """A key's non-null points; training keys start at step 1 (step 0 is the base eval)."""
    return [(s, float(v)) for s, v in series.get(key, []) if v is not None and s >= from_step]


def ends(pts: Points) -> tuple[Points, Points]:
    """The early and late windows of a series."""
    w = max(WINDOW_MIN, round(len(pts) * WINDOW_FRACTION))
    return pts[:w], pts[-w:]


def mean(pts: Points) -> float:
    return fmean(v for _, v in pts) if pts else 0.0


def _ev(key: str, pts: Points) -> Evidence:
    return Evidence(key=key, steps=[s for s, _ in pts], values=[round(v, 6) for _, v in pts])


def _window(pts: Points) -> tuple[int, int]:
    return (pts[0][0], pts[-1][0])


def tied_share(series: Series, ctx: Context) -> Points:
    """Per step, the share of groups whose rollouts all got the same reward."""
    tied = points(series, "batch/zero_variance_groups")
    if not ctx.groups:
        return []
    return [(s, min(v / ctx.groups, 1.0)) for s, v in tied]


# -- the diagnoses -----------------------------------------------------------------------------------


def diagnose_no_signal(series: Series, ctx: Context) -> Finding | None:
    t = THRESHOLDS["no_signal"]
    reward, passk = points(series, "reward/mean"), points(series, "pass@k")
    tied = tied_share(series, ctx)
    if len(reward) < MIN_STEPS or not passk or not tied:
        return None
    r_range = max(v for _, v in reward) - min(v for _, v in reward)
    p_range = max(v for _, v in passk) - min(v for _, v in passk)
    share = mean(tied)
    if r_range > t["flat_range"] or p_range > t["flat_range"] or share < t["tied_share"]:
        return None
    level = mean(passk)
    why = ("nothing succeeds: too hard" if level < 0.5 else "everything succeeds: too easy")
    return Finding(
        "no_signal", "critical", "no learning signal",
        f"reward stayed {mean(reward):.3f} (range {r_range:.3f}) and pass@k {level:.2f} from the start; "
        f"{share:.0%} of groups tied ({why})",
        "give the groups something to disagree on: easier/harder `data`, partial-credit rewards, a larger "
        "`group_size` or a higher `temperature`",
        "reward/mean", _window(reward),
        [_ev("reward/mean", reward), _ev("pass@k", passk), _ev("batch/tied_share", tied)], {"tied_share": share})


def diagnose_exploiting_subset(series: Series, ctx: Context) -> Finding | None:
    t = THRESHOLDS["exploiting_subset"]
    reward, passk = points(series, "reward/mean"), points(series, "pass@k")
    if len(reward) < MIN_STEPS or len(passk) < MIN_STEPS:
        return None
    (r0, r1), (p0, p1) = ends(reward), ends(passk)
    rise, p_move = mean(r1) - mean(r0), mean(p1) - mean(p0)
    if rise < t["reward_rise"] or p_move > t["pass_flat"] or mean(p1) >= t["pass_ceiling"]:
        return None
    return Finding(
        "exploiting_subset", "warning", "reward up, pass@k flat",
        f"mean reward {mean(r0):.3f} -> {mean(r1):.3f} while pass@k {mean(p0):.2f} -> {mean(p1):.2f}: the policy "
        "gets better on prompts it already solves (or on partial credit), not on new ones",
        "add prompts it can just reach (`data`), check partial-credit rewards, or raise `group_size` so rare "
        "successes are sampled", "pass@k", (r0[0][0], r1[-1][0]), [_ev("reward/mean", reward), _ev("pass@k", passk)])


def _components(series: Series) -> list[str]:
    return sorted(k for k in series if k.startswith("reward/") and k.split("/", 1)[1] not in NOT_COMPONENTS)


def diagnose_reward_hacking(series: Series, ctx: Context) -> Finding | None:
    t = THRESHOLDS["reward_hacking"]
    moves = {}
    for key in _components(series):
        pts = points(series, key)
        if len(pts) >= MIN_STEPS:
            a, b = ends(pts)
            moves[key] = (mean(b) - mean(a), pts)
    up = max(moves, key=lambda k: moves[k][0]) if len(moves) >= 2 else None
    down = min(moves, key=lambda k: moves[k][0]) if len(moves) >= 2 else None
    if up and down and moves[up][0] >= t["component_rise"] and moves[down][0] <= -t["component_fall"]:
        pts_up, pts_down = moves[up][1], moves[down][1]
        return Finding(
            "reward_hacking", "critical", "one reward component up, another down",
            f"{up} rose {moves[up][0]:+.3f} while {down} fell {moves[down][0]:+.3f}: the policy may be "
            f"trading {down.split('/', 1)[1]} for {up.split('/', 1)[1]}",
            f"read rollouts where {up} is high; lower that component's weight in the environment's rewards "
            "or cap it (e.g. a length limit)", up, _window(pts_up), [_ev(up, pts_up), _ev(down, pts_down)],
            {"rising": up, "falling": down})
    train, held = points(series, "reward/mean"), points(series, "eval/reward/mean", from_step=0)
    if len(train) >= MIN_STEPS and len(held) >= 2:
        a, b = ends(train)
        rise, fall = mean(b) - mean(a), held[-1][1] - held[0][1]
        if rise >= t["train_rise"] and fall <= -t["eval_fall"]:
            return Finding(
                "reward_hacking", "critical", "train reward up, held-out reward down",
                f"train reward {mean(a):.3f} -> {mean(b):.3f} while held-out reward {held[0][1]:.3f} -> "
                f"{held[-1][1]:.3f}: what it learns does not carry over (memorizing, or a reward it can game)",
                "read train rollouts with high reward; check the reward cannot be met without solving the task, "
                "or take the best held-out checkpoint (`--step best`; evals every `eval_every` steps)",
                "eval/reward/mean", (held[0][0], held[-1][0]),
                [_ev("reward/mean", train), _ev("eval/reward/mean", held)])
    return None


def diagnose_entropy_collapse(series: Series, ctx: Context) -> Finding | None:
    t = THRESHOLDS["entropy_collapse"]
    trained = {s for s, v in points(series, "batch/trained_sequences") if v == 0}
    # a step that trained on nothing reports entropy 0: not a measurement
    ent = [(s, v) for s, v in points(series, "policy/entropy") if s not in trained]
    if len(ent) < MIN_STEPS:
        return None
    a, b = ends(ent)
    e0, e1 = mean(a), mean(b)
    reward = points(series, "reward/mean")
    gain = mean(ends(reward)[1]) - mean(ends(reward)[0]) if len(reward) >= 2 else 0.0
    dropped = e0 > 0 and e1 <= t["ratio"] * e0 and gain < t["reward_gain"]
    if not (dropped or e1 <= t["floor"]):
        return None
    lr = f" at learning rate {ctx.learning_rate:g}" if ctx.learning_rate else ""
    return Finding(
        "entropy_collapse", "critical", "entropy collapse",
        f"policy entropy {e0:.3f} -> {e1:.3f} nats/token{lr} while reward moved {gain:+.3f}: the policy stops "
        "exploring without getting better, and its groups tie",
        "lower `learning_rate` (or add `warmup_steps`), raise `temperature`, or keep a KL penalty to the base "
        "model (`beta`)",
        "policy/entropy", _window(ent), [_ev("policy/entropy", ent)] + ([_ev("reward/mean", reward)] if reward else []),
        {"early": e0, "late": e1, "reward_gain": gain})


def diagnose_truncation(series: Series, ctx: Context) -> Finding | None:
    t = THRESHOLDS["truncation"]
    tr = points(series, "response/truncated_ratio")
    if len(tr) < MIN_STEPS:
        return None
    a, b = ends(tr)
    s0, s1 = mean(a), mean(b)
    if not ((s1 >= t["share"] and s1 - s0 >= t["rise"]) or s1 >= t["high"]):
        return None
    length = points(series, "response/length")
    return Finding(
        "truncation", "warning", "responses run into the length limit",
        f"truncated share {s0:.0%} -> {s1:.0%}" + (f", mean length {mean(ends(length)[0]):.0f} -> "
                                                   f"{mean(ends(length)[1]):.0f} tokens" if length else ""),
        "raise the environment's `max_tokens`, set `overlong = \"penalty\"` (or \"filter\"), or ask for shorter "
        "answers in the system prompt", "response/truncated_ratio", _window(tr),
        [_ev("response/truncated_ratio", tr)] + ([_ev("response/length", length)] if length else []))


def diagnose_errors(series: Series, ctx: Context) -> Finding | None:
    t = THRESHOLDS["errors"]
    worst = None
    for key in ERROR_KEYS:
        pts = points(series, key)
        if len(pts) < MIN_STEPS:
            continue
        a, b = ends(pts)
        s0, s1 = mean(a), mean(b)
        firing = (s1 >= t["share"] and s1 - s0 >= t["rise"]) or s1 >= t["high"]
        if firing and (worst is None or s1 > worst[2]):
            worst = (key, s0, s1, pts)
    if worst is None:
        return None
    key, s0, s1, pts = worst
    what = "rollouts with errors" if key == "rollout/errors" else f"rollouts ending {key.split('/', 1)[1]}"
    details: dict = {}
    summary = f"{what}: {s0:.0%} -> {s1:.0%}"
    top = ctx.top_error(*_window(ends(pts)[1])) if ctx.top_error else None
    if top:
        details = {"top_error": top[0], "top_error_count": top[1], "rollouts_with_errors": top[2]}
        summary += f"; most common error ({top[1]} of {top[2]} rollouts with errors): {top[0][:160]}"
    return Finding(
        "errors", "critical" if s1 >= t["high"] else "warning", "errors rising", summary,
        "read the errors (`rlft runs logs RUN`); a tool timing out: raise `tool_timeout` or fix the tool; "
        "a reward failing: fix it (failed components score 0)", key, _window(pts), [_ev(key, pts)], details)


def diagnose_logprob_mismatch(series: Series, ctx: Context) -> Finding | None:
    t = THRESHOLDS["logprob_mismatch"]
    for key in ("sync/logprob_diff_mean", "sync/probe_logprob_diff"):
        pts = points(series, key)
        if len(pts) < MIN_STEPS:
            continue
        a, b = ends(pts)
        d0, d1 = mean(a), mean(b)
        if d1 >= t["level"] or (d1 >= t["min_level"] and d1 >= t["growth"] * max(d0, 1e-12)):
            return Finding(
                "logprob_mismatch", "warning", "sampler and trainer disagree",
                f"{key} {d0:.4f} -> {d1:.4f} nats/token: the rollouts' logprobs drift from the trainer's, so the "
                "update is off-policy",
                "sample in float32 (`dtype = \"float32\"`) or check the engine's weights sync (`engine`, "
                "`sync_tolerance`); bf16 noise alone is ~0.05", key, _window(pts), [_ev(key, pts)])
    return None


def diagnose_learning_stalled(series: Series, ctx: Context) -> Finding | None:
    t = THRESHOLDS["learning_stalled"]
    reward = points(series, "reward/mean")
    f = int(t["flat_steps"])
    if len(reward) < 2 * f:
        return None
    flat, prev, early = reward[-f:], reward[-2 * f:-f], ends(reward)[0]
    best = max((v for _, v in points(series, "reward/max")), default=1.0) or 1.0
    rose = mean(prev) - mean(early)
    moved = mean(flat) - mean(prev)
    if rose < t["rise"] or moved > t["flat_delta"] or mean(flat) >= t["ceiling"] * best:
        return None
    lrs = points(series, "optim/lr")
    lr = lrs[-1][1] if lrs else ctx.learning_rate
    return Finding(
        "learning_stalled", "warning", "learning stalled",
        f"reward rose {mean(early):.3f} -> {mean(prev):.3f}, then {mean(flat):.3f} over the last {f} steps "
        f"(change {moved:+.3f})" + (f"; learning rate now {lr:g}" if lr is not None else ""),
        "if the learning rate has decayed, raise `learning_rate` or use `lr_schedule = \"constant\"`; otherwise "
        "add harder prompts (`data`) or raise `group_size`", "reward/mean", _window(flat),
        [_ev("reward/mean", reward[-2 * f:])] + ([_ev("optim/lr", lrs[-2 * f:])] if lrs else []))


SFT_ADVICE = ("warm the model up on demonstrations that call the tools, in the RL run itself: `sft_data = "
              "\"demonstrate\"` (the environment's demonstrate(example)) or `sft_data = \"demos.jsonl\"` "
              "(transcripts; `rlft traces import`, `rlft sft --from-run`); or say in the system prompt when to call "
              "which tool")


def diagnose_tools_never_used(series: Series, ctx: Context) -> Finding | None:
    t = THRESHOLDS["tools_never_used"]
    if not ctx.tools:
        return None
    key = "rollout/valid_tool_calls" if "rollout/valid_tool_calls" in series else "rollout/tool_calls"
    calls, reward = points(series, key), points(series, "reward/mean")
    if len(calls) < t["min_steps"] or mean(calls) > t["max_calls"]:
        return None
    rise = mean(ends(reward)[1]) - mean(ends(reward)[0]) if len(reward) >= 2 else 0.0
    rising = rise >= t["rise"]
    return Finding(
        "tools_never_used", "critical" if rising else "warning", "tools never used",
        f"the environment offers {ctx.tools} tool(s) but {mean(calls):.2f} valid calls per rollout over "
        f"{len(calls)} steps" + (f", while reward rose {mean(ends(reward)[0]):.3f} -> {mean(ends(reward)[1]):.3f} "
                                 "on partial credit" if rising else ""),
        SFT_ADVICE, key, _window(calls), [_ev(key, calls)] + ([_ev("reward/mean", reward)] if reward else []))


def diagnose_trained_on_nothing(series: Series, ctx: Context) -> Finding | None:
    t = THRESHOLDS["trained_on_nothing"]
    seqs = points(series, "batch/trained_sequences")
    if len(seqs) < t["min_steps"]:
        return None
    empty = [(s, v) for s, v in seqs if v == 0]
    share = len(empty) / len(seqs)
    if not empty or share < t["share"]:
        return None
    return Finding(
        "trained_on_nothing", "critical" if share >= 0.5 else "warning", "steps trained on nothing",
        f"{len(empty)} of {len(seqs)} steps ({share:.0%}) had every group tied, so the update had no sequence to "
        "train on", "make groups disagree: a larger `group_size`, partial-credit rewards, or "
        "`dynamic_sampling = \"refill\"` to replace tied groups", "batch/trained_sequences", _window(seqs),
        [_ev("batch/trained_sequences", seqs)], {"share": share, "steps": [s for s, _ in empty]})


DIAGNOSES = [diagnose_no_signal, diagnose_trained_on_nothing, diagnose_tools_never_used, diagnose_reward_hacking,
             diagnose_exploiting_subset, diagnose_entropy_collapse, diagnose_truncation, diagnose_errors,
             diagnose_logprob_mismatch, diagnose_learning_stalled]


def diagnose(series: Series, ctx: Context | None = None) -> list[Finding]:
    """Every diagnosis over a run's series; most severe first."""
    ctx = ctx or Context()
    return sort_findings([f for d in DIAGNOSES if (f := d(series, ctx)) is not None])


def diagnose_eval(metrics: dict[str, float], ctx: Context | None = None) -> list[Finding]:
    """The diagnoses that apply to one eval (an external model's, or a checkpoint's): levels, not
    trends. No signal (tied prompts), truncation and errors at or above their ``share``, and tools
    never used. ``metrics``: an eval's metrics (``group_metrics`` keys plus ``examples``)."""
    ctx = ctx or Context()
    out: list[Finding] = []

    def level(name: str, severity: str, title: str, key: str, value: float, summary: str, advice: str,
              **details: float) -> None:
        out.append(Finding(name, severity, title, summary, advice, key, (0, 0), [Evidence(key, [0], [value])],
                           dict(details)))

    n = metrics.get("examples") or ctx.groups
    tied = metrics.get("batch/zero_variance_groups", 0.0) / n if n else 0.0
    if n and tied >= THRESHOLDS["no_signal"]["tied_share"]:
        p = metrics.get("pass@k", 0.0)
        level("no_signal", "warning", "little to learn from", "pass@k", p,
              f"{tied:.0%} of prompts got the same reward on every sample (pass@k {p:.2f}): as training data, "
              "GRPO would get no gradient from them",
              "for training: easier/harder `data`, partial-credit rewards, or a larger `group_size`", tied_share=tied)
    tr = metrics.get("response/truncated_ratio", 0.0)
    if tr >= THRESHOLDS["truncation"]["share"]:
        level("truncation", "warning", "responses run into the length limit", "response/truncated_ratio", tr,
              f"{tr:.0%} of samples were truncated", "raise the environment's `max_tokens` or ask for shorter answers")
    for key in ERROR_KEYS:
        v = metrics.get(key, 0.0)
        if v >= THRESHOLDS["errors"]["share"]:
            top = ctx.top_error(0, 0) if ctx.top_error else None
            level("errors", "critical" if v >= THRESHOLDS["errors"]["high"] else "warning", "errors", key, v,
                  f"{v:.0%} of samples: {key}" + (f"; most common: {top[0][:160]}" if top else ""),
                  "read the errors; a tool timing out: raise `tool_timeout`; a reward failing: fix it")
            break
    calls = metrics.get("rollout/valid_tool_calls", metrics.get("rollout/tool_calls"))
    if ctx.tools and calls is not None and calls <= THRESHOLDS["tools_never_used"]["max_calls"]:
        level("tools_never_used", "warning", "tools never used", "rollout/tool_calls", calls,
              f"the environment offers {ctx.tools} tool(s) but the model made {calls:.2f} valid calls per sample",
              SFT_ADVICE)
    return sort_findings(out)


__all__ = ["Context", "DIAGNOSES", "SFT_ADVICE", "diagnose", "diagnose_eval", "points", "ends"]

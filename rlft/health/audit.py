"""The reward audit of ``rlft validate``: what each reward component can teach, from sampled rollouts.

Per component, over the rollouts' ``rewards`` (unweighted components) and ``reward`` (the weighted
total): its mean, spread and share of zeros; **constant** (no variance: it cannot teach, GRPO only
sees differences), **always zero**; its correlation with the total and with every other component
(**duplicate**: |r| >= ``DUPLICATE_R`` with another one, e.g. a format check that only mirrors
correctness); the **share of the total's variance** it carries (``cov(w·c, total) / var(total)``:
the shares sum to 1, and a component near 0 barely steers training); a **weight whose sign
contradicts the name** (``penalty``, ``cost``... with a positive weight and positive values); and
for a **judge** component (an LLM judge), its spread within groups (a judge that scores siblings
alike gives no signal). Advice is one line per flag. Pure: no I/O, no models.
Left out: sampling the rollouts (``rlft.cli.main.cmd_validate``) and printing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from statistics import fmean, pstdev
from typing import Any

DUPLICATE_R = 0.95  # |correlation| at or above which two components say the same thing
SMALL_SHARE = 0.02  # share of the total's variance below which a component barely steers training
JUDGE_FLAT = 0.02  # mean within-group std of a judge's scores below which it cannot rank siblings
PENALTY_NAMES = re.compile(r"penal|cost|violation|mistake|error|wrong", re.I)
JUDGE_NAMES = re.compile(r"judge|rubric|llm", re.I)


@dataclass
class ComponentAudit:
    name: str
    weight: float
    mean: float
    std: float
    zero_share: float
    corr_total: float | None  # None when either side is constant
    corr: dict[str, float | None] = field(default_factory=dict)  # with each other component
    variance_share: float | None = None
    judge_group_std: float | None = None  # judges only: mean std of the score within a group
    flags: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)


@dataclass
class RewardAudit:
    rollouts: int
    total_std: float
    components: list[ComponentAudit]

    @property
    def warnings(self) -> list[str]:
        return [f"{c.name}: {a}" for c in self.components for a in c.advice]

    def to_dict(self) -> dict[str, Any]:
        return {"rollouts": self.rollouts, "total_std": self.total_std,
                "components": [asdict(c) for c in self.components], "warnings": self.warnings}


def pearson(x: list[float], y: list[float]) -> float | None:
    if len(x) < 2 or pstdev(x) == 0 or pstdev(y) == 0:
        return None
    mx, my = fmean(x), fmean(y)
    cov = fmean((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / (pstdev(x) * pstdev(y))


def _cov(x: list[float], y: list[float]) -> float:
    mx, my = fmean(x), fmean(y)
    return fmean((a - mx) * (b - my) for a, b in zip(x, y))


def audit_rewards(groups: Iterable[Iterable[Any]], weights: dict[str, float],
                  judges: Iterable[str] = ()) -> RewardAudit:
    """Audit reward components. ``groups``: the sampled rollouts, one iterable per prompt (objects
    with ``rewards`` and ``reward``); ``weights``: each component's weight (a dict-returning reward
    gives each of its keys its weight; missing components weigh 1, as in scoring); ``judges``:
    names of components scored by an LLM judge (also guessed from the name)."""
    groups = [list(g) for g in groups]
    rollouts = [r for g in groups for r in g]
    names = sorted({k for r in rollouts for k in r.rewards})
    cols = {n: [float(r.rewards.get(n, 0.0)) for r in rollouts] for n in names}
    total = [float(r.reward) for r in rollouts]
    var_total = pstdev(total) ** 2 if len(total) > 1 else 0.0
    judges = set(judges)
    out = []
    for n in names:
        x, w = cols[n], float(weights.get(n, 1.0))
        std = pstdev(x) if len(x) > 1 else 0.0
        c = ComponentAudit(n, w, fmean(x) if x else 0.0, std, fmean(v == 0 for v in x) if x else 0.0,
                           pearson(x, total), {m: pearson(x, cols[m]) for m in names if m != n})
        if var_total > 0:
            c.variance_share = _cov([w * v for v in x], total) / var_total
        if x and all(v == 0 for v in x):
            c.flags.append("always zero")
            c.advice.append(f"always 0 over {len(x)} rollouts: it cannot teach; check that it can be earned "
                            "(or that it does not fail silently)")
        elif std == 0:
            c.flags.append("constant")
            c.advice.append(f"the same value ({x[0]:g}) on all {len(x)} rollouts: no variance, so it teaches nothing "
                            "(GRPO learns from differences within a group)")
        dup = [m for m, r in c.corr.items() if r is not None and abs(r) >= DUPLICATE_R]
        if dup:
            c.flags.append("duplicate")
            c.advice.append(f"correlates {c.corr[dup[0]]:+.2f} with {dup[0]}: the two say the same thing; "
                            "drop one or fold them into one component")
        if c.variance_share is not None and std > 0 and abs(c.variance_share) < SMALL_SHARE and w != 0:
            c.flags.append("small share")
            c.advice.append(f"carries {c.variance_share:.1%} of the total's variance: it barely steers training; "
                            "raise its weight if it matters")
        if PENALTY_NAMES.search(n) and w > 0 and c.mean > 0:
            c.flags.append("sign")
            c.advice.append(f"its name says penalty but weight {w:+g} with positive values rewards it; "
                            "use a negative weight (Reward(fn, weight=-...))")
        if n in judges or JUDGE_NAMES.search(n):
            spreads = [pstdev([float(r.rewards.get(n, 0.0)) for r in g]) for g in groups if len(g) > 1]
            c.judge_group_std = fmean(spreads) if spreads else None
            if c.judge_group_std is not None and c.judge_group_std < JUDGE_FLAT and std > 0:
                c.flags.append("judge flat")
                c.advice.append(f"the judge scores siblings alike (mean within-group std {c.judge_group_std:.3f}): "
                                "a finer rubric or scale would let it rank them")
        out.append(c)
    return RewardAudit(len(rollouts), math.sqrt(var_total), out)


def reward_weights(rewards: Iterable[Any], rollouts: Iterable[Any]) -> tuple[dict[str, float], set[str]]:
    """(component -> weight, judge components) from an environment's ``Reward`` objects. A reward
    that returns a dict names its components by the dict's keys: those keys get its weight when
    exactly one reward is of that kind (else 1, which is what scoring uses for unknown names)."""
    rewards = list(rewards)
    seen = {k for r in rollouts for k in r.rewards}
    weights = {rw.name: float(rw.weight) for rw in rewards}
    dict_rewards = [rw for rw in rewards if rw.name not in seen]
    for k in seen - weights.keys():
        weights[k] = float(dict_rewards[0].weight) if len(dict_rewards) == 1 else 1.0
    judges = {rw.name for rw in rewards
              if "judge" in (getattr(rw.fn, "__module__", "") or "") or "judge" in type(rw.fn).__name__.lower()}
    if len(dict_rewards) == 1 and dict_rewards[0].name in judges:
        judges |= seen - {rw.name for rw in rewards}
    return weights, judges


def audit_table(audit: RewardAudit) -> tuple[list[str], list[tuple]]:
    """Headers and rows for a terminal table."""
    def f(x: float | None, spec: str = ".2f") -> str:
        return "-" if x is None else format(x, spec)

    rows = []
    for c in audit.components:
        others = [(m, r) for m, r in c.corr.items() if r is not None]
        top = max(others, key=lambda t: abs(t[1]), default=None)
        rows.append((c.name, f"{c.weight:+g}", f(c.mean, ".3f"), f(c.std, ".3f"), f"{c.zero_share:.0%}",
                     f(c.corr_total), f"{top[0]} {top[1]:+.2f}" if top else "-",
                     f(c.variance_share, ".0%"), ", ".join(c.flags) or "ok"))
    return ["component", "weight", "mean", "std", "zeros", "r(total)", "most correlated", "var share", "flags"], rows


__all__ = ["ComponentAudit", "RewardAudit", "audit_rewards", "audit_table", "pearson", "reward_weights"]

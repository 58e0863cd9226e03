"""The diagnoses over a stored run: what the CLI, the console and the trainer call.

``run_findings(store, run_id)`` reads the run's metric series, config and (only when the errors
diagnosis fires) its rollouts' error messages, and returns the findings. ``error_summary``
groups a run's rollout errors by message (``rlft runs logs``); ``status_label`` says
"completed with errors" when rollouts' rewards failed. ``Monitor`` is the trainer's hook: it
records which tools the environment offers and prints a line when a finding first appears.
Imports only the standard library and ``rlft.health``; the store is passed in and only its reader
API is used (the trainer's ``Monitor`` also notes lines through ``run.note``), so the console can
use this without torch. Left out: the diagnoses (``rlft.health.diagnoses``).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from rlft.health.diagnoses import Context, diagnose, diagnose_eval
from rlft.health.findings import Finding

TOOLS_KEY = "env/tools"  # logged by the trainer each step: how many tool entries the environment has


def _normal(message: str) -> str:
    """An error message with numbers and quoted values blurred, so the same failure counts once."""
    return re.sub(r"\d+(\.\d+)?", "N", message.strip().splitlines()[0] if message.strip() else "")[:300]


def error_summary(store: Any, run_id: str, split: str | None = "train", first_step: int | None = None,
                  last_step: int | None = None, top: int = 10) -> tuple[list[dict[str, Any]], int]:
    """(the most common rollout error messages with where, count, first and last step; rollouts
    with any error) over a step range."""
    rows = store.rollout_errors(run_id, split=split, first_step=first_step, last_step=last_step)
    counts: Counter = Counter()
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        for err in {(e.get("where", "?"), _normal(e.get("message", ""))): e for e in row["errors"]}.items():
            (where, msg), e = err
            counts[(where, msg)] += 1
            text = e.get("message", "").strip()
            info = seen.setdefault((where, msg), {"where": where, "message": text.splitlines()[0] if text else "",
                                                  "first_step": row["step"], "example_id": row["example_id"]})
            info["last_step"] = row["step"]
    out = [seen[k] | {"count": n} for k, n in counts.most_common(top)]
    return out, len(rows)


def run_context(store: Any, run_id: str, series: dict[str, list] | None = None) -> Context:
    cfg = store.get_run(run_id).get("config") or {}
    tools_pts = (series or {}).get(TOOLS_KEY) or store.metrics(run_id, [TOOLS_KEY]).get(TOOLS_KEY) or []
    tools = int(tools_pts[-1][1]) if tools_pts and tools_pts[-1][1] is not None else None

    def top_error(first: int, last: int):
        summary, n = error_summary(store, run_id, first_step=first, last_step=last, top=1)
        return (f"{summary[0]['where']}: {summary[0]['message']}", summary[0]["count"], n) if summary else None

    return Context(groups=cfg.get("batch_size"), learning_rate=cfg.get("learning_rate"), tools=tools,
                   top_error=top_error)


def run_findings(store: Any, run_id: str, series: dict[str, list] | None = None) -> list[Finding]:
    """The run's findings; ``series``: its metric series when the caller keeps them (the
    console), else read from the store."""
    series = store.metrics(run_id) if series is None else series
    return diagnose(series, run_context(store, run_id, series))


def eval_findings(store: Any) -> dict[int, list[Finding]]:
    """Findings of each external-model eval (``rlft eval --base-url``), by eval id. A run's own
    evals are covered by its series (``eval/*``): a trained checkpoint that solves most prompts
    would only repeat "little to learn from"."""
    return {e["id"]: diagnose_eval(e.get("metrics") or {}) for e in store.evals() if e.get("run_id") is None}


def status_label(store: Any, run: dict[str, Any], counts: dict[str | None, int] | None = None) -> str:
    """The run's status, "completed with errors (N rollouts with reward errors)" when rewards failed.
    ``counts``: the run's train rollouts by termination when the caller has them (else counted here)."""
    status = run.get("status") or ""
    if status != "completed":
        return status
    n = (counts if counts is not None else store.termination_counts(run["id"])).get("reward_error", 0)
    return f"completed with errors ({n} rollouts with reward errors)" if n else status


class Monitor:
    """The trainer's health hook, called once per step before the step's metrics are stored.

    It keeps each run's series in memory and reads from the store only the steps from its
    previous call on: that step's later rows (the eval after it, the weight push) and anything
    newer. Reading the whole series each step would cost O(steps x keys) per step, which grows
    with the run. A step that goes back (a resume in this process) starts the cache again."""

    def __init__(self) -> None:
        self.announced: dict[str, set[str]] = {}
        self.cache: dict[str, tuple[int, dict[str, dict[int, float | None]]]] = {}  # run -> (last step, series)

    def series(self, store: Any, run_id: str, at_step: int) -> dict[str, list[tuple[int, float | None]]]:
        """The run's stored series, read incrementally (see the class docstring)."""
        last, data = self.cache.get(run_id, (None, {}))
        if last is not None and at_step <= last:
            last, data = None, {}
        for key, points in store.metrics(run_id, since_step=last).items():
            data.setdefault(key, {}).update(points)
        self.cache[run_id] = (at_step, data)
        return {k: sorted(v.items()) for k, v in data.items()}

    def __call__(self, run: Any, at_step: int, metrics: dict[str, float]) -> list[Finding]:
        metrics[TOOLS_KEY] = float(len(run.env.tools))
        series = self.series(run.store, run.run_id, at_step)
        for k, v in metrics.items():  # this step is not stored yet
            series.setdefault(k, []).append((at_step, v))
        seen = self.announced.setdefault(run.run_id, set())
        new = [f for f in diagnose(series, run_context(run.store, run.run_id, series)) if f.name not in seen]
        for f in new:
            seen.add(f.name)
            run.note(f.line(), level="warning", step=at_step, source="health")
        return new


watch = Monitor()

__all__ = ["Monitor", "error_summary", "eval_findings", "run_context", "run_findings", "status_label", "watch"]

"""What the console's JSON routes return: plain functions over a read-only :class:`RunStore`.

Each function takes the store and request arguments and returns JSON-ready dicts and lists (run
summaries, metric series, filtered rollout pages, the reward heatmap, a comparison of runs). No
HTTP here (that is :mod:`rlft.console.app`) and no writes: the store is opened read-only and
only its reader API is used. Filters the store cannot express in SQL (a reward component's
range, "has errors") are applied here over a bounded scan of the matching rollouts.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from rlft.health.source import eval_findings, run_findings, status_label
from rlft.metrics import KEYS
from rlft.store import RunStore
from rlft.types import Termination

SCAN_PAGE = 500
SCAN_MAX = 20_000  # rollouts scanned at most for a component / errors filter
PREVIEW_CHARS = 200


def _duration(run: dict[str, Any], now: float | None = None) -> float | None:
    start = run.get("started_at") or run.get("created_at")
    if not start:
        return None
    end = run.get("finished_at") or (now or time.time())
    return max(end - start, 0.0)


def run_summary(store: RunStore, run: dict[str, Any]) -> dict[str, Any]:
    """A runs-list row: the run's columns plus latest reward, pass@k, planned steps and duration."""
    latest = store.latest_metrics(run["id"])
    config = run.get("config") or {}
    return {
        "id": run["id"], "kind": run.get("kind") or "rl", "name": run.get("name"), "status": run.get("status"),
        "model": run.get("model"),
        "environment": run.get("environment"), "step": run.get("step"), "steps": config.get("steps"),
        "created_at": run.get("created_at"), "started_at": run.get("started_at"),
        "finished_at": run.get("finished_at"), "updated_at": run.get("updated_at"), "duration": _duration(run),
        "status_label": status_label(store, run),
        "error": run.get("error"), "reward": latest.get("reward/mean"), "pass_at_k": latest.get("pass@k"),
        "eval_reward": latest.get("eval/reward/mean"), "k": config.get("group_size"),
        "loss": latest.get("eval/loss", latest.get("sft/loss")),  # SFT runs: held-out loss, else training loss
    }


def list_runs(store: RunStore) -> list[dict[str, Any]]:
    return [run_summary(store, r) for r in store.list_runs()]


def run_detail(store: RunStore, run_id: str) -> dict[str, Any]:
    """The run page header: summary, error and traceback, latest metrics, checkpoints, counts."""
    run = store.get_run(run_id)
    out = run_summary(store, run)
    out.update(traceback=run.get("traceback"), stop_requested=run.get("stop_requested"),
               latest=store.latest_metrics(run_id), checkpoints=store.checkpoints(run_id),
               rollouts={"train": store.count_rollouts(run_id, split="train"),
                         "eval": store.count_rollouts(run_id, split="eval")})
    return out


def metrics(store: RunStore, run_id: str, keys: list[str] | None = None, after_step: int | None = None
            ) -> dict[str, list[list[float | None]]]:
    """``{key: [[step, value], ...]}``; ``after_step``: only points at larger steps (polling)."""
    series = store.metrics(run_id, keys)
    if after_step is not None:
        series = {k: [p for p in pts if p[0] > after_step] for k, pts in series.items()}
    return {k: [list(p) for p in pts] for k, pts in series.items()}


def evals(store: RunStore, run_id: str) -> dict[str, Any]:
    """The run's evals (base at step 0, checkpoints) and evals of external models (no run)."""
    findings = eval_findings(store)
    external = [e | {"findings": [f.to_dict() for f in findings.get(e["id"], [])]} for e in store.evals()
                if e.get("run_id") is None]
    return {"run": store.evals(run_id), "external": external}


def health(store: RunStore, run_id: str) -> dict[str, Any]:
    """The run's training-health findings (docs/health.md), most severe first."""
    return {"findings": [f.to_dict() for f in run_findings(store, run_id)]}


def _preview(messages: list[dict[str, Any]], role: str, last: bool) -> str:
    texts = [m.get("content") for m in messages if m.get("role") == role]
    texts = [t if isinstance(t, str) else str(t) for t in texts if t]
    if not texts:
        return ""
    text = texts[-1] if last else texts[0]
    return text[:PREVIEW_CHARS] + ("…" if len(text) > PREVIEW_CHARS else "")


def rollout_row(r: dict[str, Any]) -> dict[str, Any]:
    """A rollout without its full messages: what the rollouts list shows."""
    msgs = r.get("messages") or []
    return {k: r.get(k) for k in ("id", "step", "split", "example_id", "group_index", "reward", "rewards", "advantage",
                                  "termination", "turns", "tool_calls", "num_prompt_tokens", "num_completion_tokens",
                                  "num_sampled_tokens", "policy_version")} | {
        "errors": len(r.get("errors") or []),
        "prompt": _preview(msgs, "user", last=False),
        "answer": _preview(msgs, "assistant", last=True),
    }


def _keep(r: dict[str, Any], component: str | None, cmin: float | None, cmax: float | None,
          has_errors: bool | None) -> bool:
    if component:
        v = (r.get("rewards") or {}).get(component)
        if v is None or (cmin is not None and v < cmin) or (cmax is not None and v > cmax):
            return False
    return has_errors is None or bool(r.get("errors")) == has_errors


def rollouts(store: RunStore, run_id: str, *, component: str | None = None, cmin: float | None = None,
             cmax: float | None = None, has_errors: bool | None = None, limit: int = 50, offset: int = 0,
             **filters: Any) -> dict[str, Any]:
    """A page of rollout rows and the total matching. ``filters``: the store's rollout filters
    (step, split, example_id, min_reward, max_reward, termination, search); ``component`` with
    ``cmin``/``cmax``: that reward component's range; ``has_errors``: with/without errors."""
    limit = max(1, min(int(limit), 500))
    offset = max(0, int(offset))
    if not component and has_errors is None:
        rows = store.rollouts(run_id, limit=limit, offset=offset, **filters)
        return {"total": store.count_rollouts(run_id, **filters), "items": [rollout_row(r) for r in rows],
                "truncated": False}
    matched: list[dict[str, Any]] = []
    scanned, truncated = 0, False
    while True:
        batch = store.rollouts(run_id, limit=SCAN_PAGE, offset=scanned, **filters)
        scanned += len(batch)
        matched += [rollout_row(r) for r in batch if _keep(r, component, cmin, cmax, has_errors)]
        if len(batch) < SCAN_PAGE:
            break
        if scanned >= SCAN_MAX:
            truncated = True
            break
    return {"total": len(matched), "items": matched[offset:offset + limit], "truncated": truncated}


def rollout(store: RunStore, run_id: str, rollout_id: int) -> dict[str, Any]:
    r = store.rollout(rollout_id)
    if r["run_id"] != run_id:
        raise KeyError(f"no rollout {rollout_id} in run {run_id}")
    term = r.get("termination")
    r["termination_doc"] = TERMINATION_DOCS.get(term, "")
    return r


def heatmap(store: RunStore, run_id: str, split: str = "auto") -> dict[str, Any]:
    """``examples`` × ``steps`` grid of mean rewards (``None`` where an example was not sampled).
    ``split="auto"``: the split whose examples were sampled at the most steps each (training draws
    new prompts every step, so its rows are mostly one cell; the held-out split repeats its
    prompts at every eval), ties going to train."""
    if split == "auto":
        def coverage(d: dict[int, dict[int, Any]]) -> float:
            return sum(len(v) for v in d.values()) / len(d) if d else 0.0

        grids = {s: store.reward_heatmap(run_id, split=s) for s in ("train", "eval")}
        split = max(("train", "eval"), key=lambda s: (coverage(grids[s]), s == "train"))
        data = grids[split]
    else:
        data = store.reward_heatmap(run_id, split=split)
    steps = sorted({s for row in data.values() for s in row})
    examples = sorted(data)
    return {"split": split, "examples": examples, "steps": steps,
            "values": [[data[e].get(s) for s in steps] for e in examples]}


def logs(store: RunStore, run_id: str, level: str | None = None, after_id: int = 0, limit: int = 500
         ) -> dict[str, Any]:
    return {"logs": store.logs(run_id, level=level or None, after_id=after_id, limit=max(1, min(limit, 5000))),
            "terminations": {"train": store.termination_counts(run_id, split="train"),
                             "eval": store.termination_counts(run_id, split="eval")}}


def config(store: RunStore, run_id: str) -> dict[str, Any]:
    run = store.get_run(run_id)
    return {"config": run.get("config") or {}, "env_source": run.get("env_source") or "",
            "environment": run.get("environment"), "model": run.get("model"),
            "checkpoints": store.checkpoints(run_id)}


def compare(store: RunStore, run_ids: Iterable[str], keys: list[str] | None = None) -> dict[str, Any]:
    """Several runs side by side: summaries, metric series and the config keys that differ."""
    runs = [store.get_run(r) for r in run_ids]
    configs = {r["id"]: r.get("config") or {} for r in runs}
    all_keys = sorted({k for c in configs.values() for k in c})
    diff = {k: {rid: c.get(k) for rid, c in configs.items()} for k in all_keys
            if len({repr(c.get(k)) for c in configs.values()}) > 1}
    return {"runs": [run_summary(store, r) | {"latest": store.latest_metrics(r["id"]),
                                              "findings": health(store, r["id"])["findings"]} for r in runs],
            "metrics": {r["id"]: metrics(store, r["id"], keys) for r in runs},
            "config_diff": diff}


TERMINATION_DOCS = {t.value: " ".join((t.__doc__ or "").split()) for t in Termination}


def info_static() -> dict[str, Any]:
    """Constants the page needs: metric names in display order and termination meanings."""
    return {"metric_keys": KEYS, "terminations": TERMINATION_DOCS}

"""What the console's JSON routes return: plain functions over a read-only :class:`RunStore`.

Each function takes the store and request arguments and returns JSON-ready dicts and lists (run
summaries, metric series, filtered rollout pages, the reward heatmap, a comparison of runs). No
HTTP here (that is :mod:`rlft.console.app`) and no writes: the store is opened read-only. The heatmap
is aggregated in SQL (:mod:`rlft.store.aggregates`) as columns of steps for one page of
examples; metric series (in buckets of steps, mean, min and max, for as many points as a chart
has room for) and counts of a run's rollouts come from the console's
:class:`~rlft.console.runcache.RunCache`, kept up to date from the rows written since. The
metrics and compare routes return JSON text (the series' JSON is kept between requests).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

from rlft.console.runcache import RunCache
from rlft.health.source import eval_findings, run_findings, status_label
from rlft.metrics import KEYS
from rlft.store import RunStore
from rlft.store import aggregates as agg
from rlft.types import Termination

PREVIEW_CHARS = 200
MAX_POINTS = 2_000  # the most points a chart may ask for per metric
MAX_COLS = 1_000  # the most heatmap columns and rows a request may ask for


def _duration(run: dict[str, Any], now: float | None = None) -> float | None:
    start = run.get("started_at") or run.get("created_at")
    if not start:
        return None
    end = run.get("finished_at") or (now or time.time())
    return max(end - start, 0.0)


def run_summary(store: RunStore, cache: RunCache, run: dict[str, Any]) -> dict[str, Any]:
    """A runs-list row: the run's columns plus latest reward, pass@k, planned steps and duration."""
    latest = latest_metrics(store, cache, run)
    counts = cache.counts(store, run["id"], "train") if run.get("status") == "completed" else None
    config = run.get("config") or {}
    return {
        "id": run["id"], "kind": run.get("kind") or "rl", "name": run.get("name"), "status": run.get("status"),
        "model": run.get("model"),
        "environment": run.get("environment"), "step": run.get("step"), "steps": config.get("steps"),
        "created_at": run.get("created_at"), "started_at": run.get("started_at"),
        "finished_at": run.get("finished_at"), "updated_at": run.get("updated_at"), "duration": _duration(run),
        "status_label": status_label(store, run, counts),
        "error": run.get("error"), "reward": latest.get("reward/mean"), "pass_at_k": latest.get("pass@k"),
        "eval_reward": latest.get("eval/reward/mean"), "k": config.get("group_size"),
        "loss": latest.get("eval/loss", latest.get("sft/loss")),  # SFT runs: held-out loss, else training loss
    }


def latest_metrics(store: RunStore, cache: RunCache, run: dict[str, Any]) -> dict[str, float | None]:
    """Each metric's value at the last step it was logged, kept until a step's metrics arrive."""
    return cache.derived(store, run["id"], "latest", lambda: store.latest_metrics(run["id"]),
                         version=(run.get("updated_at"), agg.metric_version(store, run["id"])))


def list_runs(store: RunStore, cache: RunCache) -> list[dict[str, Any]]:
    return [run_summary(store, cache, r) for r in store.list_runs()]


def run_detail(store: RunStore, cache: RunCache, run_id: str) -> dict[str, Any]:
    """The run page header: summary, error and traceback, latest metrics, checkpoints, counts."""
    run = store.get_run(run_id)
    out = run_summary(store, cache, run)
    out.update(traceback=run.get("traceback"), stop_requested=run.get("stop_requested"),
               latest=latest_metrics(store, cache, run), checkpoints=store.checkpoints(run_id),
               rollouts={"train": cache.total(store, run_id, "train"), "eval": cache.total(store, run_id, "eval")})
    return out


def metrics(store: RunStore, cache: RunCache, run_id: str, keys: list[str] | None = None,
            after_step: int | None = None, *, max_points: int | None = None, bucket: int | None = None,
            first_step: int | None = None, last_step: int | None = None) -> str:
    """``{key: [[step, value], ...]}`` as JSON text, every logged point; ``after_step``: only later
    steps (polling), ``first_step``/``last_step``: a range (zooming in). Downsampled for a chart:
    ``bucket`` steps per point, or ``max_points`` (the bucket that fits the run's planned steps,
    or the range, in that many points): each point is ``[first step of the bucket, mean, min,
    max]`` (a bucket of one step stays ``[step, value]``), so a spike still shows as the bucket's
    max. Answered from the run's kept series (:mod:`rlft.console.series`)."""
    if bucket is None and max_points is not None:
        planned = (store.get_run(run_id).get("config") or {}).get("steps")
        end = last_step if last_step is not None else max(agg.metric_extent(store, run_id),
                                                           planned if isinstance(planned, int) else 0)
        span = end - (first_step or 0) + 1
        bucket = agg.bucket_for(span, min(max(int(max_points), 1), MAX_POINTS))
    return cache.metrics_json(store, run_id, keys, bucket=max(1, int(bucket or 1)), after_step=after_step,
                              first_step=first_step, last_step=last_step)


def evals(store: RunStore, run_id: str) -> dict[str, Any]:
    """The run's evals (base at step 0, checkpoints) and evals of external models (no run)."""
    findings = eval_findings(store)
    external = [e | {"findings": [f.to_dict() for f in findings.get(e["id"], [])]} for e in store.evals()
                if e.get("run_id") is None]
    return {"run": store.evals(run_id), "external": external}


def health(store: RunStore, cache: RunCache, run_id: str) -> dict[str, Any]:
    """The run's training-health findings (docs/health.md), most severe first, from the kept metric
    series; kept until the run row (the trainer updates it every step), any metric row or its
    rollouts change."""
    version = (store.get_run(run_id).get("updated_at"), agg.metric_stamp(store, run_id),
               agg.rollout_version(store, run_id))
    return cache.derived(store, run_id, "health", version=version,
                         compute=lambda: {"findings": [f.to_dict() for f in run_findings(
                             store, run_id, cache.metric_points(store, run_id))]})


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


def rollouts(store: RunStore, cache: RunCache, run_id: str, *, component: str | None = None,
             cmin: float | None = None, cmax: float | None = None, has_errors: bool | None = None, limit: int = 50,
             offset: int = 0, **filters: Any) -> dict[str, Any]:
    """A page of rollout rows and the total matching. ``filters``: the store's rollout filters
    (step, split, example_id, min_reward, max_reward, termination, search); ``component`` with
    ``cmin``/``cmax``: that reward component's range; ``has_errors``: with/without errors. All in
    SQL; the total of a split (with or without errors) comes from the run's kept counts."""
    limit = max(1, min(int(limit), 500))
    offset = max(0, int(offset))
    only_split = not component and all(v is None for k, v in filters.items() if k != "split")
    rows, total = agg.rollout_page(store, run_id, component=component, cmin=cmin, cmax=cmax, has_errors=has_errors,
                                   limit=limit, offset=offset, count=not only_split, **filters)
    if only_split:
        split = filters.get("split")
        n, bad = cache.total(store, run_id, split), cache.with_errors(store, run_id, split)
        total = n if has_errors is None else bad if has_errors else n - bad
    return {"total": total, "items": [rollout_row(r) for r in rows], "truncated": False}


def rollout(store: RunStore, run_id: str, rollout_id: int) -> dict[str, Any]:
    r = store.rollout(rollout_id)
    if r["run_id"] != run_id:
        raise KeyError(f"no rollout {rollout_id} in run {run_id}")
    term = r.get("termination")
    r["termination_doc"] = TERMINATION_DOCS.get(term, "")
    return r


def _auto_split(store: RunStore, cache: RunCache, run_id: str) -> str:
    """The split whose examples were sampled at the most steps each (training draws new prompts
    every step, so its rows are mostly one cell; the held-out split repeats its prompts at every
    eval), ties going to train."""
    def coverage(split: str) -> float:
        examples, cells = cache.derived(store, run_id, ("examples", split),
                                        lambda: agg.example_stats(store, run_id, split),
                                        version=agg.rollout_version(store, run_id))
        return cells / examples if examples else 0.0

    return max(("train", "eval"), key=lambda s: (coverage(s), s == "train"))


def heatmap(store: RunStore, cache: RunCache, run_id: str, split: str = "auto", *, max_cols: int = 200,
            examples_offset: int = 0, examples_limit: int = 64, since_step: int | None = None,
            bin: int | None = None) -> dict[str, Any]:
    """Mean reward per example and column of steps, for what the page has room for: at most
    ``max_cols`` columns (one per sampled step, or ``bin`` steps each when there are more) and
    the ``examples_limit`` examples from ``examples_offset`` (in example id order). ``values`` and
    ``counts`` are rows (examples) x columns (``steps``: each column's first step), ``None``/0
    where an example was not sampled. ``split="auto"``: see :func:`_auto_split`.

    Polling a live run: with ``since_step`` (the last step the caller has) and ``bin`` (the
    width it has), only the columns from the one holding ``since_step`` on are sent
    (``"since_step"`` in the reply); when the width changed, all of them are."""
    max_cols = max(1, min(int(max_cols), MAX_COLS))
    limit = max(1, min(int(examples_limit), MAX_COLS))
    offset = max(0, int(examples_offset))
    if split == "auto":
        split = _auto_split(store, cache, run_id)
    if split not in ("train", "eval"):
        raise ValueError(f"split must be train, eval or auto, not {split!r}")
    steps = cache.steps(store, run_id, split)
    width, columns = agg.heatmap_columns(steps, max_cols)
    version = agg.rollout_version(store, run_id)
    examples_total = cache.derived(store, run_id, ("examples", split),
                                   lambda: agg.example_stats(store, run_id, split), version=version)[0]
    ids = cache.derived(store, run_id, "page", lambda: agg.example_page(store, run_id, split, offset, limit),
                        version=(version, split, offset, limit))
    since = since_step if since_step is not None and bin == width else None
    if since is not None:
        columns = [c for c in columns if c >= since // width * width]
    cells = agg.heatmap_cells(store, run_id, split, ids, width, since_step=since)
    out = {"split": split, "bin": width, "steps": columns, "last_step": steps[-1] if steps else None,
           "examples": ids, "examples_total": examples_total, "examples_offset": offset,
           "values": [[_round(cells.get((e, c), (None, 0))[0]) for c in columns] for e in ids],
           "counts": [[cells.get((e, c), (None, 0))[1] for c in columns] for e in ids]}
    if since is not None:
        out["since_step"] = since
    return out


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def logs(store: RunStore, cache: RunCache, run_id: str, level: str | None = None, after_id: int = 0,
         limit: int = 500) -> dict[str, Any]:
    return {"logs": store.logs(run_id, level=level or None, after_id=after_id, limit=max(1, min(limit, 5000))),
            "terminations": {split: cache.counts(store, run_id, split) for split in ("train", "eval")}}


def config(store: RunStore, run_id: str) -> dict[str, Any]:
    run = store.get_run(run_id)
    return {"config": run.get("config") or {}, "env_source": run.get("env_source") or "",
            "environment": run.get("environment"), "model": run.get("model"),
            "checkpoints": store.checkpoints(run_id)}


def compare(store: RunStore, cache: RunCache, run_ids: Iterable[str], keys: list[str] | None = None,
            max_points: int | None = None) -> str:
    """Several runs side by side, as JSON text: summaries, metric series (``keys``, or all;
    downsampled as :func:`metrics` with ``max_points``; each run's kept JSON placed as it is),
    each run's metric names and the config keys that differ."""
    runs = [store.get_run(r) for r in run_ids]
    configs = {r["id"]: r.get("config") or {} for r in runs}
    all_keys = sorted({k for c in configs.values() for k in c})
    diff = {k: {rid: c.get(k) for rid, c in configs.items()} for k in all_keys
            if len({repr(c.get(k)) for c in configs.values()}) > 1}
    summaries = [run_summary(store, cache, r) | {"latest": latest_metrics(store, cache, r),
                                                 "findings": health(store, cache, r["id"])["findings"]} for r in runs]
    series = {r["id"]: metrics(store, cache, r["id"], keys, max_points=max_points) for r in runs}
    return "".join(['{"runs":', _dumps(summaries), ',"metrics":{',
                    ",".join(_dumps(rid) + ":" + text for rid, text in series.items()),
                    '},"keys":', _dumps({r["id"]: cache.metric_keys(store, r["id"]) for r in runs}),
                    ',"config_diff":', _dumps(diff), "}"])


def _dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


TERMINATION_DOCS = {t.value: " ".join((t.__doc__ or "").split()) for t in Termination}


def info_static() -> dict[str, Any]:
    """Constants the page needs: metric names in display order and termination meanings."""
    return {"metric_keys": KEYS, "terminations": TERMINATION_DOCS}

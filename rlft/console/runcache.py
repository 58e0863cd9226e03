"""What the console keeps per run between requests: rollout counts, a split's steps and the metric
series, brought up to date from the rows written since, instead of recounting a run of 250k
rollouts or re-reading and re-serializing 24k metric points on every poll.

A run's rollouts are append-only while it trains (rollout ids only grow), except when a resume
truncates it (``RunStore.truncate_after``) or it is deleted. Each entry remembers the largest
rollout id it has read, the run's latest rollout step and the id and write time of the run's
newest rollout: when the store's largest id grew and the other two still hold, only rows with a
larger id are read; when the latest step fell or the newest rollout is gone or rewritten (SQLite
reuses the ids of deleted top rows, so the write time tells), the entry is rebuilt. The first
read of a run counts from two indexes (schema v6), not from the rows.

Metric rows are upserted (a resume or a weight sync re-logs a step in place), so the series
(:class:`rlft.console.series.MetricSeries`) follow the rows' write times instead: each request
reads the run's metric row count and newest write time (one index); when they changed, the rows
written at or after the newest time the series have are applied, and if the series then hold a
different number of points than the store, rows were deleted (a truncation) and the series are
read again. Write times are stamped in the write transaction, so they follow the commit order;
a wall clock set back while a run writes could hide an in-place rewrite until the next change.

Derived values that cannot be updated that way (a split's example statistics, the latest metrics,
the health findings) are kept while a version read with them (cheap to read again) stays the
same. Left out: eviction of the counts (one small entry per run opened in this console); the
series of at most ``MAX_SERIES_RUNS`` runs are kept (the least recently asked for go first).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rlft.console.series import MetricSeries
from rlft.store import RunStore
from rlft.store import aggregates as agg

MAX_SERIES_RUNS = 16


@dataclass
class _Entry:
    top: int = 0  # largest rollout id read
    last_step: int = -1  # the run's latest rollout step when read
    newest: tuple[int, float] | None = None  # (id, created_at) of the run's newest rollout when read
    counts: dict[str, dict[str | None, int]] = field(default_factory=dict)  # split -> termination -> n
    errors: dict[str, int] = field(default_factory=dict)  # split -> rollouts with errors
    steps: dict[str, list[int]] = field(default_factory=dict)  # split -> sampled steps, sorted


class RunCache:
    """Per-run rollout counts, steps and metric series, kept up to date incrementally (see the
    module docstring)."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._series: dict[str, MetricSeries] = {}  # least recently asked for first
        self._derived: dict[tuple[str, Any], tuple[Any, Any]] = {}  # (run, key) -> (version, value)
        self._lock = threading.Lock()

    def _fresh(self, store: RunStore, run_id: str) -> _Entry:
        top, last_step = agg.rollout_marker(store, run_id)
        with self._lock:
            entry = self._entries.get(run_id)
            if entry is not None and top == entry.top and last_step == entry.last_step:
                return entry
            appended = (entry is not None and top >= entry.top and last_step >= entry.last_step
                        and (entry.newest is None or agg.rollout_stamp(store, entry.newest[0]) == entry.newest))
            if not appended:
                entry = _Entry()
            rows, errors, read_top = agg.rollout_tally(store, run_id, after_id=entry.top)
            earliest: dict[str, int] = {}
            for split, term, n, first in rows:
                by_term = entry.counts.setdefault(split, {})
                by_term[term] = by_term.get(term, 0) + n
                earliest[split] = min(first, earliest.get(split, first))
            for split, n in errors.items():
                entry.errors[split] = entry.errors.get(split, 0) + n
            for split, steps in list(entry.steps.items()):
                if split not in earliest:
                    continue
                if steps and earliest[split] > steps[-1]:  # new steps after the known ones
                    entry.steps[split] = steps + agg.rollout_steps(store, run_id, split, after_step=steps[-1])
                else:  # rows at an earlier step (an eval of an old checkpoint): read them all again
                    entry.steps[split] = agg.rollout_steps(store, run_id, split)
            entry.top, entry.last_step = max(top, read_top), last_step
            entry.newest = agg.newest_rollout(store, run_id)
            self._entries[run_id] = entry
            return entry

    def counts(self, store: RunStore, run_id: str, split: str) -> dict[str | None, int]:
        """The run's rollouts of ``split`` by termination, most frequent first."""
        by_term = self._fresh(store, run_id).counts.get(split, {})
        return dict(sorted(by_term.items(), key=lambda kv: -kv[1]))

    def total(self, store: RunStore, run_id: str, split: str | None) -> int:
        entry = self._fresh(store, run_id)
        return sum(sum(c.values()) for s, c in entry.counts.items() if split is None or s == split)

    def with_errors(self, store: RunStore, run_id: str, split: str | None) -> int:
        entry = self._fresh(store, run_id)
        return sum(n for s, n in entry.errors.items() if split is None or s == split)

    def steps(self, store: RunStore, run_id: str, split: str) -> list[int]:
        entry = self._fresh(store, run_id)
        with self._lock:
            if split not in entry.steps:
                entry.steps[split] = agg.rollout_steps(store, run_id, split)
            return entry.steps[split]

    def derived(self, store: RunStore, run_id: str, key: Any, compute: Callable[[], Any], version: Any) -> Any:
        """``compute()``, kept while ``version`` (something cheap to read that changes with what
        ``compute`` reads, e.g. :func:`rlft.store.aggregates.rollout_version`) stays the same."""
        with self._lock:
            hit = self._derived.get((run_id, key))
        if hit is not None and hit[0] == version:
            return hit[1]
        value = compute()
        with self._lock:
            self._derived[(run_id, key)] = (version, value)
        return value

    def metrics_json(self, store: RunStore, run_id: str, keys: list[str] | None = None, bucket: int = 1,
                     after_step: int | None = None, first_step: int | None = None,
                     last_step: int | None = None) -> str:
        """The run's metric series as JSON text (:meth:`MetricSeries.answer`), from series brought
        up to date first."""
        with self._lock:
            return self._fresh_series(store, run_id).answer(keys, bucket, after_step, first_step, last_step)

    def metric_points(self, store: RunStore, run_id: str) -> dict[str, list[tuple[int, float | None]]]:
        """The run's metric series as ``RunStore.metrics`` returns them, from the kept series."""
        with self._lock:
            return self._fresh_series(store, run_id).points()

    def metric_keys(self, store: RunStore, run_id: str) -> list[str]:
        """The run's metric names in order, from the kept series."""
        with self._lock:
            return sorted(self._fresh_series(store, run_id).steps)

    def _fresh_series(self, store: RunStore, run_id: str) -> MetricSeries:
        with agg.snapshot(store):
            n, newest = agg.metric_stamp(store, run_id)
            series = self._series.pop(run_id, None)
            if series is not None and (n, newest) != (series.n, series.stamp):
                if newest is None or series.stamp is None or newest < series.stamp:
                    series = None  # the newest rows are gone (or the clock went back): read again
                else:
                    series.apply(agg.metric_rows(store, run_id, since=series.stamp))
                    if series.n != n:  # rows were deleted (a resume truncated the run)
                        series = None
            if series is None:
                series = MetricSeries.read(agg.metric_series(store, run_id), newest)
        self._series[run_id] = series
        while len(self._series) > MAX_SERIES_RUNS:
            self._series.pop(next(iter(self._series)))
        return series

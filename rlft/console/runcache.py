"""What the console keeps per run between requests: rollout counts and a split's steps, brought up
to date from the rows written since, instead of recounting a run of 250k rollouts on every poll.

A run's rollouts are append-only while it trains (rollout ids only grow), except when a resume
truncates it (``RunStore.truncate_after``) or it is deleted. Each entry remembers the largest
rollout id it has read, the run's latest rollout step and the id and write time of the run's
newest rollout: when the store's largest id grew and the other two still hold, only rows with a
larger id are read; when the latest step fell or the newest rollout is gone or rewritten (SQLite
reuses the ids of deleted top rows, so the write time tells), the entry is rebuilt. Derived
values that cannot be updated that way (a split's example statistics, the latest metrics, the
health findings) are kept while a version read with them (cheap to read again) stays the same.
Left out: metric series (read from the store's ``metrics_series`` index) and any eviction (one
small entry per run opened in this console).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rlft.store import RunStore
from rlft.store import aggregates as agg


@dataclass
class _Entry:
    top: int = 0  # largest rollout id read
    last_step: int = -1  # the run's latest rollout step when read
    newest: tuple[int, float] | None = None  # (id, created_at) of the run's newest rollout when read
    counts: dict[str, dict[str | None, int]] = field(default_factory=dict)  # split -> termination -> n
    errors: dict[str, int] = field(default_factory=dict)  # split -> rollouts with errors
    steps: dict[str, list[int]] = field(default_factory=dict)  # split -> sampled steps, sorted


class RunCache:
    """Per-run rollout counts and steps, kept up to date incrementally (see the module docstring)."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
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
            rows, read_top = agg.rollout_tally(store, run_id, after_id=entry.top)
            earliest: dict[str, int] = {}
            for split, term, n, errors, first in rows:
                by_term = entry.counts.setdefault(split, {})
                by_term[term] = by_term.get(term, 0) + n
                entry.errors[split] = entry.errors.get(split, 0) + errors
                earliest[split] = min(first, earliest.get(split, first))
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

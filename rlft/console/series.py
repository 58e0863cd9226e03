"""One run's metric series as the console keeps them: every logged point of every key in step
order, updated in place from the rows written since the last read, and the JSON of the answers
given over them, kept until the series change.

The metrics route and the compare page answer from here: a key's points, only those after a
step (a poll), a step range (a zoomed chart), or buckets of ``bucket`` steps for a chart (steps
``b*bucket .. (b+1)*bucket - 1`` make one point ``[first step logged in it, mean, min, max]`` of
its non-null values, all ``None`` when every value is null); ``bucket=1`` gives ``[step, value]``.
Keys come in name order, a key with no point in the range is left out: the JSON a fresh read of
the store gives (``json.dumps`` of ``{key: points}``), serialized once per change of the series
instead of once per request (24 keys x 1,000 steps are 580 kB of JSON).

Left out: reading the store (:class:`rlft.console.runcache.RunCache` decides which rows to read
and when to read the series again from scratch).
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable
from typing import Any

MAX_ANSWERS = 32  # JSON answers kept per run (each poll, zoom and chart size is one)

Point = list[Any]  # [step, value] or [first step, mean, min, max]


class MetricSeries:
    """``steps[key]`` (sorted) and ``values[key]`` (``None`` for a null value), ``n`` points in all,
    ``stamp``: the newest write time applied (``None`` before any row)."""

    def __init__(self) -> None:
        self.steps: dict[str, list[int]] = {}
        self.values: dict[str, list[float | None]] = {}
        self.n = 0
        self.stamp: float | None = None
        self._answers: dict[tuple[Any, ...], str] = {}

    def apply(self, rows: Iterable[tuple[str, int, float | None, float]]) -> None:
        """Add or overwrite points from ``(key, step, value, write time)`` rows, in any order."""
        changed = False
        for key, step, value, wall in rows:
            changed = True
            steps, values = self.steps.setdefault(key, []), self.values.setdefault(key, [])
            if not steps or step > steps[-1]:  # the common case: a new step at the end
                steps.append(step)
                values.append(value)
                self.n += 1
            else:
                i = bisect.bisect_left(steps, step)
                if i < len(steps) and steps[i] == step:
                    values[i] = value
                else:
                    steps.insert(i, step)
                    values.insert(i, value)
                    self.n += 1
            if self.stamp is None or wall > self.stamp:
                self.stamp = wall
        if changed:
            self._answers.clear()

    def select(self, keys: Iterable[str] | None = None, bucket: int = 1, after_step: int | None = None,
               first_step: int | None = None, last_step: int | None = None) -> dict[str, list[Point]]:
        """``{key: points}`` (see the module docstring); ``after_step``: only later steps,
        ``first_step``/``last_step``: an inclusive range."""
        low = max([s for s in (None if after_step is None else after_step + 1, first_step) if s is not None],
                  default=None)
        names = sorted(self.steps if keys is None else set(keys) & self.steps.keys())
        out: dict[str, list[Point]] = {}
        for key in names:
            steps, values = self.steps[key], self.values[key]
            i = 0 if low is None else bisect.bisect_left(steps, low)
            j = len(steps) if last_step is None else bisect.bisect_right(steps, last_step)
            if i >= j:
                continue
            if bucket <= 1:
                out[key] = [[s, v] for s, v in zip(steps[i:j], values[i:j])]
            else:
                out[key] = _buckets(steps[i:j], values[i:j], bucket)
        return out

    def answer(self, keys: Iterable[str] | None = None, bucket: int = 1, after_step: int | None = None,
               first_step: int | None = None, last_step: int | None = None) -> str:
        """:meth:`select` as JSON text, kept until the series change."""
        args = (None if keys is None else tuple(keys), max(1, bucket), after_step, first_step, last_step)
        text = self._answers.get(args)
        if text is None:
            text = json.dumps(self.select(*args), separators=(",", ":"), ensure_ascii=False)
            if len(self._answers) >= MAX_ANSWERS:
                self._answers.pop(next(iter(self._answers)))  # the oldest
            self._answers[args] = text
        return text


def _buckets(steps: list[int], values: list[float | None], width: int) -> list[Point]:
    out: list[Point] = []
    start = 0
    for k in range(1, len(steps) + 1):
        if k == len(steps) or steps[k] // width != steps[start] // width:
            vals = [v for v in values[start:k] if v is not None]
            out.append([steps[start], sum(vals) / len(vals), min(vals), max(vals)] if vals
                       else [steps[start], None, None, None])
            start = k
    return out

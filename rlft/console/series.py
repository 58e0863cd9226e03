"""One run's metric series as the console keeps them: every logged point of every key in step
order, updated in place from the rows written since the last read, and their JSON, kept and
extended as points arrive instead of serialized again for every request.

The metrics route and the compare page answer from here: a key's points, only those after a
step (a poll), a step range (a zoomed chart), or buckets of ``bucket`` steps for a chart (steps
``b*bucket .. (b+1)*bucket - 1`` make one point ``[first step logged in it, mean, min, max]`` of
its non-null values, all ``None`` when every value is null); ``bucket=1`` gives ``[step, value]``.
Keys come in name order, a key with no point in the range is left out: the JSON a fresh read of
the store gives (``json.dumps`` of ``{key: points}``, compact separators).

What is kept: per key and bucket width asked for, the JSON text of each point or bucket of the
whole series. A new step at the end of a key adds its text (with buckets, the last bucket is
made again, as it may have grown); a point inserted or rewritten keeps the texts before it (a
rewrite before the last bucket drops that width's texts, made again when next asked for). A
run of 24 keys x 1,000 steps is 580 kB of JSON: a new step then costs 24 short strings, not
24,000. Answers with a step range are made from the points (they are a poll's few steps or a
zoomed chart's). Every answer's text is kept until the series change.

Left out: reading the store (:class:`rlft.console.runcache.RunCache` decides which rows to read
and when to read the series again from scratch).
"""

from __future__ import annotations

import bisect
import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

MAX_ANSWERS = 32  # JSON answers kept per run (each poll, zoom and chart size is one)

Point = list[Any]  # [step, value] or [first step, mean, min, max]


@dataclass
class _Text:
    """The JSON of a key's points (``width`` 1) or buckets, covering its first ``upto`` points;
    ``last_begin``: the index of the first point of the last bucket."""

    parts: list[str] = field(default_factory=list)
    upto: int = 0
    last_begin: int = 0


class MetricSeries:
    """``steps[key]`` (sorted) and ``values[key]`` (``None`` for a null value), ``n`` points in all,
    ``stamp``: the newest write time of the rows read (``None`` before any row)."""

    def __init__(self) -> None:
        self.steps: dict[str, list[int]] = {}
        self.values: dict[str, list[float | None]] = {}
        self.n = 0
        self.stamp: float | None = None
        self._texts: dict[str, dict[int, _Text]] = {}  # key -> bucket width -> kept JSON
        self._answers: dict[tuple[Any, ...], str] = {}

    @classmethod
    def read(cls, rows: Sequence[tuple[str, int, float | None]], stamp: float | None) -> MetricSeries:
        """Series from every ``(key, step, value)`` row of a run, ordered by key and step, and
        the newest write time among them."""
        series = cls()
        for key, group in itertools.groupby(rows, key=itemgetter(0)):
            points = list(group)
            series.steps[key] = [p[1] for p in points]
            series.values[key] = [p[2] for p in points]
        series.n, series.stamp = len(rows), stamp
        return series

    def apply(self, rows: Iterable[tuple[str, int, float | None, float]]) -> None:
        """Add or overwrite points from ``(key, step, value, write time)`` rows, in any order."""
        changed = False
        for key, step, value, wall in rows:
            if self.stamp is None or wall > self.stamp:
                self.stamp = wall
            steps, values = self.steps.setdefault(key, []), self.values.setdefault(key, [])
            if not steps or step > steps[-1]:  # the common case: a new step at the end
                steps.append(step)
                values.append(value)
                self.n += 1
                changed = True
                continue
            i = bisect.bisect_left(steps, step)
            if i < len(steps) and steps[i] == step:
                if values[i] == value:  # read again (rows at the newest time are), unchanged
                    continue
                values[i] = value
            else:
                steps.insert(i, step)
                values.insert(i, value)
                self.n += 1
            changed = True
            self._stale_from(key, i)
        if changed:
            self._answers.clear()

    def _stale_from(self, key: str, i: int) -> None:
        """Point ``i`` of ``key`` was rewritten or inserted: its kept texts keep what comes before."""
        texts = self._texts.get(key, {})
        for width, kept in list(texts.items()):
            if width == 1:
                del kept.parts[i:]
                kept.upto = min(kept.upto, i)
            elif i >= kept.last_begin:  # in the last bucket: made again when next asked for
                kept.upto = min(kept.upto, i)
            else:
                del texts[width]

    def points(self) -> dict[str, list[tuple[int, float | None]]]:
        """``{key: [(step, value), ...]}``, as ``RunStore.metrics`` returns them."""
        return {key: list(zip(self.steps[key], self.values[key])) for key in sorted(self.steps)}

    def select(self, keys: Iterable[str] | None = None, bucket: int = 1, after_step: int | None = None,
               first_step: int | None = None, last_step: int | None = None) -> dict[str, list[Point]]:
        """``{key: points}`` (see the module docstring); ``after_step``: only later steps,
        ``first_step``/``last_step``: an inclusive range."""
        low = _low(after_step, first_step)
        out: dict[str, list[Point]] = {}
        for key in self._names(keys):
            steps, values = self.steps[key], self.values[key]
            i = 0 if low is None else bisect.bisect_left(steps, low)
            j = len(steps) if last_step is None else bisect.bisect_right(steps, last_step)
            if i >= j:
                continue
            if bucket <= 1:
                out[key] = [[s, v] for s, v in zip(steps[i:j], values[i:j])]
            else:
                out[key] = [[first, *_stats(vals)] for first, vals in _groups(steps[i:j], values[i:j], bucket)]
        return out

    def answer(self, keys: Iterable[str] | None = None, bucket: int = 1, after_step: int | None = None,
               first_step: int | None = None, last_step: int | None = None) -> str:
        """:meth:`select` as JSON text: from the kept texts for a whole series, kept until the
        series change."""
        bucket = max(1, bucket)
        args = (None if keys is None else tuple(keys), bucket, after_step, first_step, last_step)
        text = self._answers.get(args)
        if text is None:
            if after_step is None and first_step is None and last_step is None:
                text = "{" + ",".join(f"{json.dumps(key, ensure_ascii=False)}:[{','.join(self._text(key, bucket))}]"
                                      for key in self._names(args[0])) + "}"
            else:
                text = json.dumps(self.select(*args), separators=(",", ":"), ensure_ascii=False)
            if len(self._answers) >= MAX_ANSWERS:
                self._answers.pop(next(iter(self._answers)))  # the oldest
            self._answers[args] = text
        return text

    def _names(self, keys: Iterable[str] | None) -> list[str]:
        return sorted(self.steps if keys is None else set(keys) & self.steps.keys())

    def _text(self, key: str, width: int) -> list[str]:
        """The JSON of each point or bucket of ``key``'s whole series, brought up to date."""
        steps, values = self.steps[key], self.values[key]
        kept = self._texts.setdefault(key, {}).setdefault(width, _Text())
        if kept.upto < len(steps):
            if width == 1:
                kept.parts += [f"[{s},{_num(v)}]" for s, v in zip(steps[kept.upto:], values[kept.upto:])]
            else:  # the last bucket may have grown: make it and any newer ones
                del kept.parts[len(kept.parts) - 1:]
                begin = kept.last_begin
                for first, vals in _groups(steps[begin:], values[begin:], width):
                    kept.last_begin = bisect.bisect_left(steps, first, lo=begin)
                    kept.parts.append("[" + ",".join([str(first), *map(_num, _stats(vals))]) + "]")
            kept.upto = len(steps)
        return kept.parts


def _low(after_step: int | None, first_step: int | None) -> int | None:
    bounds = [s for s in (None if after_step is None else after_step + 1, first_step) if s is not None]
    return max(bounds) if bounds else None


def _groups(steps: list[int], values: list[float | None], width: int) -> list[tuple[int, list[float]]]:
    """(first step, non-null values) of each bucket of ``width`` steps, in order."""
    out: list[tuple[int, list[float]]] = []
    current = None
    vals: list[float] = []
    for s, v in zip(steps, values):
        b = s // width
        if b != current:
            current, vals = b, []
            out.append((s, vals))
        if v is not None:
            vals.append(v)
    return out


def _stats(vals: list[float]) -> list[float | None]:
    return [sum(vals) / len(vals), min(vals), max(vals)] if vals else [None, None, None]


def _num(v: float | None) -> str:
    """A stored value as ``json.dumps`` writes it (values are finite floats or NULL)."""
    return "null" if v is None else repr(v)

"""Aggregating reads over the run store, computed in SQL: what a chart or a heatmap draws, not the rows.

- ``metric_buckets``: each metric key's series in buckets of ``bucket`` steps (mean, min and max
  per bucket, at the bucket's first logged step), optionally only after a step or in a step range;
- ``heatmap_columns`` / ``example_page`` / ``heatmap_cells``: the reward heatmap of a split as
  columns of ``bin`` steps, one page of examples at a time, mean reward and count per cell
  (``GROUP BY example_id, step / bin``: the dense examples x steps grid is never built);
- ``rollout_tally``: rollouts of a run counted by split and termination (and with errors), from
  the rows after a known rollout id, so that a caller can keep the counts and add only new rows;
- ``rollout_page``: a page of rollouts with a reward component's range and "has errors" as SQL
  conditions (``json_extract``), next to the store's own filters.

Functions take a :class:`RunStore` and use its connection read-only. Left out: caching (the
console keeps what it reuses), writes and schema changes: these queries use the store's existing
indexes (``rollouts_example`` on run, split, example and step; ``metrics_key`` on run, key and
step; the rowid of ``rollouts``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

from rlft.store.run_store import RunStore

# SQLite's integer division truncates toward zero; steps are >= 0, so step / w is floor(step / w)


def _conn(store: RunStore) -> Any:
    return store._conn()  # the store's per-thread connection (read-only when the store is)


def bucket_for(steps: int, max_points: int) -> int:
    """Steps per point so that ``steps`` steps make at most ``max_points`` points (>= 1)."""
    return max(1, math.ceil(max(int(steps), 1) / max(int(max_points), 1)))


def metric_buckets(store: RunStore, run_id: str, keys: Iterable[str] | None = None, bucket: int = 1,
                   after_step: int | None = None, first_step: int | None = None, last_step: int | None = None
                   ) -> dict[str, list[list[float | int | None]]]:
    """``{key: [[step, mean, min, max], ...]}``: steps ``b*bucket .. (b+1)*bucket - 1`` make one
    point at the first step logged in it; NULL values (NaN, inf) are left out of mean/min/max
    (all NULL: ``None``). ``bucket=1``: ``[[step, value], ...]``, every logged point.
    ``after_step``: only steps above it; ``first_step``/``last_step``: an inclusive range."""
    bucket = max(1, int(bucket))
    where, args = ["run_id=?"], [run_id]
    if keys is not None:
        keys = list(keys)
        where.append(f"key IN ({','.join('?' * len(keys))})")
        args += keys
    for cond, val in (("step>?", after_step), ("step>=?", first_step), ("step<=?", last_step)):
        if val is not None:
            where.append(cond)
            args.append(int(val))
    out: dict[str, list[list[Any]]] = {}
    if bucket == 1:
        sql = f"SELECT key, step, value FROM metrics WHERE {' AND '.join(where)} ORDER BY key, step"
        for key, step, value in _conn(store).execute(sql, args):
            out.setdefault(key, []).append([step, value])
        return out
    sql = (f"SELECT key, MIN(step), AVG(value), MIN(value), MAX(value) FROM metrics WHERE {' AND '.join(where)} "
           f"GROUP BY key, step / {bucket} ORDER BY key, step / {bucket}")
    for key, step, mean, lo, hi in _conn(store).execute(sql, args):
        out.setdefault(key, []).append([step, mean, lo, hi])
    return out


def metric_extent(store: RunStore, run_id: str) -> int:
    """The last step any metric of the run was logged at (0 when none)."""
    row = _conn(store).execute("SELECT MAX(step) FROM metrics WHERE run_id=?", (run_id,)).fetchone()
    return int(row[0] or 0)


# -- the reward heatmap ---------------------------------------------------------------------------
def heatmap_columns(steps: list[int], max_cols: int) -> tuple[int, list[int]]:
    """(steps per column, the first step of each column that holds data) for a split's sampled
    ``steps`` (sorted): one column per step when they fit in ``max_cols``, else columns of
    ``bin`` steps aligned at step 0 (``b*bin .. (b+1)*bin - 1``), so that a live run's columns
    stay put as steps are added."""
    if len(steps) <= max_cols:
        return 1, list(steps)
    width = bucket_for(steps[-1] + 1, max_cols)
    return width, sorted({s // width * width for s in steps})


def example_page(store: RunStore, run_id: str, split: str, offset: int, limit: int) -> list[int]:
    """The example ids of a split in order, ``limit`` from ``offset``."""
    rows = _conn(store).execute("SELECT DISTINCT example_id FROM rollouts WHERE run_id=? AND split=? "
                                "ORDER BY example_id LIMIT ? OFFSET ?", (run_id, split, int(limit), int(offset)))
    return [r[0] for r in rows]


def example_stats(store: RunStore, run_id: str, split: str) -> tuple[int, int]:
    """(distinct examples, distinct (example, step) cells) of a split: how many rows the heatmap
    has and how many of its cells hold data."""
    row = _conn(store).execute(
        "SELECT COUNT(DISTINCT example_id), COUNT(*) FROM (SELECT example_id, step FROM rollouts "
        "WHERE run_id=? AND split=? GROUP BY example_id, step)", (run_id, split)).fetchone()
    return int(row[0]), int(row[1])


def heatmap_cells(store: RunStore, run_id: str, split: str, example_ids: list[int], width: int,
                  since_step: int | None = None) -> dict[tuple[int, int], tuple[float | None, int]]:
    """``{(example_id, column's first step): (mean reward, rollouts)}`` for these examples, the
    columns ``width`` steps wide; ``since_step``: only columns from the one holding that step."""
    if not example_ids:
        return {}
    width = max(1, int(width))
    where, args = ["run_id=?", "split=?", f"example_id IN ({','.join('?' * len(example_ids))})"], \
        [run_id, split, *example_ids]
    if since_step is not None:
        where.append("step>=?")
        args.append(int(since_step) // width * width)
    sql = (f"SELECT example_id, step / {width} * {width}, AVG(reward), COUNT(*) FROM rollouts "
           f"WHERE {' AND '.join(where)} GROUP BY example_id, step / {width}")
    return {(e, s): (mean, n) for e, s, mean, n in _conn(store).execute(sql, args)}


# -- counts and filtered pages of rollouts ----------------------------------------------------------
def rollout_tally(store: RunStore, run_id: str, after_id: int = 0
                  ) -> tuple[list[tuple[str, str | None, int, int, int]], int]:
    """(``[(split, termination, rollouts, with errors, earliest step), ...]``, the largest rollout
    id read) over the run's rollouts with an id above ``after_id``. Ids only grow, so counts kept
    from an earlier call plus this call's counts are the run's counts, as long as none was deleted."""
    conn = _conn(store)
    rows = conn.execute("SELECT split, termination, COUNT(*), SUM(errors != '[]'), MIN(step), MAX(id) FROM rollouts "
                        "WHERE id>? AND run_id=? GROUP BY split, termination", (int(after_id), run_id)).fetchall()
    top = max([after_id, *(r[5] for r in rows)])
    return [(s, t, int(n), int(e or 0), int(first)) for s, t, n, e, first, _ in rows], top


def rollout_marker(store: RunStore, run_id: str) -> tuple[int, int]:
    """(the store's largest rollout id, the run's latest rollout step): when either changes, or
    falls, rollouts were added or removed."""
    conn = _conn(store)
    top = conn.execute("SELECT MAX(id) FROM rollouts").fetchone()[0] or 0
    step = conn.execute("SELECT MAX(step) FROM rollouts WHERE run_id=?", (run_id,)).fetchone()[0]
    return int(top), int(step if step is not None else -1)


def rollout_version(store: RunStore, run_id: str) -> tuple[int, int]:
    """(the run's latest rollout step, the largest rollout id at it): changes when rollouts are
    added at a new step, rewritten at the latest one, or truncated (two index lookups)."""
    conn = _conn(store)
    step = conn.execute("SELECT MAX(step) FROM rollouts WHERE run_id=?", (run_id,)).fetchone()[0]
    if step is None:
        return -1, 0
    top = conn.execute("SELECT MAX(id) FROM rollouts WHERE run_id=? AND step=?", (run_id, step)).fetchone()[0]
    return int(step), int(top)


def metric_version(store: RunStore, run_id: str) -> tuple[int, int]:
    """(the run's last metric step, how many values were logged at it): changes when a step's
    metrics arrive (an eval's too, logged after the step's own), or a resume truncates them."""
    conn = _conn(store)
    step = conn.execute("SELECT MAX(step) FROM metrics WHERE run_id=?", (run_id,)).fetchone()[0]
    if step is None:
        return -1, 0
    n = conn.execute("SELECT COUNT(*) FROM metrics WHERE run_id=? AND step=?", (run_id, step)).fetchone()[0]
    return int(step), int(n)


def newest_rollout(store: RunStore, run_id: str) -> tuple[int, float] | None:
    """(id, created_at) of the newest of the run's rollouts at its latest step (``None`` when it
    has none). SQLite reuses the ids of deleted rows at the top, so an id alone does not say
    the row is the same one: its write time does (a rewrite stamps a new one)."""
    row = _conn(store).execute("SELECT id, created_at FROM rollouts WHERE run_id=? AND step=(SELECT MAX(step) FROM "
                               "rollouts WHERE run_id=?) ORDER BY id DESC LIMIT 1", (run_id, run_id)).fetchone()
    return (int(row[0]), float(row[1])) if row else None


def rollout_stamp(store: RunStore, rollout_id: int) -> tuple[int, float] | None:
    """(id, created_at) of a rollout, ``None`` when it is gone."""
    row = _conn(store).execute("SELECT id, created_at FROM rollouts WHERE id=?", (int(rollout_id),)).fetchone()
    return (int(row[0]), float(row[1])) if row else None


def rollout_steps(store: RunStore, run_id: str, split: str, after_step: int | None = None) -> list[int]:
    """The steps a split has rollouts at, in order; ``after_step``: only later ones."""
    rows = _conn(store).execute("SELECT DISTINCT step FROM rollouts WHERE run_id=? AND step>? AND split=? "
                                "ORDER BY step", (run_id, -1 if after_step is None else int(after_step), split))
    return [r[0] for r in rows]


def rollout_page(store: RunStore, run_id: str, *, component: str | None = None, cmin: float | None = None,
                 cmax: float | None = None, has_errors: bool | None = None, limit: int = 50, offset: int = 0,
                 count: bool = True, **filters: Any) -> tuple[list[dict[str, Any]], int | None]:
    """(a page of rollouts, how many match or ``None`` without ``count``): the store's filters
    (step, split, example_id, min_reward, max_reward, termination, search) plus a reward
    component's inclusive range and with/without errors, all in SQL."""
    where, args = store._rollout_filter(run_id, **filters)
    extra, more = [], []
    if component:
        path = "$." + json.dumps(component)  # a JSON path with the name quoted: any name is safe
        extra.append("json_extract(rewards, ?) IS NOT NULL")
        more.append(path)
        for op, val in ((">=", cmin), ("<=", cmax)):
            if val is not None:
                extra.append(f"json_extract(rewards, ?) {op} ?")
                more += [path, float(val)]
    if has_errors is not None:
        extra.append("errors != '[]'" if has_errors else "errors = '[]'")
    where = " AND ".join([where, *extra])
    args = [*args, *more]
    rows = store._rows(f"SELECT * FROM rollouts WHERE {where} ORDER BY step, split, example_id, group_index "
                       "LIMIT ? OFFSET ?", [*args, int(limit), int(offset)])
    total = _conn(store).execute(f"SELECT COUNT(*) FROM rollouts WHERE {where}", args).fetchone()[0] if count else None
    return rows, total

"""Aggregating reads over the run store, computed in SQL: what a chart or a heatmap draws, not the rows.

- ``metric_series`` / ``metric_stamp`` / ``metric_rows``: a run's metric points, their count and
  newest write time, and the rows written since a time, so that a caller can keep the series
  and read only what changed;
- ``heatmap_columns`` / ``example_page`` / ``heatmap_cells``: the reward heatmap of a split as
  columns of ``bin`` steps, one page of examples at a time, mean reward and count per cell
  (``GROUP BY example_id, step / bin``: the dense examples x steps grid is never built);
- ``rollout_tally``: rollouts of a run counted by split and termination (and with errors), from
  the rows after a known rollout id, so that a caller can keep the counts and add only new rows;
- ``rollout_page``: a page of rollouts with a reward component's range and "has errors" as SQL
  conditions (``json_extract``), next to the store's own filters;
- ``snapshot``: several reads that see one state of the store.

Functions take a :class:`RunStore` and use its connection read-only. Left out: caching (the
console keeps what it reuses), writes and schema changes: these queries use the store's indexes
(``rollouts_example`` on run, split, example and step; ``rollouts_tally`` on run, split,
termination and step; ``rollouts_errors`` on the rollouts with errors; ``metrics_written`` on
run and write time; the rowid of ``rollouts``). A read-only store of an older schema lacks the
v6 ones: the same queries read the rows instead.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rlft.store.run_store import RunStore

# SQLite's integer division truncates toward zero; steps are >= 0, so step / w is floor(step / w)


def _conn(store: RunStore) -> Any:
    return store._conn()  # the store's per-thread connection (read-only when the store is)


def bucket_for(steps: int, max_points: int) -> int:
    """Steps per point so that ``steps`` steps make at most ``max_points`` points (>= 1)."""
    return max(1, math.ceil(max(int(steps), 1) / max(int(max_points), 1)))


def metric_stamp(store: RunStore, run_id: str) -> tuple[int, float | None]:
    """(the run's metric rows, the newest write time among them): from the ``metrics_written``
    index alone. A write stamps a newer time (stamps are taken inside the write transaction, so
    they follow the commit order); a deletion lowers the count."""
    n, newest = _conn(store).execute("SELECT COUNT(*), MAX(wall_time) FROM metrics WHERE run_id=?",
                                     (run_id,)).fetchone()
    return int(n), newest


def metric_rows(store: RunStore, run_id: str, since: float) -> list[tuple[str, int, float | None, float]]:
    """``(key, step, value, write time)`` of the run's metric rows written at ``since`` or later,
    in no particular order (the ``metrics_written`` index finds them)."""
    return _tuples(store, "SELECT key, step, value, wall_time FROM metrics WHERE run_id=? AND wall_time>=?",
                   (run_id, since))


def metric_series(store: RunStore, run_id: str) -> list[tuple[str, int, float | None]]:
    """Every ``(key, step, value)`` of the run, ordered by key and step (from the
    ``metrics_series`` index alone)."""
    return _tuples(store, "SELECT key, step, value FROM metrics WHERE run_id=? ORDER BY key, step", (run_id,))


def _tuples(store: RunStore, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """Rows as plain tuples (the store's connection makes ``sqlite3.Row`` objects, slower to
    make by the ten thousand)."""
    cursor = _conn(store).cursor()
    cursor.row_factory = None
    return cursor.execute(sql, args).fetchall()


@contextmanager
def snapshot(store: RunStore) -> Iterator[None]:
    """Reads inside see one state of the store (a read transaction: in WAL mode a writer goes
    on meanwhile), so that a count and the rows read after it agree."""
    conn = _conn(store)
    if conn.in_transaction:
        yield
        return
    conn.execute("BEGIN")
    try:
        yield
    finally:
        conn.execute("COMMIT")


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
                  ) -> tuple[list[tuple[str, str | None, int, int]], dict[str, int], int]:
    """(``[(split, termination, rollouts, earliest step), ...]``, ``{split: rollouts with errors}``,
    the largest rollout id read) over the run's rollouts with an id above ``after_id``. Ids only
    grow, so counts kept from an earlier call plus this call's counts are the run's counts, as
    long as none was deleted.

    ``after_id=0`` (every rollout of the run) reads two indexes and no row: ``rollouts_tally``
    (run, split, termination, step) and the partial ``rollouts_errors`` (schema v6; an older
    store read-only reads the rows). Later calls read the rows above ``after_id`` by their id
    (``+run_id`` keeps SQLite from walking the run's index entries instead)."""
    conn = _conn(store)
    if after_id <= 0:
        rows = conn.execute("SELECT split, termination, COUNT(*), MIN(step), MAX(id) FROM rollouts WHERE run_id=? "
                            "GROUP BY split, termination", (run_id,)).fetchall()
        errors = conn.execute("SELECT split, COUNT(*) FROM rollouts WHERE run_id=? AND errors != '[]' GROUP BY split",
                              (run_id,)).fetchall()
        by_split = {s: int(n) for s, n in errors}
    else:
        rows = conn.execute("SELECT split, termination, COUNT(*), MIN(step), MAX(id), SUM(errors != '[]') "
                            "FROM rollouts WHERE id>? AND +run_id=? GROUP BY split, termination",
                            (int(after_id), run_id)).fetchall()
        by_split = {}
        for r in rows:
            by_split[r[0]] = by_split.get(r[0], 0) + int(r[5] or 0)
    top = max([after_id, *(r[4] for r in rows)])
    return [(r[0], r[1], int(r[2]), int(r[3])) for r in rows], by_split, top


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

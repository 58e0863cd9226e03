"""The run store: one SQLite file per workspace (default ``./runs/rlft.db``, WAL mode).

The trainer writes; the console and the CLI read from other processes while it writes (WAL
lets readers see the last committed state without ever blocking the writer). Per run it keeps:
the run row (status, model, environment, config, a snapshot of the environment file's source,
failure reason and traceback, a stop flag the console can set), metrics (one row per run, step
and key: re-logging after a resume overwrites instead of duplicating), rollouts (messages,
reward components, advantage, termination, errors with tracebacks, the dataset row, token
*counts*, env logs), logs, checkpoints (path + metrics) and evals.

Left out on purpose: token ids and logprobs (large; the trainer needs them only in memory),
the rollout's ``state`` scratch, and weights (checkpoints live as files in ``run_dir(run_id)``,
``<workspace>/<run_id>/``; the store keeps their paths). This module imports only the standard
library and ``rlft.types`` so that the console never pulls in the trainer.

Every reader returns plain dicts and lists with JSON columns decoded. Methods taking a
``run_id`` expect the exact id; ``resolve``/``get_run`` also accept a name or a unique prefix.
Connections are per thread (and per process), so one store can be shared by an async loop and
worker threads; every write is one short ``BEGIN IMMEDIATE`` transaction.

This module: runs, metrics, logs, checkpoints and evals. :class:`RunStore` also has, from its
bases, the rollouts and their queries (``rollouts.py``: pages, counts, errors, heatmap) and the
SQLite file (``database.py``: schema and migrations, connections, transactions, JSON columns).
"""

from __future__ import annotations

import os
import re
import secrets
import sqlite3
import time
from collections.abc import Iterable
from typing import Any

from rlft.errors import UnknownRunError
from rlft.store.database import BUSY_TIMEOUT_MS, DB_NAME, MIGRATIONS, SCHEMA_VERSION, Database, dumps, like, num
from rlft.store.rollouts import RolloutRecords

__all__ = ["RunStore", "DB_NAME", "SCHEMA_VERSION", "MIGRATIONS", "BUSY_TIMEOUT_MS", "KINDS", "STATUSES", "LEVELS",
           "Database"]

KINDS = ("rl", "sft")
STATUSES = ("created", "running", "completed", "failed", "stopped")
LEVELS = ("debug", "info", "warning", "error", "critical")
RUN_FIELDS = {"name", "status", "model", "environment", "config", "env_source", "started_at",
              "finished_at", "step", "error", "traceback", "stop_requested"}


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40]


class RunStore(RolloutRecords):
    """The run store of one workspace. ``path_or_dir``: a ``.db`` file, or a directory holding
    ``rlft.db``. ``readonly=True`` opens with ``mode=ro``: it never creates or migrates, a
    missing file raises ``FileNotFoundError``, and every writer raises ``PermissionError``.
    Rollouts and their queries come from :class:`~rlft.store.rollouts.RolloutRecords`; the
    connections, transactions and schema from :class:`~rlft.store.database.Database`."""

    # -- writers -----------------------------------------------------------------------------
    def create_run(self, name: str | None = None, config: dict[str, Any] | None = None, model: str = "",
                   environment: str = "", env_source: str = "", kind: str = "rl") -> str:
        """A new run in status ``created``; returns its id (``<name-slug>-<rand>`` or ``r-<time>-<rand>``).
        ``kind``: "rl" (a training run on an environment) or "sft" (supervised, ``rlft.sft``)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        now = time.time()
        prefix = _slug(name) if name and _slug(name) else "r-" + time.strftime("%y%m%d-%H%M%S", time.localtime(now))
        for _ in range(20):
            run_id = f"{prefix}-{secrets.token_hex(2)}"
            try:
                with self._tx() as c:
                    c.execute("INSERT INTO runs (id, name, model, environment, config, env_source, created_at, "
                              "updated_at, kind) VALUES (?,?,?,?,?,?,?,?,?)",
                              (run_id, name or run_id, model, environment, dumps(config or {}), env_source, now, now,
                               kind))
                return run_id
            except sqlite3.IntegrityError:
                continue
        raise RuntimeError("could not allocate a unique run id")

    def update_run(self, run_id: str, **fields: Any) -> None:
        bad = set(fields) - RUN_FIELDS
        if bad:
            raise ValueError(f"unknown run fields: {sorted(bad)}")
        if "status" in fields and fields["status"] not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {fields['status']!r}")
        if "config" in fields:
            fields["config"] = dumps(fields["config"])
        fields["updated_at"] = time.time()
        sets = ", ".join(f"{k}=?" for k in fields)
        with self._tx() as c:
            if c.execute(f"UPDATE runs SET {sets} WHERE id=?", (*fields.values(), run_id)).rowcount == 0:
                raise KeyError(f"no run {run_id!r}")

    def set_status(self, run_id: str, status: str, error: str | None = None, traceback: str | None = None) -> None:
        """``running`` stamps ``started_at`` (first time), clears the stop flag and any earlier
        failure; ``completed``/``failed``/``stopped`` stamp ``finished_at``."""
        now = time.time()
        fields: dict[str, Any] = {"status": status}
        if status == "running":
            started = self._conn().execute("SELECT started_at FROM runs WHERE id=?", (run_id,)).fetchone()
            fields.update(started_at=(started[0] if started and started[0] else now), finished_at=None,
                          stop_requested=0, error=error, traceback=traceback)
        elif status in ("completed", "failed", "stopped"):
            fields["finished_at"] = now
        if error is not None or traceback is not None:
            fields.update(error=error, traceback=traceback)
        self.update_run(run_id, **fields)

    def log_metrics(self, run_id: str, step: int, metrics: dict[str, Any]) -> None:
        """Upsert ``{key: value}`` at ``step``; NaN/inf/None are kept as NULL (the key still shows).
        ``wall_time`` is stamped inside the write transaction, so that stamps follow the order in
        which writes commit (a reader that saw every row up to a stamp misses none written later)."""
        with self._tx() as c:
            now = time.time()
            rows = [(run_id, int(step), str(k), num(v), now) for k, v in metrics.items()]
            c.executemany("INSERT INTO metrics VALUES (?,?,?,?,?) ON CONFLICT(run_id, step, key) DO UPDATE SET "
                          "value=excluded.value, wall_time=excluded.wall_time", rows)

    def add_log(self, run_id: str, message: str, level: str = "info", step: int | None = None, source: str = "",
                traceback: str = "") -> None:
        with self._tx() as c:
            c.execute("INSERT INTO logs (run_id, step, level, source, message, traceback, ts) VALUES (?,?,?,?,?,?,?)",
                      (run_id, step, level.lower(), source, str(message), traceback or "", time.time()))

    def add_checkpoint(self, run_id: str, step: int, path: str | os.PathLike[str],
                       metrics: dict[str, Any] | None = None) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO checkpoints VALUES (?,?,?,?,?)",
                      (run_id, int(step), os.fspath(path), time.time(), dumps(metrics or {})))

    def remove_checkpoint(self, run_id: str, step: int) -> None:
        with self._tx() as c:
            c.execute("DELETE FROM checkpoints WHERE run_id=? AND step=?", (run_id, int(step)))

    def add_eval(self, run_id: str | None = None, *, model: str = "", split: str = "eval", k: int = 1,
                 metrics: dict[str, Any] | None = None, step: int | None = None,
                 checkpoint: str | os.PathLike[str] | None = None) -> int:
        """Record an eval; a run's eval at a step and split replaces any earlier one (exactly once
        across resumes). Evals of external models (no run, no step) accumulate."""
        with self._tx() as c:
            if run_id is not None and step is not None:
                c.execute("DELETE FROM evals WHERE run_id=? AND step=? AND split=?", (run_id, int(step), split))
            cur = c.execute("INSERT INTO evals (run_id, step, checkpoint, model, split, k, metrics, created_at) "
                            "VALUES (?,?,?,?,?,?,?,?)", (run_id, step, os.fspath(checkpoint) if checkpoint else None,
                                                         model, split, int(k), dumps(metrics or {}), time.time()))
            return int(cur.lastrowid)

    def truncate_after(self, run_id: str, step: int) -> None:
        """Before resuming from ``step``: drop what was recorded after it (metrics, rollouts of
        both splits, evals, checkpoint rows) and set the run's step back to it if it was ahead.
        Logs are kept: they are the run's journal, interruptions included."""
        with self._tx() as c:
            if self._fts:
                c.execute("DELETE FROM rollouts_fts WHERE rowid IN (SELECT id FROM rollouts WHERE run_id=? AND step>?)",
                          (run_id, step))
            c.execute("DELETE FROM rollouts WHERE run_id=? AND step>?", (run_id, step))
            c.execute("DELETE FROM metrics WHERE run_id=? AND step>?", (run_id, step))
            c.execute("DELETE FROM evals WHERE run_id=? AND step>?", (run_id, step))
            c.execute("DELETE FROM checkpoints WHERE run_id=? AND step>?", (run_id, step))
            c.execute("UPDATE runs SET step=MIN(step, ?), updated_at=? WHERE id=?", (step, time.time(), run_id))

    def delete_run(self, run_id: str) -> None:
        """Remove a run and all its rows (its files in ``run_dir`` are left to the caller)."""
        with self._tx() as c:
            if self._fts:
                c.execute("DELETE FROM rollouts_fts WHERE rowid IN (SELECT id FROM rollouts WHERE run_id=?)", (run_id,))
            for table in ("rollouts", "metrics", "logs", "checkpoints", "evals"):
                c.execute(f"DELETE FROM {table} WHERE run_id=?", (run_id,))
            c.execute("DELETE FROM runs WHERE id=?", (run_id,))

    def request_stop(self, run_id: str) -> None:
        """Ask the trainer to stop after its current step. Needs a writable store (the console's
        read-only store cannot); the trainer polls ``stop_requested``."""
        self.update_run(run_id, stop_requested=1)

    def stop_requested(self, run_id: str) -> bool:
        row = self._conn().execute("SELECT stop_requested FROM runs WHERE id=?", (run_id,)).fetchone()
        return bool(row and row[0])

    # -- readers -----------------------------------------------------------------------------
    def list_runs(self) -> list[dict[str, Any]]:
        """All runs, newest first, without ``env_source`` and ``traceback`` (see ``get_run``)."""
        return self._rows("SELECT id, name, status, model, environment, config, created_at, started_at, finished_at,"
                          f" updated_at, step, error, stop_requested, {self._kind_col} FROM runs"
                          " ORDER BY created_at DESC, rowid DESC")

    def resolve(self, ref: str) -> str:
        """The run id for an exact id, a name (the newest run of that name) or a unique id prefix."""
        c = self._conn()
        if c.execute("SELECT 1 FROM runs WHERE id=?", (ref,)).fetchone():
            return ref
        row = c.execute("SELECT id FROM runs WHERE name=? ORDER BY created_at DESC LIMIT 1", (ref,)).fetchone()
        if row:
            return row[0]
        ids = [r[0] for r in c.execute("SELECT id FROM runs WHERE id LIKE ? ESCAPE '\\' LIMIT 6", (like(ref) + "%",))]
        if len(ids) == 1:
            return ids[0]
        raise UnknownRunError(f"no run {ref!r} in {self.path}" if not ids
                              else f"run {ref!r} is ambiguous: {', '.join(ids[:5])}")

    def get_run(self, ref: str) -> dict[str, Any]:
        """The full run row; ``ref`` as in ``resolve``. Raises ``KeyError`` if none or ambiguous."""
        return {"kind": "rl"} | self._rows("SELECT * FROM runs WHERE id=?", (self.resolve(ref),))[0]

    def metrics(self, run_id: str, keys: Iterable[str] | None = None, *, since_step: int | None = None
                ) -> dict[str, list[tuple[int, float | None]]]:
        """``{key: [(step, value), ...]}`` in step order; ``since_step``: only steps >= it."""
        sql, args = "SELECT key, step, value FROM metrics WHERE run_id=?", [run_id]
        if since_step is not None:
            sql += " AND step >= ?"
            args.append(int(since_step))
        if keys is not None:
            keys = list(keys)
            sql += f" AND key IN ({','.join('?' * len(keys))})"
            args += keys
        out: dict[str, list[tuple[int, float | None]]] = {}
        for key, step, value in self._conn().execute(sql + " ORDER BY key, step", args):
            out.setdefault(key, []).append((step, value))
        return out

    def metric_keys(self, run_id: str) -> list[str]:
        return [r[0] for r in self._conn().execute("SELECT DISTINCT key FROM metrics WHERE run_id=? ORDER BY key",
                                                   (run_id,))]

    def latest_metrics(self, run_id: str) -> dict[str, float | None]:
        """Each key's value at the last step it was logged."""
        rows = self._conn().execute("SELECT key, value, MAX(step) FROM metrics WHERE run_id=? GROUP BY key", (run_id,))
        return {key: value for key, value, _ in rows}

    def logs(self, run_id: str, level: str | None = None, step: int | None = None, after_id: int = 0,
             limit: int = 1000) -> list[dict[str, Any]]:
        """Logs in order. ``level``: that level and above; ``after_id``: only newer than that id (tailing)."""
        sql, args = "SELECT * FROM logs WHERE run_id=? AND id>?", [run_id, int(after_id)]
        if level is not None:
            lv = level.lower()
            levels = LEVELS[LEVELS.index(lv):] if lv in LEVELS else (lv,)
            sql += f" AND level IN ({','.join('?' * len(levels))})"
            args += levels
        if step is not None:
            sql += " AND step=?"
            args.append(step)
        return self._rows(sql + " ORDER BY id LIMIT ?", [*args, int(limit)])

    def checkpoints(self, run_id: str) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM checkpoints WHERE run_id=? ORDER BY step", (run_id,))

    def has_eval(self, run_id: str, step: int, split: str = "eval") -> bool:
        return bool(self._rows("SELECT 1 FROM evals WHERE run_id=? AND step=? AND split=? LIMIT 1",
                               (run_id, int(step), split)))

    def evals(self, run_id: str | None = None) -> list[dict[str, Any]]:
        if run_id is None:
            return self._rows("SELECT * FROM evals ORDER BY created_at, id")
        return self._rows("SELECT * FROM evals WHERE run_id=? ORDER BY created_at, id", (run_id,))

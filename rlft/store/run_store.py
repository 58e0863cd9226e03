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
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any

from rlft.errors import UnknownRunError
from rlft.types import Rollout

DB_NAME = "rlft.db"
SCHEMA_VERSION = 5
KINDS = ("rl", "sft")
STATUSES = ("created", "running", "completed", "failed", "stopped")
LEVELS = ("debug", "info", "warning", "error", "critical")
BUSY_TIMEOUT_MS = 10_000

_SCHEMA_V1 = [
    """CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS runs (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'created',
        model TEXT NOT NULL DEFAULT '', environment TEXT NOT NULL DEFAULT '', config TEXT NOT NULL DEFAULT '{}',
        env_source TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL, started_at REAL, finished_at REAL,
        updated_at REAL NOT NULL, step INTEGER NOT NULL DEFAULT 0, error TEXT, traceback TEXT,
        stop_requested INTEGER NOT NULL DEFAULT 0)""",
    """CREATE INDEX IF NOT EXISTS runs_name ON runs(name)""",
    """CREATE TABLE IF NOT EXISTS metrics (
        run_id TEXT NOT NULL, step INTEGER NOT NULL, key TEXT NOT NULL, value REAL, wall_time REAL NOT NULL,
        UNIQUE(run_id, step, key))""",
    """CREATE INDEX IF NOT EXISTS metrics_key ON metrics(run_id, key, step)""",
    """CREATE TABLE IF NOT EXISTS rollouts (
        id INTEGER PRIMARY KEY, run_id TEXT NOT NULL, step INTEGER NOT NULL, split TEXT NOT NULL DEFAULT 'train',
        example_id INTEGER NOT NULL, group_index INTEGER NOT NULL, messages TEXT NOT NULL, rewards TEXT NOT NULL,
        reward REAL, advantage REAL, termination TEXT, errors TEXT NOT NULL, example TEXT NOT NULL,
        num_prompt_tokens INTEGER, num_completion_tokens INTEGER, num_sampled_tokens INTEGER,
        turns INTEGER, tool_calls INTEGER, policy_version INTEGER, logs TEXT NOT NULL, metrics TEXT NOT NULL,
        created_at REAL NOT NULL, UNIQUE(run_id, step, split, example_id, group_index))""",
    """CREATE INDEX IF NOT EXISTS rollouts_example ON rollouts(run_id, split, example_id, step)""",
    """CREATE TABLE IF NOT EXISTS logs (
        id INTEGER PRIMARY KEY, run_id TEXT NOT NULL, step INTEGER, level TEXT NOT NULL, source TEXT NOT NULL,
        message TEXT NOT NULL, traceback TEXT NOT NULL, ts REAL NOT NULL)""",
    """CREATE INDEX IF NOT EXISTS logs_run ON logs(run_id, id)""",
    """CREATE TABLE IF NOT EXISTS checkpoints (
        run_id TEXT NOT NULL, step INTEGER NOT NULL, path TEXT NOT NULL, created_at REAL NOT NULL,
        metrics TEXT NOT NULL, UNIQUE(run_id, step))""",
    """CREATE TABLE IF NOT EXISTS evals (
        id INTEGER PRIMARY KEY, run_id TEXT, step INTEGER, checkpoint TEXT, model TEXT NOT NULL,
        split TEXT NOT NULL, k INTEGER NOT NULL, metrics TEXT NOT NULL, created_at REAL NOT NULL)""",
    """CREATE INDEX IF NOT EXISTS evals_run ON evals(run_id)""",
]
# Full-text search over message text; left out when this SQLite has no FTS5 (search then uses LIKE).
_FTS_V1 = "CREATE VIRTUAL TABLE IF NOT EXISTS rollouts_fts USING fts5(text)"
# v2: a run has at most one eval row per (step, split): resumes re-run a missing eval and
# overwrite a partial one instead of adding a duplicate (duplicates of older stores: the newest kept)
_SCHEMA_V2 = [
    """DELETE FROM evals WHERE run_id IS NOT NULL AND step IS NOT NULL AND id NOT IN (
        SELECT MAX(id) FROM evals WHERE run_id IS NOT NULL AND step IS NOT NULL GROUP BY run_id, step, split)""",
    """CREATE UNIQUE INDEX IF NOT EXISTS evals_run_step ON evals(run_id, step, split)
        WHERE run_id IS NOT NULL AND step IS NOT NULL""",
]
# v3: the rollout's prompt as the model saw it (system prompt and tool schemas rendered by the template)
_SCHEMA_V3 = ["ALTER TABLE rollouts ADD COLUMN prompt_text TEXT NOT NULL DEFAULT ''"]
# v4: the run kind ("rl" | "sft": rlft.sft); runs made before it are RL runs
_SCHEMA_V4 = ["ALTER TABLE runs ADD COLUMN kind TEXT NOT NULL DEFAULT 'rl'"]
# v5: metric series read from the index alone (the console reads 20k points a chart page; the
# metrics_key index needed a table lookup for every value)
_SCHEMA_V5 = ["CREATE INDEX IF NOT EXISTS metrics_series ON metrics(run_id, key, step, value)"]
MIGRATIONS: dict[int, list[str]] = {1: _SCHEMA_V1, 2: _SCHEMA_V2, 3: _SCHEMA_V3, 4: _SCHEMA_V4, 5: _SCHEMA_V5}

_JSON_COLS = {"config", "messages", "rewards", "errors", "example", "logs", "metrics"}
_RUN_FIELDS = {"name", "status", "model", "environment", "config", "env_source", "started_at",
               "finished_at", "step", "error", "traceback", "stop_requested"}
_ROLLOUT_COLS = ("run_id, step, split, example_id, group_index, messages, rewards, reward, advantage, termination, "
                 "errors, example, num_prompt_tokens, num_completion_tokens, num_sampled_tokens, turns, tool_calls, "
                 "policy_version, logs, metrics, created_at, prompt_text")


def _jsonable(x: Any) -> Any:
    """Plain JSON values: non-finite floats -> None, enums -> value, dataclasses -> dicts, else str()."""
    if isinstance(x, Enum):
        return _jsonable(x.value)
    if x is None or isinstance(x, (str, bool, int)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(_jsonable(k)): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in x]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, bytes):
        return x.decode("utf-8", "replace")
    if hasattr(x, "item") and getattr(x, "size", 1) == 1:  # numpy / torch scalars
        return _jsonable(x.item())
    return os.fspath(x) if isinstance(x, os.PathLike) else str(x)


def _dumps(x: Any) -> str:
    return json.dumps(_jsonable(x), ensure_ascii=False, allow_nan=False)


def _num(x: Any) -> float | None:
    """A finite float, or None (NaN, inf and None are stored as NULL)."""
    if x is None:
        return None
    x = float(x.item() if hasattr(x, "item") else x)
    return x if math.isfinite(x) else None


def _search_text(messages: list[dict[str, Any]]) -> str:
    """The text that full-text search indexes: message contents and tool calls."""
    parts: list[str] = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):  # multi-part content
            parts += [str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in content]
        elif content is not None:
            parts.append(str(content))
        for tc in m.get("tool_calls") or []:
            fn = tc.get("function", tc) if isinstance(tc, dict) else _jsonable(tc)
            parts.append(f"{fn.get('name', '')} {_dumps(fn.get('arguments', ''))}")
    return "\n".join(parts)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40]


def _like(s: str) -> str:
    """A LIKE pattern matching ``s`` literally (with ESCAPE '\\')."""
    return s.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class RunStore:
    """The run store of one workspace. ``path_or_dir``: a ``.db`` file, or a directory holding
    ``rlft.db``. ``readonly=True`` opens with ``mode=ro``: it never creates or migrates, a
    missing file raises ``FileNotFoundError``, and every writer raises ``PermissionError``."""

    def __init__(self, path_or_dir: str | os.PathLike[str] = "runs", readonly: bool = False):
        p = Path(path_or_dir)
        self.path = p if p.suffix in (".db", ".sqlite", ".sqlite3") or p.is_file() else p / DB_NAME
        self.workspace = self.path.parent
        self.readonly = readonly
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[sqlite3.Connection] = []
        if readonly:
            if not self.path.is_file():
                raise FileNotFoundError(f"no run store at {self.path}")
        else:
            self.workspace.mkdir(parents=True, exist_ok=True)
            self._migrate()
        conn = self._conn()
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            raise RuntimeError(f"{self.path} is not an rlft run store (schema version 0)")
        self._fts = conn.execute("SELECT 1 FROM sqlite_master WHERE name='rollouts_fts'").fetchone() is not None
        # a read-only store never migrates: an older file (no kind column) reads as all-RL runs
        has_kind = any(r[1] == "kind" for r in conn.execute("PRAGMA table_info(runs)"))
        self._kind_col = "kind" if has_kind else "'rl' AS kind"

    # -- connections -------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        local = self._local
        if getattr(local, "conn", None) is None or local.pid != os.getpid():
            if self.readonly:
                uri = self.path.resolve().as_uri() + "?mode=ro"
                conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            else:
                conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            if not self.readonly:
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.row_factory = sqlite3.Row
            local.conn, local.pid = conn, os.getpid()
            with self._lock:
                self._conns.append(conn)
        return local.conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        if self.readonly:
            raise PermissionError(f"run store {self.path} is open read-only")
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _migrate(self) -> None:
        with self._tx() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"{self.path} has schema version {version}; this rlft knows up to {SCHEMA_VERSION}")
            for v in range(version + 1, SCHEMA_VERSION + 1):
                for stmt in MIGRATIONS[v]:
                    try:
                        conn.execute(stmt)
                    except sqlite3.OperationalError as e:  # ADD COLUMN on a store whose table already has it
                        if not (stmt.startswith("ALTER TABLE") and "duplicate column" in str(e)):
                            raise
                if v == 1:
                    try:
                        conn.execute(_FTS_V1)
                    except sqlite3.OperationalError:  # no FTS5 in this SQLite build
                        pass
                conn.execute("INSERT OR REPLACE INTO schema_version VALUES (?, ?)", (v, time.time()))
                conn.execute(f"PRAGMA user_version={v}")

    def close(self) -> None:
        with self._lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()
        self._local = threading.local()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _rows(self, sql: str, args: Iterable[Any] = ()) -> list[dict[str, Any]]:
        out = []
        for row in self._conn().execute(sql, tuple(args)):
            d = dict(row)
            for k in d.keys() & _JSON_COLS:
                if isinstance(d[k], str):
                    d[k] = json.loads(d[k])
            if "stop_requested" in d:
                d["stop_requested"] = bool(d["stop_requested"])
            out.append(d)
        return out

    def run_dir(self, run_id: str) -> Path:
        """``<workspace>/<run_id>/`` for checkpoints and other files of a run (not created here)."""
        if not run_id or "/" in run_id or "\\" in run_id or run_id in (".", ".."):
            raise ValueError(f"bad run id {run_id!r}")
        return self.workspace / run_id

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
                              (run_id, name or run_id, model, environment, _dumps(config or {}), env_source, now, now,
                               kind))
                return run_id
            except sqlite3.IntegrityError:
                continue
        raise RuntimeError("could not allocate a unique run id")

    def update_run(self, run_id: str, **fields: Any) -> None:
        bad = set(fields) - _RUN_FIELDS
        if bad:
            raise ValueError(f"unknown run fields: {sorted(bad)}")
        if "status" in fields and fields["status"] not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {fields['status']!r}")
        if "config" in fields:
            fields["config"] = _dumps(fields["config"])
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
        """Upsert ``{key: value}`` at ``step``; NaN/inf/None are kept as NULL (the key still shows)."""
        now = time.time()
        rows = [(run_id, int(step), str(k), _num(v), now) for k, v in metrics.items()]
        with self._tx() as c:
            c.executemany("INSERT INTO metrics VALUES (?,?,?,?,?) ON CONFLICT(run_id, step, key) DO UPDATE SET "
                          "value=excluded.value, wall_time=excluded.wall_time", rows)

    def add_rollouts(self, run_id: str, step: int, rollouts: Iterable[Rollout], split: str = "train") -> None:
        """Store a batch in one transaction; a rollout with the same (step, split, example_id,
        group_index) replaces the stored one. Token ids are reduced to counts."""
        now = time.time()
        upsert = (f"INSERT INTO rollouts ({_ROLLOUT_COLS}) VALUES ({','.join('?' * 22)}) "
                  "ON CONFLICT(run_id, step, split, example_id, group_index) DO UPDATE SET "
                  + ", ".join(f"{c.strip()}=excluded.{c.strip()}" for c in _ROLLOUT_COLS.split(",")[5:]))
        with self._tx() as c:
            for r in rollouts:
                term = r.termination.value if isinstance(r.termination, Enum) else r.termination
                key = (run_id, int(step), split, int(r.example_id), int(r.group_index))
                c.execute(upsert, (*key, _dumps(r.messages), _dumps(r.rewards), _num(r.reward), _num(r.advantage),
                                   term, _dumps(r.errors), _dumps(r.example), len(r.prompt_ids),
                                   len(r.completion_ids), int(sum(r.mask)), r.turns, r.tool_calls,
                                   r.policy_version, _dumps(r.logs), _dumps(r.metrics), now,
                                   getattr(r, "prompt_text", "") or ""))
                if self._fts:
                    (rid,) = c.execute("SELECT id FROM rollouts WHERE run_id=? AND step=? AND split=? AND "
                                       "example_id=? AND group_index=?", key).fetchone()
                    c.execute("DELETE FROM rollouts_fts WHERE rowid=?", (rid,))
                    c.execute("INSERT INTO rollouts_fts (rowid, text) VALUES (?,?)",
                              (rid, _search_text(_jsonable(r.messages))))

    def add_log(self, run_id: str, message: str, level: str = "info", step: int | None = None, source: str = "",
                traceback: str = "") -> None:
        with self._tx() as c:
            c.execute("INSERT INTO logs (run_id, step, level, source, message, traceback, ts) VALUES (?,?,?,?,?,?,?)",
                      (run_id, step, level.lower(), source, str(message), traceback or "", time.time()))

    def add_checkpoint(self, run_id: str, step: int, path: str | os.PathLike[str],
                       metrics: dict[str, Any] | None = None) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO checkpoints VALUES (?,?,?,?,?)",
                      (run_id, int(step), os.fspath(path), time.time(), _dumps(metrics or {})))

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
                                                         model, split, int(k), _dumps(metrics or {}), time.time()))
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
        ids = [r[0] for r in c.execute("SELECT id FROM runs WHERE id LIKE ? ESCAPE '\\' LIMIT 6", (_like(ref) + "%",))]
        if len(ids) == 1:
            return ids[0]
        raise UnknownRunError(f"no run {ref!r} in {self.path}" if not ids
                              else f"run {ref!r} is ambiguous: {', '.join(ids[:5])}")

    def get_run(self, ref: str) -> dict[str, Any]:
        """The full run row; ``ref`` as in ``resolve``. Raises ``KeyError`` if none or ambiguous."""
        return {"kind": "rl"} | self._rows("SELECT * FROM runs WHERE id=?", (self.resolve(ref),))[0]

    def metrics(self, run_id: str, keys: Iterable[str] | None = None) -> dict[str, list[tuple[int, float | None]]]:
        sql, args = "SELECT key, step, value FROM metrics WHERE run_id=?", [run_id]
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

    def _rollout_filter(self, run_id: str, step: int | None = None, split: str | None = "train",
                        example_id: int | None = None, min_reward: float | None = None,
                        max_reward: float | None = None, termination: Any = None,
                        search: str | None = None) -> tuple[str, list[Any]]:
        where, args = ["run_id=?"], [run_id]
        for cond, val in (("step=?", step), ("split=?", split), ("example_id=?", example_id),
                          ("reward>=?", min_reward), ("reward<=?", max_reward)):
            if val is not None:
                where.append(cond)
                args.append(val)
        if termination is not None:
            terms = [termination] if isinstance(termination, (str, Enum)) else list(termination)
            where.append(f"termination IN ({','.join('?' * len(terms))})")
            args += [t.value if isinstance(t, Enum) else t for t in terms]
        if search:
            if self._fts and re.search(r"[^\W_]", search):
                # Word search; the last word may be a prefix ("tool_ca" finds "tool_call").
                where.append("id IN (SELECT rowid FROM rollouts_fts WHERE rollouts_fts MATCH ?)")
                args.append('"' + search.replace('"', '""') + '"*')
            else:
                where.append("messages LIKE ? ESCAPE '\\'")
                args.append(f"%{_like(search)}%")
        return " AND ".join(where), args

    def rollouts(self, run_id: str, step: int | None = None, split: str | None = "train", example_id: int | None = None,
                 min_reward: float | None = None, max_reward: float | None = None, termination: Any = None,
                 search: str | None = None, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Rollouts ordered by step, example, group index. ``split=None``: both splits;
        ``termination``: one value or a list; rewards bounds are inclusive."""
        where, args = self._rollout_filter(run_id, step, split, example_id, min_reward, max_reward, termination, search)
        return self._rows(f"SELECT * FROM rollouts WHERE {where} ORDER BY step, split, example_id, group_index "
                          "LIMIT ? OFFSET ?", [*args, int(limit), int(offset)])

    def count_rollouts(self, run_id: str, **filters: Any) -> int:
        """How many rollouts ``rollouts`` would list with these filters and no limit."""
        where, args = self._rollout_filter(run_id, **filters)
        return self._conn().execute(f"SELECT COUNT(*) FROM rollouts WHERE {where}", args).fetchone()[0]

    def rollout_errors(self, run_id: str, split: str | None = "train", first_step: int | None = None,
                       last_step: int | None = None, limit: int = 5000) -> list[dict[str, Any]]:
        """``{step, example_id, group_index, errors}`` of the rollouts that recorded errors (the
        health diagnoses and ``rlft runs logs`` count their messages), in step order."""
        where, args = ["run_id=?", "errors != '[]'"], [run_id]
        for cond, val in (("split=?", split), ("step>=?", first_step), ("step<=?", last_step)):
            if val is not None:
                where.append(cond)
                args.append(val)
        return self._rows(f"SELECT step, split, example_id, group_index, errors FROM rollouts WHERE "
                          f"{' AND '.join(where)} ORDER BY step, example_id, group_index LIMIT ?", [*args, int(limit)])

    def rollout(self, rollout_id: int) -> dict[str, Any]:
        rows = self._rows("SELECT * FROM rollouts WHERE id=?", (int(rollout_id),))
        if not rows:
            raise KeyError(f"no rollout {rollout_id}")
        return rows[0]

    def rollout_steps(self, run_id: str, split: str = "train") -> list[int]:
        rows = self._conn().execute("SELECT DISTINCT step FROM rollouts WHERE run_id=? AND split=? ORDER BY step",
                                    (run_id, split))
        return [r[0] for r in rows]

    def termination_counts(self, run_id: str, step: int | None = None, split: str = "train") -> dict[str | None, int]:
        sql, args = "SELECT termination, COUNT(*) FROM rollouts WHERE run_id=? AND split=?", [run_id, split]
        if step is not None:
            sql += " AND step=?"
            args.append(step)
        return {t: n for t, n in self._conn().execute(sql + " GROUP BY termination ORDER BY 2 DESC", args)}

    def reward_heatmap(self, run_id: str, split: str = "train") -> dict[int, dict[int, float | None]]:
        """``{example_id: {step: mean reward of its rollouts at that step}}``."""
        out: dict[int, dict[int, float | None]] = {}
        rows = self._conn().execute("SELECT example_id, step, AVG(reward) FROM rollouts WHERE run_id=? AND split=? "
                                    "GROUP BY example_id, step ORDER BY example_id, step", (run_id, split))
        for example_id, step, mean in rows:
            out.setdefault(example_id, {})[step] = mean
        return out

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

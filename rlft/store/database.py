"""The SQLite file under the run store: schema and migrations, connections, transactions, JSON columns.

:class:`Database` opens ``rlft.db`` (creating and migrating it unless read-only), hands each
thread (and process) its own connection in WAL mode, runs every write as one short ``BEGIN
IMMEDIATE`` transaction (``_tx``) and decodes JSON columns in what readers return (``_rows``).
The schema is a list of migrations, one per version (``MIGRATIONS``); a store written by an
older rlft is migrated on open, a newer one is refused.

Left out: what is stored and asked (``run_store.py``: runs, metrics, logs, checkpoints, evals;
``rollouts.py``: rollouts and their queries). Standard library only, like the whole store.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

DB_NAME = "rlft.db"
SCHEMA_VERSION = 6
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
# v6: what the console counts and follows without reading rollout rows (a run of 250k rollouts
# made SQLite walk 800 MB of messages to reach termination and errors): rollouts by split and
# termination from an index alone, those with errors from a partial index (1 % of the rows), and
# a run's metric rows by write time (the console reads only the rows written since it last read)
_SCHEMA_V6 = ["CREATE INDEX IF NOT EXISTS rollouts_tally ON rollouts(run_id, split, termination, step)",
              "CREATE INDEX IF NOT EXISTS rollouts_errors ON rollouts(run_id, split, step, termination) "
              "WHERE errors != '[]'",
              "CREATE INDEX IF NOT EXISTS metrics_written ON metrics(run_id, wall_time)"]
MIGRATIONS: dict[int, list[str]] = {1: _SCHEMA_V1, 2: _SCHEMA_V2, 3: _SCHEMA_V3, 4: _SCHEMA_V4, 5: _SCHEMA_V5,
                                    6: _SCHEMA_V6}

_D = TypeVar("_D", bound="Database")
JSON_COLS = {"config", "messages", "rewards", "errors", "example", "logs", "metrics"}


def jsonable(x: Any) -> Any:
    """Plain JSON values: non-finite floats -> None, enums -> value, dataclasses -> dicts, else str()."""
    if isinstance(x, Enum):
        return jsonable(x.value)
    if x is None or isinstance(x, (str, bool, int)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(jsonable(k)): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in x]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, bytes):
        return x.decode("utf-8", "replace")
    if hasattr(x, "item") and getattr(x, "size", 1) == 1:  # numpy / torch scalars
        return jsonable(x.item())
    return os.fspath(x) if isinstance(x, os.PathLike) else str(x)


def dumps(x: Any) -> str:
    return json.dumps(jsonable(x), ensure_ascii=False, allow_nan=False)


def num(x: Any) -> float | None:
    """A finite float, or None (NaN, inf and None are stored as NULL)."""
    if x is None:
        return None
    x = float(x.item() if hasattr(x, "item") else x)
    return x if math.isfinite(x) else None


def like(s: str) -> str:
    """A LIKE pattern matching ``s`` literally (with ESCAPE '\\')."""
    return s.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class Database:
    """One workspace's SQLite file. ``path_or_dir``: a ``.db`` file, or a directory holding
    ``rlft.db``. ``readonly=True`` opens with ``mode=ro``: it never creates or migrates, a
    missing file raises ``FileNotFoundError``, and every write raises ``PermissionError``."""

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

    def __enter__(self: _D) -> _D:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _rows(self, sql: str, args: Iterable[Any] = ()) -> list[dict[str, Any]]:
        out = []
        for row in self._conn().execute(sql, tuple(args)):
            d = dict(row)
            for k in d.keys() & JSON_COLS:
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

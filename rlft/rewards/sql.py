"""SQL graders for ``rlft.rewards.checks``: parse checks and result-set comparison on SQLite.

  sql_parses(sql, dialect)              True if sqlglot parses the statement (extra ``rewards``)
  sql_result_match(pred, gold, db_path) 1.0 if both queries return the same rows (read-only, timed)
  extract_sql(text)                     the last ```sql block of a completion, else the whole text
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections import Counter
from functools import lru_cache
from pathlib import Path


def sql_parses(sql: str, dialect: str = "sqlite") -> bool:
    try:
        import sqlglot
    except ImportError as e:
        raise ImportError("sqlglot is needed for sql_parses: pip install 'rlft[rewards]' (or sqlglot)") from e
    try:
        return any(s is not None for s in sqlglot.parse(sql, read=dialect))
    except sqlglot.errors.SqlglotError:
        return False


# What a query may do: read. Writes, ATTACH, PRAGMA, schema changes... are denied.
_SQL_ALLOWED = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
                getattr(sqlite3, "SQLITE_RECURSIVE", 33)}


def _run_sql(sql: str, db_path: str, timeout: float, max_rows: int) -> list[tuple]:
    uri = Path(db_path).resolve().as_uri() + "?mode=ro"
    con = sqlite3.connect(uri, uri=True, check_same_thread=False)
    try:
        con.set_authorizer(lambda action, *_: sqlite3.SQLITE_OK if action in _SQL_ALLOWED else sqlite3.SQLITE_DENY)
        deadline = time.monotonic() + timeout
        con.set_progress_handler(lambda: int(time.monotonic() > deadline), 1000)
        cur = con.execute(sql.strip().rstrip(";"))
        rows = cur.fetchmany(max_rows + 1)
        if len(rows) > max_rows:
            raise ValueError(f"more than {max_rows} rows")
        return [tuple(round(v, 6) if isinstance(v, float) else v for v in r) for r in rows]
    finally:
        con.close()


@lru_cache(maxsize=256)
def _gold_rows(sql: str, db_path: str, stamp: tuple, timeout: float, max_rows: int) -> list[tuple]:
    return _run_sql(sql, db_path, timeout, max_rows)


def sql_result_match(pred_sql: str, gold_sql: str, db_path: str, *, timeout: float = 5.0,
                     max_rows: int = 100_000) -> float:
    """1.0 if ``pred_sql`` returns the same rows as ``gold_sql`` on the SQLite file ``db_path``
    (opened read-only; only reads are authorized; each query aborted after ``timeout`` s). Rows
    are compared as multisets, in order only when the gold query has ORDER BY. A failing
    prediction scores 0.0; a failing gold query raises ValueError (a dataset bug)."""
    st = Path(db_path).stat()
    try:
        gold = _gold_rows(gold_sql, str(db_path), (st.st_mtime_ns, st.st_size), timeout, max_rows)
    except (sqlite3.Error, ValueError) as e:
        raise ValueError(f"the gold SQL failed on {db_path}: {e}") from e
    try:
        pred = _run_sql(pred_sql, str(db_path), timeout, max_rows)
    except (sqlite3.Error, ValueError, sqlite3.Warning):
        return 0.0
    ordered = re.search(r"\border\s+by\b", re.sub(r"--[^\n]*|/\*.*?\*/|'[^']*'", "", gold_sql, flags=re.S), re.I)
    return float(pred == gold if ordered else Counter(pred) == Counter(gold))


def extract_sql(text: str) -> str:
    blocks = re.findall(r"```(?:sql|SQL|sqlite)?[^\n`]*\n(.*?)```", text or "", re.S)
    return (blocks[-1] if blocks else text or "").strip()


__all__ = ["sql_parses", "sql_result_match", "extract_sql"]

"""Structured output, text-to-SQL: write one SQLite query that answers a question about a shop.
The query is executed against the database and its rows compared with the gold query's
(checks.sql_match: read-only, timed, multiset comparison unless the gold query orders).

The database is built from shop.sql once per process (in a temporary directory); `dataset`
is data.jsonl with each row's `db_path` pointing at it, which is where checks.sql_match looks.

Rewards (partial credit, so a weak model's groups are not tied):
  sql_match     1.0   the query returns the gold rows
  sql_executes  0.3   the reply holds a SELECT query (fenced, or anywhere in the text) that runs
                      on the database (read-only) without error

Warm-up: `demonstrate(example)` replies with the row's gold query in a ```sql block, the shape
the system prompt asks for; config.toml trains on these (train split) before RL.
"""

import atexit
import json
import re
import shutil
import sqlite3
import tempfile
from pathlib import Path

from rlft import Environment, Reward
from rlft.rewards import checks

HERE = Path(__file__).parent
_DIR = tempfile.mkdtemp(prefix="rlft-sql-")
atexit.register(shutil.rmtree, _DIR, ignore_errors=True)
DB = str(Path(_DIR) / "shop.db")
with sqlite3.connect(DB) as _db:
    _db.executescript((HERE / "shop.sql").read_text())

dataset = [{**json.loads(line), "db_path": DB} for line in (HERE / "data.jsonl").read_text().splitlines()]


_SELECT = re.compile(r"\b(SELECT\b.*?)(?:;|```|\"|\n\n|$)", re.I | re.S)


def sql_executes(rollout) -> float:
    """1 if the reply holds a SELECT query (in a ```sql block, or anywhere in the text) that runs.
    Looser than sql_match, which grades only the block or the whole reply: partial credit for
    a right query wrapped in prose, which small models write often."""
    sql = checks.extract_sql(rollout.completion).strip().rstrip(";")
    if not sql.lower().startswith(("select", "with")):
        found = _SELECT.search(rollout.completion)
        if not found:
            return 0.0
        sql = found.group(1).strip()
    con = sqlite3.connect(Path(DB).as_uri() + "?mode=ro", uri=True)
    try:
        con.execute(sql).fetchmany(1)
        return 1.0
    except (sqlite3.Error, sqlite3.Warning, ValueError):
        return 0.0
    finally:
        con.close()


def demonstrate(example):
    """The reply that solves a row: its gold query, fenced."""
    return f"```sql\n{example['ground_truth']}\n```"


SYSTEM = """You write SQLite queries. Tables:
products(name TEXT, category TEXT, price REAL, stock INTEGER)
customers(id INTEGER, name TEXT, city TEXT)
orders(id INTEGER, customer_id INTEGER, product TEXT, quantity INTEGER)
Reply with the query in a ```sql block and nothing else, for example:
```sql
SELECT name FROM products WHERE price < 10
```"""

env = Environment(
    system_prompt=SYSTEM,
    rewards=[checks.sql_match(), Reward(sql_executes, weight=0.3)],
    max_turns=1,
    max_tokens=80,
    demonstrate=demonstrate,
    name="structured-sql",
)

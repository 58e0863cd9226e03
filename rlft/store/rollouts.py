"""The run store's rollouts: storing a step's batch and every query over them (the console's pages).

:class:`RolloutRecords` is the part of :class:`rlft.store.RunStore` that writes rollouts (one
transaction per batch, kept in the full-text index when SQLite has FTS5) and reads them back:
filtered pages (step, split, example, reward bounds, termination, text search) and their count,
one rollout, the errors recorded on them, the steps that have any, termination counts and the
example x step reward heatmap.

Left out: the SQLite file itself (``database.py``), and runs, metrics, logs, checkpoints and
evals (``run_store.py``, which also drops rollouts on ``truncate_after`` and ``delete_run``).
Like the rest of the store, standard library only (and ``rlft.types``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from enum import Enum
from typing import Any

from rlft.store.database import Database, dumps, jsonable, like, num
from rlft.types import Rollout

ROLLOUT_COLS = ("run_id, step, split, example_id, group_index, messages, rewards, reward, advantage, termination, "
                "errors, example, num_prompt_tokens, num_completion_tokens, num_sampled_tokens, turns, tool_calls, "
                "policy_version, logs, metrics, created_at, prompt_text")


def search_text(messages: list[dict[str, Any]]) -> str:
    """The text that full-text search indexes: message contents and tool calls."""
    parts: list[str] = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):  # multi-part content
            parts += [str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in content]
        elif content is not None:
            parts.append(str(content))
        for tc in m.get("tool_calls") or []:
            fn = tc.get("function", tc) if isinstance(tc, dict) else jsonable(tc)
            parts.append(f"{fn.get('name', '')} {dumps(fn.get('arguments', ''))}")
    return "\n".join(parts)


class RolloutRecords(Database):
    """Rollouts in the store: ``add_rollouts`` and the readers below (a base of ``RunStore``)."""

    def add_rollouts(self, run_id: str, step: int, rollouts: Iterable[Rollout], split: str = "train") -> None:
        """Store a batch in one transaction; a rollout with the same (step, split, example_id,
        group_index) replaces the stored one. Token ids are reduced to counts."""
        now = time.time()
        upsert = (f"INSERT INTO rollouts ({ROLLOUT_COLS}) VALUES ({','.join('?' * 22)}) "
                  "ON CONFLICT(run_id, step, split, example_id, group_index) DO UPDATE SET "
                  + ", ".join(f"{c.strip()}=excluded.{c.strip()}" for c in ROLLOUT_COLS.split(",")[5:]))
        with self._tx() as c:
            for r in rollouts:
                term = r.termination.value if isinstance(r.termination, Enum) else r.termination
                key = (run_id, int(step), split, int(r.example_id), int(r.group_index))
                c.execute(upsert, (*key, dumps(r.messages), dumps(r.rewards), num(r.reward), num(r.advantage),
                                   term, dumps(r.errors), dumps(r.example), len(r.prompt_ids),
                                   len(r.completion_ids), int(sum(r.mask)), r.turns, r.tool_calls,
                                   r.policy_version, dumps(r.logs), dumps(r.metrics), now,
                                   getattr(r, "prompt_text", "") or ""))
                if self._fts:
                    (rid,) = c.execute("SELECT id FROM rollouts WHERE run_id=? AND step=? AND split=? AND "
                                       "example_id=? AND group_index=?", key).fetchone()
                    c.execute("DELETE FROM rollouts_fts WHERE rowid=?", (rid,))
                    c.execute("INSERT INTO rollouts_fts (rowid, text) VALUES (?,?)",
                              (rid, search_text(jsonable(r.messages))))

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
                args.append(f"%{like(search)}%")
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

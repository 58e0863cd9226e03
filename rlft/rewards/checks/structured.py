"""Structured outputs: the JSON value in a completion, validated against a schema or compared
field by field, and the completion's SQL run against the gold query (``rlft.rewards.sql``).

Left out: free-text answers (``answers.py``; its ``normalize`` compares JSON strings here),
length, phrases and citations (``text.py``). jsonschema and sqlglot are optional (extra
``rewards``), imported by the functions that need them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import Any

from rlft.rewards.checks.answers import normalize
from rlft.rewards.checks.common import Check, expected_value, named, need
from rlft.rewards.sql import extract_sql, sql_result_match


def json_parse(text: str) -> Any:
    """The JSON value in ``text``: the last ```json (or bare ```) block, the whole text, or the
    first decodable {...}/[...] inside it. Raises ValueError when there is none."""
    s = (text or "").strip()
    blocks = re.findall(r"```(?:json|JSON)?[^\n`]*\n(.*?)```", s, re.S)
    for candidate in ([blocks[-1]] if blocks else []) + [s]:
        try:
            return json.loads(candidate)
        except ValueError:
            pass
    dec = json.JSONDecoder()
    for k, i in enumerate(m.start() for m in re.finditer(r"[{\[]", s)):
        if k >= 64:
            break
        try:
            return dec.raw_decode(s, i)[0]
        except ValueError:
            continue
    raise ValueError("no JSON value found")


def json_schema_errors(obj: Any, schema: dict) -> list[str]:
    jsonschema = need("jsonschema", "jsonschema")
    validator = jsonschema.validators.validator_for(schema)(schema)
    errs = sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.path)))
    return [f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errs]


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(obj, dict) and part in obj:
            obj = obj[part]
        elif isinstance(obj, list) and part.isdigit() and int(part) < len(obj):
            obj = obj[int(part)]
        else:
            raise KeyError(path)
    return obj


def _values_equal(a: Any, b: Any) -> bool:
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(a, str) and isinstance(b, str):
        return normalize(a) == normalize(b)
    return a == b


def json_valid() -> Check:
    def check(rollout: Any) -> float:
        try:
            json_parse(rollout.completion)
            return 1.0
        except ValueError:
            return 0.0

    return named(check, "json_valid")


def json_schema(schema: dict | None = None, field: str = "schema") -> Check:
    def check(rollout: Any) -> float:
        s = schema if schema is not None else expected_value(rollout, field)
        s = json.loads(s) if isinstance(s, str) else s
        try:
            obj = json_parse(rollout.completion)
        except ValueError:
            return 0.0
        return float(not json_schema_errors(obj, s))

    return named(check, "json_schema")


def json_fields_match(fields: Iterable[str] | None = None, field: str = "ground_truth") -> Check:
    """Fraction of the expected object's fields (or of ``fields``, dotted paths allowed) whose value
    in the completion's JSON matches (numbers within 1e-6, strings normalized)."""

    def check(rollout: Any) -> float:
        gold = expected_value(rollout, field)
        gold = json.loads(gold) if isinstance(gold, str) else gold
        keys = list(fields) if fields is not None else list(gold)
        if not keys:
            return 1.0
        try:
            pred = json_parse(rollout.completion)
        except ValueError:
            return 0.0
        hits = 0
        for k in keys:
            try:
                hits += _values_equal(_get_path(pred, k), _get_path(gold, k))
            except KeyError:
                pass
        return hits / len(keys)

    return named(check, "json_fields_match")


def sql_match(db_field: str = "db_path", field: str = "ground_truth", timeout: float = 5.0) -> Check:
    def check(rollout: Any) -> float:
        return sql_result_match(extract_sql(rollout.completion), str(expected_value(rollout, field)),
                                str(expected_value(rollout, db_field)), timeout=timeout)

    return named(check, "sql_match")

"""Deterministic graders: pure functions on strings, and reward factories built on them.

Pure functions (strings in, values out; no rollout):
  extract_answer(text, method)     final answer: <answer> tag, \\boxed{}, "#### x", "answer: x", or last number
  normalize(text)                  lowercase, no punctuation/articles/extra spaces (SQuAD-style)
  parse_number(text)               "1,234.5", "$12", "3/4", "\\frac{3}{4}", "50%" (-> 50) -> float, else None
  numbers_equal(a, b, ...)         numeric equality within rel_tol/abs_tol (strings are parsed)
  math_equal(pred, gold)           symbolic equivalence with math-verify; else numeric/normalized compare
  json_parse(text)                 the JSON value in text (a ```json block, raw, or the first {...}/[...])
  json_schema_errors(obj, schema)  list of "path: message" (jsonschema); [] when valid
  sql_parses(sql, dialect)         True if sqlglot parses the statement
  sql_result_match(pred, gold, db) 1.0 if both queries return the same rows on a read-only SQLite db
  word_count(text), sentence_count(text), char count is len(text)
  citations(text)                  ids cited as [doc-12], [12], [1, 3] (markdown links excluded)
  citation_precision_recall(c, r)  (precision, recall) of cited ids against relevant ids

Reward factories (each returns a plain function of a Rollout, named after the factory; expected
values come from ``rollout.ground_truth`` or the named field of ``rollout.example``):
  exact_match(field, normalize, method)   1 if the extracted answer equals the expected one (or any in a list)
  numeric_match(field, rel_tol, abs_tol)  1 if the extracted number equals the expected number
  math_match(field)                       1 if the answer is mathematically equivalent (math_equal)
  tag_format(tag, strict)                 1 if the completion has exactly one non-empty <tag>...</tag>
  regex_match(pattern, field)             1 if the pattern (or the example's field) is found in the completion
  json_valid()                            1 if the completion contains parseable JSON
  json_schema(schema, field)              1 if that JSON validates against the schema
  json_fields_match(fields, field)        fraction of the expected object's fields (dotted paths) matched
  sql_match(db_field, field)              sql_result_match of the completion's SQL vs the expected SQL
  word_limit / sentence_limit / char_limit(max_, min_)  1 inside the limits, decreasing linearly outside
  required_phrases(phrases, field)        fraction of the phrases present
  forbidden_phrases(phrases, field)       1 if none of the phrases is present, else 0
  citation_f1(field, as_dict)             F1 (or precision/recall/F1 components) of the citations
  tool_usage(min_calls, max_calls, required_tools)  calls within bounds x fraction of required tools used
  length_penalty(target_tokens, buffer_tokens)      0 up to target, down to -1 at target+buffer (DAPO)

Optional dependencies (extra ``rewards``): math-verify, jsonschema, sqlglot. They are imported
inside the functions that need them.
"""

from __future__ import annotations

import json
import math
import re
import string
import threading
import unicodedata
import warnings
from collections.abc import Callable, Iterable
from typing import Any

from rlft.rewards.sql import extract_sql, sql_parses, sql_result_match  # the SQL graders live there

Check = Callable[[Any], Any]


def _need(module: str, package: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise ImportError(f"{package} is needed for this check: pip install 'rlft[rewards]' (or {package})") from e


# -- answers ------------------------------------------------------------------------------------
_UNUM = r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?"
_NUM_RE = re.compile(rf"(?<![\w.])[-+]?{_UNUM}(?:\s*/\s*{_UNUM})?")
_ANSWER_IS = re.compile(r"(?:final answer|answer)\s*(?:is|:)\s*:?\s*(.+)", re.I)


def _last_tag(text: str, tag: str) -> str | None:
    found = re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, re.S)
    return found[-1].strip() if found else None


def _last_boxed(text: str) -> str | None:
    starts = list(re.finditer(r"\\(?:boxed|fbox)\b\s*", text))
    if not starts:
        return None
    m = starts[-1]
    if not text.startswith("{", m.end()):
        word = re.match(r"[^\s$]+", text[m.end():])  # "\boxed 5"
        return word.group(0).rstrip(".") if word else None
    depth = 0
    for j in range(m.end(), len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[m.end() + 1: j].strip()
    return None


def last_number(text: str) -> str | None:
    found = _NUM_RE.findall(text or "")
    return found[-1] if found else None


def extract_answer(text: str, method: str = "auto", tag: str = "answer") -> str | None:
    """The final answer in ``text`` by ``method``: "tag" (last <tag>...</tag>), "boxed" (last
    \\boxed{...}), "last_number", or "auto": tag, then boxed, then "#### x", then "answer: x"/
    "the answer is x", then the whole text stripped. None when nothing is found."""
    text = text or ""
    if method == "tag":
        return _last_tag(text, tag)
    if method == "boxed":
        return _last_boxed(text)
    if method == "last_number":
        return last_number(text)
    if method != "auto":
        raise ValueError(f"unknown method {method!r}: tag, boxed, last_number or auto")
    for found in (_last_tag(text, tag), _last_boxed(text)):
        if found is not None:
            return found
    tail = text.rsplit("####", 1)[1].strip() if "####" in text else ""
    if tail:
        return tail.splitlines()[0].strip()
    hits = _ANSWER_IS.findall(text)
    if hits:
        return hits[-1].strip().rstrip(".").strip()
    return text.strip() or None


def normalize(text: Any) -> str:
    s = unicodedata.normalize("NFKC", str(text))
    s = re.sub(r"\\text(?:bf|rm)?\{([^{}]*)\}", r"\1", s).lower()
    s = "".join(" " if (c in string.punctuation or unicodedata.category(c).startswith("P")) else c for c in s)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def parse_number(text: Any) -> float | None:
    if isinstance(text, bool) or text is None:
        return None
    if isinstance(text, (int, float)):
        return float(text)
    s = str(text).strip().strip("$").replace("\\!", "").replace("\\,", "").replace("\\$", "")
    s = re.sub(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}", r"(\1)/(\2)", s)
    s = re.sub(r"\\text\{[^{}]*\}|\\%|[%$€£\s]", "", s).rstrip(".")
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)
    m = re.fullmatch(r"\(?([-+]?[\d.]+(?:[eE][-+]?\d+)?)\)?(?:/\(?([-+]?[\d.]+(?:[eE][-+]?\d+)?)\)?)?", s)
    if not m:
        return None
    try:
        value = float(m.group(1))
        return value / float(m.group(2)) if m.group(2) else value
    except (ValueError, ZeroDivisionError):
        return None


def numbers_equal(a: Any, b: Any, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    x, y = parse_number(a), parse_number(b)
    return x is not None and y is not None and math.isclose(x, y, rel_tol=rel_tol, abs_tol=abs_tol)


def _as_number(text: Any) -> float | None:
    """The value of an answer span: the span itself, else the last number inside it."""
    value = parse_number(text)
    return value if value is not None or text is None else parse_number(last_number(str(text)))


_mv_warned = False


def math_equal(pred: Any, gold: Any) -> bool:
    """Mathematical equivalence (math-verify: LaTeX or plain expressions, sets, intervals...). Falls
    back to numeric then normalized-string comparison when math-verify is missing or cannot parse.
    math-verify's timeout needs SIGALRM, so off the main thread (where sync rewards run) it runs
    without one: the reward's own timeout then bounds the wait, not the work."""
    global _mv_warned
    pred, gold = str(pred), str(gold)
    try:
        import math_verify
    except ImportError:
        if not _mv_warned:
            _mv_warned = True
            warnings.warn("math-verify is not installed (pip install 'rlft[rewards]'): math_equal compares numbers "
                          "and normalized text only", stacklevel=2)
        math_verify = None
    if math_verify is not None:
        # math-verify's own timeout uses SIGALRM, which only works in the main thread.
        t = 5 if threading.current_thread() is threading.main_thread() else None
        wrap = lambda s: s if ("$" in s or "\\boxed" in s or "\\(" in s) else f"${s}$"  # noqa: E731
        try:
            g, p = math_verify.parse(wrap(gold), parsing_timeout=t), math_verify.parse(wrap(pred), parsing_timeout=t)
            if g and p and math_verify.verify(g, p, timeout_seconds=t):
                return True
        except Exception:  # noqa: BLE001 - fall back below
            pass
    x, y = parse_number(pred), parse_number(gold)
    if x is not None and y is not None:
        return math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)
    return normalize(pred) == normalize(gold) != ""


# -- JSON ---------------------------------------------------------------------------------------
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
    jsonschema = _need("jsonschema", "jsonschema")
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


# -- text ---------------------------------------------------------------------------------------
def word_count(text: str) -> int:
    return len(re.findall(r"\w+(?:['’-]\w+)*", text or ""))


_ABBREV = re.compile(r"\b(?:mr|mrs|ms|dr|prof|sr|jr|st|vs|etc|e\.g|i\.e|fig|no|approx)\.$", re.I)


def sentence_count(text: str) -> int:
    parts, buf = [], ""
    for piece in re.split(r"(?<=[.!?…])[\"'”’)\]]*\s+|\n\s*\n", text or ""):
        buf = f"{buf} {piece}" if buf else piece
        if not _ABBREV.search(buf.strip()):
            parts.append(buf)
            buf = ""
    parts.append(buf)
    return sum(1 for p in parts if re.search(r"\w", p or ""))


_CITE = re.compile(r"\[([^\[\]\n]{1,80})\](?!\()")
_CITE_ID = re.compile(r"(?:[A-Za-z][\w]*[-_: ]?)?\d+[A-Za-z]?")


def citations(text: str) -> list[str]:
    """Cited ids in order of first appearance: [doc-12] -> "doc-12", [3, 5] -> "3", "5"."""
    out: list[str] = []
    for group in _CITE.findall(text or ""):
        for part in re.split(r"[,;]", group):
            part = part.strip()
            if _CITE_ID.fullmatch(part) and part not in out:
                out.append(part)
    return out


def _ids(values: Iterable[Any] | str) -> set[str]:
    if isinstance(values, str):
        values = re.split(r"[,;\s]+", values.strip()) if values.strip() else []
    return {str(v).strip().lower() for v in values}


def citation_precision_recall(cited: Iterable[Any], relevant: Iterable[Any]) -> tuple[float, float]:
    c, r = _ids(cited), _ids(relevant)
    hit = len(c & r)
    return (hit / len(c) if c else float(not r)), (hit / len(r) if r else 1.0)


# -- reward factories -----------------------------------------------------------------------------
def _named(fn: Check, name: str) -> Check:
    fn.__name__ = fn.__qualname__ = name
    return fn


def _expected(rollout: Any, field: str) -> Any:
    if field == "ground_truth":
        value = rollout.ground_truth
    elif field in rollout.example:
        value = rollout.example[field]
    else:
        raise KeyError(f"the example has no field {field!r} (it has: {', '.join(map(str, rollout.example))})")
    if value is None:
        raise ValueError(f"the example's {field!r} is empty")
    return value


def _golds(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple, set)) else [value]


def _phrases(rollout: Any, phrases: Iterable[str] | str | None, field: str | None) -> list[str]:
    value = _expected(rollout, field) if field else phrases
    return [value] if isinstance(value, str) else list(value or [])


def exact_match(field: str = "ground_truth", normalize: bool = True, method: str = "auto",
                tag: str = "answer") -> Check:
    norm = globals()["normalize"] if normalize else (lambda s: str(s).strip())

    def check(rollout: Any) -> float:
        got = extract_answer(rollout.completion, method, tag)
        return float(got is not None and any(norm(got) == norm(g) for g in _golds(_expected(rollout, field))))

    return _named(check, "exact_match")


def numeric_match(field: str = "ground_truth", rel_tol: float = 1e-6, abs_tol: float = 1e-9, method: str = "auto",
                  tag: str = "answer") -> Check:
    def check(rollout: Any) -> float:
        got = _as_number(extract_answer(rollout.completion, method, tag))
        golds = [_as_number(g) for g in _golds(_expected(rollout, field))]
        return float(got is not None and any(g is not None and math.isclose(got, g, rel_tol=rel_tol, abs_tol=abs_tol)
                                             for g in golds))

    return _named(check, "numeric_match")


def math_match(field: str = "ground_truth", tag: str = "answer") -> Check:
    def check(rollout: Any) -> float:
        got = extract_answer(rollout.completion, "auto", tag)
        return float(got is not None and any(math_equal(got, g) for g in _golds(_expected(rollout, field))))

    return _named(check, "math_match")


def tag_format(tag: str = "answer", strict: bool = False, think_tag: str = "think") -> Check:
    """1 if there is exactly one non-empty <tag>...</tag>; with ``strict``, nothing else may stand
    outside it but one optional leading <think>...</think> block."""
    t, th = re.escape(tag), re.escape(think_tag)

    def check(rollout: Any) -> float:
        text = rollout.completion
        found = re.findall(rf"<{t}>(.*?)</{t}>", text, re.S)
        if len(found) != 1 or not found[0].strip() or text.count(f"<{tag}>") != 1:
            return 0.0
        whole = rf"\s*(?:<{th}>.*?</{th}>\s*)?<{t}>.*?</{t}>\s*"
        return float(not strict or re.fullmatch(whole, text, re.S) is not None)

    return _named(check, "tag_format")


def regex_match(pattern: str | None = None, flags: int = 0, field: str | None = None) -> Check:
    compiled = re.compile(pattern, flags) if pattern is not None else None

    def check(rollout: Any) -> float:
        rx = compiled or re.compile(str(_expected(rollout, field or "ground_truth")), flags)
        return float(rx.search(rollout.completion) is not None)

    return _named(check, "regex_match")


def json_valid() -> Check:
    def check(rollout: Any) -> float:
        try:
            json_parse(rollout.completion)
            return 1.0
        except ValueError:
            return 0.0

    return _named(check, "json_valid")


def json_schema(schema: dict | None = None, field: str = "schema") -> Check:
    def check(rollout: Any) -> float:
        s = schema if schema is not None else _expected(rollout, field)
        s = json.loads(s) if isinstance(s, str) else s
        try:
            obj = json_parse(rollout.completion)
        except ValueError:
            return 0.0
        return float(not json_schema_errors(obj, s))

    return _named(check, "json_schema")


def json_fields_match(fields: Iterable[str] | None = None, field: str = "ground_truth") -> Check:
    """Fraction of the expected object's fields (or of ``fields``, dotted paths allowed) whose value
    in the completion's JSON matches (numbers within 1e-6, strings normalized)."""

    def check(rollout: Any) -> float:
        gold = _expected(rollout, field)
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

    return _named(check, "json_fields_match")


def sql_match(db_field: str = "db_path", field: str = "ground_truth", timeout: float = 5.0) -> Check:
    def check(rollout: Any) -> float:
        return sql_result_match(extract_sql(rollout.completion), str(_expected(rollout, field)),
                                str(_expected(rollout, db_field)), timeout=timeout)

    return _named(check, "sql_match")


def _limit_score(n: int, lo: int | None, hi: int | None) -> float:
    if hi is not None and n > hi:
        return max(0.0, 1.0 - (n - hi) / max(hi, 1))
    if lo is not None and n < lo:
        return n / lo
    return 1.0


def _limit(name: str, measure: Callable[[str], int], lo: int | None, hi: int | None) -> Check:
    if lo is None and hi is None:
        raise ValueError(f"{name}: give a maximum, a minimum, or both")
    return _named(lambda rollout: _limit_score(measure(rollout.completion), lo, hi), name)


def word_limit(max_words: int | None = None, min_words: int | None = None) -> Check:
    """1 within the limits; over the maximum, 1 - overshoot/max (0 at twice the max); under the
    minimum, words/min."""
    return _limit("word_limit", word_count, min_words, max_words)


def sentence_limit(max_sentences: int | None = None, min_sentences: int | None = None) -> Check:
    return _limit("sentence_limit", sentence_count, min_sentences, max_sentences)


def char_limit(max_chars: int | None = None, min_chars: int | None = None) -> Check:
    return _limit("char_limit", len, min_chars, max_chars)


def required_phrases(phrases: Iterable[str] | str | None = None, field: str | None = None,
                     case_sensitive: bool = False) -> Check:
    def check(rollout: Any) -> float:
        want = _phrases(rollout, phrases, field)
        text = rollout.completion if case_sensitive else rollout.completion.lower()
        return sum((p if case_sensitive else p.lower()) in text for p in want) / len(want) if want else 1.0

    return _named(check, "required_phrases")


def forbidden_phrases(phrases: Iterable[str] | str | None = None, field: str | None = None,
                      case_sensitive: bool = False) -> Check:
    def check(rollout: Any) -> float:
        text = rollout.completion if case_sensitive else rollout.completion.lower()
        return float(not any((p if case_sensitive else p.lower()) in text for p in _phrases(rollout, phrases, field)))

    return _named(check, "forbidden_phrases")


def citation_f1(field: str = "relevant_ids", as_dict: bool = False) -> Check:
    """F1 of the completion's citations against ``example[field]``; ``as_dict`` returns the
    components ``citation_precision``, ``citation_recall`` and ``citation_f1``."""

    def check(rollout: Any) -> float | dict[str, float]:
        p, r = citation_precision_recall(citations(rollout.completion), _expected(rollout, field))
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        return {"citation_precision": p, "citation_recall": r, "citation_f1": f1} if as_dict else f1

    return _named(check, "citation_f1")


def _tool_names(rollout: Any) -> list[str]:
    names = []
    for m in rollout.assistant_messages:
        for tc in m.get("tool_calls") or []:
            if isinstance(tc, dict):
                names.append(str((tc.get("function") or {}).get("name") or tc.get("name") or ""))
            else:
                names.append(str(getattr(tc, "name", "")))
    return names


def tool_usage(min_calls: int = 0, max_calls: int | None = None, required_tools: Iterable[str] | None = None) -> Check:
    """(1 if the number of tool calls is within [min_calls, max_calls] else 0) x the fraction of
    ``required_tools`` called at least once. Calls are read from the assistant messages."""
    required = list(required_tools or [])

    def check(rollout: Any) -> float:
        names = _tool_names(rollout)
        in_bounds = len(names) >= min_calls and (max_calls is None or len(names) <= max_calls)
        return float(in_bounds) * (sum(t in names for t in required) / len(required) if required else 1.0)

    return _named(check, "tool_usage")


def length_penalty(target_tokens: int, buffer_tokens: int | None = None) -> Check:
    """DAPO's soft overlong penalty on sampled tokens (``rollout.num_sampled_tokens``): 0 up to
    ``target_tokens``, falling linearly to -1 at ``target_tokens + buffer_tokens`` (default a
    quarter of the target), -1 beyond. Use it with a positive weight."""
    buffer = buffer_tokens if buffer_tokens is not None else max(1, target_tokens // 4)

    def check(rollout: Any) -> float:
        over = rollout.num_sampled_tokens - target_tokens
        return 0.0 if over <= 0 else -min(1.0, over / max(buffer, 1))

    return _named(check, "length_penalty")


__all__ = [
    "extract_answer", "last_number", "normalize", "parse_number", "numbers_equal", "math_equal", "json_parse",
    "json_schema_errors", "sql_parses", "sql_result_match", "extract_sql", "word_count", "sentence_count",
    "citations", "citation_precision_recall", "exact_match", "numeric_match", "math_match", "tag_format",
    "regex_match", "json_valid", "json_schema", "json_fields_match", "sql_match", "word_limit", "sentence_limit",
    "char_limit", "required_phrases", "forbidden_phrases", "citation_f1", "tool_usage", "length_penalty",
]

"""Final answers: extracting one from a completion, normalizing it, comparing numbers and math,
and the reward factories built on that (``exact_match``, ``numeric_match``, ``math_match``,
``tag_format``).

Left out: JSON and SQL outputs (``structured.py``), length, phrases and citations (``text.py``),
tool calls and sampled length (``usage.py``). math-verify is optional (extra ``rewards``):
``math_equal`` falls back to numbers and normalized text without it.
"""

from __future__ import annotations

import math
import re
import string
import threading
import unicodedata
import warnings
from typing import Any

from rlft.rewards.checks.common import Check, expected_value, gold_values, named

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


def exact_match(field: str = "ground_truth", normalize: bool = True, method: str = "auto",
                tag: str = "answer") -> Check:
    norm = globals()["normalize"] if normalize else (lambda s: str(s).strip())

    def check(rollout: Any) -> float:
        got = extract_answer(rollout.completion, method, tag)
        return float(got is not None and any(norm(got) == norm(g) for g in gold_values(expected_value(rollout, field))))

    return named(check, "exact_match")


def numeric_match(field: str = "ground_truth", rel_tol: float = 1e-6, abs_tol: float = 1e-9, method: str = "auto",
                  tag: str = "answer") -> Check:
    def check(rollout: Any) -> float:
        got = _as_number(extract_answer(rollout.completion, method, tag))
        golds = [_as_number(g) for g in gold_values(expected_value(rollout, field))]
        return float(got is not None and any(g is not None and math.isclose(got, g, rel_tol=rel_tol, abs_tol=abs_tol)
                                             for g in golds))

    return named(check, "numeric_match")


def math_match(field: str = "ground_truth", tag: str = "answer") -> Check:
    def check(rollout: Any) -> float:
        got = extract_answer(rollout.completion, "auto", tag)
        return float(got is not None and any(math_equal(got, g) for g in gold_values(expected_value(rollout, field))))

    return named(check, "math_match")


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

    return named(check, "tag_format")

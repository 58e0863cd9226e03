"""Text shape: word and sentence counts with soft limits, required and forbidden phrases, a
regex, and citations (``[doc-12]``) scored against the relevant ids.

Left out: the answer inside the text (``answers.py``), JSON and SQL (``structured.py``), tool
calls and sampled tokens (``usage.py``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from rlft.rewards.checks.common import Check, expected_value, named


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


def _phrases(rollout: Any, phrases: Iterable[str] | str | None, field: str | None) -> list[str]:
    value = expected_value(rollout, field) if field else phrases
    return [value] if isinstance(value, str) else list(value or [])


def regex_match(pattern: str | None = None, flags: int = 0, field: str | None = None) -> Check:
    compiled = re.compile(pattern, flags) if pattern is not None else None

    def check(rollout: Any) -> float:
        rx = compiled or re.compile(str(expected_value(rollout, field or "ground_truth")), flags)
        return float(rx.search(rollout.completion) is not None)

    return named(check, "regex_match")


def _limit_score(n: int, lo: int | None, hi: int | None) -> float:
    if hi is not None and n > hi:
        return max(0.0, 1.0 - (n - hi) / max(hi, 1))
    if lo is not None and n < lo:
        return n / lo
    return 1.0


def _limit(name: str, measure: Callable[[str], int], lo: int | None, hi: int | None) -> Check:
    if lo is None and hi is None:
        raise ValueError(f"{name}: give a maximum, a minimum, or both")
    return named(lambda rollout: _limit_score(measure(rollout.completion), lo, hi), name)


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

    return named(check, "required_phrases")


def forbidden_phrases(phrases: Iterable[str] | str | None = None, field: str | None = None,
                      case_sensitive: bool = False) -> Check:
    def check(rollout: Any) -> float:
        text = rollout.completion if case_sensitive else rollout.completion.lower()
        return float(not any((p if case_sensitive else p.lower()) in text for p in _phrases(rollout, phrases, field)))

    return named(check, "forbidden_phrases")


def citation_f1(field: str = "relevant_ids", as_dict: bool = False) -> Check:
    """F1 of the completion's citations against ``example[field]``; ``as_dict`` returns the
    components ``citation_precision``, ``citation_recall`` and ``citation_f1``."""

    def check(rollout: Any) -> float | dict[str, float]:
        p, r = citation_precision_recall(citations(rollout.completion), expected_value(rollout, field))
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        return {"citation_precision": p, "citation_recall": r, "citation_f1": f1} if as_dict else f1

    return named(check, "citation_f1")

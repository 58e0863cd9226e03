"""What an LLM judge reads and writes: a rollout rendered for its prompt, and its reply parsed.

``render_messages`` turns a conversation into the judge's ``<conversation>`` text (system, user,
assistant text and tool calls, tool results), ``split_final`` separates the final answer,
``reference_block`` renders the row's ``ground_truth``. ``parse_score`` and ``parse_ranking`` read
a reply: the first JSON object with the key anywhere (bare, fenced, amid text; ``<think>``
dropped), else a bare number, level or ranking on the last line; a reply with neither raises
``JudgeParseError``. Left out: the prompts themselves and the calls (``rlft.rewards.judge``).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from rlft.types import Message, Rollout

__all__ = ["JudgeParseError", "parse_ranking", "parse_score", "reference_block", "render_messages", "split_final"]


class JudgeParseError(ValueError):
    """A judge reply held no usable score or ranking."""


# -- parsing replies ---------------------------------------------------------------------------------

_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)
_QUOTES = "*`\"'. "
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:\s*/\s*\d+(?:\.\d+)?)?%?"
_LAST_SCORE = re.compile(r"^[*_`#>\s]*(?:(?:final\s+)?score[*_\s]*[:=]?\s*)?(" + _NUMBER + r")[*_`.\s]*$", re.I)


def _find_object(text: str, key: str) -> dict[str, Any] | None:
    """The first JSON object holding ``key`` anywhere in the text (bare, fenced, amid words)."""
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, m.start())
        except ValueError:
            continue
        if isinstance(obj, dict) and key in obj:
            return obj
    return None


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _number(value: Any) -> float:
    try:
        if isinstance(value, bool) or value is None:
            raise ValueError
        if isinstance(value, (int, float)):
            x = float(value)
        else:  # "0.8", "8/10", "80%"
            v = str(value).strip().replace(" ", "")
            num, _, den = v.rstrip("%").partition("/")
            x = float(num) / (float(den) if den else 1.0) / (100.0 if v.endswith("%") else 1.0)
    except (ValueError, ZeroDivisionError):
        raise JudgeParseError(f"score {value!r} is not a number") from None
    if not math.isfinite(x):
        raise JudgeParseError(f"score {value!r} is not finite")
    return x


def _level(value: Any, score_map: dict[str, float] | None) -> float:
    if score_map is None:
        return min(max(_number(value), 0.0), 1.0)
    name = str(value).strip(_QUOTES).lower()
    for k, v in score_map.items():
        if k.strip().lower() == name:
            return v
    x = _number(value)
    return min(score_map.values(), key=lambda v: (abs(v - x), v))


def parse_score(text: str, score_map: dict[str, float] | None = None) -> float:
    """The score in a judge reply: clamped to [0, 1], or snapped to a ``score_map`` level."""
    text = _THINK.sub("", text or "")
    obj = _find_object(text, "score")
    if obj is not None:
        return _level(obj["score"], score_map)
    last = _last_line(text)
    m = _LAST_SCORE.match(last)
    if m or (score_map and last.strip(_QUOTES).lower() in {k.strip().lower() for k in score_map}):
        return _level(m.group(1) if m else last, score_map)
    raise JudgeParseError(f"no score in the judge's reply: {text.strip()[:200]!r}")


def parse_ranking(text: str, n: int) -> list[int]:
    """The ranking (candidate numbers 1..n, best first) in a judge reply; it must name each once."""
    text = _THINK.sub("", text or "")
    obj = _find_object(text, "ranking")
    try:
        ranking = [int(str(x).strip()) for x in obj["ranking"]] if obj is not None else None
    except (TypeError, ValueError):
        ranking = None
    if ranking is None:
        ranking = [int(x) for x in re.findall(r"\d+", _last_line(text))]
    if sorted(ranking) != list(range(1, n + 1)):
        raise JudgeParseError(f"the ranking must list candidates 1..{n} once each; reply: {text.strip()[:200]!r}")
    return ranking


# -- rendering conversations ---------------------------------------------------------------------------

def _text(content: Any) -> str:
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return "" if content is None else str(content)


def render_messages(messages: list[Message]) -> str:
    out = []
    for m in messages:
        role = m.get("role", "?")
        head = f"[tool {m['name']}]" if role == "tool" and m.get("name") else f"[{role}]"
        body = _text(m.get("content"))
        for tc in m.get("tool_calls") or []:
            fn = tc.get("function", tc)
            args = fn.get("arguments")
            args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
            body += f"\n[calls {fn.get('name')}({args})]"
        out.append(f"{head}\n{body.strip()}")
    return "\n\n".join(out)


def split_final(rollout: Rollout) -> tuple[list[Message], str]:
    """(messages before the final answer, the final answer)."""
    msgs = list(rollout.messages)
    if msgs and msgs[-1].get("role") == "assistant" and not msgs[-1].get("tool_calls"):
        return msgs[:-1], _text(msgs[-1].get("content"))
    return msgs, ""


def reference_block(rollout: Rollout) -> str:
    gt = rollout.ground_truth
    if gt is None:
        return ""
    gt = gt if isinstance(gt, str) else json.dumps(gt, ensure_ascii=False, default=str)
    return f"<reference>\n{gt}\n</reference>\n\n"

"""Sampled tokens -> the fields of an OpenAI choice: text cut at stop strings (and what a stream
may send yet), content and tool calls with the finish reason, and logprobs in the chat and the
legacy completion shapes. Left out: the HTTP bodies around them (``app.py``, ``streaming.py``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from rlft.engines.base import Sample, SamplingParams

if TYPE_CHECKING:
    from rlft.serve.models import ServedEngine, ServedModel

__all__ = ["completion_logprobs", "cut_stop", "final_choice", "held_text", "token_logprobs", "token_stream"]


def cut_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string (excluded), and whether one occurred."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


def held_text(text: str, stops: list[str]) -> str:
    """While streaming: hold back an incomplete UTF-8 character and a possible start of a stop string."""
    text = text.rstrip("\ufffd")
    for k in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        if any(s.startswith(text[-k:]) for s in stops):
            return text[:-k]
    return text


def final_choice(served: ServedModel, sample: Sample, stops: list[str], parse: bool) -> tuple[str | None, list, str]:
    """``(content, tool_calls, finish_reason)`` of a finished sample."""
    text, hit = cut_stop(served.renderer.decode(sample.tokens), stops)
    finish = "stop" if hit or sample.finish_reason != "length" else "length"
    if not parse:
        return text, [], finish
    msg, _ = served.renderer.assistant_message(text)
    calls = [{"id": c["id"], "type": "function", "function": {
        "name": c["function"]["name"], "arguments": json.dumps(c["function"]["arguments"], ensure_ascii=False)}}
        for c in msg.get("tool_calls") or []]
    return (msg["content"] or None) if calls else msg["content"], calls, "tool_calls" if calls else finish


def _token_logprob(tokenizer: Any, token: int, logprob: float) -> dict[str, Any]:
    s = tokenizer.decode([token], skip_special_tokens=False)
    return {"token": s, "logprob": max(float(logprob), -9999.0), "bytes": list(s.encode("utf-8"))}


def token_logprobs(tokenizer: Any, tokens: list[int], logprobs: list[float],
                   top: list[list[tuple[int, float]]] | None = None) -> list[dict[str, Any]]:
    """Chat ``logprobs.content``: per sampled token ``{token, logprob, bytes, top_logprobs}``, the
    latter the engine's k most likely ``(id, logprob)`` of that position (``top``; [] without)."""
    return [{**_token_logprob(tokenizer, t, lp),
             "top_logprobs": [_token_logprob(tokenizer, i, v) for i, v in top[k]] if top else []}
            for k, (t, lp) in enumerate(zip(tokens, logprobs))]


async def token_stream(engine: ServedEngine, prompt: list[int],
                       params: SamplingParams) -> AsyncIterator[tuple[list[int], list[float], list] | Sample]:
    """Cumulative ``(tokens, logprobs, top_logprobs)`` snapshots while ``engine`` samples, then the ``Sample``."""
    async for item in engine.generate_stream(prompt, params):
        yield item


def completion_logprobs(tokenizer: Any, tokens: list[int], logprobs: list[float],
                        top: list[list[tuple[int, float]]] | None = None) -> dict[str, Any]:
    """The legacy ``logprobs`` object: one entry per sampled token; ``top_logprobs`` maps token text
    to logprob for the k most likely tokens of the position (``top``) plus the sampled one, as
    OpenAI's legacy route does (tokens that decode to the same text share one key)."""
    def text(t: int) -> str:
        return tokenizer.decode([t], skip_special_tokens=False)

    strs = [text(t) for t in tokens]
    lps = [max(float(lp), -9999.0) for lp in logprobs]
    offsets, at = [], 0
    for t in strs:
        offsets.append(at)
        at += len(t)
    tops = []
    for k, (s, lp) in enumerate(zip(strs, lps)):
        d: dict[str, float] = {}
        for i, v in (top[k] if top else []):
            d.setdefault(text(i), max(float(v), -9999.0))
        d.setdefault(s, lp)
        tops.append(d)
    return {"tokens": strs, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

"""Trace import: turn logs a user already keeps into SFT transcripts (``rlft traces import``).

Reads a JSONL (or ``.json`` list) of logged calls, converts each record with a
:class:`TraceAdapter` (built in: ``openai-chat``, ``openai-responses``, ``anthropic``, see
``rlft.sft.trace_formats``; ``auto`` asks each registered adapter in turn, user adapters first),
validates every transcript like ``load_transcripts`` does, then filters:

- ``min_score``: keep transcripts whose score (the record's ``score``/``reward``, or the same
  key in its ``metadata``/``meta``) is at least this; without a score a transcript is dropped;
- ``tools_only``: keep transcripts with at least one assistant tool call;
- ``dedupe``: drop transcripts whose normalised messages (tool-call ids ignored, arguments
  compared as JSON) equal an earlier one's, or are a prefix of another's (an agent logs one
  request per step, each repeating the conversation so far: keep the longest);
- a seeded train/eval split by content, so a transcript lands on the same side on every run.

A record that cannot be converted or validated is a problem (reported with its line), not a
failure of the import. Adding an adapter: implement ``name``, ``matches(record)`` and
``to_transcripts(record)``, then :func:`register_adapter` it (docs/sft.md has an example; the CLI
loads one with ``--adapter module:object``).

Left out: reading from the providers' APIs (export the logs first), streaming chunks, and
weighting turns by score (every assistant turn of a kept transcript is trained on).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from rlft.data import DatasetError, _rank, _read_json, _read_jsonl, _read_text
from rlft.sft.checks import format_problems, transcript_problems
from rlft.sft.trace_formats import (
    AnthropicAdapter,
    OpenAIChatAdapter,
    OpenAIResponsesAdapter,
    TraceError,
)
from rlft.sft.transcripts import Transcript

__all__ = ["ImportResult", "TraceAdapter", "TraceError", "adapters", "detect_adapter", "import_traces",
           "read_records", "register_adapter"]


@runtime_checkable
class TraceAdapter(Protocol):
    """Converts one logged record into transcripts. ``matches`` must be cheap and must not raise;
    ``to_transcripts`` raises :class:`TraceError` naming the field it cannot convert."""

    name: str

    def matches(self, record: dict) -> bool: ...

    def to_transcripts(self, record: dict) -> list[Transcript]: ...


# auto-detection asks in this order: Responses and Anthropic records have markers of their own,
# while any record with "messages" passes as an OpenAI chat.
_BUILTIN: list[TraceAdapter] = [OpenAIResponsesAdapter(), AnthropicAdapter(), OpenAIChatAdapter()]
_USER: list[TraceAdapter] = []


def register_adapter(adapter: TraceAdapter, *, replace: bool = False) -> TraceAdapter:
    """Add an adapter; auto-detection asks user adapters before the built-in ones, the latest
    registered first. A name already taken raises unless ``replace``."""
    if not isinstance(adapter, TraceAdapter) or not isinstance(getattr(adapter, "name", None), str):
        raise TypeError("an adapter needs a `name` string and `matches(record)` and `to_transcripts(record)` methods")
    taken = [a for a in adapters() if a.name == adapter.name]
    if taken and not replace:
        raise ValueError(f"a trace adapter named {adapter.name!r} is already registered; pass replace=True")
    for a in taken:
        (_USER if a in _USER else _BUILTIN).remove(a)
    _USER.insert(0, adapter)
    return adapter


def adapters() -> list[TraceAdapter]:
    """Every registered adapter, in the order auto-detection asks them."""
    return _USER + _BUILTIN


def get_adapter(name: str) -> TraceAdapter:
    for a in adapters():
        if a.name == name:
            return a
    raise TraceError(f"unknown trace format {name!r}; choose auto or one of: {', '.join(a.name for a in adapters())}")


def detect_adapter(record: Any) -> TraceAdapter | None:
    if not isinstance(record, dict):
        return None
    return next((a for a in adapters() if a.matches(record)), None)


# -- reading ----------------------------------------------------------------------------------


def read_records(path: str | os.PathLike) -> tuple[list[tuple[str, Any]], list[str]]:
    """((location, record) pairs, problems) of a JSONL file, or of a ``.json`` list. A file that
    cannot be read at all raises DatasetError."""
    p, name = Path(path), str(path)
    if not p.is_file():
        raise DatasetError(f"trace file {name!r}: no such file")
    text = _read_text(p, name)
    if p.suffix.lower() == ".json":
        return _read_json(text, name), []
    return _read_jsonl(text)


def _as_score(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:  # OpenAI request metadata holds strings only
        return float(value)
    except (TypeError, ValueError):
        return None


def _score(record: dict) -> float | None:
    nested = [part.get("metadata") for part in (record.get("request"), record.get("response"))
              if isinstance(part, dict)]
    for place in (record, record.get("metadata"), record.get("meta"), *nested):
        if isinstance(place, dict):
            for key in ("score", "reward"):
                score = _as_score(place.get(key))
                if score is not None:
                    return score
    return None


# -- filters ----------------------------------------------------------------------------------


def _norm(m: dict) -> dict:
    """A message as dedupe compares it: call ids are random per call, argument JSON is spelled
    many ways."""
    out = {k: v for k, v in m.items() if k not in ("tool_call_id", "weight") and v is not None}
    if m.get("tool_calls"):
        out["tool_calls"] = [{"name": tc["function"]["name"], "arguments": _json_value(tc["function"].get("arguments"))}
                             for tc in m["tool_calls"]]
    return out


def _json_value(args: Any) -> Any:
    try:
        return json.loads(args) if isinstance(args, str) else args
    except json.JSONDecodeError:
        return args


def _prefix_keys(t: Transcript) -> list[str]:
    """Content key of every prefix of ``t.messages``; the last is the whole transcript's."""
    h, keys = hashlib.blake2b(digest_size=16), []
    for m in t.messages:
        h.update(json.dumps(_norm(m), sort_keys=True, ensure_ascii=False).encode() + b"\x00")
        keys.append(h.copy().hexdigest())
    return keys


def _uses_tools(t: Transcript) -> bool:
    return any(m.get("role") == "assistant" and m.get("tool_calls") for m in t.messages)


@dataclass
class ImportResult:
    train: list[Transcript]
    eval: list[Transcript]
    counts: dict[str, int] = field(default_factory=dict)  # read, converted, problems, dropped_*, kept
    problems: list[str] = field(default_factory=list)
    formats: dict[str, int] = field(default_factory=dict)  # transcripts per adapter


def import_traces(source: str | os.PathLike | list, *, format: str = "auto", min_score: float | None = None,
                  tools_only: bool = False, dedupe: bool = True, eval_fraction: float = 0.0,
                  seed: int = 0) -> ImportResult:
    """Convert, validate, filter and split the records of a trace file (or a list of records)."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    fixed = None if format == "auto" else get_adapter(format)
    if isinstance(source, (str, os.PathLike)):
        located, problems = read_records(source)
        label = os.path.basename(os.fspath(source))
    else:
        located, problems, label = [(f"index {i}", r) for i, r in enumerate(source)], [], "<list>"
    counts = {"read": len(located) + len(problems), "converted": 0, "problems": 0, "dropped_no_score": 0,
              "dropped_score": 0, "dropped_no_tools": 0, "dropped_duplicate": 0, "kept": 0}
    formats: dict[str, int] = {}
    found: list[Transcript] = []
    for where, record in located:
        adapter = fixed or detect_adapter(record)
        if adapter is None or not isinstance(record, dict):
            keys = sorted(record)[:8] if isinstance(record, dict) else type(record).__name__
            problems.append(f"{where}: no trace adapter recognises this record (keys: {keys}); pass --format")
            continue
        try:
            transcripts = adapter.to_transcripts(record)
        except (TraceError, KeyError, TypeError, AttributeError) as e:  # a shape the adapter did not expect
            problems.append(f"{where} ({adapter.name}): {e if isinstance(e, TraceError) else repr(e)}")
            continue
        for t in transcripts:
            bad = format_problems(f"{where} ({adapter.name})", transcript_problems(t.to_row()))
            if bad:
                problems += bad
                continue
            t.meta.setdefault("source", f"{label}:{where}")
            score = _as_score(t.meta.get("score"))  # an adapter's own score wins over the record's
            score = _score(record) if score is None else score
            t.meta.pop("score", None)
            if score is not None:
                t.meta["score"] = score
            formats[adapter.name] = formats.get(adapter.name, 0) + 1
            found.append(t)
    counts["converted"], counts["problems"] = len(found), len(problems)
    kept = []
    for t in found:
        if min_score is not None and t.meta.get("score") is None:
            counts["dropped_no_score"] += 1
        elif min_score is not None and t.meta["score"] < min_score:
            counts["dropped_score"] += 1
        elif tools_only and not _uses_tools(t):
            counts["dropped_no_tools"] += 1
        else:
            kept.append(t)
    keys = [_prefix_keys(t) for t in kept]
    if dedupe:
        prefixes = {k for ks in keys for k in ks[:-1]}
        seen: set[str] = set()
        unique = []
        for t, ks in zip(kept, keys):
            if ks[-1] in seen or ks[-1] in prefixes:
                counts["dropped_duplicate"] += 1
            else:
                seen.add(ks[-1])
                unique.append((t, ks))
        kept, keys = [t for t, _ in unique], [ks for _, ks in unique]
    counts["kept"] = len(kept)
    n_eval = min(max(1, round(len(kept) * eval_fraction)), len(kept) - 1) if eval_fraction > 0 and len(kept) > 1 else 0
    # rank by content, not position: the same transcript falls on the same side in every import
    ranked = sorted(range(len(kept)), key=lambda i: (_rank(seed, "split", keys[i][-1]), i))
    held = set(ranked[:n_eval])
    return ImportResult(train=[t for i, t in enumerate(kept) if i not in held],
                        eval=[t for i, t in enumerate(kept) if i in held],
                        counts=counts, problems=problems, formats=formats)

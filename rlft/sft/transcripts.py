"""STAND-IN, to be replaced at merge by branch h-sftdata's ``rlft/sft/transcripts.py``.

The smallest version of the data half's API that the trainer (``rlft.sft.trainer``) consumes:
``Transcript``, ``load_transcripts`` (a JSONL file or a list of dicts), ``SFTExample`` and
``render_transcripts``. Rendering follows ``rlft.testing.pretrained._sft_chat``, i.e. the way a
rollout builds its tokens: the rendered prompt, each assistant reply's tokens + end-of-turn token
(mask 1, or 0 when the message has ``weight`` 0), the rendered non-assistant turns between
replies (mask 0). Left out (the real module has them): CSV/Parquet/``datasets`` sources, row and
field validation with file/row names, tool-call parse-back checks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Transcript:
    messages: list[dict]
    tools: list[dict] | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class SFTExample:
    ids: list[int]
    mask: list[int]  # 1 on trained assistant tokens
    source_index: int = -1


def load_transcripts(source: Any, *, name: str | None = None) -> list[Transcript]:
    """Transcripts from a JSONL file (one ``{"messages": [...], "tools": [...]}`` per line) or a list."""
    if isinstance(source, (str, Path)):
        rows = [json.loads(line) for line in Path(source).read_text().splitlines() if line.strip()]
    else:
        rows = list(source)
    out = []
    for r in rows:
        if isinstance(r, Transcript):
            out.append(r)
        else:
            out.append(Transcript(messages=list(r["messages"]), tools=r.get("tools"),
                                  meta={k: v for k, v in r.items() if k not in ("messages", "tools")}))
    return out


def render_transcripts(renderer: Any, transcripts: list[Transcript]) -> tuple[list[SFTExample], list[str]]:
    """(examples, problems): one example per transcript that renders prefix-stably."""
    examples, problems = [], []
    for i, t in enumerate(transcripts):
        try:
            ids, mask = _render(renderer, t.messages, t.tools)
        except ValueError as e:
            problems.append(f"transcript {i}: {e}")
            continue
        examples.append(SFTExample(ids=ids, mask=mask, source_index=i))
    return examples, problems


def _render(renderer: Any, messages: list[dict], tools: list[dict] | None) -> tuple[list[int], list[int]]:
    turns = [j for j, m in enumerate(messages) if m.get("role") == "assistant"]
    if not turns:
        raise ValueError("no assistant message")
    clean = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    ids = renderer.render_prompt(clean[: turns[0]], tools)
    mask = [0] * len(ids)
    eot = renderer.eos_token_ids[0]
    for n, j in enumerate(turns):
        before = renderer.render_text(clean[:j], tools, add_generation_prompt=True)
        full = renderer.render_text(clean[: j + 1], tools)
        if not full.startswith(before) or renderer.eot_text not in full[len(before):]:
            raise ValueError(f"message {j}: the chat template does not render this reply as a suffix")
        text = full[len(before):]
        text = text[: text.rindex(renderer.eot_text)]  # what the model samples before end of turn
        reply = renderer.encode(text) + [eot]
        ids += reply
        mask += [int(messages[j].get("weight", 1) != 0)] * len(reply)
        nxt = turns[n + 1] if n + 1 < len(turns) else None
        if nxt is not None:
            cont = renderer.continuation_ids(clean[: j + 1], clean[j + 1: nxt], tools, True)
            ids += cont
            mask += [0] * len(cont)
    return ids, mask


__all__ = ["SFTExample", "Transcript", "load_transcripts", "render_transcripts"]

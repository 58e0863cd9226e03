"""SFT data: chat transcripts, loaded and validated, rendered to (token ids, loss mask) exactly as
an RL rollout renders and samples them.

A transcript row is ``{"messages": [...], "tools": [...]?, ...}`` (see ``rlft.sft.checks`` and
docs/sft.md); any other field is kept in ``Transcript.meta``. Sources are those of
``rlft.data.load_dataset``: ``.jsonl``/``.json``/``.csv``/``.parquet``, a list of dicts, or a
``datasets.Dataset``. A ``messages`` or ``tools`` value that is a string is JSON-decoded (CSV
cells are text; in Parquet, JSON text avoids struct columns that fill absent keys with nulls).

Rendering follows ``Environment._loop`` token for token: the prompt is
``renderer.render_prompt`` of the messages before the first assistant turn; each assistant turn
is the text the template renders for it (between the generation prompt and the end-of-turn
string, so tool calls appear in the model's own tool-call format), tokenized, plus the
end-of-turn token; the tool/user turns between assistant turns are
``renderer.continuation_ids(..., ended_with_eot=True)``. The mask is 1 on the tokens of assistant
turns with weight 1 (default), end-of-turn included, and 0 elsewhere.

Prefix stability: the rollout never re-renders what it sampled; it appends. That equals the
template's own rendering of the conversation only if rendering through turn k is a prefix of
rendering through turn k+1 (templates that rewrite old turns, e.g. drop earlier reasoning, are
not). Such a transcript raises :class:`NotPrefixStable` naming the row and turn, and
:func:`render_transcripts` reports and leaves it out. A turn whose tool calls the renderer's
parser would not read back raises :class:`ToolCallsNotParsed`, reported the same way.

Left out: messages after the last assistant turn (nothing is trained on them, so they are not
rendered), truncation to a context length and packing (the trainer's job), reasoning fields.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlft.data import SPLIT_VALUES, DatasetError, _fail, _read_file
from rlft.sft.checks import format_problems, transcript_problems

__all__ = ["NotPrefixStable", "SFTExample", "ToolCallsNotParsed", "Transcript", "load_transcripts",
           "render_transcript", "render_transcripts", "write_transcripts"]


@dataclass
class Transcript:
    """One conversation to learn from. ``messages``: OpenAI-format chat (assistant messages may
    carry ``tool_calls`` and ``weight`` 0/1); ``tools``: OpenAI tool schemas; ``meta``: the row's
    other fields (score, source, id, split, ...)."""

    messages: list[dict]
    tools: list[dict] | None = None
    meta: dict = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        """The JSONL row that :func:`load_transcripts` reads back as this transcript."""
        row: dict[str, Any] = {"messages": self.messages}
        if self.tools:
            row["tools"] = self.tools
        return {**row, **{k: v for k, v in self.meta.items() if k not in row}}


@dataclass
class SFTExample:
    ids: list[int]  # the whole token sequence
    mask: list[int]  # 1 on the trained tokens: weight-1 assistant turns, end-of-turn token included
    source_index: int = -1  # row number in the source
    prompt_len: int = 0  # tokens before the first assistant turn (what a rollout's prompt_ids hold)


class NotPrefixStable(ValueError):
    """The chat template renders this transcript differently once it grows: a rollout's appended
    tokens would not match the template, so the transcript must not be trained on."""

    def __init__(self, index: int, message_index: int, turn: int, reason: str):
        self.index, self.message_index, self.turn, self.reason = index, message_index, turn, reason
        super().__init__(f"{_label(index)}: not prefix-stable at messages[{message_index}] (assistant turn {turn}): "
                         f"{reason}")


class ToolCallsNotParsed(ValueError):
    """The rendered assistant turn does not parse back to its own tool calls with the renderer's
    parser: the model would learn calls the RL loop cannot read (wrong tool_parser/tool_format?)."""


def _label(index: int) -> str:
    return f"row {index} (0-based)" if index >= 0 else "transcript"


# -- loading ----------------------------------------------------------------------------------


def _decode_json_cells(row: Any, where: str, problems: list[str]) -> Any:
    if not isinstance(row, dict):
        return row
    for key in ("messages", "tools"):
        if isinstance(row.get(key), str):
            try:
                row = {**row, key: json.loads(row[key])}
            except json.JSONDecodeError as e:
                problems.append(f"{where}, field {key!r}: a string here must be JSON text, and it is not valid JSON "
                                f"({e.msg} at char {e.pos})")
                return None
    if isinstance(row.get("messages"), list):  # Parquet/datasets fill absent struct keys with None
        row = {**row, "messages": [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m
                                   for m in row["messages"]]}
    return row


def load_transcripts(source: Any, *, name: str | None = None) -> list[Transcript]:
    """Load and validate transcripts from a path, a list of dicts (or Transcripts), or a
    ``datasets.Dataset``. Every problem of every row is collected into one
    :class:`rlft.data.DatasetError` naming the source, row and field."""
    problems: list[str] = []
    if isinstance(source, (str, os.PathLike)):
        name = name or str(source)
        located, problems, unit = _read_file(Path(source), name)
    elif type(source).__module__.split(".")[0] == "datasets":  # no import: `datasets` is optional
        name, unit = name or f"<datasets.{type(source).__name__}>", "index"
        if hasattr(source, "keys") or not hasattr(source, "to_list"):
            raise DatasetError(f"dataset {name!r}: pass one materialized split, e.g. ds['train']")
        located = [(f"index {i}", row) for i, row in enumerate(source.to_list())]
    elif isinstance(source, (list, tuple)):
        name, unit = name or "<list>", "index"
        located = [(f"index {i}", t.to_row() if isinstance(t, Transcript) else t) for i, t in enumerate(source)]
    else:
        raise DatasetError(f"cannot load transcripts from {type(source).__name__}; pass a file path, "
                           "a list of dicts or a datasets.Dataset")
    out: list[Transcript] = []
    for where, row in located:
        row = _decode_json_cells(row, where, problems)
        if row is None:
            continue
        found = transcript_problems(row)
        split = row.get("split") if isinstance(row, dict) else None
        if split is not None and split not in SPLIT_VALUES:
            found.append(("split", f"{split!r} is not one of {', '.join(SPLIT_VALUES)}"))
        problems += format_problems(where, found)
        if not found:
            meta = {k: v for k, v in row.items() if k not in ("messages", "tools")}
            out.append(Transcript(messages=row["messages"], tools=row.get("tools") or None, meta=meta))
    if problems:
        raise _fail(name, problems, unit)
    if not out:
        raise DatasetError(f"dataset {name!r} has no rows; it needs at least one transcript")
    return out


def write_transcripts(path: str | os.PathLike, transcripts: list[Transcript]) -> None:
    """Write transcripts as JSONL rows that :func:`load_transcripts` reads back."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(t.to_row(), ensure_ascii=False) + "\n" for t in transcripts)


# -- rendering --------------------------------------------------------------------------------


def _reply_text(renderer, prompt: str, full: str) -> str:
    """What the model samples for a turn: the rendered turn minus its end-of-turn string."""
    text = full[len(prompt):]
    if renderer.eot_text and renderer.eot_text in text:
        return text[: text.rindex(renderer.eot_text)]
    # no end-of-turn string in the template: the model ends with the tokenizer's EOS, then glue
    return text[: len(text) - len(renderer.glue)] if renderer.glue and text.endswith(renderer.glue) else text


def _calls_of(message: dict) -> list[tuple[str, Any]]:
    out = []
    for tc in message.get("tool_calls") or []:
        args = tc["function"].get("arguments", {})
        out.append((tc["function"]["name"], json.loads(args) if isinstance(args, str) and args.strip() else args or {}))
    return out


def render_transcript(renderer, t: Transcript, *, index: int = -1) -> SFTExample:
    """(ids, mask) of one transcript, token for token what ``Environment._loop`` builds when the
    model samples these assistant turns. Raises NotPrefixStable / ToolCallsNotParsed."""
    msgs = [{k: v for k, v in m.items() if k != "weight"} for m in t.messages]
    schemas = t.tools or None
    turns = [i for i, m in enumerate(msgs) if m.get("role") == "assistant"]
    if not turns:
        raise ValueError(f"{_label(index)}: no assistant message to render")
    if not renderer.eos_token_ids:
        raise ValueError("the tokenizer has no end-of-turn token; set one (eos_token) to train on chats")
    eot = renderer.eos_token_ids[0]  # the renderer lists the template's end-of-turn token first
    ids = renderer.render_prompt(msgs[: turns[0]], schemas)
    prompt_len = len(ids)
    mask = [0] * len(ids)
    prev_text: str | None = None
    prev_ids: list[int] = []
    for k, a in enumerate(turns, 1):
        prompt = renderer.render_text(msgs[:a], schemas, add_generation_prompt=True)
        if prev_text is not None:
            if not prompt.startswith(prev_text):
                raise NotPrefixStable(index, a, k, "rendering the conversation for this turn rewrites an earlier "
                                                   "turn, which the rollout would have kept as sampled")
            # exactly what the rollout appends after the previous turn's end-of-turn token
            cont = renderer.continuation_ids(msgs[: turns[k - 2] + 1], msgs[turns[k - 2] + 1: a], schemas, True)
            ids += cont
            mask += [0] * len(cont)
        full = renderer.render_text(msgs[: a + 1], schemas)
        if not full.startswith(prompt):
            raise NotPrefixStable(index, a, k, "the rendered assistant turn does not extend the generation prompt")
        if prev_text is not None and renderer.encode(full)[: len(prev_ids)] != prev_ids:
            raise NotPrefixStable(index, a, k, "the tokens through the previous turn are not a prefix of the tokens "
                                               "through this one (the tokenizer merges across the turn boundary)")
        text = _reply_text(renderer, prompt, full)
        parsed = [(c.name, c.arguments) for c in renderer.assistant_message(text)[1]]
        if parsed != _calls_of(msgs[a]):
            raise ToolCallsNotParsed(
                f"{_label(index)}: messages[{a}] (assistant turn {k}) renders as {text!r}, which the "
                f"{renderer.parser_name!r} parser reads as calls {parsed}, not {_calls_of(msgs[a])}; "
                "set tool_parser/tool_format to match the chat template")
        reply = renderer.encode(text) + [eot]
        ids += reply
        mask += [int(t.messages[a].get("weight", 1))] * len(reply)
        if k < len(turns):  # only a later turn needs these (and encoding the whole chat per turn costs)
            prev_text, prev_ids = full, renderer.encode(full)
    return SFTExample(ids=ids, mask=mask, source_index=index, prompt_len=prompt_len)


def render_transcripts(renderer, transcripts: list[Transcript]) -> tuple[list[SFTExample], list[str]]:
    """(examples, problems): a transcript that is not prefix-stable, whose tool calls do not parse
    back, or that the template refuses, is reported in ``problems`` and left out."""
    # what a template's raise_exception raises (e.g. "roles must alternate")
    from jinja2.exceptions import TemplateError

    examples, problems = [], []
    for i, t in enumerate(transcripts):
        try:
            examples.append(render_transcript(renderer, t, index=i))
        except (NotPrefixStable, ToolCallsNotParsed) as e:
            problems.append(str(e))
        except TemplateError as e:
            problems.append(f"{_label(i)}: the chat template refuses it: {e}")
    return examples, problems

"""From an SFTConfig's data keys to the token sequences an SFT run trains and evaluates on.

Transcripts are split into train and held-out *before* rendering (a held-out transcript is never
partly trained on): ``eval_data`` when given, else ``eval_size`` transcripts or an
``eval_fraction`` of them, drawn with ``seed``. Rendering is one call to
``rlft.sft.transcripts.render_transcripts`` (the same Renderer and tool format as RL rollouts).
Sequences over ``max_seq_len`` are dropped or truncated (``overlong``); every transcript left out
and why is returned in ``problems``, never silently. Left out: reading and validating files
(``rlft.sft.transcripts``) and anything about training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from rlft.config import ConfigError
from rlft.sft.loss import trained_tokens


@dataclass
class SFTData:
    """(ids, mask) pairs to train and evaluate on, and what was left out or changed, as sentences."""

    train: list[tuple[list[int], list[int]]]
    eval: list[tuple[list[int], list[int]]]
    problems: list[str] = field(default_factory=list)


def split_indices(n: int, *, eval_size: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) indices of ``n`` items: ``eval_size`` of them, or ``eval_fraction`` (at
    least 1 when the fraction is > 0 and there are 2 or more), drawn with ``seed``; source order kept."""
    k = eval_size if eval_size > 0 else (max(1, round(n * eval_fraction)) if eval_fraction > 0 and n > 1 else 0)
    if k >= n and k > 0:
        raise ConfigError(f"the held-out split would take {k} of {n} transcripts and leave none to train on: "
                          "lower eval_size / eval_fraction, or pass eval_data")
    held = set(random.Random(f"sft-split-{seed}").sample(range(n), k))
    return [i for i in range(n) if i not in held], sorted(held)


def fit_length(examples: list[Any], max_seq_len: int, overlong: str, source: str, rows: list[int] | None = None
               ) -> tuple[list[tuple[list[int], list[int]]], list[str]]:
    """``SFTExample``s as (ids, mask) pairs within ``max_seq_len``; the problems of those changed
    or left out, naming ``source`` and the row (``rows[source_index]``, counted from 1)."""
    out, problems = [], []
    for ex in examples:
        ids, mask = list(ex.ids), list(ex.mask)
        row = rows[ex.source_index] if rows is not None and 0 <= ex.source_index < len(rows) else ex.source_index
        where = f"{source} row {row + 1}"
        if len(ids) > max_seq_len:
            if overlong == "drop":
                problems.append(f"{where}: {len(ids)} tokens > max_seq_len {max_seq_len}: dropped")
                continue
            problems.append(f"{where}: {len(ids)} tokens > max_seq_len {max_seq_len}: truncated")
            ids, mask = ids[:max_seq_len], mask[:max_seq_len]
        if not trained_tokens(mask):
            after = " left after truncation" if len(ex.ids) > len(ids) else ""
            problems.append(f"{where}: no trained (assistant) tokens{after}: dropped")
            continue
        out.append((ids, mask))
    return out, problems


def prepare(cfg: Any, renderer: Any) -> SFTData:
    """Load, split, render and fit the transcripts of ``cfg`` (an ``SFTConfig``)."""
    from rlft.sft.transcripts import load_transcripts, render_transcripts

    if not cfg.data:
        raise ConfigError("no training data: set `data` to a transcripts file (JSONL of {\"messages\": [...]})")
    transcripts = load_transcripts(cfg.data)
    if cfg.eval_data:
        held_out = load_transcripts(cfg.eval_data)
        parts = [("train", cfg.data, transcripts, None), ("eval", cfg.eval_data, held_out, None)]
    else:
        tr, ev = split_indices(len(transcripts), eval_size=cfg.eval_size, eval_fraction=cfg.eval_fraction,
                               seed=cfg.seed)
        parts = [("train", cfg.data, [transcripts[i] for i in tr], tr),
                 ("eval", cfg.data, [transcripts[i] for i in ev], ev)]
    train_t = parts[0][2]
    problems: list[str] = []
    splits = []
    for split, source, ts, rows in parts:
        examples, bad = render_transcripts(renderer, ts)
        problems += [f"{split} split: {p}" for p in bad]
        seqs, more = fit_length(examples, cfg.max_seq_len, cfg.overlong, source, rows)
        problems += more
        splits.append(seqs)
    if not splits[0]:
        raise ConfigError(f"no train transcript is left to train on ({len(train_t)} read from {cfg.data}): "
                          + "; ".join(problems[:5]))
    return SFTData(train=splits[0], eval=splits[1], problems=problems)


__all__ = ["SFTData", "fit_length", "prepare", "split_indices"]

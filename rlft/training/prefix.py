"""Shared-prefix training: each group's common prefix is forwarded once and its rollouts attend to it.

A GRPO step trains G rollouts per prompt, and as plain left-padded rows the prompt is forwarded
(and backpropagated) G times: 63 % of the trained tokens with a 60-token prompt and 35-token
answers, 84 % on the tool_use recipe (issue 18). As Prefix Grouper (arXiv 2506.05433) does, this
packs the rollouts of one group into one row

    [s_0 ... s_{S-2}] [s_{S-1} a_S a_{S+1} ...] [s_{S-1} b_S b_{S+1} ...] ...
     shared, once      segment of rollout a      segment of rollout b

where ``s_0 .. s_{S-1}`` is the longest common token prefix of the rollouts (the prompt, its
tool schemas included; in multi-turn rollouts the later tool results are each rollout's own, so
they sit in its segment). Each segment attends to the shared part and causally to itself, never
to another segment (a 4-D attention mask), and its positions continue from S - 1 as in the
rollout's own row, so every token sees exactly the keys, values and positions it sees in the
plain row: logits, loss and gradients are the plain ones (gradients of the shared part add up
over the segments in the backward, as they would over the G rows). The last shared token is
repeated at the head of each segment because it predicts a different first token for each one;
the logprob of every rollout token is then the next-token logprob at one row position, gathered
into the usual right-aligned (N, C) completion window (``PackedInputs.gather_NC``).

The mask describes the layout to any attention; ``pack`` also gives it as token ranges
(``rlft.packed_attention.Segments``), with which rlft's CPU attention visits only the (query, key)
pairs the mask allows instead of the row's L^2. Exact for decoders whose attention is causal over
``position_ids`` and takes a custom mask:
:func:`enabled` lists them (``"auto"``); sliding windows, attention sinks and soft-capping
models are left to the plain path. Left out: the loss (``rlft.training.grpo``) and the update
loop (``rlft.training.update``, which chooses this path or the plain one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlft.errors import UserError
from rlft.packed_attention import Segments, layout

# decoders whose attention is plain causal over position_ids (RoPE), checked in tests/test_shared_prefix.py
EXACT_MODEL_TYPES = ("llama", "qwen2", "qwen3")
# attention implementations that take a custom (B, 1, L, L) mask as given (flash-attention does not)
MASKED_ATTENTION = ("sdpa", "eager", "rlft")


class SharedPrefixError(UserError, ValueError):
    """``shared_prefix = true`` for a model whose attention cannot take the packed mask (the CLI
    prints it as one line)."""


def enabled(setting: str, config: Any) -> bool:
    """Whether the update packs groups, for a model of this (transformers) ``config``:
    ``setting`` is ``"auto"`` (on where exact: a model type of ``EXACT_MODEL_TYPES``, no sliding
    window, a masked attention implementation), ``"true"`` or ``"false"``."""
    attn = getattr(config, "_attn_implementation", None)
    if setting == "false":
        return False
    if setting == "true":
        if attn not in MASKED_ATTENTION:
            raise SharedPrefixError(f"shared_prefix = true needs an attention implementation that takes a custom "
                                    f"mask ({', '.join(MASKED_ATTENTION)}); this model uses {attn!r}: set "
                                    "shared_prefix = \"auto\" or \"false\"")
        return True
    if setting != "auto":
        raise SharedPrefixError(f"shared_prefix = {setting!r} is not one of: auto, true, false")
    sliding = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    return getattr(config, "model_type", None) in EXACT_MODEL_TYPES and attn in MASKED_ATTENTION and not sliding


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix all of ``seqs`` share."""
    first, n = seqs[0], min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n


@dataclass(frozen=True)
class Row:
    """One packed row: ``members`` index the caller's sequences (one group's), ``shared`` = S,
    the tokens they all start with (the row holds S - 1 of them once, then one segment each)."""

    members: tuple[int, ...]
    shared: int
    length: int  # tokens in the row: (S - 1) + sum of (n_i - S + 1)


def _row(members: Sequence[int], seqs: Sequence[Sequence[int]]) -> Row:
    S = common_prefix([seqs[i] for i in members])
    return Row(tuple(members), S, (S - 1) + sum(len(seqs[i]) - S + 1 for i in members))


def plan_rows(seqs: Sequence[Sequence[int]], groups: Sequence[int], budget: int) -> list[Row]:
    """Rows for the sequences ``seqs`` (prompt + completion ids, each non-empty) of the groups
    ``groups`` (one id per sequence): one row per group, or, when a group's row would pass
    ``budget`` tokens, several rows that each repeat the shared part (members taken longest
    first, each row filled up to the budget; a single sequence longer than it gets a row alone,
    as in the plain path)."""
    by_group: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    rows: list[Row] = []
    for members in by_group.values():
        members = sorted(members, key=lambda i: -len(seqs[i]))
        S = common_prefix([seqs[i] for i in members])
        if S == 0:  # nothing shared (no prompt in common): one plain row each
            rows.extend(_row([i], seqs) for i in members)
            continue
        part: list[int] = []
        length = S - 1
        for i in members:
            seg = len(seqs[i]) - S + 1
            if part and length + seg > budget:
                rows.append(_row(part, seqs))
                part, length = [], S - 1
            part.append(i)
            length += seg
        rows.append(_row(part, seqs))
    return rows


def micro_batches(rows: list[Row], budget: int) -> list[list[Row]]:
    """Length-bucketed rows, as the plain path buckets sequences: sorted by length, each
    micro-batch filled while its padded size (rows x longest row) stays within ``budget``."""
    out: list[list[Row]] = []
    for r in sorted(rows, key=lambda r: -r.length):
        if out and (len(out[-1]) + 1) * out[-1][0].length <= budget:
            out[-1].append(r)
        else:
            out.append([r])
    return out


def renumbered(rows: list[Row]) -> tuple[list[int], list[Row]]:
    """A micro-batch's sequences in row order (indices into the caller's list), and its rows with
    their members renumbered as positions in that order (as :func:`pack` takes them)."""
    order = [n for row in rows for n in row.members]
    local, k = [], 0
    for row in rows:
        local.append(Row(tuple(range(k, k + len(row.members))), row.shared, row.length))
        k += len(row.members)
    return order, local


@dataclass(frozen=True)
class PackedInputs:
    """The model's inputs for packed rows and where each sequence's logprobs are in its output."""

    ids_BL: torch.Tensor  # left-padded packed rows
    mask_B1LL: torch.Tensor  # True (or 0.0 when additive) where a query may attend to a key
    pos_BL: torch.Tensor  # each token's position in its own rollout
    keep_W: torch.Tensor  # (W,) the row positions whose logits are computed (the same for every row)
    targets_BW: torch.Tensor  # the token after each kept position (its next-token target)
    gather_NC: torch.Tensor  # (N, C) index into the flattened (B * W) logprobs: sequence n's window
    segments: Segments  # the same layout as token ranges: rlft's attention then visits only the pairs seen


def pack(rows: list[Row], seqs: Sequence[Sequence[int]], prompt_lens: Sequence[int], C: int, pad_id: int, *,
         additive: bool = False) -> PackedInputs:
    """The tensors of one micro-batch of ``rows``. Sequence n (in row order: ``rows[0].members``
    first) has its completion, ``seqs[n][prompt_lens[n]:]``, right-aligned in a window of ``C``
    columns, as the plain path lays it out. ``additive``: a float mask (0 / -inf-like) for eager
    attention, which adds the mask to the scores; sdpa and rlft's attention take the boolean one."""
    B, L = len(rows), max(r.length for r in rows)
    ids_BL = torch.full((B, L), pad_id, dtype=torch.long)
    pos_BL = torch.zeros((B, L), dtype=torch.long)
    seg_BL = torch.full((B, L), -2, dtype=torch.long)  # -1 shared, k >= 0 segment k, -2 padding
    order = [n for row in rows for n in row.members]  # the sequences, in the order of the output's N axis
    where: list[list[int]] = []  # per sequence, in that order: the flat (B * L) position of each of its tokens
    row_parts, segments = [], []  # each row's (first position, shared length), each segment's (row, first, length)
    for b, row in enumerate(rows):
        o, S = L - row.length, row.shared
        first = seqs[row.members[0]]
        ids_BL[b, o:o + S - 1] = torch.tensor(first[:S - 1], dtype=torch.long)
        pos_BL[b, o:o + S - 1] = torch.arange(S - 1)
        seg_BL[b, o:o + S - 1] = -1
        row_parts.append((o, S - 1))
        at = o + S - 1
        for k, n in enumerate(row.members):
            seg = seqs[n][S - 1:]
            ids_BL[b, at:at + len(seg)] = torch.tensor(seg, dtype=torch.long)
            pos_BL[b, at:at + len(seg)] = torch.arange(S - 1, S - 1 + len(seg))
            seg_BL[b, at:at + len(seg)] = k
            segments.append((b, at, len(seg)))
            flat = b * L
            where.append([flat + o + q for q in range(S - 1)] + [flat + at + j for j in range(len(seg))])
            at += len(seg)
    # query i may see key j: j <= i, and j shared or in i's own segment; padding sees only itself
    causal_LL = torch.ones((L, L), dtype=torch.bool).tril()
    q_BL1, k_B1L = seg_BL[:, :, None], seg_BL[:, None, :]
    same_BLL = (k_B1L == -1) & (q_BL1 != -2) | (k_B1L == q_BL1) & (q_BL1 != -2)
    mask_BLL = same_BLL & causal_LL | torch.eye(L, dtype=torch.bool) & (q_BL1 == -2)
    # logits at row positions whose next token is a completion token: the window ends at L - 2
    # (the row's last token predicts nothing) and starts at the earliest such position
    first_needed = min(where[k][prompt_lens[n] - 1] % L for k, n in enumerate(order))
    W = L - 1 - first_needed
    keep_W = torch.arange(L - 1 - W, L - 1)
    targets_BW = ids_BL[:, L - W:]
    gather_NC = torch.zeros((len(order), C), dtype=torch.long)  # left of a completion: any index (masked)
    for k, n in enumerate(order):
        c = len(seqs[n]) - prompt_lens[n]
        at_c = torch.tensor(where[k][prompt_lens[n] - 1:len(seqs[n]) - 1])  # the positions predicting the completion
        gather_NC[k, C - c:] = (at_c // L) * W + (at_c % L - (L - 1 - W))
    mask_B1LL = mask_BLL[:, None]
    if additive:
        mask_B1LL = torch.zeros(mask_B1LL.shape).masked_fill_(~mask_B1LL, torch.finfo(torch.float32).min)
    return PackedInputs(ids_BL, mask_B1LL, pos_BL, keep_W, targets_BW, gather_NC,
                        layout(L, row_parts, segments))


def additive_mask(config: Any) -> bool:
    """Whether the model's attention adds its mask to the scores (eager) instead of taking a boolean one."""
    return getattr(config, "_attn_implementation", None) == "eager"


__all__ = ["EXACT_MODEL_TYPES", "PackedInputs", "Row", "SharedPrefixError", "additive_mask", "common_prefix",
           "enabled", "micro_batches", "pack", "plan_rows", "renumbered"]

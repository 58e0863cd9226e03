"""Activation recompute for the micro-batches that pass the token budget.

``micro_batch_tokens`` bounds a micro-batch's padded tokens, and with them the activations the
backward keeps. One sequence longer than the budget cannot be split, so it forms a micro-batch
alone and breaks that bound: on the tool_use recipe a multi-turn rollout of ~1,500 tokens made
an update grow 3.5 GB where a 1,024-token micro-batch grows ~1.3 GB (benchmarks/README.md).
:func:`recompute_if_over` turns on activation checkpointing (each decoder layer's activations
recomputed in the backward, as ``gradient_checkpointing = true`` does for every micro-batch) for
such a micro-batch only, so the budget holds as a memory bound and the others pay nothing. The
gradient is the same: recompute replays the same forward (no dropout in RL updates).

Left out: models whose decoder layers are not transformers' ``GradientCheckpointingLayer``
(nothing changes for them), and splitting a long sequence itself.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

__all__ = ["recompute_if_over"]


@contextlib.contextmanager
def recompute_if_over(model: torch.nn.Module, padded_tokens: int, budget: int) -> Iterator[bool]:
    """Within the block (forward and backward), the decoder layers of ``model`` recompute their
    activations in the backward when ``padded_tokens`` is over ``budget``; yields whether they do.
    Layers already checkpointing (``gradient_checkpointing = true``) are left as they are."""
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)
              and not m.gradient_checkpointing] if padded_tokens > budget else []
    saved: list[tuple[Any, Any]] = [(m, m.__dict__.get("_gradient_checkpointing_func")) for m in layers]
    fn = functools.partial(checkpoint, use_reentrant=False)
    for m in layers:
        m.gradient_checkpointing, m._gradient_checkpointing_func = True, fn
    try:
        yield bool(layers)
    finally:
        for m, old in saved:
            m.gradient_checkpointing = False
            if old is None:
                m.__dict__.pop("_gradient_checkpointing_func", None)
            else:
                m._gradient_checkpointing_func = old

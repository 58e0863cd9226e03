"""A micro-batch's logprobs under a model: plain left-padded rows or packed shared-prefix rows.

:func:`forward_logprobs` runs the decoder and computes each sequence's completion-window
logprobs (N, C) at its sampled tokens only (``rlft.training.head``: the output head in chunks);
models whose logits that module does not reproduce take the model's own logits over the whole
window (:func:`completion_logits`). Left out: which sequences form a micro-batch and the loss
(``rlft.training.update``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from rlft import distributed, packed_attention
from rlft.training import grpo, head, prefix


@dataclass(frozen=True)
class PlainInputs:
    """Plain rows' model inputs: one left-padded sequence per row."""

    ids_BL: torch.Tensor
    attn_BL: torch.Tensor
    pos_BL: torch.Tensor
    tokens_BC: torch.Tensor  # the completion window's tokens


def forward_logprobs(model: Any, inputs, temperature: float, mask_NC: torch.Tensor, *, entropy: bool = False):
    """Each sequence's completion-window logprobs (N, C) under ``model`` and, with ``entropy``,
    the entropies there (no gradient), from plain rows or packed ones; only where ``mask_NC`` is
    set (the sampled tokens: the rest are 0). The output head runs at those positions alone, in
    chunks (``rlft.training.head``)."""
    base = distributed.unwrap(model)  # the causal LM (a peft model forwards to its base)
    if not head.supported(base.config):
        return _window_logprobs(model, inputs, temperature, mask_NC, entropy)
    ids_BL = inputs.ids_BL
    B, L = ids_BL.shape
    if isinstance(inputs, prefix.PackedInputs):
        W = inputs.keep_W.shape[0]
        row_N, w_NC = inputs.gather_NC // W, inputs.gather_NC % W
        at_NC = row_N * L + (L - 1 - W) + w_NC  # the flat (B * L) position predicting each window token
        targets_NC = inputs.targets_BW.reshape(-1)[inputs.gather_NC]
        attn, extra = inputs.mask_B1LL, _segments(inputs)
    else:
        C = inputs.tokens_BC.shape[1]
        dev = ids_BL.device
        at_NC = torch.arange(B, device=dev)[:, None] * L + torch.arange(L - C - 1, L - 1, device=dev)
        targets_NC = inputs.tokens_BC
        attn, extra = inputs.attn_BL, {}
    # no logits from the model (an empty index keeps none); the final normed states instead
    none = torch.zeros(0, dtype=torch.long, device=ids_BL.device)
    out = model(input_ids=ids_BL, attention_mask=attn, position_ids=inputs.pos_BL, logits_to_keep=none,
                output_hidden_states=True, use_cache=False, **extra)
    h_BLH = out.hidden_states[-1]
    sel_NC = mask_NC > 0
    h_MH = h_BLH.reshape(B * L, -1)[at_NC[sel_NC]]
    softcap = getattr(base.config, "final_logit_softcapping", None)
    logp_M, ent_M = head.sampled_logprobs(base.get_output_embeddings(), h_MH, targets_NC[sel_NC], temperature,
                                          entropy=entropy, softcap=softcap)
    logp_NC = torch.zeros(mask_NC.shape, dtype=logp_M.dtype, device=logp_M.device).masked_scatter(sel_NC, logp_M)
    ent_NC = torch.zeros_like(logp_NC).masked_scatter_(sel_NC, ent_M) if entropy else None
    return logp_NC, ent_NC


def _window_logprobs(model: Any, inputs, temperature: float, mask_NC: torch.Tensor, entropy: bool):
    """``forward_logprobs`` through the model's own logits over the whole completion window
    (B, C, V): for models whose logits ``rlft.training.head`` does not reproduce."""
    if isinstance(inputs, prefix.PackedInputs):
        logits = model(input_ids=inputs.ids_BL, attention_mask=inputs.mask_B1LL, position_ids=inputs.pos_BL,
                       logits_to_keep=inputs.keep_W, use_cache=False, **_segments(inputs)).logits  # (B, W, V)
        targets = inputs.targets_BW
    else:
        logits = completion_logits(model, inputs.ids_BL, inputs.attn_BL, inputs.pos_BL, inputs.tokens_BC.shape[1])
        targets = inputs.tokens_BC
    logp = grpo.token_logprobs(logits, targets, temperature)
    ent = grpo.entropy_from_logits(logits.detach(), temperature) if entropy else None
    if isinstance(inputs, prefix.PackedInputs):  # row positions -> each sequence's window (N, C)
        logp = logp.reshape(-1)[inputs.gather_NC]
        ent = ent.reshape(-1)[inputs.gather_NC] if ent is not None else None
    keep_NC = mask_NC > 0
    return logp * keep_NC, (ent * keep_NC if ent is not None else None)


def to_device(inputs, device):
    """``PlainInputs`` or ``prefix.PackedInputs`` with every tensor (and the segments) on ``device``."""
    return type(inputs)(**{f.name: getattr(inputs, f.name).to(device) for f in fields(inputs)})


def _segments(inputs: prefix.PackedInputs) -> dict[str, Any]:
    """The packed rows' layout as the model keyword rlft's attention reads (``rlft.packed_attention``)."""
    return {packed_attention.KWARG: inputs.segments}


def completion_logits(model: Any, ids, attn, pos, C: int):
    """Logits (B, C, V) predicting the last C tokens of each left-padded row."""
    L = ids.shape[1]
    # positions as an index tensor, not an int: an int slices the hidden states into a strided
    # view, and the output head over a strided (B, C, H) input made torch expand and copy the
    # (V, H) head weight once per row (2.8 s of a 13 s SmolLM2 LoRA forward+backward, measured)
    keep = torch.arange(L - C - 1, L - 1, device=ids.device)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=keep, use_cache=False)
    return out.logits


__all__ = ["PlainInputs", "completion_logits", "forward_logprobs", "to_device"]

"""CPU attention for the shapes RL finetuning runs: one-token decode steps and short sequences.

PyTorch's CPU ``scaled_dot_product_attention`` (the flash kernel for CPU) is slow for two of the
shapes that dominate a small-model RL step on CPU: a batch-64 decode step spent 72 % of its time
in it (125 ms per step; 57 ms with this module, ``benchmarks/README.md``), and a forward+backward
over short rows runs faster as plain matmuls. Over longer rows the fused kernel wins, and by more
the longer they are. SmolLM2's shape (9 x 3 heads, bf16, torch 2.13), time of the matmul path over
sdpa's (``benchmarks/bench_attention.py --shapes``): forward+backward 0.44-0.82 at 64-150 keys,
0.97-1.89 at 192, 1.35-1.96 at 384, 3.2-4.8 at 1,024; forward only 1.4-8.3 at every length. The
crossover is the same on an AMX Xeon with and without oneDNN's AMX kernels
(``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16``). This module registers an attention implementation
named ``"rlft"`` with transformers' ``AttentionInterface`` that computes

    softmax(q k^T * scale + mask) v      # softmax in float32, matmuls in the input dtype

with grouped-query heads folded into the matmul (no ``repeat_kv`` copy of the cache), for

- short queries (decode, ``q_len <= 16``), always;
- longer ones over fewer than ``_SDPA_FROM_KEYS`` keys while the float32 score tensor stays
  under ``_MAX_SCORE_BYTES`` per layer. Beyond either it defers to transformers' sdpa path,
  which is faster there and whose memory does not grow with ``q_len * kv_len``. The choice
  depends on the shapes only (not on autograd), so a forward with and without gradients (the
  update's logprobs, the reference model's, an evaluation) computes the same numbers.

It also defers to sdpa for anything it does not implement: attention dropout, soft-capping,
attention sinks, position biases, sliding windows without a mask, non-causal modules. The mask
format is the sdpa one (boolean ``[B, 1, q, kv]`` or None for plain causal). GPUs keep sdpa:
their fused kernels are fast, so :func:`use_fast_attention` only switches CPU models.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from rlft import packed_attention

__all__ = ["NAME", "rlft_attention", "use_fast_attention"]

NAME = "rlft"
_MAX_SCORE_BYTES = 48 << 20  # float32 scores per layer above which sdpa's memory-lean path is used
_NEG = torch.finfo(torch.float32).min
_SHORT_QUERY = 16  # queries up to this long always take the matmul path
_SDPA_FROM_KEYS = 192  # queries over this many keys (and > _SHORT_QUERY long) take sdpa's fused kernel
# keyword arguments whose presence (non-None) means a feature only sdpa / eager implement
_DEFER_KWARGS = ("softcap", "s_aux", "sinks", "position_bias", "sliding_window")


def rlft_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                   is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention interface: query (B, H, q, D), key/value (B, KV, L, D) ->
    output (B, q, H, D) and no attention weights. Packed shared-prefix rows whose layout comes as
    ``rlft_segments`` take ``rlft.packed_attention`` where its kernel runs, not their dense mask."""
    B, H, q, D = query.shape
    KV, L = key.shape[1], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    unsupported = dropout > 0 or H % KV or any(kwargs.get(k) is not None for k in _DEFER_KWARGS)
    segments = kwargs.get(packed_attention.KWARG)  # packed shared-prefix rows: only the pairs they see
    if segments is not None and causal and not unsupported:
        out = packed_attention.packed_attention(query, key, value, segments, scaling or D ** -0.5)
        if out is not None:
            return out, None
    defer = (unsupported or (not causal and attention_mask is None and q > 1)
             or (q > _SHORT_QUERY and (L >= _SDPA_FROM_KEYS or B * H * q * L * 4 > _MAX_SCORE_BYTES)))
    if defer:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    G = H // KV  # query heads per key/value head: head h reads kv head h // G
    scale = scaling if scaling is not None else D ** -0.5
    mask = attention_mask
    bias = None
    if q <= _SHORT_QUERY and (mask is None or mask.dtype == torch.bool):
        key, value, bias = _whole_buffers(key, value, mask, q)
        mask = mask if bias is None else None
    q_grouped = query.reshape(B, KV, G * q, D)
    L = key.shape[2]
    scores = torch.matmul(q_grouped, key.transpose(-1, -2)).float().mul_(scale)  # (B, KV, G*q, L)
    scores = scores.view(B, KV, G, q, L)
    if bias is not None:
        scores.add_(bias[:, :, None])
    elif mask is not None:
        m = mask[:, :, None]  # (B, 1|KV, 1, q, L): the same for every head of a group
        # a finite minimum, not -inf: a padding query with no visible key gets a harmless uniform
        # row instead of NaN (which would reach real tokens through the next layer's values)
        # in place: scores is this function's own fresh tensor (an out-of-place fill copied the
        # whole float32 score tensor per layer: 2.6 % of a LoRA update, measured)
        scores = scores.masked_fill_(~m, _NEG) if m.dtype == torch.bool else scores.add_(m)
    elif q > 1 and causal:  # no mask given: plain causal, the queries are the last q positions
        allowed = torch.ones(q, L, dtype=torch.bool, device=query.device).tril(L - q)
        scores = scores.masked_fill_(~allowed, _NEG)
    if value.dtype != scores.dtype and scores.requires_grad:  # training in bf16: keep only the bf16 probabilities
        probs = _SoftmaxAs.apply(scores, value.dtype).view(B, KV, G * q, L)
    else:
        probs = torch.softmax(scores, dim=-1).to(value.dtype).view(B, KV, G * q, L)
    out = torch.matmul(probs, value)  # (B, KV, G*q, D)
    return out.view(B, KV, G, q, D).reshape(B, H, q, D).transpose(1, 2).contiguous(), None


class _SoftmaxAs(torch.autograd.Function):
    """softmax(scores) in float32, returned in ``dtype`` (bf16), saving only that narrow result.

    torch's softmax saves its float32 output for the backward, and the cast's bf16 copy is saved
    again for the p @ v matmul: 6 bytes per score, 1.5 GB of a 966-token packed row's update on
    SmolLM2 (30 layers x 9 heads). The backward here uses the bf16 probabilities the forward's
    p @ v actually used (dp = p * (g - sum(g p)), in float32): 2 bytes per score. Only for bf16
    training; float32 keeps torch's softmax."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        probs = torch.softmax(scores, dim=-1).to(dtype)
        ctx.save_for_backward(probs)
        return probs

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (probs,) = ctx.saved_tensors
        p, g = probs.float(), grad.float()
        return p.mul_(g - (g * p).sum(-1, keepdim=True)), None


_bias_cache = threading.local()  # the decode step's additive mask, shared by all its layers


def _whole_buffers(key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, q: int):
    """Decode steps: attend over the KV cache's whole contiguous buffers, masking the slots not
    written yet; returns (key buffer, value buffer, additive float32 mask [B, 1|KV, q, cap]), or
    the inputs and None when the cache is not rlft's. The cache hands out ``buffer[:, :, :L]``
    views (``rlft.engines.kv_cache``), and a bf16 batched matmul on CPU copies a strided operand
    first: copying each layer's K and V cost ~1.6 ms of a ~2 ms layer at batch 64 (measured),
    while the extra masked slots cost far less than that copy. Every layer of a forward pass gets
    the same mask tensor, so its additive form is built once per step, not once per layer."""
    kbuf, vbuf = getattr(key, "_rlft_buffer", None), getattr(value, "_rlft_buffer", None)
    if kbuf is None or vbuf is None or kbuf.shape[2] == key.shape[2]:
        return key, value, None
    L, cap = key.shape[2], kbuf.shape[2]
    cached = getattr(_bias_cache, "entry", None)
    if cached is not None and cached[0] is mask and cached[1] == (cap, L, q):
        return kbuf, vbuf, cached[2]
    if mask is not None:
        allowed = mask
    else:
        allowed = torch.ones(q, L, dtype=torch.bool, device=key.device).tril(L - q)[None, None]
    bias = torch.full((*allowed.shape[:-1], cap), _NEG, dtype=torch.float32, device=key.device)
    bias[..., :L].masked_fill_(allowed, 0.0)
    _bias_cache.entry = (mask, (cap, L, q), bias)  # holds the mask: its id is not reused meanwhile
    return kbuf, vbuf, bias


_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, rlft_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True


def use_fast_attention(model: Any) -> bool:
    """Switch a CPU model that uses sdpa to the ``"rlft"`` attention; True when it did (or
    already had it). GPU models, and models on eager / flash / custom attention, are left alone."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == NAME:
        return True
    try:
        device = next(base.parameters()).device
    except StopIteration:  # pragma: no cover
        return False
    if current != "sdpa" or device.type != "cpu" or not hasattr(base, "set_attn_implementation"):
        return False
    _register()
    try:
        base.set_attn_implementation(NAME)
    except (ValueError, NotImplementedError, AttributeError):  # an architecture that cannot switch
        return False
    return getattr(base.config, "_attn_implementation", None) == NAME

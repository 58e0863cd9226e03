"""Attention over shared-prefix packed rows that visits only the (query, key) pairs a token may see.

A packed row (``rlft.training.prefix``) holds a group's shared prompt once, then one segment per
rollout; each segment attends to the shared part and causally to itself, never to another
segment. Given to a dense kernel as a 4-D mask the row costs L^2 pairs, while its tokens see
P^2 / 2 for the P shared tokens plus n (P + n / 2) for each segment of n: on the demo (P ~ 60,
eight ~32-token segments) a fifth of the dense pairs, on the tool_use recipe (P ~ 434, four
~75-token segments per row) ~37 %. torch's CPU flash kernel with a custom mask visits all of
them: 18 % of the demo's update and 37 % of tool_use's (``benchmarks/README.md``).

:class:`Segments` describes a micro-batch's rows as token ranges: for each query, the keys it
sees (its row's shared part up to itself, or the shared part and its own segment up to itself).
The kernel ``rlft.kernels.packed_attention`` computes the forward (saving each query's
logsumexp) and the backward from them in float32 over bf16 inputs; :func:`packed_attention`
wraps it as an autograd function. The update passes the micro-batch's :class:`Segments` to the
model as the keyword argument ``rlft_segments``, which transformers hands down to the attention
function. ``"rlft"`` attention (CPU) takes this path where the kernel runs (bf16, head sizes a
multiple of 16): it was faster than the dense kernel at every packed shape measured, down to a
row holding one segment (plain causal attention, half the dense pairs). Everything else
(float32 models, a machine without the kernel, sdpa on a GPU, eager) uses the dense mask, which
describes the same attention. Left-padding positions get zeros here (the dense path gives them their own value; no
real token attends to them either way, and their logits are never read). Left out: what
``rlft.attention`` defers to sdpa for (dropout, soft-capping, sinks, sliding windows): those take
the dense mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rlft.kernels.packed_attention import packed_attention_kernel

KWARG = "rlft_segments"  # the model keyword argument (forwarded to attention) that carries the layout


@dataclass(frozen=True)
class Segments:
    """A micro-batch of packed rows (B, L) as token ranges over the flat (B * L) token axis."""

    qr_T4: torch.Tensor  # int32 (a0, a1, b0, b1): query t sees keys [a0, a1) and [b0, b1)

    def to(self, device: torch.device | str) -> Segments:
        return Segments(self.qr_T4.to(device))


def layout(L: int, rows: Sequence[tuple[int, int]], segments: Sequence[tuple[int, int, int]]) -> Segments:
    """The :class:`Segments` of len(rows) rows of length L, given each row's (first token's position,
    shared length) and each segment's (row, first position, length)."""
    T = len(rows) * L
    qr_T4 = torch.zeros(T, 4, dtype=torch.int32)
    for b, (o, n) in enumerate(rows):
        t = torch.arange(b * L + o, b * L + o + n, dtype=torch.int32)
        qr_T4[t.long(), 0], qr_T4[t.long(), 1] = b * L + o, t + 1  # shared: causal over the shared part
    for b, start, n in segments:
        o, shared = rows[b]
        t = torch.arange(b * L + start, b * L + start + n, dtype=torch.int32)
        qr_T4[t.long()] = torch.stack([torch.full_like(t, b * L + o), torch.full_like(t, b * L + o + shared),
                                       torch.full_like(t, b * L + start), t + 1], 1)
    return Segments(qr_T4)


def packed_attention(q_BHLD: torch.Tensor, k_BKLD: torch.Tensor, v_BKLD: torch.Tensor, seg: Segments,
                     scale: float) -> torch.Tensor | None:
    """softmax(q k^T * scale) v over the keys each packed token sees: q (B, H, L, D), k and v
    (B, KV, L, D) with H a multiple of KV -> (B, L, H, D); None where the kernel does not run
    (not built here, not bf16, a head size it does not take): the caller takes the dense path."""
    kernel = packed_attention_kernel()
    if kernel is None or q_BHLD.device.type != "cpu" or not kernel.handles(q_BHLD.shape[-1], q_BHLD.dtype):
        return None
    return _PackedAttention.apply(q_BHLD, k_BKLD, v_BKLD, seg, scale, kernel)


def _flat(t_BNLD: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, D) -> contiguous (B * L, heads, D) (a view where the projections left it token-major)."""
    B, n, L, D = t_BNLD.shape
    return t_BNLD.transpose(1, 2).contiguous().view(B * L, n, D)


class _PackedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_BHLD, k_BKLD, v_BKLD, seg: Segments, scale: float, kernel):
        B, H, L, D = q_BHLD.shape
        q_T, k_T, v_T = _flat(q_BHLD), _flat(k_BKLD), _flat(v_BKLD)
        out_T, lse_T = kernel.forward(q_T, k_T, v_T, seg.qr_T4, scale)
        ctx.save_for_backward(q_T, k_T, v_T, out_T, lse_T)
        ctx.seg, ctx.scale, ctx.kernel = seg, scale, kernel
        return out_T.view(B, L, H, D)

    @staticmethod
    def backward(ctx, grad_BLHD):
        q_T, k_T, v_T, out_T, lse_T = ctx.saved_tensors
        B, L, H, D = grad_BLHD.shape
        KV = k_T.shape[1]
        g_T = grad_BLHD.to(q_T.dtype).contiguous().view(B * L, H, D)
        dq, dk, dv = ctx.kernel.backward(q_T, k_T, v_T, out_T, lse_T, g_T, ctx.seg.qr_T4, ctx.scale)
        return (dq.view(B, L, H, D).transpose(1, 2), dk.view(B, L, KV, D).transpose(1, 2),
                dv.view(B, L, KV, D).transpose(1, 2), None, None, None)


__all__ = ["KWARG", "Segments", "layout", "packed_attention"]

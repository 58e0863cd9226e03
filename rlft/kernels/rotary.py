"""Rotary position embedding for training on the CPU in bf16: one C pass forward and one backward
for each of q and k, bit-identical to transformers' formula.

transformers' ``apply_rotary_pos_emb`` computes ``q * cos + rotate_half(q) * sin`` (and the same for
k) as six ops forward (the two products, the sum, and rotate_half's slices, negation and
concatenation) and their backwards, each a pass over [batch, heads, tokens, head_dim]. In bf16 every
one of the three results is rounded, and :class:`_Rotary` rounds them the same way with
``layer_ops``' rotary kernel: ``bf16(bf16(x * cos) + bf16(swap_halves(x) * signed_sin))``, where
``signed_sin`` is sin with its first half negated. Its backward is the same operation with
``swap_halves(signed_sin)`` (the inverse rotation): autograd's gradient of x is
``bf16(bf16(g * cos) + bf16(g_other_half * sin))`` per half, and adding the zero halves that the slices'
backward contributes is exact. Outputs and gradients equal transformers' to the bit
(``tests/test_kernels.py``).

:func:`use_fused_rotary` swaps the module-level ``apply_rotary_pos_emb`` of the transformers
modules in ``_MODULES`` (their attention layers look it up there at each call) for one that runs the
kernel on bf16 CPU tensors and transformers' own function otherwise: bit-identical results, so the
swap is safe for every model of those classes in the process. Left out: other model families (they
keep their function), unsqueeze_dim other than 1, CUDA.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import torch

from rlft.kernels.layer_ops import LayerOps, layer_ops_kernels

__all__ = ["use_fused_rotary"]

_MODULES = ("llama", "mistral", "qwen2", "qwen3")  # transformers.models.<name>.modeling_<name>
_ORIGINAL: dict[str, Callable] = {}  # module -> transformers' own apply_rotary_pos_emb, once swapped


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BHLD: torch.Tensor, cos_BLD: torch.Tensor, signed_sin_BLD: torch.Tensor,
                back_sin_BLD: torch.Tensor, ops: LayerOps) -> torch.Tensor:
        ctx.save_for_backward(cos_BLD, back_sin_BLD)
        ctx.ops = ops
        return _rotated(ops, x_BHLD, cos_BLD, signed_sin_BLD)

    @staticmethod
    def backward(ctx, grad_BHLD: torch.Tensor):
        cos_BLD, back_sin_BLD = ctx.saved_tensors
        return _rotated(ctx.ops, grad_BHLD, cos_BLD, back_sin_BLD), None, None, None, None


def _rotated(ops: LayerOps, x_BHLD: torch.Tensor, cos_BLD: torch.Tensor, signed_sin_BLD: torch.Tensor) -> torch.Tensor:
    """A new [B, H, L, D] tensor (token-major storage, as the projections leave it): x rotated."""
    x_BLHD = x_BHLD.transpose(1, 2).clone(memory_format=torch.contiguous_format)  # a copy: never the input
    ops.rotary_(x_BLHD, cos_BLD, signed_sin_BLD)
    return x_BLHD.transpose(1, 2)


def _apply(original: Callable, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           unsqueeze_dim: int = 1):
    """transformers' ``apply_rotary_pos_emb``, by :class:`_Rotary` where the kernel takes the inputs."""
    ops = layer_ops_kernels()
    if (ops is None or unsqueeze_dim != 1 or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3
            or cos.shape != sin.shape or q.shape[-1] != cos.shape[-1] or k.shape[-1] != cos.shape[-1]
            or q.shape[-1] % 2 or q.shape[-1] > 512 or q.shape[2] != cos.shape[1] or k.shape[2] != cos.shape[1]
            or cos.shape[0] not in (1, q.shape[0]) or q.shape[0] != k.shape[0]
            or any(t.dtype != torch.bfloat16 or t.device.type != "cpu" or type(t) is not torch.Tensor
                   for t in (q, k, cos, sin))):
        return original(q, k, cos, sin, unsqueeze_dim)
    half = q.shape[-1] // 2
    cos = cos.expand(q.shape[0], -1, -1).contiguous()
    sin = sin.expand(q.shape[0], -1, -1)
    signed = torch.cat([-sin[..., :half], sin[..., half:]], -1)  # rotate_half(x) * sin == swap(x) * signed
    back = torch.cat([sin[..., half:], -sin[..., :half]], -1)  # swap_halves(signed): the backward's
    return _Rotary.apply(q, cos, signed, back, ops), _Rotary.apply(k, cos, signed, back, ops)


def use_fused_rotary() -> int:
    """Route the rotary embedding of the transformers modules in ``_MODULES`` through
    :class:`_Rotary` for bf16 CPU tensors; returns how many modules are routed (0 where the kernels
    did not build). Idempotent."""
    if layer_ops_kernels() is None:
        return 0
    for name in _MODULES:
        module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        if name not in _ORIGINAL:
            _ORIGINAL[name] = module.apply_rotary_pos_emb
            module.apply_rotary_pos_emb = functools.partial(_apply, _ORIGINAL[name])
    return len(_ORIGINAL)

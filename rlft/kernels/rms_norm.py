"""RMSNorm for training and inference on the CPU in bf16: forward and backward one C call each.

transformers' ``LlamaRMSNorm`` runs eight ops forward (a float32 copy, ``pow``, ``mean``, ``add``,
``rsqrt``, ``mul``, the cast back, the weight's ``mul``) and more backward, each a pass over the
activations: 2.3 ms forward + backward for one 353 x 576 bf16 norm on this CPU, ~11 % of the
demo's update with 61 norms per micro-batch. :class:`FusedRMSNorm` computes the same function,
``weight * bf16(x / sqrt(mean(x^2) + eps))``, with :mod:`rlft.kernels.layer_ops` when the input
and weight are bf16 CPU tensors (the same roundings; the float32 sums in another order, so an
output or gradient may be one bf16 step off, ``tests/test_kernels.py``), and with transformers'
formula otherwise.

:func:`use_fused_rms_norm` swaps a model's Llama / Mistral / Qwen2 / Qwen3 RMSNorm modules for it
where the kernels built (the weight parameter is the same object, so state dicts, optimizers and
adapters see no change). Left out: Gemma's ``(1 + weight)`` norm and other variants (left as
they are), CUDA (fused kernels exist there).
"""

from __future__ import annotations

from typing import Any

import torch

from rlft.kernels.layer_ops import LayerOps, layer_ops_kernels

__all__ = ["FusedRMSNorm", "use_fused_rms_norm"]

# transformers classes whose forward is weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype)
_SAME_FUNCTION = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, ops: LayerOps) -> torch.Tensor:
        x = x.contiguous()
        y, rstd = ops.rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.ops = ops
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx, dweight = ctx.ops.rms_norm_backward(x, weight, rstd, grad, ctx.needs_input_grad[1])
        return dx, (dweight.to(weight.dtype) if dweight is not None else None), None, None


class FusedRMSNorm(torch.nn.Module):
    """``LlamaRMSNorm``'s function over ``weight`` (the norm's own parameter, not a copy)."""

    def __init__(self, weight: torch.nn.Parameter, eps: float):
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # plain CPU tensors only: a sharded (DTensor) weight or input takes transformers' formula
        ops = layer_ops_kernels()
        if (ops is not None and x.dtype == self.weight.dtype == torch.bfloat16 and x.device.type == "cpu"
                and type(self.weight.data) is torch.Tensor and type(x) in (torch.Tensor, torch.nn.Parameter)):
            return _RMSNormFunction.apply(x, self.weight, self.variance_epsilon, ops)
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def use_fused_rms_norm(model: Any) -> int:
    """Replace ``model``'s RMSNorm modules (the classes of ``_SAME_FUNCTION``) by
    :class:`FusedRMSNorm` over the same weights, on a CPU model where the kernels built. Returns
    how many were replaced (0: nothing changed)."""
    try:
        device = next(model.parameters()).device
    except StopIteration:
        return 0
    if device.type != "cpu" or layer_ops_kernels() is None:
        return 0
    targets = [(name, m) for name, m in model.named_modules() if type(m).__name__ in _SAME_FUNCTION]
    for name, m in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, FusedRMSNorm(m.weight, float(m.variance_epsilon)))
    return len(targets)

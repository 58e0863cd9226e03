"""A LoRA linear layer as one autograd node on the CPU in bf16: base and adapter products fused.

peft's ``lora.Linear`` computes ``base(x) + lora_B(lora_A(x)) * scaling`` as five autograd nodes
(three matmuls, a ``mul``, an ``add``), each with its own bf16 rounding and its own pass over the
``[tokens, out]`` activations, forward and backward; under bf16 autocast the adapters' float32
weights are cast on every call. :class:`_LoraLinear` computes the same function with

    t_MR = x_MK A_RK^T                       (the rank-R projection, kept for the backward)
    y_MN = x_MK W_NK^T (+ bias) ;  y += s * t_MR B_NR^T      (one addmm: scale and add folded in)

and the gradients

    dt_MR = dy_MN B_NR ;  dx_MK = dy_MN W_NK + s * dt_MR A_RK   (one mm, one addmm)
    dB_NR = s * dy^T t ;  dA_RK = s * dt^T x                  (float32 for the float32 parameters)

so the ``[tokens, out]`` tensor is rounded once instead of three times, and there is no ``mul`` or
``add`` pass over it (measured in benchmarks/README.md). Tested against peft's forward and
gradients (``tests/test_lora_linear.py``).

:func:`use_fused_lora` puts it under each plain peft LoRA ``Linear`` of a model (one adapter,
no dropout, no DoRA or other variant, no adapter bias, ``nn.Linear`` base); the fused path runs only for bf16 CPU
inputs and weights with the adapters enabled and unmerged, everything else goes through peft's
own forward. Left out: CUDA (peft's path there), dropout, several adapters at once, DoRA.
"""

from __future__ import annotations

import types
from typing import Any

import torch

__all__ = ["use_fused_lora"]


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: float) -> torch.Tensor:
        dtype = weight.dtype
        x_MK = x.reshape(-1, x.shape[-1])
        a_RK, b_NR = lora_a.to(dtype), lora_b.to(dtype)
        t_MR = x_MK @ a_RK.T
        y_MN = torch.addmm(bias, x_MK, weight.T) if bias is not None else x_MK @ weight.T
        y_MN.addmm_(t_MR, b_NR.T, alpha=scale)
        ctx.save_for_backward(x_MK, t_MR, a_RK, b_NR)
        ctx.weight, ctx.scale, ctx.shape = weight, scale, x.shape
        ctx.param_dtypes = (lora_a.dtype, lora_b.dtype)
        ctx.bias_grad = bias is not None and bias.requires_grad
        return y_MN.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_MK, t_MR, a_RK, b_NR = ctx.saved_tensors
        s = ctx.scale
        dy_MN = dy.reshape(-1, dy.shape[-1]).to(x_MK.dtype)
        dt_MR = dy_MN @ b_NR
        dx_MK = dy_MN @ ctx.weight
        dx_MK.addmm_(dt_MR, a_RK, alpha=s)
        da_RK = torch.mm(dt_MR.T, x_MK).mul_(s).to(ctx.param_dtypes[0])
        db_NR = torch.mm(dy_MN.T, t_MR).mul_(s).to(ctx.param_dtypes[1])
        dbias = dy_MN.sum(0) if ctx.bias_grad else None
        return dx_MK.view(ctx.shape), None, dbias, da_RK, db_NR, None


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft ``lora.Linear.forward``, through :class:`_LoraLinear` when nothing asks for peft's own."""
    base = self.base_layer
    adapter = self.active_adapters[0] if len(self.active_adapters) == 1 else None
    if (args or kwargs or self.disable_adapters or self.merged or adapter not in self.lora_A
            or x.device.type != "cpu" or x.dtype != torch.bfloat16 or base.weight.dtype != torch.bfloat16
            or base.weight.requires_grad or not _plain_tensors(x, base.weight, self.lora_A[adapter].weight)):
        return type(self).forward(self, x, *args, **kwargs)
    return _LoraLinear.apply(x, base.weight, base.bias, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                             float(self.scaling[adapter]))


def _plain_tensors(*tensors: torch.Tensor) -> bool:
    """Not sharded (an FSDP2 DTensor takes peft's forward, which DTensor dispatch handles)."""
    return all(type(t.data) is torch.Tensor for t in tensors)


def _plain(module: Any) -> bool:
    """One adapter, no dropout, no variant (DoRA, ...), no bias on the adapter (peft's ``lora_bias``),
    an ``nn.Linear`` base, weights as (out, in)."""
    dropout = list(module.lora_dropout.values())
    return (len(module.lora_A) == 1 and not getattr(module, "lora_variant", {})
            and type(module.get_base_layer()) is torch.nn.Linear and not module.fan_in_fan_out
            and all(isinstance(d, torch.nn.Identity) for d in dropout)
            and all(m.bias is None for m in [*module.lora_A.values(), *module.lora_B.values()]))


def use_fused_lora(model: Any) -> int:
    """Route each plain peft LoRA ``Linear`` of ``model`` through the fused node (see the module
    docstring); returns how many. Parameters, state dicts and adapters are unchanged."""
    from peft.tuners.lora.layer import Linear

    n = 0
    for module in model.modules():
        if type(module) is Linear and _plain(module):
            module.forward = types.MethodType(_fused_forward, module)
            n += 1
    return n

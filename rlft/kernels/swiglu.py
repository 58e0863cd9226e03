"""A Llama-family MLP's ``silu(gate) * up`` for training on the CPU in bf16: one C pass forward and
one backward.

transformers' ``LlamaMLP`` computes ``down(act(gate(x)) * up(x))``: autograd runs SiLU and the
product as two ops forward and three backward (``silu_backward`` and the product's two ``mul``), and
keeps three [tokens, intermediate] tensors for them (``gate``, ``silu(gate)``, ``up``).
:class:`_SwiGLU` computes the same function with the same bf16 roundings by
:mod:`rlft.kernels.layer_ops` and keeps ``gate`` and ``up`` only (``silu(gate)`` is recomputed in
the backward's one pass): a third less of the MLP's activation memory (measured in
benchmarks/README.md). float32 exp may differ from torch's in its last bit, so an output or
gradient may be one bf16 step off (``tests/test_kernels.py``).

:func:`use_fused_swiglu` gives each MLP of the classes in ``_SAME_FUNCTION`` whose activation is
SiLU a forward that takes the kernel for bf16 CPU tensors and transformers' formula otherwise (the
modules and their parameters stay as they are). Left out: other activations (GELU-gated Gemma),
CUDA.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from rlft.kernels.layer_ops import LayerOps, layer_ops_kernels

__all__ = ["use_fused_swiglu"]

# transformers classes whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x))
_SAME_FUNCTION = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, ops: LayerOps) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        ctx.ops = ops
        return ops.swiglu(gate, up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        dgate, dup = ctx.ops.swiglu_backward(gate, up, grad)
        return dgate, dup, None


def _fused_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``, the product by :class:`_SwiGLU` where it can run."""
    gate, up = self.gate_proj(x), self.up_proj(x)
    ops = layer_ops_kernels()
    if (ops is not None and gate.dtype == up.dtype == torch.bfloat16 and gate.device.type == "cpu"
            and type(gate) is torch.Tensor and type(up) is torch.Tensor):
        return self.down_proj(_SwiGLU.apply(gate, up, ops))
    return self.down_proj(self.act_fn(gate) * up)


def use_fused_swiglu(model: Any) -> int:
    """Route the SiLU-gated MLPs of ``model`` (the classes of ``_SAME_FUNCTION``) through
    :class:`_SwiGLU` for bf16 CPU tensors; returns how many (0 where the kernels did not build)."""
    from transformers.activations import SiLUActivation

    if layer_ops_kernels() is None:
        return 0
    n = 0
    for module in model.modules():
        if type(module).__name__ in _SAME_FUNCTION and isinstance(module.act_fn, (SiLUActivation, torch.nn.SiLU)):
            module.forward = types.MethodType(_fused_forward, module)
            n += 1
    return n

"""Pre-packed bf16 linear layers for an engine's own copy of the weights (CPU, oneDNN).

``F.linear`` hands oneDNN a plain row-major weight at every call, and oneDNN re-blocks it for its
bf16 kernels each time. Reordering each weight once into oneDNN's blocked layout
(``torch.ops.mkldnn._reorder_linear_weight``, what inductor does for frozen CPU graphs) and
calling ``torch.ops.mkldnn._linear_pointwise`` gives bit-identical outputs, measured faster at
every batch size on this CPU (SmolLM2 shapes, 64 rows: 712 -> 587 us per decoder layer and
6.5 -> 4.2 ms for the 49k-vocabulary head; 1 row: 71 -> 26 us per 576x1536 projection).

Only for modules nobody trains: the packed weight is a separate copy (one more copy of the
linear weights in memory), so it is stale until :func:`repack_linears` runs after the weights
change (the engine does it in ``sync_weights``: 55-60 ms for SmolLM2's 211 layers). A forward
that needs gradients, or gets an input that is not bf16, falls back to ``F.linear`` on the
module's own weight. Left out: fp32 weights (the CPU engine decodes in bf16; fp32 was not
measured), CUDA (cuBLAS takes plain weights), quantized weights.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["can_pack", "pack_linears", "repack_linears", "is_packed"]

_ROWS_HINT = 64  # the batch size oneDNN picks its blocking for: the engine's usual decode batch


def can_pack(model: Any) -> bool:
    """A bf16 model on the CPU, with a oneDNN that has bf16 kernels for this CPU."""
    try:
        p = next(model.parameters())
    except StopIteration:
        return False
    mkldnn = torch.ops.mkldnn
    return (p.device.type == "cpu" and p.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(mkldnn, "_reorder_linear_weight") and hasattr(mkldnn, "_linear_pointwise")
            and bool(mkldnn._is_mkldnn_bf16_supported()))


def _packed_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.bfloat16 or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
        return F.linear(x, self.weight, self.bias)
    return torch.ops.mkldnn._linear_pointwise(x, self._rlft_packed, self.bias, "none", [], "")


def _linears(model: Any):
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.bfloat16]


@torch.no_grad()
def pack_linears(model: Any) -> int:
    """Give every bf16 ``nn.Linear`` of ``model`` a packed weight and the packed forward; returns
    how many. Call only when :func:`can_pack` is true."""
    n = 0
    for m in _linears(model):
        m._rlft_packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), batch_size=_ROWS_HINT)
        m.forward = types.MethodType(_packed_forward, m)
        n += 1
    return n


@torch.no_grad()
def repack_linears(model: Any) -> None:
    """Re-pack from the modules' current weights (after they changed)."""
    for m in model.modules():
        if getattr(m, "_rlft_packed", None) is not None:
            m._rlft_packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), batch_size=_ROWS_HINT)


def is_packed(model: Any) -> bool:
    return any(getattr(m, "_rlft_packed", None) is not None for m in model.modules())

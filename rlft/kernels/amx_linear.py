"""The AMX linear kernel (``amx_linear.c``) on torch tensors: pack a weight once, multiply often.

:func:`amx_linear_kernel` gives an :class:`AmxLinear` where the kernel compiled here (a CPU with
AMX-BF16: elsewhere the compiler refuses the tile intrinsics), Linux granted this process the
tile state, and oneDNN is not capped below AMX (``ONEDNN_MAX_CPU_ISA``: a user, or the test
suite, that keeps bf16 matmuls off AMX so their sums round as on older CPUs keeps this one off
too). Else None, and the caller keeps oneDNN's packed linear.

The products are float32 sums of bf16 products, rounded once to bf16 with the bias added in
float32, as oneDNN computes them; only the order of the float32 sums differs (measured: all
outputs equal to oneDNN's AMX path up to 32 rows, 99.98 % at 64). Left out: autograd (the engine's
decode and prefill only), dtypes other than bf16, inputs whose width is not a multiple of 32.
"""

from __future__ import annotations

import ctypes
import os
from typing import NamedTuple

import torch

from rlft.kernels.build import bind

__all__ = ["AmxLinear", "AmxWeight", "amx_linear_kernel", "amx_permitted"]

_P, _L, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
_ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


class AmxWeight(NamedTuple):
    """A ``[out_features, in_features]`` weight in the kernel's tile layout (``amx_linear.c``)."""

    packed: torch.Tensor  # [ceil(N / 32), K / 32, 2, 16, 16, 2] bf16: 32 columns x 32 inputs per 2 KB block
    out_features: int
    in_features: int


class AmxLinear:
    """``pack(weight)`` once, then ``linear(x, packed, bias)`` = ``F.linear(x, weight, bias)`` in bf16."""

    def __init__(self, lib: ctypes.CDLL):
        self._fn = lib.rlft_amx_linear
        self._fn.argtypes = [_P, _L, _I, _I, _P, _I, _P, _P, _L]
        self._fn.restype = None
        self._pack = lib.rlft_amx_pack
        self._pack.argtypes = [_P, _L, _I, _I, _P]
        self._pack.restype = None

    @staticmethod
    def handles(weight: torch.Tensor) -> bool:
        return (weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and weight.dim() == 2
                and weight.shape[1] % 32 == 0 and weight.shape[0] > 0)

    def pack(self, weight: torch.Tensor) -> AmxWeight:
        if not self.handles(weight):
            raise ValueError(f"AMX linear packs bf16 CPU [N, K] weights with K % 32 == 0, not "
                             f"{weight.dtype} {tuple(weight.shape)} on {weight.device}")
        N, K = weight.shape
        w = weight.detach()
        if w.stride(1) != 1 or w.stride(0) % 2 or w.data_ptr() % 4:  # the C code reads input pairs as words
            w = w.contiguous()
        # packed[nb, kb, t, r, c, j] = w[32 nb + 16 t + c, 32 kb + 2 r + j], zero columns up to 32 nb
        packed = torch.empty(-(-N // 32), K // 32, 2, 16, 16, 2, dtype=torch.bfloat16)
        self._pack(w.data_ptr(), w.stride(0), N, K, packed.data_ptr())
        return AmxWeight(packed, N, K)

    def linear(self, x: torch.Tensor, weight: AmxWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [..., K] bf16 (its last dimension contiguous) -> [..., N] bf16."""
        N, K = weight.out_features, weight.in_features
        if x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.shape[-1] != K:
            raise ValueError(f"AMX linear: x must be bf16 CPU [..., {K}], not {x.dtype} {tuple(x.shape)}")
        if bias is not None and (bias.dtype != torch.bfloat16 or bias.shape != (N,) or not bias.is_contiguous()):
            raise ValueError(f"AMX linear: bias must be bf16 [{N}] contiguous")
        rows = x if x.dim() == 2 and x.stride(1) == 1 else x.reshape(-1, K)
        if rows.stride(1) != 1:
            rows = rows.contiguous()
        y = torch.empty(rows.shape[0], N, dtype=torch.bfloat16)
        if rows.shape[0]:
            self._fn(rows.data_ptr(), rows.stride(0), rows.shape[0], K, weight.packed.data_ptr(), N,
                     bias.data_ptr() if bias is not None else None, y.data_ptr(), N)
        return y.view(*x.shape[:-1], N)


def amx_permitted() -> bool:
    """False where oneDNN is capped below AMX (``ONEDNN_MAX_CPU_ISA``): rlft's tile kernels stay off too."""
    return not any(os.environ.get(name, "").upper() not in ("", "ALL") and "AMX" not in os.environ[name].upper()
                   for name in _ISA_ENV)


def amx_linear_kernel() -> AmxLinear | None:
    """The kernel, or None where it cannot or should not run here (see the module docstring)."""
    return bind("amx_linear", _granted) if amx_permitted() else None


def _granted(lib: ctypes.CDLL) -> AmxLinear | None:
    if lib.rlft_amx_init() != 0:  # Linux older than 5.16, or AMX turned off for this process
        return None
    return AmxLinear(lib)

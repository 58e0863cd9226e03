"""The packed-row training attention kernel (``packed_attention.c``) as functions on torch tensors.

:func:`packed_attention_kernel` gives a :class:`PackedAttentionKernel` when the kernel compiled
and loaded here (``rlft.kernels.build``), else None. ``rlft.packed_attention`` builds the token
ranges it takes and wraps it as an autograd function. Where the kernel has its AMX path (a CPU with
AMX-BF16, tile state granted), it runs by default unless oneDNN is kept off AMX
(``ONEDNN_MAX_CPU_ISA``, as the test suite does so that sums round as on older CPUs): then the
AVX-512 path runs. Left out: dtypes other than bf16.
"""

from __future__ import annotations

import ctypes

import torch

from rlft.kernels.amx_linear import amx_permitted
from rlft.kernels.build import bind

__all__ = ["PackedAttentionKernel", "packed_attention_kernel"]

_P = ctypes.c_void_p
_I = ctypes.c_int


class PackedAttentionKernel:
    """``forward`` and ``backward`` over flat tokens: q [T, H, D], k and v [T, KV, D] (bf16,
    contiguous) and each query's two key ranges ``qr`` [T, 4] (int32)."""

    def __init__(self, lib: ctypes.CDLL):
        self._fwd, self._bwd = lib.rlft_packed_attention_fwd, lib.rlft_packed_attention_bwd
        self._fwd.restype = self._bwd.restype = ctypes.c_int
        self._fwd.argtypes = [_P] * 6 + [_I] * 4 + [ctypes.c_float, _I]
        self._bwd.argtypes = [_P] * 10 + [_I] * 4 + [ctypes.c_float, _I]
        lib.rlft_packed_attention_amx.restype = ctypes.c_int
        self.amx_runs = lib.rlft_packed_attention_amx() == 1  # compiled with AMX-BF16, tile state granted
        self.amx = self.amx_runs and amx_permitted()  # the default: off where oneDNN is kept off AMX

    @staticmethod
    def handles(head_dim: int, dtype: torch.dtype) -> bool:
        return dtype == torch.bfloat16 and head_dim % 16 == 0 and head_dim // 16 in (1, 2, 4, 8, 16)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qr: torch.Tensor, scale: float,
                amx: bool | None = None):
        """(out [T, H, D] bf16, logsumexp [T, H] float32; -inf where a token sees no key). ``amx``:
        the tile path (None: where it runs here, ``self.amx``; it takes head_dim 32, 64, 96, 128)."""
        T, H, D = q.shape
        self._check(q, k, v, qr)
        out, lse = torch.empty_like(q), torch.empty(T, H)
        code = self._fwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), qr.data_ptr(), out.data_ptr(), lse.data_ptr(),
                         T, H, k.shape[1], D, scale, self._amx(amx))
        if code != 0:
            raise RuntimeError(f"packed_attention forward failed ({code}) on {tuple(q.shape)}, {tuple(k.shape)}")
        return out, lse

    def backward(self, q, k, v, out, lse, grad, qr, scale: float, amx: bool | None = None):
        """(dq, dk, dv) for the output gradient ``grad`` [T, H, D] (bf16, contiguous)."""
        T, H, D = q.shape
        self._check(q, k, v, qr)
        if not (grad.shape == out.shape == q.shape and grad.dtype == q.dtype and grad.is_contiguous()):
            raise ValueError(f"packed_attention: unsupported gradient {tuple(grad.shape)} {grad.dtype}")
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        code = self._bwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), grad.data_ptr(),
                         qr.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
                         T, H, k.shape[1], D, scale, self._amx(amx))
        if code != 0:
            raise RuntimeError(f"packed_attention backward failed ({code}) on {tuple(q.shape)}, {tuple(k.shape)}")
        return dq, dk, dv

    def _amx(self, amx: bool | None) -> int:
        if amx and not self.amx_runs:
            raise ValueError("packed_attention: the AMX path does not run here")
        return int(self.amx if amx is None else amx)

    def _check(self, q, k, v, qr) -> None:
        T, H, D = q.shape
        if not (k.shape == v.shape and k.shape[0] == T and k.shape[2] == D and H % k.shape[1] == 0
                and q.dtype == k.dtype == v.dtype and self.handles(D, q.dtype)
                and q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
                and qr.shape == (T, 4) and qr.dtype == torch.int32 and qr.is_contiguous()):
            raise ValueError(f"packed_attention: unsupported inputs {tuple(q.shape)} {q.dtype} {tuple(k.shape)} "
                             f"{tuple(v.shape)}, ranges {tuple(qr.shape)} {qr.dtype}")


def packed_attention_kernel() -> PackedAttentionKernel | None:
    return bind("packed_attention", PackedAttentionKernel)

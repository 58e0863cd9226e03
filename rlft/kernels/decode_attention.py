"""The decode-attention kernel (``decode_attention.c``) as a function on torch tensors.

:func:`decode_attention_kernel` gives a :class:`DecodeAttention` when the kernel compiled and
loaded here (``rlft.kernels.build``), else None. It computes what the engine's four-op decode path
computes (``rlft.engines.fast_forward``) with the same bf16 roundings, in one pass over each row's
K and V; only the order of float32 sums differs. Left out: autograd, dtypes other than bf16.
"""

from __future__ import annotations

import ctypes

import torch

from rlft.kernels.build import bind

__all__ = ["DecodeAttention", "decode_attention_kernel"]


class DecodeAttention:
    """``attend(query_BHD, kbuf, vbuf, mask_BL, scale) -> out_BHD`` for one query per row."""

    def __init__(self, lib: ctypes.CDLL):
        fn = lib.rlft_decode_attention
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_void_p, *[ctypes.c_int] * 6, ctypes.c_float]
        self._fn = fn

    @staticmethod
    def handles(head_dim: int, dtype: torch.dtype) -> bool:
        return dtype == torch.bfloat16 and head_dim % 16 == 0 and head_dim // 16 in (1, 2, 4, 8, 16)

    def __call__(self, query: torch.Tensor, kbuf: torch.Tensor, vbuf: torch.Tensor, mask: torch.Tensor,
                 scale: float) -> torch.Tensor:
        """``query`` [B, H, D] (each row's heads contiguous; rows may be strided), ``kbuf``/``vbuf``
        [B, KV, cap, D] contiguous, ``mask`` [B, L] bool over the first ``L <= cap`` slots (False:
        padding, or not written). Returns [B, H, D]: ``softmax(q k^T * scale) v`` per head."""
        B, H, D = query.shape
        _, KV, cap, _ = kbuf.shape
        L = mask.shape[1]
        if not (query.stride(2) == 1 and query.stride(1) == D and kbuf.is_contiguous() and vbuf.is_contiguous()
                and kbuf.shape == vbuf.shape and mask.dtype == torch.bool and mask.is_contiguous()
                and H % KV == 0 and self.handles(D, query.dtype) and kbuf.dtype == vbuf.dtype == query.dtype):
            raise ValueError(f"decode_attention: unsupported inputs {tuple(query.shape)} {query.dtype} "
                             f"{tuple(kbuf.shape)} mask {tuple(mask.shape)}")
        out = torch.empty(B, H, D, dtype=query.dtype)
        code = self._fn(query.data_ptr(), query.stride(0), kbuf.data_ptr(), vbuf.data_ptr(), mask.data_ptr(),
                        out.data_ptr(), B, KV, H // KV, cap, L, D, scale)
        if code != 0:
            raise RuntimeError(f"decode_attention kernel failed ({code}) on {tuple(kbuf.shape)}, L={L}")
        return out


def decode_attention_kernel() -> DecodeAttention | None:
    return bind("decode_attention", DecodeAttention)

"""The sampling kernel (``sampling.c``) on torch tensors: a token per row from bf16 logits at T.

:func:`plain_sampler` gives a :class:`PlainSampler` where the kernel compiled here
(``rlft.kernels.build``), else None. It draws what ``rlft.engines.sampling.sample_tokens`` draws for
rows without truncation or greedy decoding, by the same inverse CDF over the same uniforms, in one
pass per row instead of eight passes over a float32 copy of the logits: 64 x 49,152 logits in ~0.5
ms instead of ~2 ms. The float32 sums run in another order and exp is a ~1 ulp polynomial, so a draw
whose uniform falls within ~1e-7 of a token boundary can land on the neighbouring token (measured:
7 draws in 15,360, each one or a few ids away, both equally valid roundings of the exact CDF);
logprobs of the same token agree to ~1e-6. Left out: float32 logits, top-p, top-k, greedy rows.
"""

from __future__ import annotations

import ctypes

import torch

from rlft.kernels.build import bind

__all__ = ["PlainSampler", "plain_sampler"]

_P, _L, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int


class PlainSampler:
    """``sampler(logits_BV, temperature_B, uniform_B) -> (tokens_B int64, logprobs_B float32)``."""

    def __init__(self, lib: ctypes.CDLL):
        self._fn = lib.rlft_sample_plain
        self._fn.argtypes = [_P, _L, _I, _I, _P, _P, _P, _P]
        self._fn.restype = _I

    def __call__(self, logits: torch.Tensor, temperature: torch.Tensor,
                 uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``logits`` [B, V] bf16 (rows may be strided), ``temperature`` [B] > 0, ``uniform`` [B] in [0, 1)."""
        B, V = logits.shape
        if logits.dtype != torch.bfloat16 or logits.device.type != "cpu" or logits.stride(1) != 1:
            raise ValueError(f"plain sampler: logits must be bf16 CPU [B, V] with contiguous rows, not "
                             f"{logits.dtype} {tuple(logits.shape)} strides {logits.stride()}")
        temperature = temperature.to(torch.float32).contiguous()
        uniform = uniform.to(torch.float32).contiguous()
        if temperature.shape != (B,) or uniform.shape != (B,) or bool((temperature <= 0).any()):
            raise ValueError(f"plain sampler: temperature (> 0) and uniform must be [{B}]")
        tokens = torch.empty(B, dtype=torch.long)
        logprobs = torch.empty(B, dtype=torch.float32)
        if B and self._fn(logits.data_ptr(), logits.stride(0), B, V, temperature.data_ptr(), uniform.data_ptr(),
                          tokens.data_ptr(), logprobs.data_ptr()) != 0:
            raise ValueError(f"plain sampler: a vocabulary of {V} is more than it handles")
        return tokens, logprobs


def plain_sampler() -> PlainSampler | None:
    return bind("sampling", PlainSampler)

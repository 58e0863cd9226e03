"""The one-token log-softmax kernel (``token_logprobs.c``) as functions on torch tensors.

:func:`token_logprobs_kernel` gives a :class:`TokenLogprobsKernel` when the kernel compiled and
loaded here (``rlft.kernels.build``), else None; ``rlft.training.head`` wraps it as an autograd
function. Left out: dtypes other than bf16, soft-capped logits.
"""

from __future__ import annotations

import ctypes

import torch

from rlft.kernels.build import bind

__all__ = ["TokenLogprobsKernel", "token_logprobs_kernel"]

_P, _I = ctypes.c_void_p, ctypes.c_int


class TokenLogprobsKernel:
    """``forward(z_CV, targets_C, temperature, entropy)`` -> (logp_C, lse_C, entropy_C or None) and
    ``backward(z_CV, targets_C, lse_C, grad_C, temperature)`` -> dz_CV, for bf16 logits whose rows are contiguous."""

    def __init__(self, lib: ctypes.CDLL):
        self._fwd, self._bwd = lib.rlft_token_logprobs_fwd, lib.rlft_token_logprobs_bwd
        self._fwd.restype = self._bwd.restype = ctypes.c_int
        self._fwd.argtypes = [_P, ctypes.c_long, _P, _I, _I, ctypes.c_float, _P, _P, _P]
        self._bwd.argtypes = [_P, ctypes.c_long, _P, _P, _P, _I, _I, ctypes.c_float, _P]

    @staticmethod
    def handles(z: torch.Tensor) -> bool:
        return z.dtype == torch.bfloat16 and z.device.type == "cpu" and z.dim() == 2 and z.stride(1) == 1

    def forward(self, z_CV: torch.Tensor, targets_C: torch.Tensor, temperature: float, entropy: bool):
        C, V = z_CV.shape
        t = self._targets(z_CV, targets_C)
        logp, lse = torch.empty(C), torch.empty(C)
        ent = torch.empty(C) if entropy else None
        code = self._fwd(z_CV.data_ptr(), z_CV.stride(0), t.data_ptr(), C, V, 1.0 / temperature, logp.data_ptr(),
                         lse.data_ptr(), ent.data_ptr() if ent is not None else None)
        if code != 0:
            raise ValueError(f"token_logprobs: a target outside the vocabulary of {V}")
        return logp, lse, ent

    def backward(self, z_CV, targets_C, lse_C, grad_C, temperature: float) -> torch.Tensor:
        C, V = z_CV.shape
        t = self._targets(z_CV, targets_C)
        g = grad_C.float().contiguous()
        dz = torch.empty(C, V, dtype=z_CV.dtype)
        code = self._bwd(z_CV.data_ptr(), z_CV.stride(0), t.data_ptr(), lse_C.data_ptr(), g.data_ptr(), C, V,
                         1.0 / temperature, dz.data_ptr())
        if code != 0:
            raise ValueError(f"token_logprobs: a target outside the vocabulary of {V}")
        return dz

    def _targets(self, z_CV: torch.Tensor, targets_C: torch.Tensor) -> torch.Tensor:
        if not (self.handles(z_CV) and targets_C.shape == (z_CV.shape[0],)):
            raise ValueError(f"token_logprobs: unsupported logits {tuple(z_CV.shape)} {z_CV.dtype} "
                             f"or targets {tuple(targets_C.shape)}")
        return targets_C.to(torch.int64).contiguous()


def token_logprobs_kernel() -> TokenLogprobsKernel | None:
    return bind("token_logprobs", TokenLogprobsKernel)

"""The per-layer small-op kernels (``layer_ops.c``) as functions on torch tensors.

:func:`layer_ops_kernels` gives a :class:`LayerOps` when the kernels compiled and loaded here
(``rlft.kernels.build``), else None. Each computes what ``rlft.engines.fast_forward``'s torch code
computes, with the same bf16 roundings, in one call instead of two to eight ops. Left out:
autograd, dtypes other than bf16.
"""

from __future__ import annotations

import ctypes

import torch

from rlft.kernels.build import bind

__all__ = ["LayerOps", "layer_ops_kernels"]

_P, _L, _I, _F = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float


class LayerOps:
    """RMSNorm (with the residual add before it; its backward), rotary embedding and ``silu(gate) * up``
    (its backward) on bf16."""

    def __init__(self, lib: ctypes.CDLL):
        self._norm = lib.rlft_add_rms_norm
        self._norm.argtypes = [_P, _L, _P, _L, _P, _P, _L, _I, _I, _F, _P]
        self._norm.restype = None
        self._norm_backward = lib.rlft_rms_norm_backward
        self._norm_backward.argtypes = [_P, _P, _P, _P, _P, _P, _I, _I]
        self._norm_backward.restype = None
        self._rotary = lib.rlft_rotary
        self._rotary.argtypes = [_P, _L, _I, _I, _I, _P, _P]
        self._rotary.restype = None
        self._silu = lib.rlft_silu_mul
        self._silu.argtypes = [_P, _L, _P, _L, _P, _I, _I]
        self._silu.restype = None
        self._silu_backward = lib.rlft_silu_mul_backward
        self._silu_backward.argtypes = [_P, _P, _P, _P, _P, _I, _I]
        self._silu_backward.restype = None

    @staticmethod
    def handles(head_dim: int, dtype: torch.dtype) -> bool:
        return dtype == torch.bfloat16 and head_dim % 2 == 0 and head_dim <= 512

    def add_rms_norm(self, h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     rstd: torch.Tensor | None = None) -> torch.Tensor:
        """``h += delta`` in place (when given), then ``weight * rmsnorm(h)`` with LlamaRMSNorm's
        roundings, as a new contiguous tensor. ``h``, ``delta`` [..., n] bf16, ``h`` contiguous.
        ``rstd`` (float32, ``h``'s shape without the last dimension), when given, receives each
        row's ``1 / sqrt(mean(h^2) + eps)``, which :meth:`rms_norm_backward` takes."""
        _check(h, weight)
        if not h.is_contiguous() or weight.shape != h.shape[-1:] or not weight.is_contiguous():
            raise ValueError(f"add_rms_norm: h {tuple(h.shape)} must be contiguous, weight [{h.shape[-1]}]")
        rows, n = h.numel() // h.shape[-1], h.shape[-1]
        delta_row = 0
        if delta is not None:
            _check(delta)
            if delta.shape != h.shape:
                raise ValueError(f"add_rms_norm: delta {tuple(delta.shape)} != h {tuple(h.shape)}")
            delta = delta.contiguous()
            delta_row = n
        if rstd is not None and (rstd.dtype != torch.float32 or rstd.shape != h.shape[:-1]):
            raise ValueError(f"add_rms_norm: rstd must be float32 {tuple(h.shape[:-1])}")
        out = torch.empty_like(h)
        self._norm(h.data_ptr(), n, delta.data_ptr() if delta is not None else None, delta_row, weight.data_ptr(),
                   out.data_ptr(), n, rows, n, eps, rstd.data_ptr() if rstd is not None else None)
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight * rmsnorm(x), rstd)``: :meth:`add_rms_norm` without the add, and the rows' rstd."""
        rstd = torch.empty(x.shape[:-1], dtype=torch.float32)
        return self.add_rms_norm(x, None, weight, eps, rstd), rstd

    def rms_norm_backward(self, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, grad: torch.Tensor,
                          weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The gradients of :meth:`rms_norm` for ``grad`` (its output's): ``(dx, dweight or None)``,
        ``dweight`` in float32 (summed over rows)."""
        _check(x, weight, grad)
        grad = grad.contiguous()
        if grad.shape != x.shape or not x.is_contiguous() or rstd.dtype != torch.float32:
            raise ValueError(f"rms_norm_backward: grad {tuple(grad.shape)} for x {tuple(x.shape)}")
        n = x.shape[-1]
        dx = torch.empty_like(x)
        dweight = torch.zeros(n, dtype=torch.float32) if weight_grad else None
        self._norm_backward(x.data_ptr(), weight.data_ptr(), rstd.data_ptr(), grad.data_ptr(), dx.data_ptr(),
                            dweight.data_ptr() if dweight is not None else None, x.numel() // n, n)
        return dx, dweight

    def rotary_(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """In place on ``x`` [B, q, heads, D] (each token's heads contiguous; tokens evenly spaced, as
        in a slice of the fused q|k|v output): ``x * cos + swap_halves(x) * signed_sin``, every
        product and the sum rounded to bf16. ``cos``/``signed_sin`` [B, q, D]."""
        _check(x, cos, signed_sin)
        B, q, heads, D = x.shape
        if (x.stride(3) != 1 or x.stride(2) != D or x.stride(0) != q * x.stride(1) or D % 2 or D > 512
                or cos.shape != (B, q, D) or signed_sin.shape != (B, q, D)):
            raise ValueError(f"rotary_: unsupported x {tuple(x.shape)} strides {x.stride()}, cos {tuple(cos.shape)}")
        cos, signed_sin = cos.contiguous(), signed_sin.contiguous()
        self._rotary(x.data_ptr(), x.stride(1), B * q, heads, D, cos.data_ptr(), signed_sin.data_ptr())
        return x

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` for ``gate_up`` [..., 2 * inter] (gate first), as [..., inter]."""
        _check(gate_up)
        if not gate_up.is_contiguous() or gate_up.shape[-1] % 2:
            raise ValueError(f"silu_mul: gate_up {tuple(gate_up.shape)} must be contiguous, of even width")
        inter = gate_up.shape[-1] // 2
        rows = gate_up.numel() // gate_up.shape[-1]
        out = torch.empty(*gate_up.shape[:-1], inter, dtype=gate_up.dtype)
        self._silu(gate_up.data_ptr(), gate_up.shape[-1], gate_up[..., inter:].data_ptr(), gate_up.shape[-1],
                   out.data_ptr(), rows, inter)
        return out

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` for two tensors of one shape (made contiguous), with the same roundings
        as torch's ``F.silu(gate) * up`` in bf16."""
        _check(gate, up)
        if gate.shape != up.shape:
            raise ValueError(f"swiglu: gate {tuple(gate.shape)} != up {tuple(up.shape)}")
        gate, up = gate.contiguous(), up.contiguous()
        inter = gate.shape[-1]
        out = torch.empty_like(gate)
        self._silu(gate.data_ptr(), inter, up.data_ptr(), inter, out.data_ptr(), gate.numel() // inter, inter)
        return out

    def swiglu_backward(self, gate: torch.Tensor, up: torch.Tensor,
                        grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradients of :meth:`swiglu` for ``grad`` (its output's): ``(dgate, dup)``, with
        autograd's roundings for ``F.silu`` and the product."""
        _check(gate, up, grad)
        if not (gate.shape == up.shape == grad.shape) or not (gate.is_contiguous() and up.is_contiguous()):
            raise ValueError(f"swiglu_backward: gate {tuple(gate.shape)}, up {tuple(up.shape)}, "
                             f"grad {tuple(grad.shape)}")
        grad = grad.contiguous()
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        self._silu_backward(gate.data_ptr(), up.data_ptr(), grad.data_ptr(), dgate.data_ptr(), dup.data_ptr(),
                            gate.numel() // gate.shape[-1], gate.shape[-1])
        return dgate, dup


def _check(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype != torch.bfloat16 or t.device.type != "cpu":
            raise ValueError(f"layer ops take bf16 CPU tensors, not {t.dtype} on {t.device}")


def layer_ops_kernels() -> LayerOps | None:
    return bind("layer_ops", LayerOps)

"""A LoRA linear layer as one autograd node on the CPU in bf16: base and adapter products fused.

peft's ``lora.Linear`` computes ``base(x) + lora_B(lora_A(x)) * scaling`` as five autograd nodes
(three matmuls, a ``mul``, an ``add``), each with its own bf16 rounding and its own pass over the
``[tokens, out]`` activations, forward and backward; under bf16 autocast the adapters' float32
weights are cast on every call. :func:`_lora_linear` computes the same function with

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
own forward.

At rank 16 the adapters' products cost about as much as the frozen ones (each a pass over a
``[tokens, width]`` activation at memory speed: ``benchmarks/bench_lora_layer.py``). A block's
projections that read one input, attention's q, k, v and the MLP's gate, up, are therefore
siblings (:class:`_Siblings`): the first one called computes all their outputs in one
:class:`_SharedInputLora` node (one pass over the input for their rank-R projections, one input
gradient accumulated by ``addmm_`` instead of one per projection added up by autograd, one
reduction over the input for their A gradients), and the others return theirs when called next
with the same tensor. Left out: CUDA (peft's path there), dropout, several adapters at once, DoRA.
"""

from __future__ import annotations

import types
from typing import Any

import torch

__all__ = ["use_fused_lora"]

# projections a Llama-family block calls one after the other on the same tensor, first one first
_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _SharedInputLora(torch.autograd.Function):
    """The LoRA linears of one block that read the same input (q, k, v; gate, up) as one node:

        t_MQ = x_MK A_QK^T                      (Q = the members' ranks stacked: one pass over x)
        y_i = x W_i^T (+ bias_i) ;  y_i += s_i t_i B_i^T

    and in the backward the input gradient of them all in one tensor, and the adapters' A
    gradients in one reduction over x:

        dt_MQ = [dy_i B_i]_i ;  dx = sum_i dy_i W_i + (s * dt) A      (one mm, then addmm_ into it)
        dA_QK = (s * dt)^T x ;  dB_i = s_i dy_i^T t_i

    Separate nodes read x once per member for t and dA, write one input gradient per member, and
    autograd adds them up: three passes over x and ~10 over [tokens, hidden] saved for q, k, v (the
    adapters' products are memory passes: benchmarks/README.md). Float32 sums as the single node
    computes them, rounded at other points (dx accumulated by addmm_ instead of added in bf16)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scales: tuple[float, ...], *params: torch.Tensor | None):
        weights, biases, lora_as, lora_bs = params[0::4], params[1::4], params[2::4], params[3::4]
        dtype = weights[0].dtype
        x_MK = x.reshape(-1, x.shape[-1])
        a_QK = torch.cat([a.to(dtype) for a in lora_as])
        t_MQ = x_MK @ a_QK.T
        outs, at = [], 0
        for w, bias, b, s in zip(weights, biases, lora_bs, scales):
            r = b.shape[1]
            y_MN = torch.addmm(bias, x_MK, w.T) if bias is not None else x_MK @ w.T
            y_MN.addmm_(t_MQ[:, at:at + r], b.to(dtype).T, alpha=s)
            outs.append(y_MN.view(*x.shape[:-1], w.shape[0]))
            at += r
        ctx.save_for_backward(x_MK, t_MQ, a_QK)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not zeros
        ctx.weights, ctx.lora_bs, ctx.scales, ctx.shape = weights, lora_bs, scales, x.shape
        ctx.dtypes = [(a.dtype, b.dtype) for a, b in zip(lora_as, lora_bs)]
        ctx.bias_grads = [bias is not None and bias.requires_grad for bias in biases]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys: torch.Tensor | None):
        x_MK, t_MQ, a_QK = ctx.saved_tensors
        dtype, M = x_MK.dtype, x_MK.shape[0]
        dx_MK, dts, grads, at = None, [], [], 0
        for dy, w, b, s, bias_grad in zip(dys, ctx.weights, ctx.lora_bs, ctx.scales, ctx.bias_grads):
            r = b.shape[1]
            if dy is None:  # an output nothing used: no gradient through it
                dy_MN = None
                dts.append(t_MQ.new_zeros(M, r))
            else:
                dy_MN = dy.reshape(-1, dy.shape[-1]).to(dtype)
                dts.append((dy_MN @ b.to(dtype)).mul_(s) if s != 1.0 else dy_MN @ b.to(dtype))
                dx_MK = dy_MN @ w if dx_MK is None else dx_MK.addmm_(dy_MN, w)
            grads.append((dy_MN, t_MQ[:, at:at + r], s, bias_grad))
            at += r
        dt_MQ = torch.cat(dts, 1)  # each member's dt scaled by its s
        dx_MK = dt_MQ @ a_QK if dx_MK is None else dx_MK.addmm_(dt_MQ, a_QK)
        da_QK = torch.mm(dt_MQ.T, x_MK)
        out, at = [], 0
        for (dy_MN, t_MR, s, bias_grad), (a_dtype, b_dtype) in zip(grads, ctx.dtypes):
            r = t_MR.shape[1]
            db = None if dy_MN is None else torch.mm(dy_MN.T, t_MR).mul_(s).to(b_dtype)
            dbias = dy_MN.sum(0) if bias_grad and dy_MN is not None else None
            da = None if dy_MN is None else da_QK[at:at + r].to(a_dtype)  # None, as a separate node's: not zeros
            out += [None, dbias, da, db]
            at += r
        return (dx_MK.view(ctx.shape), None, *out)


class _Siblings:
    """Fused LoRA linears that one forward calls in turn on the same input (``members[0]`` first):
    the first call computes every member's output in one :class:`_SharedInputLora` node and keeps
    the others' until they are called with that same tensor. Anything else (another input, a member
    that must take peft's path, another order) falls back to each member's own node."""

    def __init__(self, members: list[Any]):
        self.members = members
        self.waiting: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def take(self, module: Any, x: torch.Tensor) -> torch.Tensor | None:
        kept = self.waiting.pop(id(module), None)
        return kept[1] if kept is not None and kept[0] is x else None

    def compute(self, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        params: list[torch.Tensor | None] = []
        for m, adapter in zip(self.members, adapters):
            base = m.base_layer
            params += [base.weight, base.bias, m.lora_A[adapter].weight, m.lora_B[adapter].weight]
        scales = tuple(float(m.scaling[a]) for m, a in zip(self.members, adapters))
        outs = _SharedInputLora.apply(x, scales, *params)
        self.waiting = {id(m): (x, y) for m, y in zip(self.members[1:], outs[1:])}
        return outs[0]


def _lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                 lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """One LoRA linear as one node (see the module docstring): the shared node with one member."""
    return _SharedInputLora.apply(x, (scale,), weight, bias, lora_a, lora_b)[0]


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft ``lora.Linear.forward``, through :func:`_lora_linear` (or its siblings' shared node)
    when nothing asks for peft's own."""
    adapter = _fusable(self, x, args, kwargs)
    if adapter is None:
        return type(self).forward(self, x, *args, **kwargs)
    siblings: _Siblings | None = getattr(self, "_rlft_siblings", None)
    if siblings is not None:
        kept = siblings.take(self, x)
        if kept is not None:
            return kept
        if siblings.members[0] is self:
            adapters = [adapter] + [_fusable(m, x, (), {}) for m in siblings.members[1:]]
            if all(a is not None for a in adapters):
                return siblings.compute(x, adapters)
    base = self.base_layer
    return _lora_linear(x, base.weight, base.bias, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                        float(self.scaling[adapter]))


def _fusable(module: Any, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
    """The active adapter's name when the fused node computes this call; None for peft's forward."""
    base = module.base_layer
    adapter = module.active_adapters[0] if len(module.active_adapters) == 1 else None
    if (args or kwargs or module.disable_adapters or module.merged or adapter not in module.lora_A
            or x.device.type != "cpu" or x.dtype != torch.bfloat16 or base.weight.dtype != torch.bfloat16
            or base.weight.requires_grad or not _plain_tensors(x, base.weight, module.lora_A[adapter].weight)):
        return None
    return adapter


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

    fused = set()
    for module in model.modules():
        if type(module) is Linear and _plain(module):
            module.forward = types.MethodType(_fused_forward, module)
            fused.add(id(module))
    for block in model.modules():  # attention's q, k, v and the MLP's gate, up read one input
        for names in _SIBLINGS:
            members = [getattr(block, n, None) for n in names]
            if all(id(m) in fused for m in members) and len({m.in_features for m in members}) == 1:
                siblings = _Siblings(members)
                for m in members:
                    m._rlft_siblings = siblings
    return len(fused)

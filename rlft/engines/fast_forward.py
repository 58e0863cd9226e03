"""A lean forward pass over the engine's own copy of a Llama-family model (CPU).

transformers runs a decode step through ~60 small ops and as many module calls per layer
(masks, rotary, ``repeat``/``view`` bookkeeping, hooks); at SmolLM2's size (576 wide, 30 layers,
batch 64) that dispatch was ~1/6 of a step. :class:`FastForward` computes the same function with
what a decode step needs and no module dispatch, from weights it keeps itself:

- one matmul for ``[q; k; v]`` and one for ``[gate; up]`` per layer (the weights concatenated),
  each pre-packed for oneDNN in bf16 (as :mod:`rlft.engines.packed_linear` does per module;
  these replace the modules' packed copies), or, on a CPU with AMX where :mod:`rlft.kernels`
  built, packed for its AMX kernel (``amx_linear``: float32 sums in another order than oneDNN's,
  so within one bf16 step of them; a decode step's linear layers ~22 -> ~16 ms at batch 64).
  Not packed (float32), the modules' weights become views of the concatenated tensors, so
  there is no second copy;
- rotary applied to q and k together, in place, as ``x * cos + swap_halves(x) * signed_sin``
  (``rotate_half(x) * sin`` rounds the same products: negation is exact);
- RMSNorm, residual adds and ``silu(gate) * up`` with HF's roundings, in place where the
  tensor is this function's own; bf16 with :mod:`rlft.kernels` built here: each residual add
  with the RMSNorm after it, the rotary and ``silu(gate) * up`` are one C call each (the same
  roundings; the norm's float32 mean summed in another order);
- decode steps, bf16: attention by the C kernel of :mod:`rlft.kernels` where it built here (one
  pass over each row's K and V for the query heads that share them; the same bf16 roundings as
  the torch ops below, float32 sums in another order: within one bf16 step, a few outputs in
  10,000 differ; a scale that is not a power of two is applied before its one rounding).
  Otherwise, and with ``native=False``: attention in four ops over the KV cache's whole buffers
  (``baddbmm`` with the mask as its bias and the scale as ``alpha``, a float32 softmax, a cast,
  ``bmm``), exact when the scale is a power of two (head_dim 64, 16, ...); prefill and other
  scales go through :func:`rlft.attention.rlft_attention`, the function the model's own modules use.

Without the kernels every op that rounds is the one transformers runs, in the same dtype and
order, so the logits are the model's bit for bit wherever oneDNN computes a column of a
concatenated weight as it does the column alone (measured on this CPU for bf16 and float32;
``tests/test_fast_forward.py`` checks prefill, decode, multi-turn continuation and every cache
length; ``tests/test_kernels.py`` bounds the kernel's difference). Measured on SmolLM2-135M bf16 at
batch 64: decode steps 0.87-0.91 of the module path's time with the four ops, and the kernel takes
the attention over the cache from ~24 to ~14 ms of a ~60 ms step (``benchmarks/README.md``).
``logits`` only for the last position.

Supported (:func:`supports`): ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``
(q/k/v biases) and ``Qwen3ForCausalLM`` (per-head q/k norms) on the CPU, with full attention in
every layer, SiLU MLPs, the ``rlft`` attention (``rlft.attention.use_fast_attention``) and the
engine's KV cache (``rlft.engines.kv_cache``: ``update`` and its ``kbuf``/``vbuf`` buffers).
Anything else (sliding windows, soft-capping, other activations, a shared model that trains
underneath, CUDA) keeps the model's own forward.
Left out: weights that change without :meth:`FastForward.refresh` (the engine calls it after each
sync), training (no autograd), returning hidden states or attention weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from rlft.attention import NAME as RLFT_ATTENTION
from rlft.attention import rlft_attention
from rlft.engines.packed_linear import can_pack
from rlft.kernels import (
    AmxWeight,
    DecodeAttention,
    LayerOps,
    amx_linear_kernel,
    decode_attention_kernel,
    layer_ops_kernels,
)

__all__ = ["FastForward", "supports"]

_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
_ROWS_HINT = 64  # the batch size oneDNN picks its blocking for (as rlft.engines.packed_linear)


def supports(model: Any) -> bool:
    """True when :class:`FastForward` computes exactly what ``model``'s own forward does."""
    if type(model).__name__ not in _ARCHITECTURES:
        return False
    config = model.config
    try:
        device = next(model.parameters()).device
    except StopIteration:
        return False
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    sliding = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    return (device.type == "cpu" and getattr(config, "_attn_implementation", None) == RLFT_ATTENTION
            and config.hidden_act == "silu" and not getattr(config, "mlp_bias", False)
            and getattr(config, "pretraining_tp", 1) == 1
            and all(t == "full_attention" for t in layer_types) and not sliding)


@dataclass
class _Weights:
    """One decoder layer's weights: concatenated, packed for oneDNN when bf16."""

    qkv: torch.Tensor | AmxWeight
    qkv_bias: torch.Tensor | None
    o: torch.Tensor | AmxWeight
    gate_up: torch.Tensor | AmxWeight
    down: torch.Tensor | AmxWeight
    norm1: torch.Tensor
    norm2: torch.Tensor
    q_norm: torch.Tensor | None  # Qwen3: RMSNorm over each head's dimensions, before rotary
    k_norm: torch.Tensor | None


class FastForward:
    """``forward(ids, mask, pos, cache)``: the model's last-position logits ``[B, V]``, updating
    ``cache`` (an ``EngineCache``) as the model's own forward would. Call :meth:`refresh` after
    the model's weights change. ``native=False``: no C kernel (the torch ops, bit for bit)."""

    def __init__(self, model: Any, *, pack: bool = True, native: bool = True):
        if not supports(model):
            raise ValueError(f"FastForward does not support {type(model).__name__} with this config")
        self.model = model
        config = model.config
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.intermediate = int(config.intermediate_size)
        self.eps = float(config.rms_norm_eps)
        self.qk_norm = type(model).__name__ == "Qwen3ForCausalLM"  # RMSNorm over each q and k head
        self.scale = float(model.model.layers[0].self_attn.scaling)
        # decode attention folds the scale into its matmul, exact only for a power of two (head_dim 64: 1/8)
        self.exact_scale = self.scale > 0 and math.frexp(self.scale)[0] == 0.5
        self.packed = pack and can_pack(model)
        # the C kernel for decode attention (rlft.kernels), where it compiled here and fits the model
        dtype = next(model.parameters()).dtype
        self.kernel = (decode_attention_kernel() if native and DecodeAttention.handles(self.head_dim, dtype)
                       else None)
        self.ops = layer_ops_kernels() if native and LayerOps.handles(self.head_dim, dtype) else None
        # the linear layers on AMX tiles (rlft.kernels.amx_linear) where it built here: packed in its layout
        self.amx = amx_linear_kernel() if native and self.packed else None
        self.layers: list[_Weights] = []
        self._stacks: dict[int, dict[str, torch.Tensor]] = {}  # not packed: the tensors the modules' weights view
        self.head: torch.Tensor | AmxWeight | None = None
        self.refresh()

    @torch.no_grad()
    def refresh(self, weight_of: Callable[[torch.nn.Module], torch.Tensor] | None = None) -> None:
        """(Re)build the concatenated (and packed) weights from the model's current ones. Packed
        only: ``weight_of(linear)`` gives each linear's weight instead of ``linear.weight``, for a
        model that does not hold them (a merged LoRA copy computes ``W + BA`` layer by layer, so
        only one layer's plain weights exist at a time; ``rlft.engines.lora_merge``)."""
        if weight_of is not None and not self.packed:
            raise ValueError("weight_of needs packed weights: unpacked, the modules' weights are the fused ones")
        weight_of = weight_of or _own_weight
        layers = []
        for layer in self.model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
            layers.append(_Weights(
                qkv=self._fused(qkv, "weight", weight_of),
                qkv_bias=self._fused(qkv, "bias", weight_of) if all(m.bias is not None for m in qkv) else None,
                o=self._pack(weight_of(attn.o_proj)),
                gate_up=self._fused([mlp.gate_proj, mlp.up_proj], "weight", weight_of),
                down=self._pack(weight_of(mlp.down_proj)),
                norm1=layer.input_layernorm.weight, norm2=layer.post_attention_layernorm.weight,
                q_norm=attn.q_norm.weight if self.qk_norm else None,
                k_norm=attn.k_norm.weight if self.qk_norm else None,
            ))
        self.layers = layers
        self.head = self._pack(weight_of(self.model.lm_head))

    def _pack(self, weight: torch.Tensor) -> torch.Tensor | AmxWeight:
        w = weight.detach()
        if self.amx is not None and self.amx.handles(w):
            return self.amx.pack(w)
        return torch.ops.mkldnn._reorder_linear_weight(w, batch_size=_ROWS_HINT) if self.packed else w

    def _fused(self, linears: list[torch.nn.Linear], name: str,
               weight_of: Callable[[torch.nn.Module], torch.Tensor]) -> torch.Tensor | AmxWeight:
        """``linears``' weights (``weight_of`` each) or biases stacked along their outputs. Packed: a
        packed copy. Not packed: one tensor whose row blocks the modules' parameters then are, so
        there is no second copy and loading new weights into the modules (``sync_weights``) writes it."""
        if self.packed and name == "weight":
            return self._pack(torch.cat([weight_of(m).detach() for m in linears]))
        params = [getattr(m, name) for m in linears]
        if self.packed:
            return torch.cat([p.detach() for p in params])
        rows = [p.shape[0] for p in params]
        stacked = self._stacks.get(id(linears[0]), {}).get(name)
        if stacked is not None and all(p.data_ptr() == stacked[at:at + n].data_ptr() and p.is_contiguous()
                                       for p, at, n in zip(params, _offsets(rows), rows)):
            return stacked  # the modules' parameters are still the views an earlier refresh made
        stacked = torch.cat([p.detach() for p in params])
        for p, part in zip(params, stacked.split(rows)):
            p.data = part
        self._stacks.setdefault(id(linears[0]), {})[name] = stacked
        return stacked

    def _linear(self, x: torch.Tensor, w: torch.Tensor | AmxWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(w, AmxWeight):
            return self.amx.linear(x, w, bias)
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
        return F.linear(x, w, bias)

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # LlamaRMSNorm's roundings: normalise in float32, round to the input dtype, then scale
        xf = x.to(torch.float32, copy=True)
        var = xf.pow(2).mean(-1, keepdim=True)
        xf.mul_(torch.rsqrt(var.add_(self.eps)))
        return weight * xf.to(x.dtype)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any) -> torch.Tensor:
        """``ids``/``pos`` [B, q] (new tokens and their positions), ``mask`` [B, L] bool over the
        cache's slots after this step (``L`` = cached + q; False = padding), ``cache`` the engine's
        KV cache. Returns the last position's logits [B, V] in the model's dtype. No autograd: call
        it under ``torch.inference_mode()`` (the engine's scheduler does)."""
        B, q = ids.shape
        H, KV, D = self.heads, self.kv_heads, self.head_dim
        base = self.model.model
        h = F.embedding(ids, base.embed_tokens.weight)  # [B, q, hidden]
        cos, sin = base.rotary_emb(h, pos)  # [B, q, D] in the model's dtype
        half = D // 2
        # rotate_half(x) * sin == swap_halves(x) * [-sin_1, sin_2]: the same products, negated exactly
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        attn_mask = _attention_mask(mask, q)
        mask = mask.contiguous()
        biases: dict[int, torch.Tensor] = {}  # decode steps: the additive mask per buffer capacity
        modules = base.layers
        norms = [w.norm1 for w in self.layers[1:]] + [base.norm.weight]  # the norm after each layer
        x = self._add_rms_norm(h, None, self.layers[0].norm1)
        for i, w in enumerate(self.layers):
            qkv = self._linear(x, w.qkv, w.qkv_bias).view(B, q, H + 2 * KV, D)
            qk, v = qkv[:, :, :H + KV], qkv[:, :, H + KV:]
            if w.q_norm is not None:  # Qwen3: norms over each head, then rotary
                qk = torch.cat([self._rms_norm(qk[:, :, :H], w.q_norm), self._rms_norm(qk[:, :, H:], w.k_norm)], 2)
            qk = self._rotary_(qk, cos, sin)  # in place: a slice of this step's own qkv (or the cat above)
            query = qk[:, :, :H].transpose(1, 2)  # [B, H, q, D]
            layer = cache.layers[i]
            key, value = layer.update(qk[:, :, H:].transpose(1, 2), v.transpose(1, 2))
            whole = q == 1 and layer.kbuf.is_contiguous() and layer.vbuf.is_contiguous()
            if whole and self.kernel is not None:
                out = self.kernel(qk[:, 0, :H], layer.kbuf, layer.vbuf, mask, self.scale)
            elif whole and self.exact_scale:
                out = self._decode_attention(query, layer.kbuf, layer.vbuf, mask, biases)
            else:
                out, _ = rlft_attention(modules[i].self_attn, query, key, value, attn_mask, scaling=self.scale)
            x = self._add_rms_norm(h, self._linear(out.view(B, q, H * D), w.o), w.norm2)
            act = self._silu_mul(self._linear(x, w.gate_up))
            x = self._add_rms_norm(h, self._linear(act, w.down), norms[i])
        return self._linear(x[:, -1], self.head)

    def _add_rms_norm(self, h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
        """``h += delta`` in place (the residual stream is this forward's own), then the RMSNorm."""
        if self.ops is not None:
            return self.ops.add_rms_norm(h, delta, weight, self.eps)
        if delta is not None:
            h.add_(delta)
        return self._rms_norm(h, weight)

    def _rotary_(self, qk: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding on ``qk`` [B, q, heads, D] in place; ``cos``/``signed_sin`` [B, q, D]."""
        if self.ops is not None:
            return self.ops.rotary_(qk, cos, signed_sin)
        B, q, heads, D = qk.shape
        swapped = qk.view(B, q, heads, 2, D // 2).flip(3).view(B, q, heads, D).mul_(signed_sin[:, :, None])
        return qk.mul_(cos[:, :, None]).add_(swapped)

    def _silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.ops is not None:
            return self.ops.silu_mul(gate_up)
        return F.silu(gate_up[..., :self.intermediate]).mul_(gate_up[..., self.intermediate:])

    def _decode_attention(self, query: torch.Tensor, kbuf: torch.Tensor, vbuf: torch.Tensor, mask: torch.Tensor,
                          biases: dict[int, torch.Tensor]) -> torch.Tensor:
        """One query per row over the cache's whole buffers ``[B, KV, cap, D]`` (slots not written
        yet masked, as ``rlft.attention`` does): ``softmax(q k^T * scale + bias) v`` in four ops
        instead of ~10. The same numbers as ``rlft_attention``: the scale is a power of two (exact
        in the matmul's output), and the masked scores' exponentials are 0 either way (checked at
        every cache length by the tests)."""
        B, KV, cap, D = kbuf.shape
        G = self.heads // KV
        bias = biases.get(cap)
        if bias is None:
            full = torch.full((B, cap), torch.finfo(kbuf.dtype).min, dtype=kbuf.dtype, device=kbuf.device)
            full[:, :mask.shape[1]].masked_fill_(mask, 0.0)
            bias = biases[cap] = full[:, None, None].expand(B, KV, G, cap).reshape(B * KV, G, cap)
        scores = torch.baddbmm(bias, query.reshape(B * KV, G, D), kbuf.view(B * KV, cap, D).transpose(1, 2),
                               alpha=self.scale)
        # softmax in float32, then rounded: a bf16 softmax differs in the last bit at some lengths (54, 57, ...)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(vbuf.dtype)
        return torch.bmm(probs, vbuf.view(B * KV, cap, D))  # [B * KV, G, D]

    __call__ = forward


def _own_weight(linear: torch.nn.Module) -> torch.Tensor:
    return linear.weight


def _offsets(sizes: list[int]) -> list[int]:
    out, at = [], 0
    for n in sizes:
        out.append(at)
        at += n
    return out


def _attention_mask(mask: torch.Tensor, q: int) -> torch.Tensor:
    """The sdpa-format boolean mask [B, 1, q, L] that transformers builds for the same call:
    slot ``j`` is visible to the query in slot ``L - q + i`` when it is real and ``j <= L - q + i``."""
    L = mask.shape[1]
    if q == 1:
        return mask[:, None, None, :]
    causal = torch.ones(q, L, dtype=torch.bool, device=mask.device).tril(L - q)
    return mask[:, None, None, :] & causal[None, None]

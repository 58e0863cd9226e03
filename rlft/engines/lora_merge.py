"""A plain copy of a LoRA (peft) model with the adapters merged in, for fast sampling.

Sampling through peft runs two extra small matmuls, a dropout and dtype casts per adapted
linear layer at every decode step: on SmolLM2-135M (bf16, LoRA on all 7 projections, batch
64) that halved the engine's tokens/s. :class:`MergedCopy` keeps a copy of the base model
whose adapted weights hold ``W + scale * B @ A`` (computed in float32, stored in the engine's
dtype), built once and refreshed after every optimizer step by :meth:`MergedCopy.refresh`:
each refresh recomputes from the trainer's own unmerged base weights, so rounding never
accumulates.

Memory: only the adapted weights are the copy's own. Everything LoRA leaves frozen (the
embeddings and a head tied to them, the norms) is the source's tensor itself wherever dtype and
device match (on SmolLM2 that is the 57 MB embedding table not copied). A caller that keeps the
merged weights in a form of its own (the engine's packed fast forward, ``rlft.engines.hf``) calls
:meth:`MergedCopy.drop_weights` and takes fresh values from :meth:`MergedCopy.weight` at each
sync, so the adapted linears' plain ``W + BA`` (212 MB on SmolLM2) is not held at all (an adapted
embedding stays in the copy, merged).
Left out: LoRA variants without an additive delta (peft raises for those on merge), and
peft's ``modules_to_save`` (fully trained extra modules: rlft's LoraSpec does not use them).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from rlft.engines.weight_copy import cast_parameters

__all__ = ["MergedCopy", "is_lora_model"]


def is_lora_model(model: Any) -> bool:
    """A peft model with LoRA layers (anything ``MergedCopy`` can merge)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft not installed: nothing here is a LoRA model
        return False
    return hasattr(model, "get_base_model") and any(isinstance(m, LoraLayer) for m in model.modules())


class MergedCopy:
    """``model``: the merged plain copy (``requires_grad`` off), in ``dtype`` (None: the base's)."""

    def __init__(self, peft_model: Any, dtype: torch.dtype | None = None, device: Any = None):
        from peft.tuners.lora import LoraLayer

        self.source = peft_model
        base = peft_model.get_base_model()
        # the source's LoRA layers by their path inside the base model ("model.layers.0.mlp.up_proj")
        self._layers = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
        merged = copy.deepcopy(peft_model).merge_and_unload()
        merged.requires_grad_(False)
        cast_parameters(merged, device=device, dtype=dtype)
        _share_frozen(merged, base, adapted=set(self._layers))
        self.model = merged.eval()
        self._targets = {name: merged.get_submodule(name) for name in self._layers}
        self._names = {target: name for name, target in self._targets.items()}  # modules hash by identity
        first = next(iter(self._targets.values())).weight
        self.dtype, self.device = first.dtype, first.device
        self._dropped: set[str] = set()  # adapted linears whose plain weights drop_weights freed
        self.refresh()

    @torch.no_grad()
    def weight(self, module: torch.nn.Module) -> torch.Tensor:
        """``module``'s current weight: for one of the copy's adapted linears ``W + delta`` computed
        from the source now (a new tensor in the copy's dtype and device), for any other module of
        the copy its own (frozen) weight."""
        name = self._names.get(module)
        if name is None:
            return module.weight
        return self._merged_weight(self._layers[name]).to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def refresh(self, source: Any = None) -> None:
        """Copy the source's current adapted weights in (``W + delta``); the rest is frozen. The
        linears :meth:`drop_weights` freed have nothing to copy into: their callers read :meth:`weight`.
        ``source``: None or the model the copy was built from (its frozen tensors are shared)."""
        if source is not None and source is not self.source:
            raise ValueError("this engine merges the LoRA model it was built from; it cannot sync from another")
        for name, target in self._targets.items():
            if name not in self._dropped:
                target.weight.copy_(self.weight(target))

    @property
    def dropped(self) -> bool:
        return bool(self._dropped)

    def drop_weights(self) -> None:
        """Free the adapted linears' weights, for a caller that keeps them in a form of its own (an
        adapted embedding stays: a forward looks its rows up). They become meta tensors of the same
        shape and dtype, so a forward through those modules fails loudly instead of computing with
        stale or missing weights."""
        for name, target in self._targets.items():
            if isinstance(target, torch.nn.Linear):
                target.weight = torch.nn.Parameter(torch.empty_like(target.weight, device="meta"),
                                                   requires_grad=False)
                self._dropped.add(name)

    @staticmethod
    def _merged_weight(layer: Any) -> torch.Tensor:
        """``W + delta`` of one source LoRA layer, in float32 (the sum rounds once, in the caller's cast)."""
        from rlft.distributed import full_tensor

        # a source sharded by FSDP2 holds DTensor shards: full_tensor gathers each (every rank
        # refreshes its own copy, in the same order)
        w = full_tensor(layer.get_base_layer().weight).float()
        for adapter in layer.active_adapters:
            if adapter in getattr(layer, "lora_A", {}) or adapter in getattr(layer, "lora_embedding_A", {}):
                w = w + full_tensor(layer.get_delta_weight(adapter)).float()
        return w


def _share_frozen(merged: torch.nn.Module, base: torch.nn.Module, adapted: set[str]) -> None:
    """Point ``merged``'s parameters outside the ``adapted`` modules at ``base``'s own tensors
    where nothing trains them (``requires_grad`` off in the source), they are whole (not FSDP2
    shards), and dtype, device and shape match: the copy then holds no second embedding table.
    New Parameter objects over the same storage, so nothing done to the copy's parameters (their
    ``requires_grad``, a ``.to()``) reaches the source's."""
    for module_name, module in merged.named_modules():
        if module_name in adapted:
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            try:
                source = base.get_parameter(f"{module_name}.{name}" if module_name else name)
            except AttributeError:
                continue
            if (source.requires_grad or type(source.data) is not torch.Tensor or source.dtype != param.dtype
                    or source.device != param.device or source.shape != param.shape):
                continue
            setattr(module, name, torch.nn.Parameter(source.detach(), requires_grad=False))

"""An engine's own copy of the trainer's weights, and the protocol both kinds of copy follow.

The in-process engine samples from a copy of the model when it cannot run the trainer's module
itself: a bf16 copy of a float32 full finetune, a copy that overlap samples from while the trainer
steps, a copy beside FSDP2 shards (:class:`PlainCopy`), or a LoRA model's adapters merged into
the base (:class:`rlft.engines.lora_merge.MergedCopy`). Each sync refreshes the copy from the
trainer's current weights.

Memory: once the engine's fast forward holds the decoder's linear weights packed for oneDNN
(``rlft.engines.fast_forward``), the copy's plain linear weights are never read again, so
:meth:`EngineCopy.drop_weights` frees them and each sync packs from :meth:`EngineCopy.weight`,
one layer at a time. On SmolLM2-135M that is 212 MB of the copy's 269 MB (bf16); the embeddings
and norms stay (the fast forward reads them as they are, and a tied head is the embedding).
Left out: a plain copy shares nothing with its source (in a full finetune every tensor trains).
"""

from __future__ import annotations

import collections
import copy
from typing import Any, Protocol

import torch

__all__ = ["EngineCopy", "PlainCopy", "cast_parameters"]


class EngineCopy(Protocol):
    """What the engine needs of its copy: the module it samples from, refreshed by each sync."""

    model: torch.nn.Module

    def refresh(self, source: Any = None) -> None:
        """Take the trainer's current weights from ``source`` (None: the model the copy was built from)."""

    def weight(self, module: torch.nn.Module) -> torch.Tensor:
        """``module``'s current weight, for a module of the copy whose own weight was dropped (any other: its own)."""

    def drop_weights(self) -> None:
        """Free the plain weights of the linears a packed fast forward holds in its own form."""

    @property
    def dropped(self) -> bool:
        """Whether :meth:`drop_weights` freed anything (the caller then reads :meth:`weight`)."""


class PlainCopy:
    """``model``: ``source`` deep-copied, parameters cast to ``dtype`` (None: as they are; buffers
    keep their dtypes, see ``cast_parameters``) and moved to ``device``."""

    def __init__(self, source: torch.nn.Module, *, dtype: torch.dtype | None = None, device: Any = None):
        self.source = source
        self.model = copy.deepcopy(source)
        cast_parameters(self.model, device=device, dtype=dtype)
        self.model.requires_grad_(False)
        first = next(self.model.parameters())
        self.dtype, self.device = first.dtype, first.device
        self._names = {module: name for name, module in self.model.named_modules()}  # modules hash by identity
        self._dropped: set[str] = set()  # the linears whose plain weights drop_weights freed, by module name

    @torch.no_grad()
    def refresh(self, source: Any = None) -> None:
        """Copy ``source``'s parameters in, all but the freed linear weights (the caller packs those
        from :meth:`weight`). Matched by name: an FSDP2-sharded source keeps its parameter names
        and each shard is gathered in turn (a collective: every rank refreshes its own copy in the
        same order)."""
        from rlft.distributed import full_tensor

        if source is not None:
            self.source = source
        params = dict(self.source.named_parameters())
        for name, param in self.model.named_parameters():
            if name.removesuffix(".weight") not in self._dropped:
                param.copy_(full_tensor(params[name]))

    @torch.no_grad()
    def weight(self, module: torch.nn.Module) -> torch.Tensor:
        name = self._names[module]
        if name not in self._dropped:
            return module.weight
        from rlft.distributed import full_tensor

        return full_tensor(self.source.get_parameter(f"{name}.weight")).to(device=self.device, dtype=self.dtype)

    @property
    def dropped(self) -> bool:
        return bool(self._dropped)

    def drop_weights(self) -> None:
        """Free every linear's weight but one another module shares (a head tied to the embedding,
        which a forward reads as the table). They become meta tensors of the same shape and dtype:
        a forward through those modules fails loudly instead of computing with stale weights."""
        owners = collections.Counter(id(p) for _, p in self.model.named_parameters(remove_duplicate=False))
        for name, module in self.model.named_modules():
            if isinstance(module, torch.nn.Linear) and owners[id(module.weight)] == 1:
                module.weight = torch.nn.Parameter(torch.empty_like(module.weight, device="meta"), requires_grad=False)
                self._dropped.add(name)


def cast_parameters(model: torch.nn.Module, *, device: Any = None, dtype: torch.dtype | None = None) -> None:
    """``model.to(device, dtype)`` in place, with the dtype for its parameters only: buffers keep
    theirs. transformers keeps the rotary ``inv_freq`` in float32 in a bf16 model, and the trainer
    computes with the source's; ``.to(torch.bfloat16)`` would round it and move every position's
    angle (a logprob gap between sampler and trainer)."""
    if device is not None:
        model.to(device=device)
    if dtype is not None:
        for param in model.parameters():
            param.data = param.data.to(dtype)

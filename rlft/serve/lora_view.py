"""A LoRA adapter served as a view of a loaded base model, built without peft (``rlft serve``).

A view is a copy of the base's module tree that shares every base tensor (:func:`sharing_copy`),
in which each linear layer the adapter holds weights for is replaced by a :class:`LoraLinear`:
that same base layer plus the adapter's ``A`` and ``B``, read straight from
``adapter_model.safetensors``. Building one costs the module copy and reading the small file: a
new adapter's whole load took 0.06-0.15 s on SmolLM2-135M with r16 on every projection, where
peft's load path (it wraps every targeted layer in its own adapter machinery) took 0.3-2 s on
the same shared 2-core CPU (``benchmarks/README.md``). Nothing of the base is re-read,
de-quantised or re-packed.

The arithmetic is peft's, operation for operation, so a view's logits equal peft's for the same
adapter: the adapter weights in float32 under a bf16/fp16 base (peft's default
``autocast_adapter_dtype``; the base's dtype otherwise), the layer input cast to them,
``B(A(x)) * scaling`` added to the base layer's output and the sum cast back to its dtype.
``scaling`` is ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).

Left out, for peft's load path (:func:`why_not_plain` says which applies): anything beyond plain
LoRA on linear layers: DoRA, per-module rank or alpha patterns, LoRA on embeddings or
convolutions, LoRA biases, ``modules_to_save``, trainable tokens, other peft methods, and
adapters saved as ``.bin``.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LoraLinear", "lora_view", "sharing_copy", "why_not_plain"]

WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # peft's saved keys: base_model.model.<module path>.lora_{A,B}.weight
# adapter_config.json keys that may hold a non-empty value in a plain LoRA: they pick which layers
# get an adapter (the saved weights already say), set its initial values, or only describe it
_PLAIN_KEYS = frozenset({
    "base_model_name_or_path", "revision", "peft_type", "peft_version", "task_type", "inference_mode", "auto_mapping",
    "r", "lora_alpha", "use_rslora", "lora_dropout", "bias", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern", "init_lora_weights", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "megatron_core", "qalora_group_size",
})


def sharing_copy(model: Any) -> Any:
    """A copy of ``model``'s module tree whose parameters and buffers are ``model``'s own tensors."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


class LoraLinear(nn.Module):
    """``base_layer(x) + B(A(x)) * scaling``, computed as peft's LoRA ``Linear`` computes it (see
    the module docstring); ``base_layer`` is the base model's own layer, shared."""

    def __init__(self, base_layer: nn.Linear, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.Parameter(lora_A, requires_grad=False)  # [r, in]
        self.lora_B = nn.Parameter(lora_B, requires_grad=False)  # [out, r]
        self.scaling = float(scaling)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:  # model code that reads a projection's weight (its dtype) gets the base's
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        update = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B) * self.scaling
        return (out + update).to(out.dtype)

    def extra_repr(self) -> str:
        return f"r={self.lora_A.shape[0]}, scaling={self.scaling:g}"


def why_not_plain(config: dict[str, Any], adapter_dir: str) -> str | None:
    """Why the adapter in ``adapter_dir`` (its ``adapter_config.json`` as ``config``) needs peft's
    load path; None when it is plain LoRA on linear layers that :func:`lora_view` serves."""
    if config.get("peft_type") != "LORA":
        return f"peft_type {config.get('peft_type')!r}"
    if config.get("bias", "none") != "none":
        return f"bias {config['bias']!r}"
    if not os.path.isfile(os.path.join(adapter_dir, WEIGHTS_FILE)):
        return f"no {WEIGHTS_FILE}"
    extra = sorted(k for k, v in config.items() if k not in _PLAIN_KEYS and v not in (None, False, "", {}, []))
    return f"{', '.join(extra)} set" if extra else None


def lora_view(base_model: nn.Module, adapter_dir: str, config: dict[str, Any]) -> nn.Module:
    """A view of ``base_model`` carrying the plain LoRA adapter in ``adapter_dir`` (``config``: its
    ``adapter_config.json``; check :func:`why_not_plain` first). A ValueError names the file and
    key when the weights do not fit the base or the config."""
    from safetensors.torch import load_file

    path = os.path.join(adapter_dir, WEIGHTS_FILE)
    weights = load_file(path)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        module, dot, kind = key.removeprefix(_PREFIX).rpartition(".lora_")
        if not (key.startswith(_PREFIX) and dot and kind in ("A.weight", "B.weight")):
            raise ValueError(f"{path}: key {key!r} is not a LoRA weight of a linear layer "
                             f"(expected {_PREFIX}<module>.lora_A.weight / .lora_B.weight)")
        pairs.setdefault(module, {})[kind[0]] = tensor
    rank = int(config["r"])
    scaling = float(config["lora_alpha"]) / (math.sqrt(rank) if config.get("use_rslora") else rank)
    view = sharing_copy(base_model)
    base_dtype = next(base_model.parameters()).dtype
    dtype = torch.float32 if base_dtype in (torch.bfloat16, torch.float16) else base_dtype  # as peft keeps them
    for name, ab in pairs.items():
        try:
            layer = view.get_submodule(name)
        except AttributeError:
            layer = None
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"{path}: {name!r} is not a linear layer of the base model "
                             f"({type(layer).__name__ if layer is not None else 'no such module'})")
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{path}: {name!r} has lora_{''.join(ab)} but not its pair")
        lora_A, lora_B = ab["A"], ab["B"]
        if lora_A.shape != (rank, layer.in_features) or lora_B.shape != (layer.out_features, rank):
            raise ValueError(f"{path}: {name!r} holds A {tuple(lora_A.shape)} and B {tuple(lora_B.shape)}; r={rank} "
                             f"on this base layer needs A {(rank, layer.in_features)} and B "
                             f"{(layer.out_features, rank)}")
        device = layer.weight.device
        parent, _, child = name.rpartition(".")
        setattr(view.get_submodule(parent) if parent else view, child,
                LoraLinear(layer, lora_A.to(device, dtype), lora_B.to(device, dtype), scaling))
    return view.eval()

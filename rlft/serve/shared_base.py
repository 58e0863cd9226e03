"""Base models loaded once for ``rlft serve``, shared by every LoRA adapter served on them.

Loading a base is the slow part of serving an adapter (SmolLM2's GGUF is read and de-quantised:
~14 s on a 2-core CPU) and its weights the large part of its memory. :class:`BaseModels` loads
each base once (keyed by the resolved model and GGUF file) and serves an adapter as a *view* of
it: the module tree is copied with every parameter and buffer shared (:func:`sharing_copy`: no
tensor is copied), and peft wraps that copy's linear layers with the adapter's LoRA weights. So a
new adapter version (a new checkpoint of a run, ``/v1/load_lora_adapter``) costs its own small
weights and a module copy (well under a second, ``benchmarks/serve_adapter_switch.py``), every
adapter of a base holds the one copy of its weights, and each still gets its own batched engine,
so requests to different adapters run concurrently. The base weights are never written (LoRA
layers only add their product), so sharing them is safe while every view samples.

Bases stay loaded while the server runs (one copy each, however many adapters come and go).
Left out: full-finetune checkpoints (their weights are their own; ``load_policy`` loads them) and
batching requests of different adapters into one forward pass (multi-LoRA kernels).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import threading
from typing import Any

from rlft.policy import POLICY_META_FILE, LoraSpec, Policy, load_policy

__all__ = ["BaseModels", "is_lora_dir", "sharing_copy"]


def is_lora_dir(path: str) -> bool:
    """Whether ``path`` is a LoRA adapter directory (peft's ``adapter_config.json``)."""
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def sharing_copy(model: Any) -> Any:
    """A copy of ``model``'s module tree whose parameters and buffers are ``model``'s own tensors."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


class BaseModels:
    """Bases loaded once per ``(model, gguf file)`` in ``dtype`` on ``device``; thread-safe (the
    registry loads in worker threads)."""

    def __init__(self, dtype: Any, device: Any):
        self.dtype, self.device = dtype, device
        self._bases: dict[tuple[str, str | None], Policy] = {}
        self._locks: dict[tuple[str, str | None], threading.Lock] = {}
        self._lock = threading.Lock()
        self._templates: dict[tuple, Any] = {}  # (base, LoRA layout) -> a PeftModel view whose LoRA weights are copied
        self._tokenizers: dict[str, Any] = {}  # hash of the saved tokenizer files -> tokenizer

    def base(self, model: str, gguf_file: str | None = None) -> Policy:
        """The loaded base (loaded on first use; every caller gets the same Policy)."""
        from rlft.model_source import resolve_model

        key = resolve_model(os.fspath(model), gguf_file)
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:  # one load per base, while other bases load in parallel
            if key not in self._bases:
                self._bases[key] = load_policy(model, gguf_file=gguf_file, dtype=self.dtype, device=self.device)
            return self._bases[key]

    def adapter(self, adapter_dir: str, default_base: str | None = None) -> Policy:
        """The LoRA adapter in ``adapter_dir`` on its base, sharing the base's weights. The base is
        the one its ``rlft_policy.json`` records (an rlft checkpoint), else ``default_base`` (a plain
        peft adapter put on the served model), else its ``adapter_config.json``'s."""
        meta: dict[str, Any] = {}
        if os.path.isfile(os.path.join(adapter_dir, POLICY_META_FILE)):
            with open(os.path.join(adapter_dir, POLICY_META_FILE)) as f:
                meta = json.load(f)
        base_name, gguf = meta.get("base_model"), None
        if base_name and not str(base_name).lower().endswith(".gguf"):
            gguf = meta.get("gguf_file")
        if not base_name:
            base_name = default_base
        if not base_name:
            with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
                base_name = json.load(f).get("base_model_name_or_path")
        if not base_name:
            raise FileNotFoundError(f"{adapter_dir} holds a LoRA adapter that names no base model")
        base = self.base(base_name, gguf)
        model = self._view(base, adapter_dir)
        spec = LoraSpec(**meta["lora"]) if meta.get("lora") else None
        return Policy(model=model, tokenizer=self._tokenizer(base, adapter_dir), is_lora=True, source=base.source,
                      gguf_file=base.gguf_file, dtype=base.dtype, lora=spec)

    def _view(self, base: Policy, adapter_dir: str) -> Any:
        """A PeftModel of ``adapter_dir`` over ``base``'s shared tensors. peft builds the LoRA layers
        once per base and LoRA layout (~1 s: it walks and wraps every linear layer); each adapter
        after that is a copy of that template (base tensors shared, LoRA tensors copied) with the
        adapter's weights loaded into it (~0.1 s on SmolLM2)."""
        from peft import PeftModel
        from peft.utils import load_peft_weights, set_peft_model_state_dict

        with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
            layout = {k: v for k, v in json.load(f).items() if k not in _NOT_LAYOUT}
        key = (id(base), json.dumps(layout, sort_keys=True, default=str))
        with self._lock:
            template = self._templates.get(key)
        if template is None:
            # low_cpu_mem_usage: LoRA weights created empty, then filled from the file (no random init)
            template = PeftModel.from_pretrained(sharing_copy(base.model), adapter_dir, low_cpu_mem_usage=True)
            template.eval()
            with self._lock:
                self._templates[key] = template
        memo = {id(t): t for t in itertools.chain(base.model.parameters(), base.model.buffers())}
        model = copy.deepcopy(template, memo)
        result = set_peft_model_state_dict(model, load_peft_weights(adapter_dir, device=str(base.device)))
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing or result.unexpected_keys:
            raise ValueError(f"{adapter_dir}: adapter weights do not fit its adapter_config.json "
                             f"(missing {missing[:3]}, unexpected {list(result.unexpected_keys)[:3]})")
        return model.eval()

    def _tokenizer(self, base: Policy, adapter_dir: str) -> Any:
        """The tokenizer saved with the adapter (it carries the chat template the run used), loaded
        once per distinct set of files (every checkpoint of a run has the same); else the base's."""
        files = [os.path.join(adapter_dir, n) for n in _TOKENIZER_FILES]
        if not os.path.isfile(files[0]):
            return base.tokenizer
        digest = hashlib.sha256()
        for path in files:
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    digest.update(os.path.basename(path).encode() + b"\0" + f.read())
        key = digest.hexdigest()
        with self._lock:
            tokenizer = self._tokenizers.get(key)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
            if not getattr(tokenizer, "chat_template", None):
                tokenizer.chat_template = base.tokenizer.chat_template
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            with self._lock:
                tokenizer = self._tokenizers.setdefault(key, tokenizer)
        return tokenizer


# adapter_config.json fields that do not change the LoRA layers' shapes and places
_NOT_LAYOUT = ("base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping")
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "chat_template.jinja", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "tokenizer.model")

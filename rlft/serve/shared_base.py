"""Base models loaded once for ``rlft serve``, shared by every LoRA adapter served on them.

Loading a base is the slow part of serving an adapter (SmolLM2's GGUF is read and de-quantised:
~14 s on a 2-core CPU) and its weights the large part of its memory. :class:`BaseModels` loads
each base once (keyed by the resolved model and GGUF file) and serves an adapter as a *view* of
it: the module tree is copied with every parameter and buffer shared (:func:`sharing_copy`: no
tensor is copied), and the adapter's layers are put into that copy: a plain LoRA (what rlft
trains) as :class:`~rlft.serve.lora_view.LoraLinear` layers read straight from its safetensors
file (``rlft.serve.lora_view``), any other peft adapter through peft's load path. So a new
adapter version (a new checkpoint of a run, ``/v1/load_lora_adapter``) costs its own small
weights and a module copy (0.06-0.15 s on SmolLM2, ``benchmarks/bench_serve_adapters.py``), every
adapter of a base holds the one copy of its weights, and each still gets its own batched engine,
so requests to different adapters run concurrently. The base weights are never written (LoRA
layers only add their product), so sharing them is safe while every view samples.

Bases stay loaded while the server runs (one copy each, however many adapters come and go).
Left out: full-finetune checkpoints (their weights are their own; ``load_policy`` loads them) and
batching requests of different adapters into one forward pass (multi-LoRA kernels).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from typing import Any

from rlft.policy import POLICY_META_FILE, LoraSpec, Policy, load_policy
from rlft.serve.lora_view import lora_view, sharing_copy, why_not_plain

__all__ = ["BaseModels", "is_lora_dir", "sharing_copy"]


def is_lora_dir(path: str) -> bool:
    """Whether ``path`` is a LoRA adapter directory (peft's ``adapter_config.json``)."""
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


class BaseModels:
    """Bases loaded once per ``(model, gguf file)`` in ``dtype`` on ``device``; thread-safe (the
    registry loads in worker threads)."""

    def __init__(self, dtype: Any, device: Any):
        self.dtype, self.device = dtype, device
        self._bases: dict[tuple[str, str | None], Policy] = {}
        self._locks: dict[tuple[str, str | None], threading.Lock] = {}
        self._lock = threading.Lock()
        self._tokenizers: dict[str, Any] = {}  # hash of the saved tokenizer files -> tokenizer

    def base(self, model: str, gguf_file: str | None = None) -> Policy:
        """The loaded base (loaded on first use; every caller gets the same Policy)."""
        from rlft.model_source import resolve_model

        key = resolve_model(os.fspath(model), gguf_file)
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:  # one load per base, while other bases load in parallel
            if key not in self._bases:
                base = load_policy(model, gguf_file=gguf_file, dtype=self.dtype, device=self.device)
                self._know_tokenizer(base.tokenizer)
                self._bases[key] = base
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
        model, is_peft = self._view(base, adapter_dir)
        spec = LoraSpec(**meta["lora"]) if meta.get("lora") else None
        # is_lora says the model is a PeftModel; a lora_view is the base's own class with LoRA layers in it
        return Policy(model=model, tokenizer=self._tokenizer(base, adapter_dir), is_lora=is_peft, source=base.source,
                      gguf_file=base.gguf_file, dtype=base.dtype, lora=spec)

    def _view(self, base: Policy, adapter_dir: str) -> tuple[Any, bool]:
        """``(model, is peft's)``: the adapter in ``adapter_dir`` over ``base``'s shared tensors.
        Plain LoRA (what rlft trains) is a :func:`~rlft.serve.lora_view.lora_view`; anything else
        goes through peft's load path on a sharing copy (peft wraps every targeted layer: main's
        first-adapter load, which took this path, was 1.0-2.0 s on SmolLM2 r16)."""
        with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
            config = json.load(f)
        if why_not_plain(config, adapter_dir) is None:
            return lora_view(base.model, adapter_dir, config), False
        from peft import PeftModel

        # low_cpu_mem_usage: LoRA weights created empty, then filled from the file (no random init)
        model = PeftModel.from_pretrained(sharing_copy(base.model), adapter_dir, low_cpu_mem_usage=True)
        return model.eval(), True

    def _tokenizer(self, base: Policy, adapter_dir: str) -> Any:
        """The tokenizer saved with the adapter (it carries the chat template the run used), loaded
        once per distinct set of files (every checkpoint of a run has the same; the files a base's own
        tokenizer saves give that tokenizer, :meth:`_know_tokenizer`); without any, the base's."""
        key = _tokenizer_digest(adapter_dir)
        if key is None:
            return base.tokenizer
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


    def _know_tokenizer(self, tokenizer: Any) -> None:
        """Register a base's tokenizer under the digest of the files it saves (~0.05 s, once per
        base): a checkpoint trained on that base with its tokenizer unchanged saved those same
        files, so its adapter gets this tokenizer and its Renderer, with nothing to load (~0.1-0.3 s
        and ~0.1 s of template probing otherwise, on SmolLM2's first adapter)."""
        try:
            with tempfile.TemporaryDirectory(prefix="rlft-tokenizer-") as tmp:
                tokenizer.save_pretrained(tmp)
                key = _tokenizer_digest(tmp)
        except Exception:  # noqa: BLE001 - a tokenizer that cannot save itself is just not reused: adapters load theirs
            return
        if key is not None:
            with self._lock:
                self._tokenizers.setdefault(key, tokenizer)


def _tokenizer_digest(directory: str) -> str | None:
    """A digest of the tokenizer files saved in ``directory`` (None when it holds none)."""
    files = [os.path.join(directory, n) for n in _TOKENIZER_FILES]
    if not os.path.isfile(files[0]):
        return None
    digest = hashlib.sha256()
    for path in files:
        if os.path.isfile(path):
            with open(path, "rb") as f:
                digest.update(os.path.basename(path).encode() + b"\0" + f.read())
    return digest.hexdigest()


_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "chat_template.jinja", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "tokenizer.model")

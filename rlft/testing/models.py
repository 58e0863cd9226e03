"""Tiny, randomly initialised Llama-style models for tests and offline experiments.

``build_tiny_model()`` gives a ``LlamaForCausalLM`` of a few hundred thousand parameters paired
with the tiny byte-level BPE + ChatML tokenizer of :mod:`rlft.testing.tokenizer`. It is deterministic: the same
arguments give the same weights and the same vocabulary on every machine, and it never touches
the network. ``save_tiny_model(dir)`` writes it so that plain
``AutoModelForCausalLM.from_pretrained(dir)`` / ``AutoTokenizer.from_pretrained(dir)`` (and
:func:`rlft.policy.load_policy`) load it: safetensors weights, config, tokenizer files and the
chat template.

The model is untrained: its outputs are noise. It exists to exercise shapes, caches, batching,
sampling, LoRA and save/load paths in seconds.
"""

from __future__ import annotations

import copy
import os
from typing import Any

__all__ = ["build_tiny_model", "save_tiny_model"]


def build_tiny_model(
    out_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = 2,
    intermediate: int | None = None,
    max_positions: int = 2048,
    init_std: float = 0.02,
    dtype: Any = None,
) -> tuple[Any, Any]:
    """Build ``(model, tokenizer)``: a random ``LlamaForCausalLM`` and the tiny ChatML tokenizer.

    The vocabulary size is the tokenizer's. ``kv_heads`` < ``heads`` gives grouped-query
    attention (as in SmolLM2 and most current models); ``intermediate`` defaults to ``2 * hidden``.
    Weights depend only on the arguments (``seed`` included): the global torch RNG is left
    untouched. With ``out_dir`` the pair is also saved there (see :func:`save_tiny_model`).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    kv_heads = heads if kv_heads is None else kv_heads
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")

    tokenizer = _tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=max_positions,
        initializer_range=init_std,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    if dtype is not None:
        model.to(_torch_dtype(dtype))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    if out_dir is not None:
        _save(model, tokenizer, out_dir)
    return model, tokenizer


_TOKENIZER: Any = None


def _tokenizer() -> Any:
    """The tiny tokenizer, trained once per process (about a second) and copied for each caller."""
    global _TOKENIZER
    from rlft.testing.tokenizer import build_tiny_tokenizer

    if _TOKENIZER is None:
        _TOKENIZER = build_tiny_tokenizer()
    return copy.deepcopy(_TOKENIZER)


def save_tiny_model(out_dir: str | os.PathLike, **kwargs: Any) -> str:
    """Build the tiny model (``kwargs`` as for :func:`build_tiny_model`) and save it to ``out_dir``.

    Returns ``out_dir`` as a string, ready for ``from_pretrained`` or ``load_policy``.
    """
    model, tokenizer = build_tiny_model(**kwargs)
    return _save(model, tokenizer, out_dir)


def _save(model: Any, tokenizer: Any, out_dir: str | os.PathLike) -> str:
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)  # safetensors is the default (and the only format in transformers 5)
    tokenizer.save_pretrained(out_dir)  # tokenizer.json, tokenizer_config.json, chat template
    return out_dir


def _torch_dtype(dtype: Any):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
            "float16": torch.float16, "fp16": torch.float16}[str(dtype).lower()]

"""Reading a model and its tokenizer from where ``rlft.model_source`` resolved them.

``load_tokenizer`` / ``load_model``: ``from_pretrained`` on a hub id or a directory, or on a GGUF
file (dequantized into a dense, trainable model), which is converted once and then read from
rlft's converted copy (``rlft.gguf_cache``). Each appends what it tried to ``tried``, so that
``load_error`` can say it and what to pass instead. Left out: LoRA, dtype casts after loading,
devices and chat templates (``rlft.policy``).
"""

from __future__ import annotations

import os
from typing import Any

from rlft import gguf_cache
from rlft.model_source import PolicyLoadError

__all__ = ["load_error", "load_model", "load_tokenizer"]


def _dtype_kwarg() -> str:
    """``dtype=`` since transformers 4.56; ``torch_dtype=`` before."""
    import transformers

    try:
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    except ValueError:  # pragma: no cover
        return "dtype"
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def load_tokenizer(name: str, gguf_file: str | None, trust_remote_code: bool, tried: list[str]):
    from transformers import AutoTokenizer

    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kw["gguf_file"] = gguf_file
    tried.append(f"AutoTokenizer.from_pretrained({name!r}" + (f", gguf_file={gguf_file!r})" if gguf_file else ")"))
    if not gguf_file:
        return AutoTokenizer.from_pretrained(name, **kw)
    # the GGUF vocabulary converted once, then read from rlft's cache (rlft.gguf_cache)
    return gguf_cache.cached(os.path.join(name, gguf_file), "tokenizer",
                             convert=lambda: AutoTokenizer.from_pretrained(name, **kw),
                             load=lambda entry: AutoTokenizer.from_pretrained(entry))


def load_model(name: str, gguf_file: str | None, dtype: Any, trust_remote_code: bool, tried: list[str]):
    from transformers import AutoModelForCausalLM

    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kw[_dtype_kwarg()] = dtype
    if gguf_file:
        kw["gguf_file"] = gguf_file
        try:  # transformers >= 5 can keep GGUF blocks packed (not trainable): ask for a dense model
            from transformers import GgufConfig

            kw["quantization_config"] = GgufConfig(dequantize=True)
        except ImportError:  # older versions always dequantize
            pass
    tried.append(
        f"AutoModelForCausalLM.from_pretrained({name!r}" + (f", gguf_file={gguf_file!r}" if gguf_file else "")
        + (f", dtype={dtype}" if dtype is not None else "") + ")"
    )
    if not gguf_file:
        return AutoModelForCausalLM.from_pretrained(name, **kw)

    def from_entry(entry: Any) -> Any:
        model = AutoModelForCausalLM.from_pretrained(entry, **({_dtype_kwarg(): dtype} if dtype is not None else {}))
        model.config._name_or_path = model.name_or_path = name  # as the GGUF load names it (peft records it)
        return model

    # dequantized once, then read from rlft's cache in this dtype (rlft.gguf_cache)
    return gguf_cache.cached(os.path.join(name, gguf_file), f"model-{dtype}",
                             convert=lambda: AutoModelForCausalLM.from_pretrained(name, **kw), load=from_entry)


def load_error(model: str, tried: list[str], exc: BaseException) -> PolicyLoadError:
    offline = ""
    if not os.path.exists(os.path.expanduser(model)):
        offline = (
            " If this is a hub id, it needs network access or a copy in the local Hugging Face cache "
            "(HF_HOME); on an offline machine download it elsewhere and pass the directory."
        )
    return PolicyLoadError(
        f"Could not load model {model!r}. Tried: " + "; ".join(tried) + f". Error: {type(exc).__name__}: {exc}. "
        "What to do: pass a local directory with config.json, weights and tokenizer files (save_pretrained "
        "output), a path to a .gguf file (or gguf_file=...), the alias 'smollm2', or a valid hub id." + offline
    )

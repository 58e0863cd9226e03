"""SFTConfig: the flat config of an ``rlft sft`` run; TOML files and ``--set`` overrides.

The model, LoRA and rendering keys mean what they mean in ``rlft.config.TrainConfig`` (an SFT
checkpoint is meant to start an RL run with the same values), and loading works the same way:
TOML tables are flattened (``[lora] rank = 8`` is ``lora_rank = 8``), unknown keys name the
closest valid one, paths in a file are relative to it. Left out: resuming a stopped SFT run.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from rlft.config import ConfigError, FlatConfig, coerce_value, read_values, relative_to_file, unknown_key


@dataclass
class SFTConfig(FlatConfig):
    # -- model (as in TrainConfig) ---------------------------------------------------------
    model: str = "smollm2"  # HF id, local dir, a .gguf file, a checkpoint dir, or "smollm2"
    dtype: str = "bfloat16"  # frozen weights and compute: bfloat16 | float32 | float16 | auto
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    lora: bool = True  # train LoRA adapters (False = full finetune, fp32 master weights)
    lora_rank: int = 16  # LoRA rank r
    lora_alpha: int = 32  # LoRA alpha (scale = alpha / r)
    lora_dropout: float = 0.0  # LoRA dropout
    lora_target_modules: str = "all-linear"  # comma-separated module names, or all-linear
    gradient_checkpointing: bool = False  # trade compute for memory on long sequences
    chat_template: str = ""  # override the tokenizer's chat template (Jinja text or a file path)
    tool_parser: str = "auto"  # auto | hermes | llama3 | mistral | json (as the RL run will parse)
    tool_format: str = "auto"  # auto | template (tools=) | system (schemas in the system prompt)
    # -- data ------------------------------------------------------------------------------
    data: str = ""  # transcripts file (JSONL of {"messages": [...], "tools": [...]})
    eval_data: str = ""  # separate held-out transcripts; empty = a seeded split of `data`
    eval_fraction: float = 0.1  # share of `data` held out for eval loss when eval_data is empty
    eval_size: int = 0  # held-out transcripts (overrides eval_fraction when > 0)
    max_seq_len: int = 2048  # tokens per transcript; longer ones are handled by `overlong`
    overlong: str = "drop"  # drop | truncate (keep the first max_seq_len tokens); either is reported
    # -- optimization ----------------------------------------------------------------------
    epochs: int = 1  # passes over the train split (when steps = 0)
    steps: int = 0  # optimizer steps (0 = epochs x ceil(train transcripts / batch_size))
    batch_size: int = 16  # transcripts (sequences) per optimizer step
    micro_batch_tokens: int = 4096  # padded tokens per forward/backward micro-batch (length-bucketed)
    shared_prefix: str = "auto"  # transcripts' common prefix (system prompt, tool schemas) once: auto | true | false
    learning_rate: float = 2e-4  # peak learning rate (LoRA; use ~1e-5 for full finetunes)
    warmup_steps: int = 0  # linear warmup steps
    lr_schedule: str = "cosine"  # constant | cosine
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    seed: int = 0  # seeds the split, data order and init
    # -- eval, early stop, checkpoints, run ------------------------------------------------
    eval_every: int = 0  # steps between eval-loss passes (0 = only before and after training)
    patience: int = 0  # stop after this many evals without a lower eval loss (0 = never)
    keep_best: bool = True  # end on the checkpoint with the lowest eval loss (later ones removed)
    checkpoint_every: int = 0  # steps between checkpoints (0 = the last step and each new best only)
    runs_dir: str = "runs"  # workspace: the run store and per-run directories
    run_name: str = ""  # name of the run (default: generated)
    progress: bool = True  # one line per step on stderr

    def resolved(self, *, need_data: bool = True) -> SFTConfig:
        """A validated copy (choices and ranges checked). ``need_data=False``: the caller brings
        prepared sequences (``sft(data=...)``), so ``data`` may be empty."""
        out = dataclasses.replace(self)
        for key, choices in (("lr_schedule", ("constant", "cosine")), ("overlong", ("drop", "truncate")),
                             ("tool_format", ("auto", "template", "system")),
                             ("shared_prefix", ("auto", "true", "false"))):
            if getattr(out, key) not in choices:
                raise ConfigError(f"{key} = {getattr(out, key)!r} is not one of: {', '.join(choices)}")
        for key in ("batch_size", "max_seq_len", "micro_batch_tokens", "epochs"):
            if getattr(out, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(out, key)}")
        for key in ("steps", "eval_every", "patience", "checkpoint_every", "warmup_steps", "eval_size"):
            if getattr(out, key) < 0:
                raise ConfigError(f"{key} must be 0 or more, got {getattr(out, key)}")
        if not 0 <= out.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {out.eval_fraction}")
        if need_data and not out.data:
            raise ConfigError("no training data: set `data` to a transcripts file (JSONL of {\"messages\": [...]})")
        if out.patience and not out.eval_every:
            raise ConfigError(f"patience = {out.patience} needs eval_every > 0 (early stopping compares evals)")
        return out



FIELDS = {f.name: f for f in fields(SFTConfig)}


def load_sft_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None,
                    **kwargs: Any) -> SFTConfig:
    """TOML file (optional) + ``key=value`` overrides (+ keyword arguments); not yet resolved."""
    values, base = read_values(path, overrides, kwargs)
    for k in values:
        if k not in FIELDS:
            raise unknown_key(k, FIELDS, what="sft config key", see="`rlft sft --list`")
    cfg = SFTConfig(**{k: coerce_value(FIELDS[k], v) for k, v in values.items()})
    relative_to_file(cfg, base, ("data", "eval_data", "chat_template", "model"))
    return cfg


def describe() -> list[tuple[str, Any, str]]:
    """(key, default, comment) for every field, from this file's source comments."""
    comments = dict(re.findall(r"^    (\w+): [^=]+= .*?  # (.*)$", Path(__file__).read_text(), flags=re.M))
    return [(f.name, f.default, comments.get(f.name, "")) for f in fields(SFTConfig)]


__all__ = ["SFTConfig", "describe", "load_sft_config"]

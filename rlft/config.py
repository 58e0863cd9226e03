"""TrainConfig: one flat dataclass for train, eval and validate; TOML files and --set overrides.

Every field has a default and a one-line comment (``rlft config --list`` prints them). Unknown
keys are errors that name the closest valid key. ``algorithm`` is a preset: it fills the loss
fields that are left at "auto" (see ``ALGORITHMS``), and the resolved values are what the run
directory records. Left out: nested sections (TOML tables are flattened: ``[lora] rank = 8``
is ``lora_rank = 8``), and environment variables as config.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import sys
from dataclasses import Field, dataclass, fields
from pathlib import Path
from typing import Any

from rlft.errors import UserError

# Each preset sets the loss fields left at "auto". Defaults for small models on small data:
# - token-mean aggregation (DAPO): long and short answers weigh per token, no length bias;
# - no std normalization (Dr.GRPO): dividing by a group's std up-weights nearly-solved and
#   nearly-hopeless prompts, which on small data are most of the noise;
# - clip-higher eps_high=0.28 (DAPO): lets rare good tokens grow, against entropy collapse.
ALGORITHMS: dict[str, dict[str, Any]] = {
    "grpo": {
        "baseline": "mean", "std_normalize": True, "loss_agg": "seq_mean_token_mean",
        "ratio_level": "token", "eps_low": 0.2, "eps_high": 0.2,
    },
    "dr_grpo": {
        "baseline": "mean", "std_normalize": False, "loss_agg": "seq_mean_token_sum_norm",
        "ratio_level": "token", "eps_low": 0.2, "eps_high": 0.2,
    },
    "dapo": {
        "baseline": "mean", "std_normalize": True, "loss_agg": "token_mean",
        "ratio_level": "token", "eps_low": 0.2, "eps_high": 0.28,
    },
    "gspo": {
        "baseline": "mean", "std_normalize": True, "loss_agg": "seq_mean_token_mean",
        "ratio_level": "sequence", "eps_low": 3e-4, "eps_high": 4e-4,
    },
    "rloo": {
        "baseline": "rloo", "std_normalize": False, "loss_agg": "token_mean",
        "ratio_level": "token", "eps_low": 0.2, "eps_high": 0.2,
    },
    "rlft": {
        "baseline": "mean", "std_normalize": False, "loss_agg": "token_mean",
        "ratio_level": "token", "eps_low": 0.2, "eps_high": 0.28,
    },
}


class FlatConfig:
    """What a flat config dataclass (TrainConfig, rlft.sft's SFTConfig) shares: dict and TOML forms."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(to_toml(self.to_dict()))


@dataclass
class TrainConfig(FlatConfig):
    # -- model ---------------------------------------------------------------------------
    model: str = "smollm2"  # HF id, local dir, a .gguf file, or "smollm2" (the bundled SmolLM2-135M-Instruct)
    dtype: str = "bfloat16"  # frozen weights and compute: bfloat16 | float32 | float16 | auto
    device: str = "auto"  # the trainer's device: auto (cuda when available) | cpu | cuda | cuda:N (torchrun: per rank)
    lora: bool = True  # train LoRA adapters (False = full finetune, fp32 master weights)
    lora_rank: int = 16  # LoRA rank r
    lora_alpha: int = 32  # LoRA alpha (scale = alpha / r)
    lora_dropout: float = 0.0  # LoRA dropout
    lora_target_modules: str = "all-linear"  # comma-separated module names, or all-linear
    gradient_checkpointing: bool = False  # trade compute for memory on long sequences
    chat_template: str = ""  # override the tokenizer's chat template (Jinja text or a file path)
    tool_parser: str = "auto"  # auto | hermes | llama3 | mistral | json
    tool_format: str = "auto"  # auto | template (tools=) | system (schemas in the system prompt)
    max_seq_len: int = 2048  # context limit for a whole rollout (prompt + all turns)
    init_from: str = ""  # start from a run's weights (SFT: its best checkpoint; else its latest) or a checkpoint dir
    # -- environment and data ------------------------------------------------------------
    env: str = ""  # the Environment: "path/to/env.py" or "package.module" (attribute env), or path:attr
    data: str = ""  # dataset file (jsonl/json/csv/parquet); empty = the env module's `dataset`
    eval_data: str = ""  # separate eval file; empty = a seeded split of `data`
    eval_fraction: float = 0.2  # share of `data` held out for eval when eval_data is empty
    eval_size: int = 0  # held-out rows (overrides eval_fraction when > 0)
    # -- sampling ------------------------------------------------------------------------
    batch_size: int = 8  # prompts per step (P)
    group_size: int = 8  # rollouts per prompt (G)
    temperature: float = 1.0  # sampling temperature (the trainer scores with the same one)
    top_p: float = 1.0  # nucleus sampling
    top_k: int = 0  # top-k sampling (0 = off)
    max_concurrency: int = 256  # rollouts in flight at once
    overlap: bool = False  # sample step n+1 while step n trains (policy lag 1; importance ratio vs the sampler)
    engine: str = "hf"  # hf (in-process) | vllm | openai (remote server)
    engine_url: str = ""  # base URL of the remote engine (engine = openai)
    engine_model: str = ""  # the base model's name on the remote engine (empty = model)
    prefix_cache_mb: int = 512  # hf engine: MB for finished turns' KV (a next turn prefills only new tokens); 0 = off
    rollout_workers: int = 0  # Ray actors running the environment (tools, rewards; engine = openai); 0 = in-process
    ray_address: str = ""  # connect to an existing Ray cluster (ray start --head; "auto"); empty = a local instance
    sync_check: bool = True  # check each weight sync (next rollouts or a probe); stale/mismatched weights stop the run
    mcp_restart: bool = True  # start an MCP server that died again (bounded backoff); false: fail its calls at once
    sandbox_unconfined: bool = False  # let the code sandbox run without namespaces (rlimits only; network open)
    sync_tolerance: float = 0.15  # max mean |engine - trainer| logprob, rollouts or probe (nats; bf16 noise ~0.05)
    vllm_gpu_memory_utilization: float = 0.3  # GPU memory share for vLLM (colocated with the trainer)
    vllm_sleep: bool = True  # vLLM sleeps (frees its GPU memory) during each policy update
    # -- algorithm -----------------------------------------------------------------------
    algorithm: str = "rlft"  # preset for the fields left at auto: rlft | grpo | dr_grpo | dapo | gspo | rloo
    baseline: str = "auto"  # mean | rloo
    std_normalize: str = "auto"  # divide advantages by the group std: true | false | auto
    loss_agg: str = "auto"  # token_mean | seq_mean_token_mean | seq_mean_token_sum_norm
    ratio_level: str = "auto"  # token | sequence (GSPO)
    eps_low: float = -1.0  # lower clip range (-1 = from the algorithm)
    eps_high: float = -1.0  # upper clip range (-1 = from the algorithm)
    beta: float = 0.0  # KL penalty to the reference (0 = no reference model at all)
    kl_estimator: str = "k3"  # k1 | k3
    epochs: int = 1  # optimization passes over each batch (importance ratios vs rollout-time logprobs)
    dynamic_sampling: str = "off"  # off | skip (drop zero-variance groups) | refill (sample more prompts)
    overlong: str = "off"  # off | filter (truncated rollouts get no loss) | penalty (soft length penalty)
    overlong_cache: int = 64  # tokens before the limit where the soft penalty starts
    tis_cap: float = 0.0  # truncated importance sampling cap for sampler/trainer mismatch (0 = off)
    success_threshold: float = 0.0  # a rollout succeeds (pass@k, solve rate) when reward > this
    guidance: str = "off"  # off | demonstrate: a group with no success gets the env's demonstration as a member (LUFFY)
    guidance_gamma: float = 0.1  # policy shaping of demonstration tokens, p / (p + gamma) (LUFFY's 0.1)
    # -- optimization --------------------------------------------------------------------
    steps: int = 20  # optimizer steps
    learning_rate: float = 2e-4  # peak learning rate (LoRA; use ~1e-6 for full finetunes)
    lr_schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0  # linear warmup steps
    weight_decay: float = 0.0  # AdamW weight decay
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.99  # AdamW beta2
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    micro_batch_tokens: int = 2048  # padded tokens per forward/backward (activations; larger: faster matmuls)
    shared_prefix: str = "auto"  # train each group's common prompt once: auto (where exact) | true | false
    distributed: str = "ddp"  # multi-process strategy under torchrun: ddp | fsdp2 (sharded); gloo on CPU, NCCL on GPU
    seed: int = 0  # seeds data order, sampling and init
    # -- SFT warm-up before RL (rlft.training.warmup) --------------------------------------
    sft_data: str = ""  # transcripts file, or "demonstrate" (the env's demonstrate(example) on the train split)
    sft_steps: int = 0  # warm-up optimizer steps (0 = sft_epochs passes over the demonstrations)
    sft_epochs: int = 3  # warm-up passes over the demonstrations (when sft_steps = 0)
    sft_batch_size: int = 8  # transcripts per warm-up step
    sft_learning_rate: float = 2e-4  # warm-up learning rate (constant; its own AdamW, not RL's)
    sft_min_reward: float = 0.0  # demonstrations scoring below this in the environment are left out
    # -- run, checkpoints, eval ----------------------------------------------------------
    runs_dir: str = "runs"  # workspace: the run store and per-run directories
    run_name: str = ""  # name of the run (default: generated)
    checkpoint_every: int = 10  # steps between checkpoints (the last step always checkpoints)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    keep_best: bool = True  # also keep the checkpoint of the best held-out eval (saved then if needed): --step best
    eval_every: int = 0  # steps between evals on the eval split (0 = only before and after)
    eval_k: int = 4  # samples per eval prompt (pass@k, max@k)
    eval_temperature: float = 1.0  # temperature for evals
    eval_max_examples: int = 64  # eval prompts used (0 = all)
    validate: bool = True  # run one group of 2 rollouts end to end before step 1
    # -- judge calibration: rlft validate and rlft judge check (rlft.rewards.calibration) -
    judge_examples: str = ""  # JSONL of {"prompt", "good", "bad"} contrast pairs; empty = from ground_truth
    judge_pairs: int = 12  # contrast pairs per judged rubric
    judge_min_agreement: float = 0.7  # a judged rubric ordering fewer pairs right fails the check (chance 0.5)
    report_to: str = ""  # comma-separated: tensorboard, wandb, mlflow, trackio
    progress: bool = True  # rich progress bar

    # -- resolution ----------------------------------------------------------------------
    def resolved(self) -> TrainConfig:
        """A copy with the algorithm preset applied to the fields left at auto."""
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"algorithm {self.algorithm!r} is not one of: {', '.join(ALGORITHMS)}")
        preset = ALGORITHMS[self.algorithm]
        out = dataclasses.replace(self)
        for k in ("baseline", "loss_agg", "ratio_level"):
            if getattr(out, k) == "auto":
                setattr(out, k, preset[k])
        if out.std_normalize == "auto":
            out.std_normalize = "true" if preset["std_normalize"] else "false"
        for k in ("eps_low", "eps_high"):
            if getattr(out, k) < 0:
                setattr(out, k, preset[k])
        _check_choice(out, "dynamic_sampling", ("off", "skip", "refill"))
        _check_choice(out, "overlong", ("off", "filter", "penalty"))
        _check_choice(out, "guidance", ("off", "demonstrate"))
        if out.guidance_gamma <= 0:
            raise ConfigError(f"guidance_gamma must be > 0, got {out.guidance_gamma}")
        _check_choice(out, "kl_estimator", ("k1", "k3"))
        _check_choice(out, "lr_schedule", ("constant", "cosine"))
        _check_choice(out, "std_normalize", ("true", "false"))
        _check_choice(out, "shared_prefix", ("auto", "true", "false"))
        _check_choice(out, "distributed", ("ddp", "fsdp2"))
        _check_choice(out, "engine", ("hf", "vllm", "openai"))
        if out.engine == "openai" and not out.engine_url:
            raise ConfigError("engine = \"openai\" needs engine_url (the server's base URL, e.g. http://host:8000)")
        if out.rollout_workers < 0:
            raise ConfigError(f"rollout_workers must be 0 (in-process) or more, got {out.rollout_workers}")
        if out.rollout_workers > 0 and out.engine != "openai":
            raise ConfigError(f"rollout_workers = {out.rollout_workers} needs engine = \"openai\" "
                              "(a server the Ray actors "
                              f"can reach: rlft serve, or vllm serve --enable-lora), not engine = {out.engine!r}: the "
                              "in-process HF engine and the colocated vLLM engine cannot be shared with actors")
        if out.sft_data and out.sft_data != "demonstrate" and not Path(out.sft_data).exists():
            raise ConfigError(f"sft_data = {out.sft_data!r}: no such file (a transcripts file, or \"demonstrate\" "
                              "for the environment's demonstrate function)")
        for k in ("sft_steps", "sft_epochs"):
            if getattr(out, k) < 0:
                raise ConfigError(f"{k} must be 0 or more, got {getattr(out, k)}")
        for k in ("batch_size", "group_size", "steps", "max_seq_len", "micro_batch_tokens", "epochs",
                  "sft_batch_size"):
            if getattr(out, k) < 1:
                raise ConfigError(f"{k} must be at least 1, got {getattr(out, k)}")
        return out



class ConfigError(UserError, ValueError):
    """A config that cannot be used; the message names the key (or file) and the valid choices."""


def _check_choice(cfg: TrainConfig, key: str, choices: tuple[str, ...]) -> None:
    if getattr(cfg, key) not in choices:
        raise ConfigError(f"{key} = {getattr(cfg, key)!r} is not one of: {', '.join(choices)}")


FIELDS = {f.name: f for f in fields(TrainConfig)}


def unknown_key(key: str, known: dict[str, Any], *, what: str = "config key",
                see: str = "`rlft config --list`") -> ConfigError:
    """The error for a key that is not a field, naming the closest valid one."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown {what} {key!r}.{hint} Valid keys: {', '.join(known)} (see {see})")


def coerce_value(field: Field, value: Any) -> Any:
    """A TOML value or a --set string as the type of the field's default (bool, int, float, str)."""
    default = field.default
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes", "on"):
                    return True
                if value.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key {field.name!r} expects {type(default).__name__}, got {value!r}") from None


def _coerce(key: str, value: Any) -> Any:
    if isinstance(value, bool) and key in ("std_normalize", "shared_prefix"):  # a TOML bool for a true/false/auto key
        return "true" if value else "false"
    return coerce_value(FIELDS[key], value)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}_"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_values(path: str | Path | None, overrides: list[str] | dict[str, Any] | None,
                kwargs: dict[str, Any]) -> tuple[dict[str, Any], Path | None]:
    """The raw key -> value pairs of a TOML file (tables flattened: ``[lora] rank`` is
    ``lora_rank``), then ``key=value`` overrides, then keyword arguments; and the file's folder,
    which paths in the file are relative to."""
    values: dict[str, Any] = {}
    base = None
    if path:
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            import tomli as tomllib
        p = Path(path)
        try:
            values.update(_flatten(tomllib.loads(p.read_text())))
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML: {e}") from None
        base = p.parent
    if isinstance(overrides, dict):
        values.update(overrides)
    else:
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"--set expects key=value, got {item!r}")
            k, v = item.split("=", 1)
            values[k.strip()] = v.strip()
    values.update(kwargs)
    return values, base


def relative_to_file(cfg: Any, base: Path | None, keys: tuple[str, ...]) -> None:
    """Point path keys given relative to the config file at that file's folder (``env`` may end in
    ``:attr``); values that name no file there (a hub id, inline Jinja) stay as they are."""
    if base is None:
        return
    for k in keys:
        v = getattr(cfg, k)
        if v and not Path(v).is_absolute() and (base / v.split(":")[0]).exists():
            setattr(cfg, k, str(base / v))


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None,
                **kwargs: Any) -> TrainConfig:
    """TOML file (optional) + ``key=value`` overrides (+ keyword arguments), validated."""
    values, base = read_values(path, overrides, kwargs)
    for k in values:
        if k not in FIELDS:
            raise unknown_key(k, FIELDS)
    cfg = TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
    relative_to_file(cfg, base, ("env", "data", "eval_data", "chat_template", "sft_data"))
    return cfg


def to_toml(d: dict[str, Any]) -> str:
    lines = []
    for k, v in d.items():
        if isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            lines.append(f"{k} = {v}")
        else:
            lines.append(f"{k} = {json.dumps(str(v))}")
    return "\n".join(lines) + "\n"


def describe() -> list[tuple[str, Any, str]]:
    """(key, default, comment) for every field, from this file's source comments."""
    src = Path(__file__).read_text()
    comments = dict(re.findall(r"^    (\w+): [^=]+= .*?  # (.*)$", src, flags=re.M))
    return [(f.name, f.default, comments.get(f.name, "")) for f in fields(TrainConfig)]

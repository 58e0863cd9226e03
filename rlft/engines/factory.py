"""Choosing and building a training run's engine: ``make_engine(options, policy)``.

:class:`EngineOptions` is what the choice depends on, as plain values (the engine kind, batch
size, overlap, precision, sharding, the server to reach, vLLM's settings); ``engine_options(cfg)``
is the one place that reads them off a ``TrainConfig``. ``make_engine`` returns a
:class:`~rlft.engines.base.TrainableEngine`: the in-process HF engine (the trainer's own module,
a copy or a merged LoRA copy, as the options require), a remote OpenAI-compatible server, or
colocated vLLM.

The training loop imports ``make_engine`` from this module when a run starts, so a test swaps the
engine by patching ``rlft.engines.factory.make_engine``.

Left out: the engines themselves (``hf.py``, ``remote.py``, ``vllm.py``), and evaluation-only
chat engines (``external_chat.py``), which are never trained.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rlft.engines.base import TrainableEngine

if TYPE_CHECKING:  # imported where used: importing this module must not import torch (rlft.engines exports it)
    from rlft.config import TrainConfig
    from rlft.engines.vllm import VLLMSettings

__all__ = ["EngineOptions", "engine_options", "make_engine"]

ENGINE_KINDS = ("hf", "openai", "vllm")


@dataclass(frozen=True)
class EngineOptions:
    """What :func:`make_engine` builds. ``kind``: "hf" (in-process), "openai" (a server at ``url``
    that knows the base model as ``served_model``) or "vllm" (colocated, as ``vllm`` says)."""

    kind: str
    max_concurrency: int  # sequences decoded together (hf, vllm) or requests in flight (openai)
    overlap: bool = False  # rollouts are sampled while the trainer steps: the engine needs its own copy
    bf16: bool = False  # the run computes in bfloat16 (the trainer keeps float32 master weights)
    sharded: bool = False  # FSDP2 across processes: the trainer's module is only this rank's shards
    url: str = ""
    served_model: str = ""
    vllm: VLLMSettings | None = None
    prefix_cache_mb: float = 512  # hf: finished sequences' KV kept for the next turn (rlft.engines.prefix_cache)


def engine_options(cfg: TrainConfig) -> EngineOptions:
    """The engine options of a (resolved) training config."""
    from rlft import distributed
    from rlft.engines.vllm import VLLMSettings

    return EngineOptions(
        kind=cfg.engine, max_concurrency=cfg.max_concurrency, overlap=cfg.overlap, bf16=cfg.dtype == "bfloat16",
        sharded=cfg.distributed == "fsdp2" and distributed.is_distributed(),
        url=cfg.engine_url, served_model=cfg.engine_model or cfg.model, prefix_cache_mb=cfg.prefix_cache_mb,
        vllm=VLLMSettings(runs_dir=cfg.runs_dir, dtype=cfg.dtype,
                          gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, sleep=cfg.vllm_sleep,
                          max_model_len=cfg.max_seq_len, seed=cfg.seed, lora_rank=cfg.lora_rank,
                          max_batch_size=cfg.max_concurrency, temperature=cfg.temperature))


def make_engine(options: EngineOptions, policy: Any, *, tag: str = "") -> TrainableEngine:
    """The engine ``options.kind`` names, for ``policy``; in-process HF by default. ``tag`` (the
    run id) names the weight versions pushed to a server, so runs sharing one do not collide."""
    if options.kind == "hf":
        from rlft.engines.hf import HFEngine

        if policy.is_lora:  # a merged copy: fast sampling, refreshed by each sync (overlap needs a snapshot too)
            return HFEngine(policy.model, policy.tokenizer, max_batch_size=options.max_concurrency, merge_lora=True,
                            inline=not options.overlap, prefix_cache_mb=options.prefix_cache_mb)
        if options.overlap or options.sharded or options.bf16:
            # its own copy of the weights, refreshed by each sync: overlap samples while the trainer
            # steps; under FSDP2 the trainer's module becomes shards (each forward a collective);
            # bf16: the trainer keeps float32 master weights, the engine decodes a bf16 copy
            # (batch-64 SmolLM2 on CPU: ~1,100 tok/s packed bf16 vs ~365 float32, benchmarks/README.md)
            return HFEngine(policy.model, policy.tokenizer, max_batch_size=options.max_concurrency,
                            dtype="bfloat16" if options.bf16 else None, copy_weights=True,
                            inline=not options.overlap, prefix_cache_mb=options.prefix_cache_mb)
        # sampling and training take turns: the forward passes run on the training loop's thread
        # (one OpenMP team; a second thread doing torch work slows both, see HFEngine)
        return HFEngine(policy.model, policy.tokenizer, max_batch_size=options.max_concurrency, inline=True,
                        prefix_cache_mb=options.prefix_cache_mb)
    if options.kind == "openai":
        from rlft.engines.remote import RemoteEngine
        from rlft.engines.tokens import end_of_turn_ids

        engine = RemoteEngine(options.url, options.served_model, tag=tag,
                              api_key=os.environ.get("RLFT_ENGINE_API_KEY"), max_concurrency=options.max_concurrency,
                              stop_token_ids=end_of_turn_ids(policy.tokenizer, policy.base_model))
        engine.health()
        return engine
    if options.kind == "vllm":
        from rlft.engines.vllm import VLLMEngine

        if options.vllm is None:
            raise ValueError("engine = \"vllm\" needs its settings (EngineOptions.vllm)")
        return VLLMEngine.from_policy(policy, options.vllm, tag=tag)
    raise NotImplementedError(f"engine {options.kind!r} is not available; use {', '.join(ENGINE_KINDS)}")

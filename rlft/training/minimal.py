"""A minimal RL loop: the whole algorithm on one screen, built from the same pieces as ``train()``.

Read this before ``rlft.training.loop``. Each step samples G rollouts for each of P prompts with
the current weights, scores them with the environment's rewards, turns rewards into
group-relative advantages (r - mean of the group), takes one clipped policy-gradient step on the
sampled tokens, and tells the engine about the new weights. A held-out eval runs before and after.

    from rlft.testing import build_pretrained_tiny, task_environment
    from rlft.training.minimal import minimal_train

    env, rows = task_environment("max", n=512)
    result = minimal_train(env, rows[128:], rows[:128], model=build_pretrained_tiny(task="max"))
    print(result.eval_before["reward/mean"], "->", result.eval_after["reward/mean"])

What it leaves out, all of which ``train()`` adds around the same calls: the run store, the
console and trackers, checkpoints and resume, validation and the signal report, LoRA and bf16
choices beyond two arguments, remote or vLLM engines and the weight-sync probe, torchrun, Ray
rollout workers, overlap of sampling and training, dynamic sampling, KL to a reference, and the
algorithm presets (this loop uses rlft's default loss: token-mean, clip-higher, no std division).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from rlft.data import load_dataset
from rlft.engines.base import SamplingParams, WeightUpdate
from rlft.env import Environment, Sampler, derive_seed
from rlft.metrics import group_metrics


@dataclass
class MinimalResult:
    eval_before: dict[str, float]
    eval_after: dict[str, float]
    steps: list[dict[str, float]] = field(default_factory=list)  # each step's metrics


def minimal_train(env: Environment, train_rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]], *,
                  model: str, steps: int = 20, batch_size: int = 8, group_size: int = 8,
                  learning_rate: float = 1e-3, lora: bool = False, dtype: str = "float32",
                  temperature: float = 1.0, max_seq_len: int = 2048, eval_k: int = 4, seed: int = 0,
                  log: Callable[[str], None] = print) -> MinimalResult:
    """Train ``model`` on ``env`` for ``steps`` steps of ``batch_size`` prompts x ``group_size``
    rollouts; returns the held-out metrics before and after, and each step's metrics."""
    import torch

    from rlft.engines.hf import HFEngine
    from rlft.evaluate import evaluate
    from rlft.policy import LoraSpec, load_policy
    from rlft.renderer import Renderer
    from rlft.training.grpo import LossConfig
    from rlft.training.run import seed_everything
    from rlft.training.update import UpdateConfig, policy_update, select_groups

    seed_everything(seed)
    policy = load_policy(model, dtype=dtype, lora=LoraSpec() if lora else None)
    params = SamplingParams(temperature=temperature)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=learning_rate, betas=(0.9, 0.99))
    settings = UpdateConfig(loss=LossConfig(temperature=temperature, max_tokens=max_seq_len), bf16=dtype == "bfloat16")
    train_set = load_dataset(list(train_rows))  # numbered rows (example_id), a seeded batch per step

    async def run() -> MinimalResult:
        # LoRA: the engine samples from a merged copy, refreshed after each step; full: the trainer's own module
        engine = HFEngine(policy.model, policy.tokenizer, merge_lora=policy.is_lora, inline=True)
        sampler = Sampler(engine, Renderer(policy.tokenizer), params, max_seq_len=max_seq_len)

        def seeded(step: int, stream: str) -> Sampler:  # reproducible draws, labelled with the weights' version
            return replace(sampler, policy_version=step, params=replace(params, seed=derive_seed(seed, stream, step)))

        async def held_out(step: int) -> dict[str, float]:
            metrics, _ = await evaluate(env, list(eval_rows), seeded(step, "eval"), k=eval_k)
            log(f"eval @ step {step}: reward {metrics['reward/mean']:.3f}, pass@{eval_k} {metrics['pass@k']:.2f}")
            return metrics

        result = MinimalResult(eval_before={}, eval_after={})
        try:
            async with env.session():  # shared resources (MCP servers), opened once for the run
                result.eval_before = await held_out(0)
                for step in range(steps):
                    # 1. sample: G rollouts for each of the step's P prompts (tools and rewards included)
                    examples = train_set.batch(step, batch_size, seed)
                    groups = await env.run_groups(examples, seeded(step, "train"), group_size)
                    metrics = group_metrics(groups)
                    # 2. advantages: r - mean(r) within each group; tied groups teach nothing, left out
                    train_groups, skipped = select_groups(groups, baseline="mean", std_normalize=False,
                                                          drop_tied=True)
                    # 3. update: one optimizer step on the sampled tokens (the engine waits meanwhile)
                    with engine.paused():
                        metrics.update(policy_update(policy, train_groups, settings, optimizer))
                    # 4. the engine serves the new weights from the next step on
                    engine.sync_weights(WeightUpdate(step + 1, model=policy.model))
                    metrics["batch/skipped_groups"] = float(skipped)
                    result.steps.append(metrics)
                    log(f"step {step + 1}/{steps}: reward {metrics['reward/mean']:.3f}, "
                        f"trained on {len(train_groups)} of {len(groups)} groups")
                result.eval_after = await held_out(steps)
        finally:
            engine.close()
        return result

    return asyncio.run(run())


__all__ = ["MinimalResult", "minimal_train"]

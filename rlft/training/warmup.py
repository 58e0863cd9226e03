"""The SFT warm-up inside an RL run (``sft_data``): supervised steps on demonstrations, on the
run's own policy, before RL step 1, so that one run holds base -> after warm-up -> after RL.

A model that never calls its tools gives GRPO nothing to reinforce; a few supervised steps on
demonstrations that do get it started (rlft.sft). ``sft_data`` is a transcripts file or
``"demonstrate"``: the environment's ``demonstrate(example)`` played on every row of the *train*
split (``rlft.sft.demonstrations``; held-out rows never become demonstrations; the played
transcripts are written to ``<run>/warmup.jsonl`` for inspection). Rendering is the RL rollout's
(same renderer, tool format and parser), so what the warm-up teaches is what RL samples and parses.

Where it sits in ``train()``: validation, then the held-out eval *before* the warm-up at step
``-N`` (N warm-up steps), the warm-up's steps recorded at steps ``-N+1 .. 0`` (keys
``warmup/loss``, ``warmup/grad_norm``, ``warmup/tokens_per_s``, ``warmup/epoch``, and
``warmup/eval_loss`` on a held-out tenth of the transcripts at ``-N`` and ``0``), the new weights
pushed to the engine (and probed), the eval after the warm-up at step 0, then RL from step 1.
Negative steps keep RL's step numbers what they are without a warm-up, put the warm-up to the left
of RL in every chart, and survive ``truncate_after`` on resume. The warm-up has its own AdamW and
a constant learning rate (``sft_learning_rate``); RL's optimizer starts fresh after it.

Resume: a run killed during the warm-up has no checkpoint, so it starts again from the base
weights and redoes the warm-up (its rows are upserts); once RL has checkpointed, the warm-up is
in those weights and is not redone. Left out: multi-process warm-ups (refused: run ``rlft sft``
once, then ``init_from``), early stopping and best-checkpoint selection (``rlft sft`` has them).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from rlft import distributed
from rlft.allocator import release_freed_memory
from rlft.config import ConfigError

HELD_OUT_SHARE = 0.1  # of the transcripts, for warmup/eval_loss (none below 10 transcripts)


@dataclass
class WarmupPlan:
    """The warm-up's sequences and length, known before it starts (the base eval's step is -steps)."""

    train: list[tuple[list[int], list[int]]]  # (ids, loss mask) per transcript
    held_out: list[tuple[list[int], list[int]]]
    steps: int
    source: str  # where the transcripts came from, for the log
    problems: list[str] = field(default_factory=list)


def plan_warmup(run: Any) -> WarmupPlan:
    """Build (or read), render and split the warm-up's transcripts; logs what was left out and why."""
    from rlft.sft.prepare import fit_length, split_indices
    from rlft.sft.transcripts import load_transcripts, render_transcripts, write_transcripts

    cfg = run.cfg
    if distributed.world_size() > 1:
        raise ConfigError("sft_data: the warm-up runs in one process; under torchrun run `rlft sft` first, then "
                          "start RL from it with init_from = \"<sft run>\"")
    if cfg.sft_data == "demonstrate":
        from rlft.sft.demonstrations import play

        demos = run.wait(play(run.env, list(run.train_set), example_ids=[ex["example_id"] for ex in run.train_set],
                              min_reward=cfg.sft_min_reward))
        transcripts, problems = demos.transcripts, list(demos.problems)
        source = f"demonstrate() on the train split ({len(transcripts)} of {demos.rows} rows kept)"
        if demos.rewards:
            source += f", mean reward {sum(demos.rewards) / len(demos.rewards):.3f}"
        write_transcripts(run.run_dir / "warmup.jsonl", transcripts)
        if not transcripts:
            raise ConfigError(f"sft_data = \"demonstrate\": no row gave a usable demonstration ({demos.rows} tried); "
                              "first problems: " + "; ".join(problems[:3]))
    else:
        transcripts, problems = load_transcripts(cfg.sft_data), []
        source = f"{cfg.sft_data} ({len(transcripts)} transcripts)"
    train_idx, held_idx = split_indices(len(transcripts), eval_size=0, seed=cfg.seed,
                                        eval_fraction=HELD_OUT_SHARE if len(transcripts) >= 10 else 0.0)
    splits = []
    for idx in (train_idx, held_idx):
        examples, bad = render_transcripts(run.sampler.renderer, [transcripts[i] for i in idx])
        seqs, more = fit_length(examples, cfg.max_seq_len, "drop", "warm-up transcripts", idx)
        problems += bad + more
        splits.append(seqs)
    if not splits[0]:
        raise ConfigError(f"sft_data: no warm-up transcript is left to train on ({source}): "
                          + "; ".join(problems[:3]))
    steps = cfg.sft_steps or cfg.sft_epochs * math.ceil(len(splits[0]) / cfg.sft_batch_size)
    return WarmupPlan(train=splits[0], held_out=splits[1], steps=steps, source=source, problems=problems)


def warm_up(run: Any, plan: WarmupPlan) -> dict[str, float]:
    """Train ``plan.steps`` supervised steps on ``run.policy``, record them at steps -steps+1..0,
    push the weights to the engine; returns the last step's metrics."""
    import torch

    from rlft.sft.loss import eval_loss, train_step
    from rlft.sft.trainer import batches

    cfg, policy = run.cfg, run.policy
    bf16 = cfg.dtype == "bfloat16"
    run.note(f"warm-up: {plan.steps} SFT steps of {cfg.sft_batch_size} on {len(plan.train)} transcripts "
             f"({len(plan.held_out)} held out) from {plan.source}", step=-plan.steps, source="warmup")
    for p in plan.problems:
        run.note(f"warm-up: left out: {p}", level="warning", step=-plan.steps, source="warmup")

    def held_out_loss() -> dict[str, float]:
        if not plan.held_out:
            return {}
        return {"warmup/eval_loss": eval_loss(policy, plan.held_out, micro_batch_tokens=cfg.micro_batch_tokens,
                                              bf16=bf16, shared_prefix=cfg.shared_prefix)}

    run.store.log_metrics(run.run_id, -plan.steps, held_out_loss())
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.sft_learning_rate)
    order = batches(len(plan.train), cfg.sft_batch_size, cfg.seed)
    metrics: dict[str, float] = {}
    for i in range(1, plan.steps + 1):
        epoch, idx = next(order)
        t0 = time.perf_counter()
        st = train_step(policy, [plan.train[j] for j in idx], optimizer, micro_batch_tokens=cfg.micro_batch_tokens,
                        max_grad_norm=cfg.max_grad_norm, bf16=bf16, shared_prefix=cfg.shared_prefix)
        dt = time.perf_counter() - t0
        metrics = {"warmup/loss": st["loss"], "warmup/grad_norm": st["grad_norm"], "warmup/epoch": epoch,
                   "warmup/tokens_per_s": st["tokens"] / dt}
        if i == plan.steps:
            metrics.update(held_out_loss())
        run.store.log_metrics(run.run_id, i - plan.steps, metrics)
        run.progress.note(f"warm-up step {i}/{plan.steps}  loss {st['loss']:.4f}  {metrics['warmup/tokens_per_s']:.0f}"
                          f" tok/s  {dt:.2f} s")
    del optimizer  # its state is not RL's: RL's AdamW starts fresh on the warmed-up weights
    release_freed_memory()  # the warm-up's activation heap back to the OS before the evals and RL (rlft.allocator)
    run.store.log_metrics(run.run_id, 0, run.syncer.after_update(0))  # the engine serves the warmed-up weights
    return metrics


__all__ = ["HELD_OUT_SHARE", "WarmupPlan", "plan_warmup", "warm_up"]

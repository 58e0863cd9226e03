"""train(config): the one training loop, top to bottom.

Each step: take the step's P prompts (a pure function of step and seed, so resume is exact),
sample G rollouts per prompt through the engine (concurrently, tools and rewards included),
turn rewards into group-relative advantages, update the policy on the sampled tokens only, and
record metrics and rollouts in the run store; checkpoint every N steps. The math lives in
``rlft.training.grpo``; batching for the forward pass in ``rlft.batching``. A failure at any point marks
the run failed with its reason and traceback before the exception propagates.
Multi-process (torchrun): ``rlft.distributed`` holds all of it; here it is called where the model
is wrapped, the prompts are sharded, metrics and rollouts are gathered and rank 0 writes. Overlap
(``overlap = true``): step n+1's rollouts are sampled (from the engine's own snapshot of the
weights) while step n trains in a thread, so they lag one version and the update takes the
sampler's logprobs as their old policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import random
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from rlft.config import TrainConfig, load_config
from rlft.metrics import group_metrics


def _as_config(config: Any, overrides: dict[str, Any]) -> TrainConfig:
    if config is None:
        cfg = load_config(overrides=overrides)
    elif isinstance(config, (str, Path)):
        cfg = load_config(config, overrides)
    elif isinstance(config, dict):
        cfg = load_config(overrides={**config, **overrides})
    else:
        cfg = load_config(overrides={**asdict(config), **overrides})
    return cfg.resolved()


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_factor(cfg: TrainConfig):
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0
    return f


def train(config: TrainConfig | dict | str | None = None, *, environment=None, dataset=None,
          resume: str | None = None, **overrides: Any) -> str:
    """Train a policy on an environment; returns the run id.

    ``config``: a TrainConfig, a dict, or a TOML path; keyword overrides win (``steps=5``).
    ``environment`` / ``dataset``: objects to use instead of the config's ``env`` / ``data``.
    ``resume``: a run id (or name) to continue from its last checkpoint."""
    import torch

    from rlft import distributed
    from rlft.renderer import Renderer
    from rlft.training.checkpoint import latest_checkpoint, load_checkpoint, load_weights, prune_checkpoints, save_checkpoint
    from rlft.engines.base import SamplingParams
    from rlft.engines.factory import engine_options, make_engine  # looked up per run: tests patch the factory's
    from rlft.env import Sampler, derive_seed
    from rlft.evaluate import evaluate, format_transcript, signal_report, validate
    from rlft.loader import load_data, load_environment
    from rlft.policy import LoraSpec, load_policy
    from rlft.progress import Progress
    from rlft.store.replica import run_store
    from rlft.reporting import Reporter
    from rlft.training.sync import WeightSync, policy_lag
    from rlft.training.update import policy_update, select_groups

    cfg = _as_config(config, overrides)
    owns_group = distributed.init()  # under torchrun: join the process group; one process: nothing
    store = run_store(cfg.runs_dir)  # rank 0 writes; the other ranks only read (rlft.store.replica)
    if resume:  # the run's own resolved config wins over the one given
        run = store.get_run(resume)
        run_id = run["id"]
        cfg = _as_config(run["config"], {})
    seed_everything(cfg.seed)
    module, env_source, env = None, "", environment
    if env is None:
        env, module, env_source = load_environment(cfg.env)
    train_set, eval_set = load_data(cfg, module, dataset)
    train_set.check_batch_size(cfg.batch_size)
    distributed.check(cfg)
    if not resume:
        run_id = store.create_run(name=cfg.run_name or None, config=cfg.to_dict(), model=cfg.model,
                                  environment=env.name if env.name != "environment" else (cfg.env or "environment"),
                                  env_source=env_source)
    run_id = distributed.broadcast_object(run_id)  # rank 0 created the run
    run_dir = store.run_dir(run_id)
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.toml")
    store.set_status(run_id, "running")
    reporter = None
    loop = asyncio.new_event_loop()
    session = contextlib.AsyncExitStack()
    progress = Progress(cfg.steps, enabled=cfg.progress) if distributed.is_main() else distributed.Silent()
    step = 0
    pending = None  # overlap: the next step's rollouts, sampled while this step trains
    pool = None  # rollout_workers > 0: Ray actors run the environment (rlft.ray_workers)
    try:
        # -- model, engine, optimizer ------------------------------------------------------
        lora = LoraSpec(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                        target_modules=None if cfg.lora_target_modules == "all-linear" else cfg.lora_target_modules.split(","))
        # full finetunes keep fp32 master weights and compute under bf16 autocast instead
        weights_dtype = cfg.dtype if cfg.lora else "float32"
        # under torchrun each rank takes its own device (distributed.device()); else the configured one
        device = distributed.device() if distributed.is_distributed() else cfg.device
        policy = load_policy(cfg.model, dtype=weights_dtype, lora=lora if cfg.lora else None, device=device,
                             gradient_checkpointing=cfg.gradient_checkpointing, chat_template=cfg.chat_template or None)
        if cfg.beta > 0 and not policy.is_lora:
            policy.freeze_reference()  # the base weights, not a resumed checkpoint's
        ckpt = latest_checkpoint(run_dir) if resume else None
        if ckpt:  # weights first: the engine copies them and FSDP2 shards them
            load_weights(policy, ckpt[1])
        renderer = Renderer(policy.tokenizer, tool_parser=cfg.tool_parser, tool_format=cfg.tool_format)
        # before sharding: an FSDP2 engine copies the whole model
        engine = make_engine(engine_options(cfg), policy, tag=run_id)
        # DDP / FSDP2 under torchrun; else policy.model itself
        train_model = distributed.wrap(policy.model, cfg.distributed, bf16=cfg.dtype == "bfloat16")
        if cfg.rollout_workers > 0:  # Ray is imported only here
            from rlft.ray_workers import pool_from_config

            pool = pool_from_config(cfg, engine)
        params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
        sampler = Sampler(engine, renderer, params, max_seq_len=cfg.max_seq_len)
        optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.learning_rate,
                                      betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
        reporter = Reporter(cfg.report_to if distributed.is_main() else "", run_id, run_dir, cfg.to_dict())
        start = 0
        if ckpt:
            state = load_checkpoint(ckpt[1], policy, optimizer, scheduler, weights=False, model=train_model)
            start = state["step"]
            store.add_log(run_id, f"resumed from checkpoint at step {start}", step=start, source="trainer")
        store.truncate_after(run_id, start)  # rows of steps after the checkpoint are redone
        # the engine must serve the trainer's weights: pushed after every step, then probed (rlft.training.sync)
        sync_root = run_dir if distributed.is_main() else run_dir / f"rank{distributed.rank()}"  # each rank's own pushes
        syncer = WeightSync(policy, engine, renderer, sync_root, loop, check=cfg.sync_check,
                            tolerance=cfg.sync_tolerance, autocast=cfg.dtype == "bfloat16")
        store.log_metrics(run_id, start, syncer.start(start))
        loop.run_until_complete(session.enter_async_context(env.session()))

        def run_eval(at_step: int) -> dict[str, float] | None:
            if not len(eval_set) or not distributed.is_main():  # eval runs on rank 0 only
                return None
            examples = list(eval_set)[: cfg.eval_max_examples or None]
            sampler.policy_version = at_step
            sampler.params = replace(params, seed=derive_seed(cfg.seed, "eval", at_step))
            metrics, groups = loop.run_until_complete(evaluate(
                env, examples, sampler, k=cfg.eval_k, temperature=cfg.eval_temperature,
                success_threshold=cfg.success_threshold, max_concurrency=cfg.max_concurrency))
            store.add_eval(run_id, model=f"{cfg.model}@{at_step}", split="eval", k=cfg.eval_k, metrics=metrics, step=at_step)
            store.add_rollouts(run_id, at_step, [r for g in groups for r in g.rollouts], split="eval")
            store.log_metrics(run_id, at_step, {f"eval/{k}": v for k, v in metrics.items()})
            reporter.log(at_step, {f"eval/{k}": v for k, v in metrics.items()})
            progress.note(f"eval @ step {at_step}: reward {metrics['reward/mean']:.3f}, pass@{cfg.eval_k} {metrics['pass@k']:.2f}")
            return metrics

        # -- check the environment before spending compute ------------------------------------
        if cfg.validate and start == 0:
            report = loop.run_until_complete(validate(env, train_set[0], sampler))
            for ro in report.groups[0].rollouts:
                store.add_log(run_id, format_transcript(ro), source="validate")
            if not report.ok:
                raise RuntimeError("validation failed before step 1:\n- " + "\n- ".join(report.problems)
                                   + "\n" + "\n".join(format_transcript(r) for r in report.groups[0].rollouts))
        if start == 0:
            base_eval = run_eval(0)

        async def sample_step(at_step: int):
            """This rank's share of the step's prompts, G rollouts each, and the seconds sampling took
            (overlap runs it as a task beside the update, so its own clock, not the wait for it)."""
            t0 = time.perf_counter()
            examples = distributed.shard(train_set.batch(at_step, cfg.batch_size, cfg.seed))
            step_sampler = replace(sampler, policy_version=at_step,
                                   params=replace(params, seed=derive_seed(cfg.seed, "train", at_step)))
            groups = await (pool or env).run_groups(examples, step_sampler, cfg.group_size,
                                                    max_concurrency=cfg.max_concurrency)
            return groups, time.perf_counter() - t0

        local_batch = cfg.batch_size // distributed.world_size()
        engine_version = start  # the weights the engine serves
        progress.start(start)
        for step in range(start, cfg.steps):
            t_step = time.perf_counter()
            # -- 1. sample: G rollouts for each of the step's P prompts (this rank's share) -------
            sampler.policy_version = step
            sampler.params = replace(params, seed=derive_seed(cfg.seed, "train", step))
            groups, t_generate = loop.run_until_complete(pending if pending is not None else sample_step(step))
            pending = None
            all_groups = distributed.gather_groups(groups)  # rank 0: the whole batch (for metrics)
            metrics = group_metrics(all_groups, cfg.success_threshold)
            metrics.update(policy_lag(all_groups, step))
            if engine_version < step:  # overlap: the engine was sampling these when the last update ended
                metrics.update(syncer.after_update(step))
                engine_version = step
            if step == start:
                report = signal_report(all_groups, cfg.success_threshold)
                m = report.metrics
                line = (f"[signal] step {step + 1}: mean reward {m.get('reward/mean', 0):.3f}, pass@{cfg.group_size} "
                        f"{m.get('pass@k', 0):.2f}, max@{cfg.group_size} {m.get('max@k', 0):.3f}, "
                        f"tied groups {report.zero_variance_share:.0%}")
                progress.note(line)
                store.add_log(run_id, line, step=step, source="signal")
                for w in report.warnings:
                    progress.note(f"[signal] {w}")
                    store.add_log(run_id, w, level="warning", step=step, source="signal")
            # -- 2. advantages; dynamic sampling refills tied groups from a seeded side stream ---
            train_groups, skipped = select_groups(groups, cfg, env.max_tokens)
            refill = 0
            while cfg.dynamic_sampling == "refill" and len(train_groups) < local_batch and refill < 3:
                extra = train_set.batch(step, local_batch - len(train_groups),
                                        cfg.seed + 7919 * (refill + 1) + 104729 * distributed.rank())
                more = loop.run_until_complete((pool or env).run_groups(extra, sampler, cfg.group_size, max_concurrency=cfg.max_concurrency))
                more_groups, _ = select_groups(more, cfg, env.max_tokens)
                train_groups += more_groups
                groups += more
                refill += 1
            # -- 3. policy update on the sampled tokens -----------------------------------------
            if cfg.overlap and step + 1 < cfg.steps:  # the next step samples meanwhile, with these weights
                pending = loop.create_task(sample_step(step + 1))
            t0 = time.perf_counter()

            def update_step() -> dict[str, float]:
                # no forward pass of the engine while weights change (overlap: it samples from its own copy)
                with contextlib.nullcontext() if cfg.overlap else engine.paused():
                    out = policy_update(policy, train_groups, cfg, optimizer, model=train_model,
                                        policy_version=step if cfg.overlap else None)
                    scheduler.step()
                return out

            # overlap: the update runs in a thread while this event loop drives the next step's rollouts
            update = loop.run_until_complete(asyncio.to_thread(update_step)) if pending is not None else update_step()
            if pending is None:  # else the engine is busy; it takes the new weights once its rollouts are in
                metrics.update(syncer.after_update(step + 1))  # WeightSyncError when the engine is stale
                engine_version = step + 1
            t_train = time.perf_counter() - t0
            # -- 4. record -----------------------------------------------------------------------
            groups = distributed.gather_groups(groups)  # rank 0: every rank's rollouts, advantages set
            sampled = sum(r.num_sampled_tokens for g in groups for r in g.rollouts)
            metrics.update(update)
            metrics.update({"batch/skipped_groups": float(skipped), "optim/lr": scheduler.get_last_lr()[0],
                            "time/generate": t_generate, "time/train": t_train,
                            "time/step": time.perf_counter() - t_step,
                            "throughput/tokens_per_s": sampled / max(t_generate, 1e-9)})
            store.add_rollouts(run_id, step + 1, [r for g in groups for r in g.rollouts])
            store.log_metrics(run_id, step + 1, metrics)
            reporter.log(step + 1, metrics)
            store.update_run(run_id, step=step + 1)
            progress.update(step + 1, metrics)
            done = step + 1 == cfg.steps
            stop = distributed.broadcast_object(store.stop_requested(run_id))  # all ranks stop together
            if done or stop or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0):
                # every rank: FSDP2 gathers the weights to rank 0, which alone writes
                path = save_checkpoint(run_dir, step + 1, policy, optimizer, scheduler, {"config": cfg.to_dict()},
                                       model=train_model)
                if distributed.is_main():
                    store.add_checkpoint(run_id, step + 1, str(path), metrics={"reward/mean": metrics.get("reward/mean")})
                    for removed in prune_checkpoints(run_dir, cfg.keep_checkpoints):
                        store.remove_checkpoint(run_id, removed)
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and not done:
                if pending is not None:  # overlap: eval the new weights: let the engine finish, then push them
                    loop.run_until_complete(pending)
                    store.log_metrics(run_id, step + 1, syncer.after_update(step + 1))
                    engine_version = step + 1
                run_eval(step + 1)
            if stop:
                store.set_status(run_id, "stopped")
                progress.note(f"stopped at step {step + 1} (checkpoint saved)")
                distributed.barrier()  # every rank tears down together (see finally)
                return run_id
        final_eval = run_eval(cfg.steps)
        progress.finish()
        if start == 0 and base_eval and final_eval:
            progress.note(f"held-out reward {base_eval['reward/mean']:.3f} -> {final_eval['reward/mean']:.3f}, "
                          f"pass@{cfg.eval_k} {base_eval['pass@k']:.2f} -> {final_eval['pass@k']:.2f}")
        store.set_status(run_id, "completed")
        distributed.barrier()  # every rank tears down together (see finally)
        return run_id
    except BaseException as e:
        progress.finish()
        status = "stopped" if isinstance(e, KeyboardInterrupt) else "failed"
        store.set_status(run_id, status, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        store.add_log(run_id, f"run {status} at step {step}: {type(e).__name__}: {e}", level="error",
                      step=step, source="trainer", traceback=traceback.format_exc())
        raise
    finally:
        if reporter is not None:
            reporter.close()
        if pending is not None and not pending.done():  # overlap: a stop or failure leaves one step in flight
            pending.cancel()
            with contextlib.suppress(BaseException):
                loop.run_until_complete(pending)
        with contextlib.suppress(Exception):
            loop.run_until_complete(session.aclose())
        if "engine" in locals() and hasattr(engine, "close"):
            engine.close()
        if pool is not None:
            pool.shutdown()
        loop.close()
        store.close()
        if owns_group:
            # the DDP/FSDP wrapper holds the process group; freed at interpreter exit instead, gloo's
            # worker threads were once destroyed unjoined there (SIGABRT on a rank after a run
            # that had completed)
            train_model = None  # noqa: F841
            gc.collect()
        distributed.cleanup(owns_group)


__all__ = ["train"]

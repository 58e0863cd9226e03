"""The run context: everything a training run opens, built in one place and torn down in one place.

``open_run(cfg, ...)`` is a context manager. It joins the process group (under torchrun), opens
the run store, loads the environment and the data, creates (or resumes) the run, loads the policy
and its checkpoint, builds the engine, the sampler, the optimizer and the weight sync, and yields
a :class:`Run`. On the way out it closes all of it in reverse order, whatever happened. Any
exception once the run exists, during setup included, marks the run failed (or stopped, for
Ctrl-C) with its reason and traceback before it propagates; an exception before the run exists
(a bad environment file, a dataset error) leaves no run behind.

The narrow configurations the training phases take (:func:`loss_config`, :func:`update_config`,
the learning-rate schedule) are made from the ``TrainConfig`` here, so that the update and the
loss never see the whole config. Left out: the loop itself (``rlft.training.loop``), and what
a resume or ``init_from`` needs (``rlft.training.resume``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import random
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rlft import distributed
from rlft.config import TrainConfig
from rlft.data import Dataset
from rlft.engines.base import SamplingParams
from rlft.env import Environment, Sampler, derive_seed
from rlft.training.resume import (
    check_data,
    data_fingerprint,
    init_checkpoint,
    resume_checkpoint,
    resume_environment,
    with_absolute_paths,
)


@dataclass
class Run:
    """One training run's open resources. ``rollouts`` runs the groups of a step: the
    environment itself, or a pool of Ray actors running it (``rollout_workers > 0``)."""

    cfg: TrainConfig
    run_id: str
    run_dir: Path
    store: Any  # RunStore on rank 0, a ReplicaStore elsewhere (rlft.store.replica)
    env: Environment
    train_set: Dataset
    eval_set: Dataset
    policy: Any  # rlft.policy.Policy
    train_model: Any  # what forward/backward runs through: DDP/FSDP2 wrapper, or policy.model
    engine: Any  # a TrainableEngine (rlft.engines.base)
    sampler: Sampler  # the engine, the renderer and the run's sampling params, unseeded
    rollouts: Any  # Environment, or rlft.ray_workers' pool: both have run_groups(...)
    optimizer: Any
    scheduler: Any
    syncer: Any  # rlft.training.sync.WeightSync
    reporter: Any  # rlft.reporting.Reporter (Silent on ranks > 0)
    progress: Any  # rlft.progress.Progress (Silent on ranks > 0)
    loop: asyncio.AbstractEventLoop  # the one event loop the run's async work (rollouts, engine) runs on
    start_step: int  # 0, or the step of the checkpoint a resume starts from

    def wait(self, coro: Any) -> Any:
        """Run ``coro`` to completion on the run's event loop."""
        return self.loop.run_until_complete(coro)

    def sampler_at(self, step: int, *stream: Any) -> Sampler:
        """The sampler for one seeded stream of draws (``"train"``, ``"eval"``, ``"refill", n``) at
        ``step``: rollouts derive their own seeds from it, so every stream is reproducible and no
        two streams repeat each other's tokens."""
        params = replace(self.sampler.params, seed=derive_seed(self.cfg.seed, *stream, step))
        return replace(self.sampler, policy_version=step, params=params)

    def note(self, message: str, *, level: str = "info", step: int | None = None, source: str = "trainer") -> None:
        """A line in the terminal and in the run's log."""
        self.progress.note(message)
        self.store.add_log(self.run_id, message, level=level, step=step, source=source)

    def best_note(self) -> str:
        """For the final line: where the best held-out eval was, when not at the last step (keep_best)."""
        from rlft.training.checkpoint import best_checkpoint

        best = best_checkpoint(self.run_dir) if self.cfg.keep_best else None
        if not best or best[0] == self.cfg.steps:
            return ""
        return (f"; the best was at step {best[0]} ({best[1]:.3f}), its checkpoint kept: "
                f"`rlft export {self.run_id} --step best --merge DIR`")


def loss_config(cfg: TrainConfig):
    """The policy loss's arguments, from a resolved config."""
    from rlft.training.grpo import LossConfig

    return LossConfig(loss_agg=cfg.loss_agg, ratio_level=cfg.ratio_level, eps_low=float(cfg.eps_low),
                      eps_high=float(cfg.eps_high), beta=cfg.beta, kl_estimator=cfg.kl_estimator,
                      tis_cap=cfg.tis_cap, temperature=cfg.temperature, max_tokens=cfg.max_seq_len,
                      shaping_gamma=cfg.guidance_gamma)


def update_config(cfg: TrainConfig, *, sync_tolerance: float = 0.0):
    """What one policy update takes, from a resolved config; ``sync_tolerance``: the weight sync's
    rollout check (``WeightSync.rollout_tolerance``, 0 = none)."""
    from rlft.training.update import UpdateConfig

    return UpdateConfig(loss=loss_config(cfg), epochs=cfg.epochs, micro_batch_tokens=cfg.micro_batch_tokens,
                        max_grad_norm=cfg.max_grad_norm, bf16=cfg.dtype == "bfloat16",
                        filter_truncated=cfg.overlong == "filter", shared_prefix=cfg.shared_prefix,
                        sync_tolerance=sync_tolerance)


def lr_factor(steps: int, warmup_steps: int, schedule: str) -> Callable[[int], float]:
    """The learning-rate multiplier at each optimizer step: linear warm-up, then constant or cosine."""
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "cosine":
            progress = (step - warmup_steps) / max(steps - warmup_steps, 1)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0
    return factor


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def as_config(config: Any, overrides: dict[str, Any]) -> TrainConfig:
    """A resolved TrainConfig from a TrainConfig, a dict, a TOML path or None, with overrides."""
    from dataclasses import asdict

    from rlft.config import load_config

    if config is None:
        cfg = load_config(overrides=overrides)
    elif isinstance(config, (str, Path)):
        cfg = load_config(config, overrides)
    elif isinstance(config, dict):
        cfg = load_config(overrides={**config, **overrides})
    else:
        cfg = load_config(overrides={**asdict(config), **overrides})
    return cfg.resolved()


@contextlib.contextmanager
def open_run(cfg: TrainConfig, *, environment: Environment | None = None, dataset: Any = None,
             resume: str | None = None) -> Iterator[Run]:
    """Open everything a run needs (see the module docstring); ``resume``: a run id or name whose
    own resolved config then replaces ``cfg``."""
    from rlft.loader import load_environment, load_splits
    from rlft.rewards.confinement import environment_isolation
    from rlft.rewards.sandbox import set_unconfined
    from rlft.store.replica import run_store

    with contextlib.ExitStack() as stack:
        owns_group = distributed.init()  # under torchrun: join the process group; one process: nothing
        stack.callback(distributed.cleanup, owns_group)
        store = run_store(cfg.runs_dir)  # rank 0 writes; the other ranks only read
        stack.callback(store.close)
        run_id = store.resolve(resume) if resume else None  # UnknownRunError names the store
        if resume:
            cfg = as_config(store.get_run(run_id)["config"], {})
        progress = _progress(cfg)
        try:
            seed_everything(cfg.seed)
            if environment is not None:
                env, module, env_source = environment, None, ""
            elif resume:
                env, module, env_source = resume_environment(cfg, store, run_id, progress)
            else:
                env, module, env_source = load_environment(cfg.env)
            if not cfg.mcp_restart:
                env = without_mcp_restarts(env)
            stack.callback(set_unconfined, set_unconfined(cfg.sandbox_unconfined))  # for run_code in rewards
            isolation = environment_isolation(env, module)  # no namespaces, not opted in: refused here
            train_set, eval_set = load_splits(cfg, module, dataset)
            train_set.check_batch_size(cfg.batch_size)
            distributed.check(cfg)
            fingerprint = data_fingerprint(train_set, eval_set)
            if run_id is None:
                cfg = with_absolute_paths(cfg)  # resumable from any working directory
                name = env.name if env.name != "environment" else (cfg.env or "environment")
                run_id = store.create_run(name=cfg.run_name or None, config=cfg.to_dict(), model=cfg.model,
                                          environment=name, env_source=env_source)
            run_id = distributed.broadcast_object(run_id)  # rank 0 created the run
            check_data(store, run_id, fingerprint, progress)
            run = _build(stack, cfg, store, run_id, env, train_set, eval_set, progress, resume=bool(resume))
            if isolation is not None:
                run.note(isolation.line(), level="info" if isolation.confined else "warning")
            yield run
        except BaseException as e:
            progress.finish()
            if run_id is None:  # failed before the run existed: nothing to mark
                raise
            status = "stopped" if isinstance(e, KeyboardInterrupt) else "failed"
            step = (store.get_run(run_id).get("step") or 0) if distributed.is_main() else 0
            store.set_status(run_id, status, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            store.add_log(run_id, f"run {status} at step {step}: {type(e).__name__}: {e}", level="error",
                          step=step, source="trainer", traceback=traceback.format_exc())
            raise


def without_mcp_restarts(env: Environment) -> Environment:
    """The environment with every MCP server set to fail fast when it dies (``mcp_restart = false``)."""
    from rlft.mcp import MCPServer

    return replace(env, tools=[replace(t, restart=False) if isinstance(t, MCPServer) else t for t in env.tools])


def _progress(cfg: TrainConfig) -> Any:
    from rlft.progress import Progress

    return Progress(cfg.steps, enabled=cfg.progress) if distributed.is_main() else distributed.Silent()


def _build(stack: contextlib.ExitStack, cfg: TrainConfig, store: Any, run_id: str, env: Environment,
           train_set: Dataset, eval_set: Dataset, progress: Any, *, resume: bool) -> Run:
    """Everything after the run row exists, each closer registered on ``stack`` as it opens."""
    import torch

    from rlft.engines import factory  # make_engine looked up at call time: tests replace it
    from rlft.policy import LoraSpec, load_policy
    from rlft.renderer import Renderer
    from rlft.reporting import Reporter
    from rlft.training.checkpoint import load_checkpoint, load_weights
    from rlft.training.sync import WeightSync

    run_dir = store.run_dir(run_id)
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.toml")
    store.set_status(run_id, "running")
    loop = asyncio.new_event_loop()
    stack.callback(loop.close)

    # -- model, engine, optimizer ----------------------------------------------------------------
    lora = LoraSpec(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                    target_modules=(None if cfg.lora_target_modules == "all-linear"
                                    else cfg.lora_target_modules.split(",")))
    # full finetunes keep fp32 master weights and compute under bf16 autocast instead
    weights_dtype = cfg.dtype if cfg.lora else "float32"
    # under torchrun each rank takes its own device (distributed.device()); else the configured one
    device = distributed.device() if distributed.is_distributed() else cfg.device
    init = init_checkpoint(store, cfg.init_from, lora=cfg.lora) if cfg.init_from and not resume else None
    base_model = str(init.path) if init is not None and not init.adapter else cfg.model  # full weights: the model
    policy = load_policy(base_model, dtype=weights_dtype, lora=lora if cfg.lora else None, device=device,
                         gradient_checkpointing=cfg.gradient_checkpointing, chat_template=cfg.chat_template or None)
    if init is not None:
        if init.adapter:
            load_weights(policy, init.path)
        store.add_log(run_id, f"weights from {init.describe()}", source="trainer")
    if cfg.beta > 0 and not policy.is_lora:
        policy.freeze_reference()  # the base weights, not a resumed checkpoint's
    # weights first: the engine copies them and FSDP2 shards them
    ckpt = resume_checkpoint(store, run_id, run_dir, policy, progress) if resume else None
    renderer = Renderer(policy.tokenizer, tool_parser=cfg.tool_parser, tool_format=cfg.tool_format)
    # before sharding: an FSDP2 engine copies the whole model
    engine = factory.make_engine(factory.engine_options(cfg), policy, tag=run_id)
    stack.callback(engine.close)
    # DDP / FSDP2 under torchrun; else policy.model itself
    train_model = distributed.wrap(policy.model, cfg.distributed, bf16=cfg.dtype == "bfloat16")
    rollouts: Any = env
    if cfg.rollout_workers > 0:  # Ray is imported only here
        from rlft.ray_workers import pool_from_config

        rollouts = pool_from_config(cfg, engine)
        stack.callback(rollouts.shutdown)
    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
    sampler = Sampler(engine, renderer, params, max_seq_len=cfg.max_seq_len)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.learning_rate,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.steps, cfg.warmup_steps, cfg.lr_schedule))
    reporter = Reporter(cfg.report_to if distributed.is_main() else "", run_id, run_dir, cfg.to_dict())
    stack.callback(reporter.close)

    start = 0
    if ckpt:
        start = load_checkpoint(ckpt[1], policy, optimizer, scheduler, weights=False, model=train_model)["step"]
        store.add_log(run_id, f"resumed from checkpoint at step {start}", step=start, source="trainer")
    store.truncate_after(run_id, start)  # rows of steps after the checkpoint are redone
    # the engine must serve the trainer's weights: pushed after every step, then checked (rlft.training.sync)
    sync_root = run_dir if distributed.is_main() else run_dir / f"rank{distributed.rank()}"  # each rank's own pushes
    syncer = WeightSync(policy, engine, renderer, sync_root, loop, check=cfg.sync_check,
                        tolerance=cfg.sync_tolerance, autocast=cfg.dtype == "bfloat16",
                        on_policy=not cfg.overlap and cfg.top_p >= 1.0 and cfg.top_k == 0)
    store.log_metrics(run_id, start, syncer.start(start))
    session = contextlib.AsyncExitStack()  # the environment's shared resources (MCP servers)
    loop.run_until_complete(session.enter_async_context(env.session()))
    stack.callback(_close_quietly, loop, session)

    run = Run(cfg=cfg, run_id=run_id, run_dir=run_dir, store=store, env=env, train_set=train_set,
              eval_set=eval_set, policy=policy, train_model=train_model, engine=engine, sampler=sampler,
              rollouts=rollouts, optimizer=optimizer, scheduler=scheduler, syncer=syncer, reporter=reporter,
              progress=progress, loop=loop, start_step=start)
    # Closed first: the DDP/FSDP wrapper holds the process group; freed at interpreter exit
    # instead, gloo's worker threads were once destroyed unjoined there (SIGABRT on a rank after
    # a run that had completed).
    stack.callback(_release_wrapper, run)
    return run


def _close_quietly(loop: asyncio.AbstractEventLoop, session: contextlib.AsyncExitStack) -> None:
    with contextlib.suppress(Exception):
        loop.run_until_complete(session.aclose())


def _release_wrapper(run: Run) -> None:
    if distributed.is_distributed():
        run.train_model = None
        gc.collect()


__all__ = ["Run", "as_config", "loss_config", "lr_factor", "open_run", "seed_everything", "update_config"]

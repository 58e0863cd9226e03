"""train(config): the full training loop, top to bottom.

Each step: take the step's P prompts (a pure function of step and seed, so resume is exact),
sample G rollouts per prompt (concurrently, tools and rewards included), turn rewards into
group-relative advantages, update the policy on the sampled tokens only, push the new weights to
the engine, record metrics and rollouts in the run store, checkpoint every N steps and evaluate
on the held-out split every M. Each of these is a function below, over the :class:`Run` that
``rlft.training.run.open_run`` builds and tears down (a failure anywhere marks the run failed).

What this loop adds to ``rlft.training.minimal`` (read that one first):
- multi-process (torchrun): prompts are sharded per rank, groups and metrics gathered, rank 0
  writes, all ranks checkpoint together (``rlft.distributed``);
- overlap (``overlap = true``): :class:`SampleAhead` samples step n+1 from the engine's own copy
  of the weights while step n trains in a thread; those rollouts lag one version, and the update
  takes the sampler's logprobs as their old policy;
- the SFT warm-up before step 1 (``sft_data``, ``rlft.training.warmup``);
- demonstration-guided groups (``guidance``, LUFFY: ``rlft.training.guidance``);
- dynamic sampling (``refill``), resume, validation before step 1, the step-1 signal report,
  stop requests from the console, trackers, and the held-out evals.
Left out here: the update's math (``rlft.training.update``, ``rlft.training.grpo``), weight sync
(``rlft.training.sync``) and rollouts (``rlft.env``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from rlft import distributed
from rlft.allocator import release_freed_memory
from rlft.config import TrainConfig
from rlft.errors import ValidationError
from rlft.faults import kill_point
from rlft.metrics import group_metrics
from rlft.training.run import Run, as_config, open_run, update_config
from rlft.types import Group


def train(config: TrainConfig | dict | str | None = None, *, environment=None, dataset=None,
          resume: str | None = None, **overrides: Any) -> str:
    """Train a policy on an environment; returns the run id.

    ``config``: a TrainConfig, a dict, or a TOML path; keyword overrides win (``steps=5``).
    ``environment`` / ``dataset``: objects to use instead of the config's ``env`` / ``data``.
    ``resume``: a run id (or name) to continue from its last checkpoint."""
    with open_run(as_config(config, overrides), environment=environment, dataset=dataset, resume=resume) as run:
        cfg = run.cfg  # a resumed run's own config
        base_eval = warm_eval = None
        if cfg.guidance != "off":
            from rlft.training.guidance import check_guidance

            check_guidance(run.env)
        if run.start_step == 0:
            if cfg.validate:
                validate_environment(run)
            if cfg.sft_data:  # 0. the SFT warm-up: its steps are -N+1..0, the base eval at -N
                from rlft.training.warmup import plan_warmup, warm_up

                plan = plan_warmup(run)
                base_eval = evaluate(run, -plan.steps)
                warm_up(run, plan)
                warm_eval = evaluate(run, 0)
            else:
                base_eval = evaluate(run, 0)
        elif eval_due(cfg, run.start_step):  # killed between this step's checkpoint and its eval (or its mark)
            recorded = [e["metrics"] for e in run.store.evals(run.run_id)
                        if e["step"] == run.start_step and e["split"] == "eval"]
            keep_if_best(run, run.start_step, recorded[-1] if recorded else evaluate(run, run.start_step), {})
        with SampleAhead(run) as ahead:
            run.progress.start(run.start_step)
            for step in range(run.start_step, cfg.steps):
                t_step = time.perf_counter()
                groups, t_generate = ahead.groups(step)  # 1. sample
                metrics = batch_metrics(run, groups, step)
                metrics.update(ahead.sync_before(step, groups))
                if step == run.start_step:
                    report_signal(run, groups, step)
                metrics.update(guide(run, groups, step))  # (LUFFY: demonstrations in unsolved groups)
                train_groups, skipped = advantages(run, groups, step)  # 2. advantages (+ refill)
                kill_point("mid_step", step + 1)
                ahead.start(step + 1)  # overlap: the next step samples meanwhile, with these weights
                t0 = time.perf_counter()
                metrics.update(update(run, train_groups, step, in_thread=ahead.running))  # 3. update
                metrics.update(ahead.sync_after(step + 1))
                t_train = time.perf_counter() - t0
                metrics.update({"batch/skipped_groups": float(skipped), "optim/lr": run.scheduler.get_last_lr()[0],
                                "time/generate": t_generate, "time/train": t_train,
                                "time/step": time.perf_counter() - t_step})
                record(run, step + 1, groups, metrics, t_generate)  # 4. record
                done = step + 1 == cfg.steps
                stop = distributed.broadcast_object(run.store.stop_requested(run.run_id))  # all ranks stop together
                if done or stop or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0):
                    checkpoint(run, step + 1, metrics)  # 5. checkpoint
                if eval_due(cfg, step + 1):
                    kill_point("before_eval", step + 1)
                    ahead.drain(step + 1)  # evaluate the new weights, not the ones sampling ahead
                    keep_if_best(run, step + 1, evaluate(run, step + 1), metrics)  # 6. evaluate
                if stop:
                    run.store.set_status(run.run_id, "stopped")
                    run.progress.note(f"stopped at step {step + 1} (checkpoint saved)")
                    distributed.barrier()  # every rank tears down together
                    return run.run_id
        final_eval = evaluate(run, cfg.steps)
        keep_if_best(run, cfg.steps, final_eval, {})  # the last step always has its checkpoint
        run.progress.finish()
        if base_eval and final_eval:
            chain = [e for e in (base_eval, warm_eval, final_eval) if e]
            rewards = " -> ".join(f"{e['reward/mean']:.3f}" for e in chain)
            passes = " -> ".join(f"{e['pass@k']:.2f}" for e in chain)
            run.note(f"held-out reward {rewards}, pass@{cfg.eval_k} {passes}"
                     + (" (base -> after warm-up -> after RL)" if warm_eval else "") + run.best_note(), step=cfg.steps)
        run.store.set_status(run.run_id, "completed")
        distributed.barrier()  # every rank tears down together
        return run.run_id


# -- the phases --------------------------------------------------------------------------------------


async def sample(run: Run, step: int) -> tuple[list[Group], float]:
    """This rank's share of the step's prompts, G rollouts each, and the seconds sampling took
    (its own clock: under overlap it runs beside the update, so not the wait for it)."""
    t0 = time.perf_counter()
    cfg = run.cfg
    examples = distributed.shard(run.train_set.batch(step, cfg.batch_size, cfg.seed))
    groups = await run.rollouts.run_groups(examples, run.sampler_at(step, "train"), cfg.group_size,
                                           max_concurrency=cfg.max_concurrency)
    release_freed_memory()  # the KV caches' heap back to the OS before the update (rlft.allocator)
    return groups, time.perf_counter() - t0


def batch_metrics(run: Run, groups: list[Group], step: int) -> dict[str, float]:
    """Reward and rollout statistics of the whole batch (every rank's groups) and the policy lag."""
    from rlft.training.sync import policy_lag

    all_groups = distributed.gather_groups(groups)  # rank 0: the whole batch
    metrics = group_metrics(all_groups, run.cfg.success_threshold)
    metrics.update(policy_lag(all_groups, step))
    return metrics


def guide(run: Run, groups: list[Group], step: int) -> dict[str, float]:
    """``guidance = "demonstrate"``: each group of this rank with no success gets its row's played
    demonstration as a member (``rlft.training.guidance``); the batch metrics above were taken
    before, so they stay the policy's own. Why a row got none goes to the run's log."""
    if run.cfg.guidance == "off":
        return {}
    from rlft.training.guidance import guide_groups

    report = run.wait(guide_groups(run.env, groups, run.sampler.renderer, success_threshold=run.cfg.success_threshold,
                                   policy_version=step, max_concurrency=run.cfg.max_concurrency))
    for problem in report.problems:
        run.store.add_log(run.run_id, f"[guidance] {problem}", level="warning", step=step + 1, source="guidance")
    (guided,) = distributed.all_reduce_sum([float(report.groups)])
    return {"batch/guided_groups": guided}


def advantages(run: Run, groups: list[Group], step: int) -> tuple[list[Group], int]:
    """Set every rollout's advantage; returns (groups to train on, groups left out). Dynamic
    sampling: ``skip`` leaves tied groups out; ``refill`` also samples up to 3 more batches of
    prompts (a seeded side stream of the data, and its own sampling seeds) to replace them. The
    refilled groups are appended to ``groups``, so they are recorded with the step; their
    ``group_index`` continues after the step's own (refill n: n*G..n*G+G-1)."""
    from rlft.training.update import select_groups

    cfg = run.cfg
    select = dict(baseline=cfg.baseline, std_normalize=cfg.std_normalize == "true",
                  drop_tied=cfg.dynamic_sampling != "off",
                  overlong_penalty=(run.env.max_tokens, cfg.overlong_cache) if cfg.overlong == "penalty" else None)
    train_groups, skipped = select_groups(groups, **select)
    local_batch = cfg.batch_size // distributed.world_size()
    refill = 0
    while cfg.dynamic_sampling == "refill" and len(train_groups) < local_batch and refill < 3:
        refill += 1
        extra = run.train_set.batch(step, local_batch - len(train_groups),
                                    cfg.seed + 7919 * refill + 104729 * distributed.rank())
        # its own seed stream: an example drawn again would otherwise sample the very same tokens
        more = run.wait(run.rollouts.run_groups(extra, run.sampler_at(step, "refill", refill, distributed.rank()),
                                                cfg.group_size, max_concurrency=cfg.max_concurrency))
        for g in more:  # numbered after the step's own samples of the example, so none is overwritten in the store
            for r in g.rollouts:
                r.group_index += cfg.group_size * refill
        more_groups, _ = select_groups(more, **select)
        train_groups += more_groups
        groups += more
    return train_groups, skipped


def update(run: Run, groups: list[Group], step: int, *, in_thread: bool) -> dict[str, float]:
    """One policy update (+ the learning-rate schedule's step). ``in_thread``: overlap, where the
    update runs in a thread while this event loop drives the next step's rollouts; the engine
    then samples from its own copy, so it is not paused."""
    from rlft.training.update import policy_update

    settings = update_config(run.cfg, sync_tolerance=run.syncer.rollout_tolerance)

    def step_once() -> dict[str, float]:
        # no forward pass of the engine while the weights change
        with contextlib.nullcontext() if run.cfg.overlap else run.engine.paused():
            out = policy_update(run.policy, groups, settings, run.optimizer, model=run.train_model,
                                policy_version=step)
            run.scheduler.step()
        release_freed_memory()  # the activations' heap back to the OS: sampling does not need it (rlft.allocator)
        return out

    return run.wait(asyncio.to_thread(step_once)) if in_thread else step_once()


def record(run: Run, at_step: int, groups: list[Group], metrics: dict[str, float], t_generate: float) -> None:
    """Rollouts (every rank's, advantages set) and metrics to the store, trackers and the terminal."""
    groups = distributed.gather_groups(groups)
    sampled = sum(r.num_sampled_tokens for g in groups for r in g.rollouts)
    metrics["throughput/tokens_per_s"] = sampled / max(t_generate, 1e-9)
    run.store.add_rollouts(run.run_id, at_step, [r for g in groups for r in g.rollouts])
    if distributed.is_main():  # health: a line when a finding first appears (rlft.health.source.Monitor)
        from rlft.health.source import watch

        watch(run, at_step, metrics)
    run.store.log_metrics(run.run_id, at_step, metrics)
    run.reporter.log(at_step, metrics)
    run.store.update_run(run.run_id, step=at_step)
    run.progress.update(at_step, metrics)


def checkpoint(run: Run, at_step: int, metrics: dict[str, float]) -> None:
    """Save the weights, optimizer and data cursor; record it and prune old ones. Every rank calls
    it (FSDP2 gathers the weights to rank 0, which alone writes)."""
    from rlft.training.checkpoint import save_checkpoint

    path = save_checkpoint(run.run_dir, at_step, run.policy, run.optimizer, run.scheduler,
                           {"config": run.cfg.to_dict()}, model=run.train_model)
    kill_point("checkpoint_unrecorded", at_step)
    if distributed.is_main():  # a kill between these writes is repaired on resume (checkpoint.reconcile)
        run.store.add_checkpoint(run.run_id, at_step, str(path), metrics={"reward/mean": metrics.get("reward/mean")})
        prune(run)


def prune(run: Run) -> None:  # rank 0
    from rlft.training.checkpoint import prune_checkpoints

    for removed in prune_checkpoints(run.run_dir, run.cfg.keep_checkpoints, keep_best=run.cfg.keep_best):
        run.store.remove_checkpoint(run.run_id, removed)


def keep_if_best(run: Run, at_step: int, eval_metrics: dict[str, float] | None, metrics: dict[str, float]) -> None:
    """``keep_best``: when the held-out eval after ``at_step`` is the run's best so far (ties: the later
    step), that step's checkpoint is saved (if it had none; an eval leaves the state as it was) and
    marked, so pruning spares it and ``--step best`` finds it: a run that collapses late keeps its best."""
    from rlft.training.checkpoint import STATE_FILE, beats_best, checkpoint_dir, mark_best

    if not run.cfg.keep_best or at_step <= 0:
        return
    reward = eval_metrics["reward/mean"] if eval_metrics else None  # rank 0's; every rank follows its decisions
    if not distributed.broadcast_object(reward is not None and beats_best(run.run_dir, at_step, reward)):
        return
    if not distributed.broadcast_object((checkpoint_dir(run.run_dir, at_step) / STATE_FILE).exists()):
        checkpoint(run, at_step, metrics)
    kill_point("best_unmarked", at_step)
    if distributed.is_main():
        mark_best(run.run_dir, at_step, reward)
        run.store.add_log(run.run_id, f"best held-out eval so far: step {at_step}, reward {reward:.3f} "
                          "(its checkpoint is kept: --step best)", source="trainer")
        prune(run)


def evaluate(run: Run, at_step: int) -> dict[str, float] | None:
    """Held-out eval on rank 0 (k samples per prompt, its own seed stream), recorded as eval
    rows, eval rollouts and ``eval/*`` metrics."""
    if not len(run.eval_set):
        return None
    # the engine's last push, if only the next step's rollouts were to check it (on every rank:
    # the probe's trainer forward is a collective under FSDP2)
    run.store.log_metrics(run.run_id, at_step, run.syncer.before_eval())
    metrics = _eval_on_main(run, at_step) if distributed.is_main() else None
    # the KV the probe and the eval kept: the next step's rollouts would reuse it and prefill in
    # other batch shapes than without this eval, and in bf16 a near-tie then samples another token
    # (SmolLM2's demo rewards moved with eval_every); dropped, the eval schedule leaves training as it was
    run.engine.clear_prefix_cache()
    return metrics


def _eval_on_main(run: Run, at_step: int) -> dict[str, float]:
    from rlft.evaluate import evaluate as run_eval

    cfg = run.cfg
    examples = list(run.eval_set)[: cfg.eval_max_examples or None]
    metrics, groups = run.wait(run_eval(run.env, examples, run.sampler_at(at_step, "eval"), k=cfg.eval_k,
                                        temperature=cfg.eval_temperature, success_threshold=cfg.success_threshold,
                                        max_concurrency=cfg.max_concurrency))
    release_freed_memory()
    run.store.add_rollouts(run.run_id, at_step, [r for g in groups for r in g.rollouts], split="eval")
    run.store.log_metrics(run.run_id, at_step, {f"eval/{k}": v for k, v in metrics.items()})
    run.reporter.log(at_step, {f"eval/{k}": v for k, v in metrics.items()})
    # the eval row last: it marks the eval done (the rows above are upserts a re-run overwrites)
    run.store.add_eval(run.run_id, model=f"{cfg.model}@{at_step}", split="eval", k=cfg.eval_k, metrics=metrics,
                       step=at_step)
    run.progress.note(f"eval @ step {at_step}: reward {metrics['reward/mean']:.3f}, pass@{cfg.eval_k} "
                      f"{metrics['pass@k']:.2f}")
    return metrics


def eval_due(cfg: TrainConfig, step: int) -> bool:
    """Whether the held-out eval runs after ``step`` within the loop (the final one runs after it)."""
    return bool(cfg.eval_every) and step % cfg.eval_every == 0 and step != cfg.steps


def validate_environment(run: Run) -> None:
    """One group of 2 rollouts end to end before step 1; a broken environment stops the run here."""
    from rlft.evaluate import format_transcript, validate

    report = run.wait(validate(run.env, run.train_set[0], run.sampler))
    for ro in report.groups[0].rollouts:
        run.store.add_log(run.run_id, format_transcript(ro), source="validate")
    if not report.ok:
        raise ValidationError(
            "validation failed before step 1 (one group of 2 rollouts on the first training row):\n- "
            + "\n- ".join(report.problems) + "\n"
            + "\n".join(format_transcript(r, tracebacks=False) for r in report.groups[0].rollouts)
            + f"\nWhat to do: fix what is named above (the tracebacks are in `rlft runs logs {run.run_id}`), check "
              "one row by hand with `rlft validate CONFIG`, or set validate = false to start anyway (failing "
              "rewards then score 0 and are counted in rollout/errors).")


def report_signal(run: Run, groups: list[Group], step: int) -> None:
    """The first step's signal line: base reward, pass@G, tied groups, and warnings (tools never called
    validly included, with the warm-up command: the advice is needed at step 1, whatever the tied share)."""
    from rlft.evaluate import signal_report

    cfg = run.cfg
    report = signal_report(distributed.gather_groups(groups), cfg.success_threshold, tools=len(run.env.tools))
    m = report.metrics
    run.note(f"[signal] step {step + 1}: mean reward {m.get('reward/mean', 0):.3f}, pass@{cfg.group_size} "
             f"{m.get('pass@k', 0):.2f}, max@{cfg.group_size} {m.get('max@k', 0):.3f}, "
             f"tied groups {report.zero_variance_share:.0%}", step=step, source="signal")
    for w in report.warnings:
        run.note(f"[signal] {w}", level="warning", step=step, source="signal")


class SampleAhead:
    """Where a step's rollouts come from, and when the engine gets new weights.

    Off (``overlap = false``): each step samples when it starts, and the weights are pushed right
    after its update. On: after step n's advantages, step n+1's sampling starts as a task on the
    event loop while step n's update runs in a thread; the engine keeps sampling from its own
    copy, and gets step n's weights once those rollouts are in (or before an eval)."""

    def __init__(self, run: Run):
        self.run = run
        self.pending: asyncio.Task | None = None
        self.engine_version = run.start_step  # the weights the engine serves

    def __enter__(self) -> SampleAhead:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.pending is not None and not self.pending.done():  # a stop or failure leaves one step in flight
            self.pending.cancel()
            with contextlib.suppress(BaseException):
                self.run.wait(self.pending)

    @property
    def running(self) -> bool:
        return self.pending is not None

    def groups(self, step: int) -> tuple[list[Group], float]:
        pending, self.pending = self.pending, None
        return self.run.wait(pending if pending is not None else sample(self.run, step))

    def start(self, step: int) -> None:
        if self.run.cfg.overlap and step < self.run.cfg.steps:
            self.pending = self.run.loop.create_task(sample(self.run, step))

    def sync_before(self, step: int, groups: list[Group]) -> dict[str, float]:
        """Overlap: the engine was sampling ``groups`` when the last update ended; push it now.
        Otherwise they were sampled after the last push: their version labels are its check."""
        if self.engine_version < step:
            return self._push(step)
        self.run.syncer.check_versions(groups, step)  # WeightSyncError when the engine is stale
        return {}

    def sync_after(self, version: int) -> dict[str, float]:
        """After an update: push now, unless the engine is busy sampling ahead."""
        return self._push(version) if self.pending is None else {}

    def drain(self, version: int) -> None:
        """Before an eval under overlap: let the engine finish its rollouts, then push the new weights."""
        if self.pending is not None:
            self.run.wait(self.pending)
            self.run.store.log_metrics(self.run.run_id, version, self._push(version))

    def _push(self, version: int) -> dict[str, float]:
        metrics = self.run.syncer.after_update(version)  # WeightSyncError when the engine is stale or mismatched
        self.engine_version = version
        return metrics


__all__ = ["SampleAhead", "advantages", "batch_metrics", "checkpoint", "eval_due", "evaluate", "guide", "record",
           "report_signal", "sample", "train", "update", "validate_environment"]

"""``sft(config) -> run_id``: a supervised finetuning run, recorded like an RL run.

The run lives in the same run store (kind "sft"), so ``rlft runs`` and the console show it;
its checkpoints have the RL format (``rlft.training.checkpoint``: the policy as plain Hugging Face
files + ``trainer_state.pt``), so ``model = "<runs>/<run>/checkpoints/step-N"`` starts an RL run
from it (or ``load_policy``/``load_weights`` on that directory). Per step it logs ``sft/loss``,
``optim/lr``, ``optim/grad_norm``, ``time/step``, ``sft/tokens_per_s`` (non-padding tokens through
forward + backward per second) and ``sft/trained_tokens``; ``eval/loss`` before training, every
``eval_every`` steps and after the last. Early stopping: ``patience`` evals in a row without a
lower eval loss than the best so far. With ``keep_best`` the run ends on its best checkpoint
(checkpoints after it are removed, so "latest" is the best). The step's batch is ``batch_size``
transcripts from a seeded per-epoch shuffle. Left out: resuming an SFT run, multi-process
training, packing several transcripts into one row (``rlft.sft.loss`` says why).
"""

from __future__ import annotations

import math
import random
import shutil
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlft.config import ConfigError
from rlft.sft.config import SFTConfig, load_sft_config
from rlft.sft.prepare import SFTData, prepare

# every metric key an SFT run stores (rlft.metrics.KEYS lists the RL trainer's)
SFT_KEYS = ["sft/loss", "eval/loss", "optim/lr", "optim/grad_norm", "time/step", "sft/tokens_per_s",
            "sft/trained_tokens", "sft/epoch"]


class SFTSetupError(ConfigError):
    """The run could not start (model, tokenizer, data): a user error, raised before the run
    exists (the original exception is its ``__cause__``). ``rlft sft`` exits 2 with its message."""


def as_sft_config(config: Any = None, overrides: dict[str, Any] | None = None, *, need_data: bool = True) -> SFTConfig:
    """A resolved SFTConfig from an SFTConfig, a dict, a TOML path or None, plus overrides."""
    from dataclasses import asdict

    if isinstance(config, (SFTConfig, dict)):
        values = asdict(config) if isinstance(config, SFTConfig) else config
        return load_sft_config(None, {**values, **(overrides or {})}).resolved(need_data=need_data)
    return load_sft_config(config, overrides or {}).resolved(need_data=need_data)


def batches(n: int, batch_size: int, seed: int) -> Iterator[tuple[float, list[int]]]:
    """(epochs done after this batch, indices) per optimizer step: each epoch a seeded shuffle of
    range(n) cut into batches of ``batch_size`` (an epoch's last one may be smaller), endlessly."""
    epoch = 0
    while True:
        order = list(range(n))
        random.Random(f"sft-order-{seed}-{epoch}").shuffle(order)
        for s in range(0, n, batch_size):
            part = order[s: s + batch_size]
            yield epoch + (s + len(part)) / n, part
        epoch += 1


def planned_steps(cfg: SFTConfig, n_train: int) -> int:
    return cfg.steps or cfg.epochs * math.ceil(n_train / cfg.batch_size)


def sft(config: Any = None, *, prepared: SFTData | None = None, **overrides: Any) -> str:
    """Run supervised finetuning; returns the run id. ``config``: an SFTConfig, a dict, a TOML
    path or None, with ``overrides`` (config keys, ``data=...`` included). ``prepared``: sequences
    already prepared (``rlft.sft.prepare``), used instead of reading ``data``. Raises
    ``ConfigError`` (``SFTSetupError``) for user errors, before the run exists; once it exists,
    any exception marks it failed (Ctrl-C: stopped) with the reason, then propagates."""
    from rlft.store import RunStore

    cfg = as_sft_config(config, overrides, need_data=prepared is None)
    store = RunStore(cfg.runs_dir)
    try:
        try:
            policy, renderer = _load(cfg)
            data = prepared if prepared is not None else prepare(cfg, renderer)
        except ConfigError:
            raise
        except (ValueError, OSError, RuntimeError) as e:  # PolicyLoadError, a bad file, a template that cannot render
            raise SFTSetupError(f"{type(e).__name__}: {e}") from e
        run_id = store.create_run(name=cfg.run_name or None, config=cfg.to_dict(), model=cfg.model,
                                  environment=f"sft:{Path(cfg.data).name}" if cfg.data else "sft", kind="sft")
        try:
            _train(cfg, store, run_id, policy, data)
        except KeyboardInterrupt:
            store.set_status(run_id, "stopped", error="interrupted (Ctrl-C)")
            raise
        except BaseException as e:
            store.set_status(run_id, "failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            raise
        return run_id
    finally:
        store.close()


def _load(cfg: SFTConfig) -> tuple[Any, Any]:
    """(policy, renderer) as an RL run of the same config loads them."""
    from rlft.policy import LoraSpec, load_policy
    from rlft.renderer import Renderer

    targets = None if cfg.lora_target_modules == "all-linear" else cfg.lora_target_modules.split(",")
    lora = LoraSpec(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=targets)
    # full finetunes keep fp32 master weights and compute under bf16 autocast (as RL does)
    policy = load_policy(cfg.model, dtype=cfg.dtype if cfg.lora else "float32", lora=lora if cfg.lora else None,
                         device=cfg.device, gradient_checkpointing=cfg.gradient_checkpointing,
                         chat_template=cfg.chat_template or None)
    return policy, Renderer(policy.tokenizer, tool_parser=cfg.tool_parser, tool_format=cfg.tool_format)


class _Checkpoints:
    """Which checkpoints exist and which is the best; removes those no longer wanted."""

    def __init__(self, cfg: SFTConfig, store: Any, run_id: str, policy: Any, optimizer: Any, scheduler: Any):
        self.cfg, self.store, self.run_id = cfg, store, run_id
        self.policy, self.optimizer, self.scheduler = policy, optimizer, scheduler
        self.run_dir = store.run_dir(run_id)
        self.saved: dict[int, Path] = {}
        self.metrics: dict[int, dict[str, Any]] = {}  # what the store shows beside each checkpoint
        self.periodic: set[int] = set()
        self.best_step: int | None = None
        self.best_loss = math.inf

    def save(self, step: int, metrics: dict[str, Any]) -> None:
        from rlft.training.checkpoint import save_checkpoint

        if step not in self.saved:
            self.saved[step] = save_checkpoint(self.run_dir, step, self.policy, self.optimizer, self.scheduler,
                                               extra={"kind": "sft"})
        self.metrics[step] = {**self.metrics.get(step, {}), **metrics}
        self.store.add_checkpoint(self.run_id, step, str(self.saved[step]), metrics=self.metrics[step])

    def remove(self, step: int) -> None:
        shutil.rmtree(self.saved.pop(step), ignore_errors=True)
        self.metrics.pop(step, None)
        self.store.remove_checkpoint(self.run_id, step)

    def new_best(self, step: int, loss: float, metrics: dict[str, Any]) -> None:
        old = self.best_step
        self.best_step, self.best_loss = step, loss
        self.save(step, {**metrics, "best": True})
        if old is not None and old != step and old not in self.periodic:
            self.remove(old)
        elif old is not None and old in self.saved:
            self.save(old, {"best": False})

    def finish(self, step: int, metrics: dict[str, Any]) -> None:
        """The last step: saved unless the run ends on an earlier best; later ones removed."""
        if self.cfg.keep_best and self.best_step is not None:
            for s in [s for s in self.saved if s > self.best_step]:
                self.remove(s)
        elif step not in self.saved:
            self.save(step, metrics)


def _report_best(ckpts: _Checkpoints, base_loss: float | None, note: Any) -> None:
    """The run's last log lines: its best checkpoint, and a warning when training never beat the base."""
    if ckpts.best_step is None:
        return
    gained = "" if base_loss is None else f" (before training {base_loss:.4f})"
    note(f"best checkpoint: step {ckpts.best_step}, eval loss {ckpts.best_loss:.4f}{gained}: "
         f"{ckpts.saved.get(ckpts.best_step)}")
    if base_loss is not None and ckpts.best_loss >= base_loss:
        note("the held-out loss never went below the untrained model's: lower the learning rate or check "
             "that the held-out transcripts resemble the training ones", "warning")


def _train(cfg: SFTConfig, store: Any, run_id: str, policy: Any, data: SFTData) -> None:
    import torch

    from rlft.sft.loss import eval_loss, train_step
    from rlft.training.run import lr_factor, seed_everything

    run_dir = store.run_dir(run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.toml")
    store.set_status(run_id, "running")
    seed_everything(cfg.seed)
    steps = planned_steps(cfg, len(data.train))
    store.update_run(run_id, config={**cfg.to_dict(), "steps": steps})  # the console shows step / steps

    def note(message: str, level: str = "info", step: int | None = None) -> None:
        store.add_log(run_id, message, level=level, step=step, source="sft")
        if cfg.progress:
            print(message, file=sys.stderr, flush=True)

    note(f"sft: {len(data.train)} train / {len(data.eval)} held-out transcripts, {steps} steps of {cfg.batch_size}")
    for p in data.problems:
        note(p, level="warning")
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(steps, cfg.warmup_steps, cfg.lr_schedule))
    ckpts = _Checkpoints(cfg, store, run_id, policy, optimizer, scheduler)
    bf16 = cfg.dtype == "bfloat16"

    def evaluate(step: int) -> float | None:
        if not data.eval:
            return None
        loss = eval_loss(policy, data.eval, micro_batch_tokens=cfg.micro_batch_tokens, bf16=bf16,
                         shared_prefix=cfg.shared_prefix)
        store.log_metrics(run_id, step, {"eval/loss": loss})
        return loss

    base_loss = evaluate(0)
    evals_without_gain, stopped_early, step = 0, False, 0
    order = batches(len(data.train), cfg.batch_size, cfg.seed)
    for step in range(1, steps + 1):
        if store.stop_requested(run_id):
            note(f"stop requested: stopping after step {step - 1}", step=step - 1)
            if step > 1:
                ckpts.finish(step - 1, {})
            store.set_status(run_id, "stopped")
            return
        epoch, idx = next(order)
        lr = scheduler.get_last_lr()[0]
        t0 = time.perf_counter()
        st = train_step(policy, [data.train[i] for i in idx], optimizer, micro_batch_tokens=cfg.micro_batch_tokens,
                        max_grad_norm=cfg.max_grad_norm, bf16=bf16, shared_prefix=cfg.shared_prefix)
        scheduler.step()
        dt = time.perf_counter() - t0
        metrics = {"sft/loss": st["loss"], "optim/lr": lr, "optim/grad_norm": st["grad_norm"], "time/step": dt,
                   "sft/tokens_per_s": st["tokens"] / dt, "sft/trained_tokens": st["trained_tokens"],
                   "sft/epoch": epoch}
        last = step == steps
        ev = evaluate(step) if (cfg.eval_every and step % cfg.eval_every == 0) or last else None
        if ev is not None:
            metrics["eval/loss"] = ev
        store.log_metrics(run_id, step, metrics)
        store.update_run(run_id, step=step)
        if cfg.progress:
            print(f"sft step {step}/{steps}  loss {st['loss']:.4f}" + (f"  eval {ev:.4f}" if ev is not None else "")
                  + f"  {metrics['sft/tokens_per_s']:.0f} tok/s  {dt:.2f} s", file=sys.stderr, flush=True)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            ckpts.periodic.add(step)
            ckpts.save(step, metrics)
        if ev is not None and not math.isnan(ev):
            if ev < ckpts.best_loss:
                ckpts.new_best(step, ev, metrics)
                evals_without_gain = 0
            else:
                evals_without_gain += 1
                if cfg.patience and evals_without_gain >= cfg.patience and not last:
                    note(f"early stop at step {step}: eval loss has not improved on {ckpts.best_loss:.4f} "
                         f"(step {ckpts.best_step}) for {evals_without_gain} evals", step=step)
                    stopped_early = True
                    break
    if step:
        ckpts.finish(step, metrics)
    _report_best(ckpts, base_loss, lambda message, level="info": note(message, level, step))
    store.update_run(run_id, step=step)
    store.set_status(run_id, "completed")
    if stopped_early:
        store.add_log(run_id, "completed early (patience)", step=step, source="sft")


def best_checkpoint(store: Any, run_id: str) -> tuple[int, Path] | None:
    """(step, path) of the run's checkpoint marked best (lowest eval loss), else its latest."""
    rows = store.checkpoints(run_id)
    best = [r for r in rows if (r.get("metrics") or {}).get("best")]
    row = (best or rows or [None])[-1]
    return (row["step"], Path(row["path"])) if row else None


__all__ = ["SFT_KEYS", "SFTSetupError", "as_sft_config", "batches", "best_checkpoint", "planned_steps", "sft"]

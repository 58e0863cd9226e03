"""Checkpoints: save, find, load and prune, written atomically.

A checkpoint is a directory ``<run_dir>/checkpoints/step-000010/`` holding the policy as plain
Hugging Face files (a LoRA adapter loadable by ``peft``, or full weights loadable by
``transformers``, both safetensors, plus the tokenizer) and ``trainer_state.pt`` (optimizer,
scheduler, RNG states, step and data cursor). It is written to a temporary directory and
renamed into place, so a kill mid-write never leaves a half checkpoint that looks complete.
Under torchrun every rank calls :func:`save_checkpoint` (an FSDP2-sharded model's weights and
optimizer state are gathered to rank 0 first, a collective) and rank 0 alone writes, so a
checkpoint has the same files whatever the number of ranks. Left out: per-rank sharded files
(``torch.distributed.checkpoint``), which only pay off for models far larger than rlft targets.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.pt"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (temporary directories are ignored)."""
    root = Path(run_dir) / "checkpoints"
    out = []
    for p in root.glob("step-*") if root.exists() else []:
        if p.name.endswith(".tmp") or not (p / STATE_FILE).exists():
            continue
        try:
            out.append((int(p.name.split("-")[1]), p))
        except ValueError:
            continue
    return sorted(out)


def latest_checkpoint(run_dir: str | Path) -> tuple[int, Path] | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(run_dir: str | Path, step: int, policy: Any, optimizer: Any, scheduler: Any,
                    extra: dict[str, Any] | None = None, model: Any = None) -> Path:
    """Write the checkpoint for ``step`` atomically (temp dir + rename) and return its path.
    ``model``: the module the update runs through (``rlft.distributed.wrap``'s result); when it
    is sharded every rank must call this (the gathers are collectives); only rank 0 writes."""
    import torch

    from rlft import distributed

    final = checkpoint_dir(run_dir, step)
    sharded = model is not None and distributed.is_sharded(model)
    weights = distributed.full_state_dict(model, rank0_only=True) if sharded else None
    optim = distributed.full_optimizer_state(model, optimizer) if sharded else optimizer.state_dict()
    if not distributed.is_main():
        return final
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    policy.save(tmp, state_dict=weights)
    # "by_name": a full optimizer state keyed by parameter name (gathered from FSDP2 shards)
    state = {"step": step, "optimizer": optim, "optimizer_format": "by_name" if sharded else "torch",
             "scheduler": scheduler.state_dict(), "rng": rng_state(), **(extra or {})}
    torch.save(state, tmp / STATE_FILE)
    if final.exists():  # re-saving a step (e.g. after a resume): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def load_weights(policy: Any, path: str | Path) -> None:
    """Load a checkpoint's weights into an already built policy (same architecture)."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"checkpoint {path} has no .safetensors weights")
    if policy.is_lora:
        from peft import set_peft_model_state_dict

        for f in files:
            result = set_peft_model_state_dict(policy.model, load_file(f))
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise ValueError(f"checkpoint {f} does not match this model's LoRA adapters: {unexpected[:3]}")
    else:
        model = policy.model
        for f in files:
            model.load_state_dict(load_file(f), strict=False)


def load_checkpoint(path: str | Path, policy: Any, optimizer: Any, scheduler: Any, *, weights: bool = True,
                    model: Any = None) -> dict[str, Any]:
    """Restore weights (unless ``weights=False``: they were loaded before sharding, see
    ``rlft.training.loop``), optimizer, scheduler and RNG states; returns the saved state dict. ``model``:
    the module the update runs through (a sharded one takes its shard of the optimizer state;
    a run resumes under FSDP2 or not, whichever it was saved under)."""
    import torch

    from rlft import distributed

    state_file = Path(path) / STATE_FILE
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=False)
    except Exception as e:
        raise RuntimeError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); "
                           "delete it to resume from the previous one") from e
    if weights:
        load_weights(policy, path)
    distributed.load_optimizer_state(model if model is not None else policy.model, optimizer, state["optimizer"],
                                     by_name=state.get("optimizer_format") == "by_name")
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[int]:
    """Delete all but the newest ``keep`` checkpoints; returns the removed steps."""
    removed = []
    ckpts = list_checkpoints(run_dir)
    for step, p in ckpts[: max(len(ckpts) - keep, 0)]:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(step)
    return removed


def resolve_checkpoint(run_dir: str | Path, step: str | int = "latest") -> tuple[int, Path]:
    """(step, path) of ``step`` ("latest" or a number) in a run directory; a clear error if absent."""
    if str(step) == "latest":
        found = latest_checkpoint(run_dir)
        if not found:
            raise FileNotFoundError(f"run directory {run_dir} has no checkpoint yet")
        return found
    path = checkpoint_dir(run_dir, int(step))
    if not (path / STATE_FILE).exists():
        have = ", ".join(str(s) for s, _ in list_checkpoints(run_dir)) or "none"
        raise FileNotFoundError(f"no checkpoint at step {step} in {run_dir} (checkpoints: {have})")
    return int(step), path

"""Checkpoints: save, find, load and prune, written atomically.

A checkpoint is a directory ``<run_dir>/checkpoints/step-000010/`` holding the policy as plain
Hugging Face files (a LoRA adapter loadable by ``peft``, or full weights loadable by
``transformers``, both safetensors, plus the tokenizer), ``trainer_state.pt`` (optimizer,
scheduler, RNG states, step and data cursor) and ``manifest.json`` (size and SHA-256 of every
other file, written last). It is written to a temporary directory and renamed into place, so a
kill mid-write never leaves a half checkpoint that looks complete; pruning renames a checkpoint
to ``*.deleting`` before removing it, so a kill mid-delete leaves nothing that looks complete
either. :func:`verify_checkpoint` checks a checkpoint against its manifest (a corrupt or
truncated file is named with the reason) and :func:`good_checkpoints` lists those that pass;
:func:`reconcile` repairs the run store's checkpoint rows from the directory (the truth) and
removes leftovers of interrupted writes and deletes. ``checkpoints/best.json`` names the checkpoint
of the run's best held-out eval (``keep_best``): pruning spares it and ``--step best`` finds it.
Under torchrun every rank calls :func:`save_checkpoint` (an FSDP2-sharded model's weights and
optimizer state are gathered to rank 0 first, a collective) and rank 0 alone writes, so a
checkpoint has the same files whatever the number of ranks. Left out: per-rank sharded files
(``torch.distributed.checkpoint``), which only pay off for models far larger than rlft targets.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

from rlft.errors import UserError
from rlft.faults import kill_point

STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"
BEST_FILE = "best.json"  # in <run_dir>/checkpoints: {"step": N, "reward": R}


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used: corrupt, truncated or incomplete (the path and the reason)."""


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
    kill_point("checkpoint_write", step)
    _write_manifest(tmp)
    if final.exists():  # re-saving a step (e.g. after a resume): replace it whole
        _remove(final)
    os.replace(tmp, final)
    return final


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def _write_manifest(root: Path) -> None:
    files = {str(p.relative_to(root)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in _files(root)}
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"version": 1, "files": files}, indent=1))
    os.replace(tmp, root / MANIFEST)


def verify_checkpoint(path: str | Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be used, or None when it is good: its manifest lists
    every file with size and SHA-256 (checkpoints written before manifests existed are checked
    for their trainer state only)."""
    root = Path(path)
    if not (root / STATE_FILE).exists():
        return f"{STATE_FILE} is missing (an interrupted write or delete)"
    manifest = root / MANIFEST
    if not manifest.exists():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    for name, want in files.items():
        f = root / name
        if not f.exists():
            return f"{name} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, {want['bytes']} were written (truncated or overwritten)"
        if _sha256(f) != want["sha256"]:
            return f"{name} does not match its checksum (corrupted on disk)"
    return None


def good_checkpoints(run_dir: str | Path) -> tuple[list[tuple[int, Path]], list[tuple[int, Path, str]]]:
    """(good checkpoints oldest first, bad ones as (step, path, reason))."""
    good, bad = [], []
    for step, path in list_checkpoints(run_dir):
        problem = verify_checkpoint(path)
        if problem:
            bad.append((step, path, problem))
        else:
            good.append((step, path))
    return good, bad


def reconcile(run_dir: str | Path, recorded: dict[int, str]) -> tuple[list[tuple[int, Path]], list[str]]:
    """Bring a run's checkpoint directory and its store rows together after an interruption.

    The directory is the truth. Removes leftovers of interrupted writes (``*.tmp``) and deletes
    (``*.deleting``, or a ``step-*`` directory with no trainer state); corrupt checkpoints are
    kept on disk (renamed ``*.corrupt``, for a look) but never used. ``recorded``: the store's
    rows, step -> path. Returns (the good checkpoints, oldest first; what was repaired, one line
    each) — the caller then adds the rows of good checkpoints that have none and removes rows
    whose checkpoint is gone."""
    root = Path(run_dir) / "checkpoints"
    notes: list[str] = []
    for p in sorted(root.glob("step-*")) if root.exists() else []:
        if p.name.endswith((".tmp", ".deleting")) or (p.is_dir() and not (p / STATE_FILE).exists()
                                                       and not p.name.endswith(".corrupt")):
            shutil.rmtree(p, ignore_errors=True)
            notes.append(f"removed {p.name}: left by an interrupted checkpoint write or delete")
    good, bad = good_checkpoints(run_dir)
    for _step, path, problem in bad:
        dest = path.with_name(path.name + ".corrupt")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(path, dest)
        notes.append(f"checkpoint {path} is corrupt and will not be used ({problem}); moved to {dest.name}")
    on_disk = {step for step, _ in good}
    for step in sorted(set(recorded) - on_disk):
        notes.append(f"the store recorded a checkpoint at step {step} that is not on disk: row removed")
    for step in sorted(on_disk - set(recorded)):
        notes.append(f"checkpoint at step {step} was written but not recorded: row added")
    return good, notes


def load_weights(policy: Any, path: str | Path) -> None:
    """Load a checkpoint's weights into an already built policy (same architecture)."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"checkpoint {path} has no .safetensors weights")
    for f in files:
        try:
            weights = load_file(f)
        except Exception as e:  # safetensors' own errors name neither the file nor a way out
            raise CheckpointError(f"checkpoint weights {f} are unreadable ({type(e).__name__}: {e}): the file is "
                                  "corrupt or truncated; resume falls back to the previous good checkpoint, or "
                                  "delete this one") from e
        if policy.is_lora:
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(policy.model, weights)
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise ValueError(f"checkpoint {f} does not match this model's LoRA adapters: {unexpected[:3]}")
        else:
            policy.model.load_state_dict(weights, strict=False)


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
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); "
                              "delete it to resume from the previous one") from e
    if weights:
        load_weights(policy, path)
    distributed.load_optimizer_state(model if model is not None else policy.model, optimizer, state["optimizer"],
                                     by_name=state.get("optimizer_format") == "by_name")
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state


def prune_checkpoints(run_dir: str | Path, keep: int, *, keep_best: bool = False) -> list[int]:
    """Delete all but the newest ``keep`` checkpoints and, with ``keep_best``, the one marked best;
    returns the removed steps."""
    best = best_checkpoint(run_dir) if keep_best else None
    removed = []
    ckpts = list_checkpoints(run_dir)
    for step, p in ckpts[: max(len(ckpts) - keep, 0)]:
        if not best or step != best[0]:
            _remove(p, step)
            removed.append(step)
    return removed


def best_checkpoint(run_dir: str | Path) -> tuple[int, float] | None:
    """(step, held-out reward) of the checkpoint marked best, or None when none is marked or the
    marked one is no longer on disk (a resume that fell back past a corrupt checkpoint)."""
    path = Path(run_dir) / "checkpoints" / BEST_FILE
    try:
        best = json.loads(path.read_text())
        step, reward = int(best["step"]), float(best["reward"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a best-checkpoint marker ({type(e).__name__}: {e}): delete it") from e
    return (step, reward) if (checkpoint_dir(run_dir, step) / STATE_FILE).exists() else None


def beats_best(run_dir: str | Path, step: int, reward: float) -> bool:
    """Whether a held-out ``reward`` at ``step`` takes over the mark (ties go to the later step)."""
    best = best_checkpoint(run_dir)
    return best is None or (reward >= best[1] and step != best[0])


def mark_best(run_dir: str | Path, step: int, reward: float) -> None:
    """Mark the checkpoint at ``step`` as the best held-out eval's (written atomically)."""
    path = Path(run_dir) / "checkpoints" / BEST_FILE
    tmp = path.with_name(BEST_FILE + ".tmp")
    tmp.write_text(json.dumps({"step": step, "reward": reward}))
    os.replace(tmp, path)


def _remove(path: Path, step: int | None = None) -> None:
    """Delete a checkpoint so that a kill midway leaves no directory that looks complete: rename
    first (atomic), then remove."""
    doomed = path.with_name(path.name + ".deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    kill_point("prune", step)
    shutil.rmtree(doomed, ignore_errors=True)


def resolve_checkpoint(run_dir: str | Path, step: str | int = "latest") -> tuple[int, Path]:
    """(step, path) of ``step`` ("latest", "best" or a number) in a run directory; a clear error if absent."""
    if str(step) == "latest":
        found = latest_checkpoint(run_dir)
        if not found:
            raise FileNotFoundError(f"run directory {run_dir} has no checkpoint yet")
        return found
    if str(step) == "best":
        best = best_checkpoint(run_dir)
        if not best:
            raise FileNotFoundError(f"run directory {run_dir} has no best checkpoint: one is marked at each held-out "
                                    "eval that beats the earlier ones (keep_best = true, evals every eval_every "
                                    "steps and after the last)")
        step = best[0]
    path = checkpoint_dir(run_dir, int(step))
    if not (path / STATE_FILE).exists():
        have = ", ".join(str(s) for s, _ in list_checkpoints(run_dir)) or "none"
        raise FileNotFoundError(f"no checkpoint at step {step} in {run_dir} (checkpoints: {have})")
    return int(step), path

"""Where a run starts from when it does not start from scratch, and what makes that safe.

- Resume (``rlft train --resume RUN``, from any directory): :func:`with_absolute_paths` is what
  a run records; :func:`resume_environment` loads the environment again (its file, with a
  change reported, or the copy of its source the run kept); :func:`check_data` compares the
  data's fingerprint; :func:`resume_checkpoint` repairs the store's checkpoint rows from the
  directory and loads the newest checkpoint that is good.
- ``init_from``: :func:`init_checkpoint` resolves another run (an SFT warm-up's best checkpoint,
  another run's newest) or a checkpoint directory to the weights a new run starts with.
Left out: building the run itself (``rlft.training.run``) and writing checkpoints
(``rlft.training.checkpoint``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rlft import distributed
from rlft.config import ConfigError, TrainConfig
from rlft.data import Dataset
from rlft.env import Environment

# made absolute when they name a file here
PATH_KEYS = ("env", "data", "eval_data", "chat_template", "model", "sft_data")


def with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """The config with relative paths made absolute (those that exist from here; a hub id or an
    inline chat template stays as it is), and ``runs_dir`` absolute: what a run records, so that
    ``rlft train --resume`` works from any directory."""
    changes: dict[str, Any] = {"runs_dir": str(Path(cfg.runs_dir).resolve())}
    for key in PATH_KEYS:
        value = getattr(cfg, key)
        path, sep, attr = value.partition(":") if key == "env" else (value, "", "")
        if value and not Path(path).is_absolute() and Path(path).exists():
            changes[key] = str(Path(path).resolve()) + sep + attr
    return replace(cfg, **changes)


def data_fingerprint(train_set: Dataset, eval_set: Dataset) -> str:
    """SHA-256 of both splits' rows, in order: a resume compares it with the run's."""
    import hashlib
    import json

    h = hashlib.sha256()
    for part in (train_set, eval_set):
        for row in part:
            h.update(json.dumps(row, sort_keys=True, default=str).encode())
        h.update(b"|")
    return h.hexdigest()


def check_data(store: Any, run_id: str, fingerprint: str, progress: Any) -> None:
    """Keep the run's data fingerprint in its directory; on a resume, say so when the data changed."""
    if not distributed.is_main():
        return
    path = store.run_dir(run_id) / "data.sha256"
    if path.exists() and path.read_text().strip() != fingerprint:
        message = ("the dataset changed since this run started (its rows or their order differ): the resumed "
                   "steps draw other prompts than the original run would have")
        progress.note(f"[resume] {message}")
        store.add_log(run_id, message, level="warning", source="resume")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(fingerprint + "\n")


def resume_environment(cfg: TrainConfig, store: Any, run_id: str, progress: Any) -> tuple[Environment, Any, str]:
    """The environment a resumed run continues with: its file when it still exists (a change since
    the run started is reported first), else the copy of its source the store kept."""
    from rlft.loader import load_environment

    recorded = store.get_run(run_id).get("env_source") or ""

    def warn(message: str) -> None:
        progress.note(f"[resume] {message}")
        store.add_log(run_id, message, level="warning", source="resume")

    path = Path(cfg.env.partition(":")[0]) if cfg.env else None
    if path is not None and path.suffix == ".py" and not path.exists() and recorded:
        copy = store.run_dir(run_id) / "environment.py"
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(recorded)
        warn(f"environment file {path} no longer exists: resuming with the copy of its source kept by the run "
             f"({copy})")
        return load_environment(str(copy) + (":" + cfg.env.partition(":")[2] if ":" in cfg.env else ""))
    env, module, source = load_environment(cfg.env)
    if recorded and source and source != recorded:
        import difflib

        changed = sum(1 for line in difflib.unified_diff(recorded.splitlines(), source.splitlines(), lineterm="")
                      if line[:1] in "+-" and not line.startswith(("+++", "---")))
        warn(f"environment file {cfg.env} changed since the run started ({changed} lines differ): resuming with "
             "the file as it is now")
    return env, module, source



@dataclass(frozen=True)
class InitCheckpoint:
    """Where ``init_from`` points: a checkpoint directory, and whether it holds a LoRA adapter
    (loaded into the new run's adapters) or full weights (loaded as the new run's model)."""

    path: Path
    adapter: bool
    run: str = ""
    step: int = 0

    def describe(self) -> str:
        return f"run {self.run} step {self.step} ({self.path})" if self.run else str(self.path)


def init_checkpoint(store: Any, ref: str, *, lora: bool) -> InitCheckpoint:
    """Resolve ``init_from``: a run in the store (an SFT run's best checkpoint, another run's
    newest good one) or a checkpoint directory; a LoRA adapter needs ``lora = true``."""
    from rlft.errors import UnknownRunError
    from rlft.training.checkpoint import good_checkpoints

    path, run, step = Path(ref), "", 0
    if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
        try:
            source = store.get_run(ref)
        except UnknownRunError as e:
            raise ConfigError(f"init_from = {ref!r}: neither a checkpoint directory nor a run in {store.path}") from e
        run = source["id"]
        best = source.get("kind") == "sft"  # an SFT run marks the checkpoint of its lowest eval loss
        rows = [c for c in store.checkpoints(run) if (c.get("metrics") or {}).get("best")] if best else []
        good = {s: p for s, p in good_checkpoints(store.run_dir(run))[0]}
        picks = [(int(c["step"]), Path(c["path"])) for c in rows if int(c["step"]) in good] or sorted(good.items())
        if not picks:
            raise ConfigError(f"init_from = {ref!r}: run {run} has no usable checkpoint")
        step, path = picks[-1]
    adapter = (path / "adapter_config.json").exists()
    if adapter and not lora:
        raise ConfigError(f"init_from = {ref!r} holds a LoRA adapter: train with lora = true (and the same lora_rank), "
                          "or export it merged (rlft export) and set model to that directory")
    return InitCheckpoint(path=path, adapter=adapter, run=run, step=step)


def resume_checkpoint(store: Any, run_id: str, run_dir: Path, policy: Any, progress: Any) -> tuple[int, Path] | None:
    """The newest good checkpoint of the run, its weights loaded into ``policy``. First the run
    store's checkpoint rows are repaired from the directory (rank 0; ``checkpoint.reconcile``),
    then checkpoints are tried newest first: one that fails to load is skipped with a warning."""
    from rlft.training.checkpoint import CheckpointError, good_checkpoints, load_weights, reconcile

    def warn(message: str) -> None:
        progress.note(f"[checkpoint] {message}")
        store.add_log(run_id, message, level="warning", source="checkpoint")

    if distributed.is_main():
        recorded = {int(c["step"]): c["path"] for c in store.checkpoints(run_id)}
        good, notes = reconcile(run_dir, recorded)
        for step in sorted(set(recorded) - {s for s, _ in good}):
            store.remove_checkpoint(run_id, step)
        for step, path in good:
            if step not in recorded:
                store.add_checkpoint(run_id, step, str(path))
        for note in notes:
            warn(note)
    distributed.barrier()  # the other ranks read the repaired directory
    good, _ = good_checkpoints(run_dir)
    for step, path in reversed(good):
        try:
            load_weights(policy, path)
            return step, path
        except CheckpointError as e:
            warn(f"{e}; falling back to the previous checkpoint")
    if good:
        warn("no checkpoint of this run could be loaded: it starts again from step 0")
    return None


__all__ = ["InitCheckpoint", "PATH_KEYS", "check_data", "data_fingerprint", "init_checkpoint", "resume_checkpoint",
           "resume_environment", "with_absolute_paths"]

"""Optional experiment trackers: TensorBoard, Weights & Biases, MLflow, trackio.

``report_to = "tensorboard,wandb"`` in the config sends every step's metrics to each named
tracker that is installed; a named tracker that is not installed is an error at start (say
what to install), never a silent no-op. The run store stays the source of truth: trackers
are copies. Left out: artifacts and model uploads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

KNOWN = ("tensorboard", "wandb", "mlflow", "trackio")


class Reporter:
    def __init__(self, names: str, run_id: str, run_dir: Path, config: dict[str, Any]):
        self._sinks: list[Any] = []
        self._closers: list[Any] = []
        for name in [n.strip() for n in names.split(",") if n.strip()]:
            if name not in KNOWN:
                raise ValueError(f"report_to: unknown tracker {name!r}; choose from {', '.join(KNOWN)}")
            try:
                getattr(self, f"_open_{name}")(run_id, run_dir, config)
            except ImportError as e:
                raise ImportError(f"report_to includes {name!r} but it is not installed: pip install {name}") from e

    def _open_tensorboard(self, run_id, run_dir, config):
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        writer.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in config.items()))
        self._sinks.append(lambda step, m: [writer.add_scalar(k, v, step) for k, v in m.items()])
        self._closers.append(writer.close)

    def _open_wandb(self, run_id, run_dir, config):
        import wandb

        run = wandb.init(project=config.get("wandb_project", "rlft"), name=run_id, config=config, dir=str(run_dir))
        self._sinks.append(lambda step, m: run.log(m, step=step))
        self._closers.append(run.finish)

    def _open_mlflow(self, run_id, run_dir, config):
        import mlflow

        mlflow.start_run(run_name=run_id)
        mlflow.log_params({k: v for k, v in config.items() if v not in ("", None)})
        self._sinks.append(
            lambda step, m: mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in m.items()}, step=step))
        self._closers.append(mlflow.end_run)

    def _open_trackio(self, run_id, run_dir, config):
        import trackio

        trackio.init(project="rlft", name=run_id, config=config)
        self._sinks.append(lambda step, m: trackio.log(m, step=step))
        self._closers.append(trackio.finish)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v}
        for sink in self._sinks:
            sink(step, clean)

    def close(self) -> None:
        for close in self._closers:
            close()
        self._closers = []

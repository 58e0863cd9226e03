"""The terminal progress bar of a training run (rich): step, reward, pass@k, the step's own s/step,
the share of rollouts with errors, ETA.

Notes (eval results, signal warnings) print above the bar. Disabled, it prints one line per
step instead, so logs of non-interactive runs stay readable. Left out: remote trackers.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, enabled: bool = True):
        self.total = total
        self.enabled = enabled and sys.stderr.isatty()
        self._bar = None
        self._task = None
        self._t0 = None
        from rich.console import Console

        self.console = Console(stderr=True)

    def start(self, step: int = 0) -> None:
        self._t0, self._first = time.perf_counter(), step
        if not self.enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as Bar

        self._bar = Bar(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=self.console)
        self._bar.start()
        self._task = self._bar.add_task("train", total=self.total, completed=step, info="")

    def update(self, step: int, metrics: dict[str, float]) -> None:
        # this step's own time (a running mean since start hid a slow first step's cost for many steps)
        per_step = metrics.get("time/step", (time.perf_counter() - self._t0) / max(step - self._first, 1))
        info = (f"reward {metrics.get('reward/mean', 0):.3f}  pass@k {metrics.get('pass@k', 0):.2f}  "
                f"{per_step:.1f} s/step")
        errors = metrics.get("rollout/errors", 0.0)
        if errors:  # share of rollouts with any error; reward errors named apart (they score 0)
            reward_errors = metrics.get("termination/reward_error", 0.0)
            info += f"  errors {errors:.0%}" + (f" (reward {reward_errors:.0%})" if reward_errors else "")
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        else:
            self.console.print(f"step {step}/{self.total}  {info}", highlight=False)

    def note(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

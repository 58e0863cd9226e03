"""Fault injection for the crash-safety tests: ``RLFT_KILL_AT=<point>:<step>`` makes this process
SIGKILL itself when it reaches that point at that step (``<point>`` alone: the first time;
for ``prune`` the step is the one of the checkpoint being deleted).

The points sit at the boundaries where a kill could lose or duplicate something: inside a step,
inside a checkpoint write, between a checkpoint and its store row, between a checkpoint and its
eval, between the best eval's checkpoint and its mark (``keep_best``), inside pruning, inside
``rlft export``. ``tests/test_crash_safety.py`` kills a run at each
and checks that a resume ends where an uninterrupted run does. Unset (always, outside those
tests) a point costs one environment lookup.
"""

from __future__ import annotations

import os
import signal

POINTS = ("mid_step", "checkpoint_write", "checkpoint_unrecorded", "before_eval", "best_unmarked", "prune", "export")


def kill_point(point: str, step: int | None = None) -> None:
    spec = os.environ.get("RLFT_KILL_AT")
    if not spec:
        return
    name, _, at = spec.partition(":")
    if name == point and (not at or (step is not None and int(at) == step)):
        os.kill(os.getpid(), signal.SIGKILL)

"""The run store as each rank of a multi-process run sees it.

Rank 0 (and a single process) writes to the SQLite store; the other ranks get a
:class:`ReplicaStore` that reads the same store and drops writes, since rank 0 writes for all.
Left out: the store itself (``run_store.py``) and the process group (``rlft.distributed``).
"""

from __future__ import annotations

import os
from typing import Any

from rlft.store.run_store import RunStore


class ReplicaStore:
    """The run store as a rank other than 0 sees it: reads go to the store (read-only, opened on
    first use, after rank 0 has created it); writes are dropped, since rank 0 writes for all."""

    WRITES = frozenset({"create_run", "update_run", "set_status", "log_metrics", "add_rollouts", "add_log",
                        "add_checkpoint", "remove_checkpoint", "add_eval", "truncate_after", "delete_run",
                        "request_stop"})

    def __init__(self, runs_dir: str | os.PathLike[str]):
        self.runs_dir = runs_dir
        self._store: Any = None

    def stop_requested(self, run_id: str) -> bool:
        return False  # rank 0 reads it and broadcasts its answer

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    def __getattr__(self, name: str) -> Any:
        if name in ReplicaStore.WRITES:
            return lambda *args, **kwargs: None
        if self._store is None:
            self._store = RunStore(self.runs_dir, readonly=True)
        return getattr(self._store, name)


def run_store(runs_dir: str | os.PathLike[str]) -> Any:
    """The run store on rank 0 (and in one process); a :class:`ReplicaStore` on other ranks."""
    from rlft.distributed import is_main

    return RunStore(runs_dir) if is_main() else ReplicaStore(runs_dir)


__all__ = ["ReplicaStore", "run_store"]

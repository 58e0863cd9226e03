"""The run store: runs, metrics, rollouts, evals, logs and checkpoints in one SQLite file.

- ``run_store.py``: ``RunStore`` (standard library only, so the console never pulls in torch);
- ``replica.py``: what ranks other than 0 of a multi-process run use (reads, no writes).
"""

from rlft.store.run_store import RunStore

__all__ = ["RunStore"]

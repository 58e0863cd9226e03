"""The run store: runs, metrics, rollouts, evals, logs and checkpoints in one SQLite file.

- ``run_store.py``: ``RunStore`` (runs, metrics, logs, checkpoints, evals; standard library only,
  so the console never pulls in torch), built on
- ``rollouts.py``: ``RolloutRecords`` (storing rollouts and every query over them) and
- ``database.py``: ``Database`` (the SQLite file: schema and migrations, connections, transactions);
- ``replica.py``: what ranks other than 0 of a multi-process run use (reads, no writes).
"""

from rlft.store.run_store import RunStore

__all__ = ["RunStore"]

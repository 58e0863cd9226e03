"""Training health: diagnoses over a run's metrics (and rollouts where needed), and the reward audit.

- ``findings.py``: the Finding (name, severity, evidence, advice, chart and step window);
- ``thresholds.py``: every threshold, in one place (docs/health.md explains each);
- ``diagnoses.py``: pure functions over metric series -> findings;
- ``source.py``: the same over a stored run (CLI, console, and the trainer's per-step hook);
- ``audit.py``: the reward audit of ``rlft validate`` (per component, over sampled rollouts).

Imports only the standard library, ``rlft.types`` and the store's reader API: the console uses it
without pulling in torch or the trainer.
"""

from rlft.health.diagnoses import Context, diagnose, diagnose_eval
from rlft.health.findings import Evidence, Finding

__all__ = ["Context", "Evidence", "Finding", "diagnose", "diagnose_eval"]

"""The Finding: what a diagnosis returns, and how it prints.

A finding names a training-health problem (``name`` is stable: tests, JSON and the console key on
it), says how bad it is (``severity``), carries its evidence as numbers (the metric window that
triggered it: steps and values per key), one line of advice naming the config key to change, and
where the console should point (``chart``: a metric key; ``window``: the first and last step).
Left out: the diagnoses themselves (``rlft.health.diagnoses``) and any I/O.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Any

SEVERITIES = ("info", "warning", "critical")  # ascending; the strip and the CLI sort by it


@dataclass
class Evidence:
    """One metric over the window that triggered a finding."""

    key: str
    steps: list[int]
    values: list[float]


@dataclass
class Finding:
    name: str  # e.g. "no_signal"; one per diagnosis
    severity: str  # one of SEVERITIES
    title: str  # a few words for the strip
    summary: str  # one sentence with the numbers
    advice: str  # one line, naming the config key (or command) to change
    chart: str  # the metric key the console links to
    window: tuple[int, int]  # first and last step of the evidence
    evidence: list[Evidence] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # extra numbers (shares, top error message...)

    def to_dict(self) -> dict[str, Any]:
        """The finding as plain JSON values (a copy: ``dataclasses.asdict`` did the same walking
        every number of the evidence, 7 ms for a 1,000-step window, on every health request)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(window=list(self.window), details=copy.deepcopy(self.details),
                 evidence=[{"key": e.key, "steps": list(e.steps), "values": list(e.values)} for e in self.evidence])
        return d

    def line(self) -> str:
        """One terminal line: ``[health] WARNING entropy collapse (steps 3-12): ... -> advice``."""
        lo, hi = self.window
        steps = f"step {lo}" if lo == hi else f"steps {lo}-{hi}"
        return f"[health] {self.severity.upper()} {self.title} ({steps}): {self.summary} -> {self.advice}"


def sort_findings(findings: list[Finding]) -> list[Finding]:
    """Most severe first; ties keep the diagnoses' order."""
    return sorted(findings, key=lambda f: -SEVERITIES.index(f.severity))


__all__ = ["Evidence", "Finding", "SEVERITIES", "sort_findings"]

"""The Finding: what a diagnosis returns, and how it prints.

A finding names a training-health problem (``name`` is stable: tests, JSON and the console key on
it), says how bad it is (``severity``), carries its evidence as numbers (the metric window that
triggered it: steps and values per key), one line of advice naming the config key to change, and
where the console should point (``chart``: a metric key; ``window``: the first and last step).
Left out: the diagnoses themselves (``rlft.health.diagnoses``) and any I/O.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
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
        d = asdict(self)
        d["window"] = list(self.window)
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

"""The tree passes ``ruff check`` with the rule set in pyproject.toml ([tool.ruff]).

CI runs the test suite only, so the linter runs here: ruff is in the ``dev`` extra that
``scripts/setup.sh --dev`` installs. Its output (file:line: code message) is the failure message.
"""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PATHS = ["rlft", "tests", "benchmarks", "recipes", "scripts"]


def test_ruff_check_passes_on_the_whole_tree():
    try:
        from ruff.__main__ import find_ruff_bin
    except ImportError:
        pytest.skip("ruff is not installed (pip install ruff, or scripts/setup.sh --dev)")
    proc = subprocess.run([find_ruff_bin(), "check", "--no-cache", "--output-format", "concise", *PATHS],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr

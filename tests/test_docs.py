"""The examples in the docs run: every snippet in docs/rewards.md is a doctest."""

import doctest
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_rewards_doc_examples_are_true():
    result = doctest.testfile(str(DOCS / "rewards.md"), module_relative=False, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 20 and result.failed == 0

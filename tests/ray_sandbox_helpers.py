"""An environment whose reward runs code in the sandbox, for the Ray workers' isolation test
(a module of its own: importing the sandbox marks every environment in it as running code)."""

import re

from ray_helpers import lookup
from rlft.env import Environment
from rlft.rewards.sandbox import run_code
from rlft.types import Rollout


def ran_in_sandbox(ro: Rollout) -> float:
    """Doubles the completion's last number in the code sandbox (what a code_tests reward does)."""
    digits = re.findall(r"\d+", ro.completion)
    return float(run_code(f"print({digits[-1] if digits else 0} * 2)").stdout.strip() == str(2 * ro.ground_truth))


env = Environment(system_prompt="Look the key up, then answer with its number.", tools=[lookup],
                  rewards=[ran_in_sandbox], max_turns=3, tool_timeout=120)

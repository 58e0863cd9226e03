"""Code generation: short Python functions graded by hidden tests run in rlft's sandbox.

Rewards (partial credit, so a weak model's samples differ): the share of hidden tests passed
(``rlft.rewards.sandbox.code_tests``), plus small format credits for code that parses and
defines the asked-for function, and for answering in a ```python block."""

from __future__ import annotations

import ast
import re

from rlft import Environment, Reward
from rlft.rewards.sandbox import code_tests, extract_code

SYSTEM = "You are a Python programmer. Answer with one short Python function in a ```python code block."


def defines_function(rollout) -> float:
    """0.5 when the extracted code parses, 1.0 when it also defines the requested function."""
    try:
        tree = ast.parse(extract_code(rollout.completion))
    except (SyntaxError, ValueError):
        return 0.0
    names = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return 1.0 if rollout.example["entry_point"] in names else 0.5


def fenced(rollout) -> float:
    return float(bool(re.search(r"```(?:python|py)\s*\n", rollout.completion)))


env = Environment(
    system_prompt=SYSTEM,
    rewards=[
        Reward(code_tests("tests", timeout=5, cpu_seconds=2), name="tests_passed"),
        Reward(defines_function, weight=0.2),
        Reward(fenced, weight=0.1),
    ],
    max_turns=1,
    max_tokens=96,
    name="code",
)

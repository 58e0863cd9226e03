"""Tool use: answer shop questions with a SQLite `query` tool and a `calculate` tool.

Each rollout gets its own copy of the shop database (setup copies a template built from
shop.sql; teardown deletes it), so a rollout that runs UPDATE or DROP cannot affect its
siblings. `query` finds the copy through the injected `rollout` parameter (hidden from the model).

Rewards (partial credit, so a weak model's groups are not tied):
  correct           1.0   the last number of the final reply equals the answer (1); a near
                          number earns up to 0.5, falling with the relative error
  valid_tool_calls  0.3   share of the rollout's tool calls that ran without an error (0 if none)

Warm-up: `demonstrate(example)` writes the solving turns from the row's `solution` (the query,
then the calculator for cost questions, then the number); config.toml trains on them before RL.
"""

import ast
import atexit
import operator
import re
import shutil
import sqlite3
import tempfile
import threading
from pathlib import Path

from rlft import Environment, Reward, tool

HERE = Path(__file__).parent
_TEMPLATE_DIR = tempfile.mkdtemp(prefix="rlft-tool-use-")  # the template, built once per process
atexit.register(shutil.rmtree, _TEMPLATE_DIR, ignore_errors=True)
_TEMPLATE = Path(_TEMPLATE_DIR) / "shop.db"
with sqlite3.connect(_TEMPLATE) as _db:
    _db.executescript((HERE / "shop.sql").read_text())

_AST_LOCK = threading.Lock()
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.USub: operator.neg}


def _eval(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.left), _eval(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.operand))
    raise ValueError("only numbers with + - * / and parentheses")


@tool(timeout=5)
def calculate(expression: str) -> float:
    """Evaluate an arithmetic expression.

    Args:
        expression: numbers with + - * / and parentheses, e.g. "3 * 12.5"
    """
    with _AST_LOCK:  # CPython 3.11's ast.parse in concurrent threads can raise a spurious
        tree = ast.parse(expression, mode="eval")  # SystemError (gh-106905); tools run in threads
    return round(_eval(tree.body), 6)


@tool(timeout=5)
def query(sql: str, rollout) -> str:
    """Run one SQL statement on the shop database (SQLite). Table: products(name TEXT, category TEXT, price REAL, stock INTEGER).

    Args:
        sql: e.g. "SELECT price FROM products WHERE name = 'red mug'"
    """  # noqa: E501 - the docstring is the tool's description for the model: its first line stays one line
    with sqlite3.connect(rollout.state["db"]) as db:
        rows = db.execute(sql).fetchmany(20)
    return "\n".join(", ".join(map(str, r)) for r in rows) or "(no rows)"


def setup(rollout):
    workdir = tempfile.mkdtemp(prefix="rlft-rollout-")
    rollout.state["workdir"] = workdir
    rollout.state["db"] = shutil.copy(_TEMPLATE, Path(workdir) / "shop.db")


def teardown(rollout):
    shutil.rmtree(rollout.state.get("workdir", ""), ignore_errors=True)


_NUM = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def correct(rollout) -> float:
    numbers = _NUM.findall(rollout.completion)
    if not numbers:
        return 0.0
    guess, gold = float(numbers[-1].replace(",", "")), float(rollout.ground_truth)
    if abs(guess - gold) < 0.01:
        return 1.0
    return 0.5 * max(0.0, 1.0 - abs(guess - gold) / max(abs(gold), 1.0))


def valid_tool_calls(rollout) -> float:
    if rollout.tool_calls == 0:
        return 0.0
    failed = sum(e.where.startswith("tool:") for e in rollout.errors)
    return max(0.0, 1.0 - failed / rollout.tool_calls)


def _call(name: str, **arguments) -> dict:
    return {"tool_calls": [{"function": {"name": name, "arguments": arguments}}]}


def demonstrate(example):
    """The assistant turns that solve a row: query, calculate (cost questions), the final number."""
    solution = example["solution"]
    turns = [_call("query", sql=solution["sql"])]
    if "expression" in solution:
        turns.append(_call("calculate", expression=solution["expression"]))
    return [*turns, str(example["ground_truth"])]


SYSTEM = """You answer questions about a shop. Look the facts up with the query tool (SQLite; table \
products(name, category, price, stock)) and do arithmetic with the calculate tool. Example:
<tool_call>{"name": "query", "arguments": {"sql": "SELECT price FROM products WHERE name = 'red mug'"}}</tool_call>
<tool_call>{"name": "calculate", "arguments": {"expression": "3 * 12.5"}}</tool_call>
Then reply with the final number only."""

env = Environment(
    system_prompt=SYSTEM,
    tools=[query, calculate],
    rewards=[correct, Reward(valid_tool_calls, weight=0.3)],
    setup=setup,
    teardown=teardown,
    max_turns=4,
    max_tool_calls=4,
    max_tokens=512,
    max_tokens_per_turn=96,
    demonstrate=demonstrate,
    name="tool-use",
)

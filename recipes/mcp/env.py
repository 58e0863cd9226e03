"""MCP tools: arithmetic word problems solved with the `calculate` tool of a published
third-party MCP server, `mcp-server-calculator` (PyPI), started over stdio.

One server process is shared by all rollouts of the run (its tool is stateless); rlft starts
it when the run starts and stops it at the end (also if the trainer is killed). It is started
as `python -m mcp_server_calculator` with this interpreter, so it is found without an
activated virtualenv; `MCPServer(command="mcp-server-calculator")` works too.

Rewards (partial credit, so a weak model's groups are not tied):
  correct           1.0   the last number of the final reply equals the answer (1); a near
                          number earns up to 0.5, falling with the relative error
  valid_tool_calls  0.2   share of the rollout's tool calls that the server answered without error (0 if none)

Warm-up: `demonstrate(example)` calls `calculate` with the row's `expression`, then replies with
the answer; config.toml trains on these demonstrations (train split) before RL.
"""

import re
import sys

from rlft import Environment, MCPServer, Reward

# timeout: a call that takes longer is abandoned (a huge `**` can keep the server busy). 30 s, not
# 10: on the 2-core CPU shared with other jobs (load 16), plain calls like "54 * 33 + 15" took over
# 10 s and failed (see README, "Warm-up, then RL")
calculator = MCPServer(command=sys.executable, args=["-m", "mcp_server_calculator"], name="calculator",
                       timeout=30, startup_timeout=60)

_NUM = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def correct(rollout) -> float:
    numbers = _NUM.findall(rollout.completion)
    if not numbers:
        return 0.0
    guess, gold = float(numbers[-1].replace(",", "")), float(rollout.ground_truth)
    if abs(guess - gold) < 1e-6:
        return 1.0
    return 0.5 * max(0.0, 1.0 - abs(guess - gold) / max(abs(gold), 1.0))


def valid_tool_calls(rollout) -> float:
    if rollout.tool_calls == 0:
        return 0.0
    failed = sum(e.where.startswith("tool:") for e in rollout.errors)
    return max(0.0, 1.0 - failed / rollout.tool_calls)


def demonstrate(example):
    """The assistant turns that solve a row: one calculator call, then the number."""
    call = {"function": {"name": "calculate", "arguments": {"expression": example["expression"]}}}
    return [{"tool_calls": [call]}, str(example["ground_truth"])]


SYSTEM = """Solve the word problem. Do the arithmetic with the calculate tool, for example:
<tool_call>{"name": "calculate", "arguments": {"expression": "37 * 48"}}</tool_call>
Then reply with the final number only."""

env = Environment(
    system_prompt=SYSTEM,
    tools=[calculator],
    rewards=[correct, Reward(valid_tool_calls, weight=0.2)],
    max_turns=3,
    max_tool_calls=3,
    max_tokens=384,
    max_tokens_per_turn=96,
    demonstrate=demonstrate,
    name="mcp-calculator",
)

"""MCP servers inside an Environment: shared vs isolated servers, failures, cleanup."""

import asyncio
import sys
from pathlib import Path

from rlft.env import Environment
from rlft.mcp import MCPServer
from rlft.types import Termination

DEMO = str(Path(__file__).parent / "mcp_servers" / "demo_server.py")


def call(name, **args):
    import json

    return "<tool_call>" + json.dumps({"name": name, "arguments": args}) + "</tool_call>"


def pids(group):
    return [int(r.tool_messages[0]["content"]) for r in group.rollouts]


def test_shared_server_serves_every_rollout_from_one_process(scripted_sampler):
    env = Environment(tools=[MCPServer(command=sys.executable, args=[DEMO])], rewards=[lambda ro: 1.0])
    sampler = scripted_sampler([call("pid"), "done"])
    g = asyncio.run(env.run_groups([{"prompt": "q"}], sampler, 4))[0]
    assert all(r.termination == Termination.FINISHED for r in g.rollouts)
    assert len(set(pids(g))) == 1


def test_isolated_server_gives_each_rollout_its_own_process(scripted_sampler):
    env = Environment(tools=[MCPServer(command=sys.executable, args=[DEMO], isolated=True)], rewards=[lambda ro: 1.0])
    sampler = scripted_sampler([call("pid"), "done"])
    g = asyncio.run(env.run_groups([{"prompt": "q"}], sampler, 3))[0]
    assert len(set(pids(g))) == 3


def test_mcp_tool_error_becomes_a_tool_message_and_a_dead_server_ends_only_its_rollout(scripted_sampler):
    env = Environment(tools=[MCPServer(command=sys.executable, args=[DEMO], isolated=True)], rewards=[lambda ro: 1.0])

    def script(prompt, turn):
        if "PLEASE_CRASH" in prompt and turn == 0:
            return call("crash")
        return [call("fail", message="bad input"), "done"][min(turn, 1)]

    sampler = scripted_sampler(script)
    ok, dead = asyncio.run(env.run_groups([{"prompt": "fail please"}, {"prompt": "PLEASE_CRASH"}], sampler, 1))
    assert ok.rollouts[0].termination == Termination.FINISHED
    assert "bad input" in ok.rollouts[0].tool_messages[0]["content"]
    assert dead.rollouts[0].termination == Termination.TOOL_ERROR and dead.rollouts[0].reward == 0.0


def test_published_calculator_server_answers_inside_a_rollout(scripted_sampler):
    script = Path(sys.executable).with_name("mcp-server-calculator")
    server = (MCPServer(command=str(script)) if script.exists()
              else MCPServer(command=sys.executable, args=["-m", "mcp_server_calculator"]))
    env = Environment(tools=[server], rewards=[lambda ro: float("56" in ro.tool_messages[0]["content"])])
    sampler = scripted_sampler([call("calculate", expression="7*8"), "56"])
    g = asyncio.run(env.run_groups([{"prompt": "7*8?"}], sampler, 1))[0]
    assert g.rollouts[0].reward == 1.0, g.rollouts[0].tool_messages

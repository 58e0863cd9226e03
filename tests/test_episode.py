"""Episodes and the one loop: single use, environments as values, sessions shared and closed
once, the token and message samplers (and the console chat) running the same conversation."""

import asyncio
import itertools
import json
from dataclasses import dataclass

import pytest

from rlft.engines.base import ChatReply
from rlft.env import ChatSampler, Environment, Sampler
from rlft.mcp import MCPServer
from rlft.renderer import Renderer
from rlft.testing import ScriptedPolicy
from rlft.testing.tokenizer import build_tiny_tokenizer
from rlft.tools import tool
from rlft.types import Rollout, Termination, ToolCall

CALL = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'


@pytest.fixture(scope="module")
def renderer():
    return Renderer(build_tiny_tokenizer())


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def run(coro):
    return asyncio.run(coro)


def adder_script(prompt: str, turn: int) -> str:
    return CALL if turn == 0 else "The sum is " + prompt.split("<|im_start|>tool\n")[-1].split("<|im_end|>")[0]


# -- a fake MCP server that counts its connections (no subprocess) ---------------------------

EVENTS: list[str] = []
NUMBERS = itertools.count()


class _Connection:
    def __init__(self, number: int):
        self.number, self.tools = number, []

    async def __aenter__(self):
        await asyncio.sleep(0.05)  # a slow start: concurrent callers arrive meanwhile
        EVENTS.append(f"open {self.number}")

        def which() -> int:
            """The number of the connection that answers."""
            return self.number

        self.tools = [tool(which)]
        return self

    async def __aexit__(self, *exc):
        EVENTS.append(f"close {self.number}")


@dataclass(frozen=True)
class CountingServer(MCPServer):
    def connect(self):
        return _Connection(next(NUMBERS))


def one(ro: Rollout) -> float:
    return 1.0


def counting_env(**kw) -> Environment:
    return Environment(tools=[CountingServer(command="unused")], rewards=[one], **kw)


WHICH = '<tool_call>{"name": "which", "arguments": {}}</tool_call>'


# -- single use ---------------------------------------------------------------------------------

def test_an_episode_runs_once(renderer):
    env = Environment(tools=[add], max_turns=3)
    episode = env.episode({"prompt": "what is 2+3?"})
    sampler = Sampler(ScriptedPolicy(renderer, adder_script), renderer)
    ro = run(episode.run(sampler))
    assert ro is episode.rollout and ro.termination == Termination.FINISHED
    assert [(c.name, r.content) for c, r in episode.tool_results] == [("add", "5")]
    with pytest.raises(RuntimeError, match="runs once"):
        run(episode.run(sampler))
    assert env.episode({"prompt": "what is 2+3?"}) is not episode


def test_the_rollouts_state_holds_only_the_users_scratch(renderer):
    seen = []

    @tool
    def peek(rollout: Rollout) -> str:
        """Report what the rollout's state holds."""
        seen.append(sorted(rollout.state))
        return "ok"

    env = Environment(tools=[peek], setup=lambda ro: ro.state.update(db="file.db"))
    script = ['<tool_call>{"name": "peek", "arguments": {}}</tool_call>', "done"]
    ro = run(env.rollout({"prompt": "q"}, Sampler(ScriptedPolicy(renderer, script), renderer)))
    assert ro.termination == Termination.FINISHED and seen == [["db"]] and ro.state == {"db": "file.db"}


def test_tools_run_only_inside_the_rollouts_episode():
    env = Environment(tools=[add])
    with pytest.raises(RuntimeError, match="no running episode"):
        run(env.run_tools(Rollout(example={}), [ToolCall("add", {"a": 1, "b": 2}, id="c1")]))


# -- environments are values; sessions are shared and closed once ------------------------------

def test_two_environments_from_the_same_arguments_share_no_session(renderer):
    EVENTS.clear()
    a, b = counting_env(), counting_env()
    assert a == b
    sampler = Sampler(ScriptedPolicy(renderer, [WHICH, "done"]), renderer)

    async def main():
        async with a.session():
            ro_a = await a.rollout({"prompt": "q"}, sampler)  # a's open session
            ro_b = await b.rollout({"prompt": "q"}, sampler)  # b opens (and closes) its own
            return ro_a, ro_b, list(EVENTS)

    ro_a, ro_b, during = run(main())
    assert ro_a.tool_messages[0]["content"] != ro_b.tool_messages[0]["content"]
    assert [e.split()[0] for e in during] == ["open", "open", "close"]  # b's closed, a's still open
    assert [e.split()[0] for e in EVENTS] == ["open", "open", "close", "close"]


def test_concurrent_rollouts_outside_a_session_share_one_opened_and_closed_once(renderer):
    EVENTS.clear()
    env = counting_env()
    sampler = Sampler(ScriptedPolicy(renderer, [WHICH, "done"]), renderer)

    async def main():
        return await asyncio.gather(*(env.rollout({"prompt": "q"}, sampler, group_index=g) for g in range(3)))

    rollouts = run(main())
    assert all(r.termination == Termination.FINISHED for r in rollouts)
    assert len({r.tool_messages[0]["content"] for r in rollouts}) == 1
    assert [e.split()[0] for e in EVENTS] == ["open", "close"]


# -- one loop, several turn sources ----------------------------------------------------------------

class ScriptedChat:
    """A ChatEngine that calls add, then answers with the tool's result."""

    async def chat(self, messages, tools, params):
        assert tools and tools[0]["function"]["name"] == "add"
        if messages[-1]["role"] == "tool":
            msg = {"role": "assistant", "content": "The sum is " + messages[-1]["content"]}
            return ChatReply(msg, [], "stop", prompt_tokens=10, completion_tokens=4, cost=0.5)
        call = ToolCall("add", {"a": 2, "b": 3}, id="call_0")
        return ChatReply({"role": "assistant", "content": "", "tool_calls": [call.to_openai()]}, [call], "tool_calls",
                         prompt_tokens=8, completion_tokens=6, cost=0.25)


def transcript(messages):
    """Roles, texts, tool names and arguments: what a conversation says, whatever its encoding."""
    out = []
    for m in messages:
        calls = [(tc["function"]["name"], tc["function"]["arguments"] if isinstance(tc["function"]["arguments"], dict)
                  else json.loads(tc["function"]["arguments"])) for tc in m.get("tool_calls") or []]
        out.append((m["role"], m.get("content") or "", calls))
    return out


def test_token_and_chat_samplers_run_the_same_conversation(renderer):
    env = Environment(tools=[add], max_turns=3)
    tokens = run(env.rollout({"prompt": "what is 2+3?"}, Sampler(ScriptedPolicy(renderer, adder_script), renderer)))
    chat = run(env.rollout({"prompt": "what is 2+3?"}, ChatSampler(ScriptedChat())))
    assert transcript(chat.messages) == transcript(tokens.messages)
    assert transcript(tokens.messages)[-1] == ("assistant", "The sum is 5", [])
    assert (chat.termination, chat.turns, chat.tool_calls) == (tokens.termination, tokens.turns, tokens.tool_calls)
    assert tokens.completion_ids and not chat.completion_ids  # the message level keeps no tokens
    assert chat.metrics["usage/requests"] == 2 and chat.metrics["usage/cost"] == 0.75


def test_the_console_chat_runs_tools_through_the_training_loop(renderer):
    pytest.importorskip("fastapi")
    from rlft.console.chat_proxy import ChatProxy
    from rlft.serve import BackgroundServer, create_app

    env = Environment(system_prompt="You can add.", tools=[add], max_turns=3)
    policy = ScriptedPolicy(renderer, adder_script)
    trained = run(env.rollout({"prompt": "what is 2+3?"}, Sampler(policy, renderer)))

    async def chat(url, env):
        body = {"model": "scripted", "messages": [{"role": "user", "content": "what is 2+3?"}]}
        stream = await ChatProxy(url).open_stream(body, env, {"loaded": True})
        lines = b"".join([chunk async for chunk in stream]).decode().splitlines()
        return [json.loads(ln[6:]) for ln in lines if ln.startswith("data: ") and ln != "data: [DONE]"]

    def broken_setup(ro):
        raise ValueError("no workspace")

    with BackgroundServer(create_app(engines={"scripted": (policy, renderer)})) as srv:
        events = run(chat(srv.url, env))
        one_turn = run(chat(srv.url, Environment(tools=[add], max_turns=1)))
        failed = run(chat(srv.url, Environment(tools=[add], setup=broken_setup)))
    mine = [e["rlft"] for e in events if "rlft" in e]
    assert [e["type"] for e in mine] == ["env", "tool_call", "tool_result", "turn", "done"]
    assert transcript(mine[-1]["messages"]) == transcript(trained.messages[2:])  # after system + user
    assert mine[-1]["stopped"] is None and mine[2]["content"] == "5"
    # the loop's limits and failures reach the page as the rollout's would end
    assert one_turn[-1]["rlft"]["stopped"] == "max_turns (1) reached"
    assert [m["role"] for m in one_turn[-1]["rlft"]["messages"]] == ["assistant", "tool"]
    assert failed[-1] == {"error": {"message": "chat with the environment failed: ValueError: no workspace"}}

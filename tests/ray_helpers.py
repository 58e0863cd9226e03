"""A tiny environment (a tool and rewards) and a scripted-policy engine factory for the Ray
rollout-worker tests: importable by the actors (env by file path, engine as "file.py:function")."""

import os
import re
import time

from rlft.env import Environment
from rlft.rewards import Reward
from rlft.tools import tool
from rlft.types import Rollout

TABLE = {"apple": 3, "pear": 5, "plum": 7, "fig": 11}


@tool
async def lookup(key: str, rollout: Rollout) -> int:
    """Look up the number stored under a key.

    Args:
        key: the key
    """
    import asyncio

    ex = rollout.example
    marker_dir, slow = ex.get("marker_dir"), float(ex.get("slow", 0.0))
    if marker_dir:  # lets a test see that the tool is running (and kill its worker meanwhile)
        first = not any(n.startswith(f"{key}-") for n in os.listdir(marker_dir))
        with open(os.path.join(marker_dir, f"{key}-{os.getpid()}-{time.monotonic_ns()}"), "w") as f:
            f.write(key)
        if ex.get("slow_first_only") and not first:
            slow = 0.0
    await asyncio.sleep(slow)
    return TABLE[key]


def correct(ro: Rollout) -> float:
    return float(ro.completion.strip() == str(ro.ground_truth))


def brevity(ro: Rollout) -> float:
    return 1.0 / (1 + len(ro.completion))


env = Environment(system_prompt="Look the key up, then answer with its number.", tools=[lookup],
                  rewards=[correct, Reward(brevity, weight=0.1)], max_turns=3, tool_timeout=120)

CALL = '<tool_call>{{"name": "lookup", "arguments": {{"key": "{key}"}}}}</tool_call>'


def script(prompt_text: str, turn: int) -> str:
    key = re.findall(r"key (\w+)", prompt_text)[-1]
    if turn == 0:
        return CALL.format(key=key)
    answer = re.findall(r"(\d+)", prompt_text.split("lookup")[-1])
    return answer[-1] if answer and key != "fig" else "no idea"  # "fig": a wrong answer, reward 0


def scripted():
    """The engine factory: (ScriptedPolicy, renderer) over the tiny tokenizer."""
    from rlft.renderer import Renderer
    from rlft.testing import ScriptedPolicy
    from rlft.testing.tokenizer import build_tiny_tokenizer

    renderer = Renderer(build_tiny_tokenizer())
    return ScriptedPolicy(renderer, script), renderer


"""Rollout concurrency: 64 rollouts x 3 turns, each turn calling a tool that sleeps 200 ms.

Serial execution would spend 64 x 3 x 0.2 = 38.4 s in tools; concurrent rollouts should take
close to 3 x 0.2 = 0.6 s plus rendering/parsing overhead. The policy is scripted (no model), so
this measures the rollout loop itself.

    .venv/bin/python benchmarks/bench_rollouts.py [--rollouts 64] [--sleep 0.2]
"""

import argparse
import asyncio
import time

from rlft.env import Environment, Sampler
from rlft.renderer import Renderer
from rlft.testing import ScriptedPolicy
from rlft.testing.tokenizer import build_tiny_tokenizer
from rlft.tools import tool


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rollouts", type=int, default=64)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--sleep", type=float, default=0.2)
    args = ap.parse_args()

    @tool
    async def lookup(key: str) -> str:
        """Look a key up (sleeps to simulate an API)."""
        await asyncio.sleep(args.sleep)
        return key.upper()

    renderer = Renderer(build_tiny_tokenizer())
    call = '<tool_call>{"name": "lookup", "arguments": {"key": "abc"}}</tool_call>'
    script = [call] * args.turns + ["done"]
    env = Environment(tools=[lookup], max_turns=args.turns + 1, rewards=[lambda ro: 1.0])
    sampler = Sampler(ScriptedPolicy(renderer, script), renderer)
    examples = [{"prompt": f"question {i}"} for i in range(args.rollouts)]
    t0 = time.perf_counter()
    groups = asyncio.run(env.run_groups(examples, sampler, group_size=1))
    elapsed = time.perf_counter() - t0
    calls = sum(r.tool_calls for g in groups for r in g.rollouts)
    serial = calls * args.sleep
    ideal = args.turns * args.sleep
    print(f"{args.rollouts} rollouts x {args.turns} tool turns ({calls} calls, {args.sleep * 1000:.0f} ms each)")
    print(f"wall clock {elapsed:.3f} s | ideal (turns x sleep) {ideal:.3f} s | serial {serial:.1f} s | "
          f"overhead {elapsed - ideal:.3f} s | speed-up vs serial {serial / elapsed:.0f}x")


if __name__ == "__main__":
    main()

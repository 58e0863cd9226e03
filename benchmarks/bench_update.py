"""The policy update of one GRPO step, with and without shared-prefix training, on the same batch.

    python benchmarks/bench_update.py --task demo         # the demo's prompts, answers ~35 tokens
    python benchmarks/bench_update.py --task tool_use     # recipes/tool_use: prompts with the tool schemas
    python benchmarks/bench_update.py --task tool_use --answer 80 --repeats 3 --threads 2

Builds one batch of ``--batch`` prompts x ``--group`` rollouts: the prompts are the task's own
(its system prompt, tool schemas and dataset rows rendered by the SmolLM2 chat template, as a run
renders them); each completion is ``--answer`` +- 50 % random token ids, all sampled (mask 1),
with advantages +-1 so that every rollout is trained on. The update's cost does not depend on
which tokens they are, only on how many. Then times ``rlft.training.update.policy_update``
(SmolLM2-135M-Instruct, LoRA r16, bf16, the task's ``micro_batch_tokens``) with
``shared_prefix = false`` and ``true``, alternating, ``--repeats`` times each after one warm-up
of each, and prints the median seconds, the tokens forwarded (``batch/forward_tokens``) and the
speed-up. The learning rate is 0 so that every repeat updates the same weights.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = {  # (environment, its data file ("" = the module's dataset), micro_batch_tokens of its config,
    #          mean answer tokens measured in its runs: issue 18)
    "demo": ("rlft.demo", "", 4096, 35),
    "tool_use": (os.path.join(ROOT, "recipes", "tool_use", "env.py"),
                 os.path.join(ROOT, "recipes", "tool_use", "data.jsonl"), 1024, 80),
}


def prompts(task: str, tokenizer, n: int) -> list[list[int]]:
    """The first ``n`` rows' prompt ids, rendered as a rollout renders them."""
    from rlft.loader import load_environment
    from rlft.renderer import Renderer
    from rlft.tools import tool_schemas

    spec, data, _, _ = TASKS[task]
    env, module, _ = load_environment(spec)
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()] if data else list(module.dataset)
    renderer = Renderer(tokenizer)
    schemas = tool_schemas(env.tools) or None
    return [renderer.render_prompt(env.initial_messages(row), schemas) for row in rows[:n]]


def batch(prompt_ids: list[list[int]], group: int, answer: int, vocab: int, seed: int = 0):
    from rlft.types import Group, Rollout

    rng = random.Random(seed)
    groups = []
    for p, ids in enumerate(prompt_ids):
        rollouts = []
        for i in range(group):
            n = rng.randint(max(1, answer // 2), answer * 3 // 2)
            rollouts.append(Rollout(example={}, prompt_ids=ids, completion_ids=[rng.randrange(vocab) for _ in range(n)],
                                    logprobs=[-1.0] * n, mask=[1] * n, advantage=1.0 if i % 2 else -1.0,
                                    group_index=i))
        groups.append(Group(example={}, rollouts=rollouts, example_id=p))
    return groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=sorted(TASKS), default="demo")
    ap.add_argument("--batch", type=int, default=4, help="prompts")
    ap.add_argument("--group", type=int, default=8, help="rollouts per prompt")
    ap.add_argument("--answer", type=int, default=0, help="mean completion tokens (0 = the task's)")
    ap.add_argument("--micro-batch-tokens", type=int, default=0, help="0 = the task's config")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    args = ap.parse_args()

    import torch

    from rlft.policy import LoraSpec, load_policy
    from rlft.training.grpo import LossConfig
    from rlft.training.update import UpdateConfig, policy_update

    if args.threads:
        torch.set_num_threads(args.threads)
    _, _, budget, answer = TASKS[args.task]
    budget, answer = args.micro_batch_tokens or budget, args.answer or answer
    policy = load_policy("smollm2", dtype="bfloat16", lora=LoraSpec(rank=16, alpha=32))
    groups = batch(prompts(args.task, policy.tokenizer, args.batch), args.group, answer, len(policy.tokenizer))
    P = statistics.mean(len(g.rollouts[0].prompt_ids) for g in groups)
    C = statistics.mean(len(r.completion_ids) for g in groups for r in g.rollouts)
    print(f"{args.task}: {args.batch} prompts x {args.group} rollouts, prompt {P:.0f} tokens, answers {C:.0f} "
          f"tokens (mean), micro_batch_tokens {budget}, torch threads {torch.get_num_threads()}")
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=0.0)
    times: dict[str, list[float]] = {"false": [], "true": []}
    tokens: dict[str, float] = {}
    for rep in range(args.repeats + 1):  # repeat 0 warms up both paths
        for shared in ("false", "true"):
            cfg = UpdateConfig(loss=LossConfig(), micro_batch_tokens=budget, bf16=True, shared_prefix=shared)
            t0 = time.perf_counter()
            stats = policy_update(policy, groups, cfg, optimizer)
            dt = time.perf_counter() - t0
            tokens[shared] = stats["batch/forward_tokens"]
            if rep:
                times[shared].append(dt)
            print(f"  shared_prefix={shared:5s} repeat {rep}: {dt:6.2f} s, {tokens[shared]:.0f} tokens forwarded"
                  + (" (warm-up)" if not rep else ""), flush=True)
    plain, shared = statistics.median(times["false"]), statistics.median(times["true"])
    print(f"update: plain {plain:.2f} s, shared prefix {shared:.2f} s (median of {args.repeats}): "
          f"{plain / shared:.2f}x faster; tokens forwarded {tokens['false']:.0f} -> {tokens['true']:.0f} "
          f"({1 - tokens['true'] / tokens['false']:.0%} fewer)")


if __name__ == "__main__":
    main()

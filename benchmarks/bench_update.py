"""The policy update of one GRPO step on the same batch, several ways, with its achieved TFLOP/s.

    python benchmarks/bench_update.py --task demo --threads 1        # window vs sampled-position head
    python benchmarks/bench_update.py --task tool_use --threads 1 --repeats 2
    python benchmarks/bench_update.py --task demo --arms plain,shared  # without / with shared-prefix training

Builds one batch of ``--batch`` prompts x ``--group`` rollouts: the prompts are the task's own
(its system prompt, tool schemas and dataset rows rendered by the SmolLM2 chat template, as a run
renders them); each completion is ``--answer`` +- 50 % random token ids, all sampled (mask 1),
with advantages +-1 so that every rollout is trained on. The update's cost does not depend on
which tokens they are, only on how many. Then times ``rlft.training.update.policy_update``
(SmolLM2-135M-Instruct, LoRA r16, bf16, the task's ``micro_batch_tokens``) in each of
``--arms``, alternating, ``--repeats`` times each after one warm-up of each, and prints the
median seconds, the tokens forwarded (``batch/forward_tokens``) and the achieved TFLOP/s. Arms:
``plain`` (``shared_prefix = false``), ``shared`` (``true``; both with logprobs at the sampled
positions only, ``rlft.training.head``), ``shared-window`` (``true``, with the output head over
the whole completion window as before ``rlft.training.head``). The learning rate is 0 so that
every repeat updates the same weights.

FLOP model (the useful work, the same for every arm: padding, the recomputed head chunks and
shared prompts forwarded again are not counted), per trained token t of the batch (each
rollout's prompt + completion, a group's shared prompt once) and sampled position s:
``4 N_frozen`` (forward + input gradient through the frozen decoder linears) + ``6 N_lora``
(forward, input and weight gradients of the adapters) per t, ``4 N_head`` per s (the output
head's forward and input gradient), and ``12 d_model`` per attended (query, key) pair and layer
(q k^T and p v, forward and two backward matmuls each). The bound beside it is measured in the
same process between repeats: the median rate of a bf16 (1024 x 576) @ (576 x 1536) matmul (the
decoder's MLP shape) on the same threads, so that a busy machine lowers both.
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
    "demo": ("rlft.demo", "", 2048, 35),
    "tool_use": (os.path.join(ROOT, "recipes", "tool_use", "env.py"),
                 os.path.join(ROOT, "recipes", "tool_use", "data.jsonl"), 2048, 80),
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


# arm -> (shared_prefix, logprobs at the sampled positions only)
ARMS = {"plain": ("false", True), "shared": ("true", True), "shared-window": ("true", False)}


def useful_flops(groups, policy) -> float:
    """The FLOP model of the module docstring for one update of ``groups``."""
    import torch

    from rlft.training.prefix import common_prefix

    base = policy.base_model
    head_w = base.get_output_embeddings().weight
    n_frozen = sum(m.weight.numel() for name, m in base.named_modules()
                   if isinstance(m, torch.nn.Linear) and m.weight is not head_w and not m.weight.requires_grad
                   and "lora_" not in name)
    n_lora = sum(p.numel() for p in policy.trainable_parameters())
    c = base.config
    tokens = pairs = sampled = 0
    for g in groups:
        seqs = [r.prompt_ids + r.completion_ids for r in g.rollouts]
        S = common_prefix(seqs)
        tokens += S + sum(len(q) - S for q in seqs)
        pairs += S * (S + 1) // 2 + sum(j + 1 for q in seqs for j in range(S, len(q)))
        sampled += sum(sum(r.mask) for r in g.rollouts)
    return ((4 * n_frozen + 6 * n_lora) * tokens + 4 * head_w.numel() * sampled
            + 12 * c.hidden_size * c.num_hidden_layers * pairs)


def matmul_rate() -> float:
    """FLOP/s of one bf16 (1024 x 576) @ (576 x 1536) matmul, the median of 5 (after one)."""
    import torch

    a, b = torch.randn(1024, 576, dtype=torch.bfloat16), torch.randn(576, 1536, dtype=torch.bfloat16)
    a @ b
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * 1024 * 576 * 1536 / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=sorted(TASKS), default="demo")
    ap.add_argument("--batch", type=int, default=4, help="prompts")
    ap.add_argument("--group", type=int, default=8, help="rollouts per prompt")
    ap.add_argument("--answer", type=int, default=0, help="mean completion tokens (0 = the task's)")
    ap.add_argument("--micro-batch-tokens", type=int, default=0, help="0 = the task's config")
    ap.add_argument("--arms", default="shared-window,shared", help=f"comma-separated: {', '.join(ARMS)}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    args = ap.parse_args()

    import torch

    from rlft.policy import LoraSpec, load_policy
    from rlft.training import head
    from rlft.training.grpo import LossConfig
    from rlft.training.update import UpdateConfig, policy_update

    if args.threads:
        torch.set_num_threads(args.threads)
    arms = args.arms.split(",")
    _, _, budget, answer = TASKS[args.task]
    budget, answer = args.micro_batch_tokens or budget, args.answer or answer
    policy = load_policy("smollm2", dtype="bfloat16", lora=LoraSpec(rank=16, alpha=32))
    groups = batch(prompts(args.task, policy.tokenizer, args.batch), args.group, answer, len(policy.tokenizer))
    P = statistics.mean(len(g.rollouts[0].prompt_ids) for g in groups)
    C = statistics.mean(len(r.completion_ids) for g in groups for r in g.rollouts)
    flops = useful_flops(groups, policy)
    print(f"{args.task}: {args.batch} prompts x {args.group} rollouts, prompt {P:.0f} tokens, answers {C:.0f} "
          f"tokens (mean), micro_batch_tokens {budget}, torch threads {torch.get_num_threads()}, "
          f"{flops / 1e12:.3f} TFLOP of useful work")
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=0.0)
    times: dict[str, list[float]] = {a: [] for a in arms}
    tokens: dict[str, float] = {}
    rates: list[float] = []
    supported = head.supported
    for rep in range(args.repeats + 1):  # repeat 0 warms up every arm
        for arm in arms:
            shared, sampled = ARMS[arm]
            head.supported = supported if sampled else (lambda config: False)
            cfg = UpdateConfig(loss=LossConfig(), micro_batch_tokens=budget, bf16=True, shared_prefix=shared)
            t0 = time.perf_counter()
            stats = policy_update(policy, groups, cfg, optimizer)
            dt = time.perf_counter() - t0
            head.supported = supported
            tokens[arm] = stats["batch/forward_tokens"]
            if rep:
                times[arm].append(dt)
            print(f"  {arm:13s} repeat {rep}: {dt:6.2f} s, {tokens[arm]:.0f} tokens forwarded"
                  + (" (warm-up)" if not rep else ""), flush=True)
        rates.append(matmul_rate())
    bound = statistics.median(rates)
    print(f"bf16 matmul rate measured between repeats (median): {bound / 1e12:.3f} TFLOP/s "
          f"(idle, 2 cores: 0.37-0.39 on an AMD EPYC with avx512_bf16, ~1.9 on a Xeon with AMX; benchmarks/README.md)")
    for arm in arms:
        t = statistics.median(times[arm])
        print(f"update, {arm}: {t:.2f} s (median of {args.repeats}; {min(times[arm]):.2f}-{max(times[arm]):.2f}), "
              f"{tokens[arm]:.0f} tokens forwarded, {flops / t / 1e12:.3f} TFLOP/s = {flops / t / bound:.0%} of the "
              f"measured matmul rate")
    if len(arms) == 2:
        a, b = (statistics.median(times[x]) for x in arms)
        print(f"{arms[1]} vs {arms[0]}: {a / b:.2f}x")


if __name__ == "__main__":
    main()

"""Multi-turn rollouts with and without the HF engine's prefix cache (``prefix_cache_mb``), SmolLM2.

    PYTHONPATH=. python benchmarks/bench_multiturn.py                     # synthetic, ~1 min
    PYTHONPATH=. python benchmarks/bench_multiturn.py --task tool_use --steps 2 --warm-cache /tmp/warm.pt

Both modes run in one invocation: ``prefix_cache_mb = 0`` (every turn prefills the whole
conversation again, as before the cache) and 512, the default (a turn that extends a finished one
prefills only the new tokens, ``rlft.engines.prefix_cache``).

``--task synthetic``: the engine alone, as the trainer builds it for a LoRA run (SmolLM2-135M-Instruct
+ LoRA r16, sampled from the merged bf16 copy, inline): 4 prompts x 4 rollouts, each prompt a
~470-token system prompt (standing in for tool schemas) and a question, 3 turns of up to
``--max-new-tokens`` at temperature 0.7 (seeded per rollout and turn), a fixed 40-token tool
result appended after each turn. A fresh engine per mode.

``--task tool_use``: the recipe itself (``recipes/tool_use/config.toml``: 4 prompts x 4 rollouts,
its tools, data and sampling settings). It runs the recipe's SFT warm-up first (``--warmup-steps``,
its 6 by default: before it the model answers at once and rollouts have one turn; ``--warm-cache``
keeps the warmed weights in a file for the next invocation), then samples each of ``--steps`` steps
(``rlft.training.loop.sample``, the trainer's own) once per mode, interleaved, syncing the engine
after each as after an optimizer step (which drops the cache) but without an update, so both modes
sample the same weights, prompts and seeds. Its sampling seconds include the tools and rewards.

Reported per mode: seconds (wall of the sampling), the engine's busy seconds (its forward passes
and sampling) and the part of them spent admitting requests (prefill, joining the batch: the work
the cache cuts; decoding is the same work either way), prefill tokens computed and reused, prefill
forwards, decode steps, assistant turns and sampled tokens. Sampled text can differ between modes
(and between runs of one mode: the inline engine batches whatever has arrived): where bf16
rounding moves a near-tie, reused KV having been computed in decode steps and a re-prefill in one
pass, a seeded rollout continues differently. So compare the token counts beside the times.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


SYSTEM = "You are a shop assistant with tools. " + " ".join(
    f"Tool number {i} takes arguments a, b and c and returns a JSON object." for i in range(25))
QUESTIONS = ["How many orders did Alice place in March?", "What is the total cost of the red shoes with tax?",
             "Which customer spent the most?", "List the products under 10 dollars."]
TOOL_RESULT = ('<|im_end|>\n<|im_start|>user\n<tool_response>\n{"rows": [["Alice", 3], ["Bob", 5]]}\n'
               "</tool_response><|im_end|>\n<|im_start|>assistant\n")
KEYS = ("s", "busy", "admit", "prefill", "reused", "prefills", "decode_steps", "rollouts", "turns", "sampled")


def run_synthetic(modes: list[int], group: int, turns: int, max_new_tokens: int) -> dict[int, dict[str, float]]:
    import asyncio

    from rlft.engines.base import SamplingParams
    from rlft.engines.hf import HFEngine
    from rlft.policy import LoraSpec, load_policy

    policy = load_policy("smollm2", dtype="bfloat16", lora=LoraSpec(rank=16))
    tok = policy.tokenizer
    prompts = []
    for q in QUESTIONS:
        enc = tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
                                      add_generation_prompt=True)
        prompts.append(list(enc["input_ids"] if hasattr(enc, "keys") else enc))
    result = tok.encode(TOOL_RESULT, add_special_tokens=False)
    print(f"prompts of {[len(p) for p in prompts]} tokens, tool result {len(result)} tokens", flush=True)

    async def rollout(engine, ids: list[int], seed: int) -> int:
        n = 0
        for turn in range(turns):
            sample = await engine.generate(ids, SamplingParams(temperature=0.7, max_new_tokens=max_new_tokens,
                                                               seed=seed * 100 + turn))
            ids, n = ids + sample.tokens + result, n + len(sample.tokens)
        return n

    async def step(engine) -> list[int]:
        return await asyncio.gather(*[rollout(engine, prompts[i // group], i) for i in range(len(prompts) * group)])

    out = {}
    for mb in modes:
        engine = HFEngine(policy.model, tok, merge_lora=True, inline=True, prefix_cache_mb=mb, seed=0)
        try:
            t0 = time.perf_counter()
            sampled = asyncio.run(step(engine))
            wall = time.perf_counter() - t0
        finally:
            engine.close()
        st = engine.stats
        got = {"s": wall, "busy": st.busy_s, "admit": st.admit_s, "prefill": st.prefill_tokens,
               "reused": st.reused_tokens, "prefills": st.prefill_batches, "decode_steps": st.decode_steps,
               "rollouts": len(sampled), "turns": turns * len(sampled), "sampled": sum(sampled)}
        o = out.setdefault(mb, dict.fromkeys(KEYS, 0.0))  # a mode named twice (ABBA order): summed
        for k in KEYS:
            o[k] += got[k]
        print(f"prefix_cache_mb {mb}: {wall:.1f} s (engine {st.busy_s:.1f} s), load {os.getloadavg()[0]:.2f}",
              flush=True)
    return out


def warm(run, steps: int, cache: str) -> None:
    """The recipe's SFT warm-up on ``run``'s policy, or its trained weights from ``cache`` (a file
    an earlier invocation with the same ``--warmup-steps`` wrote: the warm-up is ~10 min here)."""
    import torch

    from rlft.engines.base import WeightUpdate

    model = run.policy.model
    if cache and os.path.exists(cache):
        model.load_state_dict(torch.load(cache), strict=False)
        run.engine.sync_weights(WeightUpdate(0, model=model))
        print(f"warm-up weights from {cache}", flush=True)
        return
    from rlft.training.warmup import plan_warmup, warm_up

    t0 = time.perf_counter()
    warm_up(run, plan_warmup(run))  # pushes the weights to the engine
    print(f"warm-up ({steps} SFT steps) in {time.perf_counter() - t0:.0f} s", flush=True)
    if cache:
        torch.save({k: v for k, v in model.state_dict().items() if "lora_" in k}, cache)


def run_tool_use(cfg, modes: list[int], steps: int, warmup_steps: int, warm_cache: str) -> dict[int, dict[str, float]]:
    from rlft.engines.base import WeightUpdate
    from rlft.engines.prefix_cache import PrefixCache
    from rlft.training import loop
    from rlft.training.run import as_config, open_run

    out = {mb: dict.fromkeys(KEYS, 0.0) for mb in modes}
    with tempfile.TemporaryDirectory() as runs:
        t0 = time.perf_counter()
        with open_run(as_config(cfg, {"runs_dir": runs, "progress": False, "sft_steps": warmup_steps})) as run:
            print(f"run opened in {time.perf_counter() - t0:.0f} s", flush=True)
            if warmup_steps:
                warm(run, warmup_steps, warm_cache)
            engine, stats = run.engine, run.engine.stats
            for step in range(steps):
                for mb in modes:  # interleaved: the same step's prompts and seeds, once per mode
                    engine.prefix_cache = PrefixCache(mb << 20, min_match=engine.min_shared_prefix)
                    before = (stats.busy_s, stats.admit_s, stats.prefill_tokens, stats.reused_tokens,
                              stats.prefill_batches, stats.decode_steps)
                    groups, t = run.wait(loop.sample(run, step))
                    o = out[mb]
                    o["s"] += t
                    for key, now, was in zip(("busy", "admit", "prefill", "reused", "prefills", "decode_steps"), (
                            stats.busy_s, stats.admit_s, stats.prefill_tokens, stats.reused_tokens,
                            stats.prefill_batches, stats.decode_steps), before):
                        o[key] += now - was
                    for g in groups:
                        for r in g.rollouts:
                            o["rollouts"] += 1
                            o["turns"] += sum(1 for m in r.messages if m.get("role") == "assistant")
                            o["sampled"] += r.num_sampled_tokens
                    print(f"step {step + 1}, prefix_cache_mb {mb}: {t:.1f} s "
                          f"(engine {stats.busy_s - before[0]:.1f} s), load {os.getloadavg()[0]:.2f}", flush=True)
                    engine.sync_weights(WeightUpdate(step + 1, model=run.policy.model))  # as after an update
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=("synthetic", "tool_use"), default="synthetic")
    ap.add_argument("--modes", default="0,512,512,0",
                    help="prefix_cache_mb values, in order (one named twice is summed: ABBA damps drifting load)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    ap.add_argument("--group", type=int, default=4, help="synthetic: rollouts per prompt")
    ap.add_argument("--turns", type=int, default=3, help="synthetic: turns per rollout")
    ap.add_argument("--max-new-tokens", type=int, default=80, help="synthetic: per turn")
    ap.add_argument("--steps", type=int, default=2, help="tool_use: sampling steps per mode")
    ap.add_argument("--warmup-steps", type=int, default=6, help="tool_use: SFT warm-up steps first (0 = none)")
    ap.add_argument("--warm-cache", default="", help="tool_use: file keeping the warm-up's weights between runs")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()
    modes = [int(m) for m in args.modes.split(",")]
    if args.task == "synthetic":
        out = run_synthetic(modes, args.group, args.turns, args.max_new_tokens)
        what = (f"synthetic: 4 prompts x {args.group} rollouts x {args.turns} turns of <= {args.max_new_tokens} "
                "tokens, LoRA merged bf16 engine")
    else:
        from rlft.config import load_config

        cfg = load_config(os.path.join(ROOT, "recipes", "tool_use", "config.toml"))
        out = run_tool_use(cfg, modes, args.steps, args.warmup_steps, args.warm_cache)
        what = (f"tool_use sampling: {args.steps} steps of {cfg.batch_size} x {cfg.group_size} rollouts, "
                f"after {args.warmup_steps} SFT warm-up steps")
    print(f"\n{what}; torch threads {torch.get_num_threads()}; load average (1/5/15 min) at start "
          f"{load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}, at end {'/'.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| prefix_cache_mb | seconds | engine busy s | of which prefill s | prefill tokens computed | reused "
          "| prefill forwards | decode steps | turns / rollout | sampled tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mb, o in out.items():
        print(f"| {mb} | {o['s']:.1f} | {o['busy']:.1f} | {o['admit']:.1f} | {o['prefill']:,.0f} | {o['reused']:,.0f} "
              f"| {o['prefills']:.0f} | {o['decode_steps']:.0f} | {o['turns'] / max(o['rollouts'], 1):.2f} "
              f"| {o['sampled']:,.0f} |")

if __name__ == "__main__":
    main()

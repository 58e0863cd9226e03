"""One decoder layer's seven LoRA linears, forward + backward, split into the frozen products and the rest.

    python benchmarks/bench_lora_layer.py                      # SmolLM2-135M's shapes, 1412 / 1970 / 1126 rows
    python benchmarks/bench_lora_layer.py --rows 1024,2048 --repeats 12

The update's linear layers run through ``rlft.training.lora_linear`` (one autograd node per peft
LoRA ``Linear``: the frozen bf16 product, the rank-R adapter terms, their gradients). For each
row count M (a micro-batch's tokens: 1412 is the demo's batch, 1970 / 1126 the tool_use
benchmark's micro-batches) this times, alternating, ``--repeats`` times each, median reported:

- ``layer``: q, k, v, o, gate, up, down (SmolLM2-135M: 576 wide, 192 for k/v, 1536 for the MLP),
  forward and backward, random bf16 activations (q, k, v read one tensor, gate and up another) and
  upstream gradients, float32 adapters (rank ``--rank``, scale 2): each projection through its own
  fused node (``separate nodes``), and q, k, v and gate, up through their shared node as the
  trainer routes them (``q,k,v / gate,up shared``);
- ``frozen``: the same layers' frozen products alone, ``x W^T`` forward and ``dy W`` backward
  (oneDNN), with their rate in TFLOP/s;
- ``the rest``: ``layer`` - ``frozen``: the adapters' products, their gradients and the
  reductions over the rows (memory passes over ``[M, width]`` activations), with the autograd
  nodes' own overhead and the float32 gradient casts;
- per frozen shape, oneDNN's rate forward and backward: some row counts run at about half the
  rate of others (measured in benchmarks/README.md, nineteenth session).

Inputs are rotated over ``--buffers`` copies so that they do not stay in cache between calls, as
in an update where each layer's activations were written long before. No model is loaded.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rlft.training.lora_linear import _lora_linear, _SharedInputLora

# (in, out) of q, k, v, o, gate, up, down in SmolLM2-135M-Instruct
SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
SIBLINGS = [(0, 1, 2), (3,), (4, 5), (6,)]  # projections that read one input: q, k, v; o; gate, up; down


def _inputs(M: int, rank: int, buffers: int, gen: torch.Generator) -> list[list[tuple]]:
    out = []
    for _ in range(buffers):
        layer, xs = [], {}
        for i, (K, N) in enumerate(SHAPES):
            group = next(g for g in SIBLINGS if i in g)[0]  # siblings read the same tensor
            x = xs.setdefault(group, torch.randn(M, K, generator=gen).bfloat16().requires_grad_())
            w = (torch.randn(N, K, generator=gen) / K ** 0.5).bfloat16()
            a = (torch.randn(rank, K, generator=gen) * 0.02).requires_grad_()
            b = (torch.randn(N, rank, generator=gen) * 0.02).requires_grad_()
            dy = torch.randn(M, N, generator=gen).bfloat16()
            layer.append((x, w, a, b, dy))
        out.append(layer)
    return out


def _clear_grads(tensors: list[tuple]) -> None:
    for x, _, a, b, _ in tensors:
        x.grad = a.grad = b.grad = None


def _layer(tensors: list[tuple]) -> None:
    """Each projection its own node (siblings' input gradients added up, as autograd does)."""
    _clear_grads(tensors)
    for x, w, a, b, dy in tensors:
        _lora_linear(x, w, None, a, b, 2.0).backward(dy)


def _layer_shared(tensors: list[tuple]) -> None:
    """q, k, v and gate, up through the shared node, as ``use_fused_lora`` routes them."""
    _clear_grads(tensors)
    for group in SIBLINGS:
        members = [tensors[i] for i in group]
        if len(members) == 1:  # o, down: their own node
            x, w, a, b, dy = members[0]
            _lora_linear(x, w, None, a, b, 2.0).backward(dy)
            continue
        params = [t for _, w, a, b, _ in members for t in (w, None, a, b)]
        ys = _SharedInputLora.apply(members[0][0], (2.0,) * len(members), *params)
        torch.autograd.backward(ys, [dy for *_, dy in members])


def _frozen(tensors: list[tuple]) -> None:
    with torch.no_grad():
        for x, w, _, _, dy in tensors:
            x @ w.T
            dy @ w


def _median_ms(fn, inputs: list[list[tuple]], calls: int) -> float:
    t = time.perf_counter()
    for i in range(calls):
        fn(inputs[i % len(inputs)])
    return (time.perf_counter() - t) / calls * 1e3


def _onednn_rates(M: int, K: int, N: int, gen: torch.Generator, repeats: int) -> tuple[float, float]:
    """TFLOP/s of ``x W^T`` and ``dy W`` for one frozen shape, inputs hot in cache."""
    x, w = torch.randn(M, K, generator=gen).bfloat16(), torch.randn(N, K, generator=gen).bfloat16()
    dy = torch.randn(M, N, generator=gen).bfloat16()
    fwd = statistics.median(_median_ms(lambda t: t[0] @ t[1].T, [(x, w)], 5) for _ in range(repeats))
    bwd = statistics.median(_median_ms(lambda t: t[0] @ t[1], [(dy, w)], 5) for _ in range(repeats))
    return 2 * M * K * N / fwd / 1e9, 2 * M * K * N / bwd / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="1412,1970,1126", help="row counts M (tokens of a micro-batch)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--buffers", type=int, default=4, help="input sets rotated so that none stays in cache")
    a = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    print(f"# {torch.get_num_threads()} threads, rank {a.rank}; median of {a.repeats} alternating repeats")
    print("| rows | LoRA nodes | layer fwd+bwd | frozen products | their rate | the rest |")
    print("|---|---|---|---|---|---|")
    rates = []
    for M in [int(r) for r in a.rows.split(",")]:
        inputs = _inputs(M, a.rank, a.buffers, gen)
        arms = {"separate nodes": _layer, "q,k,v / gate,up shared": _layer_shared, "frozen": _frozen}
        for fn in arms.values():  # warm-up
            fn(inputs[0])
        times: dict[str, list[float]] = {name: [] for name in arms}
        for _ in range(a.repeats):
            for name, fn in arms.items():
                times[name].append(_median_ms(fn, inputs, a.buffers))
        fm = statistics.median(times["frozen"])
        flop = sum(2 * 2 * M * K * N for K, N in SHAPES)  # forward x W^T and backward dy W
        for name in ("separate nodes", "q,k,v / gate,up shared"):
            lm = statistics.median(times[name])
            print(f"| {M} | {name} | {lm:.1f} ms | {fm:.1f} ms | {flop / fm / 1e9:.2f} TFLOP/s | "
                  f"{lm - fm:.1f} ms ({(lm - fm) / lm:.0%}) |", flush=True)
        for K, N in sorted(set(SHAPES)):
            fwd, bwd = _onednn_rates(M, K, N, gen, a.repeats)
            rates.append(f"M={M} {K}->{N}: forward {fwd:.2f}, backward {bwd:.2f} TFLOP/s")
    print("\noneDNN's bf16 rate per frozen shape (inputs hot in cache):")
    print("\n".join(rates))


if __name__ == "__main__":
    main()

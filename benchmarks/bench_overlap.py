"""Overlap: seconds per training step with and without ``overlap`` (sample step n+1 while step n trains).

Trains the same short run twice per repeat, ``overlap = false`` then ``true`` (alternating, so
drift in a shared machine's load hits both), and prints the mean ``time/step`` of steps 2..N (step 1
cannot overlap anything), with the mean exposed generation wait (``time/generate``), the update
time (``time/train``) and the load average. Eval, validation and checkpoints stay out of the way
(eval off, checkpoint only at the end, which ``time/step`` does not include).

    .venv/bin/python benchmarks/bench_overlap.py                       # tiny random model, fp32
    .venv/bin/python benchmarks/bench_overlap.py --model smollm2 --steps 4 --max-tokens 48
    .venv/bin/python benchmarks/bench_overlap.py --set sync_check=false --repeats 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import textwrap
from pathlib import Path

ENV = textwrap.dedent('''
    from rlft.env import Environment

    def variety(ro):
        return len(set(ro.completion.split())) / 8

    env = Environment(system_prompt="Answer in one short sentence.", rewards=[variety], max_tokens={max_tokens})
    dataset = [{{"prompt": f"Write a sentence about the number {{i}}."}} for i in range(256)]
''')


def run(workdir: Path, model: str, overlap: bool, tag: str, args: argparse.Namespace) -> dict[str, float]:
    from rlft.store import RunStore
    from rlft.training.loop import train

    base = dict(steps=args.steps, batch_size=args.batch_size, group_size=args.group_size, eval_fraction=0.0,
                validate=False, progress=False, checkpoint_every=0, keep_checkpoints=1, seed=0)
    if args.model == "tiny":
        base.update(lora=False, dtype="float32", learning_rate=1e-3)
    overrides = dict(kv.split("=", 1) for kv in args.set)
    runs = workdir / f"runs-{tag}"
    run_id = train({**base, **overrides}, env=str(workdir / "env.py"), model=model, runs_dir=str(runs),
                   overlap=overlap)
    m = RunStore(runs, readonly=True).metrics(run_id, ["time/step", "time/generate", "time/train"])
    later = lambda k: [v for s, v in m[k] if s >= 2]  # noqa: E731
    return {"s/step": statistics.fmean(later("time/step")), "generate": statistics.fmean(later("time/generate")),
            "train": statistics.fmean(later("time/train"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny (random tiny Llama, built here) | smollm2 | a model path")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    args = ap.parse_args()

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (workdir / "env.py").write_text(ENV.format(max_tokens=args.max_tokens))
        model = args.model
        if model == "tiny":
            from rlft.testing.models import save_tiny_model

            model = str(workdir / "model")
            save_tiny_model(model)
        results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        load = [os.getloadavg()[0]]
        for rep in range(args.repeats):
            for overlap in (False, True):
                results[overlap].append(run(workdir, model, overlap, f"{rep}-{overlap}", args))
                load.append(os.getloadavg()[0])
    print(f"model {args.model}, {args.steps} steps x {args.batch_size} prompts x {args.group_size} rollouts, "
          f"max_tokens {args.max_tokens}, torch threads {torch.get_num_threads()}, cores {os.cpu_count()}, "
          f"load average (1 min) {min(load):.1f}-{max(load):.1f}, overrides {args.set or 'none'}")
    print(f"{'overlap':8} {'s/step':>8} {'generate':>9} {'train':>7}   (means of steps 2..N; "
          f"median of {args.repeats} repeat(s))")
    for overlap in (False, True):
        med = {k: statistics.median(r[k] for r in results[overlap]) for k in results[overlap][0]}
        print(f"{str(overlap).lower():8} {med['s/step']:8.3f} {med['generate']:9.3f} {med['train']:7.3f}")


if __name__ == "__main__":
    main()

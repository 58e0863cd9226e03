"""rlft vs TRL's GRPOTrainer: same model, data, reward, group size, batch, max tokens and steps, on CPU.

    python benchmarks/bench_vs_trl.py --model tiny --steps 10     # rlft.testing.pretrained "max" task, full finetune
    python benchmarks/bench_vs_trl.py --model smollm2 --steps 5          # the demo task, LoRA r16
    python benchmarks/bench_vs_trl.py --model smollm2 --only rlft,trl-bf16 --steps 3
    python benchmarks/bench_vs_trl.py --model smollm2 --only rlft,trl-bf16 --steps 3 --eval-every 1 \
        --eval-k 4 --seeds 0-14                  # held-out reward seed by seed, paired differences

TRL is a benchmark-only dependency (``pip install trl``; check with ``--dry-run`` that it keeps the
installed torch). Runs, one after the other from this invocation, each in a child process of its
own (so each reports its own peak RSS, and TRL runs with glibc malloc as shipped, untouched by
rlft's tuning):

- ``rlft``: ``rlft.training.loop`` with the model in bf16 (LoRA) / fp32 (tiny full finetune), its defaults.
- ``trl-default``: ``GRPOTrainer`` with ``GRPOConfig``'s defaults for everything not listed below
  (fp32 weights, gradient checkpointing on, ``model.generate`` sampling, loss "dapo").
- ``trl-bf16``: the fastest TRL configuration found here: bf16 weights, ``bf16=True``, gradient
  checkpointing off.

Shared by all: prompts per step (``--batch``), completions per prompt (``--group``), max new
tokens, temperature 1.0, learning rate (constant: TRL's default would decay it linearly), LoRA
rank/alpha/targets (all-linear), steps, the reward
function (the demo's ``extraction`` / tinylm's ``correct_answer``, called on the same text).
Held-out reward is measured the same way for every run: rlft's evaluator (HF engine, temperature
1.0, ``--eval-k`` samples per row, the same held-out rows) on the trained model, before training, every
``--eval-every`` steps and at the end; eval time is excluded from the training clock. Printed:
seconds per step (mean over steps 2..N: step 1 includes warm-up), the ratio to rlft, held-out
reward after N steps, the training time to first reach ``--threshold`` held-out reward, and each
run's peak RSS (its child process's ``ru_maxrss``). With ``--seeds``, every arm runs once per seed
(a seed changes each side's prompt order and sampling) and a table gives the held-out reward
after each eval step seed by seed, the means, and the first arm's paired difference from each
other arm with its standard error: one seed's reward after a few steps moves by ~0.05.
Timings move by tens of percent on a shared CPU: compare rows of one invocation only. TRL's model
is switched back to transformers' sdpa attention (rlft's evaluator installs rlft's CPU attention),
so TRL trains as shipped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from paired_verdict import verdict  # this folder (sys.path[0] when run as a script)


def task(model: str, n_eval: int):
    """(env, train rows, eval rows, reward_fn, model path/name, lora)."""
    if model == "tiny":
        from rlft.testing.pretrained import build_pretrained_tiny, correct_answer, task_environment

        env, rows = task_environment("max", n=512)
        return env, rows[n_eval:], rows[:n_eval], correct_answer, build_pretrained_tiny(task="max", seed=0), False
    import rlft.demo as demo
    from rlft.config import load_config
    from rlft.loader import load_splits

    cfg = load_config(overrides={**demo.DEMO_CONFIG, "eval_size": n_eval, "eval_max_examples": n_eval}).resolved()
    train_set, eval_set = load_splits(cfg, demo)
    return demo.env, list(train_set), list(eval_set), demo.extraction, "smollm2", True


def heldout(model, tokenizer, env, rows, k: int = 1, seed: int = 1234) -> float:
    """Mean reward over ``rows`` x ``k`` samples at temperature 1, through rlft's engine and evaluator."""
    from rlft.engines.base import SamplingParams
    from rlft.engines.hf import HFEngine
    from rlft.env import Sampler
    from rlft.evaluate import evaluate
    from rlft.renderer import Renderer

    was_training = model.training
    engine = HFEngine(model, tokenizer, max_batch_size=256)
    sampler = Sampler(engine, Renderer(tokenizer), SamplingParams(temperature=1.0, seed=seed), max_seq_len=512)
    loop = asyncio.new_event_loop()
    try:
        metrics, _ = loop.run_until_complete(evaluate(env, rows, sampler, k=k, temperature=1.0))
    finally:
        loop.close()
        if hasattr(engine, "close"):
            engine.close()
        model.train(was_training)
    return metrics["reward/mean"]


def run_rlft(a, env, train_rows, eval_rows, model_path, lora) -> dict:
    from rlft.config import load_config
    from rlft.store import RunStore
    from rlft.training.loop import train

    runs = tempfile.mkdtemp(prefix="bench-rlft-")
    def row(r, split):  # the held-out rows are fixed by the "split" field, not by a new seeded split
        return {**{k: v for k, v in r.items() if k != "example_id"}, "split": split}

    rows = [row(r, "eval") for r in eval_rows] + [row(r, "train") for r in train_rows]
    t0 = time.perf_counter()
    run_id = train(load_config(overrides=a.set), environment=env, dataset=rows, model=model_path, runs_dir=runs,
                   lora=lora,
                   dtype="bfloat16" if lora else "float32", learning_rate=a.lr, steps=a.steps, batch_size=a.batch,
                   group_size=a.group, temperature=1.0, eval_temperature=1.0, eval_k=a.eval_k, eval_every=a.eval_every,
                   eval_max_examples=0, max_seq_len=512, checkpoint_every=0, keep_checkpoints=1, progress=False,
                   lora_rank=16, lora_alpha=32, seed=a.seed)
    wall = time.perf_counter() - t0
    with RunStore(runs) as store:
        m = store.metrics(run_id, ["time/step", "sync/logprob_diff_mean", "sync/logprob_diff_max", "reward/mean"])
        evals = {e["step"]: e["metrics"]["reward/mean"] for e in store.evals(run_id)}
    step_s = [v for _, v in sorted(m["time/step"])]
    diffs = [v for _, v in m.get("sync/logprob_diff_mean", []) if v is not None]
    dmax = [v for _, v in m.get("sync/logprob_diff_max", []) if v is not None]
    shutil.rmtree(runs, ignore_errors=True)
    return {"step_s": step_s, "evals": evals, "wall": wall,
            "logprob_diff_mean": sum(diffs) / len(diffs) if diffs else None,
            "logprob_diff_max": max(dmax) if dmax else None}


def _stock_attention(model) -> None:
    """TRL runs as shipped: transformers' default sdpa attention, not rlft's CPU attention."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation("sdpa")


def run_trl(a, variant, env, train_rows, eval_rows, model_path, lora, reward_fn) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlft.policy import load_policy
    from rlft.types import Rollout

    bf16 = variant == "trl-bf16"
    # the same weights rlft trains (the GGUF dequantized), as a plain HF model
    policy = load_policy(model_path, dtype="bfloat16" if bf16 else "float32", lora=None)
    model, tok = policy.model, policy.tokenizer
    _stock_attention(model)
    system = env.system_prompt

    def to_prompt(r):
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": r["prompt"]}]
        return {"prompt": msgs, "gt": json.dumps(r["ground_truth"])}

    def reward(prompts, completions, gt, **kw):
        out = []
        for c, g in zip(completions, gt):
            text = c[0]["content"] if isinstance(c, list) else c
            ro = Rollout(example={"ground_truth": json.loads(g)}, messages=[{"role": "assistant", "content": text}])
            out.append(float(reward_fn(ro)))
        return out

    kw = dict(output_dir=tempfile.mkdtemp(prefix="bench-trl-"), use_cpu=True, max_steps=a.steps, learning_rate=a.lr,
              per_device_train_batch_size=a.batch * a.group, num_generations=a.group,
              max_completion_length=env.max_tokens, temperature=1.0, logging_steps=1, save_strategy="no",
              report_to="none", seed=a.seed, disable_tqdm=True,
              lr_scheduler_type="constant")  # as rlft: a decaying lr would change the reward, not the speed
    if bf16:
        kw.update(bf16=True, gradient_checkpointing=False)
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    times: list[float] = []
    evals: dict[int, float] = {}
    eval_s = [0.0]

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **k):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **k):
            times.append(time.perf_counter() - self.t)
            s = state.global_step
            if (a.eval_every and s % a.eval_every == 0) or s == a.steps:
                t = time.perf_counter()
                evals[s] = heldout(model, tok, env, eval_rows, k=a.eval_k)
                _stock_attention(model)  # rlft's evaluator switched it to rlft's attention
                eval_s[0] += time.perf_counter() - t

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(**kw),
                          train_dataset=Dataset.from_list([to_prompt(r) for r in train_rows]),
                          processing_class=tok, peft_config=peft_config, callbacks=[Clock()])
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0 - eval_s[0]
    shutil.rmtree(kw["output_dir"], ignore_errors=True)
    del trainer, model
    torch.set_grad_enabled(True)
    return {"step_s": times, "evals": evals, "wall": wall, "logprob_diff_mean": None, "logprob_diff_max": None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=4, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="completions per prompt")
    p.add_argument("--lr", type=float, default=None, help="default: 1e-3 (both models)")
    p.add_argument("--eval-size", type=int, default=32)
    p.add_argument("--eval-k", type=int, default=1, help="samples per held-out row (more: less noise)")
    p.add_argument("--eval-every", type=int, default=0, help="0 = before and after only")
    p.add_argument("--threshold", type=float, default=0.7)
    p.add_argument("--only", default="rlft,trl-default,trl-bf16")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an rlft config value beyond its defaults (the rlft arm only; e.g. std_normalize=true)")
    p.add_argument("--seed", type=int, default=0, help="each side's training seed (prompt order, sampling)")
    p.add_argument("--seeds", default="", metavar="0,1,2 | 0-9",
                   help="run every arm once per seed and compare the held-out rewards seed by seed")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)  # one run, its result as JSON to --child-out
    p.add_argument("--child-out", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.lr = a.lr or 1e-3
    if a.child:
        return run_child(a)
    seeds = parse_seeds(a.seeds) if a.seeds else [a.seed]
    print(f"model {a.model}, {a.steps} steps x {a.batch} prompts x {a.group} completions, lr {a.lr}, "
          f"seeds {seeds}, load {os.getloadavg()[0]:.1f}", flush=True)
    names = a.only.split(",")
    runs: dict[int, dict[str, dict]] = {}
    for seed in seeds:
        runs[seed] = {name: run_arm(name, seed) for name in names}
        if len(seeds) == 1:
            speed_table(a, runs[seed])
    if len(seeds) > 1:
        seed_table(a, names, runs)
    print(f"load at the end: {os.getloadavg()[0]:.1f}")


def parse_seeds(text: str) -> list[int]:
    """"0-4" or "0,3,7" (or both: "0-2,9")."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return out


def run_arm(name: str, seed: int) -> dict:
    """One arm in a child process of its own (its own peak RSS; TRL keeps glibc malloc)."""
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.json")
        subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--seed", str(seed),
                        "--child", name, "--child-out", out], check=True)
        with open(out) as f:
            r = json.load(f)
    r["evals"] = {int(k): v for k, v in r["evals"].items()}
    print(f"{name} (seed {seed}): step s {[round(x, 1) for x in r['step_s']]}, evals {r['evals']}, peak RSS "
          f"{r['peak_rss_kb'] / 1e6:.2f} GB, {time.perf_counter() - t:.0f} s in all, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    return r


def per_step(r: dict) -> float:
    """Mean seconds per step over steps 2..N (step 1 includes warm-up)."""
    xs = r["step_s"][1:] or r["step_s"]
    return sum(xs) / len(xs)


def speed_table(a, results: dict[str, dict]) -> None:
    base = results.get("rlft")

    def to_threshold(r):
        cum, acc = {0: 0.0}, 0.0
        for i, s in enumerate(r["step_s"], 1):
            acc += s
            cum[i] = acc
        hit = [k for k, v in sorted(r["evals"].items()) if k > 0 and v >= a.threshold]
        return f"{cum[hit[0]]:.0f} s (step {hit[0]})" if hit else "not reached"

    print(f"\n| run | s/step | vs rlft | held-out reward after {a.steps} steps | time to reward >= {a.threshold} "
          f"| peak RSS | logprob diff mean / max |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        ratio = f"{per_step(r) / per_step(base):.2f}x" if base else "-"
        after = r["evals"].get(a.steps)
        lp = (f"{r['logprob_diff_mean']:.4f} / {r['logprob_diff_max']:.3f}"
              if r["logprob_diff_mean"] is not None else "-")
        print(f"| {name} | {per_step(r):.1f} | {ratio} | {after:.3f} | {to_threshold(r)} "
              f"| {r['peak_rss_kb'] / 1e6:.2f} GB | {lp} |")
    if base:
        print(f"held-out reward before training (rlft's eval at step 0): {base['evals'].get(0, float('nan')):.3f}")


def seed_table(a, names: list[str], runs: dict[int, dict[str, dict]]) -> None:
    """Held-out reward per eval step, seed by seed, and each arm's paired difference from the first."""
    steps = sorted({s for by_arm in runs.values() for r in by_arm.values() for s in r["evals"] if s > 0})
    head = ", ".join(str(s) for s in steps)
    print("\n| seed | " + " | ".join(f"{n}: after {head} steps" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for seed, by_arm in runs.items():
        print(f"| {seed} | " + " | ".join(" / ".join(f"{by_arm[n]['evals'].get(s, float('nan')):.3f}" for s in steps)
                                         for n in names) + " |")
    def mean_at(n, s):
        return mean([runs[x][n]["evals"].get(s, float("nan")) for x in runs])

    print("| **mean** | " + " | ".join(" / ".join(f"{mean_at(n, s):.3f}" for s in steps) for n in names) + " |")
    print("| s/step (mean) | " + " | ".join(f"{mean([per_step(runs[x][n]) for x in runs]):.1f}" for n in names) + " |")
    first = names[0]
    for other in names[1:]:
        for s in steps:
            d = [runs[x][first]["evals"][s] - runs[x][other]["evals"][s] for x in runs
                 if s in runs[x][first]["evals"] and s in runs[x][other]["evals"]]
            if len(d) < 2:
                continue
            v = verdict(d)
            print(f"{first} - {other} after {s} steps: mean {v.mean:+.3f} (SD {v.sd:.3f}), 95 % t-interval "
                  f"[{v.low:+.3f}, {v.high:+.3f}] over {v.n} seeds, {first} ahead on {v.ahead} -> {v.word}")


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def run_child(a) -> None:
    """One run (``--child NAME``) in this process; its result and peak RSS as JSON to ``--child-out``."""
    import torch

    name = a.child
    print(f"[{name}] torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    env, train_rows, eval_rows, reward_fn, model_path, lora = task(a.model, a.eval_size)
    if name != "rlft":
        import rlft.allocator

        rlft.allocator._done = False  # glibc malloc as shipped (rlft's evaluator would tune it)
    r = (run_rlft(a, env, train_rows, eval_rows, model_path, lora) if name == "rlft"
         else run_trl(a, name, env, train_rows, eval_rows, model_path, lora, reward_fn))
    r["peak_rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: kB
    with open(a.child_out, "w") as f:
        json.dump(r, f)


if __name__ == "__main__":
    main()

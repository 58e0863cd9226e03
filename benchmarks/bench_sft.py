"""SFT throughput: ``rlft sft`` vs a plain ``transformers`` Trainer on the same sequences, on CPU.

    python benchmarks/bench_sft.py                     # SmolLM2-135M-Instruct, LoRA r16, bf16, 128 transcripts
    python benchmarks/bench_sft.py --model tiny --n 64 # the tiny test model (a smoke run)

Each arm runs in its own child process, one after the other (so each one's peak RSS is its own):

- ``rlft``: ``rlft.sft.trainer.sft`` (length-bucketed micro-batches under ``micro_batch_tokens``,
  logits only at trained positions, bf16 autocast with peft input casting off).
- ``hf``: ``transformers.Trainer`` with ``bf16=True`` on the same bf16 base + the same peft LoRA
  (transformers' own attention, as loaded), micro-batches of ``--micro`` sequences padded to the
  longest, gradient accumulation to the same sequences per step; labels -100 off the mask.
- ``hf-grouped``: the same with the micro-batches drawn from length-sorted mega-batches
  (transformers' ``LengthGroupedSampler``, what ``group_by_length`` used to switch on), so that
  padding is not what separates the two.

Shared: the token ids and loss masks (rendered once by rlft's Renderer: tool-call transcripts of
the "max" task with the tool schemas in the prompt, and plain Q&A of varied lengths), sequences
per optimizer step (``--batch``), one epoch, AdamW, learning rate 2e-4 cosine, no warm-up, grad
clipping 1.0, seed, threads. No eval, no checkpoint in the timed part. Printed per arm: tokens/s
(non-padding tokens of the epoch / the sum of the optimizer steps' wall time, step 1 included),
seconds per step, first and last step loss, peak RSS (``ru_maxrss`` of the child); with
``--rounds N`` the arms run N times interleaved and the best of each is compared. The machine may
be shared: compare rows of one invocation only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def transcripts(n: int, seed: int) -> list[dict]:
    """Half tool-call demonstrations of the tiny "max" task, half plain Q&A of 10-120 words."""
    from rlft.testing.pretrained import TASKS
    from rlft.tools import tool

    t = TASKS["max"]
    schemas = [tool(f).schema() for f in t.tools]
    rng = random.Random(seed)
    words = ["the", "model", "learns", "to", "call", "its", "tools", "before", "reinforcement", "learning",
             "starts", "from", "a", "warm", "policy"]
    out = []
    for i, row in enumerate(t.rows(n, seed, part="sft")):
        if i % 2 == 0:
            name, args, result = t.tool_answer(row)
            call = {"id": "call_0", "type": "function", "function": {"name": name, "arguments": args}}
            out.append({"messages": [{"role": "system", "content": t.system_prompt},
                                     {"role": "user", "content": row["prompt"]},
                                     {"role": "assistant", "content": "", "tool_calls": [call]},
                                     {"role": "tool", "content": result, "tool_call_id": "call_0", "name": name},
                                     {"role": "assistant", "content": f"The largest number is {result}."}],
                        "tools": schemas})
        else:
            answer = " ".join(rng.choice(words) for _ in range(rng.randint(10, 120)))
            out.append({"messages": [{"role": "user", "content": f"Write {i} words about warm-up."},
                                     {"role": "assistant", "content": answer}]})
    return out


def model_path(name: str) -> str:
    if name == "tiny":
        from rlft.testing.pretrained import build_pretrained_tiny

        return build_pretrained_tiny(task="max", seed=0)
    return name


def arm_rlft(args, data_file: str, out_dir: str) -> dict:
    from rlft.sft.trainer import sft
    from rlft.store import RunStore

    runs = os.path.join(out_dir, "runs")
    run_id = sft(model=model_path(args.model), data=data_file, runs_dir=runs, lora=True, lora_rank=16, lora_alpha=32,
                 dtype="bfloat16", epochs=1, batch_size=args.batch, micro_batch_tokens=args.micro_tokens,
                 learning_rate=2e-4, lr_schedule="cosine", eval_fraction=0, max_seq_len=4096, seed=0, progress=False)
    with RunStore(runs) as store:
        m = store.metrics(run_id, ["time/step", "sft/loss"])
    return {"step_s": [v for _, v in m["time/step"]], "loss": [v for _, v in m["sft/loss"]]}


def arm_hf(args, data_file: str, grouped: bool) -> dict:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from rlft.model_source import resolve_model
    from rlft.policy import LoraSpec, load_policy
    from rlft.renderer import Renderer
    from rlft.sft.transcripts import load_transcripts, render_transcripts

    name, gguf = resolve_model(model_path(args.model), None)
    tok = load_policy(model_path(args.model), dtype="bfloat16").tokenizer  # the same tokenizer + template as rlft
    examples, _ = render_transcripts(Renderer(tok), load_transcripts(data_file))
    rows = [{"input_ids": e.ids, "labels": [t if m else -100 for t, m in zip(e.ids, e.mask)]} for e in examples]
    kw = {}
    if gguf:  # the bundled SmolLM2 is a GGUF file: ask for plain dense (trainable) weights, as load_policy does
        from transformers import GgufConfig

        kw = {"gguf_file": gguf, "quantization_config": GgufConfig(dequantize=True)}
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16, **kw)
    model = get_peft_model(model, LoraSpec(rank=16, alpha=32).to_peft(model))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def collate(batch):
        L = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), L), pad, dtype=torch.long)
        labels = torch.full((len(batch), L), -100, dtype=torch.long)
        attn = torch.zeros((len(batch), L), dtype=torch.long)
        for b, r in enumerate(batch):
            n = len(r["input_ids"])
            ids[b, :n], labels[b, :n], attn[b, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": attn}

    steps: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            steps.append(time.perf_counter() - self.t0)

        def on_log(self, _args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    targs = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.micro,
                              gradient_accumulation_steps=args.batch // args.micro, num_train_epochs=1,
                              learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
                              max_grad_norm=1.0, bf16=True, use_cpu=True, report_to="none", save_strategy="no",
                              logging_steps=1, disable_tqdm=True, remove_unused_columns=False,
                              dataloader_num_workers=0, seed=0)

    class GroupedTrainer(Trainer):
        def _get_train_sampler(self, *a, **k):
            from transformers.trainer_pt_utils import LengthGroupedSampler

            return LengthGroupedSampler(args.micro * targs.gradient_accumulation_steps, dataset=rows,
                                        lengths=[len(r["input_ids"]) for r in rows])

    cls = GroupedTrainer if grouped else Trainer
    cls(model=model, args=targs, train_dataset=rows, data_collator=collate, callbacks=[Clock()]).train()
    return {"step_s": steps, "loss": losses}


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = tempfile.mkdtemp(prefix="bench-sft-")
    t0 = time.perf_counter()
    res = arm_rlft(args, args.data, out) if args.arm == "rlft" else arm_hf(args, args.data, args.arm == "hf-grouped")
    res["wall_s"] = time.perf_counter() - t0
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 | tiny | a model path")
    p.add_argument("--n", type=int, default=128, help="transcripts (one epoch)")
    p.add_argument("--batch", type=int, default=16, help="sequences per optimizer step")
    p.add_argument("--micro", type=int, default=8, help="hf arms: sequences per micro-batch")
    p.add_argument("--micro-tokens", type=int, default=4096, help="rlft: padded tokens per micro-batch")
    p.add_argument("--arms", default="rlft,hf,hf-grouped")
    p.add_argument("--rounds", type=int, default=1, help="run the arms this many times, interleaved (shared machines)")
    # on a busy shared CPU, two spinning OpenMP threads per process were measured 2-3x slower than one
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per arm (default 1; the cores on an idle machine)")
    p.add_argument("--arm", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.arm:
        return child(args)
    data = os.path.join(tempfile.mkdtemp(prefix="bench-sft-data-"), "transcripts.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(t) + "\n" for t in transcripts(args.n, 0))
    from rlft.policy import load_policy
    from rlft.renderer import Renderer
    from rlft.sft.transcripts import load_transcripts, render_transcripts

    tok = load_policy(model_path(args.model), dtype="bfloat16").tokenizer
    examples, _ = render_transcripts(Renderer(tok), load_transcripts(data))
    tokens = sum(len(e.ids) for e in examples)
    lengths = sorted(len(e.ids) for e in examples)
    print(f"{len(examples)} sequences, {tokens} tokens (length {lengths[0]}..{lengths[-1]}, median "
          f"{lengths[len(lengths) // 2]}), {args.batch} per step, {args.threads} torch thread(s) on "
          f"{os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for arm in [a for _ in range(args.rounds) for a in args.arms.split(",")]:
        cmd = [sys.executable, os.path.abspath(__file__), "--arm", arm, "--data", data, "--model", args.model,
               "--batch", str(args.batch), "--micro", str(args.micro), "--micro-tokens", str(args.micro_tokens),
               "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"{arm}: failed\n{proc.stderr[-3000:]}")
            continue
        r = json.loads(line[-1][7:])
        rows.append((arm, tokens / sum(r["step_s"]), sum(r["step_s"]) / len(r["step_s"]), r["loss"][0], r["loss"][-1],
                     r["peak_rss_mb"], len(r["step_s"])))
        print(f"{arm:11} {rows[-1][1]:8.0f} tok/s  {rows[-1][2]:6.2f} s/step ({rows[-1][6]} steps)  "
              f"loss {rows[-1][3]:.3f} -> {rows[-1][4]:.3f}  peak RSS {rows[-1][5]:.0f} MB", flush=True)
    best: dict[str, float] = {}
    for a, t, *_ in rows:
        best[a] = max(best.get(a, 0.0), t)
    print("best of rounds: " + ", ".join(f"{a} {t:.0f} tok/s" for a, t in best.items()))
    for a, t in best.items():
        if a != "rlft" and "rlft" in best:
            print(f"rlft / {a}: {best['rlft'] / t:.2f}x tokens/s")


if __name__ == "__main__":
    main()

"""The bundled demo: SmolLM2-135M-Instruct + LoRA learns to extract a person's name, age and
city from one sentence as a JSON object.

Chosen because the base model's greedy answers are often right while its samples at
temperature 1 are not (wrong keys, invented names, chatter after the JSON): there is signal in
every group, and RL has a large, measurable gap to close within minutes on a CPU. The reward
gives partial credit per correct field and halves it when the reply is more than the JSON (a
```json fence around it is allowed). Replies are capped at 48 tokens: the JSON needs ~30, so
chatter is cut short instead of costing time. The data is generated from a seed, so nothing is
downloaded; the held-out rows (``eval_size``) are a seeded split, disjoint from the training
rows, and both train and eval sample at temperature 1.0. Left out: anything the user must
install beyond rlft.
"""

from __future__ import annotations

import json
import random
import re

from rlft.env import Environment

NAMES = ["Alice", "Bob", "Carla", "David", "Emma", "Frank", "Grace", "Hugo", "Irene", "Jack", "Kim", "Liam",
         "Maya", "Nora", "Omar", "Paula", "Quentin", "Rosa", "Sam", "Tara", "Umar", "Vera", "Will", "Yara", "Zoe"]
CITIES = ["Paris", "London", "Berlin", "Madrid", "Rome", "Tokyo", "Lima", "Oslo", "Cairo", "Delhi", "Boston",
          "Sydney", "Vienna", "Dublin", "Prague", "Lisbon", "Seoul", "Denver", "Quito", "Nairobi"]
TEMPLATES = [
    "{n} is {a} years old and lives in {c}.",
    "Meet {n}, a {a}-year-old from {c}.",
    "{n} ({a}) moved to {c} last year.",
    "Living in {c}, {n} just turned {a}.",
    "At {a}, {n} still calls {c} home.",
    "{n}, aged {a}, works in {c}.",
]
SYSTEM = "You extract data from text. Reply with a JSON object only."
INSTRUCTION = "Extract the person's name, age and city as JSON with keys name, age, city.\nText: "


def make_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(18, 80)
        text = rng.choice(TEMPLATES).format(n=name, a=age, c=city)
        rows.append({"prompt": INSTRUCTION + text, "ground_truth": {"name": name, "age": age, "city": city}})
    return rows


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def extraction(rollout) -> float:
    """Share of the three fields right; halved when the reply is more than the JSON object."""
    text = rollout.completion.strip()
    fenced = _FENCE.match(text)
    body = fenced.group(1) if fenced else text
    start, end = body.find("{"), body.rfind("}")
    if start < 0 or end < start:
        return 0.0
    try:
        obj = json.loads(body[start:end + 1])
    except json.JSONDecodeError:
        return 0.0
    if not isinstance(obj, dict):
        return 0.0
    gt = rollout.ground_truth
    right = sum(str(obj.get(k, "")).strip().lower() == str(v).lower() for k, v in gt.items())
    only_json = start == 0 and end == len(body) - 1
    return right / len(gt) * (1.0 if only_json else 0.5)


env = Environment(system_prompt=SYSTEM, rewards=[extraction], max_turns=1, max_tokens=48, name="json-extraction")
dataset = make_rows(264, seed=0)  # 232 train + 32 held out (eval_size in DEMO_CONFIG)

# Measured on 2 shared CPU cores (benchmarks/README.md): held-out reward ~0.1 -> ~0.9 in 8 steps.
# Train and eval both sample at temperature 1.0 (no greedy eval): the gain is the sampled policy's.
DEMO_CONFIG = {
    "env": "rlft.demo",
    "model": "smollm2",
    "dtype": "bfloat16",
    "lora": True,
    "lora_rank": 16,
    "lora_alpha": 32,
    "learning_rate": 1e-3,  # LoRA at 1e-3: train reward 0.11 -> 0.93 in 4 steps (measured)
    "steps": 8,
    "batch_size": 4,
    "group_size": 8,
    "micro_batch_tokens": 2048,  # the four group rows in one micro-batch: peak RSS 2.13 GB (benchmarks/README.md)
    "temperature": 1.0,
    "eval_temperature": 1.0,
    "max_seq_len": 512,
    "eval_size": 32,
    "eval_max_examples": 32,
    "eval_k": 1,
    "eval_every": 2,
    "checkpoint_every": 0,  # only the last step
    "run_name": "",
}


def run_demo(overrides: list[str] | None = None) -> int:
    import time

    from rlft.config import load_config
    from rlft.store import RunStore
    from rlft.training.loop import train

    cfg = load_config(overrides={**DEMO_CONFIG, **dict(o.split("=", 1) for o in (overrides or []))})
    t0 = time.time()
    run_id = train(cfg)
    elapsed = time.time() - t0
    store = RunStore(cfg.runs_dir, readonly=True)
    evals = sorted((e for e in store.evals(run_id) if e.get("step") is not None), key=lambda e: e["step"])
    if len(evals) >= 2:
        before, after = evals[0]["metrics"]["reward/mean"], evals[-1]["metrics"]["reward/mean"]
        print(f"\ndemo: held-out mean reward {before:.3f} -> {after:.3f} ({after - before:+.3f}) "
              f"in {elapsed / 60:.1f} min ({cfg.steps} steps); run {run_id}")
        from rlft.demo.plot import reward_vs_time_svg

        out = store.run_dir(run_id) / "heldout_reward.svg"
        out.write_text(reward_vs_time_svg(store, run_id))
        print(f"plot of held-out reward against wall-clock time: {out}")
    return 0

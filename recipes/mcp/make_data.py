"""Generate the MCP recipe's arithmetic word problems (data.jsonl) from a seed.

    python recipes/mcp/make_data.py

Products of two-digit and three-digit numbers (hard to do in the head for a small model,
trivial with the calculator), some with a second step. The last 32 rows (`split: eval`) are
held out.
Each row's `expression` is the calculator call that solves it (env.py's `demonstrate` uses it).
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
# (question, answer, the calculator expression that solves it)
ONE_STEP = [
    ("A box holds {a} apples. How many apples are in {b} boxes?", lambda a, b, c: a * b, "{a} * {b}"),
    ("A ticket costs {a} dollars. What do {b} tickets cost?", lambda a, b, c: a * b, "{a} * {b}"),
    ("A train travels {a} km every hour. How far does it go in {b} hours?", lambda a, b, c: a * b, "{a} * {b}"),
    ("{b} friends share {p} coins equally. How many coins does each get?", lambda a, b, c: a, "{p} / {b}"),
]
TWO_STEP = [
    ("A shelf holds {a} books. There are {b} shelves and {c} more books on the floor. How many books are there?",
     lambda a, b, c: a * b + c, "{a} * {b} + {c}"),
    ("A worker earns {a} dollars a day and spends {c} dollars of it. How much does the worker save in {b} days?",
     lambda a, b, c: (a - c) * b, "({a} - {c}) * {b}"),
]


def build(seed: int = 0, n: int = 272):
    rng = random.Random(seed)
    rows = []
    for j in range(n):
        a, b = rng.randint(12, 99), rng.randint(11, 60)
        c = rng.randint(2, min(a - 1, 40))
        text, answer, expression = rng.choice(ONE_STEP if rng.random() < 0.7 else TWO_STEP)
        rows.append({"prompt": text.format(a=a, b=b, c=c, p=a * b), "ground_truth": answer(a, b, c),
                     "expression": expression.format(a=a, b=b, c=c, p=a * b),
                     "split": "eval" if j >= n - 32 else "train"})
    return rows


if __name__ == "__main__":
    rows = build()
    with open(HERE / "data.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"{len(rows)} rows ({sum(r['split'] == 'eval' for r in rows)} held out)")

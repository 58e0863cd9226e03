"""Generate the tool-use recipe's shop database script (shop.sql) and questions (data.jsonl).

    python recipes/tool_use/make_data.py     # rewrites both files (deterministic)

shop.sql creates one table, products(name, category, price, stock), with 60 products. Each
question needs the database (`query`) and often the calculator (`calculate`):
  stock     "How many units of X are in stock?"               (query)
  cost      "How much do N units of X cost in total?"         (query, then calculate N * price)
  category  "How many units of <category> products are in stock in total?"  (query with SUM)
The answers are computed from the same data; the last 32 rows (`split: eval`) are held out.
Each row's `solution` holds the calls that solve it (`sql`, and `expression` for cost questions):
env.py's `demonstrate` writes the warm-up's demonstrations from it.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
ADJ = ["red", "blue", "steel", "wooden", "glass", "mini", "large", "silver", "green", "paper", "smart", "classic"]
NOUNS = {"kitchen": ["kettle", "pan", "spoon", "mug", "bowl"], "garden": ["rake", "hose", "shovel", "pot", "seed pack"],
         "office": ["stapler", "lamp", "folder", "pen", "desk"], "toys": ["kite", "puzzle", "ball", "robot", "yo-yo"]}


def build(seed: int = 0, n_products: int = 60, n_rows: int = 272):
    rng = random.Random(seed)
    products, names = [], set()
    while len(products) < n_products:
        cat = rng.choice(sorted(NOUNS))
        name = f"{rng.choice(ADJ)} {rng.choice(NOUNS[cat])}"
        if name in names:
            continue
        names.add(name)
        products.append((name, cat, round(rng.randint(100, 5000) / 100, 2), rng.randint(0, 120)))
    sql = ["CREATE TABLE products (name TEXT PRIMARY KEY, category TEXT, price REAL, stock INTEGER);"]
    sql += [f"INSERT INTO products VALUES ('{n}', '{c}', {p}, {s});" for n, c, p, s in products]
    rows = []
    for _ in range(n_rows):
        name, cat, price, stock = rng.choice(products)
        kind = rng.choices(["stock", "cost", "category"], weights=[2, 3, 1])[0]
        if kind == "stock":
            q, a = f"How many units of the {name} are in stock?", stock
            solution = {"sql": f"SELECT stock FROM products WHERE name = '{name}'"}
        elif kind == "cost":
            n = rng.randint(2, 12)
            q, a = f"How much do {n} units of the {name} cost in total?", round(n * price, 2)
            solution = {"sql": f"SELECT price FROM products WHERE name = '{name}'", "expression": f"{n} * {price}"}
        else:
            q, a = (f"How many units of {cat} products are in stock in total?",
                    sum(s for _, c, _, s in products if c == cat))
            solution = {"sql": f"SELECT SUM(stock) FROM products WHERE category = '{cat}'"}
        rows.append({"prompt": q, "ground_truth": a, "kind": kind, "solution": solution})
    for j, row in enumerate(rows):
        row["split"] = "eval" if j >= len(rows) - 32 else "train"
    return "\n".join(sql) + "\n", rows


if __name__ == "__main__":
    script, rows = build()
    (HERE / "shop.sql").write_text(script)
    with open(HERE / "data.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    held_out = sum(r["split"] == "eval" for r in rows)
    print(f"{script.count('INSERT')} products, {len(rows)} questions ({held_out} held out)")

"""Generate the JSON-extraction questions (data.jsonl) from a seed.

    python recipes/structured/json/make_data.py

Each row is a one-sentence product listing; the gold answer is the object
{"product": str, "price": number, "currency": "USD"|"EUR"|"GBP", "quantity": int, "in_stock": bool}.
Train and held-out rows use the same sentence templates with different fillers; the last 32
rows (`split: eval`) are held out.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
PRODUCTS = ["desk lamp", "wool scarf", "coffee grinder", "phone case", "yoga mat", "water bottle", "bike helmet",
            "notebook", "backpack", "wall clock", "tea kettle", "rain jacket", "chess set", "headphones", "candle"]
CURRENCIES = {"USD": ["$", "dollars"], "EUR": ["€", "euros"], "GBP": ["£", "pounds"]}
TEMPLATES = [
    "Selling {q} {p} at {price} each, {stock}.",
    "{q} x {p} for {price} apiece ({stock}).",
    "For sale: {p}, quantity {q}, price {price}, {stock}.",
    "We have {q} units of the {p} priced at {price}; {stock}.",
]


def build(seed: int = 0, n: int = 272):
    rng = random.Random(seed)
    rows = []
    for j in range(n):
        product, cur = rng.choice(PRODUCTS), rng.choice(sorted(CURRENCIES))
        price, q, in_stock = rng.randint(200, 9000) / 100, rng.randint(1, 50), rng.random() < 0.5
        symbol, word = CURRENCIES[cur]
        price_text = f"{symbol}{price:.2f}" if rng.random() < 0.5 else f"{price:.2f} {word}"
        stock = rng.choice(["in stock", "available now"] if in_stock else ["out of stock", "sold out"])
        text = rng.choice(TEMPLATES).format(q=q, p=product, price=price_text, stock=stock)
        rows.append({"prompt": "Extract the listing as JSON with keys product, price, currency (USD, EUR or GBP), "
                               f"quantity, in_stock.\nListing: {text}",
                     "ground_truth": {"product": product, "price": price, "currency": cur, "quantity": q,
                                      "in_stock": in_stock},
                     "split": "eval" if j >= n - 32 else "train"})
    return rows


if __name__ == "__main__":
    rows = build()
    with open(HERE / "data.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"{len(rows)} rows ({sum(r['split'] == 'eval' for r in rows)} held out)")

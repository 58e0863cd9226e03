"""Generate the text-to-SQL recipe's database script (shop.sql) and questions (data.jsonl).

    python recipes/structured/sql/make_data.py

Tables: products(name, category, price, stock), customers(id, name, city),
orders(id, customer_id, product, quantity). Each row has a question and its gold SQL
(`ground_truth`); checks.sql_match runs both on the database and compares the rows. The
last 32 rows (`split: eval`) are held out.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
CATS = {"kitchen": ["kettle", "pan", "mug", "bowl"], "garden": ["rake", "hose", "shovel"],
        "office": ["stapler", "lamp", "pen"], "toys": ["kite", "puzzle", "robot"]}
ADJ = ["red", "blue", "steel", "glass", "mini", "large", "green", "classic"]
PEOPLE = ["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea", "Milo", "Nia"]
CITIES = ["Paris", "Lima", "Oslo", "Rome", "Tokyo", "Cairo"]


def build(seed: int = 0, n: int = 272):
    rng = random.Random(seed)
    products, seen = [], set()
    while len(products) < 40:
        cat = rng.choice(sorted(CATS))
        name = f"{rng.choice(ADJ)} {rng.choice(CATS[cat])}"
        if name not in seen:
            seen.add(name)
            products.append((name, cat, rng.randint(100, 5000) / 100, rng.randint(0, 80)))
    customers = [(i + 1, p, rng.choice(CITIES)) for i, p in enumerate(PEOPLE)]
    orders = [(i + 1, rng.randint(1, len(customers)), rng.choice(products)[0], rng.randint(1, 5)) for i in range(80)]
    sql = ["CREATE TABLE products (name TEXT PRIMARY KEY, category TEXT, price REAL, stock INTEGER);",
           "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, city TEXT);",
           "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER, product TEXT, quantity INTEGER);"]
    sql += [f"INSERT INTO products VALUES ('{a}', '{b}', {c}, {d});" for a, b, c, d in products]
    sql += [f"INSERT INTO customers VALUES ({a}, '{b}', '{c}');" for a, b, c in customers]
    sql += [f"INSERT INTO orders VALUES ({a}, {b}, '{c}', {d});" for a, b, c, d in orders]

    def question():
        name, cat, _price, _ = rng.choice(products)
        person, city = rng.choice(PEOPLE), rng.choice(CITIES)
        x = rng.choice([5, 10, 20, 30, 40])
        return rng.choice([
            (f"List the names of the products in the {cat} category.",
             f"SELECT name FROM products WHERE category = '{cat}'"),
            (f"What is the price of the {name}?", f"SELECT price FROM products WHERE name = '{name}'"),
            (f"How many products cost more than {x}?", f"SELECT COUNT(*) FROM products WHERE price > {x}"),
            (f"Which customers live in {city}?", f"SELECT name FROM customers WHERE city = '{city}'"),
            (f"What is the average price of {cat} products?",
             f"SELECT AVG(price) FROM products WHERE category = '{cat}'"),
            (f"How many units of the {name} are in stock?", f"SELECT stock FROM products WHERE name = '{name}'"),
            (f"How many orders did {person} place?",
             "SELECT COUNT(*) FROM orders JOIN customers ON orders.customer_id = customers.id "
             f"WHERE customers.name = '{person}'"),
        ])

    rows = []
    for j in range(n):
        q, gold = question()
        rows.append({"prompt": q, "ground_truth": gold, "split": "eval" if j >= n - 32 else "train"})
    return "\n".join(sql) + "\n", rows


if __name__ == "__main__":
    script, rows = build()
    (HERE / "shop.sql").write_text(script)
    with open(HERE / "data.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"{len(rows)} rows ({sum(r['split'] == 'eval' for r in rows)} held out)")

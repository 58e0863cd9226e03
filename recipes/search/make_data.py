"""Generate the search recipe's corpus (corpus.jsonl) and questions (data.jsonl) from a seed.

    python recipes/search/make_data.py      # rewrites both files (deterministic)

The corpus is fictional (islands and their capital cities), so the model cannot answer from
memory: it has to search and read. 150 island documents + 150 city documents = 300 docs.
Questions: single-hop (capital, founding year, main export of an island: 1 relevant doc) and
two-hop (population of an island's capital: the island's doc and the city's doc).
Rows carry `relevant_ids` (for the citation rewards) and `min_calls` (the fewest tool calls
that can answer: search + read per hop). The last 32 rows (`split: eval`) are held out.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
SYL = ["vel", "mor", "bren", "ost", "ka", "lu", "tor", "een", "sa", "rim", "dal", "quo", "fen", "zar", "ix",
       "ann", "pel", "gor", "thi", "wen", "lo", "mar", "sk", "ud", "via", "nor", "bel", "cra", "hol", "ju"]
SEAS = ["Ostral Sea", "Pale Ocean", "Gulf of Rhen", "Amber Sea", "Northern Reach", "Saltmere"]
EXPORTS = ["copper", "salt", "wool", "tea", "amber", "timber", "pearls", "tin", "cotton", "olives", "coffee", "iron"]


def _name(rng, used, parts=(2, 3)):
    while True:
        n = "".join(rng.choice(SYL) for _ in range(rng.choice(parts))).capitalize()
        if n not in used and len(n) >= 4:
            used.add(n)
            return n


def build(seed: int = 0, n_islands: int = 150):
    rng = random.Random(seed)
    used: set[str] = set()
    docs, facts = [], []
    for i in range(n_islands):
        island, city = _name(rng, used), _name(rng, used)
        year, export, sea = rng.randint(1100, 1900), rng.choice(EXPORTS), rng.choice(SEAS)
        pop = rng.randint(2, 90) * 1000
        island_id, city_id = f"doc-{2 * i + 1}", f"doc-{2 * i + 2}"
        docs.append({"id": island_id, "title": f"{island} Island",
                     "text": f"{island} is an island in the {sea}. It was first settled in {year}. "
                             f"Its capital is {city}, and its main export is {export}."})
        docs.append({"id": city_id, "title": f"{city} (city)",
                     "text": f"{city} is a port town in the {sea}. It is the capital of {island}. "
                             f"{city} has a population of {pop}."})
        facts.append((island, city, year, export, pop, island_id, city_id))
    rows = []
    for island, city, year, export, pop, iid, cid in facts:
        kind = rng.choices(["capital", "year", "export", "population"], weights=[3, 3, 3, 2])[0]
        if kind == "capital":
            q, a, rel = f"What is the capital of {island}?", city, [iid]
        elif kind == "year":
            q, a, rel = f"In what year was {island} first settled?", str(year), [iid]
        elif kind == "export":
            q, a, rel = f"What is the main export of {island}?", export, [iid]
        else:
            q, a, rel = f"What is the population of the capital of {island}?", str(pop), [iid, cid]
        rows.append({"prompt": q, "ground_truth": a, "relevant_ids": rel, "min_calls": 2 * len(rel)})
    # a second question per island (a different kind) to reach 300 rows
    for island, city, _year, export, _pop, iid, cid in facts:
        q, a, rel = rng.choice([(f"Which island has {city} as its capital?", island, [cid]),
                                (f"What does {island} mainly export?", export, [iid])])
        rows.append({"prompt": q, "ground_truth": a, "relevant_ids": rel, "min_calls": 2})
    rng.shuffle(rows)
    for j, row in enumerate(rows):
        row["split"] = "eval" if j >= len(rows) - 32 else "train"
    return docs, rows


if __name__ == "__main__":
    docs, rows = build()
    with open(HERE / "corpus.jsonl", "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    with open(HERE / "data.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"{len(docs)} documents, {len(rows)} questions ({sum(r['split'] == 'eval' for r in rows)} held out)")

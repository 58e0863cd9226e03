"""Generate train.jsonl and eval.jsonl for the constrained-generation recipe (seeded, no download).

Three kinds of constraint, every row names its own limits in extra fields that the rewards read:
- ``words``: describe a thing in at most N words, and mention a given word;
- ``format``: a bulleted list of exactly N items, each line starting with "- ";
- ``acrostic``: a poem whose lines start with the letters of a short word, in order.
The eval split uses subjects that never appear in training.

    python make_data.py            # writes train.jsonl (240 rows) and eval.jsonl (48 rows)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SUBJECTS = ["the sea", "a cat", "rain", "the moon", "coffee", "a forest", "winter", "a train", "bread", "music",
            "a river", "the sun", "a garden", "snow", "a library", "the wind", "a bicycle", "honey", "a mountain",
            "autumn", "a candle", "the city", "a dog", "tea", "a bridge", "spring", "an island", "the stars",
            "a lighthouse", "apples", "a clock", "a market"]
HELD_OUT = ["a volcano", "the desert", "a violin", "chocolate", "a castle", "thunder", "a ship", "summer"]
KEYWORDS = {"the sea": "waves", "a cat": "purr", "rain": "clouds", "the moon": "night", "coffee": "morning",
            "a forest": "trees", "winter": "cold", "a train": "tracks", "bread": "oven", "music": "song",
            "a river": "water", "the sun": "light", "a garden": "flowers", "snow": "white", "a library": "books",
            "the wind": "air", "a bicycle": "wheels", "honey": "bees", "a mountain": "peak", "autumn": "leaves",
            "a candle": "flame", "the city": "streets", "a dog": "tail", "tea": "cup", "a bridge": "river",
            "spring": "bloom", "an island": "beach", "the stars": "sky", "a lighthouse": "ships", "apples": "tree",
            "a clock": "time", "a market": "food", "a volcano": "lava", "the desert": "sand", "a violin": "strings",
            "chocolate": "sweet", "a castle": "king", "thunder": "storm", "a ship": "sail", "summer": "heat"}
ACROSTIC_WORDS = ["CAT", "SUN", "SEA", "DOG", "SKY", "OWL", "BEE", "FOX", "JOY", "ICE", "HOPE", "RAIN", "TREE",
                  "MOON", "STAR", "WIND", "LEAF", "SNOW", "BIRD", "FISH", "ROSE", "LAKE", "FIRE", "GOLD"]


def row(kind: str, subject: str, rng: random.Random) -> dict:
    if kind == "words":
        n, word = rng.choice([10, 15, 20, 25, 30]), KEYWORDS[subject]
        prompt = f"Describe {subject} in at most {n} words. Use the word \"{word}\"."
        return {"prompt": prompt, "kind": kind, "max_words": n, "required": [word]}
    if kind == "format":
        n = rng.choice([2, 3, 4])
        prompt = (f"List {n} facts about {subject} as a bulleted list: exactly {n} lines, each starting with \"- \". "
                  "No other text.")
        return {"prompt": prompt, "kind": kind, "items": n}
    word = rng.choice(ACROSTIC_WORDS)
    prompt = (f"Write an acrostic poem about {subject} for the word {word}: {len(word)} lines, the first letters "
              f"of the lines spell {word} ({', '.join(word)}). Only the poem.")
    return {"prompt": prompt, "kind": kind, "word": word}


def make_rows(subjects: list[str], n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    kinds = ["words", "format", "acrostic"]
    return [row(kinds[i % 3], rng.choice(subjects), rng) for i in range(n)]


def main() -> None:
    here = Path(__file__).parent
    for name, subjects, n, seed in [("train", SUBJECTS, 240, 0), ("eval", HELD_OUT, 48, 1)]:
        with open(here / f"{name}.jsonl", "w") as f:
            for r in make_rows(subjects, n, seed):
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()

"""Generate train.jsonl and eval.jsonl for the roleplay recipe (seeded, no download): things a
visitor might say to Captain Barnacle. The eval split uses topics that training never sees.

    python make_data.py            # writes train.jsonl (240 rows) and eval.jsonl (40 rows)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TEMPLATES = [
    "What do you know about {t}?",
    "Can you tell me a short story about {t}?",
    "Captain, what is your opinion of {t}?",
    "I am scared of {t}. Any advice?",
    "Explain {t} to me like I am ten.",
    "Have you ever seen {t}?",
    "Give me one tip about {t}.",
    "Why should I care about {t}?",
]
TOPICS = ["storms", "whales", "treasure maps", "the north star", "knots", "seagulls", "the tides", "islands",
          "parrots", "fog", "anchors", "the moon", "octopuses", "old maps", "rowing boats", "sharks",
          "coral reefs", "lighthouses", "sea shanties", "the wind", "compasses", "fishing", "sunsets",
          "dolphins", "rain", "cooking on a ship", "sailing at night", "homework", "friendship", "bedtime"]
HELD_OUT = ["icebergs", "crabs", "pirate flags", "sea turtles", "thunder"]


def main() -> None:
    here = Path(__file__).parent
    for name, topics, seed in [("train", TOPICS, 0), ("eval", HELD_OUT, 1)]:
        data = [{"prompt": tpl.format(t=t), "topic": t} for t in topics for tpl in TEMPLATES]
        random.Random(seed).shuffle(data)
        with open(here / f"{name}.jsonl", "w") as f:
            for r in data:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()

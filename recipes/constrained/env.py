"""Constrained generation: word limits, a required list format and acrostic poems, all scored by
deterministic graders from ``rlft.rewards.checks`` (partial credit everywhere, so a weak model's
samples differ in reward and GRPO has something to compare)."""

from __future__ import annotations

import re

from rlft import Environment, Reward
from rlft.rewards import checks

SYSTEM = "You follow writing instructions exactly. Reply with the requested text only."


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.strip().splitlines() if ln.strip()]


def acrostic(rollout) -> float:
    """Share of the word's letters matched, in order, by the first letters of the lines; 0.8x when
    the number of lines differs from the word's length."""
    word = rollout.example["word"].upper()
    lines = _lines(rollout.completion)
    firsts = [re.sub(r"^[^A-Za-z]+", "", ln)[:1].upper() for ln in lines]
    hit = sum(a == b for a, b in zip(firsts, word)) / len(word)
    return hit * (1.0 if len(lines) == len(word) else 0.8)


def bullet_list(rollout) -> float:
    """Share of lines starting with "- " times closeness of the item count to the one asked for."""
    lines, want = _lines(rollout.completion), rollout.example["items"]
    if not lines:
        return 0.0
    bullets = sum(bool(re.match(r"^[-*•]\s+\S", ln)) for ln in lines)
    return bullets / len(lines) * max(0.0, 1.0 - abs(bullets - want) / want)


def constraints(rollout) -> float:
    """The row's constraint, graded in [0, 1]: the deterministic graders of rlft.rewards.checks
    (word_limit, required_phrases) or the two structural graders above."""
    ex = rollout.example
    if ex["kind"] == "words":
        fit = checks.word_limit(max_words=ex["max_words"], min_words=3)(rollout)
        return 0.7 * fit + 0.3 * checks.required_phrases(field="required")(rollout)
    if ex["kind"] == "format":
        return bullet_list(rollout)
    return acrostic(rollout)


no_preamble = checks.forbidden_phrases(["here is", "here's", "sure!", "sure,", "certainly"])

env = Environment(
    system_prompt=SYSTEM,
    rewards=[constraints, Reward(no_preamble, weight=0.1, name="no_preamble")],
    max_turns=1,
    max_tokens=96,
    name="constrained",
)

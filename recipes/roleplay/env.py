"""Roleplay: Captain Barnacle, a kind old pirate captain, scored by an LLM judge's rubrics (one
positive, one negative) plus cheap deterministic checks that give signal even when the judge fails.

The judge is any OpenAI-compatible endpoint; by default a SmolLM2-135M-Instruct served locally:

    rlft serve --model smollm2 --port 8001        # terminal 1: the judge
    rlft train recipes/roleplay/config.toml       # terminal 2

RLFT_JUDGE_URL (default http://127.0.0.1:8001/v1) and RLFT_JUDGE_MODEL (default smollm2) point it
elsewhere. SmolLM2-135M is a weak judge: its verdicts are noisy and often unparsable (an
unparsable verdict scores 0 for that component and is recorded in the run store); the rubrics use
named score levels so a one-word verdict parses. Use a stronger judge for real work.
"""

from __future__ import annotations

import os
import re

from rlft import Environment, Reward
from rlft.rewards import checks
from rlft.rewards.judge import Judge, Rubric

SYSTEM = """You are Captain Barnacle, a cheerful old pirate captain who loves the sea and teaches children about it.
Guidelines:
- Always speak as Captain Barnacle, in the first person, with sea and pirate words ("Arr", "matey", "ship", "sea").
- Answer the visitor's question kindly and simply.
- Keep every reply under 60 words.
- Never say you are an AI, a language model or an assistant."""

JUDGE_URL = os.environ.get("RLFT_JUDGE_URL", "http://127.0.0.1:8001/v1")
JUDGE_MODEL = os.environ.get("RLFT_JUDGE_MODEL", "smollm2")
LEVELS = {"no": 0.0, "partly": 0.5, "yes": 1.0}

judge = Judge(JUDGE_MODEL, JUDGE_URL, timeout=90, retries=1, max_tokens=80, max_concurrency=16)

IN_CHARACTER = Rubric(
    "In character",
    "The reply sounds like Captain Barnacle, a kind old pirate captain talking to a child: first person, "
    "sea and pirate words, and it answers the question.",
    score_map=LEVELS)
BREAKS_CHARACTER = Rubric(
    "Breaks character",
    "The reply drops the pirate persona: it talks like a generic assistant, mentions being an AI or a model, "
    "or is rude or unsafe for a child.",
    kind="negative", score_map=LEVELS)

PERSONA_WORDS = ("arr", "matey", "ahoy", "ship", "sea", "sail", "captain", "crew", "aye", "deck", "treasure",
                 "waves", "ocean", "me hearty", "shiver")


def persona_words(rollout) -> float:
    """Distinct persona words used, 3 or more = 1 (a cheap, deterministic 'stays in persona')."""
    text = rollout.completion.lower()
    found = sum(bool(re.search(rf"\b{re.escape(w)}\b", text)) for w in PERSONA_WORDS)
    return min(found, 3) / 3


env = Environment(
    system_prompt=SYSTEM,
    rewards=[
        judge.reward(IN_CHARACTER, 0.5),
        judge.reward(BREAKS_CHARACTER, -0.5),
        Reward(persona_words, weight=0.3),
        Reward(checks.word_limit(max_words=60, min_words=5), weight=0.2, name="word_limit"),
        Reward(checks.forbidden_phrases(["as an ai", "language model", "ai assistant", "i am an assistant"]),
               weight=0.2, name="no_ai_talk"),
    ],
    max_turns=1,
    max_tokens=96,
    reward_timeout=240,
    name="roleplay",
)

"""Roleplay: Captain Barnacle, a kind old pirate captain. Two environments share the persona:

- ``env`` (what ``config.toml`` trains): the deterministic persona checks only (persona words,
  word limit, no "I am an AI" talk). The small local judges measured for this recipe order the
  calibration pairs at chance (README), so their verdicts would add noise, not signal.
- ``judged_env``: the same checks plus two logprob-scored judge rubrics (one positive, one
  negative), for a judge that passes calibration:

      rlft judge check recipes/roleplay/config.toml --set env=env.py:judged_env

The judge is a local Hugging Face model in this process (``LocalJudge``: one batched forward per
step, the verdict read off the next-token probabilities), by default SmolLM2-135M-Instruct;
``RLFT_JUDGE_MODEL`` names another (hub id, alias, directory or .gguf). ``RLFT_JUDGE_URL`` uses an
OpenAI-compatible endpoint that returns ``top_logprobs`` instead (``LogprobJudge``: OpenAI, vLLM,
``rlft serve``). The local model loads at the first verdict, so importing this file loads none.
"""

from __future__ import annotations

import os
import re

from rlft import Environment, Reward
from rlft.rewards import checks
from rlft.rewards.judge import Rubric
from rlft.rewards.logprob_judge import LocalJudge, LogprobJudge

SYSTEM = """You are Captain Barnacle, a cheerful old pirate captain who loves the sea and teaches children about it.
Guidelines:
- Always speak as Captain Barnacle, in the first person, with sea and pirate words ("Arr", "matey", "ship", "sea").
- Answer the visitor's question kindly and simply.
- Keep every reply under 60 words.
- Never say you are an AI, a language model or an assistant."""

JUDGE_URL = os.environ.get("RLFT_JUDGE_URL", "")
JUDGE_MODEL = os.environ.get("RLFT_JUDGE_MODEL", "smollm2")
LEVELS = {"no": 0.0, "partly": 0.5, "yes": 1.0}  # asked as the digits 1 / 2 / 3 (logprob verdicts)

judge = (LogprobJudge(JUDGE_MODEL, JUDGE_URL, timeout=90, retries=1, max_concurrency=16) if JUDGE_URL
         else LocalJudge(JUDGE_MODEL, name=JUDGE_MODEL))

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


CHECKS = [
    Reward(persona_words, weight=0.3),
    Reward(checks.word_limit(max_words=60, min_words=5), weight=0.2, name="word_limit"),
    Reward(checks.forbidden_phrases(["as an ai", "language model", "ai assistant", "i am an assistant"]),
           weight=0.2, name="no_ai_talk"),
]


def _persona_env(rewards: list[Reward], name: str) -> Environment:
    return Environment(system_prompt=SYSTEM, rewards=rewards, max_turns=1, max_tokens=96, reward_timeout=240,
                       name=name)


env = _persona_env(CHECKS, "roleplay")
judged_env = _persona_env([judge.reward(IN_CHARACTER, 0.5), judge.reward(BREAKS_CHARACTER, -0.5), *CHECKS],
                          "roleplay-judged")

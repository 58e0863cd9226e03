"""The Engine protocol: token ids in, sampled token ids and their logprobs out.

Every generator (the in-process Hugging Face engine, vLLM, a remote OpenAI-compatible server,
the ScriptedPolicy used in tests) implements this one async method. Rollouts call it once per
assistant turn, concurrently; an engine is free to batch concurrent calls. It knows nothing of
chats, tools or rewards: rendering and parsing live in ``rlft.renderer``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)  # stop strings (the stop text is kept)
    seed: int | None = None


@dataclass
class Sample:
    """One generation. ``finish_reason`` is "stop" (end-of-turn token or a stop string) or
    "length" (max_new_tokens reached). ``tokens`` include the end-of-turn token when sampled."""

    tokens: list[int]
    logprobs: list[float]
    finish_reason: str = "stop"
    policy_version: int = 0  # optimizer step of the weights that produced it


@runtime_checkable
class Engine(Protocol):
    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Sample:
        """Sample one continuation of ``prompt_ids``."""
        ...

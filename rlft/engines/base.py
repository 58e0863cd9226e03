"""The engine contracts: what the rollout loop and the trainer may ask of a generator.

Three protocols, each declared here and nowhere guessed at (no ``hasattr`` or signature probing):

- :class:`Engine`: token ids in, sampled token ids and their logprobs out (``generate``). Every
  generator implements it: the in-process Hugging Face engine, vLLM, a remote OpenAI-compatible
  server, the ScriptedPolicy used in tests. Rollouts call it once per assistant turn,
  concurrently; an engine is free to batch concurrent calls. It knows nothing of chats, tools or
  rewards: rendering and parsing live in ``rlft.renderer``.
- :class:`TrainableEngine`: an Engine the trainer keeps in step with its weights. It says which
  form of new weights it takes (:class:`WeightFormat`), takes them as one
  :class:`WeightUpdate` in ``sync_weights``, holds its forward passes while the trainer's
  weights change (``paused``), reports the ``policy_version`` it serves, and is closed once.
- :class:`ChatEngine`: an external chat model (a hosted API, another team's server): messages
  in, a :class:`ChatReply` out. Its tokens are not ours to train on, so it serves evals only.

Left out: how each engine batches, caches or talks to its server (``hf.py``, ``vllm.py``,
``remote.py``, ``external_chat.py``), and choosing one from a config (``factory.py``).
"""

from __future__ import annotations

import enum
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from rlft.types import Message, ToolCall


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)  # stop strings (the stop text is kept)
    seed: int | None = None
    top_logprobs: int = 0  # also return the k most likely tokens of each sampled position (HFEngine; rlft serve)
    # an llguidance grammar (rlft.engines.constrained) the sample must follow; HFEngine honours it
    # (rlft serve sets it only there), other engines ignore it
    grammar: str | None = None


@dataclass
class Sample:
    """One generation. ``finish_reason`` is "stop" (end-of-turn token or a stop string) or
    "length" (max_new_tokens reached). ``tokens`` include the end-of-turn token when sampled."""

    tokens: list[int]
    logprobs: list[float]
    finish_reason: str = "stop"
    policy_version: int = 0  # optimizer step of the weights that produced it
    # with SamplingParams.top_logprobs = k: per sampled token, the k most likely (id, logprob) pairs,
    # most likely first, in the same distribution as ``logprobs``; None when not asked or not supported
    top_logprobs: list[list[tuple[int, float]]] | None = None


class Engine(Protocol):
    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Sample:
        """Sample one continuation of ``prompt_ids``."""
        ...


class WeightFormat(enum.Enum):
    """The form in which a trainable engine takes the trainer's new weights."""

    SHARED = "shared"  # it runs the trainer's own module: nothing to copy, only the version moves
    MODULE = "module"  # it copies them from the trainer's module (in-process: HF copy, vLLM full finetune)
    ADAPTER = "adapter"  # it loads a saved LoRA adapter directory (another process: rlft serve, vLLM LoRA)


@dataclass(frozen=True)
class WeightUpdate:
    """The trainer's weights as of optimizer step ``version``, in the engine's ``weight_format``:
    ``model`` for MODULE (and SHARED, for reference), ``adapter_dir`` for ADAPTER."""

    version: int
    model: Any = None  # the trainer's torch module (a DDP/FSDP2 wrapper's inner module)
    adapter_dir: str | None = None


class TrainableEngine(Engine, Protocol):
    policy_version: int  # the version of the weights it serves now
    weight_format: WeightFormat

    def paused(self) -> AbstractContextManager[None]:
        """Hold generation while the trainer's weights change (a no-op for engines with their own copy)."""
        ...

    def sync_weights(self, update: WeightUpdate) -> None:
        """Serve ``update``'s weights from now on, labelled ``update.version``."""
        ...

    def clear_prefix_cache(self) -> None:
        """Forget the KV kept for reuse across requests, so that requests run before (an eval)
        do not change the numbers of those run next; a no-op where the engine keeps none itself."""
        ...

    def close(self) -> None:
        """Release threads, clients and memory; called once, when the run ends."""
        ...


@dataclass
class ChatReply:
    """One assistant turn of an external chat model, with its usage and cost."""

    message: Message
    calls: list[ToolCall]
    finish_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    latency: float = 0.0


class ChatEngine(Protocol):
    async def chat(self, messages: list[Message], tools: list[dict] | None, params: SamplingParams) -> ChatReply:
        """The next assistant turn of ``messages`` (``tools``: the schemas offered)."""
        ...


__all__ = ["ChatEngine", "ChatReply", "Engine", "Sample", "SamplingParams", "TrainableEngine", "WeightFormat",
           "WeightUpdate"]

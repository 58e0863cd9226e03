"""The typed values that flow through rlft: messages, tool calls, rollouts, groups, termination.

Messages are plain OpenAI-style dicts (``{"role": "assistant", "content": ..., "tool_calls": [...]}``)
because that is what chat templates, OpenAI clients and the run store all speak; everything
else is a dataclass. This module holds data only: no I/O, no torch.
"""

from __future__ import annotations

import traceback as _tb
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

Message = dict[str, Any]


class Termination(str, Enum):
    """Why a rollout ended. Set on every rollout; stored and shown in the console. Each member's
    ``__doc__`` says what it means (``rlft validate`` and the console print it)."""

    def __new__(cls, value: str, doc: str):
        member = str.__new__(cls, value)
        member._value_ = value
        member.__doc__ = doc
        return member

    FINISHED = "finished", (
        "The model produced a final answer (an assistant turn with no tool call)."
    )
    MAX_TURNS = "max_turns", (
        "The environment's ``max_turns`` assistant turns were used up."
    )
    MAX_TOOL_CALLS = "max_tool_calls", (
        "The model asked for more tool calls than ``max_tool_calls`` allows."
    )
    LENGTH = "length", (
        "A generation hit its token limit (``max_tokens`` per rollout) before ending its turn: truncated."
    )
    CONTEXT_EXCEEDED = "context_exceeded", (
        "The conversation no longer fits the model's context window (``max_seq_len``)."
    )
    TOOL_ERROR = "tool_error", (
        "A tool failed in a way the rollout cannot continue from (e.g. its MCP server died)."
    )
    REWARD_ERROR = "reward_error", (
        "A reward function raised, timed out or returned a non-finite value (that component scores 0)."
    )
    SETUP_ERROR = "setup_error", (
        "The environment's per-rollout ``setup`` raised; the model was never called."
    )
    MODEL_ERROR = "model_error", (
        "The engine failed to generate (exception, malformed output it could not recover from)."
    )
    TIMEOUT = "timeout", (
        "The whole rollout exceeded its wall-clock budget (``rollout_timeout``)."
    )
    ERROR = "error", (
        "Any other exception in the environment's own code (a custom ``step``, ``teardown``...)."
    )

    def __str__(self) -> str:  # so f-strings print "finished", not "Termination.FINISHED"
        return self.value


@dataclass
class ToolCall:
    """One tool call parsed from assistant text. ``arguments`` is the decoded JSON object;
    ``error`` is set when the call could not be parsed (the model is told, the rollout goes on)."""

    name: str
    arguments: dict[str, Any]
    id: str = ""
    error: str | None = None

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class RolloutError:
    """An error recorded on a rollout: where it happened, the message, and the traceback."""

    where: str  # "tool:search", "reward:correct", "setup", "model", ...
    message: str
    traceback: str = ""

    @classmethod
    def from_exception(cls, where: str, exc: BaseException) -> RolloutError:
        tb = "".join(_tb.format_exception(type(exc), exc, exc.__traceback__))
        return cls(where=where, message=f"{type(exc).__name__}: {exc}", traceback=tb)


@dataclass
class Rollout:
    """One sampled conversation for one dataset example, with everything needed to train on it.

    Token fields cover the whole conversation after the initial prompt (``prompt_ids``):
    ``completion_ids`` interleaves sampled assistant tokens (``mask`` 1, with their sampling
    ``logprobs``) and template-rendered tool/user turns (``mask`` 0, logprob 0.0). The tokens
    trained on are exactly these ids: nothing is re-tokenized.
    """

    example: dict[str, Any]  # the dataset row: prompt/messages, ground_truth, extra fields
    messages: list[Message] = field(default_factory=list)  # the whole chat, system prompt included
    prompt_ids: list[int] = field(default_factory=list)
    completion_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # same length as completion_ids
    mask: list[int] = field(default_factory=list)  # 1 = sampled by the policy (trained on)
    termination: Termination | None = None
    rewards: dict[str, float] = field(default_factory=dict)  # per component, unweighted
    reward: float = 0.0  # Σ weight · component
    advantage: float = 0.0
    errors: list[RolloutError] = field(default_factory=list)
    turns: int = 0  # assistant turns generated
    tool_calls: int = 0  # tool calls executed (including failed ones)
    example_id: int = 0  # index of the example in its dataset
    group_index: int = 0  # index of this rollout among its G siblings
    policy_version: int = 0  # optimizer step of the weights that sampled it
    # a played demonstration put in its group by guidance (rlft.training.guidance), not sampled by
    # the policy: its ``logprobs`` are 0 and the update trains its tokens off-policy
    demonstration: bool = False
    state: dict[str, Any] = field(default_factory=dict)  # per-rollout scratch (setup's workspace, ...)
    logs: list[str] = field(default_factory=list)  # lines the environment logged for this rollout
    metrics: dict[str, float] = field(default_factory=dict)  # extra per-rollout numbers (timings...)
    # the initial prompt as the model saw it: chat template applied, system prompt (a template's
    # default one included) and tool schemas; "" for external chat models (they render it themselves)
    prompt_text: str = ""

    # -- conveniences for reward functions ---------------------------------------------------
    @property
    def ground_truth(self) -> Any:
        return self.example.get("ground_truth")

    @property
    def completion(self) -> str:
        """Text of the last assistant message ("" if the model never answered)."""
        for m in reversed(self.messages):
            if m.get("role") == "assistant":
                return m.get("content") or ""
        return ""

    @property
    def assistant_messages(self) -> list[Message]:
        return [m for m in self.messages if m.get("role") == "assistant"]

    @property
    def tool_messages(self) -> list[Message]:
        return [m for m in self.messages if m.get("role") == "tool"]

    @property
    def num_sampled_tokens(self) -> int:
        return sum(self.mask)

    @property
    def truncated(self) -> bool:
        return self.termination in (Termination.LENGTH, Termination.CONTEXT_EXCEEDED)

    def log(self, line: str) -> None:
        """Record a line in this rollout's environment log (shown in the console)."""
        self.logs.append(str(line))

    def record_error(self, where: str, exc: BaseException) -> RolloutError:
        err = RolloutError.from_exception(where, exc)
        self.errors.append(err)
        return err


@dataclass
class Group:
    """The G rollouts sampled for one prompt: the unit that group-relative advantages use."""

    example: dict[str, Any]
    rollouts: list[Rollout]
    example_id: int = 0

    @property
    def rewards(self) -> list[float]:
        return [r.reward for r in self.rollouts]

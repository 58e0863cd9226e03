"""rlft: reinforcement-learning finetuning of language models. The public API only."""

from rlft.types import Group, Message, Rollout, RolloutError, Termination, ToolCall

__all__ = ["Group", "Message", "Rollout", "RolloutError", "Termination", "ToolCall"]
__version__ = "0.1.0"

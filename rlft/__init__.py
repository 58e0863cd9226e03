"""rlft: reinforcement-learning finetuning of language models. The public API only.

    from rlft import Environment, Reward, tool, train

Heavy dependencies (torch, transformers, peft, mcp) load only when the object that needs them
is used: importing rlft is cheap.
"""

import os as _os

# oneDNN keeps up to 1,024 compiled primitives by default, and every new batch shape of the engine's
# packed linears (decode batches shrink sequence by sequence) adds some with their own buffers: the
# demo's heap grew ~50 MB a phase. 64 still holds the shapes a step reuses. Measured on the demo:
# peak RSS 2.59 -> 2.38 GiB, wall 2:14 -> 1:58 (benchmarks/README.md). It must be set before torch
# runs its first oneDNN op; a value the user set wins.
_os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")

from rlft.config import TrainConfig, load_config
from rlft.data import Dataset, DatasetError, load_dataset
from rlft.engines.base import Engine, Sample, SamplingParams
from rlft.env import Environment, Sampler
from rlft.rewards import Reward
from rlft.tools import Tool, tool
from rlft.types import Group, Message, Rollout, RolloutError, Termination, ToolCall

__version__ = "0.1.0"


def train(config=None, **kwargs):
    """Train a policy (see ``rlft.training.loop.train``); returns the run id."""
    from rlft.training.loop import train as _train

    return _train(config, **kwargs)


def __getattr__(name):  # lazy: MCPServer needs the optional `mcp` extra only when used
    if name == "MCPServer":
        from rlft.mcp import MCPServer

        return MCPServer
    raise AttributeError(f"module 'rlft' has no attribute {name!r}")


__all__ = [
    "Dataset", "DatasetError", "Engine", "Environment", "Group", "MCPServer", "Message", "Reward", "Rollout",
    "RolloutError", "Sample", "Sampler", "SamplingParams", "Termination", "Tool", "ToolCall", "TrainConfig",
    "load_config", "load_dataset", "tool", "train",
]

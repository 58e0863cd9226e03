"""Test helpers for users and for our own tests, all offline.

- ``scripted.py``: ``ScriptedPolicy``, an Engine that replays assistant messages you write, so an
  environment's tools, rewards and multi-turn control can be tested with no model at all;
- ``tokenizer.py``: ``build_tiny_tokenizer``, a byte-level BPE with a ChatML + tools template;
- ``models.py``: ``build_tiny_model`` / ``save_tiny_model``, a random tiny Llama with that tokenizer;
- ``pretrained.py``: ``build_pretrained_tiny``, a tiny model SFT-trained on a toy task (cached), and
  ``task_environment`` for it: the smallest honest test that RL learns.

The model builders load torch and transformers on first use only.
"""

from typing import Any

from rlft.testing.scripted import ScriptedPolicy
from rlft.testing.tokenizer import build_tiny_tokenizer

_LAZY = {"build_tiny_model": "models", "save_tiny_model": "models", "build_pretrained_tiny": "pretrained",
         "task_environment": "pretrained"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"rlft.testing.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'rlft.testing' has no attribute {name!r}")


__all__ = ["ScriptedPolicy", "build_pretrained_tiny", "build_tiny_model", "build_tiny_tokenizer", "save_tiny_model",
           "task_environment"]

"""Fixtures shared by the test modules. Three different things were called "tiny"; here each has
its own name:

- ``tiny_tokenizer`` / ``tiny_renderer``: the byte-level ChatML + tools tokenizer of the tiny
  models (``rlft.testing.tokenizer``) and a Renderer over it: no model at all;
- ``tiny_model_dir``: a random-initialised tiny Llama saved once per session
  (``rlft.testing.models.save_tiny_model``, default shape and seed): its outputs are noise;
  ``tiny_model``: the same model and tokenizer in memory, fresh per module;
- ``pretrained_tiny_dir`` / ``pretrained_tiny_tools_dir``: the tiny model SFT-trained on the
  "max of a list" task (seed 0), without and with ``max_of`` tool calls
  (``rlft.testing.pretrained``; cached per machine, so built once, not per session).

The shared directories are read-only by convention: a test that writes next to a model writes in
its own ``tmp_path``. ``scripted_sampler(script, **kw)`` gives a Sampler whose engine replays
``script`` (``rlft.testing.ScriptedPolicy``) over the tiny renderer.
"""

from __future__ import annotations

import os

import pytest

# bf16 matmuls round differently on oneDNN's AMX kernels (Sapphire Rapids and later) than on its
# AVX512-BF16 ones: a seeded bf16 run samples other tokens after a step or two, and the recorded
# runs of tests/test_golden_runs.py could only match on the kind of CPU that recorded them. Capping
# oneDNN at AVX512-BF16 (read when torch first loads it, so before any import of torch) makes one
# recording hold on both kinds; a CPU without AVX512-BF16 still rounds its own way. Correctness
# tests compare against float32 within tolerances and do not depend on it.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from rlft.testing.tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_renderer(tiny_tokenizer):
    from rlft.renderer import Renderer

    return Renderer(tiny_tokenizer)


@pytest.fixture
def scripted_sampler(tiny_renderer):
    """``make(script, *, delay=0.0, **sampler_kw)``: a Sampler over a fresh ScriptedPolicy."""
    from rlft.env import Sampler
    from rlft.testing import ScriptedPolicy

    def make(script, *, delay: float = 0.0, **kw):
        return Sampler(ScriptedPolicy(tiny_renderer, script, delay=delay), tiny_renderer, **kw)

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A random-initialised tiny model (default shape, seed 0) saved once for the whole session."""
    from rlft.testing.models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny_model") / "tiny")


@pytest.fixture(scope="session")
def pretrained_tiny_dir() -> str:
    """The tiny model SFT-trained on the "max" task (seed 0): follows the chat format, right ~30%."""
    from rlft.testing.pretrained import build_pretrained_tiny

    return build_pretrained_tiny(task="max", seed=0)


@pytest.fixture(scope="session")
def pretrained_tiny_tools_dir() -> str:
    """The same task's model that also learned to call ``max_of`` (Hermes tool calls)."""
    from rlft.testing.pretrained import build_pretrained_tiny

    return build_pretrained_tiny(task="max", seed=0, tools=True)


@pytest.fixture(scope="session")
def console_workspace(tmp_path_factory, tiny_model_dir):
    """The console tests' run store (a trained tiny run, a failed one, a live one, XSS payloads),
    built once for the API and the browser tests (test_console_api.build_workspace)."""
    from test_console_api import build_workspace

    return build_workspace(tmp_path_factory.mktemp("console"), tiny_model_dir)


@pytest.fixture(scope="session")
def console_sft_workspace(tmp_path_factory, tiny_model_dir):
    """A run store with one finished SFT run, for the console's API and browser tests
    (test_console_api.build_sft_workspace)."""
    from test_console_api import build_sft_workspace

    return build_sft_workspace(tmp_path_factory.mktemp("console-sft"), tiny_model_dir)


@pytest.fixture(scope="module")
def one_thread():
    """Pins torch to one intra-op thread for a module: tiny models gain nothing from more, on
    shared busy cores two spinning threads were measured ~20x slower than one, and fp32
    reductions (seeded comparisons) depend on the thread count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model():
    """(model, tokenizer): the random-initialised tiny model in memory (seed 0), built per module,
    not per session: engines hold it and some tests change its weights."""
    from rlft.testing.models import build_tiny_model

    return build_tiny_model(seed=0)

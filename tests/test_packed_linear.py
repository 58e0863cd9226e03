"""oneDNN-packed linear weights in the engine's own copy (rlft.engines.packed_linear)."""

from __future__ import annotations

import copy

import pytest
import torch

from rlft.engines.base import SamplingParams, WeightUpdate
from rlft.engines.hf import HFEngine
from rlft.engines.packed_linear import can_pack, is_packed, pack_linears
from rlft.testing.models import build_tiny_model
from tests.test_hf_engine import PROMPTS, chat, gather


@pytest.fixture(scope="module")
def tiny_bf16():
    model, tok = build_tiny_model(seed=0)
    model = model.to(torch.bfloat16)
    if not can_pack(model):
        pytest.skip("this CPU's oneDNN has no bf16 kernels")
    return model, tok


def _sample(engine, tok, n=6):
    prompts = [chat(tok, f"{PROMPTS[i % len(PROMPTS)]} {i}") for i in range(n)]
    params = [SamplingParams(temperature=1.0, max_new_tokens=8, seed=100 + i) for i in range(n)]
    return gather(engine, prompts, params)


def test_packed_linear_is_bit_identical_to_f_linear_at_every_batch_size():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 160, bias=True).to(torch.bfloat16)
    if not can_pack(lin):
        pytest.skip("this CPU's oneDNN has no bf16 kernels")
    plain = copy.deepcopy(lin)
    assert pack_linears(lin) == 1
    with torch.no_grad():
        for shape in [(1, 96), (64, 96), (3, 17, 96), (1, 700, 96)]:
            x = torch.randn(*shape, dtype=torch.bfloat16)
            assert torch.equal(lin(x), plain(x)), shape


def test_packed_forward_falls_back_to_the_weight_when_gradients_are_needed():
    lin = torch.nn.Linear(32, 16).to(torch.bfloat16)
    if not can_pack(lin):
        pytest.skip("this CPU's oneDNN has no bf16 kernels")
    pack_linears(lin)
    with torch.no_grad():
        lin.weight.mul_(2)  # the packed copy is now stale: only a gradient pass may see the change
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    out = lin(x)
    assert out.requires_grad and torch.equal(out, torch.nn.functional.linear(x, lin.weight, lin.bias))
    out.float().sum().backward()
    assert lin.weight.grad is not None


def test_engine_with_its_own_copy_packs_and_samples_exactly_what_the_plain_engine_samples(tiny_bf16):
    model, tok = tiny_bf16
    packed = HFEngine(model, tok, seed=0, inline=True, copy_weights=True, fast_forward=False)
    shared = HFEngine(model, tok, seed=0, inline=True)
    try:
        assert packed.prepacked and is_packed(packed.model)
        assert not shared.prepacked and not is_packed(model)  # the trainer's module is never packed
        a, b = _sample(packed, tok), _sample(shared, tok)
    finally:
        packed.close()
        shared.close()
    assert [s.tokens for s in a] == [s.tokens for s in b]
    assert [s.logprobs for s in a] == [s.logprobs for s in b]


def test_sync_weights_repacks_so_the_engine_follows_new_weights(tiny_bf16):
    model, tok = tiny_bf16
    source = copy.deepcopy(model)
    engine = HFEngine(source, tok, seed=0, inline=True, copy_weights=True, fast_forward=False)
    try:
        before = _sample(engine, tok)
        with torch.no_grad():  # an "optimizer step" that moves every projection
            for name, p in source.named_parameters():
                if name.endswith("proj.weight"):
                    p.add_(torch.randn_like(p) * 0.5)
        engine.sync_weights(WeightUpdate(1))
        after = _sample(engine, tok)
        fresh = HFEngine(source, tok, seed=0, inline=True)  # the new weights, unpacked
        try:
            expected = _sample(fresh, tok)
        finally:
            fresh.close()
    finally:
        engine.close()
    assert [s.logprobs for s in after] == [s.logprobs for s in expected]
    assert [s.logprobs for s in after] != [s.logprobs for s in before]


def test_bf16_full_finetune_samples_from_a_packed_bf16_copy_checked_every_step(tmp_path, tiny_model_dir):
    from rlft.store import RunStore
    from rlft.training.loop import train

    (tmp_path / "env.py").write_text(
        "from rlft.env import Environment\n"
        "env = Environment(rewards=[lambda ro: len(set(ro.completion)) / 16], max_tokens=10)\n"
        "dataset = [{'prompt': f'write something {i}'} for i in range(20)]\n")
    run_id = train(env=str(tmp_path / "env.py"), model=tiny_model_dir, runs_dir=str(tmp_path / "runs"),
                   lora=False, dtype="bfloat16", steps=2, batch_size=2, group_size=4, eval_fraction=0.0,
                   validate=False, progress=False, learning_rate=1e-3, checkpoint_every=0)
    with RunStore(tmp_path / "runs", readonly=True) as store:
        assert store.get_run(run_id)["status"] == "completed"
        m = store.metrics(run_id, ["sync/probe_logprob_diff", "sync/logprob_diff_mean"])
    # the float32 master weights are copied into the engine's bf16 copy (and re-packed) after each
    # step; the probe (at the start; no eval samples from the last push) and each step's rollouts
    # compare the two: bf16 rounding only, far below the 0.15 tolerance
    assert [s for s, _ in m["sync/probe_logprob_diff"]] == [0]
    assert [s for s, _ in m["sync/logprob_diff_mean"]] == [1, 2]
    assert max(v for key in m for _, v in m[key]) < 0.05

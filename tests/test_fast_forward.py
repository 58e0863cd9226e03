"""The engine's lean forward (rlft.engines.fast_forward) computes the model's own logits, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch

from rlft.attention import use_fast_attention
from rlft.engines.base import SamplingParams, WeightUpdate
from rlft.engines.fast_forward import FastForward, supports
from rlft.engines.hf import HFEngine
from rlft.engines.kv_cache import EngineCache
from rlft.engines.packed_linear import can_pack, pack_linears
from rlft.testing.models import build_tiny_model
from tests.test_hf_engine import PROMPTS, chat, gather, gather_fresh

DTYPES = [torch.float32, torch.bfloat16]


def _tiny(arch: str, dtype: torch.dtype):
    """A tiny random model of ``arch`` with the tiny tokenizer, on rlft's attention."""
    # head_dim 16 (scale 1/4: decode attention folds it into its matmul); 8 (scale 8^-0.5: it cannot)
    model, tok = build_tiny_model(seed=0, heads=8 if arch == "llama-head-dim-8" else 4)
    if not arch.startswith("llama"):
        import transformers

        cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
               "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[arch]
        config = cls[0](vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                        tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = cls[1](config)
            with torch.no_grad():  # random biases and norm weights: zeros and ones would hide a wrong order
                for name, p in model.named_parameters():
                    if name.endswith("bias") or "norm" in name:
                        p.add_(torch.randn_like(p) * 0.1)
    model = model.to(dtype).eval()
    assert use_fast_attention(model)
    return model, tok


def _hf(model):
    """The model's own forward, as the engine calls it, on a copy whose linears are packed as the
    engine packs its modules (bf16)."""
    ref = copy.deepcopy(model)
    if can_pack(ref):
        pack_linears(ref)

    def forward(ids, mask, pos, cache):
        out = ref(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                  logits_to_keep=torch.tensor([ids.shape[1] - 1]))
        return out.logits[:, -1]

    return forward


def _decode(model, forward, steps=5):
    """A left-padded prefill of 5 rows (one with 3 padding slots, one with 1), then greedy steps."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (5, 9), generator=gen)
    mask = torch.ones(5, 9, dtype=torch.bool)
    mask[0, :3] = False
    mask[2, :1] = False
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    cache = EngineCache(model.config.num_hidden_layers)
    with torch.inference_mode():
        logits = [forward(ids, mask, pos, cache)]
        last = pos[:, -1:]
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones(5, 1, dtype=torch.bool)], 1)
            last = last + 1
            logits.append(forward(logits[-1].float().argmax(-1, keepdim=True), mask, last, cache))
    return logits


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ["llama", "llama-head-dim-8", "qwen2", "qwen3"])
def test_fast_forward_gives_the_models_logits_bit_for_bit_in_prefill_and_decode(arch, dtype):
    model, _ = _tiny(arch, dtype)
    assert supports(model)
    expected = _decode(model, _hf(model))
    got = _decode(model, FastForward(model))
    for step, (a, b) in enumerate(zip(expected, got)):
        assert a.dtype == b.dtype == dtype
        assert torch.equal(a, b), (step, (a.float() - b.float()).abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_engine_with_fast_forward_samples_exactly_what_the_module_engine_samples(dtype):
    model, tok = _tiny("llama", dtype)
    fast = HFEngine(model, tok, seed=0, inline=True, copy_weights=True)
    modules = HFEngine(model, tok, seed=0, inline=True, copy_weights=True, fast_forward=False)
    prompts = [chat(tok, f"{PROMPTS[i % len(PROMPTS)]} {i}") for i in range(6)] + [chat(tok, PROMPTS[0])] * 2
    params = [SamplingParams(temperature=1.0, max_new_tokens=10, seed=100 + i) for i in range(len(prompts))]
    try:
        assert fast.fast_forward is not None and modules.fast_forward is None
        assert not fast.prepacked  # the fused weights replace the modules' packed copies
        a, b = gather(fast, prompts, params), gather(modules, prompts, params)
    finally:
        fast.close()
        modules.close()
    assert [s.tokens for s in a] == [s.tokens for s in b]
    assert [s.logprobs for s in a] == [s.logprobs for s in b]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sync_weights_rebuilds_the_fused_weights(dtype):
    model, tok = _tiny("llama", dtype)
    source = copy.deepcopy(model)
    engine = HFEngine(source, tok, seed=0, inline=True, copy_weights=True)
    prompts = [chat(tok, p) for p in PROMPTS]
    params = [SamplingParams(temperature=1.0, max_new_tokens=8, seed=7 + i) for i in range(len(prompts))]
    try:
        if not engine.fast_forward.packed:  # float32: the modules' q/k/v weights are views of the fused one
            attn = engine.model.model.layers[0].self_attn
            fused = engine.fast_forward.layers[0].qkv
            assert attn.k_proj.weight.data_ptr() == fused[attn.q_proj.weight.shape[0]:].data_ptr()
        before = gather(engine, prompts, params)
        with torch.no_grad():  # an "optimizer step" that moves every projection
            for name, p in source.named_parameters():
                if name.endswith("proj.weight"):
                    p.add_(torch.randn_like(p) * 0.5)
        engine.sync_weights(WeightUpdate(1))
        after = gather(engine, prompts, params)
        expected = gather_fresh(source, tok, prompts, params)  # the new weights, through the model's modules
    finally:
        engine.close()
    assert [s.logprobs for s in after] == [s.logprobs for s in expected]
    assert [s.logprobs for s in after] != [s.logprobs for s in before]


def test_only_an_own_copy_of_a_supported_model_takes_the_fast_forward():
    model, tok = _tiny("llama", torch.float32)
    shared = HFEngine(model, tok, seed=0)  # the trainer's module: its weights change under the engine
    try:
        assert shared.fast_forward is None
    finally:
        shared.close()
    sdpa = copy.deepcopy(model)
    sdpa.set_attn_implementation("sdpa")  # another attention than rlft's: the forward would differ
    assert not supports(sdpa)
    windowed = copy.deepcopy(model)
    windowed.config.layer_types = ["sliding_attention"] * windowed.config.num_hidden_layers
    assert not supports(windowed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_attention_equals_rlft_attention_at_every_cache_length(dtype):
    """The decode path's four ops against the attention the model's modules run, over the cache's
    whole buffers (written slots < capacity) and full ones, with padding slots in some rows."""
    from rlft.attention import rlft_attention

    model, _ = _tiny("llama", dtype)
    fast = FastForward(model)
    B, KV, G, D = 3, 3, 3, 64  # SmolLM2's heads
    fast.heads, fast.scale = KV * G, D ** -0.5
    gen = torch.Generator().manual_seed(0)
    for cap in range(1, 66):  # a bf16 softmax (not float32) is off by a bit at 54 and 57 here
        for length in {cap, max(1, cap - 7)}:
            query = torch.randn(B, KV * G, 1, D, generator=gen).to(dtype)
            kbuf, vbuf = (torch.randn(B, KV, cap, D, generator=gen).to(dtype) for _ in range(2))
            mask = torch.ones(B, length, dtype=torch.bool)
            mask[1, : length // 2] = False  # left padding
            key, value = kbuf[:, :, :length], vbuf[:, :, :length]
            if length < cap:  # how the KV cache hands its buffers to rlft.attention
                key._rlft_buffer, value._rlft_buffer = kbuf, vbuf
            with torch.inference_mode():
                expected, _ = rlft_attention(model.model.layers[0].self_attn, query, key, value, mask[:, None, None],
                                             scaling=fast.scale)
                got = fast._decode_attention(query, kbuf, vbuf, mask, {})
            assert torch.equal(got.view(B, 1, KV * G, D), expected), (cap, length)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multi_turn_rollouts_from_the_kept_kv_sample_exactly_what_the_module_engine_samples(dtype):
    """The fast forward continuing from KV kept by the prefix cache (rlft.engines.prefix_cache:
    preloaded caches, left-padded rows of different reused lengths) against the module path."""
    from tests.test_prefix_cache import QUESTIONS, first_turn, second_turns

    model, tok = _tiny("llama", dtype)
    fast = HFEngine(model, tok, seed=0, copy_weights=True)
    modules = HFEngine(model, tok, seed=0, copy_weights=True, fast_forward=False)
    try:
        prompts = [first_turn(tok, q) for q in QUESTIONS] + [first_turn(tok, QUESTIONS[0])] * 3
        params = [SamplingParams(temperature=1.0, max_new_tokens=8, seed=50 + i) for i in range(len(prompts))]
        a, b = gather(fast, prompts, params), gather(modules, prompts, params)
        assert [(s.tokens, s.logprobs) for s in a] == [(s.tokens, s.logprobs) for s in b]
        nexts = second_turns(tok, prompts, a)
        reused = fast.stats.reused_tokens
        a2, b2 = gather(fast, nexts, params), gather(modules, nexts, params)
        assert fast.stats.reused_tokens > reused  # the second turns did start from kept KV
        assert [(s.tokens, s.logprobs) for s in a2] == [(s.tokens, s.logprobs) for s in b2]
    finally:
        fast.close()
        modules.close()

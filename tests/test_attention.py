"""The "rlft" CPU attention computes what transformers' sdpa computes (float32 tiny Llama)."""

from __future__ import annotations

import copy

import pytest
import torch

from rlft import attention
from rlft.engines.kv_cache import EngineCache
from rlft.testing.models import build_tiny_model


@pytest.fixture(scope="module")
def pair():
    model, _ = build_tiny_model(seed=3, hidden=64, heads=4, kv_heads=2, layers=2)
    model.eval()
    fast = copy.deepcopy(model)
    assert attention.use_fast_attention(fast)
    assert fast.config._attn_implementation == "rlft" and model.config._attn_implementation == "sdpa"
    return model, fast


def _left_padded(B: int, T: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (B, T), generator=g)
    attn = torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        attn[b, : b * 3] = 0  # row b has 3b pad tokens on the left
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return ids, attn, pos


def test_full_sequence_logits_match_sdpa_with_left_padding(pair):
    ref, fast = pair
    ids, attn, pos = _left_padded(4, 24, ref.config.vocab_size)
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=attn, position_ids=pos).logits
        b = fast(input_ids=ids, attention_mask=attn, position_ids=pos).logits
    real = attn.bool()
    torch.testing.assert_close(b[real], a[real], atol=1e-5, rtol=1e-5)


def test_unpadded_causal_logits_match_sdpa(pair):
    # no padding: transformers passes no mask and relies on causality, which the matmul path applies
    ref, fast = pair
    ids = torch.randint(5, ref.config.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(fast(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_decode_steps_with_cache_match_sdpa(pair, monkeypatch):
    ref, fast = pair
    widened = []  # decode steps attend over the cache's whole buffers (unwritten slots masked)
    real = attention._whole_buffers
    monkeypatch.setattr(attention, "_whole_buffers",
                        lambda k, v, m, q: (lambda out: widened.append(out[0].shape[2] > k.shape[2]) or out)(real(k, v, m, q)))
    ids, attn, pos = _left_padded(3, 10, ref.config.vocab_size, seed=1)
    outs = []
    for model in (ref, fast):
        cache, mask, p = EngineCache(2), attn.bool(), pos[:, -1:]
        with torch.no_grad():
            logits = [model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                            use_cache=True).logits[:, -1]]
            nxt = logits[-1].argmax(-1, keepdim=True)
            for _ in range(5):
                mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.bool)], 1)
                p = p + 1
                logits.append(model(input_ids=nxt, attention_mask=mask, position_ids=p, past_key_values=cache,
                                    use_cache=True).logits[:, -1])
                nxt = logits[-1].argmax(-1, keepdim=True)
        outs.append(torch.stack(logits))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    assert widened and all(widened)


def test_gradients_match_sdpa(pair):
    ref, fast = pair
    ids, attn, pos = _left_padded(3, 20, ref.config.vocab_size, seed=2)
    grads = []
    for model in (ref, fast):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits
        (out.float().log_softmax(-1)[attn.bool()].max(-1).values.sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def test_large_score_tensor_defers_to_sdpa(monkeypatch, pair):
    # above the score-memory budget the sdpa path runs (and still gives the same logits)
    ref, fast = pair
    called = []
    import transformers.integrations.sdpa_attention as sdpa

    real = sdpa.sdpa_attention_forward
    monkeypatch.setattr(sdpa, "sdpa_attention_forward", lambda *a, **k: called.append(1) or real(*a, **k))
    monkeypatch.setattr(attention, "_MAX_SCORE_BYTES", 1)
    ids, attn, pos = _left_padded(2, 20, ref.config.vocab_size)
    with torch.no_grad():
        b = fast(input_ids=ids, attention_mask=attn, position_ids=pos).logits
        a = ref(input_ids=ids, attention_mask=attn, position_ids=pos).logits
    assert called
    torch.testing.assert_close(b[attn.bool()], a[attn.bool()], atol=1e-5, rtol=1e-5)


def test_gpu_and_non_sdpa_models_are_left_alone():
    model, _ = build_tiny_model(seed=0)
    model.set_attn_implementation("eager")
    assert not attention.use_fast_attention(model)
    assert model.config._attn_implementation == "eager"


def test_bf16_training_saves_only_bf16_probabilities_and_keeps_the_softmax_gradient():
    # the bf16 backward uses the bf16 probabilities the forward's p @ v used: its gradient equals
    # torch's float32-softmax backward within bf16's rounding of p (2^-8 relative), and the
    # scores' saved tensors shrink from float32 + bf16 (6 bytes per score) to bf16 alone
    g = torch.Generator().manual_seed(0)
    scores = (torch.randn(2, 3, 2, 40, 40, generator=g) * 3).requires_grad_(True)
    grad = torch.randn(2, 3, 2, 40, 40, generator=g).bfloat16()
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        mine = attention._SoftmaxAs.apply(scores, torch.bfloat16)
    ref = torch.softmax(scores, dim=-1).to(torch.bfloat16)
    assert torch.equal(mine, ref)  # the forward is unchanged
    (g_mine,) = torch.autograd.grad(mine, scores, grad)
    (g_ref,) = torch.autograd.grad(ref, scores, grad)
    torch.testing.assert_close(g_mine, g_ref, rtol=2 ** -7, atol=2 ** -7 * float(g_ref.abs().max()))
    assert float((g_mine - g_ref).abs().max()) > 0  # a different (bf16) p, not the same computation
    assert [t.dtype for t in saved] == [torch.bfloat16] and saved[0].numel() == scores.numel()


def test_bf16_lora_style_training_through_the_model_matches_the_float32_softmax_path(pair, monkeypatch):
    _, fast = pair
    model = copy.deepcopy(fast).to(torch.bfloat16)
    ids, attn, pos = _left_padded(3, 20, model.config.vocab_size, seed=4)

    def grads():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits
        (out.float().log_softmax(-1)[attn.bool()].max(-1).values.sum()).backward()
        return torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])

    mine = grads()
    monkeypatch.setattr(attention._SoftmaxAs, "apply", lambda s, dtype: torch.softmax(s, dim=-1).to(dtype))
    ref = grads()
    rel = float((mine - ref).norm() / ref.norm())
    assert 0 < rel < 2e-2  # bf16 gradients: the two differ by bf16 rounding only


@pytest.mark.parametrize("T, fused", [(20, False), (attention._SDPA_FROM_KEYS, True)])
def test_queries_over_many_keys_take_the_fused_sdpa_kernel_whatever_autograd_says(monkeypatch, pair, T, fused):
    # the choice is by shape: with and without gradients the same kernel, so the same numbers
    ref, fast = pair
    import transformers.integrations.sdpa_attention as sdpa

    called = []
    real = sdpa.sdpa_attention_forward
    monkeypatch.setattr(sdpa, "sdpa_attention_forward", lambda *a, **k: called.append(1) or real(*a, **k))
    ids, attn, pos = _left_padded(2, T, ref.config.vocab_size)
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=attn, position_ids=pos).logits
        b = fast(input_ids=ids, attention_mask=attn, position_ids=pos).logits
    no_grad_calls = len(called)
    c = fast(input_ids=ids, attention_mask=attn, position_ids=pos).logits
    layers = fast.config.num_hidden_layers
    assert no_grad_calls == (layers if fused else 0) and len(called) == 2 * no_grad_calls
    assert torch.equal(b, c.detach())
    torch.testing.assert_close(b[attn.bool()], a[attn.bool()], atol=1e-5, rtol=1e-5)

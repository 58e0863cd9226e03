"""HFEngine on a tiny random Llama (float32, so that batched and unbatched math agree closely)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from rlft.engines.base import SamplingParams, WeightFormat, WeightUpdate
from rlft.engines.hf import ContextLengthError, HFEngine, end_of_turn_ids, sample_tokens
from rlft.testing.models import build_tiny_model


@pytest.fixture(scope="module")
def engine(tiny_model):
    model, tok = tiny_model
    eng = HFEngine(model, tok, max_batch_size=64, seed=0)
    yield eng
    eng.close()


def chat(tok, text: str) -> list[int]:
    enc = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(enc["input_ids"] if hasattr(enc, "keys") else enc)


PROMPTS = [
    "what is 1 plus 2",
    "hello",
    "please give the capital city of the country with the largest population in the world",
    "sum 3 4",
    "reply with json only",
]


def gather(engine, prompts, params):
    async def run():
        ps = params if isinstance(params, list) else [params] * len(prompts)
        return await asyncio.gather(*[engine.generate(p, sp) for p, sp in zip(prompts, ps)])

    return asyncio.run(run())


def gather_fresh(model, tok, prompts, params, **engine_kw):
    """What a new engine over ``model``'s current weights samples (the reference for a synced one)."""
    engine = HFEngine(model, tok, seed=0, inline=True, **engine_kw)
    try:
        return gather(engine, prompts, params)
    finally:
        engine.close()


def full_forward_logprobs(model, prompt, tokens, temperature):
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    t = temperature if temperature > 0 else 1.0
    logp = torch.log_softmax(logits / t, dim=-1)
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(tokens) - 1)
    return logp[pos, torch.tensor(tokens)]


def test_an_engine_on_the_given_model_shares_it_so_a_sync_only_moves_the_version(engine, tiny_model):
    # the TrainableEngine contract (signatures: tests/test_engine_contract.py); no copy, nothing to refresh
    assert engine.weight_format is WeightFormat.SHARED and engine.model is tiny_model[0] and not engine.prepacked


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 1.0, 20), (0.0, 1.0, 0)])
def test_logprobs_equal_full_forward_log_softmax_at_temperature_before_truncation(engine, tiny_model, temperature, top_p,
                                                                                    top_k):
    model, tok = tiny_model
    prompts = [chat(tok, p) for p in PROMPTS]
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=12, seed=7)
    samples = gather(engine, prompts, params)
    for prompt, s in zip(prompts, samples):
        assert len(s.tokens) == len(s.logprobs) > 0
        expected = full_forward_logprobs(model, prompt, s.tokens, temperature)
        torch.testing.assert_close(torch.tensor(s.logprobs), expected, atol=2e-4, rtol=1e-4)


def test_greedy_output_equals_hf_generate_do_sample_false(engine, tiny_model):
    model, tok = tiny_model
    prompts = [chat(tok, p) for p in PROMPTS]
    samples = gather(engine, prompts, SamplingParams(temperature=0.0, max_new_tokens=16))
    eos = sorted(engine.stop_token_ids)
    for prompt, s in zip(prompts, samples):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 do_sample=False, max_new_tokens=16, eos_token_id=eos, pad_token_id=tok.pad_token_id)
        assert s.tokens == out[0, len(prompt):].tolist()


def test_top_k_1_equals_greedy_tokens_and_logprobs(engine, tiny_model):
    _, tok = tiny_model
    prompts = [chat(tok, p) for p in PROMPTS]
    greedy = gather(engine, prompts, SamplingParams(temperature=0.0, max_new_tokens=10))
    topk1 = gather(engine, prompts, SamplingParams(temperature=1.0, top_k=1, max_new_tokens=10, seed=3))
    for g, k in zip(greedy, topk1):
        assert g.tokens == k.tokens
        assert g.logprobs == pytest.approx(k.logprobs, abs=1e-6)


def test_seeded_sampling_is_reproducible_alone_and_inside_a_batch(engine, tiny_model):
    _, tok = tiny_model
    prompt = chat(tok, PROMPTS[0])
    params = SamplingParams(temperature=1.0, max_new_tokens=16, seed=1234)
    a = gather(engine, [prompt], params)[0]
    b = gather(engine, [prompt], params)[0]
    others = [chat(tok, p) for p in PROMPTS[1:]]
    c = gather(engine, others + [prompt], [SamplingParams(temperature=1.0, max_new_tokens=16)] * len(others) + [params])
    assert a.tokens == b.tokens == c[-1].tokens
    d = gather(engine, [prompt], SamplingParams(temperature=1.0, max_new_tokens=16, seed=4321))[0]
    assert d.tokens != a.tokens


def test_identical_prompts_in_a_group_sample_independently(engine, tiny_model):
    _, tok = tiny_model
    prompt = chat(tok, PROMPTS[1])
    before = engine.stats.prefill_tokens
    samples = gather(engine, [prompt] * 8, SamplingParams(temperature=1.0, max_new_tokens=12))
    assert len({tuple(s.tokens) for s in samples}) > 1
    assert engine.stats.prefill_tokens - before == len(prompt)  # prefilled once for the group


def test_shared_system_prompt_is_prefilled_once_and_outputs_match_solo(tiny_model):
    model, tok = tiny_model
    system = {"role": "system", "content": "you are a tool that answers questions about numbers and cities in json"}
    prompts = [list(tok.apply_chat_template([system, {"role": "user", "content": q}], add_generation_prompt=True)
                    ["input_ids"]) for q in ("hi", "what is the sum of 3 and 4 and 5", "city", "capital of the country")]
    eng = HFEngine(model, tok, seed=0)
    try:
        greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
        batched = gather(eng, prompts, greedy)
        assert eng.stats.prefill_tokens < sum(len(p) for p in prompts) - 2 * 16
        for p, b in zip(prompts, batched):
            solo = gather(eng, [p], greedy)[0]
            assert b.tokens == solo.tokens
            assert b.logprobs == pytest.approx(solo.logprobs, abs=1e-4)
    finally:
        eng.close()


def test_max_new_tokens_ends_with_length(engine, tiny_model):
    _, tok = tiny_model
    s = gather(engine, [chat(tok, PROMPTS[0])], SamplingParams(temperature=0.0, max_new_tokens=7))[0]
    assert s.finish_reason == "length" and len(s.tokens) == 7
    assert not set(s.tokens) & engine.stop_token_ids
    z = gather(engine, [chat(tok, PROMPTS[0])], SamplingParams(max_new_tokens=0))[0]
    assert z.tokens == [] and z.finish_reason == "length"


def test_stop_string_ends_sample_with_stop_and_keeps_the_stop_text(engine, tiny_model):
    _, tok = tiny_model
    prompt = chat(tok, PROMPTS[2])
    free = gather(engine, [prompt], SamplingParams(temperature=0.0, max_new_tokens=24))[0]
    text = tok.decode(free.tokens)
    # a stop string taken from the middle of the greedy text: generation must end right after it
    cut = tok.decode(free.tokens[:6])
    stop = text[len(cut) - 2: len(cut) + 1] if len(cut) >= 2 else text[:3]
    assert stop and stop in text
    s = gather(engine, [prompt], SamplingParams(temperature=0.0, max_new_tokens=24, stop=[stop]))[0]
    assert s.finish_reason == "stop"
    assert stop in tok.decode(s.tokens)
    assert stop not in tok.decode(s.tokens[:-1])
    assert s.tokens == free.tokens[: len(s.tokens)] and len(s.tokens) < len(free.tokens)


def test_end_of_turn_token_ends_sample_with_stop_and_is_included(tiny_model):
    model, tok = tiny_model
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in end_of_turn_ids(tok) and tok.eos_token_id in end_of_turn_ids(tok)
    prompt = chat(tok, PROMPTS[0])
    eng = HFEngine(model, tok, seed=0)
    try:
        free = gather(eng, [prompt], SamplingParams(temperature=0.0, max_new_tokens=8))[0]
        # make <|im_end|> the most likely token from the 4th generated token on
        step = {"n": 0}

        def boost(module, inputs, output):
            step["n"] += 1
            if step["n"] >= 4:
                output[..., im_end] += 1000.0
            return output

        handle = model.lm_head.register_forward_hook(boost)
        try:
            s = gather(eng, [prompt], SamplingParams(temperature=1.0, max_new_tokens=8))[0]
        finally:
            handle.remove()
    finally:
        eng.close()
    assert s.finish_reason == "stop"
    assert s.tokens[-1] == im_end and len(s.tokens) == 4
    assert s.tokens[:3] != [] and free.finish_reason == "length"


def test_concurrent_generate_calls_are_batched_and_all_return(tiny_model):
    model, tok = tiny_model
    eng = HFEngine(model, tok, max_batch_size=64, seed=0)
    try:
        prompts = [chat(tok, f"{PROMPTS[i % len(PROMPTS)]} {i}") for i in range(32)]
        params = [SamplingParams(temperature=0.0, max_new_tokens=4 + (i % 9)) for i in range(32)]
        samples = gather(eng, prompts, params)
    finally:
        eng.close()
    assert len(samples) == 32
    for s, p in zip(samples, params):
        assert 0 < len(s.tokens) <= p.max_new_tokens
    st = eng.stats
    assert st.requests == 32
    assert st.prefill_batches < 32
    assert st.decode_steps < sum(len(s.tokens) for s in samples)
    assert st.max_running > 1
    # batched greedy output is the solo greedy output (left padding, compaction do not change results)
    solo = HFEngine(model, tok, max_batch_size=1)
    try:
        for i in (0, 7, 31):
            alone = gather(solo, [prompts[i]], params[i])[0]
            assert alone.tokens == samples[i].tokens
    finally:
        solo.close()


def test_request_arriving_mid_batch_joins_and_matches_solo_output(tiny_model):
    model, tok = tiny_model
    eng = HFEngine(model, tok, seed=0)
    long_p, short_p = chat(tok, PROMPTS[2]), chat(tok, PROMPTS[1])
    greedy = SamplingParams(temperature=0.0, max_new_tokens=40)

    async def run():
        first = asyncio.ensure_future(eng.generate(long_p, greedy))
        while eng.stats.decode_steps < 5:  # the first request is decoding
            await asyncio.sleep(0.001)
        second = await eng.generate(short_p, SamplingParams(temperature=0.0, max_new_tokens=10))
        return await first, second

    try:
        a, b = asyncio.run(run())
        ref_a = gather(eng, [long_p], greedy)[0]
        ref_b = gather(eng, [short_p], SamplingParams(temperature=0.0, max_new_tokens=10))[0]
    finally:
        eng.close()
    assert eng.stats.max_running == 2  # they shared decode steps
    assert a.tokens == ref_a.tokens and b.tokens == ref_b.tokens


def test_policy_version_is_copied_into_samples(engine, tiny_model):
    _, tok = tiny_model
    engine.sync_weights(WeightUpdate(5))
    try:
        s = gather(engine, [chat(tok, "hi")], SamplingParams(max_new_tokens=2))[0]
    finally:
        engine.policy_version = 0
    assert s.policy_version == 5


def test_cancelled_request_does_not_break_the_engine(engine, tiny_model):
    _, tok = tiny_model
    prompt = chat(tok, PROMPTS[0])

    async def run():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(engine.generate(prompt, SamplingParams(max_new_tokens=2000)), timeout=0.01)
        return await engine.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=3))

    assert len(asyncio.run(run()).tokens) == 3


def test_prompt_longer_than_context_is_rejected(tiny_model):
    _, tok = tiny_model
    model, _ = build_tiny_model(seed=0, max_positions=32)
    eng = HFEngine(model, tok)
    try:
        with pytest.raises(ContextLengthError):
            gather(eng, [[5] * 40], SamplingParams(max_new_tokens=2))
        s = gather(eng, [[5] * 28], SamplingParams(temperature=0.0, max_new_tokens=50))[0]
        assert s.finish_reason == "length" and len(s.tokens) == 4
    finally:
        eng.close()


def test_engine_on_shared_lora_policy_sees_adapter_updates_without_sync(tiny_model_dir):
    from rlft.policy import LoraSpec, load_policy

    policy = load_policy(tiny_model_dir, dtype="float32", lora=LoraSpec(rank=4))
    tok = policy.tokenizer
    eng = HFEngine.from_policy(policy, seed=0)
    try:
        assert eng.weight_format is WeightFormat.SHARED and eng.model is policy.model
        prompt = chat(tok, PROMPTS[0])
        params = SamplingParams(temperature=1.0, max_new_tokens=10, seed=5)
        before = gather(eng, [prompt], params)[0]
        with torch.no_grad():
            for name, p in policy.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
        with eng.paused():  # what a trainer does around its optimizer step
            policy.model.train()
        after = gather(eng, [prompt], params)[0]
        with eng.paused():  # results are delivered inside the step; the mode is restored before the lock is free
            assert policy.model.training  # the engine restored train mode after each step
        policy.model.eval()
        assert after.tokens != before.tokens
        torch.testing.assert_close(torch.tensor(after.logprobs),
                                   full_forward_logprobs(policy.model, prompt, after.tokens, 1.0), atol=2e-4, rtol=1e-4)
    finally:
        eng.close()


def test_bf16_engine_copy_runs_in_bf16_and_follows_sync_weights(tiny_model):
    model, tok = tiny_model
    eng = HFEngine(model, tok, dtype="bfloat16", seed=0)
    try:
        assert eng.weight_format is WeightFormat.MODULE and eng.dtype == torch.bfloat16 and model.dtype == torch.float32
        prompt = chat(tok, PROMPTS[0])
        s = gather(eng, [prompt], SamplingParams(temperature=1.0, max_new_tokens=8, seed=1))[0]
        ref = full_forward_logprobs(model, prompt, s.tokens, 1.0)
        assert torch.allclose(torch.tensor(s.logprobs), ref, atol=0.1)  # bf16 vs fp32: close, not equal
        src = build_tiny_model(seed=1)[0]
        eng.sync_weights(WeightUpdate(1, model=src))
        # the embedding is the copy's own; the head, packed by the fast forward, is read from the source
        assert torch.equal(eng.model.model.embed_tokens.weight, src.model.embed_tokens.weight.to(torch.bfloat16))
        assert torch.equal(eng._copy.weight(eng.model.lm_head), src.lm_head.weight.to(torch.bfloat16))
        assert eng.policy_version == 1
    finally:
        eng.close()


# -- the sampler on its own ------------------------------------------------------------------------


def _draw(logits_row, n, **kw):
    logits = logits_row.repeat(n, 1)
    t = torch.full((n,), kw.get("temperature", 1.0))
    p = torch.full((n,), kw.get("top_p", 1.0))
    k = torch.full((n,), kw.get("top_k", 0), dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    return sample_tokens(logits, t, p, k, torch.rand(n, generator=g), topk_cap=kw.get("topk_cap", 1024))


def test_inverse_cdf_sampling_matches_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = torch.log(probs.clamp_min(1e-30))
    tokens, logprobs = _draw(logits, 20000)
    freq = torch.bincount(tokens, minlength=5).float() / 20000
    assert torch.allclose(freq, probs, atol=0.015)
    assert freq[4] == 0  # a zero-probability token is never drawn
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1)[tokens])


@pytest.mark.parametrize("vocab", [4096, 5000])  # a whole number of blocks, and a padded last block
def test_two_level_inverse_cdf_on_large_vocabularies_matches_the_distribution(vocab):
    # mass on a few entries spread over blocks (one at the very end); the rest exactly zero
    probs = torch.zeros(vocab)
    hot = {3: 0.4, 700: 0.25, 701: 0.15, 2049: 0.1, vocab - 1: 0.1}
    for i, v in hot.items():
        probs[i] = v
    logits = torch.log(probs)  # -inf off the hot entries: weight exactly 0
    tokens, logprobs = _draw(logits, 20000)
    freq = torch.bincount(tokens, minlength=vocab).float() / 20000
    assert set(tokens.tolist()) <= set(hot)  # a zero-weight entry is never drawn
    for i, v in hot.items():
        assert abs(float(freq[i]) - v) < 0.015, (i, float(freq[i]))
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1)[tokens])
    # u at the edges: the first hot entry for u = 0, the last for u -> 1
    t = torch.ones(2)
    u = torch.tensor([0.0, 1.0 - 2 ** -24])
    edge, _ = sample_tokens(logits.repeat(2, 1), t, t, torch.zeros(2, dtype=torch.long), u)
    assert edge.tolist() == [3, vocab - 1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="checks the sampler on a CUDA device")
def test_two_level_sampling_runs_on_the_logits_device():
    # the two-level path (large vocabularies) once built a CPU scalar next to CUDA tensors
    logits = torch.randn(4, 49152, device="cuda")
    t = torch.ones(4, device="cuda")
    tokens, lp = sample_tokens(logits, t, t, torch.zeros(4, dtype=torch.long, device="cuda"),
                               torch.rand(4, device="cuda"))
    assert tokens.device.type == "cuda" and bool((tokens < 49152).all())
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0])


@pytest.mark.parametrize("topk_cap", [1024, 2])  # 2 forces the full-sort fallback for top_p
def test_top_p_and_top_k_restrict_draws_but_logprobs_are_untruncated(topk_cap):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = torch.log(probs)
    tokens, logprobs = _draw(logits, 20000, top_p=0.8, topk_cap=topk_cap)
    freq = torch.bincount(tokens, minlength=4).float() / 20000
    assert set(tokens.tolist()) == {0, 1}
    assert abs(freq[0] - 0.5 / 0.8) < 0.015
    torch.testing.assert_close(logprobs, torch.log(probs)[tokens])  # not renormalised over the nucleus
    tokens, _ = _draw(logits, 5000, top_k=3)
    assert set(tokens.tolist()) == {0, 1, 2}
    tokens, lp = _draw(logits, 10, temperature=0.5, top_k=1)
    assert set(tokens.tolist()) == {0}
    torch.testing.assert_close(lp, torch.log_softmax(logits / 0.5, -1)[tokens])


def test_mixed_rows_greedy_plain_and_truncated_in_one_call():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.0, 1.0, 0.8, 1.0, 0.0, 1.2])
    p = torch.tensor([1.0, 1.0, 0.5, 1.0, 1.0, 0.9])
    k = torch.tensor([0, 0, 0, 5, 0, 3])
    tokens, lp = sample_tokens(logits, t, p, k, torch.rand(6))
    assert tokens[0] == logits[0].argmax() and tokens[4] == logits[4].argmax()
    assert tokens[3] in logits[3].topk(5).indices and tokens[5] in logits[5].topk(3).indices
    temp = torch.where(t > 0, t, torch.ones_like(t))
    torch.testing.assert_close(lp, torch.log_softmax(logits / temp[:, None], -1).gather(1, tokens[:, None])[:, 0])

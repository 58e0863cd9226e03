"""KV reuse across turns (rlft.engines.prefix_cache under HFEngine), on the tiny random Llama in
float32: a turn that extends a finished sequence starts from its kept KV and must sample what a
fresh prefill of the whole conversation samples (tokens equal, logprobs within 1e-4)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from rlft.engines.base import SamplingParams, WeightUpdate
from rlft.engines.hf import HFEngine
from rlft.engines.prefix_cache import PrefixCache
from rlft.testing.models import build_tiny_model

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)
SYSTEM = {"role": "system", "content": "you answer questions about numbers and cities, calling tools when useful"}
QUESTIONS = ["what is 3 plus 4", "capital of the largest country", "hi", "sum the list 1 2 3 4 5 6"]
TOOL_RESULT = "<|im_end|>\n<|im_start|>user\n<tool_response>\n{\"result\": 42}\n</tool_response><|im_end|>\n" \
              "<|im_start|>assistant\n"


def chat_ids(tok, messages) -> list[int]:
    enc = tok.apply_chat_template(messages, add_generation_prompt=True)
    return list(enc["input_ids"] if hasattr(enc, "keys") else enc)


def first_turn(tok, question: str) -> list[int]:
    return chat_ids(tok, [SYSTEM, {"role": "user", "content": question}])


def gather(engine, prompts, params=GREEDY):
    async def run():
        return await asyncio.gather(*[engine.generate(p, params) for p in prompts])

    return asyncio.run(run())


def second_turns(tok, prompts, samples) -> list[list[int]]:
    """Each conversation so far, the sampled turn kept as sampled, then a tool result appended."""
    result = tok.encode(TOOL_RESULT, add_special_tokens=False)
    return [p + s.tokens + result for p, s in zip(prompts, samples)]


def assert_same_samples(got, want):
    for g, w in zip(got, want):
        assert g.tokens == w.tokens
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=1e-4, rtol=0)


def kv_bytes_per_token(model) -> int:
    c = model.config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4


@pytest.fixture
def engines(tiny_model):
    """(with the prefix cache, without it): the same float32 model."""
    model, tok = tiny_model
    cached, plain = HFEngine(model, tok, seed=0), HFEngine(model, tok, seed=0, prefix_cache_mb=0)
    yield cached, plain
    cached.close()
    plain.close()


def test_second_turns_from_the_kept_kv_sample_what_a_full_prefill_samples(tiny_model, engines):
    _, tok = tiny_model
    cached, plain = engines
    prompts = [first_turn(tok, q) for q in QUESTIONS] + [first_turn(tok, QUESTIONS[0])] * 3  # a group of 4
    turn1 = gather(cached, prompts)
    assert_same_samples(turn1, gather(plain, prompts))
    assert len(cached.prefix_cache) > 0 and not plain.prefix_cache.enabled
    nexts = second_turns(tok, prompts, turn1)
    # with one conversation the cache has never seen: its row has no kept prefix beyond the system prompt
    nexts.append(first_turn(tok, "a question nobody asked before, longer than the others"))
    before = cached.stats.prefill_tokens, cached.stats.reused_tokens
    turn2 = gather(cached, nexts)
    computed, reused = cached.stats.prefill_tokens - before[0], cached.stats.reused_tokens - before[1]
    result_len = len(tok.encode(TOOL_RESULT, add_special_tokens=False))
    continued = {tuple(n) for n in nexts[:-1]}  # the group's 4 greedy conversations are one
    # the conversations came from the kept KV; only the appended tokens (the last sampled token, the
    # tool result, the next header) and the new question were computed
    assert reused >= sum(len(n) - result_len - 1 for n in continued)
    assert computed <= len(continued) * (result_len + 1) + len(nexts[-1])
    assert_same_samples(turn2, gather(plain, nexts))
    # a third turn on top of the second's kept KV
    nexts3 = second_turns(tok, nexts[:-1], turn2[:-1])
    assert_same_samples(gather(cached, nexts3), gather(plain, nexts3))


def test_a_turn_arriving_alone_reuses_its_own_kept_kv_and_matches_solo_output(tiny_model, engines):
    _, tok = tiny_model
    cached, plain = engines
    prompt = first_turn(tok, QUESTIONS[3])
    s1 = gather(cached, [prompt])[0]
    nxt = second_turns(tok, [prompt], [s1])[0]
    before = cached.stats.reused_tokens
    s2 = gather(cached, [nxt])[0]
    assert cached.stats.reused_tokens - before == len(prompt) + len(s1.tokens) - 1  # all it had fed
    assert_same_samples([s2], gather(plain, [nxt]))


def test_a_group_holds_its_prompt_kv_once(tiny_model):
    model, tok = tiny_model
    eng = HFEngine(model, tok, seed=0, stop_token_ids=[])  # every sample runs to max_new_tokens
    try:
        prompt = first_turn(tok, QUESTIONS[1])
        gather(eng, [prompt] * 4, SamplingParams(temperature=1.0, max_new_tokens=8))
        assert len(eng.prefix_cache) == 4
        # the prompt once, then each rollout's 7 fed tokens (the 8th was sampled, never fed)
        assert eng.prefix_cache.nbytes == (len(prompt) + 4 * 7) * kv_bytes_per_token(model)  # not 4 x the prompt
    finally:
        eng.close()


def test_weight_sync_drops_the_kept_kv_and_the_next_turn_equals_a_fresh_engine(tiny_model):
    model, tok = tiny_model
    other = build_tiny_model(seed=1)[0]
    eng = HFEngine(model, tok, seed=0, copy_weights=True)  # its own copy, refreshed by sync_weights
    fresh = HFEngine(other, tok, seed=0, prefix_cache_mb=0)
    try:
        prompts = [first_turn(tok, q) for q in QUESTIONS]
        nexts = second_turns(tok, prompts, gather(eng, prompts))
        assert len(eng.prefix_cache) == len(prompts)
        eng.sync_weights(WeightUpdate(1, model=other))
        assert len(eng.prefix_cache) == 0 and eng.prefix_cache.nbytes == 0
        before = eng.stats.reused_tokens
        assert_same_samples(gather(eng, nexts), gather(fresh, nexts))
        assert eng.stats.reused_tokens - before < sum(len(p) for p in prompts)  # only the shared system prompt
    finally:
        eng.close()
        fresh.close()


def test_paused_drops_the_kept_kv_of_a_shared_module_whose_weights_change(tiny_model):
    model, tok = tiny_model
    eng = HFEngine(model, tok, seed=0)  # SHARED: the trainer's module itself
    try:
        prompt = first_turn(tok, QUESTIONS[0])
        nxt = second_turns(tok, [prompt], gather(eng, [prompt]))[0]
        with eng.paused():  # what the trainer does around its optimizer step
            assert len(eng.prefix_cache) == 0
            saved = {k: v.clone() for k, v in model.state_dict().items()}
            model.load_state_dict(build_tiny_model(seed=1)[0].state_dict())
        got = gather(eng, [nxt])[0]
        ref = HFEngine(model, tok, seed=0, prefix_cache_mb=0)
        try:
            assert_same_samples([got], gather(ref, [nxt]))
        finally:
            ref.close()
    finally:
        model.load_state_dict(saved)
        eng.close()


def test_a_sequence_admitted_before_a_sync_is_not_kept_after_it(tiny_model):
    model, tok = tiny_model
    eng = HFEngine(model, tok, seed=0, copy_weights=True, stop_token_ids=[])  # runs to max_new_tokens

    async def run():
        task = asyncio.ensure_future(eng.generate(first_turn(tok, QUESTIONS[2]), SamplingParams(
            temperature=0.0, max_new_tokens=60)))
        while eng.stats.decode_steps < 3:
            await asyncio.sleep(0.001)
        eng.sync_weights(WeightUpdate(1, model=build_tiny_model(seed=1)[0]))  # between two decode steps
        return await task

    try:
        s = asyncio.run(run())
        assert len(s.tokens) == 60 and len(eng.prefix_cache) == 0  # its KV mixes two versions of the weights
    finally:
        eng.close()


def test_the_kept_kv_stays_within_its_budget_least_recently_used_out_first(tiny_model):
    model, tok = tiny_model
    per_token = kv_bytes_per_token(model)
    # no system prompt: the prompts share fewer tokens than the shortest reuse (min_shared_prefix)
    prompts = [chat_ids(tok, [{"role": "user", "content": f"{i} is the number of this question"}]) for i in range(6)]
    budget = 3 * (len(prompts[0]) + 16) * per_token  # room for about two or three sequences
    eng = HFEngine(model, tok, seed=0, prefix_cache_mb=budget / (1 << 20), stop_token_ids=[])
    try:
        for p in prompts:
            gather(eng, [p])
            assert 0 < eng.prefix_cache.nbytes <= budget
        assert 1 < len(eng.prefix_cache) < len(prompts)
        kept, _ = eng.prefix_cache.lookup(prompts[-1] + [5], len(prompts[-1]) + 1)
        evicted, _ = eng.prefix_cache.lookup(prompts[0] + [5], len(prompts[0]) + 1)
        assert kept == len(prompts[-1]) and evicted < len(prompts[0])
        gather(eng, [first_turn(tok, "long " * 400)])  # larger than the whole budget: not kept
        assert eng.prefix_cache.nbytes <= budget
    finally:
        eng.close()


def test_lookup_finds_the_longest_common_prefix_and_a_kept_extension_replaces_its_prefix():
    def part(n: int) -> torch.Tensor:
        return torch.zeros(1, 2, 1, n, 1)

    cache = PrefixCache(budget_bytes=1 << 20, min_match=2)
    a = part(5)
    cache.insert([1, 2, 3, 4, 5], [(a, 5)])
    cache.insert([9, 9, 9], [(part(3), 3)])
    n, parts = cache.lookup([1, 2, 3, 7, 7, 7], limit=5)
    assert n == 3 and parts == [(a, 3)]
    assert cache.lookup([1, 7], limit=2) == (0, [])  # below min_match
    assert cache.lookup([1, 2, 3, 4, 5, 6], limit=4)[0] == 4  # never past the limit
    cache.insert([1, 2, 3, 4, 5, 6, 7], [(a, 5), (part(2), 2)])  # extends the first: it goes, its part stays
    assert len(cache) == 2 and cache.nbytes == (5 + 3 + 2) * 2 * 4
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0 and cache.lookup([1, 2, 3], 3) == (0, [])


def test_tool_calling_rollouts_are_the_same_with_and_without_the_cache(pretrained_tiny_tools_dir):
    """Whole multi-turn rollouts through the environment (tool calls, results rendered by the
    template, greedy): the same token ids and logprobs either way, with most of the later turns'
    prompts reused rather than prefilled."""
    from rlft.env import Sampler
    from rlft.policy import load_policy
    from rlft.renderer import Renderer
    from rlft.testing.pretrained import task_environment

    policy = load_policy(pretrained_tiny_tools_dir, dtype="float32")
    env, rows = task_environment("max", n=4, seed=3, with_tools=True)
    renderer = Renderer(policy.tokenizer)
    params = SamplingParams(temperature=0.0, max_new_tokens=48)
    out = {}
    for mb in (512, 0):
        eng = HFEngine(policy.model, policy.tokenizer, seed=0, inline=True, prefix_cache_mb=mb)
        try:
            groups = asyncio.run(env.run_groups(rows, Sampler(eng, renderer, params), group_size=2))
        finally:
            eng.close()
        out[mb] = ([r for g in groups for r in g.rollouts], eng.stats)
    (cached, stats), (plain, plain_stats) = out[512], out[0]
    assert sum(r.tool_calls for r in cached) >= len(rows)  # multi-turn: the model calls its tool
    for a, b in zip(cached, plain):
        assert a.completion_ids == b.completion_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)
    assert stats.prefill_tokens < plain_stats.prefill_tokens / 2 and stats.reused_tokens > 0


def test_a_rows_kept_kv_copies_its_slots_whether_they_are_one_range_or_not():
    """``_rows_kv`` slices a row's slots when they are one range and gathers them otherwise (a
    merge can pad between a row's parts): both give the indexed K and V of every layer, as copies."""
    from types import SimpleNamespace

    from rlft.engines.decode import _rows_kv

    gen = torch.Generator().manual_seed(0)
    layers = [SimpleNamespace(keys=torch.randn(3, 2, 9, 4, generator=gen).bfloat16(),
                              values=torch.randn(3, 2, 9, 4, generator=gen).bfloat16()) for _ in range(4)]
    cache = SimpleNamespace(layers=layers)
    for slots in ([2, 3, 4, 5], [1, 2, 6, 7], [8], []):
        idx = torch.tensor(slots, dtype=torch.long)
        got = _rows_kv(cache, 1, idx)
        want = torch.stack([torch.stack([layer.keys[1][:, idx], layer.values[1][:, idx]]) for layer in layers])
        assert got.shape == (4, 2, 2, len(slots), 4) and torch.equal(got, want)
        if slots:
            got.zero_()  # a copy: the cache is untouched
            assert layers[0].keys[1][:, idx].abs().sum() > 0

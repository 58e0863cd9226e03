"""HFEngine's inline mode (forward passes on the event loop's thread) and merged-LoRA sampling."""

from __future__ import annotations

import asyncio
import gc
import threading
import warnings

import pytest
import torch

from rlft.allocator import keep_freed_memory
from rlft.engines.base import SamplingParams, WeightFormat, WeightUpdate
from rlft.engines.hf import HFEngine
from rlft.testing.models import build_tiny_model
from tests.test_hf_engine import PROMPTS, chat, full_forward_logprobs, gather, gather_fresh


def test_inline_engine_runs_forwards_on_the_loop_thread_and_matches_the_threaded_engine(tiny_model):
    model, tok = tiny_model
    prompts = [chat(tok, f"{PROMPTS[i % len(PROMPTS)]} {i}") for i in range(12)]
    params = [SamplingParams(temperature=0.0, max_new_tokens=3 + i) for i in range(12)]
    threads: set[str] = set()
    hook = model.register_forward_pre_hook(lambda *_: threads.add(threading.current_thread().name))
    inline, threaded = HFEngine(model, tok, seed=0, inline=True), HFEngine(model, tok, seed=0)
    try:
        a = gather(inline, prompts, params)
        assert threads == {threading.current_thread().name}  # asyncio.run's loop runs on this thread
        assert inline.stats.max_running > 1 and inline.stats.prefill_batches < len(prompts)
        threads.clear()
        b = gather(threaded, prompts, params)
        assert threads == {"rlft-hf-engine"}
    finally:
        hook.remove()
        inline.close()
        threaded.close()
    assert [s.tokens for s in a] == [s.tokens for s in b]


def test_inline_engine_serves_a_second_event_loop_through_its_worker_thread(tiny_model):
    model, tok = tiny_model
    eng = HFEngine(model, tok, seed=0, inline=True)
    prompt, greedy = chat(tok, PROMPTS[0]), SamplingParams(temperature=0.0, max_new_tokens=6)
    other: list = []

    async def main():
        first = asyncio.ensure_future(eng.generate(prompt, greedy))
        await asyncio.sleep(0)  # the inline driver now belongs to this loop
        t = threading.Thread(target=lambda: other.append(asyncio.run(eng.generate(prompt, greedy))))
        t.start()
        result = await first
        while t.is_alive():
            await asyncio.sleep(0.01)
        return result

    try:
        mine = asyncio.run(main())
    finally:
        eng.close()
    assert other and other[0].tokens == mine.tokens


def test_closing_an_inline_engine_between_loop_runs_finishes_its_driver_cleanly(tiny_model):
    model, tok = tiny_model
    loop = asyncio.new_event_loop()
    eng = HFEngine(model, tok, seed=0, inline=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = loop.run_until_complete(eng.generate(chat(tok, PROMPTS[1]), SamplingParams(max_new_tokens=4)))
        assert eng._inline_task is not None and not eng._inline_task.done()  # idle, waiting for work
        eng.close()
        assert eng._inline_task is None
        loop.close()
        gc.collect()
    assert len(s.tokens) <= 4
    assert not [w for w in caught if "destroyed but it is pending" in str(w.message)]
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(eng.generate(chat(tok, PROMPTS[1]), SamplingParams(max_new_tokens=4)))


def test_merged_lora_engine_samples_the_adapted_policy_and_refreshes_on_sync(tiny_model_dir):
    from rlft.policy import LoraSpec, load_policy

    policy = load_policy(tiny_model_dir, dtype="float32", lora=LoraSpec(rank=4))
    with torch.no_grad():  # non-zero adapters, so that base and adapted policies differ
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    eng = HFEngine.from_policy(policy, seed=0, merge_lora=True)
    try:
        assert eng.weight_format is WeightFormat.MODULE and eng.model is not policy.model
        assert not any("lora" in n for n, _ in eng.model.named_parameters())  # a plain model: no peft layers
        prompt = chat(policy.tokenizer, PROMPTS[0])
        params = SamplingParams(temperature=1.0, max_new_tokens=10, seed=3)
        s = gather(eng, [prompt], params)[0]
        torch.testing.assert_close(torch.tensor(s.logprobs),
                                   full_forward_logprobs(policy.model, prompt, s.tokens, 1.0), atol=2e-4, rtol=1e-4)
        with torch.no_grad():  # an optimizer step on the adapters
            for name, p in policy.model.named_parameters():
                if "lora_B" in name:
                    p.mul_(-1.5)
        stale = gather(eng, [prompt], params)[0]
        assert stale.tokens == s.tokens  # the copy does not change until synced
        eng.sync_weights(WeightUpdate(1))
        fresh = gather(eng, [prompt], params)[0]
        assert fresh.policy_version == 1
        torch.testing.assert_close(torch.tensor(fresh.logprobs),
                                   full_forward_logprobs(policy.model, prompt, fresh.tokens, 1.0), atol=2e-4,
                                   rtol=1e-4)
        with pytest.raises(ValueError, match="cannot sync from another"):
            eng.sync_weights(WeightUpdate(1, model=build_tiny_model(seed=1)[0]))
    finally:
        eng.close()


@pytest.mark.parametrize("targets", [None, ["q_proj", "embed_tokens"]], ids=["all-linear", "with-embedding"])
def test_a_packed_merged_lora_engine_holds_no_weights_of_its_own_but_the_packed_ones_and_samples_the_same(
        tiny_model_dir, targets):
    """bf16 on the CPU: the merged copy's frozen tensors are the policy's, its plain W + BA is
    freed once packed (an adapted embedding stays, merged), and each sync packs W + BA afresh.
    Reference: an engine over a merged copy that keeps its plain weights (the layout before),
    synced from it: the same tokens and logprobs."""
    from rlft.engines.lora_merge import MergedCopy
    from rlft.engines.packed_linear import can_pack
    from rlft.policy import LoraSpec, load_policy

    policy = load_policy(tiny_model_dir, dtype="bfloat16", lora=LoraSpec(rank=4, target_modules=targets))
    if not can_pack(policy.base_model):
        pytest.skip("this CPU's oneDNN has no bf16 kernels: the engine does not pack, so it keeps its weights")
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    eng = HFEngine.from_policy(policy, seed=0, inline=True, merge_lora=True)
    kept = MergedCopy(policy.model)  # plain W + BA, kept
    ref = HFEngine(kept.model, policy.tokenizer, seed=0, inline=True, copy_weights=True)
    prompts = [chat(policy.tokenizer, p) for p in PROMPTS]
    params = [SamplingParams(temperature=1.0, max_new_tokens=8, seed=20 + i) for i in range(len(prompts))]
    try:
        assert eng.fast_forward is not None and eng.fast_forward.packed
        policy_storage = {p.untyped_storage().data_ptr() for p in policy.model.parameters()}
        adapted = {f"{n}.weight" for n in kept._targets}
        held = [(n, p) for n, p in eng.model.named_parameters() if p.device.type != "meta" and n not in adapted]
        assert held and all(p.untyped_storage().data_ptr() in policy_storage for _, p in held), \
            [n for n, p in held if p.untyped_storage().data_ptr() not in policy_storage]
        freed = {n for n, p in eng.model.named_parameters() if p.device.type == "meta"}
        # every adapted linear's weight, nothing else (an adapted embedding stays, merged)
        assert freed and freed == {n for n in adapted if "embed" not in n}
        before = gather(eng, prompts, params)
        assert before == gather(ref, prompts, params)
        with torch.no_grad():  # an optimizer step on the adapters
            for name, p in policy.model.named_parameters():
                if "lora_B" in name or "lora_embedding_B" in name:
                    p.mul_(-1.5)
        eng.sync_weights(WeightUpdate(1))
        kept.refresh()
        ref.sync_weights(WeightUpdate(1, model=kept.model))
        after = gather(eng, prompts, params)
        assert [s.logprobs for s in after] == [s.logprobs for s in gather(ref, prompts, params)]
        assert [s.logprobs for s in after] != [s.logprobs for s in before]
    finally:
        eng.close()
        ref.close()


@pytest.mark.parametrize("tied", [False, True], ids=["own-head", "tied-head"])
def test_a_packed_plain_engine_copy_frees_its_linear_weights_and_syncs_every_parameter_from_the_trainer(tied):
    """A bf16 engine over a float32 full finetune: once the fast forward packs them, the copy's
    linear weights are freed (a head tied to the embedding stays: it is the table); a sync after
    an optimizer step that moves every parameter (embeddings and norms too) samples exactly what
    a new engine over the new weights samples."""
    from rlft.engines.packed_linear import can_pack

    source, tok = build_tiny_model(seed=0)
    if tied:
        source.lm_head.weight = source.model.embed_tokens.weight
    if not can_pack(build_tiny_model(seed=0, dtype=torch.bfloat16)[0]):
        pytest.skip("this CPU's oneDNN has no bf16 kernels: the engine does not pack, so it keeps its weights")
    eng = HFEngine(source, tok, seed=0, inline=True, dtype="bfloat16")
    prompts = [chat(tok, p) for p in PROMPTS]
    params = [SamplingParams(temperature=1.0, max_new_tokens=8, seed=30 + i) for i in range(len(prompts))]
    try:
        assert eng.fast_forward is not None and eng.fast_forward.packed
        freed = {n for n, p in eng.model.named_parameters() if p.device.type == "meta"}
        linears = {f"{n}.weight" for n, m in source.named_modules() if isinstance(m, torch.nn.Linear)}
        assert freed == (linears - {"lm_head.weight"} if tied else linears)
        before = gather(eng, prompts, params)
        with torch.no_grad():  # an optimizer step on every parameter
            for p in source.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
        eng.sync_weights(WeightUpdate(1))
        after = gather(eng, prompts, params)
        expected = gather_fresh(source, tok, prompts, params, dtype="bfloat16")
    finally:
        eng.close()
    assert [s.logprobs for s in after] == [s.logprobs for s in expected]
    assert [s.tokens for s in after] == [s.tokens for s in expected]
    assert [s.logprobs for s in after] != [s.logprobs for s in before]


def test_a_cast_engine_copy_keeps_the_models_float32_buffers():
    """The rotary inv_freq stays float32 in a bf16 copy, as in the trainer's model: rounded to bf16
    it would move every position's angle (a gap between sampled and trained logprobs)."""
    model, tok = build_tiny_model(seed=0)
    eng = HFEngine(model, tok, dtype="bfloat16")
    try:
        assert {p.dtype for p in eng.model.parameters()} == {torch.bfloat16}
        buffers = dict(model.named_buffers())
        assert buffers and all(b.dtype == buffers[n].dtype and torch.equal(b, buffers[n])
                               for n, b in eng.model.named_buffers())
    finally:
        eng.close()


def test_merge_lora_on_a_plain_model_shares_the_model():
    model, tok = build_tiny_model(seed=0)
    eng = HFEngine(model, tok, merge_lora=True)
    try:
        assert eng.model is model and eng.weight_format is WeightFormat.SHARED
    finally:
        eng.close()


def test_keep_freed_memory_applies_on_linux_glibc_and_is_idempotent():
    import platform
    import sys

    first = keep_freed_memory()
    assert keep_freed_memory() is first
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert first is True

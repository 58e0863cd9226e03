"""VLLMEngine: the real thing on a CUDA GPU (skipped elsewhere), and its plumbing on CPU with a stand-in
for the `vllm` package that mirrors the documented shapes (LLM.generate outputs, LoRARequest, sleep/wake)."""

import asyncio
import gc
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from rlft.engines.base import SamplingParams, WeightUpdate

try:
    import vllm  # noqa: F401

    HAVE_VLLM = True
except ImportError:
    HAVE_VLLM = False

gpu = pytest.mark.skipif(not (torch.cuda.is_available() and HAVE_VLLM),
                         reason="the vLLM engine needs a CUDA GPU and the vllm package (not both here)")


# -- on a GPU with vLLM ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpu_tiny(tmp_path_factory):
    from rlft.testing.models import save_tiny_model

    # head_dim 64: vLLM's attention kernels do not take the default tiny model's head_dim of 16
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny", hidden=256, heads=4, kv_heads=2)


def _free(engine):
    engine.close()
    del engine.llm
    gc.collect()
    torch.cuda.empty_cache()


@gpu
def test_vllm_lora_engine_matches_the_trainer_and_follows_pushed_adapters(gpu_tiny, tmp_path):
    from rlft.config import load_config
    from rlft.engines.factory import engine_options
    from rlft.engines.vllm import VLLMEngine
    from rlft.policy import LoraSpec, load_policy
    from rlft.renderer import Renderer
    from rlft.training.sync import WeightSyncError, probe, probe_check, probe_prompt

    policy = load_policy(gpu_tiny, dtype="bfloat16", lora=LoraSpec(rank=8), device="cuda")
    cfg = load_config(overrides=dict(model=gpu_tiny, lora_rank=8, max_seq_len=512, runs_dir=str(tmp_path),
                                     vllm_gpu_memory_utilization=0.25)).resolved()
    eng = VLLMEngine.from_policy(policy, engine_options(cfg).vllm, tag="t")
    pid = probe_prompt(Renderer(policy.tokenizer))
    try:
        assert asyncio.run(probe_check(policy, eng, pid, cfg.sync_tolerance, expected_version=0)) < cfg.sync_tolerance
        with torch.no_grad():
            for n, p in policy.model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
        policy.save(tmp_path / "v1")
        with eng.paused():  # sleeps and wakes
            pass
        with pytest.raises(WeightSyncError, match="mismatched"):  # not pushed yet: the base answers
            asyncio.run(probe_check(policy, eng, pid, cfg.sync_tolerance))
        eng.sync_weights(WeightUpdate(1, adapter_dir=tmp_path / "v1"))
        r = asyncio.run(probe(policy, eng, pid, expected_version=1))
        assert r.engine_version == 1 and r.diff < cfg.sync_tolerance, r
        samples = asyncio.run(asyncio.gather(*(eng.generate(pid, SamplingParams(max_new_tokens=8, seed=s))
                                               for s in range(8))))
        assert all(len(s.tokens) == len(s.logprobs) > 0 and s.policy_version == 1 for s in samples)
        assert eng.stats.sleeps == 1 and eng.stats.adapters_loaded == 1
    finally:
        _free(eng)


@gpu
def test_vllm_full_finetune_weights_load_in_place(gpu_tiny, tmp_path):
    from rlft.config import load_config
    from rlft.engines.factory import engine_options
    from rlft.engines.vllm import VLLMEngine
    from rlft.policy import load_policy
    from rlft.renderer import Renderer
    from rlft.training.sync import probe, probe_prompt

    policy = load_policy(gpu_tiny, dtype="float32", device="cuda")
    cfg = load_config(overrides=dict(model=gpu_tiny, lora=False, dtype="float32", max_seq_len=512,
                                     runs_dir=str(tmp_path), vllm_gpu_memory_utilization=0.25)).resolved()
    eng = VLLMEngine.from_policy(policy, engine_options(cfg).vllm, tag="t", dtype="float32")
    pid = probe_prompt(Renderer(policy.tokenizer))
    try:
        with eng.paused(), torch.no_grad():  # level-2 sleep: weights discarded, then replaced
            for p in policy.model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        with pytest.raises(RuntimeError, match="asleep or its weights were discarded"):
            asyncio.run(eng.generate(pid, SamplingParams(max_new_tokens=4)))
        eng.sync_weights(WeightUpdate(1, model=policy.model))
        r = asyncio.run(probe(policy, eng, pid, expected_version=1))
        assert r.engine_version == 1 and r.diff < 1e-2, r
    finally:
        _free(eng)


# -- plumbing on CPU with a stand-in for vllm ------------------------------------------------------

class FakeLLM:
    """Records what the engine asks of vLLM; answers 3 tokens per request (fewer when max_tokens is)."""

    def __init__(self, **kw):
        self.kw, self.calls, self.events, self.loaded = kw, [], [], []
        self.llm_engine = SimpleNamespace(remove_lora=lambda i: self.events.append(("remove_lora", i)))
        worker_model = SimpleNamespace(load_weights=lambda weights: self.loaded.extend(n for n, _ in weights))
        self.worker = SimpleNamespace(model_runner=SimpleNamespace(model=worker_model))

    def generate(self, prompts, sampling_params=None, lora_request=None, use_tqdm=True):
        self.calls.append((prompts, sampling_params, lora_request))
        outs = []
        for p, sp in zip(prompts, sampling_params):
            toks = [(sum(p["prompt_token_ids"]) + k) % 97 for k in range(min(sp.max_tokens, 3))]
            lps = [{t: SimpleNamespace(logprob=-0.25 * (k + 1), rank=1, decoded_token=None)}
                   for k, t in enumerate(toks)]
            finish = "length" if len(toks) == sp.max_tokens else "stop"
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=toks, logprobs=lps, finish_reason=finish)]))
        return outs

    def sleep(self, level=1):
        self.events.append(("sleep", level))

    def wake_up(self, tags=None):
        self.events.append(("wake", tuple(tags) if tags else None))

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        return [method(self.worker, *args, **(kwargs or {}))]

    def reset_prefix_cache(self):
        self.events.append(("reset_prefix_cache",))


@pytest.fixture
def fake_vllm(monkeypatch):
    class SP:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    class LoRARequest:
        def __init__(self, lora_name, lora_int_id, lora_path):
            self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path

    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams = FakeLLM, SP
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda **kw: dict(kw)  # a TypedDict in vLLM
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest
    for name, m in {"vllm": mod, "vllm.inputs": inputs, "vllm.lora": lora, "vllm.lora.request": request}.items():
        monkeypatch.setitem(sys.modules, name, m)
    return mod


def _engine(**kw):
    from rlft.engines.vllm import VLLMEngine

    return VLLMEngine("some/model", stop_token_ids=[2, 3], batch_wait_s=0.01, tag="run", **kw)


def test_concurrent_requests_share_one_generate_call_with_per_request_params(fake_vllm):
    eng = _engine(lora=True, max_lora_rank=12, gpu_memory_utilization=0.4)
    assert eng.llm.kw["max_lora_rank"] == 16 and eng.llm.kw["enable_lora"] and eng.llm.kw["enable_sleep_mode"]
    assert eng.llm.kw["gpu_memory_utilization"] == 0.4

    async def many():
        return await asyncio.gather(*(eng.generate([i, 1, 2], SamplingParams(max_new_tokens=5, seed=i, top_k=0))
                                      for i in range(6)))

    samples = asyncio.run(many())
    assert len(eng.llm.calls) == 1 and len(eng.llm.calls[0][0]) == 6  # one batch
    prompts, params, lora = eng.llm.calls[0]
    assert prompts[0] == {"prompt_token_ids": [0, 1, 2]} and lora is None
    sp = params[3]
    got = (sp.logprobs, sp.top_k, sp.seed, sp.stop_token_ids, sp.max_tokens, sp.detokenize)
    assert got == (0, -1, 3, [2, 3], 5, False)
    s = samples[4]
    assert s.tokens == [7, 8, 9] and s.logprobs == [-0.25, -0.5, -0.75] and s.finish_reason == "stop"
    assert s.policy_version == 0
    assert asyncio.run(eng.generate([1], SamplingParams(max_new_tokens=3))).finish_reason == "length"
    assert asyncio.run(eng.generate([1], SamplingParams(max_new_tokens=0))).tokens == []
    eng.close()


def test_each_lora_push_is_a_new_adapter_id_and_the_old_one_is_removed(fake_vllm, tmp_path):
    eng = _engine(lora=True)
    for version in (1, 2):
        with eng.paused():
            pass
        eng.sync_weights(WeightUpdate(version, adapter_dir=tmp_path / f"v{version}"))
        s = asyncio.run(eng.generate([5, 6], SamplingParams(max_new_tokens=2, stop=["x"])))
        lora = eng.llm.calls[-1][2]
        assert (lora.lora_name, lora.lora_int_id, s.policy_version) == (f"some/model@run@v{version}", version, version)
        assert lora.lora_path == str(tmp_path / f"v{version}") and eng.llm.calls[-1][1][0].stop == ["x"]
    assert eng.llm.events == [("sleep", 1), ("wake", None), ("sleep", 1), ("wake", None), ("remove_lora", 1)]
    with pytest.raises(ValueError, match="adapter_dir"):
        eng.sync_weights(WeightUpdate(3))
    eng.close()


def test_full_finetune_sleeps_at_level_2_and_loads_weights_in_place(fake_vllm):
    eng = _engine(sleep_level=2)
    model = torch.nn.Linear(2, 2)
    with eng.paused():
        pass
    assert eng.llm.events == [("sleep", 2), ("wake", ("weights",))]
    with pytest.raises(RuntimeError, match="asleep or its weights were discarded"):
        asyncio.run(eng.generate([1, 2], SamplingParams(max_new_tokens=2)))
    eng.sync_weights(WeightUpdate(1, model=model))
    assert eng.llm.loaded == ["weight", "bias"]
    assert eng.llm.events[2:] == [("reset_prefix_cache",), ("wake", ("kv_cache",))]
    assert asyncio.run(eng.generate([1, 2], SamplingParams(max_new_tokens=2))).policy_version == 1
    eng.close()


def test_no_sleep_mode_means_no_sleep_calls(fake_vllm):
    eng = _engine(enable_sleep_mode=False)
    with eng.paused():
        pass
    assert eng.llm.events == [] and eng.llm.kw["enable_sleep_mode"] is False
    eng.close()


def test_helpers():
    from rlft.engines.vllm import lora_rank_for_vllm

    assert [lora_rank_for_vllm(r) for r in (1, 4, 8, 9, 64)] == [1, 8, 8, 16, 64]
    with pytest.raises(ValueError):
        lora_rank_for_vllm(1024)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_from_policy_without_cuda_says_what_to_use(tmp_path):
    from rlft.config import load_config
    from rlft.engines.factory import engine_options
    from rlft.engines.vllm import VLLMEngine

    settings = engine_options(load_config(overrides={"engine": "vllm"}).resolved()).vllm
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        VLLMEngine.from_policy(SimpleNamespace(), settings)

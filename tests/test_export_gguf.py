"""Export from a GGUF base: the merged directory loads and generates with plain transformers."""

import pytest

pytestmark = pytest.mark.slow  # loads and dequantizes SmolLM2 (tens of seconds)


def test_lora_on_gguf_base_exports_a_plain_transformers_model(tmp_path):
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlft.policy import LoraSpec, load_policy

    try:
        policy = load_policy("smollm2", dtype="float32", lora=LoraSpec(rank=4))
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"the demo model is not installed: {e}")
    policy.save(tmp_path / "adapter")
    reloaded = load_policy(str(tmp_path / "adapter"), dtype="float32")  # base from the GGUF file again
    out = reloaded.save(tmp_path / "merged", merged=True)
    model, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4

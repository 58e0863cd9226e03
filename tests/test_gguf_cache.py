"""A GGUF model is converted once: later loads read rlft's converted copy, bit for bit the same.

The GGUF file is a tiny Llama written by ``rlft.testing.gguf`` (float32 tensors, a BPE
vocabulary, a chat template), loaded through ``load_policy`` as the real SmolLM2 file is.
"""

import logging
import os

import pytest
import torch

pytest.importorskip("gguf")

from rlft import gguf_cache
from rlft.policy import load_policy
from rlft.testing.gguf import save_tiny_gguf

TEXTS = ["<|im_start|>user\nwhat is the answer to 12 + 30?<|im_end|>", "the tool call result: {\"a\": 7}"]


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(gguf_cache.DISABLE_ENV, raising=False)
    return tmp_path / "cache" / "gguf"


def entries(cache) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) if cache.exists() else []


def assert_same_policy(a, b, *, config_except: tuple[str, ...] = ()) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    ca, cb = a.model.config.to_dict(), b.model.config.to_dict()
    assert {k: v for k, v in ca.items() if k not in config_except} == {k: v for k, v in cb.items() if k not in config_except}
    assert a.model.name_or_path == b.model.name_or_path
    assert a.model.generation_config.to_dict() == b.model.generation_config.to_dict()
    ta, tb = a.tokenizer, b.tokenizer
    assert ta.chat_template == tb.chat_template and ta.get_vocab() == tb.get_vocab()
    assert (ta.eos_token, ta.pad_token, ta.bos_token) == (tb.eos_token, tb.pad_token, tb.bos_token)
    assert [ta(t)["input_ids"] for t in TEXTS] == [tb(t)["input_ids"] for t in TEXTS]
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert ta.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        tb.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def overwrite_keeping_stat(path) -> None:
    """Zero the file's bytes but keep its size and modification time: only a cache can load it now."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.write(b"\0" * st.st_size)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_second_load_reads_the_converted_copy_and_it_is_the_gguf_load_bit_for_bit(tmp_path, cache, dtype):
    path = save_tiny_gguf(tmp_path / "tiny.gguf")
    first = load_policy(path, dtype=dtype)
    assert first.model.dtype == getattr(torch, dtype)
    assert len(entries(cache)) == 2  # the tokenizer and the model in this dtype
    overwrite_keeping_stat(path)  # the GGUF file is unreadable now: a second load must come from the cache
    second = load_policy(path, dtype=dtype)
    assert_same_policy(first, second)


def test_each_dtype_is_its_own_entry_and_the_tokenizer_is_shared(tmp_path, cache):
    path = save_tiny_gguf(tmp_path / "tiny.gguf")
    load_policy(path, dtype="float32")
    load_policy(path, dtype="bfloat16")
    names = entries(cache)
    assert len(names) == 3 and sum("-tokenizer-" in n for n in names) == 1
    assert sum("-model-torch.float32-" in n for n in names) == sum("-model-torch.bfloat16-" in n for n in names) == 1


def test_a_replaced_gguf_file_is_converted_again_not_served_stale(tmp_path, cache):
    path = save_tiny_gguf(tmp_path / "tiny.gguf", seed=0)
    old = load_policy(path, dtype="float32")
    save_tiny_gguf(tmp_path / "tiny.gguf", seed=1)  # same shapes and size, other weights, a new mtime
    new = load_policy(path, dtype="float32")
    w_old = old.model.model.embed_tokens.weight
    w_new = new.model.model.embed_tokens.weight
    assert not torch.equal(w_old, w_new)
    gguf_load = load_policy(path, dtype="float32")  # the new file's entry, now cached
    assert torch.equal(gguf_load.model.model.embed_tokens.weight, w_new)


def test_a_broken_entry_is_logged_removed_and_rebuilt_from_the_gguf_file(tmp_path, cache, caplog):
    path = save_tiny_gguf(tmp_path / "tiny.gguf")
    good = load_policy(path, dtype="float32")
    (model_entry,) = [cache / n for n in entries(cache) if "-model-" in n]
    weights = model_entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated: a half-written or damaged file
    with caplog.at_level(logging.WARNING, logger="rlft.gguf_cache"):
        again = load_policy(path, dtype="float32")
    assert "did not load" in caplog.text and "converting the GGUF file again" in caplog.text
    assert_same_policy(good, again)
    overwrite_keeping_stat(path)  # the rebuilt entry serves the next load on its own
    assert_same_policy(good, load_policy(path, dtype="float32"))


def test_with_the_cache_off_nothing_is_written_and_the_load_is_the_same(tmp_path, cache, monkeypatch):
    path = save_tiny_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setenv(gguf_cache.DISABLE_ENV, "0")
    off = load_policy(path, dtype="float32")
    assert entries(cache) == []
    monkeypatch.delenv(gguf_cache.DISABLE_ENV)
    # save_pretrained, which a converting load calls, fills in config.architectures (None after a GGUF load)
    on = load_policy(path, dtype="float32")
    assert off.model.config.architectures is None and on.model.config.architectures == ["LlamaForCausalLM"]
    assert_same_policy(off, on, config_except=("architectures",))


def test_an_unwritable_cache_logs_and_loads_from_the_gguf_file(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory would go")
    monkeypatch.setenv("RLFT_CACHE", str(blocker))
    path = save_tiny_gguf(tmp_path / "tiny.gguf")
    with caplog.at_level(logging.WARNING, logger="rlft.gguf_cache"):
        policy = load_policy(path, dtype="float32")
    assert "cannot write the GGUF cache" in caplog.text
    assert policy.tokenizer.chat_template and policy.model.dtype == torch.float32


def test_the_tiny_gguf_loads_to_the_tiny_model_it_was_written_from(tmp_path, cache):
    from rlft.testing.models import build_tiny_model

    model, tokenizer = build_tiny_model(seed=3)
    policy = load_policy(save_tiny_gguf(tmp_path / "tiny.gguf", seed=3), dtype="float32")
    ref = model.state_dict()
    got = policy.model.state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in ref)  # q and k rows un-permuted as transformers does
    assert [policy.tokenizer(t)["input_ids"] for t in TEXTS] == [tokenizer(t)["input_ids"] for t in TEXTS]


def test_doctor_line_names_the_directory_its_entries_and_size_or_that_it_is_off(tmp_path, cache, monkeypatch):
    assert gguf_cache.usage() == f"{cache}: 0 entries, 0.00 GB (delete the directory to reclaim it)"
    load_policy(save_tiny_gguf(tmp_path / "tiny.gguf"), dtype="float32")
    assert gguf_cache.usage().startswith(f"{cache}: 2 entries, ")
    monkeypatch.setenv(gguf_cache.DISABLE_ENV, "0")
    assert gguf_cache.usage() == "turned off (RLFT_GGUF_CACHE=0)"

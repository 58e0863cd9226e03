"""A tiny Llama model written as a GGUF file, for tests of GGUF loading without the real one.

``save_tiny_gguf(path)`` builds :func:`rlft.testing.models.build_tiny_model` and writes it the way
llama.cpp's converter lays out a Llama: float32 tensors under GGUF names (q and k rows permuted
as llama.cpp does, which transformers undoes on load), the model's shape as ``llama.*`` keys and
the tiny byte-level BPE tokenizer as a ``gpt2`` GGUF vocabulary (tokens, types, merges, special
ids, chat template). ``transformers`` loads it back with ``gguf_file=`` to the same weights.

Left out: quantized tensor types (every tensor is F32), other architectures, the tokenizer's
pre-tokenizer rules (a ``gpt2`` GGUF vocabulary names none; the loaded tokenizer gives the tiny
one's ids on the tests' texts, digits included, which is all that was checked).
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["save_tiny_gguf"]

_NAMES = {  # transformers' Llama parameter -> llama.cpp's GGUF tensor name, per layer
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _permute(w: Any, heads: int) -> Any:
    """llama.cpp's q/k row order: each head's two rotary halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def save_tiny_gguf(path: str | os.PathLike, **kwargs: Any) -> str:
    """Write the tiny model (``kwargs`` as for ``build_tiny_model``) to the GGUF file ``path``."""
    import gguf

    from rlft.testing.models import build_tiny_model

    model, tokenizer = build_tiny_model(**kwargs)
    c = model.config
    path = os.fspath(path)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("rlft-tiny")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(float(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]))
    w.add_rope_dimension_count(c.head_dim)
    w.add_vocab_size(c.vocab_size)

    vocab = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    by_id = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    assert [i for _, i in by_id] == list(range(len(by_id))), "token ids must be dense"
    special = set(tokenizer.all_special_tokens)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in by_id])
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t, _ in by_id])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in vocab["merges"]])
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_chat_template(tokenizer.chat_template)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        for hf, name in _NAMES.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if name == "attn_q":
                t = _permute(t, c.num_attention_heads)
            elif name == "attn_k":
                t = _permute(t, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{name}.weight", t)
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

"""Grammar libraries for constrained decoding on SmolLM2's 49k-token vocabulary (docs/serve.md):
llguidance (schema -> matcher, a token mask per step) vs outlines-core (schema -> regex index,
allowed tokens per step), on a 3-field and a nested JSON schema.

    PYTHONPATH=. python benchmarks/bench_constrained.py
"""

import json
import time
from collections import defaultdict

import llguidance
import llguidance.hf
import llguidance.torch as llt
from outlines_core import Guide, Index, Vocabulary
from outlines_core.json_schema import build_regex_from_schema
from transformers import AutoTokenizer

from rlft.model_source import resolve_model

LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
SMALL = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1},
                                          "unit": {"enum": ["c", "f"]}},
         "required": ["city", "days", "unit"], "additionalProperties": False}
ITEM = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "qty": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string"}},
    "dims": {"type": "object", "properties": {"w": {"type": "number"}, "h": {"type": "number"}},
             "required": ["w", "h"]}},
    "required": ["name", "qty"]}
NESTED = {"type": "object", "required": ["items"],
          "properties": {"items": {"type": "array", "items": ITEM}, "note": {"type": ["string", "null"]}}}


def byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE: the printable stand-in character of each byte -> the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def main() -> None:
    name, gguf = resolve_model("smollm2")
    tok = AutoTokenizer.from_pretrained(name, gguf_file=gguf)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok.encode('{"city": "Paris", "days": 3, "unit": "c"}', add_special_tokens=False)

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, eos_token=eos)
    print(f"llguidance: tokenizer {time.perf_counter() - t0:.2f} s (once per engine)")
    mask = llt.allocate_token_bitmask(1, lltok.vocab_size)
    for label, schema in (("3-field", SMALL), ("nested", NESTED)):
        t0 = time.perf_counter()
        m = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=LAYOUT))
        llt.fill_next_token_bitmask(m, mask, 0)
        print(f"llguidance {label}: matcher + first mask {1e3 * (time.perf_counter() - t0):.1f} ms")
    m = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(SMALL, defaults=LAYOUT))
    times = []
    for t in ids + [eos]:
        s = time.perf_counter()
        llt.fill_next_token_bitmask(m, mask, 0)
        times.append(time.perf_counter() - s)
        assert m.consume_token(t), m.get_error()
    print(f"llguidance: mask per token mean {1e6 * sum(times) / len(times):.0f} us, max {1e6 * max(times):.0f} us")

    dec, by_bytes = byte_decoder(), defaultdict(list)
    for s, i in tok.get_vocab().items():
        if i != eos:
            by_bytes[bytes(dec[c] for c in s) if all(c in dec for c in s) else s.encode()].append(i)
    vocab = Vocabulary(eos, dict(by_bytes))
    for label, schema in (("3-field", SMALL), ("nested", NESTED)):
        t0 = time.perf_counter()
        index = Index(build_regex_from_schema(json.dumps(schema)), vocab)
        print(f"outlines-core {label}: index {1e3 * (time.perf_counter() - t0):.0f} ms")
        if schema is SMALL:
            guide, times = Guide(index), []
            for t in ids:
                s = time.perf_counter()
                assert t in guide.get_tokens()
                times.append(time.perf_counter() - s)
                guide.advance(t)
            print(f"outlines-core: allowed tokens per step mean {1e6 * sum(times) / len(times):.0f} us")


if __name__ == "__main__":
    main()

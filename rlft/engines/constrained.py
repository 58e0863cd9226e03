"""Grammar-constrained decoding for HFEngine: a request's sample kept inside a grammar (a JSON
schema, a forced tool call) with llguidance (PyPI ``llguidance``, the ``serve`` extra).

Grammars are llguidance's serialised form, a string carried by ``SamplingParams.grammar``:

- :func:`json_grammar`: a JSON value valid against a JSON schema (``None``: any JSON object),
  what ``response_format`` ``json_object`` / ``json_schema`` asks of ``rlft serve``;
- :func:`tool_call_grammar`: one call (or, ``many``, one or more) of the given tools in the text
  format of the model's tool parser (``rlft.renderer``: Hermes ``<tool_call>{...}</tool_call>``,
  Llama 3 and plain JSON objects, Mistral ``[TOOL_CALLS][...]``), its ``arguments`` valid against
  the tool's parameter schema: ``tool_choice`` "required" or a named function.

JSON is written in one layout (``", "`` and ``": "`` separators, no other whitespace), the one
``json.dumps`` writes, so a model cannot spend its tokens on whitespace.

In the engine (:class:`Grammars`): each constrained request gets a matcher when it is first
sampled (in the engine's thread: building the token trie of a 49k vocabulary takes ~1 s, once per
engine); before each sampling step the matcher's token bitmask sets the disallowed logits of
that row to -inf, and the sampled token advances the matcher. Once the grammar is complete only
the end-of-turn token is allowed. The logprobs (and ``top_logprobs``) of a constrained row are
therefore those of the *masked* distribution: ``log_softmax`` over the allowed tokens. A batch
without constrained requests pays nothing (the decode step checks one flag per row). A reply cut
by ``max_new_tokens`` (or a stop string) is a prefix of a valid one, not a valid one.

Why llguidance (measured in ``benchmarks/constrained_libraries.py``): it compiles a schema
lazily (0.6 ms for a 3-field schema, 1.4 ms for a nested one, vs outlines-core's 59 ms and
1.8 s regex index) and computes a mask in ~0.1 ms per token; it takes Lark grammars with
embedded JSON schemas (the tool-call wrapper) and recursive schemas; it needs no torch of its
own (xgrammar's wheel requires torch and triton).

Left out: constraining other engines (vLLM has its own; remote engines get no grammar), regex
and free-form grammars from the API, and speculative/jump-forward decoding of forced text.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["GrammarError", "Grammars", "check_grammar", "json_grammar", "tool_call_grammar"]

# one JSON layout, json.dumps's: no whitespace to loop on, and what the renderer writes for calls
_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# how each tool parser of rlft.renderer reads a call: (text before, arguments key, text after)
_CALL_FORMATS = {
    "hermes": ("<tool_call>", "arguments", "</tool_call>"),
    "json": ("", "arguments", ""),
    "llama3": ("", "parameters", ""),
    "mistral": ("[TOOL_CALLS][", "arguments", "]"),
}


class GrammarError(ValueError):
    """A grammar (a JSON schema, a tool's parameters) that llguidance cannot compile."""


def _llguidance():
    try:
        import llguidance
    except ImportError as e:  # pragma: no cover - the serve extra installs it
        raise GrammarError("constrained decoding needs llguidance: pip install 'rlft[serve]'") from e
    return llguidance


def json_grammar(schema: dict[str, Any] | None) -> str:
    """A grammar for a JSON value valid against ``schema`` (None: any JSON object)."""
    ll = _llguidance()
    schema = {"type": "object"} if schema is None else schema
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be an object, not {type(schema).__name__}")
    return check_grammar(ll.LLMatcher.grammar_from_json_schema(schema, defaults=_LAYOUT))


def tool_call_grammar(tools: list[dict[str, Any]], parser: str, *, many: bool = False) -> str:
    """A grammar for a call of one of ``tools`` (OpenAI tool dicts) in ``parser``'s text format
    (``many``: one or more calls, one per line, where the format has several; else exactly one)."""
    ll = _llguidance()
    if parser not in _CALL_FORMATS:
        raise GrammarError(f"no constrained tool-call format for the {parser!r} tool parser")
    before, args_key, after = _CALL_FORMATS[parser]
    rules = []
    for k, t in enumerate(tools):
        fn = t["function"]
        params = fn.get("parameters") or {"type": "object"}
        call = {"type": "object", "properties": {"name": {"const": fn["name"]}, args_key: params},
                "required": ["name", args_key], "additionalProperties": False, "x-guidance": _LAYOUT}
        rules.append(f"call_{k}: %json {json.dumps(call)}")
    one = f"{json.dumps(before) if before else ''} ({' | '.join(f'call_{k}' for k in range(len(tools)))}) " \
          f"{json.dumps(after) if after else ''}"
    repeat = ' ("\\n" call)*' if many and parser == "hermes" else ""
    lark = f"start: call{repeat}\ncall: {one}\n" + "\n".join(rules) + "\n"
    return check_grammar(ll.LLMatcher.grammar_from_lark(lark))


def check_grammar(grammar: str) -> str:
    """``grammar`` if llguidance compiles it; else :class:`GrammarError` with its message."""
    error = _llguidance().LLMatcher.validate_grammar(grammar)
    if error:
        raise GrammarError(f"invalid grammar: {error}")
    return grammar


class _Matcher:
    """One request's position in its grammar."""

    def __init__(self, matcher: Any):
        self.matcher = matcher

    @property
    def done(self) -> bool:
        """The grammar is complete and has ended (its end-of-turn token was sampled), or it failed."""
        return self.matcher.is_stopped() or self.matcher.is_error()

    def advance(self, token: int) -> None:
        self.matcher.consume_token(token)  # a masked sample is always allowed; an error shows in ``done``


class Grammars:
    """The grammar side of one engine: its llguidance tokenizer (built on first use, once) and a
    matcher per constrained request (``req.params.grammar`` set; ``req.grammar`` holds it).
    ``vocab_size``: the logits' width; ``stop_ids``: the engine's end-of-turn ids. A complete grammar
    allows the tokenizer's eos alone when it is one of them (the chat's end of turn, which the
    renderer strips; not a document end like ``<|endoftext|>`` that would show in the reply)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Iterable[int]):
        stop_ids = sorted(stop_ids)
        eos = getattr(tokenizer, "eos_token_id", None)
        self.tokenizer, self.vocab_size = tokenizer, int(vocab_size)
        self.eos_ids = [eos] if eos in stop_ids else stop_ids
        self._ll_tokenizer: Any = None
        self._lock = threading.Lock()

    def ll_tokenizer(self) -> Any:
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance.hf

                self._ll_tokenizer = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size,
                                                                  eos_token=self.eos_ids or None)
            return self._ll_tokenizer

    def mask(self, reqs: list[Any], logits_BV: torch.Tensor) -> torch.Tensor:
        """``logits_BV`` with each constrained row's disallowed tokens at -inf (in place)."""
        import llguidance
        import llguidance.torch as llt

        rows = [i for i, r in enumerate(reqs) if r.params.grammar]
        bitmask_RW = llt.allocate_token_bitmask(len(rows), self.vocab_size)  # int32, 32 tokens a word
        failed = []
        for k, i in enumerate(rows):
            r = reqs[i]
            if r.grammar is None:
                r.grammar = _Matcher(llguidance.LLMatcher(self.ll_tokenizer(), r.params.grammar))
            if r.grammar.matcher.is_error():  # not with masked samples; end the turn rather than sample from NaN
                failed.append(k)
            else:
                llt.fill_next_token_bitmask(r.grammar.matcher, bitmask_RW, k)
        # unpack the bits (no torch.compile'd kernel: llguidance's compiles on first use, seconds on a CPU)
        shifts = torch.arange(32, dtype=torch.int32)
        allowed_RV = ((bitmask_RW[:, :, None] >> shifts) & 1).bool().flatten(1)[:, :self.vocab_size]
        for k in failed:
            allowed_RV[k] = False
            allowed_RV[k, self.eos_ids] = True
        width = logits_BV.shape[1]
        if allowed_RV.shape[1] < width:  # logits past the tokenizer's ids: never allowed
            allowed_RV = torch.cat([allowed_RV, allowed_RV.new_zeros(len(rows), width - allowed_RV.shape[1])], 1)
        index = torch.tensor(rows, dtype=torch.long, device=logits_BV.device)
        allowed_RV = allowed_RV[:, :width].to(logits_BV.device)
        sub = logits_BV.index_select(0, index).masked_fill_(~allowed_RV, float("-inf"))
        return logits_BV.index_copy_(0, index, sub)

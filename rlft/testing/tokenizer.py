"""Tiny, self-built tokenizers (and, in ``rlft.testing``, models) for tests and offline work.

No hub downloads: the tokenizer is a byte-level BPE trained in about a second with
``tokenizers`` on a synthetic corpus, wrapped as a ``PreTrainedTokenizerFast`` with a ChatML
chat template that supports ``tools=`` the way Hermes/Qwen templates do (schemas in the system
turn, calls as ``<tool_call>{json}</tool_call>``, results as ``tool`` turns). Deterministic: the
same call gives the same vocabulary on every machine.
"""

from __future__ import annotations

import random

CHATML_TOOLS_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\nYou may call functions. Signatures:\\n<tools>' }}"
    "{%- for t in tools %}{{- '\\n' + (t | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\nCall one with <tool_call>{\"name\": NAME, \"arguments\": {...}}</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if not (loop.first and m['role'] == 'system') %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' }}"
    "{%- if m['content'] %}{{- m['content'] }}{%- endif %}"
    "{%- if m['tool_calls'] is defined and m['tool_calls'] %}"
    "{%- for tc in m['tool_calls'] %}"
    "{{- '<tool_call>{\"name\": \"' + tc['function']['name'] + '\", \"arguments\": ' "
    "+ (tc['function']['arguments'] | tojson) + '}</tool_call>' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

_WORDS = ["the", "a", "an", "is", "are", "what", "which", "answer", "question", "tool", "call", "result", "search",
          "read", "doc", "number", "sum", "add", "plus", "minus", "times", "of", "to", "in", "on", "for", "with",
          "and", "or", "not", "yes", "no", "true", "false", "name", "value", "city", "country", "capital",
          "population", "year", "price", "total", "count", "json", "sql", "select", "from", "where", "order", "by",
          "limit", "system", "user", "assistant", "function", "arguments", "query", "id", "text", "hello", "world",
          "please", "give", "return", "word", "words", "poem", "line", "lines", "short", "long", "format", "only",
          "reply", "final", "compute", "calculate"]


def _corpus(seed: int, n: int = 4000) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        k = rng.randint(3, 12)
        words = [rng.choice(_WORDS) for _ in range(k)]
        words.insert(rng.randint(0, k), str(rng.randint(0, 999)))
        s = " ".join(words)
        if rng.random() < 0.3:
            s = '{"name": "%s", "arguments": {"x": %d}}' % (rng.choice(_WORDS), rng.randint(0, 99))
        if rng.random() < 0.2:
            s = "<tool_call>" + s + "</tool_call>"
        lines.append(s)
    return lines


def build_tiny_tokenizer(vocab_size: int = 512, seed: int = 0):
    """A byte-level BPE tokenizer with ChatML special tokens and a tool-aware chat template.

    Digits are split one per token so that arithmetic tasks stay learnable by tiny models.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
    )
    fast.chat_template = CHATML_TOOLS_TEMPLATE
    return fast

"""Which token ids end a turn, and which one pads: read from the tokenizer and generation config.

Engines stop a sample at an end-of-turn token; chat formats disagree on its name, so the tokenizer's
eos, the generation config's eos ids and the common markers in the vocabulary all count. Left out:
stop strings (the engines match those on decoded text).
"""

from __future__ import annotations

from typing import Any

__all__ = ["end_of_turn_ids", "pad_id"]

# end-of-turn / end-of-text markers of common chat formats, used when present in the vocabulary
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<|end|>",
                       "<|eom_id|>")


def end_of_turn_ids(tokenizer: Any, model: Any = None) -> set[int]:
    """Token ids that end a turn: the tokenizer's eos, the generation config's eos ids, and
    ``<|im_end|>`` (and the other common end-of-turn markers) when in the vocabulary."""
    ids: set[int] = set()

    def add(x: Any) -> None:
        if x is None:
            return
        if isinstance(x, (list, tuple, set)):
            for y in x:
                add(y)
        else:
            ids.add(int(x))

    add(getattr(tokenizer, "eos_token_id", None))
    gen = getattr(model, "generation_config", None) if model is not None else None
    if gen is not None:
        add(getattr(gen, "eos_token_id", None))
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    for tok in _END_OF_TURN_TOKENS:
        if tok in vocab:
            ids.add(int(vocab[tok]))
    if not ids:
        raise ValueError("The tokenizer has no eos token and no known end-of-turn token: pass stop_token_ids=.")
    return ids


def pad_id(tokenizer: Any) -> int:
    """The id that pads batches (never attended to): the pad token, else eos, else 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return 0

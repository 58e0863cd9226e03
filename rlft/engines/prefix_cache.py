"""Reusing KV across requests: finished sequences' KV kept under their token ids, within a budget.

A multi-turn rollout sends its whole conversation at every turn (prompt, earlier turns, tool
results), and without this the engine prefills all of it again. Here, when a sequence leaves the
running batch (finished with "stop" or "length"), HFEngine keeps its KV rows: the prompt and the
generated tokens but the last (sampled, never fed), under those token ids. A new request whose
ids share a prefix with a kept sequence starts from a copy of that prefix's KV and prefills only
the rest (``rlft.engines.decode``): the next turn of the same rollout prefills the tool result and
the next assistant header, not the conversation. Matching is by longest common prefix, not whole
entries, so a rollout's turn also matches the prompt part of a sibling's kept sequence (the G
rollouts of a group share their prompt's KV at every turn, not only when admitted together).

Storage: a prefix's KV is a list of *parts*, each one tensor ``[layers, 2 (K, V), H_kv, n, D]``
and how many of its tokens it uses. A kept sequence holds, by reference, the parts its prompt
started from (a reused prefix, the prefix shared by the prompts prefilled with it), a part for
the rest of its prompt (made at its prefill, one per distinct prompt) and a part for its fed
tokens, so the G rollouts of a group hold their prompt's KV once, not G times. The budget counts
the bytes of the distinct parts the entries hold; the least recently used entries go first.
Keeping a sequence drops the entries it extends (a kept sequence whose ids are a prefix of the
new one): the new entry matches everything they matched.

Invalidation: the KV was computed by one version of the weights. The engine clears the cache in
``sync_weights`` and in ``paused()`` (where a shared module's weights change), and a sequence
admitted before a clear is not kept after it (``epoch``). The training loop also clears it after
each held-out eval (``clear_prefix_cache``), so that the next step does not start from the eval's
KV and the eval schedule leaves the training run's tokens as they were.

Left out: paged / block-level sharing (two sequences built separately that happen to share
tokens hold two copies; sharing follows how a sequence was built); the parts a running request
still uses after its entry was evicted are not counted against the budget until it finishes;
keeping costs a copy of each prompt's KV at its prefill and of each sequence's sampled tokens'
KV when it ends (~23 KB per token for SmolLM2 in bf16), needed or not (the engine cannot know
whether a next turn will come); reuse across engines, processes or restarts. Reused KV was
computed one token at a time in decode steps, where a fresh prefill computes it in one pass: in
float32 the tests find the same tokens and logprobs within 1e-4; in bf16 a logit can move by an
ulp (as batching already can, ``rlft.engines.hf``), and a seeded sample then continues
differently at a near-tie.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

__all__ = ["Prefix", "PrefixCache", "prefix_length", "truncate"]

# the KV of a run of tokens: (part [layers, 2, H_kv, n, D], tokens used from its start) in order
Prefix = list[tuple[torch.Tensor, int]]


def prefix_length(parts: Prefix) -> int:
    return sum(used for _, used in parts)


def truncate(parts: Prefix, n: int) -> Prefix:
    """The first ``n`` tokens of ``parts`` (the parts themselves, shared, not copied)."""
    out: Prefix = []
    for part, used in parts:
        if n <= 0:
            break
        out.append((part, min(used, n)))
        n -= used
    return out


@dataclass
class _Entry:
    ids: torch.Tensor  # [n] long: the tokens whose KV ``parts`` hold
    parts: Prefix


class PrefixCache:
    """Kept sequences, least recently used first; at most ``budget_bytes`` of distinct parts
    (0 = keep nothing). ``min_match``: shortest common prefix worth reusing (tokens)."""

    def __init__(self, budget_bytes: int, min_match: int = 1):
        self.budget_bytes = max(0, int(budget_bytes))
        self.min_match = max(1, int(min_match))
        self.epoch = 0  # moves at each clear: sequences admitted before it are not kept
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next = 0
        self._refs: dict[int, tuple[torch.Tensor, int]] = {}  # id(part) -> (part, entries holding it)
        self.nbytes = 0  # bytes of the distinct parts held

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._refs.clear()
        self.nbytes = 0
        self.epoch += 1

    def lookup(self, ids: list[int], limit: int) -> tuple[int, Prefix]:
        """The longest prefix of ``ids``, at most ``limit`` tokens, whose KV is kept: its length
        and parts (``(0, [])`` when none reaches ``min_match``)."""
        limit = min(limit, len(ids))
        if not self._entries or limit < self.min_match:
            return 0, []
        query = torch.tensor(ids[:limit], dtype=torch.long)
        best, best_key = 0, None
        for key, entry in self._entries.items():
            n = min(limit, entry.ids.numel())
            if n <= best:
                continue
            same = entry.ids[:n] == query[:n]
            common = n if bool(same.all()) else int(same.logical_not().long().argmax())
            if common > best:
                best, best_key = common, key
        if best < self.min_match or best_key is None:
            return 0, []
        self._entries.move_to_end(best_key)
        return best, truncate(self._entries[best_key].parts, best)

    def insert(self, ids: list[int], parts: Prefix) -> None:
        """Keep ``parts`` (the KV of ``ids``); drops the entries it extends, then the least recently
        used until the budget holds. A sequence larger than the whole budget is not kept."""
        if not self.enabled or not ids:
            return
        assert prefix_length(parts) == len(ids), (prefix_length(parts), len(ids))
        key_ids = torch.tensor(ids, dtype=torch.long)
        for key in [k for k, e in self._entries.items()
                    if e.ids.numel() <= key_ids.numel() and torch.equal(e.ids, key_ids[:e.ids.numel()])]:
            self._drop(key)
        self._entries[self._next] = _Entry(key_ids, list(parts))
        self._next += 1
        for part, _ in parts:
            held, count = self._refs.get(id(part), (part, 0))
            if count == 0:
                self.nbytes += part.numel() * part.element_size()
            self._refs[id(part)] = (held, count + 1)
        while self.nbytes > self.budget_bytes and self._entries:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: int) -> None:
        for part, _ in self._entries.pop(key).parts:
            held, count = self._refs[id(part)]
            if count == 1:
                del self._refs[id(part)]
                self.nbytes -= part.numel() * part.element_size()
            else:
                self._refs[id(part)] = (held, count - 1)

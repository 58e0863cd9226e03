"""The batched, KV-cached decode under HFEngine: prefill, one decode step, sampling, batch surgery.

The decode loop is written by hand (``model.generate`` is not used): a left-padded prefill with
an attention mask and explicit position ids, then one token per step for the whole batch through
the model's ``forward`` with a KV cache whose buffers grow in chunks (no per-step concatenation
of the whole cache, ``rlft.engines.kv_cache``), then sampling on the last-position logits in
float32 (``rlft.engines.sampling``). Prompts admitted together are deduplicated (the G rollouts
of a GRPO group prefill once) and a prefix common to all of them (system prompt, tool schemas)
is prefilled once and shared by their cache rows. A prompt that extends a finished sequence
(the next turn of a multi-turn rollout) starts from that sequence's kept KV and prefills only
the rest (``rlft.engines.prefix_cache``). A sequence that finishes (end-of-turn token, stop
string, ``max_new_tokens``, the context) has its KV kept in the prefix cache (``_keep``), is
delivered at once and its cache rows dropped (``_compact``); newly prefilled requests join the
running batch (``_merge``).

Left out: the engine itself (``hf.py``: construction, weights, the public API, request checks)
and request queueing and the scheduling loop that calls ``_admit`` and ``_step``
(``scheduler.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlft.engines.kv_cache import SPARE_SLOTS, EngineCache
from rlft.engines.prefix_cache import Prefix, truncate
from rlft.engines.sampling import sample_tokens, top_logprobs
from rlft.engines.scheduler import _Request

__all__ = ["BatchedDecode"]


@dataclass
class _Batch:
    """The running batch: one row per unfinished request, all right-aligned in the cache."""

    reqs: list[_Request]
    cache: Any
    mask: torch.Tensor  # [B, L] bool: which cache slots are real tokens
    positions: torch.Tensor  # [B] long: position id of the next input token
    last: torch.Tensor  # [B] long: the last sampled token (next input)
    temperature: torch.Tensor  # [B] float
    top_p: torch.Tensor  # [B] float
    top_k: torch.Tensor  # [B] long


class BatchedDecode:
    """The model work of :class:`rlft.engines.hf.HFEngine`: ``_admit`` (prefill new requests into
    the running batch) and ``_step`` (decode one token for every running sequence), which the
    :class:`~rlft.engines.scheduler.Scheduler` loop calls. HFEngine supplies ``model``,
    ``tokenizer``, ``device``, ``num_layers``, ``pad_id``, ``stop_token_ids``, ``max_context``,
    ``max_prefill_tokens``, ``min_shared_prefix``, ``policy_version``, ``stats``, ``grammars``,
    ``prefix_cache``, ``_rng``, ``_cache_kw``/``_logits_kw`` (set in its ``__init__``) and, from the
    Scheduler, ``_deliver`` and ``_sample_of``."""

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any) -> torch.Tensor:
        if self.fast_forward is not None:  # HFEngine's lean forward of its own copy (rlft.engines.fast_forward)
            return self.fast_forward(ids, mask, pos, cache)
        kw: dict[str, Any] = {self._cache_kw: cache, "use_cache": True}
        if self._logits_kw == "logits_to_keep":
            # an index, not the int 1: the int slices a strided view, and the head over it made
            # torch copy the (V, H) head weight once per row (most of a 64-prompt prefill)
            kw[self._logits_kw] = torch.tensor([ids.shape[1] - 1], device=ids.device)
        elif self._logits_kw:
            kw[self._logits_kw] = 1
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, **kw)
        return out.logits[:, -1, :]

    def _admit(self, batch: _Batch | None, reqs: list[_Request]) -> _Batch | None:
        # prefill in chunks of at most max_prefill_tokens padded tokens, shortest prompts together
        reqs = sorted(reqs, key=lambda r: len(r.prompt))
        chunk: list[_Request] = []
        for r in reqs + [None]:  # type: ignore[list-item]
            if r is not None and (not chunk or (len(chunk) + 1) * len(r.prompt) <= self.max_prefill_tokens):
                chunk.append(r)
                continue
            if chunk:
                new = self._prefill(chunk)
                batch = new if batch is None else self._merge(batch, new)
                batch = self._compact(batch)
            chunk = [r] if r is not None else []
        return batch

    def _prefill(self, reqs: list[_Request]) -> _Batch:
        dev = self.device
        # identical prompts (the G rollouts of one GRPO group) are prefilled once, then their
        # cache rows are repeated: each row still samples with its own random draws
        unique: dict[tuple[int, ...], int] = {}
        rows = [unique.setdefault(tuple(r.prompt), len(unique)) for r in reqs]
        prompts = [list(p) for p in unique]
        n = len(prompts)
        # each prompt starts from the longest prefix whose KV is kept (an earlier turn of the same
        # rollout, a sibling's; rlft.engines.prefix_cache), keeping >= 1 token of its own to run
        starts = [self.prefix_cache.lookup(p, len(p) - 1) for p in prompts]
        self.stats.reused_tokens += sum(m for m, _ in starts)
        # a prefix shared by all prompts (system prompt, tool schemas) is prefilled once too
        shared = _common_prefix_len(prompts) if n > 1 else 0
        shared = min(shared, min(len(p) for p in prompts) - 1)  # every row keeps >= 1 token of its own
        if shared >= self.min_shared_prefix and any(m < shared for m, _ in starts):
            common = self._prefill_prefix(prompts[0][:shared], max(starts, key=lambda s: s[0]))
            self.stats.reused_tokens -= sum(m for m, _ in starts if m < shared)  # replaced by the shared prefix
            starts = [s if s[0] >= shared else (shared, common) for s in starts]
        lengths = [m for m, _ in starts]
        width = max(len(p) - m for p, m in zip(prompts, lengths))
        cache, prefix_mask = self._cache_from([parts for _, parts in starts], lengths, room=width)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.bool)
        for i, (p, m) in enumerate(zip(prompts, lengths)):
            ids[i, width - len(p) + m:] = torch.tensor(p[m:], dtype=torch.long)
            mask[i, width - len(p) + m:] = True
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.long().cumsum(-1) - 1).clamp_(min=0) + torch.tensor(lengths, dtype=torch.long, device=dev)[:, None]
        self.stats.prefill_tokens += int(mask.sum())
        # cache layout per row: [padding | reused prefix | padding | own suffix]
        mask = torch.cat([prefix_mask, mask], dim=1)
        logits = self._forward(ids, mask, pos, cache)
        self.stats.prefill_batches += 1
        if self.prefix_cache.enabled:  # each prompt's own KV as a part, which the G rows of a group share
            for i, (p, m) in enumerate(zip(prompts, lengths)):
                own = mask[i].nonzero().squeeze(1)[m:]
                starts[i] = (len(p), starts[i][1] + [(_rows_kv(cache, i, own), len(p) - m)])
            lengths = [len(p) for p in prompts]
        if n < len(reqs):
            index = torch.tensor(rows, dtype=torch.long, device=dev)
            for layer in cache.layers:
                layer.select(index)
            logits, mask = logits[index], mask[index]
        for r, row in zip(reqs, rows):  # what the row's KV starts from, to keep it by reference when it ends
            r.kv_prefix, r.kv_prefix_len, r.kv_epoch = starts[row][1], lengths[row], self.prefix_cache.epoch
        n = len(reqs)
        batch = _Batch(
            reqs=list(reqs), cache=cache, mask=mask,
            positions=torch.tensor([len(r.prompt) for r in reqs], dtype=torch.long, device=dev),
            last=torch.zeros(n, dtype=torch.long, device=dev),
            temperature=torch.tensor([float(r.params.temperature) for r in reqs], device=dev),
            top_p=torch.tensor([float(r.params.top_p) for r in reqs], device=dev),
            top_k=torch.tensor([int(r.params.top_k) for r in reqs], dtype=torch.long, device=dev),
        )
        for r in reqs:
            r.policy_version = self.policy_version
        batch.last = self._sample(batch, logits)
        return batch

    def _prefill_prefix(self, ids: list[int], start: tuple[int, Prefix]) -> Prefix:
        """The KV of ``ids`` (one row, no sampling), run from ``start`` (a kept prefix of them,
        possibly longer: it is cut to ``ids``) on."""
        m = min(start[0], len(ids))
        base = truncate(start[1], m)
        if m == len(ids):
            return base
        cache, prefix_mask = self._cache_from([base], [m], room=len(ids) - m)
        dev = self.device
        rest = torch.tensor([ids[m:]], dtype=torch.long, device=dev)
        mask = torch.cat([prefix_mask, torch.ones((1, len(ids) - m), dtype=torch.bool, device=dev)], dim=1)
        self._forward(rest, mask, torch.arange(m, len(ids), device=dev)[None], cache)
        self.stats.prefill_tokens += len(ids) - m
        self.stats.reused_tokens += m
        return base + [(_rows_kv(cache, 0, torch.arange(m, len(ids), device=dev)), len(ids) - m)]

    def _cache_from(self, prefixes: list[Prefix], lengths: list[int], room: int) -> tuple[Any, torch.Tensor]:
        """A cache whose row ``i`` holds ``prefixes[i]`` (``lengths[i]`` tokens) right-aligned in its
        first ``max(lengths)`` slots, with room for ``room`` more; and the mask of those slots."""
        n, width = len(prefixes), max(lengths)
        cache = EngineCache(self.num_layers)
        mask = torch.zeros((n, width), dtype=torch.bool, device=self.device)
        if width == 0:
            return cache, mask
        first = next(part for parts in prefixes for part, _ in parts)
        layers, _, heads, _, dim = first.shape
        # one buffer for all layers, filled by one copy per (row, part); each layer views its slice
        buf = first.new_zeros((layers, 2, n, heads, width + room + SPARE_SLOTS, dim))
        for i, parts in enumerate(prefixes):
            at = width - lengths[i]
            mask[i, at:] = True
            for part, used in parts:
                buf[:, :, i, :, at:at + used] = part[:, :, :, :used]
                at += used
        for k, layer in enumerate(cache.layers):
            layer.preload(buf[k, 0], buf[k, 1], width)
        return cache, mask

    def _keep(self, batch: _Batch, i: int) -> None:
        """Row ``i`` finished: keep its KV in the prefix cache (the parts it started from, by
        reference, and a copy of the rest of its rows)."""
        r = batch.reqs[i]
        slots = batch.mask[i].nonzero().squeeze(1)  # its tokens' slots, in order
        # the last sampled token was never fed: its KV does not exist
        assert slots.numel() == len(r.prompt) + len(r.tokens) - 1, (slots.numel(), len(r.prompt), len(r.tokens))
        own = slots[r.kv_prefix_len:]
        parts = list(r.kv_prefix)
        if own.numel():
            parts.append((_rows_kv(batch.cache, i, own), int(own.numel())))
        self.prefix_cache.insert((r.prompt + r.tokens)[:slots.numel()], parts)

    def _step(self, batch: _Batch) -> _Batch | None:
        n = len(batch.reqs)
        self.stats.max_running = max(self.stats.max_running, n)
        mask = torch.cat([batch.mask, torch.ones((n, 1), dtype=torch.bool, device=batch.mask.device)], dim=1)
        logits = self._forward(batch.last[:, None], mask, batch.positions[:, None], batch.cache)
        self.stats.decode_steps += 1
        batch.mask = mask
        batch.positions = batch.positions + 1
        batch.last = self._sample(batch, logits)
        return self._compact(batch)

    def _sample(self, batch: _Batch, logits: torch.Tensor) -> torch.Tensor:
        n = len(batch.reqs)
        uniform = torch.rand(n, generator=self._rng)
        constrained = False
        for i, r in enumerate(batch.reqs):
            if r.generator is not None:
                uniform[i] = torch.rand(1, generator=r.generator)[0]
            constrained |= r.params.grammar is not None
        if constrained:  # grammar-constrained rows: disallowed tokens at -inf (rlft.engines.constrained)
            logits = self.grammars.mask(batch.reqs, logits)
        tokens, logprobs = sample_tokens(logits, batch.temperature, batch.top_p, batch.top_k,
                                         uniform.to(logits.device))
        tok_list, lp_list = tokens.tolist(), logprobs.tolist()
        self._note_top_logprobs(batch, logits)
        for i, (r, t, lp) in enumerate(zip(batch.reqs, tok_list, lp_list)):
            r.tokens.append(t)
            r.logprobs.append(lp)
            if r.grammar is not None:
                r.grammar.advance(t)
            self._check_finished(r, t)
            if r.finish is not None and r.finish != "cancelled":
                # its KV kept before it is delivered: a next turn submitted at once finds it
                if self.prefix_cache.enabled and r.kv_epoch == self.prefix_cache.epoch:
                    self._keep(batch, i)
                self._deliver(r, result=self._sample_of(r))
        self.stats.tokens_generated += n
        return tokens

    def _note_top_logprobs(self, batch: _Batch, logits: torch.Tensor) -> None:
        """Requests with ``top_logprobs = k``: the k most likely (id, logprob) of this position (one
        top-k over the batch at the largest k asked; nothing computed when nobody asked)."""
        k = max(r.params.top_logprobs for r in batch.reqs)
        if k <= 0:
            return
        vals_BK, ids_BK = top_logprobs(logits, batch.temperature, k)
        for r, vals, ids in zip(batch.reqs, vals_BK.tolist(), ids_BK.tolist()):
            if r.params.top_logprobs > 0:
                r.top.append(list(zip(ids, vals))[:r.params.top_logprobs])

    def _check_finished(self, r: _Request, token: int) -> None:
        if r.cancelled:
            r.finish = "cancelled"
        elif token in self.stop_token_ids or (r.stop_window and self._hits_stop(r)) or (
                r.grammar is not None and r.grammar.done):
            r.finish = "stop"
        elif len(r.tokens) >= r.params.max_new_tokens or (
                self.max_context is not None and len(r.prompt) + len(r.tokens) >= self.max_context):
            r.finish = "length"

    def _hits_stop(self, r: _Request) -> bool:
        # a stop string of N bytes spans at most N tokens; decode a window of the latest tokens
        text = self.tokenizer.decode(r.tokens[-r.stop_window:], skip_special_tokens=False)
        return any(s and s in text for s in r.params.stop)

    def _compact(self, batch: _Batch) -> _Batch | None:
        alive = [i for i, r in enumerate(batch.reqs) if r.finish is None and not r.cancelled]
        if not alive:
            return None
        if len(alive) < len(batch.reqs):
            rows = torch.tensor(alive, dtype=torch.long, device=batch.mask.device)
            for layer in batch.cache.layers:
                layer.select(rows)
            batch.reqs = [batch.reqs[i] for i in alive]
            batch.mask = batch.mask[rows]
            batch.positions, batch.last = batch.positions[rows], batch.last[rows]
            batch.temperature, batch.top_p, batch.top_k = batch.temperature[rows], batch.top_p[rows], batch.top_k[rows]
            # drop leading slots that are padding for every remaining row
            first = int(batch.mask.any(0).long().argmax())
            if first > 0:
                for layer in batch.cache.layers:
                    layer.trim_left(first)
                batch.mask = batch.mask[:, first:]
        return batch

    def _merge(self, a: _Batch, b: _Batch) -> _Batch:
        la, lb = a.mask.shape[1], b.mask.shape[1]
        width = max(la, lb)
        for x, y in zip(a.cache.layers, b.cache.layers):
            x.merged_with(y)

        def pad(m: torch.Tensor) -> torch.Tensor:
            if m.shape[1] == width:
                return m
            return torch.cat([torch.zeros((m.shape[0], width - m.shape[1]), dtype=m.dtype, device=m.device), m], 1)

        a.mask = torch.cat([pad(a.mask), pad(b.mask)], 0)
        a.reqs = a.reqs + b.reqs
        a.positions = torch.cat([a.positions, b.positions])
        a.last = torch.cat([a.last, b.last])
        a.temperature = torch.cat([a.temperature, b.temperature])
        a.top_p = torch.cat([a.top_p, b.top_p])
        a.top_k = torch.cat([a.top_k, b.top_k])
        return a


def _rows_kv(cache: Any, row: int, slots: torch.Tensor) -> torch.Tensor:
    """A copy of ``row``'s K and V at cache ``slots``, all layers: ``[layers, 2, H_kv, len(slots), D]``.
    One copy per tensor into the result (indexing then stacking copied everything twice, ~2.5 ms a
    finished SmolLM2 row at batch 64); a row's slots are one range unless a batch merge padded
    between its parts, and a range is a slice."""
    first = cache.layers[0]
    n = int(slots.numel())
    out = first.keys.new_empty(len(cache.layers), 2, first.keys.shape[1], n, first.keys.shape[3])
    if n == 0:
        return out
    lo, hi = int(slots[0]), int(slots[-1]) + 1
    ranged = hi - lo == n and bool((slots[1:] > slots[:-1]).all())
    for layer, out_l in zip(cache.layers, out):
        for src, dst in ((layer.keys[row], out_l[0]), (layer.values[row], out_l[1])):
            if ranged:
                dst.copy_(src[:, lo:hi])
            else:
                torch.index_select(src, 1, slots, out=dst)
    return out


def _common_prefix_len(seqs: list[tuple[int, ...]]) -> int:
    first, n = seqs[0], min(len(s) for s in seqs)
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs):
            return i
    return n


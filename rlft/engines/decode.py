"""The batched, KV-cached decode under HFEngine: prefill, one decode step, sampling, batch surgery.

The decode loop is written by hand (``model.generate`` is not used): a left-padded prefill with
an attention mask and explicit position ids, then one token per step for the whole batch through
the model's ``forward`` with a KV cache whose buffers grow in chunks (no per-step concatenation
of the whole cache, ``rlft.engines.kv_cache``), then sampling on the last-position logits in
float32 (``rlft.engines.sampling``). Prompts admitted together are deduplicated (the G rollouts
of a GRPO group prefill once) and a prefix common to all of them (system prompt, tool schemas)
is prefilled once and shared by their cache rows. A sequence that finishes (end-of-turn token,
stop string, ``max_new_tokens``, the context) is delivered at once and its cache rows dropped
(``_compact``); newly prefilled requests join the running batch (``_merge``).

Left out: the engine itself (``hf.py``: construction, weights, the public API, request checks)
and request queueing and the scheduling loop that calls ``_admit`` and ``_step``
(``scheduler.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlft.engines.kv_cache import EngineCache
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
    ``max_prefill_tokens``, ``min_shared_prefix``, ``policy_version``, ``stats``, ``grammars``, ``_rng``,
    ``_cache_kw``/``_logits_kw`` (set in its ``__init__``) and, from the Scheduler, ``_deliver``
    and ``_sample_of``."""

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
        prompts = list(unique)
        n = len(prompts)
        cache = EngineCache(self.num_layers)
        # a prefix shared by all prompts (system prompt, tool schemas) is prefilled once too
        shared = _common_prefix_len(prompts) if n > 1 else 0
        shared = min(shared, min(len(p) for p in prompts) - 1)  # every row keeps >= 1 token of its own
        if shared < self.min_shared_prefix:
            shared = 0
        if shared:
            ids = torch.tensor([prompts[0][:shared]], dtype=torch.long, device=dev)
            ones = torch.ones((1, shared), dtype=torch.bool, device=dev)
            self._forward(ids, ones, torch.arange(shared, device=dev)[None], cache)
            for layer in cache.layers:
                layer.select(torch.zeros(n, dtype=torch.long, device=dev))
            self.stats.prefill_tokens += shared
        width = max(len(p) for p in prompts) - shared
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.bool)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) + shared:] = torch.tensor(p[shared:], dtype=torch.long)
            mask[i, width - len(p) + shared:] = True
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.long().cumsum(-1) - 1).clamp_(min=0) + shared
        if shared:  # cache layout per row: [shared prefix | padding | own suffix]
            mask = torch.cat([torch.ones((n, shared), dtype=torch.bool, device=dev), mask], dim=1)
        logits = self._forward(ids, mask, pos, cache)
        self.stats.prefill_batches += 1
        self.stats.prefill_tokens += int(mask.sum()) - n * shared
        if n < len(reqs):
            index = torch.tensor(rows, dtype=torch.long, device=dev)
            for layer in cache.layers:
                layer.select(index)
            logits, mask = logits[index], mask[index]
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
        for r, t, lp in zip(batch.reqs, tok_list, lp_list):
            r.tokens.append(t)
            r.logprobs.append(lp)
            if r.grammar is not None:
                r.grammar.advance(t)
            self._check_finished(r, t)
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
        if r.finish is not None and r.finish != "cancelled":
            self._deliver(r, result=self._sample_of(r))

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


def _common_prefix_len(seqs: list[tuple[int, ...]]) -> int:
    first, n = seqs[0], min(len(s) for s in seqs)
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs):
            return i
    return n


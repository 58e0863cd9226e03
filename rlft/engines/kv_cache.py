"""The engine's KV cache: growable per-layer buffers and batch surgery between decode steps.

HF's ``DynamicLayer`` concatenates the whole cache at every step (~0.3 GB per step for SmolLM2
at batch 64 and 200 tokens); ``GrowLayer`` writes one slot into buffers with spare capacity and
supports what continuous batching needs: select rows (finished sequences leave), merge two
batches right-aligned (late requests join), trim shared left padding, and start from KV reused
from earlier requests (``preload``). Needs transformers
>= 4.56 (a ``Cache`` made of per-layer objects); ``EngineCache`` is None on older versions.
Left out: paged attention, sliding-window layers.
"""

from __future__ import annotations

import torch

try:  # transformers >= 4.56: Cache made of per-layer objects
    from transformers.cache_utils import Cache as HFCache
    from transformers.cache_utils import DynamicLayer as HFDynamicLayer
except ImportError:  # pragma: no cover
    HFCache = HFDynamicLayer = None


SPARE_SLOTS = _GROW = 32  # sequence slots added at a time (decode attends over them all: rlft.attention)


if HFDynamicLayer is not None:

    class GrowLayer(HFDynamicLayer):
        """A full-attention cache layer whose K/V live in buffers with spare sequence slots.

        ``keys``/``values`` are views ``[B, H, L, D]`` of the buffers, so appending a token writes
        one slot instead of concatenating the whole cache (HF's ``DynamicLayer`` copies it all at
        every step: ~0.3 GB per step for SmolLM2 at batch 64 and 200 tokens).
        """

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            self.device = key_states.device
            self.kbuf: torch.Tensor | None = None
            self.vbuf: torch.Tensor | None = None
            self.length = 0
            self.is_initialized = True

        def _set(self, kbuf: torch.Tensor, vbuf: torch.Tensor, length: int) -> None:
            self.kbuf, self.vbuf, self.length = kbuf, vbuf, length
            self.keys = kbuf[:, :, :length]
            self.values = vbuf[:, :, :length]
            # rlft.attention reads these: on decode steps it attends over the whole contiguous
            # buffers (unwritten slots masked) rather than copy the strided views
            if kbuf.is_contiguous() and vbuf.is_contiguous():
                self.keys._rlft_buffer, self.values._rlft_buffer = kbuf, vbuf

        def preload(self, kbuf: torch.Tensor, vbuf: torch.Tensor, length: int) -> None:
            """Start from ``length`` slots already written in ``kbuf``/``vbuf`` ``[B, H, cap, D]`` (a
            prefix's KV reused from ``rlft.engines.prefix_cache``); the next update appends after them."""
            self.device = kbuf.device
            self.is_initialized = True
            self._set(kbuf, vbuf, length)

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = key_states.shape[-2]
            need = self.length + n
            if self.kbuf is None or need > self.kbuf.shape[-2]:
                self._grow(need, key_states, value_states)
            self.kbuf[:, :, self.length:need] = key_states
            self.vbuf[:, :, self.length:need] = value_states
            self._set(self.kbuf, self.vbuf, need)
            return self.keys, self.values

        def _grow(self, need: int, k: torch.Tensor, v: torch.Tensor) -> None:
            cap = need + _GROW
            kbuf = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
            vbuf = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
            kept = self.length if self.kbuf is not None else 0
            if kept:
                kbuf[:, :, :kept] = self.kbuf[:, :, :kept]
                vbuf[:, :, :kept] = self.vbuf[:, :, :kept]
            # slots not written yet are read masked by decode attention: zeros, never garbage (NaN * 0)
            kbuf[:, :, kept:].zero_()
            vbuf[:, :, kept:].zero_()
            self.kbuf, self.vbuf = kbuf, vbuf

        def get_seq_length(self) -> int:
            return self.length if self.is_initialized and self.kbuf is not None else 0

        # batch surgery, used by the engine between steps
        def select(self, rows: torch.Tensor) -> None:
            if self.kbuf is not None:
                self._set(self.kbuf[rows], self.vbuf[rows], self.length)

        def trim_left(self, n: int) -> None:
            if self.kbuf is not None and n > 0:  # a contiguous copy (see _set); only when sequences leave
                self._set(self.kbuf[:, :, n:].contiguous(), self.vbuf[:, :, n:].contiguous(), self.length - n)

        def merged_with(self, other: GrowLayer) -> None:
            """Stack ``other``'s rows under ours, both right-aligned (the shorter is left-padded)."""
            length = max(self.length, other.length)
            ka, kb = self.kbuf, other.kbuf
            cap = length + _GROW
            kbuf = ka.new_zeros(ka.shape[0] + kb.shape[0], ka.shape[1], cap, ka.shape[3])
            vbuf = torch.zeros_like(kbuf)
            na = ka.shape[0]
            kbuf[:na, :, length - self.length: length] = self.keys
            vbuf[:na, :, length - self.length: length] = self.values
            kbuf[na:, :, length - other.length: length] = other.keys
            vbuf[na:, :, length - other.length: length] = other.values
            self._set(kbuf, vbuf, length)

    class EngineCache(HFCache):
        def __init__(self, num_layers: int):
            super().__init__(layers=[GrowLayer() for _ in range(num_layers)])
else:  # pragma: no cover - older transformers: HFEngine refuses to start and says why
    GrowLayer = EngineCache = None

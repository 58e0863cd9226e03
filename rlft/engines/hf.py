"""In-process Hugging Face engine: batched, KV-cached sampling on CPU (and CUDA when present).

Many rollouts call :meth:`HFEngine.generate` concurrently from one asyncio event loop (or from
several). Requests go to one worker thread, so the event loop stays free while the model runs,
or, with ``inline=True`` (what the trainer uses), to a task on the caller's event loop that runs
the model between the rollouts' own steps (``rlft.engines.scheduler``; why: HFEngine's
docstring). The scheduling loop keeps one running batch and does *continuous batching*: a request that arrives
while a batch is decoding is prefilled on its own and joins the batch at the next step, and a
sequence that finishes (end-of-turn token, stop string, ``max_new_tokens``) leaves the batch at
once: its rows of the KV cache leave the batch, so no compute is spent on finished sequences;
they are kept a while in a bounded prefix cache (``rlft.engines.prefix_cache``), so that the next
turn of a multi-turn rollout prefills only the tokens appended since (tool results, the next
assistant header), not its whole conversation again.

The model work (the hand-written decode loop: left-padded prefill with deduplicated prompts and a
shared prefix, one token per step through ``forward`` with a chunk-grown KV cache, sampling,
dropping finished rows, merging new ones) lives in ``rlft.engines.decode`` (``BatchedDecode``);
request queueing and the scheduling loop in ``rlft.engines.scheduler``. This module: the engine
class (construction, its own or shared weights, the public API, weight sync, request checks).

Logprob convention (the trainer must compute the same quantity)
----------------------------------------------------------------
For each sampled token ``t`` at temperature ``T > 0``, the returned logprob is::

    log_softmax(logits.float() / T)[t]

computed on the *full* vocabulary, **before** top-p / top-k truncation (the truncation only
restricts which tokens can be drawn; it does not renormalise the logprob). With ``T == 0``
(greedy) the logprob is ``log_softmax(logits.float())[t]`` (i.e. ``T = 1``). ``logits`` are the
model's output in the model's dtype (bf16 for a bf16 engine), cast to float32 before the
softmax. So the trainer's "old" logprobs are ``log_softmax(model(x).logits.float() / T)`` gathered
at the sampled ids, with the same ``T`` as sampling; a trainer computing in another dtype than the
engine will see a small train/inference mismatch (measure it; it is not zero in bf16).

Sampling uses the inverse CDF (``torch.rand`` + ``cumsum`` + ``searchsorted``) rather than
``torch.multinomial`` (which costs ~50 ms per call at a 49k vocabulary on a small CPU). A request
with ``SamplingParams.seed`` draws its uniforms from its own ``torch.Generator``, so its output
depends only on the seed and the logits: the same prompt and seed give the same tokens whenever
the logits are the same (same weights, dtype and device; batching can move bf16 logits by an ulp,
which in rare near-ties can change a token).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import os
import threading
from collections.abc import AsyncIterator, Iterable
from typing import Any

import torch

from rlft.allocator import keep_freed_memory
from rlft.attention import use_fast_attention
from rlft.engines.base import Sample, SamplingParams, WeightFormat, WeightUpdate
from rlft.engines.constrained import Grammars, check_grammar
from rlft.engines.decode import BatchedDecode
from rlft.engines.fast_forward import FastForward
from rlft.engines.fast_forward import supports as supports_fast_forward
from rlft.engines.kv_cache import HFCache
from rlft.engines.lora_merge import MergedCopy, is_lora_model
from rlft.engines.packed_linear import can_pack, pack_linears, repack_linears
from rlft.engines.prefix_cache import PrefixCache
from rlft.engines.sampling import sample_tokens
from rlft.engines.scheduler import EngineStats, Scheduler, _Request
from rlft.engines.tokens import end_of_turn_ids, pad_id
from rlft.engines.weight_copy import EngineCopy, PlainCopy

__all__ = ["HFEngine", "EngineStats", "ContextLengthError", "sample_tokens", "end_of_turn_ids"]


class ContextLengthError(ValueError):
    """The prompt does not fit the model's context window (``max_position_embeddings``)."""


class HFEngine(Scheduler, BatchedDecode):
    """Engine over a Hugging Face causal LM (or a peft model) in this process.

    ``model``: a ``PreTrainedModel`` / ``PeftModel`` (or a :class:`rlft.policy.Policy`, whose
    model and tokenizer are used). ``dtype``: run generation in this dtype; when it differs from
    the model's, the engine keeps its own cast copy and :meth:`sync_weights` refreshes it from
    the source model (``None`` = use the model as is, sharing its weights: nothing to sync).
    ``weight_format`` (the :class:`~rlft.engines.base.TrainableEngine` contract) says which:
    MODULE for an own copy (cast, copied or merged), SHARED for the model itself.
    ``max_batch_size``: most sequences decoded together. ``stop_token_ids``: end-of-turn ids
    (default: the tokenizer's ``eos_token_id``, the generation config's eos ids, and
    ``<|im_end|>`` & co. when in the vocabulary). ``policy_version``: copied into every Sample
    (the trainer sets it after each optimizer step). ``seed``: the RNG of requests without
    their own seed. ``min_shared_prefix``: shortest common prompt prefix (tokens) worth a
    separate shared prefill. ``max_prefill_tokens``: padded tokens per prefill forward.
    ``inline``: run the forward passes on the event loop's own thread (see below).
    ``merge_lora``: with a peft LoRA model, sample from a merged copy of the weights
    (:class:`rlft.engines.lora_merge.MergedCopy`: 2x faster decoding on SmolLM2, one more copy of
    the weights in memory, of its adapted weights only: frozen tensors are the model's own, and
    with the packed fast forward below only the packed form is kept) that :meth:`sync_weights`
    refreshes after each optimizer step.
    ``copy_weights``: keep an own copy of the model even in the same dtype and device (refreshed
    by :meth:`sync_weights`; :class:`rlft.engines.weight_copy.PlainCopy`: with the packed fast forward
    below, its linears' plain weights are freed too). ``prepack``: when the engine has its own copy, on the CPU in bf16,
    its linear layers run on weights pre-packed for oneDNN (:mod:`rlft.engines.packed_linear`:
    bit-identical, ~20 % faster decoding on SmolLM2), re-packed by :meth:`sync_weights`.
    ``fast_forward``: when the engine has its own copy of a Llama-family model on the CPU, prefill
    and decode run through :class:`rlft.engines.fast_forward.FastForward` (no transformers module
    dispatch, fused q/k/v and gate/up matmuls; bit-identical logits) instead of the model's
    modules; its fused weights are rebuilt by :meth:`sync_weights`.
    ``prefix_cache_mb``: memory for the KV of finished sequences, so that a request extending one
    (a rollout's next turn: its conversation so far plus the tool results) prefills only the new
    tokens (:mod:`rlft.engines.prefix_cache`; 0 = off); dropped by :meth:`sync_weights` and
    :meth:`paused`.

    Threads: by default a worker thread runs the model, so the event loop stays responsive. On a
    CPU that costs more than it saves when the same process also trains: each thread that runs
    torch ops gets its own OpenMP team, and with more OpenMP threads than cores GNU OpenMP stops
    spinning between parallel regions, so every small op pays a futex wake-up (a bf16 multiply
    of 64 x 576 went from 5 us to 40 us; a SmolLM2 decode step from 64 ms to ~95 ms; measured).
    With ``inline=True`` a task on the caller's event loop runs the scheduling loop and the
    forward passes, yielding to other tasks between steps; calls from another event loop or
    from :meth:`generate_sync` still go to the worker thread. The trainer uses inline mode when
    it samples and trains in turn (not with ``overlap``, where both run at once).

    The engine puts the model in eval mode for each step (restoring train mode after), and holds
    :attr:`lock` during every forward pass: wrap optimizer steps on a shared model in
    ``with engine.paused():`` so weights never change under a running forward.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        max_batch_size: int = 64,
        dtype: Any = None,
        device: Any = None,
        stop_token_ids: Iterable[int] | None = None,
        policy_version: int = 0,
        seed: int | None = None,
        max_prefill_tokens: int = 16384,
        batch_wait_s: float = 0.002,
        min_shared_prefix: int = 16,
        inline: bool = False,
        merge_lora: bool = False,
        copy_weights: bool = False,
        fast_forward: bool = True,
        prepack: bool = True,
        prefix_cache_mb: float = 512,
    ):
        if tokenizer is None and hasattr(model, "tokenizer") and hasattr(model, "model"):
            model, tokenizer = model.model, model.tokenizer  # a Policy
        if tokenizer is None:
            raise ValueError("HFEngine needs the tokenizer (for end-of-turn ids and stop strings).")
        if HFCache is None:  # pragma: no cover
            raise RuntimeError("HFEngine needs transformers >= 4.56 (per-layer Cache objects).")
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else _param(model).device
        want = _as_dtype(dtype)
        # MODULE: an own copy (a plain one, or LoRA merged) that sync_weights refreshes from the
        # source (rlft.engines.weight_copy); SHARED: the source module itself, so a sync only moves the version
        self._copy: EngineCopy | None = None
        if merge_lora and is_lora_model(model):  # sample from W + BA, not through peft's adapter layers
            self._copy = MergedCopy(model, dtype=want, device=self.device)
        elif copy_weights or (want is not None and want != _param(model).dtype) or self.device != _param(model).device:
            self._copy = PlainCopy(model, dtype=want, device=self.device)
        self.model = self._copy.model if self._copy is not None else model
        self.weight_format = WeightFormat.MODULE if self._copy is not None else WeightFormat.SHARED
        use_fast_attention(self.model)  # CPU: the sdpa kernel costs 2x on decode steps (rlft.attention)
        # an own copy on the CPU in bf16: linear weights pre-packed for oneDNN (rlft.engines.packed_linear);
        # never a shared model's, whose packed copy would go stale under the trainer
        owns_copy = self.weight_format is WeightFormat.MODULE
        # an own copy of a Llama-family model on the CPU: a lean forward over fused, packed weights
        # (rlft.engines.fast_forward), which then replaces the modules' packed copies
        self.fast_forward = FastForward(self.model, pack=prepack) if (
            fast_forward and owns_copy and supports_fast_forward(self.model)) else None
        self.prepacked = bool(prepack and owns_copy and self.fast_forward is None and can_pack(self.model)
                              and pack_linears(self.model))
        if self._copy is not None and self.fast_forward is not None and self.fast_forward.packed:
            # the packed fused weights are what runs: the copy's plain linear weights (212 MB on
            # SmolLM2 bf16) are freed, and each sync packs them layer by layer from the source
            self._copy.drop_weights()
        if self.device.type == "cpu":
            keep_freed_memory()  # sampling allocates ~12 MiB per step: no page faults each time (rlft.allocator)
        self.dtype = _param(self.model).dtype
        self.max_batch_size = int(max_batch_size)
        self.max_prefill_tokens = int(max_prefill_tokens)
        self.batch_wait_s = float(batch_wait_s)
        self.min_shared_prefix = max(1, int(min_shared_prefix))
        # finished sequences' KV, so a rollout's next turn prefills only what was appended (rlft.engines.prefix_cache)
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * (1 << 20)), min_match=self.min_shared_prefix)
        self.policy_version = int(policy_version)
        self.stop_token_ids = set(stop_token_ids) if stop_token_ids is not None else end_of_turn_ids(
            tokenizer, self.model)
        self.stats = EngineStats()
        self.lock = threading.RLock()

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = base.config
        self.num_layers = int(config.num_hidden_layers)
        self.vocab_size = int(base.get_input_embeddings().weight.shape[0])  # peft LoRA embeddings: no num_embeddings
        self.grammars = Grammars(tokenizer, self.vocab_size, self.stop_token_ids)  # constrained requests only
        self.max_context = int(getattr(config, "max_position_embeddings", 0) or 0) or None
        params = inspect.signature(base.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._logits_kw = "logits_to_keep" if "logits_to_keep" in params else (
            "num_logits_to_keep" if "num_logits_to_keep" in params else None)
        self.pad_id = pad_id(tokenizer)

        self._rng = torch.Generator()
        self._rng.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        self._pending: collections.deque[_Request] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.inline = bool(inline)
        self._inline_pending: collections.deque[_Request] = collections.deque()
        self._inline_loop: asyncio.AbstractEventLoop | None = None
        self._inline_task: asyncio.Task | None = None
        self._inline_wake: asyncio.Event | None = None

    # -- public API ----------------------------------------------------------------------------
    @classmethod
    def from_policy(cls, policy: Any, **kwargs: Any) -> HFEngine:
        return cls(policy.model, policy.tokenizer, **kwargs)

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Sample:
        """Sample one continuation of ``prompt_ids`` (batched with concurrent calls)."""
        loop = asyncio.get_running_loop()
        req = self._make_request(prompt_ids, params, loop, loop.create_future())
        if req.finish is not None:
            return self._sample_of(req)
        if self.inline and self._inline_loop in (None, loop):
            self._submit_inline(req, loop)
        else:
            self._submit(req)
        try:
            return await req.future
        except asyncio.CancelledError:
            req.cancelled = True  # the worker drops it at the next step
            raise

    async def generate_stream(self, prompt_ids: list[int], params: SamplingParams, *,
                              poll_s: float = 0.02) -> AsyncIterator[tuple[list[int], list[float], list] | Sample]:
        """Like :meth:`generate`, yielding the cumulative ``(tokens, logprobs, top_logprobs)`` of the
        running request (``top_logprobs`` empty unless asked) every ``poll_s`` seconds while it
        grows, then the finished Sample (``rlft serve`` streams with it). Leaving early cancels it."""
        loop = asyncio.get_running_loop()
        req = self._make_request(prompt_ids, params, loop, loop.create_future())
        if req.finish is not None:
            yield self._sample_of(req)
            return
        if self.inline and self._inline_loop in (None, loop):
            self._submit_inline(req, loop)
        else:
            self._submit(req)
        seen = 0
        try:
            while not req.future.done():
                await asyncio.wait([req.future], timeout=poll_s)
                k = min(len(req.tokens), len(req.logprobs))
                if k > seen and not req.future.done():
                    seen = k
                    yield req.tokens[:k], req.logprobs[:k], req.top[:k]
            yield req.future.result()
        finally:
            if not req.future.done():
                req.cancelled = True  # the client went away: the engine drops it at its next step

    def generate_sync(self, prompt_ids: list[int], params: SamplingParams) -> Sample:
        """Blocking variant for scripts (not from inside an event loop's thread)."""
        import concurrent.futures

        req = self._make_request(prompt_ids, params, None, concurrent.futures.Future())
        if req.finish is not None:
            return self._sample_of(req)
        self._submit(req)
        return req.future.result()

    @contextlib.contextmanager
    def paused(self):
        """Hold the engine between forward passes (e.g. around an optimizer step on a shared model).
        The prefix cache is dropped: the weights may change meanwhile, and kept KV would be stale."""
        with self.lock:
            self.prefix_cache.clear()
            yield

    def clear_prefix_cache(self) -> None:
        """Drop the kept KV: later requests prefill in full, in the batch shapes of their own, not
        from KV that other requests' prefills and decode steps computed (bf16 can differ by an ulp)."""
        with self.lock:
            self.prefix_cache.clear()

    def sync_weights(self, update: WeightUpdate) -> None:
        """After an optimizer step: refresh the engine's own copy (MODULE) from ``update.model``
        (default: the model it was built from) and serve it as ``update.version``. A SHARED engine
        runs the trainer's module itself: only the version moves."""
        with self.lock:
            if self._copy is not None:
                self._copy.refresh(update.model)
            if self.fast_forward is not None:  # its fused weights, from the new ones
                self.fast_forward.refresh(self._copy.weight if self._copy is not None and self._copy.dropped else None)
            if self.prepacked:  # only an own copy is packed: its new weights, packed again
                repack_linears(self.model)
            self.prefix_cache.clear()  # KV computed by the old weights
            self.policy_version = int(update.version)

    def close(self) -> None:
        """Stop the worker thread; pending and running requests fail with RuntimeError."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        task, loop = self._inline_task, self._inline_loop
        if task is not None and loop is not None and not task.done() and not loop.is_closed():
            if loop.is_running():  # the driver sees _closed at its next wake-up and fails what is left
                loop.call_soon_threadsafe(task.cancel)
            else:  # a loop between runs (the trainer's, at shutdown): finish the driver now
                task.cancel()
                with contextlib.suppress(BaseException):
                    loop.run_until_complete(asyncio.gather(task, return_exceptions=True))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    # -- request intake ------------------------------------------------------------------------
    def _make_request(self, prompt_ids, params: SamplingParams, loop, future) -> _Request:
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("prompt_ids is empty: render at least one token (e.g. the chat template's prefix).")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt_ids holds ids outside the vocabulary (size {self.vocab_size}): {bad[:5]}")
        if self.max_context is not None and len(prompt) >= self.max_context:
            raise ContextLengthError(
                f"prompt of {len(prompt)} tokens does not fit the model's context of {self.max_context} tokens")
        if params.temperature < 0 or params.top_p <= 0 or params.top_k < 0:
            raise ValueError(f"invalid sampling params: {params}")
        if params.grammar:
            check_grammar(params.grammar)  # GrammarError (a ValueError) now, not at sampling time
        req = _Request(prompt=prompt, params=params, loop=loop, future=future, policy_version=self.policy_version)
        if params.seed is not None:
            req.generator = torch.Generator()
            req.generator.manual_seed(int(params.seed))
        if params.stop:
            req.stop_window = max(len(s.encode("utf-8")) for s in params.stop) + 2
        if params.max_new_tokens <= 0:
            req.finish = "length"
        return req


# -----------------------------------------------------------------------------------------------
# helpers
# -----------------------------------------------------------------------------------------------


def _param(model: Any) -> torch.Tensor:
    return next(model.parameters())


def _as_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    table = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
             "float16": torch.float16, "fp16": torch.float16, "auto": None}
    if key not in table:
        raise ValueError(f"Unknown dtype {dtype!r}")
    return table[key]

"""How requests reach HFEngine's model: a worker thread, or a task on the caller's event loop.

``Scheduler`` is the part of :class:`rlft.engines.hf.HFEngine` that queues requests, runs the
scheduling loop (admit new requests, decode one step, deliver finished samples) and hands the
results back to the callers' event loops. Two drivers run that loop: a worker thread (the
default: the event loop stays responsive while the model runs) and, with ``inline=True``, a
task on the caller's own event loop (see HFEngine's docstring for why that is faster on CPU
when the same process trains). The model work itself (prefill, decode step, sampling, batch
surgery) lives in ``decode.py``; this module never touches tensors.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from rlft.engines.base import Sample, SamplingParams

__all__ = ["EngineStats", "Scheduler", "enqueue"]


@dataclass
class EngineStats:
    """Counters since the engine was built (read them for metrics and tests)."""

    requests: int = 0  # generate() calls that reached the worker
    prefill_batches: int = 0  # prefill forward passes (one per group of admitted requests)
    decode_steps: int = 0  # decode forward passes (one token for every running sequence)
    prefill_tokens: int = 0  # prompt tokens run through prefill (identical prompts count once)
    reused_tokens: int = 0  # prompt tokens whose KV came from the prefix cache instead (identical prompts once)
    tokens_generated: int = 0
    max_running: int = 0  # largest number of sequences decoded together
    busy_s: float = 0.0  # wall time the worker spent in forward passes and sampling
    admit_s: float = 0.0  # the part of busy_s spent admitting requests (prefill, joining the running batch)

    @property
    def forward_batches(self) -> int:
        return self.prefill_batches + self.decode_steps



_IDLE_EXIT_S = 30.0  # an idle worker thread ends after this long (a new one starts on demand)


@dataclass
class _Request:
    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop | None
    future: Any  # asyncio.Future (or concurrent.futures.Future for sync callers)
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: str | None = None
    cancelled: bool = False
    policy_version: int = 0
    stop_window: int = 0  # tokens to decode when checking stop strings
    top: list[list[tuple[int, float]]] = field(default_factory=list)  # params.top_logprobs > 0: per token
    grammar: Any = None  # params.grammar: its matcher, made at the first sampling step (rlft.engines.constrained)
    # the KV this request's rows start from (rlft.engines.prefix_cache), set at its prefill: the
    # parts (by reference), their length, and the cache's epoch then (a clear since: not kept)
    kv_prefix: list = field(default_factory=list)
    kv_prefix_len: int = 0
    kv_epoch: int = -1


def enqueue(engine: Any, req: Any, thread_name: str) -> None:
    """Queue ``req`` for ``engine``'s worker thread, starting the thread when none is running.
    ``engine`` has ``_cv`` (a Condition), ``_closed``, ``_pending`` (a deque), ``_thread`` and
    ``_worker``: HFEngine (through :class:`Scheduler`) and VLLMEngine."""
    with engine._cv:
        if engine._closed:
            raise RuntimeError(f"{type(engine).__name__} is closed")
        engine._pending.append(req)
        if engine._thread is None or not engine._thread.is_alive():
            engine._thread = threading.Thread(target=engine._worker, name=thread_name, daemon=True)
            engine._thread.start()
        engine._cv.notify()


class Scheduler:
    """Request queueing and the scheduling loop; HFEngine supplies ``_admit`` and ``_step`` (from
    :class:`rlft.engines.decode.BatchedDecode`), ``model``, ``lock``, ``stats``, ``max_batch_size``,
    ``batch_wait_s`` and the queues set up in its ``__init__``."""

    def _submit(self, req: _Request) -> None:
        enqueue(self, req, "rlft-hf-engine")

    def _sample_of(self, req: _Request) -> Sample:
        return Sample(tokens=list(req.tokens), logprobs=list(req.logprobs), finish_reason=req.finish or "stop",
                      policy_version=req.policy_version,
                      top_logprobs=list(req.top) if req.params.top_logprobs > 0 else None)

    def _deliver(self, req: _Request, result: Any = None, error: BaseException | None = None) -> None:
        fut = req.future
        if req.loop is None:  # concurrent.futures.Future
            if not fut.done():
                fut.set_exception(error) if error is not None else fut.set_result(result)
            return

        def _set() -> None:
            if not fut.done():
                fut.set_exception(error) if error is not None else fut.set_result(result)

        try:
            req.loop.call_soon_threadsafe(_set)
        except RuntimeError:  # the caller's loop is closed: nobody is waiting any more
            pass

    # -- the worker ----------------------------------------------------------------------------
    def _worker(self) -> None:
        batch: Any = None
        while True:
            with self._cv:
                while not self._pending and batch is None and not self._closed:
                    if not self._cv.wait(timeout=_IDLE_EXIT_S) and not self._pending:
                        self._thread = None  # idle: let the thread end; the next submit starts one
                        return
                if self._closed:
                    leftover = list(self._pending) + (batch.reqs if batch else [])
                    self._pending.clear()
                    for r in leftover:
                        self._deliver(r, error=RuntimeError("HFEngine was closed"))
                    return
            if batch is None:
                self._gather_window()
            new = self._take(self.max_batch_size - (len(batch.reqs) if batch else 0))
            batch = self._advance(batch, new)

    def _advance(self, batch: Any, new: list[_Request]) -> Any:
        """Admit ``new`` and decode one step; a failure fails what was running (the engine goes on)."""
        try:
            t0 = time.perf_counter()
            with self.lock, torch.inference_mode(), _eval_mode(self.model):
                if new:
                    batch = self._admit(batch, new)
                    self.stats.admit_s += time.perf_counter() - t0
                if batch is not None:
                    batch = self._step(batch)
            self.stats.busy_s += time.perf_counter() - t0
            return batch
        except Exception as e:  # noqa: BLE001 - fail what was running, keep serving: the engine must outlive one failed step
            failed = (batch.reqs if batch else []) + [r for r in new if r.finish is None]
            for r in failed:
                if r.finish is None:
                    r.finish = "error"
                    self._deliver(r, error=e)
            return None

    # -- inline mode: the scheduling loop as a task on the caller's event loop -----------------
    def _submit_inline(self, req: _Request, loop: asyncio.AbstractEventLoop) -> None:
        if self._closed:
            raise RuntimeError("HFEngine is closed")
        self._inline_pending.append(req)
        if self._inline_task is None or self._inline_task.done():
            self._inline_loop, self._inline_wake = loop, asyncio.Event()
            self._inline_task = loop.create_task(self._drive_inline(), name="rlft-hf-engine-inline")
        self._inline_wake.set()

    async def _drive_inline(self) -> None:
        batch: Any = None
        pending, wake = self._inline_pending, self._inline_wake
        try:
            while not self._closed:
                if not pending and batch is None:
                    wake.clear()
                    try:
                        await asyncio.wait_for(wake.wait(), timeout=_IDLE_EXIT_S)
                    except asyncio.TimeoutError:
                        if not pending:
                            return
                    continue
                if batch is None:  # from idle: let concurrent callers submit, to share one prefill
                    seen = -1
                    for _ in range(10):
                        if len(pending) >= self.max_batch_size or len(pending) == seen:
                            break
                        seen = len(pending)
                        await asyncio.sleep(self.batch_wait_s)
                new = self._take(self.max_batch_size - (len(batch.reqs) if batch else 0), pending)
                batch = self._advance(batch, new)
                await asyncio.sleep(0)  # let rollouts run their tools and submit their next turns
        finally:
            left = list(pending) + (batch.reqs if batch else [])
            pending.clear()
            for r in left:
                if r.finish is None:
                    r.finish = "error"
                    self._deliver(r, error=RuntimeError("HFEngine was closed"))
            self._inline_task = None
            self._inline_loop = None

    def _gather_window(self) -> None:
        """From idle: give concurrent callers a moment to submit, so they share one prefill."""
        deadline = time.perf_counter() + 10 * self.batch_wait_s
        seen = -1
        while time.perf_counter() < deadline:
            with self._cv:
                n = len(self._pending)
            if n >= self.max_batch_size or n == seen:
                return
            seen = n
            time.sleep(self.batch_wait_s)

    def _take(self, room: int, queue: Any = None) -> list[_Request]:
        """Up to ``room`` live requests from ``queue`` (default: the worker thread's, under its lock)."""
        if queue is None:
            with self._cv:
                return self._take(room, self._pending)
        out: list[_Request] = []
        while queue and len(out) < room:
            r = queue.popleft()
            if not r.cancelled:
                out.append(r)
        self.stats.requests += len(out)
        return out


@contextlib.contextmanager
def _eval_mode(model: Any):
    was_training = model.training
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()

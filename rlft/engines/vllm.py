"""vLLM engine (GPU): vLLM's offline ``LLM`` API behind the Engine protocol, colocated with the trainer.

Generation: concurrent :meth:`VLLMEngine.generate` calls are queued and handed to one worker
thread, which passes each batch to ``LLM.generate`` as ``TokensPrompt(prompt_token_ids=...)``
with one ``vllm.SamplingParams`` per request (``logprobs=0``: the sampled token's logprob only,
``seed``, ``stop`` with the stop text kept, the model's end-of-turn ids as ``stop_token_ids``).
The offline API finishes a whole batch before it returns, so requests that arrive while a batch
runs wait for the next one (multi-turn rollouts go in waves); vLLM batches inside each call.

Weight sync after each optimizer step (:meth:`VLLMEngine.sync_weights`; ``weight_format`` ADAPTER
with LoRA, MODULE for a full finetune):

- LoRA: the trainer saves the adapter (``adapter_dir``) and every later request carries a new
  ``LoRARequest(name@v<step>, new id, adapter_dir)``; the previous adapter is removed from vLLM's
  cache (``llm.llm_engine.remove_lora``). A fresh integer id per push, so vLLM never reuses a
  cached older adapter under the same id.
- Full finetune: the trainer's module is loaded in place with the model's own ``load_weights``
  on vLLM's worker (``LLM.collective_rpc``), then the prefix cache is reset (cached KV of the old
  weights must not be reused). In-process for colocation: ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is
  set (unless already set) so the tensors are passed by reference, not serialised.

Colocation on one GPU: ``gpu_memory_utilization`` bounds vLLM's share; with ``enable_sleep_mode``
:meth:`paused` (around the policy update) calls ``LLM.sleep`` (level 1: weights offloaded to CPU,
KV cache freed; level 2 for full finetunes, whose weights are replaced anyway) and wakes it up
afterwards (level 2: the weights first, the KV cache after the new weights are in).

Logprobs: vLLM returns the raw model's logprobs (before temperature) by default; rlft's
convention is ``log_softmax(logits / T)`` before top-p/top-k truncation (see rlft.engines.hf). At
``T = 1`` they are the same. For ``T != 1`` the engine asks for ``logprobs_mode =
"processed_logprobs"`` (vLLM >= 0.10.2), which is after temperature, but also after top-p/top-k
truncation: with truncation the logprobs are renormalised over the kept tokens, a difference the
trainer's ``sync/logprob_diff_*`` metrics show and ``tis_cap`` can correct.

Settings: :class:`VLLMSettings` holds what a training run decides for the engine (built from the
TrainConfig by ``rlft.engines.factory.engine_options``); this module never reads the config.

Not run on a GPU in this repository's CI: written against vLLM's documented offline API (v0.10+,
V1 engine); the CPU tests exercise the plumbing with a stand-in for ``vllm``.

Why one module: the queue, the worker thread, weight sync and sleep/wake all act on one ``LLM``
object under the colocation rules above; what stands apart (settings, model path, LoRA rank) is
a few short functions at the top.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from rlft.engines.base import Sample, SamplingParams, WeightFormat, WeightUpdate
from rlft.engines.scheduler import enqueue

__all__ = ["VLLMEngine", "VLLMSettings", "vllm_model_path", "lora_rank_for_vllm"]

_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank_for_vllm(rank: int) -> int:
    """vLLM's ``max_lora_rank`` must be one of a few sizes: the smallest that holds ``rank``."""
    for r in _VLLM_LORA_RANKS:
        if r >= rank:
            return r
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank ({_VLLM_LORA_RANKS[-1]})")


def vllm_model_path(policy: Any, export_dir: str | os.PathLike) -> str:
    """What vLLM should load as the base model: the policy's hub id or HF directory as is; for a
    GGUF source (the ``smollm2`` alias) the dequantized base weights written to ``export_dir``."""
    src = str(policy.source)
    if os.path.isdir(src) and os.path.isfile(os.path.join(src, "config.json")):
        return src
    if not os.path.exists(src) and not src.lower().endswith(".gguf") and policy.gguf_file is None:
        return src  # a hub id
    out = os.fspath(export_dir)
    if not os.path.isfile(os.path.join(out, "config.json")):
        base = policy.base_model
        state = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if "lora_" not in k}
        base.save_pretrained(out, state_dict=state)
        policy.tokenizer.save_pretrained(out)
    return out


def _load_weights_on_worker(worker: Any, weights: list[tuple[str, Any]]) -> int:
    """Runs on vLLM's worker (``collective_rpc``): load HF-named tensors into its model in place."""
    inner = getattr(worker, "worker", worker)  # the executor may hand over a WorkerWrapperBase
    runner = inner.model_runner
    model = runner.model if hasattr(runner, "model") else runner.get_model()
    model.load_weights(weights=weights)
    return len(weights)


@dataclass(frozen=True)
class VLLMSettings:
    """What a training run sets on its colocated vLLM engine (:meth:`VLLMEngine.from_policy`)."""

    runs_dir: str  # a GGUF base is exported under <runs_dir>/<tag>/sync/base for vLLM to load
    dtype: str
    gpu_memory_utilization: float  # vLLM's share of the GPU; the trainer keeps the rest
    sleep: bool  # free vLLM's GPU memory during the policy update (paused())
    max_model_len: int
    seed: int
    lora_rank: int  # the trainer's LoRA rank (when the policy is LoRA)
    max_batch_size: int
    temperature: float  # sampling temperature: != 1 needs vLLM's processed logprobs


@dataclass
class _Request:
    prompt: list[int]
    params: SamplingParams
    loop: Any
    future: Any
    policy_version: int = 0
    cancelled: bool = False


@dataclass
class VLLMStats:
    requests: int = 0
    batches: int = 0
    tokens_generated: int = 0
    max_batch: int = 0
    adapters_loaded: int = 0
    weight_loads: int = 0
    sleeps: int = 0
    busy_s: float = 0.0
    history: list[str] = field(default_factory=list)  # sleep / wake / lora / load events, in order


class VLLMEngine:
    """TrainableEngine over ``vllm.LLM`` (see the module docstring).

    ``model``: what vLLM loads (hub id or HF directory). ``lora``: serve LoRA adapters pushed by
    :meth:`sync_weights` (``max_lora_rank``: the trainer's rank, rounded up to vLLM's sizes).
    ``sleep_level``: 1 (LoRA: keep the base) or 2 (full finetune: the weights are replaced after
    each step anyway); 0 = never sleep. ``llm``: an already built ``vllm.LLM`` (the other
    arguments that build one are then ignored). Extra keyword arguments go to ``vllm.LLM``.
    """

    def __init__(self, model: str, *, tokenizer: str | None = None, dtype: str = "bfloat16",
                 gpu_memory_utilization: float = 0.3, enable_sleep_mode: bool = True, sleep_level: int = 1,
                 max_model_len: int | None = None, seed: int = 0, lora: bool = False, max_lora_rank: int = 16,
                 stop_token_ids: Iterable[int] | None = None, max_batch_size: int = 1024, batch_wait_s: float = 0.005,
                 logprobs_mode: str | None = None, tag: str = "", llm: Any = None, **llm_kwargs: Any):
        import vllm  # noqa: F401  (ImportError here, with the message from from_policy)

        self.model_name = model
        self.lora = bool(lora)
        self.sleep_level = int(sleep_level) if enable_sleep_mode else 0
        self.stop_token_ids = sorted(int(t) for t in stop_token_ids) if stop_token_ids else []
        self.max_batch_size = max(1, int(max_batch_size))
        self.batch_wait_s = float(batch_wait_s)
        self.max_context = max_model_len
        self.tag = tag
        self.policy_version = 0
        self.stats = VLLMStats()
        if llm is None:
            kw: dict[str, Any] = dict(model=model, tokenizer=tokenizer or model, dtype=dtype,
                                      gpu_memory_utilization=gpu_memory_utilization, seed=seed,
                                      enable_sleep_mode=enable_sleep_mode and self.sleep_level > 0)
            if max_model_len:
                kw["max_model_len"] = int(max_model_len)
            if self.lora:
                kw.update(enable_lora=True, max_lora_rank=lora_rank_for_vllm(max_lora_rank), max_loras=2)
            if logprobs_mode:
                kw["logprobs_mode"] = logprobs_mode
            kw.update(llm_kwargs)
            from vllm import LLM

            try:
                llm = LLM(**kw)
            except TypeError as e:
                if "logprobs_mode" in str(e):
                    raise RuntimeError("sampling at temperature != 1 needs vLLM >= 0.10.2 (logprobs_mode="
                                       "'processed_logprobs'), or train at temperature = 1") from e
                raise
        self.llm = llm
        self._lora_request: Any = None  # the adapter every new request uses (None = the base weights)
        self._next_lora_id = 1
        self._asleep = False
        self._kv_asleep = False  # level-2 sleep: KV cache wakes after the new weights are loaded
        self._weights_valid = True
        self.lock = threading.RLock()  # held by a running batch, paused() and sync_weights
        self._pending: collections.deque[_Request] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    @classmethod
    def from_policy(cls, policy: Any, settings: VLLMSettings, *, tag: str = "", **kwargs: Any) -> VLLMEngine:
        """The engine for a training run: the policy's base model, colocated as ``settings`` say
        (``kwargs`` override the constructor's arguments)."""
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("engine = \"vllm\" needs a CUDA GPU; on this machine use engine = \"hf\" "
                               "(or engine = \"openai\" with a vLLM server elsewhere)")
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise ImportError("engine = \"vllm\" needs vLLM: pip install vllm (a build matching your "
                              "torch/CUDA)") from e
        from rlft.engines.hf import end_of_turn_ids

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: weights by reference
        runs = os.path.join(settings.runs_dir, tag or "vllm")
        model = vllm_model_path(policy, os.path.join(runs, "sync", "base"))
        kw: dict[str, Any] = dict(
            dtype=settings.dtype, gpu_memory_utilization=settings.gpu_memory_utilization,
            enable_sleep_mode=settings.sleep, sleep_level=1 if policy.is_lora else 2,
            max_model_len=settings.max_model_len, seed=settings.seed, lora=policy.is_lora,
            max_lora_rank=settings.lora_rank, stop_token_ids=end_of_turn_ids(policy.tokenizer, policy.base_model),
            max_batch_size=settings.max_batch_size,
            logprobs_mode="processed_logprobs" if settings.temperature != 1.0 else None, tag=tag)
        kw.update(kwargs)
        return cls(model, **kw)

    # -- generation ------------------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Sample:
        """Sample one continuation of ``prompt_ids`` (batched with concurrent calls)."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("prompt_ids is empty: render at least one token (e.g. the chat template's prefix).")
        if params.max_new_tokens <= 0:
            return Sample([], [], "length", self.policy_version)
        loop = asyncio.get_running_loop()
        req = _Request(prompt, params, loop, loop.create_future())
        enqueue(self, req, "rlft-vllm-engine")
        try:
            return await req.future
        except asyncio.CancelledError:
            req.cancelled = True
            raise

    def sampling_params(self, params: SamplingParams) -> Any:
        """rlft SamplingParams -> vllm.SamplingParams (sampled token's logprob, token ids kept)."""
        from vllm import SamplingParams as VSP

        return VSP(n=1, temperature=float(params.temperature), top_p=float(params.top_p),
                   top_k=int(params.top_k) if params.top_k > 0 else -1, max_tokens=int(params.max_new_tokens),
                   seed=params.seed, stop=list(params.stop) or None, include_stop_str_in_output=True,
                   stop_token_ids=self.stop_token_ids or None, logprobs=0, detokenize=bool(params.stop),
                   skip_special_tokens=False)

    def _worker(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if self._closed:
                    for r in self._pending:
                        self._deliver(r, error=RuntimeError("VLLMEngine was closed"))
                    self._pending.clear()
                    return
            self._gather_window()
            with self._cv:
                batch = []
                while self._pending and len(batch) < self.max_batch_size:
                    r = self._pending.popleft()
                    if not r.cancelled:
                        batch.append(r)
            if batch:
                self._run(batch)

    def _gather_window(self) -> None:
        """Give concurrent callers a moment to submit, so that they share one generate call."""
        seen, deadline = -1, time.perf_counter() + 20 * self.batch_wait_s
        while time.perf_counter() < deadline:
            with self._cv:
                n = len(self._pending)
            if n >= self.max_batch_size or n == seen:
                return
            seen = n
            time.sleep(self.batch_wait_s)

    def _run(self, batch: list[_Request]) -> None:
        try:
            from vllm.inputs import TokensPrompt

            with self.lock:
                if self._asleep or self._kv_asleep or not self._weights_valid:
                    raise RuntimeError("VLLMEngine is asleep or its weights were discarded (sleep level 2): "
                                       "generate only outside paused(), after sync_weights")
                t0 = time.perf_counter()
                version, lora = self.policy_version, self._lora_request
                outputs = self.llm.generate([TokensPrompt(prompt_token_ids=r.prompt) for r in batch],
                                            sampling_params=[self.sampling_params(r.params) for r in batch],
                                            lora_request=lora, use_tqdm=False)
                self.stats.busy_s += time.perf_counter() - t0
            self.stats.batches += 1
            self.stats.requests += len(batch)
            self.stats.max_batch = max(self.stats.max_batch, len(batch))
            for r, out in zip(batch, outputs):
                sample = self._sample(out, version)
                self.stats.tokens_generated += len(sample.tokens)
                self._deliver(r, sample)
        except Exception as e:  # noqa: BLE001 - fail this batch, keep serving: the worker must outlive one failed batch
            for r in batch:
                self._deliver(r, error=e)

    @staticmethod
    def _sample(out: Any, version: int) -> Sample:
        comp = out.outputs[0]
        tokens = [int(t) for t in comp.token_ids]
        steps = comp.logprobs or []
        if len(steps) != len(tokens):
            raise RuntimeError(f"vLLM returned {len(tokens)} tokens but {len(steps)} logprob entries")
        logprobs = []
        for t, step in zip(tokens, steps):
            entry = step[t]  # {token id: Logprob}: the sampled token is always present
            logprobs.append(float(getattr(entry, "logprob", entry)))
        finish = "length" if comp.finish_reason == "length" else "stop"
        return Sample(tokens=tokens, logprobs=logprobs, finish_reason=finish, policy_version=version)

    @staticmethod
    def _deliver(req: _Request, result: Any = None, error: BaseException | None = None) -> None:
        fut = req.future

        def _set() -> None:
            if not fut.done():
                fut.set_exception(error) if error is not None else fut.set_result(result)

        with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody is waiting
            req.loop.call_soon_threadsafe(_set)

    # -- colocation: sleep during the policy update -------------------------------------------------
    @contextlib.contextmanager
    def paused(self):
        """Around the policy update: no generation, and (with sleep mode) vLLM's GPU memory freed."""
        with self.lock:
            if self.sleep_level:
                self.llm.sleep(level=self.sleep_level)
                self._asleep = True
                self.stats.sleeps += 1
                self.stats.history.append(f"sleep{self.sleep_level}")
            try:
                yield
            finally:
                if self._asleep:
                    if self.sleep_level >= 2:  # weights first; KV cache once the new weights are in
                        self._wake(["weights"])
                        self._weights_valid, self._kv_asleep = False, True
                    else:
                        self._wake(None)
                    self._asleep = False

    def _wake(self, tags: list[str] | None) -> None:
        if tags is None:
            self.llm.wake_up()
        else:
            try:
                self.llm.wake_up(tags=tags)
            except TypeError:  # older vLLM: no tags, everything wakes
                self.llm.wake_up()
                self._kv_asleep = False
                tags = None
        self.stats.history.append("wake" + (":" + ",".join(tags) if tags else ""))

    def clear_prefix_cache(self) -> None:
        """Left to vLLM: its scheduler batches requests as it sees fit, so its numbers already
        depend on what runs beside them, and its prefix cache is reset where weights change."""

    # -- weight sync ------------------------------------------------------------------------------
    def adapter_name(self, version: int) -> str:
        return f"{self.model_name}@{self.tag}@v{version}" if self.tag else f"{self.model_name}@v{version}"

    @property
    def weight_format(self) -> WeightFormat:
        """ADAPTER: LoRA adapters saved by the trainer; MODULE: a full finetune's module, loaded in place."""
        return WeightFormat.ADAPTER if self.lora else WeightFormat.MODULE

    def sync_weights(self, update: WeightUpdate) -> None:
        """After an optimizer step: LoRA (``update.adapter_dir``) -> a new adapter version for all
        later requests; full finetune (``update.model``) -> its weights loaded into vLLM in place."""
        with self.lock:
            if self.lora:
                if update.adapter_dir is None:
                    raise ValueError("this VLLMEngine serves LoRA adapters: the update needs adapter_dir "
                                     "(the saved adapter)")
                self._push_lora(os.fspath(update.adapter_dir), update.version)
            elif update.model is not None:
                self._load_full(update.model)
            if self._kv_asleep:
                self._wake(["kv_cache"])
                self._kv_asleep = False
            self._weights_valid = True
            self.policy_version = int(update.version)

    def _push_lora(self, path: str, version: int) -> None:
        from vllm.lora.request import LoRARequest

        old = self._lora_request
        self._lora_request = LoRARequest(self.adapter_name(version), self._next_lora_id, os.path.abspath(path))
        self._next_lora_id += 1
        self.stats.adapters_loaded += 1
        self.stats.history.append(f"lora:{version}")
        if old is not None:
            with contextlib.suppress(Exception):  # vLLM evicts LRU adapters anyway (max_loras)
                self.llm.llm_engine.remove_lora(old.lora_int_id)

    def _load_full(self, model: Any) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        weights = [(name, p.detach()) for name, p in base.state_dict().items()]
        self.llm.collective_rpc(_load_weights_on_worker, args=(weights,))
        self.llm.reset_prefix_cache()  # KV cached under the old weights must not be reused
        self.stats.weight_loads += 1
        self.stats.history.append("load")

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

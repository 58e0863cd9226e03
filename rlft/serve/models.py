"""The model side of ``rlft serve`` (no HTTP here): served names, loading them, the LRU of loaded
models, and what a loaded model is served as (:class:`ServedModel` over a :class:`ServedEngine`).
Left out: requests and replies (``requests.py``, ``messages.py``, ``structured.py``, ``replies.py``).

Names:

- the base model (``--model``), named exactly as given (an alias, a hub id or a path);
- every checkpoint of the runs in the run store, ``ft:<base>:<run>:<step>``, and
  ``ft:<base>:<run>:latest`` for each run's newest one, ``ft:<base>:<run>:best`` for the checkpoint
  of its best held-out eval (``keep_best``). ``<base>`` is the run's model as it was
  given to the trainer, ``<run>`` the run id (a run *name* is accepted too: its newest run);
- LoRA adapters registered at run time (``/v1/load_lora_adapter``), under their given name;
- engines plugged in by the caller (``create_app(engines={name: ...})``: tests, custom backends).

Checkpoints are found by re-scanning the store and the run directories (on every ``/v1/models``
and every name that is not already known), so checkpoints written while the server runs appear
without a restart, and ``latest`` and ``best`` resolve at request time (the response's ``model`` says which
step answered).

Loaded models are kept in an LRU of ``max_loaded``. A LoRA checkpoint or adapter is served on its
base loaded once (``rlft.serve.shared_base``): a module copy sharing every base tensor, with the
adapter's own weights (``rlft.serve.lora_view``), so a new adapter version loads in 0.06-0.15 s
on SmolLM2 and the base's weights are held once however many adapters are served; each still
gets its own batched engine, so requests to different checkpoints run concurrently. A
full-finetune checkpoint loads its own weights. An evicted model's engine is closed once its
in-flight requests are done (bases stay).

Engines: what the server asks of one is :class:`ServedEngine` (generate, generate_stream,
``max_context``, close). The registry's own (``engine_factory``, default HFEngine) are ServedEngines;
an engine plugged in by the caller that only generates is served through :class:`Unstreamed`
(its finished sample streamed in per-token chunks; closing it stays the caller's business).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rlft.engines.base import Engine, Sample, SamplingParams
from rlft.renderer import Renderer
from rlft.serve.errors import APIError
from rlft.serve.messages import chat_messages
from rlft.serve.replies import cut_stop, final_choice, held_text, token_logprobs, token_stream
from rlft.serve.shared_base import BaseModels, is_lora_dir
from rlft.serve.structured import tool_setup

# APIError, chat_messages, the replies.py functions and tool_setup moved to their own modules; still importable here
__all__ = ["APIError", "FT_PREFIX", "ModelEntry", "ModelNotFoundError", "ModelRegistry", "ServedEngine", "ServedModel",
           "Unstreamed", "as_served", "chat_messages", "cut_stop", "final_choice", "held_text", "token_logprobs",
           "token_stream", "tool_setup"]

FT_PREFIX = "ft:"


class ModelNotFoundError(LookupError):
    """No model of that name; ``available`` lists the names that are served."""

    def __init__(self, message: str, available: list[str]):
        super().__init__(message)
        self.available = available


@dataclass
class ModelEntry:
    """A servable name. ``kind``: base, checkpoint, adapter or engine; ``path``: what is loaded."""

    name: str
    kind: str
    path: str = ""
    created: int = 0
    parent: str | None = None


class ServedEngine(Engine, Protocol):
    """An engine as ``rlft serve`` uses it (HFEngine is one)."""

    max_context: int | None  # longest prompt + completion, in tokens; None: the model config's

    def generate_stream(self, prompt_ids: list[int],
                        params: SamplingParams) -> AsyncIterator[tuple[list[int], list[float], list] | Sample]:
        """Cumulative ``(tokens, logprobs, top_logprobs)`` snapshots while it samples (the last one
        per token as in ``Sample.top_logprobs``, [] when not asked), then the finished Sample."""
        ...

    def close(self) -> None:
        """Release the engine once its model is evicted and its requests are done."""
        ...


class Unstreamed:
    """A plain Engine served as a :class:`ServedEngine`: its finished sample is sent in per-token
    chunks, it has no context bound of its own, and it is not closed here (it is the caller's)."""

    max_context: int | None = None

    def __init__(self, engine: Engine):
        self.engine = engine

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Sample:
        return await self.engine.generate(prompt_ids, params)

    async def generate_stream(self, prompt_ids: list[int],
                              params: SamplingParams) -> AsyncIterator[tuple[list[int], list[float], list] | Sample]:
        sample = await self.engine.generate(prompt_ids, params)
        for k in range(1, len(sample.tokens)):
            yield sample.tokens[:k], sample.logprobs[:k], (sample.top_logprobs or [])[:k]
        yield sample

    def close(self) -> None:
        pass


@dataclass
class ServedModel:
    """A model ready to serve: ``engine`` generates token ids, ``renderer`` turns chats into ids
    and sampled ids into text and tool calls; ``max_context`` bounds prompt + completion."""

    engine: ServedEngine
    renderer: Renderer
    max_context: int | None = None
    policy: Any = None
    constrained: bool = False  # the engine honours SamplingParams.grammar (HFEngine): forced tool calls, JSON
    active: int = 0  # requests in flight
    evicted: bool = False

    def close(self) -> None:
        # HFEngine.close joins its worker: off the event loop
        threading.Thread(target=self.engine.close, daemon=True).start()


def as_served(value: Any) -> ServedModel:
    """An ``engines=`` value: a ServedModel (its engine a ServedEngine, streamed natively), or a
    plain Engine served through :class:`Unstreamed`: an ``(engine, renderer or tokenizer)`` pair,
    or an engine with a ``renderer`` attribute (like ``rlft.testing.ScriptedPolicy``)."""
    if isinstance(value, ServedModel):
        return value
    engine, r = value if isinstance(value, tuple) else (value, getattr(value, "renderer", None))
    if r is None:
        raise TypeError("an engines= value needs a renderer: pass (engine, renderer_or_tokenizer) or a ServedModel")
    renderer = r if isinstance(r, Renderer) else Renderer(r)
    return ServedModel(Unstreamed(engine), renderer)


def _mtime(path: str | Path) -> int:
    try:
        return int(os.path.getmtime(path))
    except OSError:
        return 0


def _recorded_base(run_dir: Path) -> str | None:
    """The base model recorded in a run's newest checkpoint (``rlft_policy.json``)."""
    from rlft.policy import POLICY_META_FILE
    from rlft.training.checkpoint import list_checkpoints

    ckpts = list_checkpoints(run_dir)
    try:
        with open(ckpts[-1][1] / POLICY_META_FILE) as f:
            return json.load(f).get("base_model") or None
    except (IndexError, OSError, ValueError):
        return None


class ModelRegistry:
    """Names -> entries -> loaded models (see the module docstring).

    ``model``: the base model to serve (optional). ``runs_dir``: the run store's workspace (a
    directory with ``rlft.db``; without one, its subdirectories holding ``checkpoints/`` are taken
    as runs). ``run``: serve only this run's checkpoints (id or name). ``engine_factory(policy)``:
    the :class:`ServedEngine` for a loaded policy (default ``HFEngine``; a plain Engine wrapped in
    :class:`Unstreamed`). Methods are called from one event loop.
    """

    def __init__(self, model: str | os.PathLike | None = None, *, runs_dir: str | os.PathLike | None = None,
                 run: str | None = None, engines: dict[str, Any] | None = None,
                 engine_factory: Callable[[Any], ServedEngine] | None = None, dtype: Any = "bfloat16",
                 device: Any = "auto", max_loaded: int = 3, max_batch_size: int = 32):
        self.model = os.fspath(model) if model is not None else None
        self.runs_dir = Path(runs_dir) if runs_dir is not None else None
        self.run = run
        self.pinned = {name: as_served(v) for name, v in (engines or {}).items()}
        self.engine_factory = engine_factory
        self.dtype, self.device = dtype, device
        self.bases = BaseModels(dtype, device)  # each base loaded once; its LoRA adapters share its weights
        self._renderers: dict[int, tuple[Any, Renderer]] = {}  # id(tokenizer) -> (tokenizer, its Renderer)
        self.max_loaded, self.max_batch_size = max(1, int(max_loaded)), int(max_batch_size)
        self.adapters: dict[str, str] = {}
        self.loaded: collections.OrderedDict[str, ServedModel] = collections.OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        self._store: Any = None
        self._started = int(time.time())
        if self.model is None and self.runs_dir is None and not self.pinned:
            raise ValueError("nothing to serve: give a model, a runs directory, or engines")

    # -- discovery -------------------------------------------------------------------------------
    def _open_store(self) -> Any:
        if self._store is None and self.runs_dir is not None:
            from rlft.store import RunStore

            try:  # the store may appear after the server started: try again on each scan
                self._store = RunStore(self.runs_dir, readonly=True)
            except Exception:  # noqa: BLE001 - a missing or half-written store is retried on the next scan
                return None
        return self._store

    def _runs(self) -> list[tuple[str, str, str, Path]]:
        """``(run id, run name, base model, run dir)`` of the runs whose checkpoints are served."""
        if self.runs_dir is None:
            return []
        store = self._open_store()
        if store is not None:
            rows = store.list_runs()  # newest first: a name resolves to its newest run
            if self.run:
                try:
                    rid = store.resolve(self.run)
                except KeyError:
                    return []
                rows = [r for r in rows if r["id"] == rid]
            return [(r["id"], r["name"], r["model"] or _recorded_base(store.run_dir(r["id"])) or "model",
                     store.run_dir(r["id"])) for r in rows]
        out = []
        for ckpts in sorted(self.runs_dir.glob("*/checkpoints")):
            rd = ckpts.parent
            if not self.run or rd.name == self.run:
                out.append((rd.name, rd.name, _recorded_base(rd) or self.model or "model", rd))
        return out

    def entries(self) -> list[ModelEntry]:
        """Every servable name, re-scanning the run store and run directories."""
        from rlft.training.checkpoint import best_checkpoint, list_checkpoints

        out = []
        if self.model:
            out.append(ModelEntry(self.model, "base", self.model, self._started))
        out += [ModelEntry(n, "engine", created=self._started) for n in self.pinned]
        out += [ModelEntry(n, "adapter", p, _mtime(p), parent=self.model) for n, p in self.adapters.items()]
        for rid, _, base, rd in self._runs():
            ckpts = list_checkpoints(rd)
            for step, path in ckpts:
                out.append(ModelEntry(f"{FT_PREFIX}{base}:{rid}:{step}", "checkpoint", str(path), _mtime(path), base))
            if ckpts:
                out.append(ModelEntry(f"{FT_PREFIX}{base}:{rid}:latest", "checkpoint", str(ckpts[-1][1]),
                                      _mtime(ckpts[-1][1]), base))
            best = best_checkpoint(rd)
            path = next((p for s, p in ckpts if best and s == best[0]), None)
            if path is not None:
                out.append(ModelEntry(f"{FT_PREFIX}{base}:{rid}:best", "checkpoint", str(path), _mtime(path), base))
        return out

    def resolve(self, name: str) -> ModelEntry:
        """The entry a requested name stands for; ``latest`` and ``best`` become the concrete step's name."""
        if self.model is not None and name == self.model:
            return ModelEntry(name, "base", self.model, self._started)
        if name in self.pinned:
            return ModelEntry(name, "engine", created=self._started)
        if name in self.adapters:
            return ModelEntry(name, "adapter", self.adapters[name], _mtime(self.adapters[name]), self.model)
        entry = self._resolve_ft(name) if name.startswith(FT_PREFIX) else None
        if entry is not None:
            return entry
        available = [e.name for e in self.entries()]
        raise ModelNotFoundError(f"The model {name!r} does not exist. Available models: "
                                 + (", ".join(available) or "none"), available)

    def _resolve_ft(self, name: str) -> ModelEntry | None:
        from rlft.training.checkpoint import best_checkpoint, list_checkpoints

        try:
            base, ref, step = name[len(FT_PREFIX):].rsplit(":", 2)
        except ValueError:
            return None
        runs = self._runs()
        match = [r for r in runs if r[0] == ref] or [r for r in runs if r[1] == ref]
        if not match or match[0][2] != base:
            return None
        rid, _, _, rd = match[0]
        ckpts = list_checkpoints(rd)
        if step == "latest":
            chosen = ckpts[-1] if ckpts else None
        elif step == "best":
            best = best_checkpoint(rd)
            chosen = next((c for c in ckpts if best and c[0] == best[0]), None)
        else:
            chosen = next((c for c in ckpts if step.isdigit() and c[0] == int(step)), None)
        if chosen is None:
            return None
        return ModelEntry(f"{FT_PREFIX}{base}:{rid}:{chosen[0]}", "checkpoint", str(chosen[1]), _mtime(chosen[1]), base)

    # -- adapters registered at run time ----------------------------------------------------------
    def add_adapter(self, name: str, path: str) -> None:
        if name == self.model or name in self.pinned or name in self.adapters or name.startswith(FT_PREFIX):
            raise ValueError(f"a model named {name!r} is already served (or the name is reserved): pick another")
        full = os.path.abspath(os.path.expanduser(path))
        if not os.path.isfile(os.path.join(full, "adapter_config.json")):
            raise FileNotFoundError(f"{full} holds no LoRA adapter (no adapter_config.json)")
        self.adapters[name] = full

    def remove_adapter(self, name: str) -> None:
        path = self.adapters.pop(name)  # KeyError when unknown
        self._drop(f"adapter:{path}")

    # -- loading -----------------------------------------------------------------------------------
    async def acquire(self, name: str) -> tuple[ModelEntry, ServedModel]:
        """Resolve and load ``name`` (cached); call :meth:`release` when the request is done."""
        entry = self.resolve(name)
        if entry.kind == "engine":
            served = self.pinned[entry.name]
            served.active += 1
            return entry, served
        key = f"{entry.kind}:{entry.path}"
        async with self._locks.setdefault(key, asyncio.Lock()):  # concurrent requests load it once
            served = self.loaded.get(key)
            if served is None:
                served = await asyncio.to_thread(self._load, entry)
                self.loaded[key] = served
            self.loaded.move_to_end(key)
            served.active += 1
        while len(self.loaded) > self.max_loaded:
            self._drop(next(iter(self.loaded)))
        return entry, served

    def release(self, served: ServedModel) -> None:
        served.active -= 1
        if served.evicted and served.active == 0:
            served.close()

    def _drop(self, key: str) -> None:
        served = self.loaded.pop(key, None)
        if served is not None:
            served.evicted = True
            if served.active == 0:
                served.close()

    def close(self) -> None:
        for key in list(self.loaded):
            self._drop(key)

    def _load(self, entry: ModelEntry) -> ServedModel:
        from rlft.policy import load_policy

        if entry.kind == "base":  # the one copy of its weights that the adapters on it share
            policy = self.bases.base(entry.path)
        elif is_lora_dir(entry.path):  # a LoRA checkpoint or adapter: a view of its loaded base (shared_base.py)
            # a plain peft adapter (vLLM's case) goes on the served base; an rlft checkpoint on its recorded one
            policy = self.bases.adapter(entry.path, default_base=self.model if entry.kind == "adapter" else None)
        else:  # a full-finetune checkpoint: its own weights
            policy = load_policy(entry.path, dtype=self.dtype, device=self.device)
        from rlft.engines.hf import HFEngine

        engine: ServedEngine
        if self.engine_factory is not None:
            engine = self.engine_factory(policy)
        else:
            engine = HFEngine(policy.model, policy.tokenizer, max_batch_size=self.max_batch_size)
        context = engine.max_context or getattr(policy.base_model.config, "max_position_embeddings", None)
        # one Renderer per tokenizer (its template probing costs ~0.8 s on SmolLM2): the checkpoints of a
        # run share their tokenizer (rlft.serve.shared_base)
        tok = policy.tokenizer
        if id(tok) not in self._renderers:  # the tokenizer is kept in the value: its id stays its own
            self._renderers[id(tok)] = (tok, Renderer(tok))
        renderer = self._renderers[id(tok)][1]
        return ServedModel(engine, renderer, context, policy, constrained=isinstance(engine, HFEngine))

"""Ray rollout workers: environments (tools, MCP servers, sandboxes, rewards) in Ray actors.

``rollout_workers = N`` in the config: the trainer keeps the model and the optimizer; N actors
(on this machine, or on a cluster given by ``ray_address``, started with ``ray start --head``)
each import the environment from the config's ``env`` spec and build their own engine from a
picklable spec, so nothing unpicklable crosses the wire. Generation goes to a remote
OpenAI-compatible server (``engine = "openai"``: ``rlft serve`` or ``vllm serve``); the
in-process HF engine and the colocated vLLM engine live in the trainer's process and cannot be
shared with actors.

``RayRolloutPool.run_groups`` has the signature of ``Environment.run_groups`` (the sampler only
lends its sampling params, max_seq_len, policy version and the version its engine serves, which
each actor's engine then serves too: :class:`WorkerEngine`):
whole groups go to actors round-robin, so group rewards still see all siblings. A group whose
actor dies (``RayActorError``) is retried once on another live actor (a dead actor is replaced
by a fresh one); when that fails too its rollouts end with ``Termination.ERROR`` and an error
``where="worker"`` naming the worker, and the step completes.

An engine spec is ``"module:function"`` (or ``"path/to/file.py:function"``), or a tuple
``(that, kwargs)``; calling it returns ``(engine, renderer)``. ``remote_engine`` is the built-in
one for ``engine = "openai"``, specified from the trainer's own RemoteEngine (``engine_spec_for``).
``pool_from_config`` is the one function that reads a TrainConfig. Left out: training, the run
store. Ray is imported only here, and only when a pool is built: the default (``rollout_workers =
0``) never imports it.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import itertools
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from rlft.engines.base import Engine, TrainableEngine
from rlft.types import Group, Rollout, RolloutError, Termination

if TYPE_CHECKING:
    from rlft.config import TrainConfig
    from rlft.engines.remote import RemoteEngine

EngineSpec = Any  # "module:function" | ("module:function", {kwargs})


class WorkerEngine(Engine, Protocol):
    """What the pool asks of the trainer's engine and of each actor's: the ``policy_version`` it
    serves. Before each group the actor sets its engine's to the trainer's engine's: a
    RemoteEngine then sends its requests to the adapter the trainer pushed to their shared server
    as that version (nothing is pushed again); a ScriptedPolicy only labels its samples with it."""

    policy_version: int


def import_attr(spec: str) -> Any:
    """``"pkg.module:attr"`` or ``"path/to/file.py:attr"`` -> the attribute."""
    mod_part, sep, attr = spec.rpartition(":")
    if not sep or not mod_part or not attr:
        raise ValueError(f"{spec!r}: expected 'module:function' or 'path/to/file.py:function'")
    if mod_part.endswith(".py"):
        path = Path(mod_part).resolve()
        name = f"rlft_spec_{abs(hash(str(path)))}"
        module = sys.modules.get(name)
        if module is None:
            mod_spec = importlib.util.spec_from_file_location(name, path)
            if mod_spec is None or not path.exists():
                raise ValueError(f"{spec!r}: {path} does not exist")
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[name] = module
            mod_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(mod_part)
    if not hasattr(module, attr):
        raise ValueError(f"{spec!r}: module has no attribute {attr!r}")
    return getattr(module, attr)


def build_engine(spec: EngineSpec) -> tuple[Any, Any]:
    """(engine, renderer) from an engine spec."""
    target, kwargs = (spec, {}) if isinstance(spec, str) else (spec[0], dict(spec[1] or {}))
    fn = import_attr(target) if isinstance(target, str) else target
    out = fn(**kwargs)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(f"engine factory {target!r} must return (engine, renderer), got {type(out).__name__}")
    return out


def remote_engine(base_url: str, model: str, tokenizer: str, *, chat_template: str | None = None,
                  tool_parser: str = "auto", tool_format: str = "auto", tag: str = "",
                  api_key_env: str = "RLFT_ENGINE_API_KEY", max_concurrency: int = 64,
                  stop_token_ids: list[int] | None = None) -> tuple[Any, Any]:
    """The engine factory for ``engine = "openai"``: a RemoteEngine and a renderer for the
    policy's tokenizer (``tokenizer``: the trainer's ``model``; only the tokenizer is loaded)."""
    from rlft.engines.remote import RemoteEngine
    from rlft.model_files import load_tokenizer
    from rlft.policy import _ensure_chat_template, resolve_model
    from rlft.renderer import Renderer

    if os.path.isfile(os.path.join(os.path.expanduser(tokenizer), "tokenizer_config.json")):
        name, gguf = os.path.expanduser(tokenizer), None  # a tokenizer-only directory
    else:
        name, gguf = resolve_model(tokenizer)
    tok = load_tokenizer(name, gguf, False, [])
    _ensure_chat_template(tok, tokenizer, chat_template)
    engine = RemoteEngine(base_url, model, tag=tag, api_key=os.environ.get(api_key_env),
                          max_concurrency=max_concurrency, stop_token_ids=stop_token_ids)
    return engine, Renderer(tok, tool_parser=tool_parser, tool_format=tool_format)


def engine_spec_for(engine: RemoteEngine, *, tokenizer: str, chat_template: str | None = None,
                    tool_parser: str = "auto", tool_format: str = "auto") -> EngineSpec:
    """The picklable spec of an actor's engine: a RemoteEngine on the same server, base model name,
    tag, concurrency and stop ids as the trainer's ``engine``; a renderer over ``tokenizer`` (the
    trainer's model)."""
    return ("rlft.ray_workers:remote_engine", {
        "base_url": engine.base_url, "model": engine.model, "tokenizer": tokenizer, "chat_template": chat_template,
        "tool_parser": tool_parser, "tool_format": tool_format, "tag": engine.tag,
        "max_concurrency": engine.max_concurrency, "stop_token_ids": list(engine.stop_token_ids) or None})


class RolloutWorker:
    """One Ray actor (async: its groups run concurrently on one event loop): the environment,
    imported from ``env_spec``, and its own engine."""

    def __init__(self, env_spec: str, engine_spec: EngineSpec, index: int = 0, max_concurrency: int = 256,
                 unconfined: bool = False):
        from rlft.loader import load_environment
        from rlft.rewards.confinement import environment_isolation
        from rlft.rewards.sandbox import set_unconfined

        self.index = index
        self.env, module, _ = load_environment(env_spec)
        # The trainer's `sandbox_unconfined` holds in this process too, and the isolation is this
        # node's own: a worker on a host without namespaces refuses untrusted code here, at start.
        set_unconfined(unconfined)
        iso = environment_isolation(self.env, module)
        self.isolation = iso.line() if iso is not None else ""
        self.engine, self.renderer = build_engine(engine_spec)
        self.max_concurrency = max(1, int(max_concurrency))
        self._sem: asyncio.Semaphore | None = None
        self._session: Any = None
        self._lock: asyncio.Lock | None = None

    def ready(self) -> dict[str, Any]:
        import ray

        ctx = ray.get_runtime_context()
        return {"index": self.index, "pid": os.getpid(), "node": ctx.get_node_id(), "actor": ctx.get_actor_id(),
                "isolation": self.isolation}

    async def _open(self) -> None:
        if self._lock is None:
            self._lock, self._sem = asyncio.Lock(), asyncio.Semaphore(self.max_concurrency)
        async with self._lock:
            if self._session is None:  # shared MCP servers: opened once, for the actor's life
                cm = self.env.session()
                await cm.__aenter__()
                self._session = cm

    async def run_group(self, example: dict[str, Any], example_id: int, group_size: int, params: Any,
                        max_seq_len: int, policy_version: int, engine_version: int) -> Group:
        """``policy_version``: the rollouts' label; ``engine_version``: the weights the trainer's
        engine serves, which this actor's engine serves from now on (WorkerEngine)."""
        from rlft.env import Sampler
        from rlft.rewards import score_group

        await self._open()
        self.engine.policy_version = engine_version
        sampler = Sampler(self.engine, self.renderer, params, max_seq_len=max_seq_len, policy_version=policy_version)

        async def one(g: int) -> Rollout:
            async with self._sem:  # type: ignore[union-attr]
                return await self.env.rollout(example, sampler, example_id=example_id, group_index=g)

        rollouts = list(await asyncio.gather(*(one(g) for g in range(group_size))))
        await score_group(rollouts, self.env.rewards, self.env.reward_timeout)
        for ro in rollouts:
            ro.state = {}  # per-rollout scratch stays on the worker (it may not pickle)
            ro.metrics["rollout/worker"] = float(self.index)
        return Group(example=example, rollouts=rollouts, example_id=example_id)


class RayRolloutPool:
    """``n_workers`` RolloutWorker actors. ``ray_address``: an existing cluster (``ray start
    --head``; ``"auto"`` finds the local one); empty = start (or reuse) a local Ray instance.
    ``max_concurrency``: rollouts in flight per worker. ``retries``: re-runs of a group whose
    worker died. ``num_cpus``: CPUs each actor reserves. ``unconfined``: the trainer's
    ``sandbox_unconfined``, applied in each actor (whose sandbox isolation is checked on its own
    node: a refusal raises SandboxRefusedError here). ``runtime_env``: Ray's, for each actor (e.g.
    ``{"env_vars": {...}}``)."""

    def __init__(self, env_spec: str, engine_spec: EngineSpec, n_workers: int, ray_address: str | None = None, *,
                 max_concurrency: int = 256, retries: int = 1, num_cpus: float = 1.0, unconfined: bool = False,
                 runtime_env: dict[str, Any] | None = None, ray_init_kwargs: dict[str, Any] | None = None):
        import ray

        if n_workers < 1:
            raise ValueError("RayRolloutPool needs n_workers >= 1 (rollout_workers = 0 runs rollouts in-process)")
        if not env_spec:
            raise ValueError("RayRolloutPool needs the environment's spec (a file path or pkg.module:attr), "
                             "not an Environment object: each actor imports it")
        if not ray.is_initialized():
            kw = {"include_dashboard": False, "log_to_driver": True, **(ray_init_kwargs or {})}
            if ray_address:
                kw["address"] = ray_address
            ray.init(**kw)
        path_part, sep, attr = env_spec.partition(":")
        if Path(path_part).exists():  # the actors' working directory may differ: an absolute path
            env_spec = str(Path(path_part).resolve()) + sep + attr
        self.env_spec = env_spec
        self.engine_spec = engine_spec
        self.max_concurrency = max_concurrency
        self.retries = max(0, int(retries))
        self.num_cpus = num_cpus
        self.unconfined = unconfined
        self.runtime_env = runtime_env
        self._actor_cls = ray.remote(RolloutWorker)
        self.actors: list[Any] = [self._spawn(i) for i in range(n_workers)]
        try:
            self.info: list[dict[str, Any]] = ray.get([a.ready.remote() for a in self.actors])  # raises a failed import
        except ray.exceptions.RayError as e:
            self.shutdown()
            raise _user_error_from(e) from e
        self.restarts = 0
        self.failed_groups = 0
        self.retried_groups = 0

    def _spawn(self, index: int) -> Any:
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "max_concurrency": max(1000, self.max_concurrency)}
        if self.runtime_env:
            options["runtime_env"] = self.runtime_env
        return self._actor_cls.options(**options).remote(self.env_spec, self.engine_spec, index,
                                                         self.max_concurrency, self.unconfined)

    def describe(self, index: int) -> str:
        info = self.info[index] if index < len(self.info) else {}
        return (f"rollout worker {index} (actor {str(info.get('actor', '?'))[:12]}, pid {info.get('pid', '?')}, "
                f"node {str(info.get('node', '?'))[:12]})")

    async def _replace(self, index: int, dead: Any) -> None:
        """A fresh actor in the dead one's slot (once per death: concurrent failures share it)."""
        if self.actors[index] is not dead:
            return
        new = self._spawn(index)
        self.actors[index] = new
        self.restarts += 1
        try:
            self.info[index] = await new.ready.remote()
        except Exception:  # noqa: BLE001 - it will fail its groups, which are then marked failed
            pass

    async def run_groups(self, examples: list[dict[str, Any]], sampler: Any, group_size: int, *,
                         max_concurrency: int | None = None, example_ids: list[int] | None = None) -> list[Group]:
        """Like ``Environment.run_groups``: one Group per example, in order, rewards scored."""
        import ray

        ids = example_ids if example_ids is not None else [ex.get("example_id", i) for i, ex in enumerate(examples)]
        engine_version = sampler.engine.policy_version  # a WorkerEngine: the version weight sync moved it to
        params, seq, version = sampler.params, sampler.max_seq_len, sampler.policy_version
        order = itertools.count()

        async def group(ex: dict[str, Any], eid: int, first: int) -> Group:
            index = first % len(self.actors)
            tried: list[str] = []
            for attempt in range(self.retries + 1):
                actor = self.actors[index]
                try:
                    return await actor.run_group.remote(ex, eid, group_size, params, seq, version, engine_version)
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:
                    tried.append(f"{self.describe(index)}: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}")
                    await self._replace(index, actor)
                    if attempt < self.retries:
                        self.retried_groups += 1
                        index = (index + 1) % len(self.actors)  # elsewhere (its own fresh slot if it is the only one)
            self.failed_groups += 1
            return failed_group(ex, eid, group_size, version, "; then ".join(tried))

        return list(await asyncio.gather(*(group(ex, eid, next(order)) for ex, eid in zip(examples, ids))))

    def shutdown(self) -> None:
        """Stop the actors (Ray itself stays up: ``ray.shutdown()`` is the caller's)."""
        import ray

        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001
                pass
        self.actors = []


def _user_error_from(error: Exception) -> Exception:
    """An actor's constructor refused by the sandbox (Ray keeps only the text of what it raised):
    that refusal, a user error with its reason; anything else unchanged."""
    from rlft.rewards.sandbox import SandboxRefusedError

    text = str(error)
    if "SandboxRefusedError: " not in text:
        return error
    reason = text[text.rindex("SandboxRefusedError: "):].split(": ", 1)[1].strip().splitlines()[0]
    return SandboxRefusedError(f"a Ray rollout worker: {reason}")


def failed_group(example: dict[str, Any], example_id: int, group_size: int, policy_version: int, why: str) -> Group:
    """A group whose workers died: every rollout ends with ERROR and the worker named."""
    rollouts = [Rollout(example=example, example_id=example_id, group_index=g, policy_version=policy_version,
                        termination=Termination.ERROR,
                        errors=[RolloutError(where="worker", message=f"rollout worker died, retries exhausted: {why}")])
                for g in range(group_size)]
    return Group(example=example, rollouts=rollouts, example_id=example_id)


def rollout_pool(env_spec: str, workers: int, engine: TrainableEngine, *, tokenizer: str,
                 chat_template: str | None = None, tool_parser: str = "auto", tool_format: str = "auto",
                 ray_address: str | None = None, max_concurrency: int = 256,
                 unconfined: bool = False) -> RayRolloutPool:
    """The trainer's pool: ``workers`` actors, each importing the environment from ``env_spec`` and
    generating on the server of the trainer's ``engine``, which must be a RemoteEngine (the
    in-process engines cannot be shared with actors)."""
    from rlft.engines.remote import RemoteEngine

    if not env_spec:
        raise ValueError("rollout_workers > 0 needs `env` in the config (a file or pkg.module:attr) so that each "
                         "Ray actor can import the environment; an Environment object passed to train() cannot be sent")
    if not isinstance(engine, RemoteEngine):
        raise ValueError(
            f"rollout_workers > 0 needs engine = \"openai\" (a server the Ray actors can reach: rlft serve, or "
            f"vllm serve --enable-lora), not a {type(engine).__name__}: the in-process HF engine and the colocated "
            "vLLM engine live in the trainer's process and cannot be shared with actors. Set rollout_workers = 0 "
            "to run rollouts in-process.")
    spec = engine_spec_for(engine, tokenizer=tokenizer, chat_template=chat_template, tool_parser=tool_parser,
                           tool_format=tool_format)
    try:
        import ray  # noqa: F401
    except ImportError as e:
        raise ImportError("rollout_workers > 0 needs Ray: pip install 'rlft[ray]' (or pip install ray)") from e
    return RayRolloutPool(env_spec, spec, workers, ray_address or None, max_concurrency=max_concurrency,
                          unconfined=unconfined)


def pool_from_config(cfg: TrainConfig, engine: TrainableEngine) -> RayRolloutPool:
    """:func:`rollout_pool` with a training config's values."""
    return rollout_pool(cfg.env, cfg.rollout_workers, engine, tokenizer=cfg.model,
                        chat_template=cfg.chat_template or None, tool_parser=cfg.tool_parser,
                        tool_format=cfg.tool_format, ray_address=cfg.ray_address, max_concurrency=cfg.max_concurrency,
                        unconfined=cfg.sandbox_unconfined)


__all__ = ["RayRolloutPool", "RolloutWorker", "WorkerEngine", "remote_engine", "engine_spec_for", "rollout_pool",
           "pool_from_config", "build_engine", "import_attr", "failed_group"]

"""Remote engine: sampling through an OpenAI-compatible server that returns sampled token ids.

:class:`RemoteEngine` implements the Engine protocol with ``POST /v1/completions`` and a
token-id prompt (``"prompt": [ids]``), asking for the sampled ids and their logprobs
(``"return_token_ids": true``, ``"logprobs": 0``: vLLM's names; ``rlft serve`` answers the same).
So rollouts can run on other machines than the trainer, against ``vllm serve`` or ``rlft serve``.

Weight sync is by LoRA adapter (``weight_format`` ADAPTER, :meth:`RemoteEngine.sync_weights`): the trainer writes the
adapter of version ``v`` to a directory the server can read (same machine or a shared
filesystem), the engine registers it with ``POST /v1/load_lora_adapter`` under the name
``<model>@v<v>`` (``<model>@<tag>@v<v>`` with a ``tag``, e.g. the run id, so that runs sharing a
server do not collide), sends every later request to that name and unloads the previous
version. Version 0 is the base model itself (a fresh LoRA adapter is the identity). The name a
request goes to is a function of ``policy_version`` alone, so another RemoteEngine on the same
server (a Ray rollout worker's) serves a version the trainer pushed once its ``policy_version`` is set.

Reported version: each :class:`Sample`'s ``policy_version`` is read from the ``model`` field of
the server's answer, i.e. the adapter that actually served the request (vLLM and ``rlft serve``
both answer with the adapter's name), not the version the engine meant to ask for. An engine that
was never synced therefore reports the old version, and the trainer's sync check catches it.

Needs ``httpx`` (the ``serve`` extra). Servers: ``rlft serve``; vLLM >= 0.10.2 (``vllm serve
MODEL --enable-lora --max-lora-rank R`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` for the
adapter routes). Left out: full-weight sync to a remote server (LoRA only), streaming.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from rlft.engines.base import Sample, SamplingParams, WeightFormat, WeightUpdate

__all__ = ["RemoteEngine", "RemoteEngineError", "RemoteStats", "version_of"]


class RemoteEngineError(RuntimeError):
    """The server refused a request or answered without the token ids / logprobs the trainer needs."""


@dataclass
class RemoteStats:
    requests: int = 0  # /v1/completions answered
    tokens_generated: int = 0
    adapters_loaded: int = 0
    adapters_unloaded: int = 0
    retries: int = 0


def version_of(served_name: str, base: str, tag: str = "") -> int | None:
    """The policy version a served model name stands for: 0 for ``base``, ``v`` for
    ``<base>@v<v>`` (``<base>@<tag>@v<v>`` with a tag); None for any other name."""
    if served_name == base:
        return 0
    prefix = f"{base}@{tag}@v" if tag else f"{base}@v"
    tail = served_name[len(prefix):] if served_name.startswith(prefix) else ""
    return int(tail) if tail.isdigit() else None


class RemoteEngine:
    """TrainableEngine over an OpenAI-compatible server (``/v1/completions`` with token ids).

    ``base_url``: the server (``http://host:8000``; a trailing ``/v1`` is accepted). ``model``: the
    base model's name on the server. ``api_key``: sent as ``Authorization: Bearer``.
    ``max_concurrency``: requests in flight at once (the server batches them). ``stop_token_ids``:
    end-of-turn ids the server should stop at besides its own eos (vLLM's extension; rlft serve
    already stops at the model's end-of-turn tokens). ``tag``: goes into adapter names.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout: float = 600.0,
                 max_concurrency: int = 64, stop_token_ids: Iterable[int] | None = None, tag: str = "",
                 retries: int = 2, policy_version: int = 0):
        import httpx  # noqa: F401  (fail at construction, not at the first rollout)

        if not base_url:
            raise ValueError("RemoteEngine needs the server's base URL (engine_url), e.g. http://127.0.0.1:8000")
        url = base_url.rstrip("/")
        self.base_url = url[:-3] if url.endswith("/v1") else url
        self.model = model
        self.api_key = api_key
        self.timeout = float(timeout)
        self.max_concurrency = max(1, int(max_concurrency))
        self.stop_token_ids = sorted(int(t) for t in stop_token_ids) if stop_token_ids else []
        self.tag = tag
        self.retries = max(0, int(retries))
        self.policy_version = int(policy_version)  # the version requests are sent to (served_name)
        self.stats = RemoteStats()
        self._client: Any = None
        self._client_loop: Any = None
        self._sem: asyncio.Semaphore | None = None

    # weights can only be pushed as LoRA adapters, saved where the server can read them
    weight_format = WeightFormat.ADAPTER

    # -- names -----------------------------------------------------------------------------------
    def adapter_name(self, version: int) -> str:
        return f"{self.model}@{self.tag}@v{version}" if self.tag else f"{self.model}@v{version}"

    @property
    def served_name(self) -> str:
        """The name requests are sent to: the base model at version 0, else that version's adapter."""
        return self.model if self.policy_version == 0 else self.adapter_name(self.policy_version)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    # -- generation ------------------------------------------------------------------------------
    def _async_client(self) -> Any:
        """One AsyncClient per event loop (a client is bound to the loop that first used it)."""
        import httpx

        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            self._client = httpx.AsyncClient(base_url=self.base_url, headers=self._headers(),
                                             timeout=httpx.Timeout(self.timeout),
                                             limits=httpx.Limits(max_connections=self.max_concurrency))
            self._client_loop = loop
            self._sem = asyncio.Semaphore(self.max_concurrency)
        return self._client

    def request_body(self, prompt_ids: list[int], params: SamplingParams) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.served_name, "prompt": [int(t) for t in prompt_ids],
                                "max_tokens": int(params.max_new_tokens), "temperature": float(params.temperature),
                                "top_p": float(params.top_p), "logprobs": 0, "return_token_ids": True}
        if params.top_k > 0:
            body["top_k"] = int(params.top_k)
        if params.stop:
            body["stop"] = list(params.stop)
            body["include_stop_str_in_output"] = True  # vLLM: keep the stop text, as the Engine protocol does
        if params.seed is not None:
            body["seed"] = int(params.seed)
        if self.stop_token_ids:
            body["stop_token_ids"] = self.stop_token_ids
        return body

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Sample:
        """Sample one continuation of ``prompt_ids`` on the server."""
        if not prompt_ids:
            raise ValueError("prompt_ids is empty: render at least one token (e.g. the chat template's prefix).")
        if params.max_new_tokens <= 0:
            return Sample([], [], "length", self.policy_version)
        client = self._async_client()
        body = self.request_body(prompt_ids, params)
        async with self._sem:  # type: ignore[union-attr]
            data = await self._post(client, "/v1/completions", body)
        return self._sample(data)

    async def _post(self, client: Any, path: str, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        for attempt in range(self.retries + 1):
            try:
                r = await client.post(path, json=body)
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as e:
                if attempt == self.retries:
                    raise RemoteEngineError(f"{self.base_url}{path}: {type(e).__name__}: {e}") from e
            else:
                if r.status_code in (502, 503, 504) and attempt < self.retries:
                    pass
                else:
                    return self._json(r, path)
            self.stats.retries += 1
            await asyncio.sleep(0.5 * 2 ** attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _json(self, r: Any, path: str) -> dict[str, Any]:
        if r.status_code != 200:
            try:
                msg = r.json()["error"]["message"]
            except Exception:  # noqa: BLE001 - an error body may be anything (not JSON, another shape): show its text
                msg = r.text[:500]
            err = ValueError if r.status_code == 400 else RemoteEngineError  # 400: e.g. context length
            raise err(f"{self.base_url}{path} answered {r.status_code}: {msg}")
        return r.json()

    def _sample(self, data: dict[str, Any]) -> Sample:
        try:
            choice = data["choices"][0]
        except (KeyError, IndexError, TypeError):
            raise RemoteEngineError(
                f"{self.base_url}/v1/completions answered without choices: {str(data)[:300]}") from None
        tokens = choice.get("token_ids")
        if tokens is None:
            raise RemoteEngineError(
                f"{self.base_url} does not return sampled token ids: the trainer needs them. Use rlft serve, or "
                "vLLM >= 0.10.2 (which returns them for \"return_token_ids\": true).")
        lp = (choice.get("logprobs") or {}).get("token_logprobs")
        if lp is None or len(lp) != len(tokens):
            raise RemoteEngineError(f"{self.base_url} returned {len(tokens)} token ids but "
                                    f"{'no' if lp is None else len(lp)} logprobs")
        served = data.get("model", self.served_name)
        version = version_of(served, self.model, self.tag)
        if version is None:
            raise RemoteEngineError(f"{self.base_url} answered with model {served!r}, which is neither the base "
                                    f"model {self.model!r} nor one of its pushed versions "
                                    f"({self.adapter_name(0)[:-1]}<N>)")
        self.stats.requests += 1
        self.stats.tokens_generated += len(tokens)
        finish = "length" if choice.get("finish_reason") == "length" else "stop"
        return Sample(tokens=[int(t) for t in tokens], logprobs=[float(x) if x is not None else 0.0 for x in lp],
                      finish_reason=finish, policy_version=version)

    # -- weight sync -----------------------------------------------------------------------------
    def _admin(self, path: str, body: dict[str, Any]) -> Any:
        import httpx

        with httpx.Client(base_url=self.base_url, headers=self._headers(), timeout=self.timeout) as c:
            return c.post(path, json=body)

    def push_adapter(self, adapter_dir: str | os.PathLike, name: str) -> None:
        """Register the LoRA adapter in ``adapter_dir`` on the server under ``name``
        (``/v1/load_lora_adapter``; a name already taken is unloaded first)."""
        body = {"lora_name": name, "lora_path": os.path.abspath(os.fspath(adapter_dir))}
        r = self._admin("/v1/load_lora_adapter", body)
        if r.status_code == 400 and "already" in r.text:
            self.unload_adapter(name)  # e.g. a resumed run pushing the same version again
            r = self._admin("/v1/load_lora_adapter", body)
        if r.status_code != 200:
            raise RemoteEngineError(f"{self.base_url}/v1/load_lora_adapter answered {r.status_code}: {r.text[:500]} "
                                    "(vLLM needs --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; the "
                                    "adapter directory must be readable by the server)")
        self.stats.adapters_loaded += 1

    def unload_adapter(self, name: str) -> bool:
        r = self._admin("/v1/unload_lora_adapter", {"lora_name": name})
        ok = r.status_code == 200
        self.stats.adapters_unloaded += int(ok)
        return ok

    def sync_weights(self, update: WeightUpdate) -> None:
        """Serve the adapter in ``update.adapter_dir`` as version ``update.version`` from now on;
        the previous version is unloaded. Version 0 is the base model: nothing to push."""
        version = int(update.version)
        if version == 0:
            if update.adapter_dir is not None:  # its name would be the base model's: keep it unambiguous
                raise ValueError("version 0 is the base model; adapters are pushed as versions >= 1")
        elif update.adapter_dir is None:
            raise RemoteEngineError("RemoteEngine syncs weights as LoRA adapters: the update needs adapter_dir "
                                    "(train with lora = true to use engine = \"openai\")")
        else:
            self.push_adapter(update.adapter_dir, self.adapter_name(version))
        old = self.served_name
        self.policy_version = version
        if old != self.served_name and old != self.model:
            with contextlib.suppress(Exception):  # an adapter left loaded costs memory, not correctness
                self.unload_adapter(old)

    @contextlib.contextmanager
    def paused(self):
        """Nothing to hold: the server's weights are not the trainer's."""
        yield

    def clear_prefix_cache(self) -> None:
        """Nothing to clear here: the server's cache is its own, and the server batches this
        client's requests with whatever else it serves, so its numbers never depended on this
        client's order alone."""

    def health(self, timeout: float = 60.0) -> None:
        """Wait until the server answers ``GET /health`` (or ``/v1/models``)."""
        import httpx

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with httpx.Client(base_url=self.base_url, headers=self._headers(), timeout=5) as c:
                    for path in ("/health", "/v1/models"):
                        if c.get(path).status_code == 200:
                            return
            except httpx.HTTPError as e:
                last = e
            time.sleep(0.2)
        raise RemoteEngineError(f"{self.base_url} did not answer within {timeout:.0f}s ({last})")

    def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        loop = self._client_loop
        try:
            if loop is not None and not loop.is_closed() and not loop.is_running():
                loop.run_until_complete(client.aclose())
        except Exception:  # noqa: BLE001 - closing is best-effort: close() must not raise over a failed aclose
            pass

"""``rlft serve``: an OpenAI-compatible HTTP server for a base model or any checkpoint of a run.

Routes (FastAPI + uvicorn; names, loading and the request/sample translation: :mod:`rlft.serve.models`):

- ``GET /v1/models`` (and ``/v1/models/{name}``): the base model (named as given),
  ``ft:<base>:<run>:<step>`` and ``ft:<base>:<run>:latest`` for the run store's checkpoints (new
  ones appear without a restart), and registered adapters.
- ``POST /v1/chat/completions``: ``messages`` (assistant ``tool_calls``, ``tool`` messages; text
  content parts; ``developer`` = ``system``), ``tools``, ``tool_choice``, ``stream`` (SSE chunks,
  ``stream_options.include_usage``, ends with ``data: [DONE]``), ``n``, ``temperature``,
  ``top_p``, ``top_k`` (vLLM's), ``max_tokens`` / ``max_completion_tokens``, ``stop`` (cut from the
  text), ``seed`` (choice ``i`` uses ``seed + i``), ``logprobs`` and ``top_logprobs`` (up to 20, streamed
  too), ``response_format`` and ``parallel_tool_calls`` (below); ``usage`` in every response.
  Tool calls come back OpenAI-style (``finish_reason: "tool_calls"``, ``arguments`` a JSON string).
  The ``model`` of a response is the concrete name that answered (``...:latest`` -> ``...:<step>``).
- ``POST /v1/completions`` (vLLM's names): ``prompt`` as token ids (``[1, 2, 3]``), a string, or a
  list of either; ``n``, ``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``stop``, ``seed``,
  ``logprobs`` (k <= 20: the legacy shape, the k most likely tokens of each position plus the sampled
  one; 0 = the sampled token's only), ``return_token_ids`` (each choice gets
  ``token_ids``, the sampled ids exactly, and ``prompt_token_ids``). The prompt is sent to the
  model as is: no chat template. ``rlft.engines.remote.RemoteEngine`` samples through this route.
- ``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}`` and ``/v1/unload_lora_adapter``
  ``{"lora_name"}`` (vLLM's routes): serve a LoRA adapter directory under a name (an rlft
  checkpoint loads on its recorded base, a plain peft adapter on the served base).
- ``GET /health``. With ``api_key``, every ``/v1`` route needs ``Authorization: Bearer <key>``.

Extension (vLLM's names): ``"return_token_ids": true`` in the body adds ``prompt_token_ids`` (the
rendered prompt) to the response and ``token_ids`` to every choice: the exact sampled ids, the
end-of-turn token and any stop text included (the text has them cut), one to one with
``logprobs.content``. In a stream each chunk carries its tokens' ``token_ids`` and the first chunk
``prompt_token_ids``.

Logprobs (the sampled token's and ``top_logprobs``) are one distribution, the engine's:
``log_softmax(logits / T)`` over the whole vocabulary at the request's temperature ``T``, before
top-p/top-k truncation, with ``T = 1`` for greedy (``temperature: 0``) requests. So the sampled
token's logprob equals its entry in ``top_logprobs``, and a judge reading the model's own
next-token distribution sends ``temperature`` 0 or 1 (OpenAI and vLLM's default report the raw
model distribution whatever the temperature; here another temperature rescales it). An engine
plugged in with ``engines=`` that does not report top logprobs answers a request for them with 400.

``tool_choice`` "required" or a named function, and ``response_format`` ``json_object`` /
``json_schema``, are enforced by constrained decoding on the in-process HFEngine
(``structured.py`` says how, and what an engine plugged in with ``engines=`` does instead).
Streaming sends content deltas as tokens are sampled (``streaming.py``).

Left out: streaming and ``echo`` on ``/v1/completions``, embeddings, images/audio
parts, and (accepted, ignored) presence/frequency penalties and ``logit_bias``.

A ``tool`` message must answer a call of an earlier assistant message (its ``tool_call_id``),
else 400, as OpenAI's API answers.

The parts: request bodies -> prompt ids and sampling params ``requests.py``, chat messages
``messages.py``, tools and forced structure ``structured.py``, sampled tokens -> choice fields
``replies.py``, streamed chats ``streaming.py``, errors ``errors.py``, the model side ``models.py``,
running the app ``server.py``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hmac
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

try:  # the serve extra; without it this module still imports (the CLI's arguments), create_app says what to install
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.background import BackgroundTask
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError:  # pragma: no cover
    FastAPI = None  # type: ignore[assignment,misc]

from rlft.serve.errors import APIError, engine_error
from rlft.serve.messages import chat_messages
from rlft.serve.models import ModelNotFoundError, ModelRegistry, ServedEngine
from rlft.serve.replies import completion_logprobs, final_choice, token_logprobs, token_stream
from rlft.serve.requests import (
    ChatRequest,
    CompletionRequest,
    LoraRequest,
    check_top_logprobs,
    completion_prompts,
    sampling_params,
)
from rlft.serve.server import MAX_BODY_BYTES, BackgroundServer, add_serve_arguments, run_server, serve_main
from rlft.serve.streaming import chat_stream
from rlft.serve.structured import forces_structure, reply_grammar, tool_setup

__all__ = ["APIError", "BackgroundServer", "ChatRequest", "CompletionRequest", "add_serve_arguments", "create_app",
           "run_server", "serve_main", "token_stream"]


def _json(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


# -- the app ------------------------------------------------------------------------------------------

def create_app(model: str | None = None, *, runs_dir: str | None = None, run: str | None = None,
               engines: dict[str, Any] | None = None, engine_factory: Callable[[Any], ServedEngine] | None = None,
               api_key: str | None = None, dtype: Any = "bfloat16", device: Any = "auto", max_loaded: int = 3,
               max_batch_size: int = 32, max_n: int = 16, default_max_tokens: int = 1024,
               preload: bool = False, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app. ``model``: a base model (hub id, alias, directory or checkpoint dir);
    ``runs_dir``/``run``: serve the checkpoints of the run store there (one run only with ``run``);
    ``engines``: ``{name: ServedModel | (engine, renderer_or_tokenizer)}`` served as is (tests,
    custom backends); ``engine_factory(policy)``: the ServedEngine for loaded policies (default HFEngine);
    ``preload``: load ``model`` at startup (errors then stop the server at once); ``max_body_bytes``:
    larger requests are refused with 413.

    Rendering and tokenising a prompt run in one worker thread, never on the event loop: a 10 MB
    message takes seconds to tokenise, and ``/health`` and every other request must not wait for
    it. One thread, because a tokenizer is not safe to share between concurrent encodes."""
    if FastAPI is None:
        raise ImportError("rlft serve needs fastapi and uvicorn: pip install 'rlft[serve]'")
    registry = ModelRegistry(model, runs_dir=runs_dir, run=run, engines=engines, engine_factory=engine_factory,
                             dtype=dtype, device=device, max_loaded=max_loaded, max_batch_size=max_batch_size)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if preload and model is not None:
            registry.release((await registry.acquire(os.fspath(model)))[1])
        yield
        registry.close()
        render_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="rlft serve", lifespan=lifespan)
    app.state.registry = registry
    render_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlft-serve-render")

    async def off_loop(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(render_pool, functools.partial(fn, *args))

    @app.middleware("http")
    async def _cap_body(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > max_body_bytes:
            return _json(APIError(413, f"request body of {int(size)} bytes is over the limit of {max_body_bytes} bytes "
                                       "(rlft serve --max-body-mb)", code="request_too_large"))
        return await call_next(request)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _json(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        err = (e.errors() or [{}])[0]
        loc = [p for p in err.get("loc", ()) if p != "body"]
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
        if err.get("type") == "json_invalid":
            param = None
        return _json(APIError(400, f"{param or 'body'}: {err.get('msg', 'invalid request body')}", param=param,
                        code=err.get("type")))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return _json(APIError(e.status_code, str(e.detail), code=str(e.status_code)))

    if api_key:
        @app.middleware("http")
        async def _auth(request: Request, call_next):
            given = request.headers.get("authorization", "")
            if request.url.path.startswith("/v1") and not hmac.compare_digest(given.encode(),
                                                                               f"Bearer {api_key}".encode()):
                return _json(APIError(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'.",
                                code="invalid_api_key"))
            return await call_next(request)

    def card(e) -> dict[str, Any]:
        return {"id": e.name, "object": "model", "created": e.created, "owned_by": "rlft", "root": e.path or e.name,
                "parent": e.parent}

    @app.get("/health")
    async def health():
        return PlainTextResponse("ok")

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [card(e) for e in registry.entries()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        try:
            return card(registry.resolve(name))
        except ModelNotFoundError as e:
            raise APIError(404, str(e), param="model", code="model_not_found") from e

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoraRequest):
        try:
            registry.add_adapter(body.lora_name, body.lora_path)
        except ValueError as e:
            raise APIError(400, str(e), param="lora_name") from e
        except FileNotFoundError as e:
            raise APIError(400, str(e), param="lora_path") from e
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: LoraRequest):
        try:
            registry.remove_adapter(body.lora_name)
        except KeyError:
            raise APIError(404, f"no LoRA adapter named {body.lora_name!r}", param="lora_name",
                           code="model_not_found") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    async def acquire(model: str):
        """The loaded model for a request's name, or an OpenAI-style 404/500."""
        try:
            return await registry.acquire(model)
        except ModelNotFoundError as e:
            raise APIError(404, str(e), param="model", code="model_not_found") from e
        except Exception as e:
            raise APIError(500, f"could not load model {model!r}: {type(e).__name__}: {e}", type="server_error") from e

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        if req.stream or req.echo:
            raise APIError(400, f"{'stream' if req.stream else 'echo'} is not supported on /v1/completions",
                           param="stream" if req.stream else "echo")
        entry, served = await acquire(req.model)
        try:
            prompts = await off_loop(completion_prompts, served.renderer.tokenizer, req.prompt)
            if len(prompts) * req.n > max_n:
                raise APIError(400, f"prompts x n must be at most {max_n}, got {len(prompts) * req.n}", param="n")
            jobs = [(p, sampling_params(req, len(p), served.max_context, default_max_tokens)) for p in prompts]
            try:
                samples = await asyncio.gather(*(served.engine.generate(p, sp)
                                                 for p, params in jobs for sp in params))
            except Exception as e:
                raise engine_error(e) from e
        finally:
            registry.release(served)
        check_top_logprobs(samples, jobs[0][1], entry.name)
        choices, tok = [], served.renderer.tokenizer
        for i, s in enumerate(samples):
            prompt, params = jobs[i // req.n]
            text, _, finish = final_choice(served, s, params[0].stop, False)
            c: dict[str, Any] = {"index": i, "text": text, "finish_reason": finish,
                                 "logprobs": completion_logprobs(tok, s.tokens, s.logprobs, s.top_logprobs)
                                 if req.logprobs is not None else None}
            if req.return_token_ids:
                c["prompt_token_ids"], c["token_ids"] = prompt, list(s.tokens)
            choices.append(c)
        n_prompt = sum(len(p) for p, _ in jobs)  # each prompt once, whatever n (as OpenAI and vLLM count)
        n_completion = sum(len(s.tokens) for s in samples)
        return {"id": "cmpl-" + uuid.uuid4().hex, "object": "text_completion", "created": int(time.time()),
                "model": entry.name, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
                          "total_tokens": n_prompt + n_completion}}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        if req.n > max_n:
            raise APIError(400, f"n must be at most {max_n}, got {req.n}", param="n")
        tools, instruction, parse = tool_setup(req)
        messages = chat_messages(req.messages, instruction)
        entry, served = await acquire(req.model)
        released = []

        def release() -> None:
            if not released:
                released.append(True)
                registry.release(served)

        streaming = False
        try:
            try:
                prompt = await off_loop(served.renderer.render_prompt, messages, tools)
            except Exception as e:  # the chat template rejected the conversation
                raise APIError(400, f"the chat template could not render the messages: {e}", param="messages") from e
            grammar = None
            if forces_structure(req, tools):  # compiled off the event loop, like the prompt
                grammar = await off_loop(reply_grammar, req, tools, served.constrained, served.renderer.parser_name,
                                         entry.name)
            params = sampling_params(req, len(prompt), served.max_context, default_max_tokens, grammar)
            if req.stream:  # the stream releases the model when it ends
                streaming = True
                return StreamingResponse(chat_stream(served, entry.name, prompt, params, req, parse, release),
                                         media_type="text/event-stream", background=BackgroundTask(release))
            try:
                samples = await asyncio.gather(*(served.engine.generate(prompt, p) for p in params))
            except Exception as e:
                raise engine_error(e) from e
        finally:
            if not streaming:
                release()
        check_top_logprobs(samples, params, entry.name)
        choices = []
        for i, s in enumerate(samples):
            content, calls, finish = final_choice(served, s, params[i].stop, parse)
            message = {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}
            c = {"index": i, "message": message, "finish_reason": finish,
                 "logprobs": {"content": token_logprobs(served.renderer.tokenizer, s.tokens, s.logprobs,
                                                        s.top_logprobs)}
                 if req.logprobs else None}
            if req.return_token_ids:
                c["token_ids"] = list(s.tokens)
            choices.append(c)
        completion = sum(len(s.tokens) for s in samples)
        body = {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion", "created": int(time.time()),
                "model": entry.name, "choices": choices,
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion,
                          "total_tokens": len(prompt) + completion}}
        if req.return_token_ids:
            body["prompt_token_ids"] = prompt
        return body

    return app

"""A streamed chat completion (``"stream": true``): the server-sent events of one request, sent
as its tokens are sampled.

Every served engine has ``generate_stream(prompt, params)`` (``rlft.serve.models.ServedEngine``:
cumulative ``(tokens, logprobs, top_logprobs)`` snapshots ending with the ``Sample``); the
in-process HFEngine's polls its running request every 20 ms, and a plain engine plugged in with
``engines=`` sends its finished sample in per-token chunks. Content deltas hold back an
incomplete UTF-8 character and a possible start of a stop string. With tools active a reply is
sent when complete (a call is recognisable only whole), as one content and/or tool_calls delta.
The ``n`` choices stream interleaved; ``stream_options.include_usage`` adds a last chunk with the
usage; the stream ends with ``data: [DONE]``, and an error mid-stream is sent as an event in
OpenAI's error shape.

Left out: streaming ``/v1/completions``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from rlft.engines.base import Sample, SamplingParams
from rlft.serve.errors import APIError, engine_error
from rlft.serve.models import ServedModel
from rlft.serve.replies import cut_stop, final_choice, held_text, token_logprobs, token_stream
from rlft.serve.requests import ChatRequest

__all__ = ["chat_stream"]


def _sse(obj: Any) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


async def chat_stream(served: ServedModel, name: str, prompt: list[int], params: list[SamplingParams],
                      req: ChatRequest, parse: bool, release: Callable[[], None]) -> AsyncIterator[str]:
    """The events of ``req`` answered by ``served`` (``name``: the model that answers), one choice
    per ``params``; ``parse``: tools are active. ``release`` is called when the stream ends."""
    cid, created, n, tok = "chatcmpl-" + uuid.uuid4().hex, int(time.time()), len(params), served.renderer.tokenizer
    stops = params[0].stop
    queue: asyncio.Queue = asyncio.Queue()

    async def produce(i: int, p: SamplingParams) -> None:
        try:
            async for item in token_stream(served.engine, prompt, p):
                await queue.put((i, item))
        except Exception as e:  # noqa: BLE001 - handed to the reader, which reports it
            await queue.put((i, e))

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        return _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                     "choices": choices, **extra})

    def choice(i: int, delta: dict[str, Any], tokens=(), logprobs=(), top=(),
               finish: str | None = None) -> dict[str, Any]:
        c: dict[str, Any] = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
        if req.logprobs and tokens:
            c["logprobs"] = {"content": token_logprobs(tok, list(tokens), list(logprobs), list(top))}
        if req.return_token_ids:
            c["token_ids"] = list(tokens)
        return c

    tasks = [asyncio.create_task(produce(i, p)) for i, p in enumerate(params)]
    sent_text, sent_tok, completion, done = [0] * n, [0] * n, 0, 0
    try:
        yield chunk([choice(i, {"role": "assistant", "content": ""}) for i in range(n)],
                    **({"prompt_token_ids": prompt} if req.return_token_ids else {}))
        while done < n:
            i, item = await queue.get()
            if isinstance(item, BaseException):
                err = item if isinstance(item, APIError) else engine_error(item)
                yield _sse(err.body())
                break
            final = isinstance(item, Sample)
            tokens, lps, tops = (item.tokens, item.logprobs, item.top_logprobs or []) if final else item
            new_t, new_l, new_top = tokens[sent_tok[i]:], lps[sent_tok[i]:], tops[sent_tok[i]:]
            if req.logprobs and req.top_logprobs and len(tops) < len(tokens):
                yield _sse(APIError(400, f"the engine serving {name!r} does not return top logprobs",
                                    param="top_logprobs").body())
                break
            if not final:
                if parse:
                    continue  # with tools the reply is sent whole
                text, hit = cut_stop(served.renderer.decode(tokens), stops)
                delta = (text if hit else held_text(text, stops))[sent_text[i]:]
                if delta:
                    yield chunk([choice(i, {"content": delta}, new_t, new_l, new_top)])
                    sent_text[i] += len(delta)
                    sent_tok[i] = len(tokens)
                continue
            content, calls, finish = final_choice(served, item, stops, parse)
            completion += len(item.tokens)
            delta = {}
            if parse:
                delta = {**({"content": content} if content else {}),
                         **({"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]} if calls else {})}
            elif (content or "")[sent_text[i]:]:
                delta = {"content": content[sent_text[i]:]}
            if delta or (new_t and (req.logprobs or req.return_token_ids)):
                yield chunk([choice(i, delta, new_t, new_l, new_top)])
            yield chunk([choice(i, {}, finish=finish)])
            done += 1
        if done == n and (req.stream_options or {}).get("include_usage"):
            yield chunk([], usage={"prompt_tokens": len(prompt), "completion_tokens": completion,
                                   "total_tokens": len(prompt) + completion})
        yield "data: [DONE]\n\n"
    finally:
        for t in tasks:
            t.cancel()
        release()


"""A chat engine for external OpenAI-compatible models (evals and baselines only).

External models (hosted APIs, another team's server) take messages, not token ids, and their
tokens are not ours to train on. ``OpenAIChatEngine`` therefore implements the
:class:`~rlft.engines.base.ChatEngine` contract (``chat(messages, tools, params)``) rather than
``Engine.generate``; rollouts sample it through ``rlft.episode.ChatSampler``, which keeps the
conversation at the message level (no token ids, no logprobs: such rollouts are for
``rlft eval``, never for training). Tool calls come back in the API's native ``tool_calls``
field. Usage and cost per request (from a price table, USD per million tokens) are recorded on
each rollout.
Left out: retries beyond the client's own, and streaming.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from rlft.engines.base import ChatReply, SamplingParams
from rlft.types import Message, ToolCall

# USD per million tokens (prompt, completion). Extend with --price MODEL=IN,OUT or prices=.
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
}


@dataclass
class OpenAIChatEngine:
    """An external model behind ``<base_url>/chat/completions`` (``openai`` client, one per event loop)."""

    base_url: str
    model: str
    api_key: str | None = None  # default: $OPENAI_API_KEY (a placeholder for local servers)
    timeout: float = 120.0
    max_concurrency: int = 16
    prices: dict[str, tuple[float, float]] = field(default_factory=dict)
    _clients: dict[int, Any] = field(default_factory=dict, repr=False)
    _sems: dict[int, asyncio.Semaphore] = field(default_factory=dict, repr=False)

    def _client(self):
        loop_id = id(asyncio.get_running_loop())  # one client per event loop (asyncio.run per call)
        if loop_id not in self._clients:
            from openai import AsyncOpenAI

            key = self.api_key or os.environ.get("OPENAI_API_KEY") or "not-needed"
            self._clients[loop_id] = AsyncOpenAI(base_url=self.base_url, api_key=key, timeout=self.timeout,
                                                 max_retries=2)
            self._sems[loop_id] = asyncio.Semaphore(self.max_concurrency)
        return self._clients[loop_id], self._sems[loop_id]

    def price(self) -> tuple[float, float] | None:
        """USD per million (prompt, completion) tokens; None when no price is known for the model
        (its cost is then unknown, not zero)."""
        return {**DEFAULT_PRICES, **self.prices}.get(self.model)

    async def chat(self, messages: list[Message], tools: list[dict] | None, params: SamplingParams) -> ChatReply:
        client, sem = self._client()
        kwargs: dict[str, Any] = {"model": self.model, "messages": _to_api(messages),
                                  "max_tokens": params.max_new_tokens,
                                  "temperature": params.temperature, "top_p": params.top_p}
        if tools:
            kwargs["tools"] = tools
        if params.stop:
            kwargs["stop"] = params.stop
        if params.seed is not None:
            kwargs["seed"] = params.seed % (2**31)
        async with sem:
            t0 = time.perf_counter()
            resp = await client.chat.completions.create(**kwargs)
            latency = time.perf_counter() - t0
        choice = resp.choices[0]
        calls = []
        for tc in choice.message.tool_calls or []:
            try:
                args = json.loads(tc.function.arguments or "{}")
                calls.append(ToolCall(name=tc.function.name, arguments=args, id=tc.id))
            except json.JSONDecodeError as e:
                calls.append(ToolCall(name=tc.function.name, arguments={}, id=tc.id,
                                      error=f"invalid JSON arguments: {e}"))
        message: Message = {"role": "assistant", "content": choice.message.content or ""}
        if any(c.error is None for c in calls):
            message["tool_calls"] = [c.to_openai() for c in calls if c.error is None]
        usage = resp.usage
        p_tok = getattr(usage, "prompt_tokens", 0) or 0
        c_tok = getattr(usage, "completion_tokens", 0) or 0
        pin, pout = self.price() or (0.0, 0.0)  # no price: cost 0 here, and rlft eval says it is not set
        return ChatReply(message=message, calls=calls, finish_reason=choice.finish_reason or "stop",
                         prompt_tokens=p_tok, completion_tokens=c_tok, cost=(p_tok * pin + c_tok * pout) / 1e6,
                         latency=latency)


def _to_api(messages: list[Message]) -> list[Message]:
    """Our canonical messages -> the API's (tool-call arguments as JSON strings)."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{**tc, "function": {**tc["function"], "arguments": tc["function"]["arguments"]
                                if isinstance(tc["function"]["arguments"], str)
                                else json.dumps(tc["function"]["arguments"])}}
                               for tc in m["tool_calls"]]
        out.append(m)
    return out

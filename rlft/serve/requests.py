"""The OpenAI request bodies ``rlft serve`` accepts, and how each becomes prompt ids and sampling
params (limits checked with OpenAI-style 400s naming the parameter).

Left out: routing, streaming and model loading (``app.py``, ``streaming.py``, ``models.py``);
what tools and ``response_format`` ask (``structured.py``); logprobs in replies (``replies.py``).
``chat_grammar``, ``forces_structure`` and ``completion_logprobs`` moved there; still importable here.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from rlft.engines.base import SamplingParams
from rlft.serve.errors import APIError
from rlft.serve.replies import completion_logprobs
from rlft.serve.structured import chat_grammar, forces_structure


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # other OpenAI fields are accepted and ignored

    model: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    return_token_ids: bool = False
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool = True  # with tool_choice "required": False = exactly one call


class CompletionRequest(BaseModel):
    """``/v1/completions`` (the legacy OpenAI route, with vLLM's token-id extensions)."""

    model_config = ConfigDict(extra="allow")  # other OpenAI/vLLM fields are accepted and ignored

    model: str
    prompt: Any  # token ids, a string, or a list of either (checked in _completion_prompts)
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    max_tokens: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: int | None = Field(None, ge=0, le=20)  # the k most likely per position (+ the sampled one)
    echo: bool = False
    stream: bool = False
    return_token_ids: bool = False
    max_completion_tokens: None = None  # (chat only; lets _sampling read both request kinds)
    top_logprobs: None = None  # (chat only; here ``logprobs`` is the count)


class LoraRequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = ""  # load only


# -- requests -> sampling params ------------------------------------------------------------------

def sampling_params(req: ChatRequest | CompletionRequest, prompt_len: int, context: int | None,
                    default_max: int, grammar: str | None = None) -> list[SamplingParams]:
    limit = req.max_completion_tokens or req.max_tokens
    room = context - prompt_len if context else None
    what = "messages" if isinstance(req, ChatRequest) else "prompt"
    if room is not None and room <= 0:
        raise APIError(400, f"This model's maximum context length is {context} tokens, but the {what} take "
                            f"{prompt_len} tokens.", param=what, code="context_length_exceeded")
    if limit is None:
        limit = default_max if room is None else min(default_max, room)
    elif room is not None and limit > room:
        raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                            f"{prompt_len + limit} tokens ({prompt_len} in the {what}, {limit} in the completion).",
                       param="max_completion_tokens" if req.max_completion_tokens else "max_tokens",
                       code="context_length_exceeded")
    stops = [s for s in ([req.stop] if isinstance(req.stop, str) else req.stop or []) if s]
    top = (req.top_logprobs or 0) if isinstance(req, ChatRequest) else (req.logprobs or 0)
    if isinstance(req, ChatRequest) and top and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    return [SamplingParams(temperature=1.0 if req.temperature is None else req.temperature,
                           top_p=1.0 if req.top_p is None else req.top_p, top_k=max(req.top_k or 0, 0),
                           max_new_tokens=limit, stop=stops, seed=None if req.seed is None else req.seed + i,
                           top_logprobs=top, grammar=grammar)
            for i in range(req.n)]


def check_top_logprobs(samples: list[Any], params: list[SamplingParams], model: str) -> None:
    """A 400 when top logprobs were asked of an engine that does not return them (a plugged-in one)."""
    if params and params[0].top_logprobs and any(s.top_logprobs is None for s in samples):
        raise APIError(400, f"the engine serving {model!r} does not return top logprobs: ask for the sampled "
                            "token's logprob only", param="top_logprobs")


def completion_prompts(tokenizer: Any, prompt: Any) -> list[list[int]]:
    """``prompt`` of /v1/completions -> token-id prompts: ids, a string, or a list of either."""
    def one(p: Any, where: str) -> list[int]:
        if isinstance(p, str):
            ids = tokenizer.encode(p)
        elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            ids = list(p)
            vocab = len(tokenizer)
            if any(t < 0 or t >= vocab for t in ids):
                raise APIError(400, f"{where}: token ids must be in [0, {vocab})", param="prompt")
        else:
            raise APIError(400, f"{where} must be a string or a list of token ids", param="prompt")
        if not ids:
            raise APIError(400, f"{where} is empty", param="prompt")
        return ids

    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return [one(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
    return [one(prompt, "prompt")]


__all__ = ["ChatRequest", "CompletionRequest", "LoraRequest", "chat_grammar", "check_top_logprobs",
           "completion_logprobs", "completion_prompts", "forces_structure", "sampling_params"]

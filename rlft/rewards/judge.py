"""LLM judges as rewards: rubrics scored by any OpenAI-compatible chat endpoint.

``Judge(model, base_url)`` talks to one endpoint (OpenAI, vLLM, ``rlft serve``...);
``Rubric(title, description, kind="positive"|"negative", score_map=None)`` is one criterion.

- ``judge.reward(rubric, weight=None)``: a ``Reward`` named after the slugified title, one call
  per rollout asking for ``{"reasoning": "...", "score": ...}``. The score is clamped to [0, 1];
  with ``score_map`` (``{"poor": 0, "ok": 0.5, "good": 1}`` or a list of numbers) the judge names
  a level and a number snaps to the nearest one. A negative rubric describes a fault and scores
  its presence (1 = clearly there); default weight -1 (+1 for positive; a contrary sign is refused).
- ``judge.rewards(rubrics)``: one ``Reward`` per rubric, one call each. Not one call for all: a
  dict reward has a single weight (positive and negative rubrics could not mix) and one bad reply
  would zero every component.
- ``judge.ranking(title, description)``: a group ``Reward``; one call ranks the G siblings
  (``{"reasoning": "...", "ranking": [best, ..., worst]}``) and rank r scores ``1 - r / (G - 1)``.
  Candidates are shown in sampling order, so position bias does not follow quality.

The prompt (``Judge.rubric_messages`` / ``ranking_messages``; override in a subclass): a system
message with the task and the JSON shape, then a user message with ``<conversation>`` (system,
user, assistant text and tool calls, tool results before the final answer), ``<final_answer>``,
``<reference>`` (the row's ``ground_truth``, if any) and ``<rubric>``. Parsing: the first JSON
object with the key anywhere (bare, fenced, amid text; ``<think>`` dropped), else a bare number,
level or ranking on the last line.

Calls: temperature 0; each attempt bounded by ``timeout``; transport errors, timeouts, 408/409/
429/5xx and unparsable replies are retried ``retries`` times with exponential ``backoff`` (other
4xx are not); at most ``max_concurrency`` requests in flight. A call that still fails raises
``JudgeError`` in the reward: the scorer scores that component 0, records the error, and leaves
siblings and other components alone. The scorer's ``reward_timeout`` includes waiting for a slot.

Caching: successful replies, keyed by (model, prompt messages), in an LRU of ``cache_size``
(optionally expiring after ``cache_ttl`` s); identical calls in flight share one request. At
temperature 0 a cached reply is the reply, so the cache may span steps; ``clear_cache()`` once a
step makes it strictly per step. Failures are never cached.

Metrics: ``judge.stats(reset=False)``: requests (HTTP attempts), calls (cache misses), cache_hits,
retries, errors, prompt_tokens, completion_tokens, seconds (summed request time), latency_mean/max
(s per request). Each rollout's ``metrics`` accumulates ``judge/requests``, ``judge/prompt_tokens``,
``judge/completion_tokens``, ``judge/seconds`` (request time; a ranking call counts 1/G per sibling,
so batch sums, the step's ``judge/<stat>_total``, are the step's requests, tokens and judge
seconds), ``judge/cache_hits``, ``judge/errors`` (failed judged components) and ``judge/latency``
(s waited, queue and retries in).

Rendering the conversation and parsing replies: ``rlft.rewards.judge_text``. Needs ``openai``
(imported at the first call). Logprob-scored verdicts (one next token, no parsing), an
in-process judge and order-averaged pairwise preferences are in ``rlft.rewards.logprob_judge``;
calibration in ``rlft.rewards.calibration``. Left out: streaming, prompt-injection defences,
cost in money.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import math
import os
import re
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rlft.rewards import Reward
from rlft.rewards.judge_text import (
    JudgeParseError,
    parse_ranking,
    parse_score,
    reference_block,
    render_messages,
    split_final,
)
from rlft.types import Message, Rollout

__all__ = ["Judge", "JudgeError", "JudgeParseError", "JudgedRubric", "Rubric", "parse_ranking", "parse_score",
           "slugify"]

KINDS = ("positive", "negative")


class JudgeError(RuntimeError):
    """A judge call failed for good (transport, timeout, HTTP error, or no parsable reply)."""


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "rubric"


@dataclass
class Rubric:
    """One criterion. ``kind="negative"``: the description is a fault, scored by its presence.
    ``score_map``: named levels ``{"poor": 0, "ok": 0.5, "good": 1}`` (or a list of numbers); the
    values are used as given, so keep them in [0, 1] to mix with other components."""

    title: str
    description: str
    kind: str = "positive"
    score_map: dict[str, float] | Sequence[float] | None = None

    def __post_init__(self):
        if not str(self.title).strip() or self.kind not in KINDS:
            raise ValueError(f"Rubric needs a title and kind 'positive' or 'negative', not {self.kind!r}")
        if self.score_map is not None:
            m = self.score_map if isinstance(self.score_map, dict) else {f"{float(v):g}": v for v in self.score_map}
            self.score_map = {str(k): float(v) for k, v in m.items()}
            if not self.score_map or not all(math.isfinite(v) for v in self.score_map.values()):
                raise ValueError(f"Rubric {self.title!r}: score_map needs at least one finite level")


# -- the judge ----------------------------------------------------------------------------------------------

@dataclass
class JudgedRubric:
    """The reward function of ``judge.reward(rubric)``: ``await fn(rollout)`` is the judge's score.
    A value, so ``rlft validate`` and ``rlft judge check`` find an environment's judged rubrics
    (``isinstance(reward.fn, JudgedRubric)``) and calibrate them."""

    judge: Judge
    rubric: Rubric
    name: str

    async def __call__(self, rollout: Rollout) -> float:
        return await self.judge.score(self.rubric, rollout, self.name)


SCORE_SYSTEM = ("You are a careful, impartial grader. You read a conversation between a user and an AI "
                "assistant and grade the assistant's final answer against one rubric. Reply with one JSON "
                'object and nothing else: {"reasoning": "<one or two sentences>", "score": <score>}.')
RANK_SYSTEM = ("You are a careful, impartial grader. You compare several candidate responses to the same "
               "conversation and rank them against one criterion, best first. Reply with one JSON object and "
               'nothing else: {"reasoning": "<one or two sentences>", "ranking": [<candidate numbers>]}.')


def _retryable(e: BaseException) -> bool:
    import openai

    if isinstance(e, (openai.APIConnectionError, TimeoutError)):  # APITimeoutError included
        return True
    return isinstance(e, openai.APIStatusError) and (e.status_code in (408, 409, 429) or e.status_code >= 500)


class Judge:
    """An OpenAI-compatible chat endpoint used as a grader (see the module docstring).
    ``base_url`` as for the openai client (``http://host:port/v1``); ``api_key`` defaults to
    ``$OPENAI_API_KEY`` (or a placeholder for local servers); ``extra_body`` is sent with every
    request. Usable from several event loops (each gets its own client and semaphore)."""

    def __init__(self, model: str, base_url: str, api_key: str | None = None, *, timeout: float = 60.0,
                 retries: int = 2, max_concurrency: int = 8, backoff: float = 0.5, max_tokens: int = 1024,
                 temperature: float = 0.0, cache_size: int = 4096, cache_ttl: float | None = None,
                 extra_body: dict[str, Any] | None = None):
        if max_concurrency < 1 or retries < 0 or timeout <= 0:
            raise ValueError("Judge needs max_concurrency >= 1, retries >= 0 and timeout > 0")
        self.model, self.base_url = model, base_url
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.timeout, self.retries, self.max_concurrency, self.backoff = timeout, retries, max_concurrency, backoff
        self.max_tokens, self.temperature, self.extra_body = max_tokens, temperature, extra_body
        self.cache_size, self.cache_ttl = cache_size, cache_ttl
        self._cache: collections.OrderedDict[str, tuple[float, str]] = collections.OrderedDict()
        self._inflight: dict[str, asyncio.Future] = {}
        self._loops: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loop -> (client, semaphore)
        self.reset_stats()

    # -- bookkeeping ------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self._stats = dict.fromkeys(("requests", "calls", "cache_hits", "retries", "errors", "prompt_tokens",
                                     "completion_tokens", "seconds"), 0)
        self._latency_sum, self._latency_max = 0.0, 0.0

    def stats(self, reset: bool = False) -> dict[str, float]:
        """Counters since creation (or the last reset); ``reset=True`` zeroes them (per-step logging)."""
        n = self._stats["requests"]
        out = {**self._stats, "latency_mean": self._latency_sum / n if n else 0.0, "latency_max": self._latency_max}
        if reset:
            self.reset_stats()
        return out

    def clear_cache(self) -> None:
        self._cache.clear()

    @staticmethod
    def _note(rollouts: list[Rollout], share: bool = True, **values: float) -> None:
        for ro in rollouts:
            for k, v in values.items():
                key = f"judge/{k}"
                ro.metrics[key] = ro.metrics.get(key, 0.0) + (v / len(rollouts) if share else v)

    def _resources(self) -> tuple[Any, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        res = self._loops.get(loop)
        if res is None:
            try:
                from openai import AsyncOpenAI
            except ImportError:
                raise ImportError("rlft's LLM judge needs the openai package: pip install openai") from None
            client = AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout, max_retries=0)
            res = self._loops[loop] = (client, asyncio.Semaphore(self.max_concurrency))
        return res

    async def aclose(self) -> None:
        """Close this event loop's HTTP client (others are dropped with their loops)."""
        res = self._loops.pop(asyncio.get_running_loop(), None)
        if res is not None:
            await res[0].close()

    # -- one judged call ------------------------------------------------------------------------------
    async def ask(self, messages: list[Message], parse: Callable[[str], Any], rollouts: Sequence[Rollout] = ()) -> Any:
        """Send ``messages`` (or reuse a cached or in-flight identical call) and return
        ``parse(reply)``; raises ``JudgeError``. Per-rollout metrics go to ``rollouts``."""
        rollouts = list(rollouts)
        key = hashlib.sha256(json.dumps([self.model, messages], sort_keys=True, default=str).encode()).hexdigest()
        loop, t0 = asyncio.get_running_loop(), time.perf_counter()
        try:
            text = self._cached(key)
            fut = self._inflight.get(key)
            if text is None and fut is not None and fut.get_loop() is loop and not fut.done():
                text = await asyncio.shield(fut)  # an identical call is in flight: share its reply
            if text is not None:
                self._stats["cache_hits"] += 1
                self._note(rollouts, share=False, cache_hits=1)
                return parse(text)
            fut = self._inflight[key] = loop.create_future()
            try:
                text = await self._request(messages, parse, rollouts)
            except BaseException as e:
                fut.set_exception(e if isinstance(e, JudgeError) else JudgeError(
                    f"the identical judge call this one waited on failed: {type(e).__name__}"))
                fut.exception()  # retrieved: no "never retrieved" warning when nobody waited
                raise
            else:
                fut.set_result(text)
                if self.cache_size > 0:
                    self._cache[key] = (time.monotonic(), text)
                    while len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)
            finally:
                if self._inflight.get(key) is fut:
                    del self._inflight[key]
            return parse(text)
        except JudgeError:
            self._note(rollouts, share=False, errors=1)
            raise
        finally:
            self._note(rollouts, share=False, latency=time.perf_counter() - t0)

    def _cached(self, key: str) -> str | None:
        hit = self._cache.get(key)
        if hit is None or (self.cache_ttl is not None and time.monotonic() - hit[0] > self.cache_ttl):
            self._cache.pop(key, None)  # expired
            return None
        self._cache.move_to_end(key)
        return hit[1]

    async def _request(self, messages: list[Message], parse: Callable[[str], Any], rollouts: list[Rollout]) -> str:
        client, sem = self._resources()
        self._stats["calls"] += 1
        last: BaseException | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                self._stats["retries"] += 1
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            async with sem:
                t0 = time.perf_counter()
                self._stats["requests"] += 1
                self._note(rollouts, requests=1)
                try:
                    text, u = await asyncio.wait_for(self._complete(client, messages), self.timeout)
                except Exception as e:
                    if isinstance(e, asyncio.TimeoutError):
                        e = TimeoutError(f"no reply within {self.timeout}s")
                    if not _retryable(e):
                        self._stats["errors"] += 1
                        raise JudgeError(f"judge {self.model!r} at {self.base_url}: {type(e).__name__}: {e}") from e
                    last = e
                    continue
                finally:
                    dt = time.perf_counter() - t0
                    self._latency_sum, self._latency_max = self._latency_sum + dt, max(self._latency_max, dt)
                    self._stats["seconds"] += dt
                    self._note(rollouts, seconds=dt)
            pt, ct = (u.prompt_tokens or 0, u.completion_tokens or 0) if u is not None else (0, 0)
            self._stats["prompt_tokens"] += pt
            self._stats["completion_tokens"] += ct
            self._note(rollouts, prompt_tokens=pt, completion_tokens=ct)
            try:
                parse(text)
            except JudgeParseError as e:
                last = e
                continue
            return text
        self._stats["errors"] += 1
        raise JudgeError(f"judge {self.model!r} at {self.base_url} failed after {self.retries + 1} attempt(s): "
                         f"{type(last).__name__}: {last}") from last

    async def _complete(self, client: Any, messages: list[Message]) -> tuple[str, Any]:
        """One request: ``(the reply as the cache keeps it, the response's usage)``. Here the reply
        text; the logprob judge (``rlft.rewards.logprob_judge``) keeps the verdict's top logprobs."""
        resp = await client.chat.completions.create(
            model=self.model, messages=messages, temperature=self.temperature, max_tokens=self.max_tokens,
            **({"extra_body": self.extra_body} if self.extra_body else {}))
        return ((resp.choices[0].message.content or "") if resp.choices else ""), getattr(resp, "usage", None)

    # -- prompts ---------------------------------------------------------------------------------------------
    def rubric_messages(self, rubric: Rubric, rollout: Rollout) -> list[Message]:
        before, final = split_final(rollout)
        neg = rubric.kind == "negative"
        if rubric.score_map:
            levels = ", ".join(f'"{k}" ({v:g})' for k, v in rubric.score_map.items())
            how = f'Choose exactly one level; "score" is its name, one of: {levels}.'
        else:
            how = (f'"score" is a number from 0 ({"the fault is absent" if neg else "does not meet it at all"}) to 1 '
                   f'({"the fault is clearly present" if neg else "fully meets it"}).')
        how = ("The rubric describes a fault: score how present it is in the final answer. " if neg else "") + how
        user = (f"<conversation>\n{render_messages(before)}\n</conversation>\n\n"
                f"<final_answer>\n{final or '(no final answer)'}\n</final_answer>\n\n{reference_block(rollout)}"
                f"<rubric kind=\"{rubric.kind}\">\n{rubric.title}\n{rubric.description}\n</rubric>\n\n"
                f'{how}\nReply with JSON only: {{"reasoning": "...", "score": ...}}')
        return [{"role": "system", "content": SCORE_SYSTEM}, {"role": "user", "content": user}]

    def ranking_messages(self, title: str, description: str, rollouts: list[Rollout]) -> list[Message]:
        first = rollouts[0].messages
        k = next((i for i, m in enumerate(first) if m.get("role") == "assistant"), len(first))
        cands = []
        for i, ro in enumerate(rollouts, 1):
            n = next((j for j, m in enumerate(ro.messages) if m.get("role") == "assistant"), len(ro.messages))
            cands.append(f"## Candidate {i}\n{render_messages(ro.messages[n:]) or '(no answer)'}")
        example = ", ".join(map(str, range(1, len(rollouts) + 1)))
        user = (f"<conversation>\n{render_messages(first[:k])}\n</conversation>\n\n<candidates>\n"
                + "\n\n".join(cands) + f"\n</candidates>\n\n{reference_block(rollouts[0])}"
                f"<criterion>\n{title}\n{description}\n</criterion>\n\n"
                f"Rank all {len(rollouts)} candidates from best to worst on the criterion.\n"
                f'Reply with JSON only: {{"reasoning": "...", "ranking": [{example}]}} '
                "(that order is only an example; list each candidate number once).")
        return [{"role": "system", "content": RANK_SYSTEM}, {"role": "user", "content": user}]

    # -- rewards ---------------------------------------------------------------------------------------------
    def reward(self, rubric: Rubric, weight: float | None = None, *, name: str | None = None,
               timeout: float | None = None) -> Reward:
        """A ``Reward`` scoring ``rubric`` with one judge call per rollout. ``weight``: +1 for a
        positive rubric, -1 for a negative one by default (0 logs it only; the sign must match)."""
        if not isinstance(rubric, Rubric):
            raise TypeError(f"judge.reward needs a Rubric, got {type(rubric).__name__}")
        sign = 1.0 if rubric.kind == "positive" else -1.0
        weight = sign if weight is None else float(weight)
        if weight * sign < 0:
            raise ValueError(f"rubric {rubric.title!r} is {rubric.kind}: its weight must be "
                             f"{'>=' if sign > 0 else '<='} 0, got {weight} (a {rubric.kind} rubric with that sign "
                             "would reward the opposite)")
        name = name or slugify(rubric.title)
        return Reward(JudgedRubric(self, rubric, name), weight=weight, name=name, timeout=timeout)

    async def score(self, rubric: Rubric, rollout: Rollout, name: str = "") -> float:
        """The rubric's score of one rollout (what ``reward(rubric)`` returns for it)."""
        return await self.ask(self.rubric_messages(rubric, rollout),
                              lambda text: parse_score(text, rubric.score_map), [rollout])

    def rewards(self, rubrics: Sequence[Rubric]) -> list[Reward]:
        """One ``Reward`` per rubric, default weights (one call each: see the module docstring)."""
        out = [self.reward(r) for r in rubrics]
        names = [r.name for r in out]
        if len(set(names)) != len(names):
            raise ValueError(f"rubric titles must give distinct names, got {names}")
        return out

    def ranking(self, title: str, description: str, weight: float = 1.0, *, name: str | None = None,
                timeout: float | None = None) -> Reward:
        """A group ``Reward``: one call ranks the G siblings; rank r scores ``1 - r / (G - 1)``."""
        name = name or slugify(title)

        async def judge_ranking(rollouts: list[Rollout]) -> list[float]:
            g = len(rollouts)
            if g == 1:
                return [1.0]
            ranking = await self.ask(self.ranking_messages(title, description, rollouts),
                                     lambda text: parse_ranking(text, g), rollouts)
            scores = [0.0] * g
            for r, cand in enumerate(ranking):
                scores[cand - 1] = 1.0 - r / (g - 1)
            return scores

        judge_ranking.__name__ = name
        return Reward(judge_ranking, weight=weight, name=name, group=True, timeout=timeout)

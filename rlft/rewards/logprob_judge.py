"""Logprob-scored rubrics (as G-Eval does): the judge names its verdict as one next token, and the
score is the probability-weighted mean of the verdict levels read off that token's distribution.

The rubrics are ``rlft.rewards.judge.Rubric`` values, unchanged. The judge is asked for the verdict
as a single token, ``max_tokens=1``:

- a rubric with ``score_map`` (``{"no": 0, "partly": 0.5, "yes": 1}``): its levels are numbered in
  order and the verdict is the level's digit (``answer="digit"``, the default: "1" = no, "2" =
  partly, "3" = yes; at most 9 levels), or the level's name itself (``answer="level"``: each name
  must then be one token of the judge's tokenizer);
- a rubric without: a digit on ``scale`` (default 1-5), mapped linearly onto [0, 1].

Score = sum of p(verdict) * value / sum of p(verdict) over the allowed verdicts (renormalised over
them); the probability that fell outside them, ``1 - mass``, is a confidence figure, recorded per
rollout as ``judge/mass_<reward name>`` (the mass itself). No parsing failure mode, a continuous
score that separates near-ties, one short completion per rubric. A rubric none of whose verdict
tokens got any probability raises :class:`NoVerdictMassError` naming the judge's likely tokens.

Tokenization: a verdict "4" may be the token "4" or " 4" (or "4" after a newline), depending on
the tokenizer and what precedes it. Tokens are matched by their text stripped of whitespace (and
case-folded for level names), and every token that matches a verdict adds its probability to it.

Two transports, the same prompt, scoring, cache and metrics (the ``Judge`` machinery of
``rlft.rewards.judge``: identical prompts in flight or cached cost one call):

- :class:`LogprobJudge`: any OpenAI-compatible endpoint that returns ``top_logprobs`` (OpenAI,
  vLLM, ``rlft serve``): ``logprobs=True, top_logprobs=20``; verdict tokens outside the top 20
  count as 0 (their mass is at most the 20th token's each). At ``temperature`` 0 (the default) the
  distribution is the model's own (``rlft serve`` and vLLM report it unscaled for greedy requests).
- :class:`LocalJudge`: a Hugging Face model in this process, no server: the prompts waiting at a
  moment (the rollouts of a step scored concurrently) go through one batched forward pass and the
  verdict probabilities are read off the last position's logits over the whole vocabulary (exact:
  every token matching a verdict counts, not only the top 20).

``judge.pairwise(rubric)`` is a group reward: for every pair of siblings, in both orders, P(the
first shown is better) from the verdict tokens "1"/"2"; averaging the two orders cancels a
position bias (:func:`pairwise_scores`), and each rollout scores its mean preference over the
others (G(G-1) calls per group). ``judge/position_bias_<name>`` records the bias measured.

Left out: multi-token verdicts, logit bias to force the verdict tokens, chain-of-thought before the
verdict (a reasoning judge belongs to JSON mode: ``Judge``).

Why one module: both judges and the pairwise reward share the verdict-token matching and the
probability-weighted scoring; only where the next-token distribution comes from differs.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rlft.rewards import Reward
from rlft.rewards.judge import Judge, JudgeError, Rubric, slugify
from rlft.rewards.judge_text import reference_block, render_messages, split_final
from rlft.types import Message, Rollout

__all__ = ["LocalJudge", "LogprobJudge", "NoVerdictMassError", "VerdictScore", "Verdicts", "pairwise_scores",
           "rubric_verdicts", "score_verdict"]


class NoVerdictMassError(JudgeError):
    """None of a rubric's verdict tokens got any probability at the judge's verdict position."""


@dataclass(frozen=True)
class Verdicts:
    """The allowed verdict tokens of a rubric: ``values`` maps the token text (stripped, case-folded)
    to its score; ``meanings`` says what each stands for, in the prompt's order."""

    values: dict[str, float]
    meanings: dict[str, str]


def rubric_verdicts(rubric: Rubric, answer: str = "digit", scale: tuple[int, int] = (1, 5)) -> Verdicts:
    """A rubric's verdict tokens (see the module docstring)."""
    if rubric.score_map:
        levels = list(rubric.score_map.items())  # type: ignore[union-attr]
        if answer == "level":
            return Verdicts({k.strip().casefold(): v for k, v in levels}, {k.strip(): f"{v:g}" for k, v in levels})
        if len(levels) > 9:
            raise ValueError(f"rubric {rubric.title!r}: a one-digit verdict allows at most 9 levels, got {len(levels)}")
        return Verdicts({str(i): v for i, (_, v) in enumerate(levels, 1)},
                        {str(i): k for i, (k, _) in enumerate(levels, 1)})
    lo, hi = scale
    if not 0 <= lo < hi <= 9:
        raise ValueError(f"scale must be two digits lo < hi, got {scale}")
    return Verdicts({str(d): (d - lo) / (hi - lo) for d in range(lo, hi + 1)},
                    {str(d): f"{(d - lo) / (hi - lo):g}" for d in range(lo, hi + 1)})


@dataclass
class VerdictScore:
    """``score``: probability-weighted mean value of the verdicts; ``mass``: their total probability
    (1 - mass fell outside them); ``probs``: each verdict's probability, renormalised."""

    score: float
    mass: float
    probs: dict[str, float]


def score_verdict(candidates: Iterable[tuple[str, float]], verdicts: Verdicts) -> VerdictScore:
    """Score ``(token text, logprob)`` pairs of the verdict position (``top_logprobs``, or every
    matching token of the vocabulary): tokens match a verdict by their stripped, case-folded text,
    and the tokens of one verdict add up. Raises :class:`NoVerdictMassError` when none matches."""
    probs = dict.fromkeys(verdicts.values, 0.0)
    seen = []
    for text, logprob in candidates:
        key = text.strip().casefold()
        if key in probs:
            probs[key] += math.exp(logprob)
        seen.append((text, logprob))
    mass = sum(probs.values())
    if mass <= 0:
        likely = ", ".join(f"{t!r} {math.exp(lp):.3f}" for t, lp in sorted(seen, key=lambda x: -x[1])[:8])
        raise NoVerdictMassError(f"no probability on any verdict token {sorted(verdicts.values)}; the judge's likely "
                                 f"next tokens: {likely or 'none reported'}")
    return VerdictScore(sum(p * verdicts.values[k] for k, p in probs.items()) / mass, min(mass, 1.0),
                        {k: p / mass for k, p in probs.items()})


def pairwise_scores(p_first_GG: Sequence[Sequence[float | None]]) -> tuple[list[float], float]:
    """Per-rollout scores from pairwise judgements, and the position bias measured.

    ``p_first_GG[i][j]`` (i != j): P(the first candidate shown is better) with rollout i shown first
    and j second. The order-averaged preference ``pref[i][j] = (p_first[i][j] + 1 - p_first[j][i]) / 2``
    cancels a bias b toward the first position (b adds to both terms with opposite signs); rollout
    i scores the mean of ``pref[i][j]`` over j, in [0, 1]. Position bias = the mean over pairs of
    ``(p_first[i][j] + p_first[j][i] - 1) / 2`` (0 for an unbiased judge, > 0 favours the first)."""
    g = len(p_first_GG)
    if g < 2:
        return [0.5] * g, 0.0
    scores, biases = [], []
    for i in range(g):
        prefs = [(p_first_GG[i][j] + 1 - p_first_GG[j][i]) / 2 for j in range(g) if j != i]  # type: ignore[operator]
        scores.append(sum(prefs) / len(prefs))
        biases += [(p_first_GG[i][j] + p_first_GG[j][i] - 1) / 2 for j in range(i + 1, g)]  # type: ignore[operator]
    return scores, sum(biases) / len(biases)


VERDICT_SYSTEM = ("You are a careful, impartial grader. You read a conversation between a user and an AI assistant "
                  "and grade the assistant's final answer against one rubric. Answer with a single token: the "
                  "verdict, nothing else.")
PAIR_SYSTEM = ("You are a careful, impartial grader. You compare two responses to the same conversation on one "
               "criterion. Answer with a single digit, 1 or 2: the better response, nothing else.")
PAIR_VERDICTS = Verdicts({"1": 1.0, "2": 0.0}, {"1": "response 1 is better", "2": "response 2 is better"})


class LogprobJudge(Judge):
    """A judge whose verdict is one next token, scored from its ``top_logprobs`` (module docstring).
    Arguments as for :class:`rlft.rewards.judge.Judge` (cache, retries, concurrency, metrics), plus
    ``top_logprobs`` (at most 20 for OpenAI), ``answer`` ("digit" or "level") and ``scale``."""

    def __init__(self, model: str, base_url: str, api_key: str | None = None, *, top_logprobs: int = 20,
                 answer: str = "digit", scale: tuple[int, int] = (1, 5), **judge_kwargs: Any):
        if answer not in ("digit", "level"):
            raise ValueError(f"answer must be 'digit' or 'level', not {answer!r}")
        judge_kwargs.setdefault("max_tokens", 1)
        super().__init__(model, base_url, api_key, **judge_kwargs)
        self.top_logprobs, self.answer, self.scale = int(top_logprobs), answer, tuple(scale)

    async def _complete(self, client: Any, messages: list[Message]) -> tuple[str, Any]:
        resp = await client.chat.completions.create(
            model=self.model, messages=messages, temperature=self.temperature, max_tokens=1, logprobs=True,
            top_logprobs=self.top_logprobs, **({"extra_body": self.extra_body} if self.extra_body else {}))
        content = resp.choices[0].logprobs.content if resp.choices and resp.choices[0].logprobs else None
        if not content:
            raise JudgeError(f"judge {self.model!r} at {self.base_url} returned no logprobs: the endpoint does not "
                             "support top_logprobs; use rlft.rewards.judge.Judge (JSON verdicts) for it")
        first = content[0]
        pairs = [(t.token, t.logprob) for t in first.top_logprobs or []] or [(first.token, first.logprob)]
        return json.dumps(pairs), getattr(resp, "usage", None)

    # -- prompts ---------------------------------------------------------------------------------------------
    def verdicts(self, rubric: Rubric) -> Verdicts:
        return rubric_verdicts(rubric, self.answer, self.scale)  # type: ignore[arg-type]

    def rubric_messages(self, rubric: Rubric, rollout: Rollout) -> list[Message]:
        before, final = split_final(rollout)
        v = self.verdicts(rubric)
        neg = rubric.kind == "negative"
        if rubric.score_map:
            levels = "\n".join(f"{k} = {m}" for k, m in v.meanings.items())
        else:
            lo, hi = min(v.values, key=v.values.get), max(v.values, key=v.values.get)  # type: ignore[arg-type]
            levels = (f"{lo} = {'the fault is absent' if neg else 'does not meet it at all'}\n"
                      f"{hi} = {'the fault is clearly present' if neg else 'fully meets it'}\n"
                      f"(or a digit in between)")
        how = ("The rubric describes a fault: grade how present it is in the final answer.\n" if neg else "")
        user = (f"<conversation>\n{render_messages(before)}\n</conversation>\n\n"
                f"<final_answer>\n{final or '(no final answer)'}\n</final_answer>\n\n{reference_block(rollout)}"
                f"<rubric kind=\"{rubric.kind}\">\n{rubric.title}\n{rubric.description}\n</rubric>\n\n"
                f"{how}Verdicts:\n{levels}\n\nAnswer with the verdict only: one of {', '.join(v.values)}.")
        return [{"role": "system", "content": VERDICT_SYSTEM}, {"role": "user", "content": user}]

    def pair_messages(self, rubric: Rubric, first: Rollout, second: Rollout) -> list[Message]:
        before, a = split_final(first)
        _, b = split_final(second)
        user = (f"<conversation>\n{render_messages(before)}\n</conversation>\n\n"
                f"<response_1>\n{a or '(no answer)'}\n</response_1>\n\n<response_2>\n{b or '(no answer)'}\n"
                f"</response_2>\n\n{reference_block(first)}<criterion>\n{rubric.title}\n{rubric.description}\n"
                "</criterion>\n\nWhich response is better on the criterion? Answer 1 or 2 only.")
        return [{"role": "system", "content": PAIR_SYSTEM}, {"role": "user", "content": user}]

    # -- scoring ---------------------------------------------------------------------------------------------
    async def verdict(self, messages: list[Message], verdicts: Verdicts,
                      rollouts: Sequence[Rollout] = ()) -> VerdictScore:
        """Ask (or reuse a cached or in-flight identical call) and score the verdict token."""
        return await self.ask(messages, lambda payload: score_verdict(json.loads(payload), verdicts), rollouts)

    async def score(self, rubric: Rubric, rollout: Rollout, name: str = "") -> float:
        got = await self.verdict(self.rubric_messages(rubric, rollout), self.verdicts(rubric), [rollout])
        rollout.metrics[f"judge/mass_{name or slugify(rubric.title)}"] = got.mass
        return got.score

    async def prefer(self, rubric: Rubric, first: Rollout, second: Rollout,
                     rollouts: Sequence[Rollout] = ()) -> float:
        """P(``first`` is better than ``second`` on the rubric), shown in that order."""
        return (await self.verdict(self.pair_messages(rubric, first, second), PAIR_VERDICTS, rollouts)).score

    def reward(self, rubric: Rubric, weight: float | None = None, *, name: str | None = None,
               timeout: float | None = None) -> Reward:
        """A ``Reward`` scoring ``rubric`` from one verdict token per rollout (weights as for ``Judge``)."""
        self.verdicts(rubric)  # a rubric with too many levels fails here, not at the first step
        return super().reward(rubric, weight, name=name, timeout=timeout)

    def pairwise(self, rubric: Rubric, weight: float = 1.0, *, name: str | None = None,
                 timeout: float | None = None) -> Reward:
        """A group ``Reward``: each rollout's mean order-averaged preference over its siblings."""
        name = name or slugify(rubric.title)

        async def judge_pairwise(rollouts: list[Rollout]) -> list[float]:
            g = len(rollouts)
            order = [(i, j) for i in range(g) for j in range(g) if i != j]
            ps = await asyncio.gather(*(self.prefer(rubric, rollouts[i], rollouts[j], rollouts) for i, j in order))
            p_first: list[list[float | None]] = [[None] * g for _ in range(g)]
            for (i, j), p in zip(order, ps):
                p_first[i][j] = p
            scores, bias = pairwise_scores(p_first)
            for ro in rollouts:
                ro.metrics[f"judge/position_bias_{name}"] = bias
            return scores

        judge_pairwise.__name__ = name
        return Reward(judge_pairwise, weight=weight, name=name, group=True, timeout=timeout)


class LocalJudge(LogprobJudge):
    """A Hugging Face causal LM in this process as the judge (module docstring). ``model``: a hub
    id, alias or directory (loaded with ``rlft.policy.load_policy`` in ``dtype`` on ``device`` at the
    first verdict, so building one loads nothing), or a loaded model with its ``tokenizer``.
    Prompts are rendered with the model's chat template (exactly as ``rlft serve`` renders them)
    and scored in batches of at most ``max_batch_size`` prompts and ``max_batch_tokens`` padded
    tokens, one forward pass each, in a worker thread.
    ``name`` labels it in errors and the cache key. Metrics as for ``Judge``: requests = prompts
    scored, prompt_tokens = their tokens, seconds = forward time (shared by a batch's prompts)."""

    def __init__(self, model: Any, tokenizer: Any = None, *, name: str | None = None, dtype: Any = "float32",
                 device: Any = "cpu", max_batch_size: int = 16, max_batch_tokens: int = 16384,
                 batch_wait_s: float = 0.005, answer: str = "digit", scale: tuple[int, int] = (1, 5),
                 cache_size: int = 4096, cache_ttl: float | None = None):
        label = name or (os.fspath(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__)
        super().__init__(label, "in-process", "local", answer=answer, scale=scale, cache_size=cache_size,
                         cache_ttl=cache_ttl, retries=0, timeout=3600.0)
        self._source: tuple[Any, Any, Any] | None = None
        self.lm = self.tokenizer = self.renderer = None
        if isinstance(model, (str, os.PathLike)):
            # loaded at the first verdict (_load), not here: an environment module that builds a
            # LocalJudge imports without loading weights (rlft config, test collection, judge-free runs)
            self._source = (model, dtype, device)
        elif tokenizer is None:
            raise ValueError("LocalJudge needs the model's tokenizer")
        else:
            self._use(model, tokenizer)
        self.max_batch_size, self.max_batch_tokens, self.batch_wait_s = max_batch_size, max_batch_tokens, batch_wait_s
        self._pending: list[tuple[list[Message], asyncio.Future, list[Rollout]]] = []
        self._flusher: asyncio.Task | None = None
        self._lock = threading.Lock()
        self._vocab_text: list[str] | None = None
        self._verdict_ids: dict[str, list[int]] = {}  # verdict text -> the token ids whose stripped text is it
        self._verdict_keys: set[str] = set("0123456789")  # the verdict texts of the rubrics scored so far

    def _use(self, model: Any, tokenizer: Any) -> None:
        from rlft.renderer import Renderer

        self.lm, self.tokenizer, self.renderer = model.eval(), tokenizer, Renderer(tokenizer)

    def _load(self) -> None:
        """Load the model named at construction, once (any thread: under the forward lock)."""
        with self._lock:
            if self.lm is None and self._source is not None:
                from rlft.policy import load_policy

                name, dtype, device = self._source
                policy = load_policy(name, dtype=dtype, device=device)
                self._use(policy.model, policy.tokenizer)

    def verdicts(self, rubric: Rubric) -> Verdicts:
        v = super().verdicts(rubric)
        if not v.values.keys() <= self._verdict_keys:
            if self.answer == "level":
                alone = [k for k in v.values if not self._ids_for([k])]
                if alone:
                    raise ValueError(f"rubric {rubric.title!r}: the levels {alone} are not single tokens of the "
                                     f"judge's tokenizer; use answer='digit'")
            self._verdict_keys |= set(v.values)
        return v

    def reset_stats(self) -> None:
        super().reset_stats()
        self._stats["forward_passes"] = 0

    def _ids_for(self, keys: Iterable[str]) -> list[int]:
        missing = [k for k in keys if k not in self._verdict_ids]
        if missing:
            self._load()
            if self._vocab_text is None:  # once: the text of every token (49k decodes on SmolLM2: ~0.3 s)
                n = len(self.tokenizer)
                self._vocab_text = [t.strip().casefold() for t in
                                    self.tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False)]
            for k in missing:
                self._verdict_ids[k] = [i for i, t in enumerate(self._vocab_text) if t == k]
        return sorted({i for k in keys for i in self._verdict_ids[k]})

    async def _request(self, messages: list[Message], parse: Any, rollouts: list[Rollout]) -> str:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._stats["calls"] += 1
        self._pending.append((messages, fut, rollouts))
        if self._flusher is None or self._flusher.done() or self._flusher.get_loop() is not loop:
            self._flusher = loop.create_task(self._flush())
        payload = await fut
        parse(payload)  # NoVerdictMassError: not cached, not retried (the same prompt gives the same logits)
        return payload

    async def _flush(self) -> None:
        await asyncio.sleep(self.batch_wait_s)  # let the step's other rollouts queue their prompts
        while self._pending:
            batch = []
            while self._pending and len(batch) < self.max_batch_size:
                batch.append(self._pending.pop(0))
            t0 = time.perf_counter()
            try:
                results = await asyncio.to_thread(self._forward, [m for m, _, _ in batch], set(self._verdict_keys))
            except Exception as e:  # noqa: BLE001 - every waiting call gets the error
                self._stats["errors"] += len(batch)
                for _, fut, _ in batch:
                    if not fut.done():
                        fut.set_exception(JudgeError(f"local judge {self.model!r}: {type(e).__name__}: {e}"))
                continue
            dt = time.perf_counter() - t0
            self._stats["requests"] += len(batch)
            self._stats["seconds"] += dt
            self._latency_sum, self._latency_max = self._latency_sum + dt * len(batch), max(self._latency_max, dt)
            for (_, fut, rollouts), (payload, n_tok) in zip(batch, results):
                self._stats["prompt_tokens"] += n_tok
                self._note(rollouts, requests=1, prompt_tokens=n_tok, seconds=dt / len(batch))
                if not fut.done():
                    fut.set_result(payload)

    def _forward(self, conversations: list[list[Message]], keys: set[str]) -> list[tuple[str, int]]:
        """One batched forward pass (split only past ``max_batch_tokens``): per prompt, the payload
        ``[[token text, logprob], ...]`` of every token whose text is a verdict in ``keys`` and of
        the top 20, and the prompt's length."""
        import torch

        self._load()
        prompts = [self.renderer.render_prompt(m) for m in conversations]
        wanted = set(self._ids_for(keys))
        out: list[tuple[str, int]] = []
        step = max(1, min(len(prompts), self.max_batch_tokens // max(len(p) for p in prompts)))
        device = next(self.lm.parameters()).device
        for s in range(0, len(prompts), step):
            chunk = prompts[s:s + step]
            width = max(len(p) for p in chunk)
            ids_BL = torch.zeros((len(chunk), width), dtype=torch.long)
            mask_BL = torch.zeros((len(chunk), width), dtype=torch.long)
            for b, p in enumerate(chunk):  # left padding: the last position is every row's verdict position
                ids_BL[b, width - len(p):], mask_BL[b, width - len(p):] = torch.tensor(p), 1
            pos_BL = (mask_BL.cumsum(-1) - 1).clamp(min=0)
            self._stats["forward_passes"] += 1
            with self._lock, torch.no_grad():
                logits_BV = self.lm(input_ids=ids_BL.to(device), attention_mask=mask_BL.to(device),
                                    position_ids=pos_BL.to(device), logits_to_keep=1).logits[:, -1].float().cpu()
            logp_BV = torch.log_softmax(logits_BV, dim=-1)
            top_ids = logp_BV.topk(20, dim=-1).indices
            for b, p in enumerate(chunk):
                ids = sorted(wanted | set(top_ids[b].tolist()))
                vals = logp_BV[b, ids].tolist()
                pairs = [(self._text(i), v) for i, v in zip(ids, vals)]
                out.append((json.dumps(pairs), len(p)))
        return out

    def _text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

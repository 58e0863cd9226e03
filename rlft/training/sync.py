"""Weight sync between the trainer and its engine, and the check that it really happened.

After every optimizer step the trainer's weights change and the engine that samples the next
rollouts must serve exactly those weights. A sync that silently did not happen (an adapter that
failed to load, an engine that kept its old copy, a server answering from the wrong version) does
not crash anything: the run just trains off-policy with importance ratios that lie. This module
makes that a named error instead.

Four things, run by :class:`WeightSync` from the training loop:

1. **Push.** ``push(version)`` hands the engine one :class:`~rlft.engines.base.WeightUpdate` in
   the form its ``weight_format`` declares: SHARED (the HF engine running the trainer's own
   module) is only told the new version; MODULE (an HF copy or merged LoRA copy, vLLM full
   finetune) gets the trainer's module to copy or load in place; ADAPTER (the remote engine,
   vLLM with LoRA) gets the LoRA adapter saved to ``<run_dir>/sync/v<version>`` (the two newest
   are kept), and needs a LoRA policy.
2. **Version labels.** Every :class:`~rlft.engines.base.Sample` carries the ``policy_version`` of
   the weights that produced it, as the engine reports it (the remote engine reads it from the
   name of the adapter that answered), and every rollout keeps it. ``sync/policy_lag`` is the
   current step minus that version (mean and max over the batch): 0 when on-policy.
3. **Rollout check.** When the next step's rollouts are on-policy and untruncated (no
   ``overlap``, ``top_p = 1``, ``top_k = 0``: the sampler's logprobs are then ``log_softmax(logits
   / T)`` of the very weights the trainer holds), those rollouts are the check, at no cost: every
   one must carry the pushed version (:meth:`WeightSync.check_versions`, **stale** otherwise), and the
   update's first pass, which computes the trainer's logprobs of every trained token anyway, stops
   the run before the optimizer step when their mean absolute difference from the sampler's is above
   ``sync_tolerance`` (:func:`verify_rollouts`, **mismatched**). No update is ever applied from
   rollouts of weights the trainer does not hold, and the check covers hundreds of sampled tokens
   instead of the probe's 64. The probe below then runs only at the start and before an eval that
   follows a push (an eval's samples train nothing, so no update checks them; its cost is the
   eval's); otherwise after every sync. It cost ~1.2 s of a ~9 s CPU demo step.
4. **Probe check.** After a sync the engine samples a fixed probe prompt (``PROBE_SAMPLES``
   samples of up to ``PROBE_TOKENS`` tokens, temperature 1, fixed seeds, drawn concurrently) and
   the trainer recomputes the logprobs of exactly those tokens with its own model. The run stops
   with :class:`WeightSyncError` when the engine reports another version than the one just pushed
   (**stale**), or when the mean absolute logprob difference is above ``sync_tolerance``
   (**mismatched**: the right label on the wrong weights, a different base model, a LoRA scaling
   bug, an adapter that did not load). Metrics: ``sync/probe_logprob_diff`` (and ``_max``). Not
   run for a SHARED engine (it runs the trainer's own module: the default HF engine without a
   copy): there is nothing to compare, and it would cost a short generation per step.

Why sample and re-score, rather than have the engine score a fixed text: it needs nothing from an
engine beyond the Engine protocol (``generate`` with logprobs), so the same check covers the HF
engine, vLLM and any OpenAI-compatible server. Temperature 1 rather than greedy: a greedy token's
probability is near 1 and its logprob barely moves when the weights change, while sampled
tokens' logprobs move by about as much as the logits do; the numerical noise is the same for both.

Tolerance (``sync_tolerance``, default 0.15 nats, mean over the probe tokens: 4 x 16 since the
seventh session, 4 x 48 when the figures below were measured). Measured on
CPU (SmolLM2-135M, LoRA r16; the engine decodes with a KV cache, the trainer runs a full forward):

- fresh weights, bf16 trainer vs a bf16 engine (the trainer's own module, or a copy loaded from the
  pushed adapter as ``rlft serve`` does: identical numbers): 0.038-0.057 over 25 probes (before
  and during 8 steps at lr 2e-4); fp32 trainer vs bf16 server: 0.034-0.050; fp32 vs fp32: ~2e-7.
  The batch metric ``sync/logprob_diff_mean`` on real rollouts reads 0.040-0.047 meanwhile; over
  the recipes' and the demo's runs since (bf16, T = 0.7 and 1.0, the engine's merged copy) it was
  0.002-0.046 per step, so the same tolerance serves the rollout check.
- stale weights: one optimizer step at lr 2e-4 moves the probe's logprobs by 0.04-0.06 on the same
  tokens, i.e. by bf16 rounding noise: an engine one step behind scored 0.048-0.057, an engine
  still at version 0 scored 0.045-0.078 over 8 steps. No logprob threshold can tell one-step-stale weights from fresh
  ones in bf16 (and the off-policy error they cause is of the size of the bf16 mismatch that is
  always there), so staleness is caught by the version label, at the very next step; the
  tolerance (about 3x the bf16 noise) catches weights that are *wrong*: another base model, a
  missing or mis-scaled adapter once training has moved it, a dtype/kernel bug. In fp32 the probe
  resolves single steps (tiny model, lr 5e-3: 0.028 after one step vs 2e-7 fresh).
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlft.engines.base import TrainableEngine, WeightFormat, WeightUpdate

__all__ = ["PROBE_MESSAGES", "PROBE_SAMPLES", "PROBE_TOKENS", "ProbeResult", "WeightSync", "WeightSyncError",
           "policy_lag", "probe", "probe_check", "probe_prompt", "trainer_logprobs", "trainer_logprobs_many", "verify",
           "verify_rollouts"]

PROBE_MESSAGES = [{"role": "user", "content": "Describe the weather in Paris in a few sentences, then count from "
                                              "one to ten in words."}]
PROBE_TOKENS = 16  # per sample (fewer when the model ends its turn): 64 tokens compared, ~3x the noise
# margin below; 48 made the probe ~30 % of a demo step on the CPU (time/train 7 s with it, 4 s without)
PROBE_SAMPLES = 4  # samples of the probe, drawn concurrently (one batch for a batching engine)
PROBE_SEED = 918_273_645


class WeightSyncError(RuntimeError):
    """The engine does not serve the trainer's weights: stale (an older version answered) or
    mismatched (its logprobs of the probe differ from the trainer's by more than the tolerance)."""


@dataclass
class ProbeResult:
    diff: float  # mean |engine logprob - trainer logprob| over the probe tokens (all samples)
    max_diff: float
    tokens: int  # probe tokens compared
    engine_version: int  # the policy_version the engine reported for the probe
    expected_version: int | None


def probe_prompt(renderer: Any) -> list[int]:
    """The fixed probe prompt, rendered with the run's chat template."""
    return renderer.render_prompt(PROBE_MESSAGES)


def trainer_logprobs(policy: Any, prompt_ids: list[int], tokens: list[int], *, temperature: float = 1.0,
                     autocast: bool = False) -> list[float]:
    """The trainer's logprobs of ``tokens`` after ``prompt_ids``, computed as the policy update
    computes them (same forward, same temperature convention; ``autocast``: the update's bf16 precision,
    as it computes whenever the run's dtype is bfloat16)."""
    return trainer_logprobs_many(policy, prompt_ids, [tokens], temperature=temperature, autocast=autocast)[0]


def trainer_logprobs_many(policy: Any, prompt_ids: list[int], completions: list[list[int]], *,
                          temperature: float = 1.0, autocast: bool = False) -> list[list[float]]:
    """:func:`trainer_logprobs` of several completions of one prompt, in one forward pass: the rows
    are padded at the end, which a causal model's earlier positions never see."""
    import torch

    from rlft.training import grpo
    from rlft.training.update import completion_logits, training_precision

    C = max((len(t) for t in completions), default=0)
    if not C:
        return [[] for _ in completions]
    model = policy.model
    dev = policy.device
    rows = [list(prompt_ids) + list(t) + [0] * (C - len(t)) for t in completions]  # (B, P + C)
    ids = torch.tensor(rows, dtype=torch.long, device=dev)
    attn = torch.ones_like(ids)
    pos = torch.arange(ids.shape[1], device=dev)[None].expand_as(ids)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), training_precision(policy, autocast):
            logits_BCV = completion_logits(model, ids, attn, pos, C)
            logp_BC = grpo.token_logprobs(logits_BCV, ids[:, -C:], temperature)
    finally:
        if was_training:
            model.train()
    return [logp_BC[b, :len(t)].float().tolist() for b, t in enumerate(completions)]


async def probe(policy: Any, engine: Any, probe_ids: list[int], *, expected_version: int | None = None,
                max_new_tokens: int = PROBE_TOKENS, samples: int = PROBE_SAMPLES, seed: int = PROBE_SEED,
                autocast: bool = False) -> ProbeResult:
    """Sample the probe ``samples`` times with ``engine`` (concurrently: temperature 1, seeds
    ``seed + i``) and compare its logprobs with the trainer's for the same tokens."""
    from rlft.engines.base import SamplingParams

    outs = await asyncio.gather(*(engine.generate(list(probe_ids), SamplingParams(
        temperature=1.0, max_new_tokens=max_new_tokens, seed=seed + i)) for i in range(samples)))
    diffs: list[float] = []
    mine = trainer_logprobs_many(policy, probe_ids, [s.tokens for s in outs], autocast=autocast)
    for sample, lp in zip(outs, mine):
        diffs += [abs(a - b) for a, b in zip(sample.logprobs, lp)]
    versions = [int(s.policy_version) for s in outs]
    # the version that is off, if any (an engine may answer from several versions at once)
    version = next((v for v in versions if v != expected_version), versions[0]) if versions else -1
    return ProbeResult(diff=sum(diffs) / len(diffs) if diffs else 0.0, max_diff=max(diffs, default=0.0),
                       tokens=len(diffs), engine_version=version, expected_version=expected_version)


def _stale(version: int | None, answered: Any) -> WeightSyncError:
    return WeightSyncError(
        f"stale weights: after the sync to policy version {version} the engine answered with version {answered}; "
        "it did not load the new weights, so rollouts would be sampled off-policy")


def _mismatched(at: str, compared: str, diff: float, max_diff: float, tolerance: float,
                after: str = "") -> WeightSyncError:
    return WeightSyncError(
        f"mismatched weights{at}: the engine's logprobs of {compared} differ from the trainer's by {diff:.4f} on "
        f"average (max {max_diff:.4f}), above sync_tolerance={tolerance:g}: the engine serves other weights than "
        f"the trainer's (wrong base model or adapter, a failed load, another dtype or LoRA scaling){after}")


def verify(result: ProbeResult, tolerance: float) -> None:
    """Raise :class:`WeightSyncError` when ``result`` shows stale or mismatched weights."""
    if result.expected_version is not None and result.engine_version != result.expected_version:
        raise _stale(result.expected_version, result.engine_version)
    if result.diff > tolerance:
        raise _mismatched(f" at policy version {result.expected_version}", f"the {result.tokens}-token probe",
                          result.diff, result.max_diff, tolerance)


def verify_rollouts(diff_mean: float, diff_max: float, tokens: int, version: int | None, tolerance: float) -> None:
    """Raise :class:`WeightSyncError` when the sampler's logprobs of a batch's ``tokens`` trained
    tokens differ from the trainer's (same weights) by more than ``tolerance`` on average."""
    if tokens and diff_mean > tolerance:
        at = f" at policy version {version}" if version is not None else ""
        raise _mismatched(at, f"this step's {tokens} sampled tokens", diff_mean, diff_max, tolerance,
                          "; no update was applied from these rollouts")


async def probe_check(policy: Any, engine: Any, probe_ids: list[int], tolerance: float, *,
                      expected_version: int | None = None, **kwargs: Any) -> float:
    """Probe the engine (see :func:`probe`); raise :class:`WeightSyncError` when it is stale
    (``expected_version`` given and another version answered) or its logprobs differ from the
    trainer's by more than ``tolerance`` (mean over the probe). Returns the mean difference."""
    result = await probe(policy, engine, probe_ids, expected_version=expected_version, **kwargs)
    verify(result, tolerance)
    return result.diff


def policy_lag(groups: Any, step: int) -> dict[str, float]:
    """``sync/policy_lag`` = ``step`` minus each rollout's policy version: mean and max over the batch."""
    lags = [step - r.policy_version for g in groups for r in g.rollouts]
    if not lags:
        return {}
    return {"sync/policy_lag": sum(lags) / len(lags), "sync/policy_lag_max": float(max(lags))}


class WeightSync:
    """The trainer's side of weight sync: push weights to the engine, check them, keep metrics.

    ``loop``: the event loop the engine's requests run on (the training loop's). ``autocast``:
    whether the policy update computes in bf16 (``update.training_precision``). ``on_policy``: the
    rollouts after each sync are sampled by the pushed weights, untruncated (no overlap, top-p 1,
    top-k 0), so they can be the check instead of the probe (see the module docstring).
    """

    def __init__(self, policy: Any, engine: TrainableEngine, renderer: Any, run_dir: str | Path, loop: Any, *,
                 check: bool = True, tolerance: float = 0.15, autocast: bool = False, keep: int = 2,
                 on_policy: bool = False):
        self.policy, self.engine, self.loop = policy, engine, loop
        self.sync_dir = Path(run_dir) / "sync"
        self.enabled, self.tolerance, self.autocast, self.keep = check, float(tolerance), autocast, max(1, keep)
        self.on_policy = on_policy
        self.unchecked: int | None = None  # a pushed version no check has seen yet (rollout check only)
        self.probe_ids = probe_prompt(renderer)
        if engine.weight_format is WeightFormat.ADAPTER and not policy.is_lora:
            raise ValueError(f"{type(engine).__name__} takes new weights as LoRA adapters only: train with lora = true")
        self.last: ProbeResult | None = None

    @property
    def shared(self) -> bool:
        """The engine runs the trainer's own module: it cannot disagree with it, so it is not probed."""
        return self.engine.weight_format is WeightFormat.SHARED

    @property
    def checks_rollouts(self) -> bool:
        """Whether each step's rollouts are the check (stale labels, the update's logprob difference)
        rather than a probe after each sync."""
        return self.enabled and not self.shared and self.on_policy

    @property
    def rollout_tolerance(self) -> float:
        """The update's limit on the first pass's sampler-trainer logprob difference; 0 = not checked."""
        return self.tolerance if self.checks_rollouts else 0.0

    def check_versions(self, groups: Any, version: int) -> None:
        """Raise :class:`WeightSyncError` (stale) when a rollout of ``groups`` was sampled by another
        version than ``version``, the one pushed before they were sampled (rollout check only)."""
        if not self.checks_rollouts:
            return
        self.unchecked = None  # the update checks these rollouts' logprobs
        stale = sorted({r.policy_version for g in groups for r in g.rollouts if r.policy_version != version})
        if stale:
            raise _stale(version, ", ".join(map(str, stale)))

    def push(self, version: int) -> None:
        """Give the engine the trainer's current weights as ``version``, in its weight format."""
        if self.engine.weight_format is WeightFormat.ADAPTER:
            update = WeightUpdate(version, adapter_dir=self._save_adapter(version))
        else:  # MODULE copies it; SHARED already runs it (passed for reference)
            update = WeightUpdate(version, model=self.policy.model)
        self.engine.sync_weights(update)

    def _save_adapter(self, version: int) -> str:
        path = self.sync_dir / f"v{version}"
        tmp = self.sync_dir / f"v{version}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.policy.save(tmp)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        old = sorted((p for p in self.sync_dir.glob("v*") if p.name[1:].isdigit()), key=lambda p: int(p.name[1:]))
        for p in old[:-self.keep]:  # the previous version stays until the new one has answered
            shutil.rmtree(p, ignore_errors=True)
        return str(path)

    def check(self, version: int) -> dict[str, float]:
        """Probe the engine; raise :class:`WeightSyncError` when it does not serve ``version``.
        Skipped when disabled, and for an engine that runs the trainer's own module (nothing to compare)."""
        if not self.enabled or self.shared:
            return {}
        coro = probe(self.policy, self.engine, self.probe_ids, expected_version=version, autocast=self.autocast)
        self.last = result = self.loop.run_until_complete(coro) if self.loop is not None else asyncio.run(coro)
        verify(result, self.tolerance)
        return {"sync/probe_logprob_diff": result.diff, "sync/probe_logprob_diff_max": result.max_diff}

    def start(self, version: int) -> dict[str, float]:
        """Before the first step (or after a resume): push when the engine is not at ``version``
        yet, then check it (a wrong base model on a server is caught before any compute is spent)."""
        if version != self.engine.policy_version:
            self.push(version)
        return self.check(version)

    def after_update(self, version: int) -> dict[str, float]:
        """After an optimizer step: push ``version`` and probe it, unless the next step's rollouts
        are the check (:meth:`before_eval` probes it if an eval samples first)."""
        self.push(version)
        if self.checks_rollouts:
            self.unchecked = version
            return {}
        return self.check(version)

    def before_eval(self) -> dict[str, float]:
        """Before an eval samples from the engine: probe the last push if no rollouts checked it yet
        (an eval's samples train nothing, so no update would)."""
        version, self.unchecked = self.unchecked, None
        return self.check(version) if version is not None else {}

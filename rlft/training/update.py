"""One policy update from scored groups: advantages, micro-batches, forward, loss, backward, step.

The sequences trained on are the rollouts' own token ids (prompt + completion, left-padded so
that every completion ends at the last position and the model computes logits only for the
completion window: ``logits_to_keep``). Only sampled tokens (mask 1) carry loss. Micro-batches
are length-bucketed under a token budget and their losses use the whole batch's normalizer, so
accumulation gives the same gradient as one big batch. With ``shared_prefix`` (the default where
it is exact: ``rlft.training.prefix``) the rollouts of a group are packed into one row that holds
their common prompt once, and micro-batches are made of such rows under the same budget. With
``epochs > 1`` the importance ratio is against the trainer's own logprobs of the first pass (the
rollout-time policy); for a rollout sampled by older weights (``policy_version`` below the current
one: overlap) it is against the sampler's logprobs. A played demonstration in a group
(``Rollout.demonstration``, LUFFY guidance: ``rlft.training.guidance``) has no sampler logprobs: its
tokens take the shaped off-policy term (``grpo.policy_loss``'s ``off_policy_B``). Distributed
(``model`` a DDP/FSDP2 wrapper, see ``rlft.distributed``): the normalizer and metrics are summed
over ranks and the loss scaled so that the gradient is the single-process one.
Left out: the loss math itself (``rlft.training.grpo``) and anything about where rollouts came from.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from rlft import distributed
from rlft.training import grpo, prefix
from rlft.training.logprobs import PlainInputs, completion_logits, forward_logprobs, to_device
from rlft.training.recompute import recompute_if_over
from rlft.types import Group, Rollout


def select_groups(groups: list[Group], *, baseline: str, std_normalize: bool, drop_tied: bool,
                  overlong_penalty: tuple[int, int] | None = None) -> tuple[list[Group], int]:
    """Set each rollout's advantage; with ``drop_tied`` (dynamic sampling) leave out the groups
    whose rewards are all equal. ``overlong_penalty``: (the rollout token budget, the soft cache
    before it) for DAPO's length penalty, added to the reward as its own component first.
    Returns (groups to train on, number of groups left out)."""
    if overlong_penalty is not None:
        max_len, cache = overlong_penalty
        for g in groups:
            for r in g.rollouts:
                pen = float(grpo.overlong_penalty(torch.tensor([float(r.num_sampled_tokens)]), max_len, cache)[0])
                r.rewards["overlong_penalty"] = pen
                r.reward += pen
    if not groups:
        return [], 0
    for g in groups:
        rewards_G = torch.tensor([r.reward for r in g.rollouts], dtype=torch.float32)
        adv_G = grpo.group_advantages(rewards_G, baseline=baseline, std_normalize=std_normalize)
        for r, a in zip(g.rollouts, adv_G.tolist()):
            r.advantage = a
    if not drop_tied:
        return list(groups), 0
    kept = _untied(groups)
    return [groups[i] for i in kept], len(groups) - len(kept)


def _untied(groups: list[Group]) -> list[int]:
    """Indices of the groups whose rewards vary (``grpo.keep_groups``; groups of equal size are
    one (P, G) tensor, the normal case; a ragged batch is checked group by group)."""
    sizes = {len(g.rollouts) for g in groups}
    if len(sizes) == 1:
        rewards_PG = torch.tensor([[r.reward for r in g.rollouts] for g in groups], dtype=torch.float32)
        return grpo.keep_groups(rewards_PG).tolist()
    return [i for i, g in enumerate(groups)
            if grpo.keep_groups(torch.tensor([[r.reward for r in g.rollouts]], dtype=torch.float32)).numel()]


@dataclass(frozen=True)
class UpdateConfig:
    """What one policy update needs beyond the loss: passes, micro-batching, clipping, precision."""

    loss: grpo.LossConfig
    epochs: int = 1  # optimizer steps per batch (ratios vs the first pass's logprobs)
    micro_batch_tokens: int = 2048  # padded tokens per forward/backward
    max_grad_norm: float = 1.0  # 0 = no clipping
    bf16: bool = False  # forward passes under bf16 autocast (training_precision)
    filter_truncated: bool = False  # DAPO overlong filtering: truncated rollouts get no loss
    shared_prefix: str = "auto"  # each group's common prompt forwarded once: auto (where exact) | true | false
    # > 0: the rollouts are on-policy, so a first-pass sampler-trainer logprob difference (mean) above
    # this means the engine served other weights: WeightSyncError before the optimizer step (rlft.training.sync)
    sync_tolerance: float = 0.0


@dataclass
class _Item:
    rollout: Rollout
    length: int
    group: int = 0  # index of its group in the batch (the rows of shared-prefix packing)
    old_logp: torch.Tensor | None = None  # (C_i,) trainer logprobs of the first pass
    ref_logp: torch.Tensor | None = None


def _micro_batches(items: list[_Item], budget: int) -> list[list[_Item]]:
    """Length-bucketed: sort by length, fill each micro-batch up to ``budget`` padded tokens."""
    out: list[list[_Item]] = []
    for it in sorted(items, key=lambda x: -x.length):
        if out and (len(out[-1]) + 1) * out[-1][0].length <= budget:
            out[-1].append(it)
        else:
            out.append([it])
    return out


@dataclass
class _Micro:
    """One micro-batch: its sequences, and the packed rows they form (None: one row each)."""

    items: list[_Item]
    rows: list[prefix.Row] | None = None  # members index ``items``


def _plan(items: list[_Item], budget: int, shared: bool) -> list[_Micro]:
    """The micro-batches of one pass: plain length-bucketed sequences, or packed group rows."""
    if not shared:
        return [_Micro(mb) for mb in _micro_batches(items, budget)]
    seqs = [it.rollout.prompt_ids + it.rollout.completion_ids for it in items]
    out = []
    for mb in prefix.micro_batches(prefix.plan_rows(seqs, [it.group for it in items], budget), budget):
        order, local = prefix.renumbered(mb)
        out.append(_Micro([items[n] for n in order], local))
    return out


def _inputs(mb: _Micro, pad_id: int, additive_mask: bool):
    """The model inputs (``PlainInputs`` or ``prefix.PackedInputs``) and the completion window's
    mask (N, C), sampler logprobs (N, C) and advantages (N,), one row of those per sequence."""
    ids, attn, pos, tokens, mask, sampler_logp, adv = _tensors(mb.items, pad_id)
    if mb.rows is None:
        return PlainInputs(ids, attn, pos, tokens), mask, sampler_logp, adv
    seqs = [it.rollout.prompt_ids + it.rollout.completion_ids for it in mb.items]
    packed = prefix.pack(mb.rows, seqs, [len(it.rollout.prompt_ids) for it in mb.items], tokens.shape[1], pad_id,
                         additive=additive_mask)
    return packed, mask, sampler_logp, adv


def _demonstrations(mb: _Micro) -> torch.Tensor | None:
    """(N,) bool: the micro-batch's played demonstrations (None when it has none: the plain loss)."""
    off = [it.rollout.demonstration for it in mb.items]
    return torch.tensor(off) if any(off) else None


def _tensors(mb: list[_Item], pad_id: int):
    """Left-padded ids (B, L), attention (B, L), positions (B, L); completion window tensors
    tokens (B, C), mask (B, C), sampler logprobs (B, C), advantages (B,)."""
    L = max(it.length for it in mb)
    C = max(len(it.rollout.completion_ids) for it in mb)
    B = len(mb)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    mask = torch.zeros((B, C), dtype=torch.float32)
    sampler_logp = torch.zeros((B, C), dtype=torch.float32)
    for b, it in enumerate(mb):
        r = it.rollout
        seq = r.prompt_ids + r.completion_ids
        ids[b, L - len(seq):] = torch.tensor(seq)
        attn[b, L - len(seq):] = 1
        c = len(r.completion_ids)
        mask[b, C - c:] = torch.tensor(r.mask, dtype=torch.float32)
        sampler_logp[b, C - c:] = torch.tensor(r.logprobs, dtype=torch.float32)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    adv = torch.tensor([it.rollout.advantage for it in mb], dtype=torch.float32)
    return ids, attn, pos, ids[:, L - C:], mask, sampler_logp, adv


def policy_update(policy: Any, groups: list[Group], cfg: UpdateConfig, optimizer: torch.optim.Optimizer, *,
                  model: Any = None, policy_version: int | None = None) -> dict[str, float]:
    """One optimizer step per epoch over the rollouts of ``groups``; returns metrics.
    ``model``: the module to run forward/backward through (default ``policy.model``; the DDP
    wrapper under torchrun). ``policy_version``: the version of the weights being updated; rollouts
    sampled by an older version take the sampler's logprobs as the old policy's."""
    model = model if model is not None else policy.model
    dev = policy.device
    pad_id = policy.tokenizer.pad_token_id if policy.tokenizer.pad_token_id is not None else 0
    loss_cfg = cfg.loss
    items, normalizer = _loss_items(groups, loss_cfg, filter_truncated=cfg.filter_truncated)
    # the whole batch's counts, over ranks (identity in one process)
    normalizer, n_items = distributed.all_reduce_sum([normalizer, float(len(items))])
    stats: dict[str, float] = {"loss/policy": 0.0, "loss/kl": 0.0, "policy/clip_ratio": 0.0, "policy/entropy": 0.0,
                               "optim/grad_norm": 0.0, "batch/trained_sequences": n_items,
                               "batch/forward_tokens": 0.0, "batch/recomputed_micro_batches": 0.0}
    if not n_items or normalizer == 0:
        optimizer.step()  # no gradients: a no-op that keeps the scheduler's step count honest
        return stats
    bf16 = cfg.bf16
    shared = prefix.enabled(cfg.shared_prefix, policy.base_model.config)
    micro = _plan(items, cfg.micro_batch_tokens, shared)
    additive = shared and prefix.additive_mask(policy.base_model.config)
    scale = distributed.grad_scale(model)  # DDP averages gradients over ranks; the loss is a sum
    first = _FirstPass(policy_version)
    model.train()
    for epoch in range(cfg.epochs):
        optimizer.zero_grad(set_to_none=True)
        clip_sum = kl_sum = loss_sum = n_tokens = forwarded = recomputed = 0.0
        # FSDP2 + LoRA: the reference forward (adapters off) is a collective too: padding passes run one
        pad = ((lambda: _reference_pad(policy, dev, bf16)) if epoch == 0 and loss_cfg.beta > 0 and policy.is_lora
               and distributed.is_sharded(model) else None)
        for mb in distributed.micro_steps(model, micro, pad=pad):  # the same number of passes on every rank
            inputs, mask, sampler_logp, adv = _inputs(mb, pad_id, additive)
            inputs, mask, sampler_logp, adv = to_device(inputs, dev), mask.to(dev), sampler_logp.to(dev), adv.to(dev)
            off = _demonstrations(mb)
            off = off.to(dev) if off is not None else None
            C = mask.shape[1]
            forwarded += inputs.ids_BL.numel()
            # one sequence over the budget forms a micro-batch alone: recomputed, so the budget bounds memory
            with recompute_if_over(model, inputs.ids_BL.numel(), cfg.micro_batch_tokens) as recomputing:
                with training_precision(policy, bf16):
                    logp, ent = forward_logprobs(model, inputs, loss_cfg.temperature, mask, entropy=epoch == 0)  # B, C
                if epoch == 0:
                    first.record(mb.items, ent, logp, mask, sampler_logp)
                    if loss_cfg.beta > 0:
                        _reference_logprobs(policy, mb.items, inputs, mask, loss_cfg.temperature, bf16)
                old_logp = _window([it.old_logp for it in mb.items], C).to(dev)
                ref_logp = _window([it.ref_logp for it in mb.items], C).to(dev) if loss_cfg.beta > 0 else None
                is_w = grpo.tis_weights(old_logp, sampler_logp, loss_cfg.tis_cap) if loss_cfg.tis_cap > 0 else None
                loss, st = grpo.policy_loss(
                    logp, old_logp, adv, mask, eps_low=loss_cfg.eps_low, eps_high=loss_cfg.eps_high,
                    ratio_level=loss_cfg.ratio_level, loss_agg=loss_cfg.loss_agg, max_tokens=loss_cfg.max_tokens,
                    normalizer=normalizer, ref_logp_BT=ref_logp, beta=loss_cfg.beta, kl_estimator=loss_cfg.kl_estimator,
                    is_weights_BT=is_w, off_policy_B=off, shaping_gamma=loss_cfg.shaping_gamma)
                (loss * scale).backward()
            recomputed += recomputing
            n = float(mask.sum())
            n_tokens += n
            loss_sum += float(loss.detach())
            clip_sum += float(st["clip_ratio"]) * n
            kl_sum += float(st["kl"]) * n
        if epoch == 0:
            stats.update(first.metrics())
            if cfg.sync_tolerance > 0:
                _check_sync(stats, first.tokens, policy_version, cfg.sync_tolerance, optimizer)
        params = [p for p in model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        norm = distributed.full_tensor(norm)  # FSDP2: a DTensor over the shards' norms
        optimizer.step()
        if epoch == 0:
            loss_sum, clip_sum, kl_sum, n_tokens, forwarded, recomputed = distributed.all_reduce_sum(
                [loss_sum, clip_sum, kl_sum, n_tokens, forwarded, recomputed])
            stats.update({"loss/policy": loss_sum, "policy/clip_ratio": clip_sum / max(n_tokens, 1),
                          "loss/kl": kl_sum / max(n_tokens, 1), "optim/grad_norm": float(norm),
                          "batch/forward_tokens": forwarded, "batch/recomputed_micro_batches": recomputed})
    model.eval()
    optimizer.zero_grad(set_to_none=True)
    return stats


def _check_sync(stats: dict[str, float], tokens: int, version: int | None, tolerance: float,
                optimizer: torch.optim.Optimizer) -> None:
    """The rollout check of weight sync: the gradients are dropped and the run stopped when the
    sampler's logprobs disagree with the trainer's (every rank sees the same all-reduced figures)."""
    from rlft.training.sync import WeightSyncError, verify_rollouts

    try:
        verify_rollouts(stats["sync/logprob_diff_mean"], stats["sync/logprob_diff_max"], tokens, version, tolerance)
    except WeightSyncError:
        optimizer.zero_grad(set_to_none=True)
        raise


def _loss_items(groups: list[Group], loss_cfg: grpo.LossConfig, *, filter_truncated: bool) -> tuple[list[_Item], float]:
    """The sequences the forward pass needs, and the loss normalizer of the whole batch.

    The normalizer counts every candidate token (or sequence); rollouts with zero advantage and
    no KL term contribute exactly zero gradient, so they are left out of the forward pass."""
    rollouts = [(r, i) for i, g in enumerate(groups) for r in g.rollouts if r.completion_ids]
    if filter_truncated and rollouts:  # truncated rollouts teach nothing about how to finish
        keep_B = grpo.overlong_filter_mask(torch.tensor([r.truncated for r, _ in rollouts]))
        rollouts = [ri for ri, keep in zip(rollouts, keep_B.tolist()) if keep]
    mask_counts = [sum(r.mask) for r, _ in rollouts]
    if loss_cfg.loss_agg == "token_mean":
        normalizer = float(sum(mask_counts))
    elif loss_cfg.loss_agg == "seq_mean_token_mean":
        normalizer = float(sum(1 for n in mask_counts if n))
    else:
        normalizer = float(sum(1 for n in mask_counts if n) * loss_cfg.max_tokens)
    items = [_Item(r, len(r.prompt_ids) + len(r.completion_ids), g) for r, g in rollouts
             if sum(r.mask) and (r.advantage != 0.0 or loss_cfg.beta > 0)]
    return items, normalizer


class _FirstPass:
    """What the first pass over the batch records: each sequence's old-policy logprobs (the
    trainer's own, or the sampler's for a rollout of an older policy version), the entropy, and
    the trainer/sampler logprob difference."""

    def __init__(self, policy_version: int | None):
        self.policy_version = policy_version
        self.diffs: list[torch.Tensor] = []
        self.ent_sum = self.ent_n = 0.0
        self.tokens = 0  # sampled tokens compared (all ranks), set by metrics()

    @torch.no_grad()
    def record(self, mb: list[_Item], ent_BC, logp_BC, mask_BC, sampler_logp_BC) -> None:
        C = logp_BC.shape[1]
        self.ent_sum += float((ent_BC * mask_BC).sum())
        self.ent_n += float(mask_BC.sum())
        for b, it in enumerate(mb):
            c = len(it.rollout.completion_ids)
            stale = self.policy_version is not None and it.rollout.policy_version < self.policy_version
            it.old_logp = (sampler_logp_BC if stale else logp_BC.detach())[b, C - c:].clone()
        # a demonstration has no sampler logprobs to compare
        sampled_B = torch.tensor([not it.rollout.demonstration for it in mb], device=mask_BC.device)
        m_BC = mask_BC.bool() & sampled_B[:, None]
        self.diffs.append((logp_BC.detach() - sampler_logp_BC).abs()[m_BC])

    def metrics(self) -> dict[str, float]:
        d = torch.cat(self.diffs) if self.diffs else torch.zeros(0)
        ent_sum, ent_n, d_sum, d_n = distributed.all_reduce_sum([self.ent_sum, self.ent_n, float(d.sum()),
                                                                 float(d.numel())])
        self.tokens = int(d_n)
        return {"policy/entropy": ent_sum / max(ent_n, 1),
                "sync/logprob_diff_mean": d_sum / d_n if d_n else 0.0,
                "sync/logprob_diff_max": distributed.all_reduce_max(float(d.max()) if d.numel() else 0.0)}


@torch.no_grad()
def _reference_logprobs(policy: Any, mb: list[_Item], inputs, mask_NC, temperature: float, bf16: bool) -> None:
    """Each sequence's reference-model logprobs (the KL term's), set on its item."""
    with policy.reference() as ref, training_precision(policy, bf16):
        ref_lp, _ = forward_logprobs(ref, inputs, temperature, mask_NC)
    C = ref_lp.shape[1]
    for b, it in enumerate(mb):
        it.ref_logp = ref_lp[b, C - len(it.rollout.completion_ids):]


def _reference_pad(policy: Any, dev: Any, bf16: bool) -> None:
    """The reference forward of a zero-loss padding pass (its result is not used)."""
    ids = torch.zeros((1, 2), dtype=torch.long, device=dev)
    with policy.reference() as ref, training_precision(policy, bf16):
        ref(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)


@contextlib.contextmanager
def training_precision(policy: Any, bf16: bool):
    """bf16 autocast for the forward passes when training in bfloat16.

    Full finetuning keeps float32 master weights and computes in bf16. LoRA keeps a bf16 base
    and float32 adapters; peft would cast every adapter input up to float32 (and the result
    back), which cost 28 % of a SmolLM2 LoRA update in dtype copies and ran the adapter matmuls
    in float32. Under autocast with peft's input casting off, the adapters compute in bf16 from
    their float32 weights (gradients still reach those in float32): 2.7x faster forward+backward
    together with ``completion_logits``' head fix (measured, benchmarks/README.md)."""
    if not bf16:
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast("cuda" if policy.device.type == "cuda" else "cpu", dtype=torch.bfloat16))
        if policy.is_lora:
            from peft.helpers import disable_input_dtype_casting

            stack.enter_context(disable_input_dtype_casting(policy.model))
        yield


def _window(parts: list[torch.Tensor | None], C: int) -> torch.Tensor:
    """Right-align per-sequence vectors into a (B, C) tensor (zeros on the left)."""
    out = torch.zeros((len(parts), C), dtype=torch.float32)
    for b, p in enumerate(parts):
        if p is not None and len(p):
            out[b, C - len(p):] = p
    return out


__all__ = ["UpdateConfig", "completion_logits", "forward_logprobs", "policy_update", "select_groups",
           "training_precision"]

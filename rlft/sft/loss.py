"""One SFT optimizer step and one eval pass: length-bucketed micro-batches, the masked loss.

The loss is the token mean of cross-entropy over the trained tokens (mask 1) of the whole
optimizer step: each micro-batch's *sum* is divided by the step's trained-token count before its
backward, so gradient accumulation over micro-batches equals one big batch. Logits are computed
only where they are needed: the decoder's hidden states at the positions that predict a trained
token are gathered, and the output head + log-softmax run over them as in the RL update
(``rlft.training.head.sampled_logprobs``: chunks of ``chunk_tokens`` rows, recomputed in backward
when there is more than one; bf16 logits on the CPU through the ``token_logprobs`` kernel), so no
(B, L, V) logits tensor exists, in any dtype. A model on ``"rlft"`` attention (the CPU) also gets
the rows' layout as token ranges (``rlft.packed_attention``: each token sees its row up to itself),
so in bf16 it runs the packed-rows kernel, which visits only the causal pairs, instead of the dense
kernel (measured in benchmarks/README.md). Precision is RL's
(``rlft.training.update.training_precision``: bf16 autocast, peft input casting off). Rows are
right-padded. Left out: sequence packing into one row (cross-document attention masks), which the
length buckets make unnecessary at this scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rlft import attention, packed_attention
from rlft.training import head
from rlft.training.update import training_precision


def trained_tokens(mask: Sequence[int]) -> int:
    """Tokens that carry loss: mask 1, except position 0 (nothing predicts it)."""
    return int(sum(mask[1:]))


def micro_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices grouped longest first, each group's padded size (rows x longest) within ``budget``
    tokens (a single longer sequence gets a group of its own)."""
    out: list[list[int]] = []
    longest: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if out and (len(out[-1]) + 1) * longest[-1] <= budget:
            out[-1].append(i)
        else:
            out.append([i])
            longest.append(lengths[i])
    return out


def collate(seqs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``ids_BL``, ``attn_BL`` and the float ``mask_BL`` (0 on padding)."""
    B, L = len(seqs), max(len(ids) for ids, _ in seqs)
    ids_BL = torch.full((B, L), pad_id, dtype=torch.long)
    attn_BL = torch.zeros((B, L), dtype=torch.long)
    mask_BL = torch.zeros((B, L), dtype=torch.float32)
    for b, (ids, mask) in enumerate(seqs):
        ids_BL[b, : len(ids)] = torch.tensor(ids)
        attn_BL[b, : len(ids)] = 1
        mask_BL[b, : len(ids)] = torch.tensor(mask, dtype=torch.float32)
    return ids_BL, attn_BL, mask_BL


def masked_loss_sum(policy: Any, ids_BL: torch.Tensor, attn_BL: torch.Tensor, mask_BL: torch.Tensor, *,
                    chunk_tokens: int = head.CHUNK_TOKENS) -> torch.Tensor:
    """Sum over positions t >= 1 with mask 1 of -log p(ids[t] | ids[:t]), float32, differentiable.
    Call inside ``training_precision``."""
    base = policy.base_model  # LoRA: the peft-injected model (its adapters run inside the decoder)
    decoder = base.get_decoder()
    L = ids_BL.shape[1]
    pos_BL = torch.arange(L, device=ids_BL.device).expand_as(ids_BL)
    ranges = {}
    if base.config._attn_implementation == attention.NAME:  # the one attention that reads them
        rows = packed_attention.layout(L, [(0, int(n)) for n in attn_BL.sum(1).tolist()], [])  # right-padded
        ranges[packed_attention.KWARG] = rows.to(ids_BL.device)
    out = decoder(input_ids=ids_BL, attention_mask=attn_BL, position_ids=pos_BL, use_cache=False, **ranges)
    keep_BL = mask_BL[:, 1:] > 0  # the state at t-1 predicts token t
    h_NH = out.last_hidden_state[:, :-1][keep_BL]
    targets_N = ids_BL[:, 1:][keep_BL]
    softcap = getattr(base.config, "final_logit_softcapping", None)
    logp_N, _ = head.sampled_logprobs(base.get_output_embeddings(), h_NH, targets_N, 1.0, softcap=softcap,
                                      chunk_tokens=chunk_tokens)
    return -logp_N.sum()


def _pad_id(policy: Any) -> int:
    pad = policy.tokenizer.pad_token_id
    return pad if pad is not None else 0


def train_step(policy: Any, seqs: Sequence[tuple[Sequence[int], Sequence[int]]], optimizer: torch.optim.Optimizer, *,
               micro_batch_tokens: int, max_grad_norm: float, bf16: bool,
               chunk_tokens: int = head.CHUNK_TOKENS) -> dict[str, float]:
    """One optimizer step over ``seqs`` ((ids, mask) pairs); returns ``loss`` (the step's token
    mean), ``grad_norm`` (before clipping), ``tokens`` (non-padding) and ``trained_tokens``."""
    normalizer = sum(trained_tokens(m) for _, m in seqs)
    tokens = sum(len(ids) for ids, _ in seqs)
    optimizer.zero_grad(set_to_none=True)
    if normalizer == 0:  # nothing to learn from: keep the step count honest, change nothing
        optimizer.step()
        return {"loss": float("nan"), "grad_norm": 0.0, "tokens": tokens, "trained_tokens": 0}
    dev, model = policy.device, policy.model
    loss_total = 0.0
    model.train()
    try:
        for group in micro_batches([len(ids) for ids, _ in seqs], micro_batch_tokens):
            ids, attn, mask = (t.to(dev) for t in collate([seqs[i] for i in group], _pad_id(policy)))
            with training_precision(policy, bf16):
                loss = masked_loss_sum(policy, ids, attn, mask, chunk_tokens=chunk_tokens) / normalizer
            loss.backward()
            loss_total += float(loss.detach())
    finally:
        model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_total, "grad_norm": float(norm), "tokens": tokens, "trained_tokens": normalizer}


@torch.no_grad()
def eval_loss(policy: Any, seqs: Sequence[tuple[Sequence[int], Sequence[int]]], *, micro_batch_tokens: int,
              bf16: bool, chunk_tokens: int = head.CHUNK_TOKENS) -> float:
    """Token-mean cross-entropy over the trained tokens of ``seqs`` (NaN when there are none)."""
    normalizer = sum(trained_tokens(m) for _, m in seqs)
    if not normalizer:
        return float("nan")
    total = 0.0
    for group in micro_batches([len(ids) for ids, _ in seqs], micro_batch_tokens):
        ids, attn, mask = (t.to(policy.device) for t in collate([seqs[i] for i in group], _pad_id(policy)))
        with training_precision(policy, bf16):
            total += float(masked_loss_sum(policy, ids, attn, mask, chunk_tokens=chunk_tokens))
    return total / normalizer


__all__ = ["collate", "eval_loss", "masked_loss_sum", "micro_batches", "train_step", "trained_tokens"]

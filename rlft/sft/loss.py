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
right-padded.

Shared prefixes (``shared_prefix``, as the RL update's: ``"auto"`` where exact): transcripts whose
first ``GROUP_KEY_TOKENS`` tokens agree (the system prompt, the tool schemas) are packed as the RL
update packs a group's rollouts (``rlft.training.prefix``): their common prefix forwarded once, each
transcript's rest a segment that attends to it, so loss and gradients are the plain ones while the
prefix is computed once per row instead of once per transcript (the tool_use recipe's warm-up
transcripts: ~530 tokens of which ~430 the system prompt with the tool schemas). The loss then
comes from ``rlft.training.logprobs.forward_logprobs`` over each transcript's window from its
first trained token on. Left out: packing transcripts that share no prefix into one row
(cross-document masks), which the length buckets make unnecessary at this scale.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from rlft import attention, packed_attention
from rlft.training import head, prefix
from rlft.training.logprobs import forward_logprobs, to_device
from rlft.training.update import training_precision

GROUP_KEY_TOKENS = 64  # transcripts whose first tokens agree share a packed row (their common prefix once)


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


def first_trained(mask: Sequence[int]) -> int:
    """The first position t >= 1 with mask 1 (the first token with loss); len(mask) when none."""
    return next((t for t in range(1, len(mask)) if mask[t] > 0), len(mask))


def packed_micro_batches(seqs: Sequence[tuple[Sequence[int], Sequence[int]]], budget: int
                         ) -> list[tuple[list[int], list[prefix.Row]]]:
    """The transcripts with loss as packed rows (``rlft.training.prefix``), grouped by their first
    ``GROUP_KEY_TOKENS`` tokens, in micro-batches within ``budget`` tokens: each micro-batch's
    transcripts (indices into ``seqs``, in row order) and its rows (members index that order)."""
    keep = [i for i, (_, m) in enumerate(seqs) if trained_tokens(m) > 0]
    keys: dict[tuple[int, ...], int] = {}
    groups = [keys.setdefault(tuple(seqs[i][0][:GROUP_KEY_TOKENS]), len(keys)) for i in keep]
    rows = prefix.plan_rows([list(seqs[i][0]) for i in keep], groups, budget)
    out = []
    for mb in prefix.micro_batches(rows, budget):
        order, local = prefix.renumbered(mb)
        out.append(([keep[n] for n in order], local))
    return out


def packed_loss_sum(policy: Any, seqs: Sequence[tuple[Sequence[int], Sequence[int]]], rows: list[prefix.Row]
                    ) -> tuple[torch.Tensor, int]:
    """:func:`masked_loss_sum` of packed rows: ``seqs`` (each with a trained token) in row order,
    ``rows`` their packed layout. Returns the loss sum and the tokens forwarded (B x L). Call
    inside ``training_precision``."""
    ids = [list(i) for i, _ in seqs]
    firsts = [first_trained(m) for _, m in seqs]
    C = max(len(i) - f for i, f in zip(ids, firsts))
    mask_NC = torch.zeros(len(seqs), C)
    for n, ((i, m), f) in enumerate(zip(seqs, firsts)):
        mask_NC[n, C - (len(i) - f):] = torch.tensor(m[f:], dtype=torch.float32)  # right-aligned, as pack lays it
    additive = prefix.additive_mask(policy.base_model.config)
    packed = prefix.pack(rows, ids, firsts, C, _pad_id(policy), additive=additive)
    logp_NC, _ = forward_logprobs(policy.model, to_device(packed, policy.device), 1.0, mask_NC.to(policy.device))
    return -logp_NC.sum(), packed.ids_BL.numel()


def _pad_id(policy: Any) -> int:
    pad = policy.tokenizer.pad_token_id
    return pad if pad is not None else 0


def loss_sums(policy: Any, seqs: Sequence[tuple[Sequence[int], Sequence[int]]], *, micro_batch_tokens: int,
              bf16: bool, shared_prefix: str = "auto", chunk_tokens: int = head.CHUNK_TOKENS
              ) -> Iterator[tuple[torch.Tensor, int]]:
    """Each micro-batch's loss sum over ``seqs`` (differentiable) and the tokens it forwarded:
    packed rows where ``shared_prefix`` allows (``rlft.training.prefix.enabled``), else plain
    right-padded rows. The caller backpropagates each before taking the next."""
    if prefix.enabled(shared_prefix, policy.base_model.config):
        for order, rows in packed_micro_batches(seqs, micro_batch_tokens):
            with training_precision(policy, bf16):
                loss, forwarded = packed_loss_sum(policy, [seqs[i] for i in order], rows)
            yield loss, forwarded  # backward outside the forward's precision context, as before
        return
    for group in micro_batches([len(ids) for ids, _ in seqs], micro_batch_tokens):
        ids, attn, mask = (t.to(policy.device) for t in collate([seqs[i] for i in group], _pad_id(policy)))
        with training_precision(policy, bf16):
            loss = masked_loss_sum(policy, ids, attn, mask, chunk_tokens=chunk_tokens)
        yield loss, ids.numel()


def train_step(policy: Any, seqs: Sequence[tuple[Sequence[int], Sequence[int]]], optimizer: torch.optim.Optimizer, *,
               micro_batch_tokens: int, max_grad_norm: float, bf16: bool, shared_prefix: str = "auto",
               chunk_tokens: int = head.CHUNK_TOKENS) -> dict[str, float]:
    """One optimizer step over ``seqs`` ((ids, mask) pairs); returns ``loss`` (the step's token
    mean), ``grad_norm`` (before clipping), ``tokens`` (non-padding), ``trained_tokens`` and
    ``forward_tokens`` (what the micro-batches forwarded, padding and packing included)."""
    normalizer = sum(trained_tokens(m) for _, m in seqs)
    tokens = sum(len(ids) for ids, _ in seqs)
    optimizer.zero_grad(set_to_none=True)
    if normalizer == 0:  # nothing to learn from: keep the step count honest, change nothing
        optimizer.step()
        return {"loss": float("nan"), "grad_norm": 0.0, "tokens": tokens, "trained_tokens": 0, "forward_tokens": 0}
    model = policy.model
    loss_total, forwarded = 0.0, 0
    model.train()
    try:
        for loss, n in loss_sums(policy, seqs, micro_batch_tokens=micro_batch_tokens, bf16=bf16,
                                 shared_prefix=shared_prefix, chunk_tokens=chunk_tokens):
            loss = loss / normalizer
            loss.backward()
            loss_total += float(loss.detach())
            forwarded += n
    finally:
        model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_total, "grad_norm": float(norm), "tokens": tokens, "trained_tokens": normalizer,
            "forward_tokens": forwarded}


@torch.no_grad()
def eval_loss(policy: Any, seqs: Sequence[tuple[Sequence[int], Sequence[int]]], *, micro_batch_tokens: int,
              bf16: bool, shared_prefix: str = "auto", chunk_tokens: int = head.CHUNK_TOKENS) -> float:
    """Token-mean cross-entropy over the trained tokens of ``seqs`` (NaN when there are none)."""
    normalizer = sum(trained_tokens(m) for _, m in seqs)
    if not normalizer:
        return float("nan")
    total = sum(float(loss) for loss, _ in loss_sums(policy, seqs, micro_batch_tokens=micro_batch_tokens, bf16=bf16,
                                                      shared_prefix=shared_prefix, chunk_tokens=chunk_tokens))
    return total / normalizer


__all__ = ["GROUP_KEY_TOKENS", "collate", "eval_loss", "first_trained", "loss_sums", "masked_loss_sum", "micro_batches",
           "packed_loss_sum", "packed_micro_batches", "train_step", "trained_tokens"]

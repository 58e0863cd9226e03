"""Token sampling for the in-process engine: per-row temperature, top-p, top-k, inverse CDF.

``sample_tokens`` draws one token per row of a logits batch and returns its logprob under
``log_softmax(logits / T)`` on the full vocabulary, before truncation (the convention the
trainer reproduces; see ``rlft.engines.hf``). The inverse CDF (``cumsum`` + ``searchsorted``,
in two levels over large vocabularies) replaces ``torch.multinomial``, which costs ~50 ms per
call at a 49k vocabulary on a small CPU. bf16 logits on the CPU without truncation go to the C kernel
of :mod:`rlft.kernels.sampling` where it built here: the same draws but for uniforms within ~1e-7 of
a token boundary (the float32 sums' order), ~4x faster.
``top_logprobs`` gives the k most likely tokens of each row in that same distribution (what
``rlft serve`` returns as OpenAI's ``top_logprobs``).
Left out: beam search, repetition penalties, logit processors.
"""

from __future__ import annotations

import torch

from rlft.kernels import plain_sampler

__all__ = ["sample_tokens", "top_logprobs"]


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    uniform: torch.Tensor,
    *,
    topk_cap: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row; return ``(tokens [B], logprobs [B])``.

    ``logits`` [B, V] (any float dtype; computed in float32). Per-row ``temperature`` (<= 0 =
    greedy), ``top_p`` (>= 1 = off), ``top_k`` (<= 0 = off) and ``uniform`` (in [0, 1): the
    random draw used by the inverse CDF). The logprob is ``log_softmax(logits / T)`` at the
    token, before truncation (``T = 1`` for greedy rows). Nucleus sampling first tries the
    ``topk_cap`` most likely tokens and falls back to a full sort only when they do not hold
    ``top_p`` of the mass, so the common case avoids sorting the vocabulary.
    """
    bsz, vocab = logits.shape
    greedy = temperature <= 0
    temp = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    k_row = torch.where((top_k > 0) & (top_k < vocab), top_k, torch.full_like(top_k, vocab))
    truncate = ~greedy & ((k_row < vocab) | (top_p < 1.0))
    plain = ~greedy & ~truncate
    if bool(plain.all()):  # the common case (RL sampling at T, no truncation): no log_softmax
        if logits.dtype == torch.bfloat16 and logits.device.type == "cpu" and logits.stride(1) == 1:
            kernel = plain_sampler()  # one C pass per row (rlft.kernels.sampling), where it built here
            if kernel is not None:
                return kernel(logits, temp, uniform)
        # z = logits.float() / T, zmax and z - zmax in as few passes over (B, V) as give the same
        # bits: the max of bf16 values is exact in float32, and a bf16 tensor minus (or divided by)
        # a float32 one is computed in float32 (type promotion), like the cast copy it replaces
        if bool((temp == 1).all()):
            zmax = logits.amax(dim=-1, keepdim=True).float()
            weights = torch.sub(logits, zmax)
        else:
            weights = torch.div(logits, temp[:, None])  # float32: z
            zmax = weights.amax(dim=-1, keepdim=True)
            weights.sub_(zmax)
        weights.exp_()  # unnormalised probabilities
        inverse_cdf = _two_level_inverse_cdf if vocab >= 4 * _BLOCK else _inverse_cdf
        tokens, total = inverse_cdf(weights, uniform)  # total: the partition sum
        z_tok = torch.div(logits.gather(1, tokens[:, None]).squeeze(1), temp)  # float32, as z at the token
        return tokens, z_tok - zmax.squeeze(1) - total.log()

    logits = logits.float()
    logp = torch.log_softmax(logits / temp[:, None], dim=-1)

    if bool(greedy.all()):
        tokens = logits.argmax(dim=-1)
        return tokens, logp.gather(1, tokens[:, None]).squeeze(1)

    tokens = torch.empty(bsz, dtype=torch.long, device=logits.device)
    if bool(greedy.any()):
        tokens[greedy] = logits[greedy].argmax(dim=-1)
    if bool(plain.any()):
        tokens[plain] = _inverse_cdf(logp[plain].exp(), uniform[plain])[0]
    if bool(truncate.any()):
        tokens[truncate] = _truncated(logp[truncate].exp(), top_p[truncate], k_row[truncate], uniform[truncate],
                                      topk_cap)
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)


def top_logprobs(logits: torch.Tensor, temperature: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logprobs [B, k], token ids [B, k])``: the ``k`` most likely tokens of each row, most likely
    first, under ``log_softmax(logits / T)`` with ``T = 1`` for greedy rows: the distribution whose
    value at the sampled token :func:`sample_tokens` returns, so the two agree."""
    temp = torch.where(temperature <= 0, torch.ones_like(temperature), temperature).float()
    logp_BV = torch.log_softmax(logits.float() / temp[:, None], dim=-1)
    return torch.topk(logp_BV, min(k, logp_BV.shape[-1]), dim=-1)


_BLOCK = 256  # vocabulary entries per block of the two-level inverse CDF


def _two_level_inverse_cdf(weights: torch.Tensor, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse CDF in two levels: pick a block of ``_BLOCK`` entries from the block sums, then an
    entry inside it. A cumulative sum is a sequential scan; over a 49k vocabulary it cost more than
    the exp before it, while block sums are a parallel reduction and the scans left are 192 and
    256 long (64 rows: 2.8 -> 1.5 ms per step). Returns (tokens [B], partition sums [B]); never
    draws a zero-weight entry."""
    B, V = weights.shape
    nb = -(-V // _BLOCK)
    if V % _BLOCK:
        weights = torch.nn.functional.pad(weights, (0, nb * _BLOCK - V))  # zero weight: never drawn
    blocks = weights.view(B, nb, _BLOCK)
    block_sum = blocks.sum(-1)  # (B, nb)
    block_cdf = block_sum.cumsum(-1)
    total = block_cdf[:, -1]
    target = uniform.to(total.dtype) * total  # (B,)
    blk = torch.searchsorted(block_cdf, target[:, None], right=True).squeeze(1).clamp_(max=nb - 1)
    inner_cdf = blocks.gather(1, blk[:, None, None].expand(B, 1, _BLOCK)).squeeze(1).cumsum(-1)  # (B, _BLOCK)
    before = (block_cdf.gather(1, blk[:, None]) - block_sum.gather(1, blk[:, None])).squeeze(1)
    # rounding can put the residual at or past the block's own sum: stay strictly below it, so the
    # entry found has cdf[j] > r >= cdf[j-1], i.e. a positive weight
    rest = torch.minimum((target - before).clamp_(min=0), torch.nextafter(inner_cdf[:, -1], inner_cdf.new_zeros(())))
    j = torch.searchsorted(inner_cdf, rest[:, None], right=True).squeeze(1)
    return blk * _BLOCK + j, total


def _inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index i with cdf[i-1] <= u * total < cdf[i] (never a zero-probability entry), and the
    total (``probs`` may be unnormalised)."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1]
    idx = torch.searchsorted(cdf, (uniform.to(cdf.dtype) * total)[:, None], right=True).squeeze(1)
    return idx.clamp_(max=probs.shape[-1] - 1), total


def _truncated(probs: torch.Tensor, top_p: torch.Tensor, k_row: torch.Tensor, uniform: torch.Tensor,
               topk_cap: int) -> torch.Tensor:
    vocab = probs.shape[-1]
    k = int(k_row.max())
    needs_p = top_p < 1.0
    if bool(needs_p.any()):
        k_try = min(k, topk_cap)
        vals, idx = torch.topk(probs, k_try, dim=-1)
        # rows whose nucleus may extend past the first k_try tokens need the full sort
        short = needs_p & (k_row > k_try) & (vals.sum(-1) < top_p)
        if k_try < k and bool(short.any()):
            vals, idx = torch.sort(probs, dim=-1, descending=True)
            vals, idx = vals[:, :k], idx[:, :k]
    elif k < vocab:
        vals, idx = torch.topk(probs, k, dim=-1)
    else:  # pragma: no cover - callers only pass rows that truncate
        vals, idx = torch.sort(probs, dim=-1, descending=True)
    width = vals.shape[-1]
    keep = torch.arange(width, device=probs.device)[None, :] < k_row[:, None]
    cum = vals.cumsum(dim=-1)
    keep &= (cum - vals) < top_p[:, None].to(vals.dtype)  # smallest prefix whose mass reaches top_p
    keep[:, 0] = True
    j = _inverse_cdf(vals * keep, uniform)[0]
    return idx.gather(1, j[:, None]).squeeze(1)

"""The math of the GRPO family: advantages, clipped policy losses, KL, token logprobs. Pure
tensor functions: no I/O, no model, no module state. Axes: _P prompts, _G group, _B flat batch
of sequences, _T tokens, _V vocabulary.

Each algorithm is a choice of arguments here:
- GRPO (DeepSeekMath): A = (r - mean) / (std + eps), token-level PPO clip, per-sequence mean of
  token losses, k3 KL to a reference. `std_normalize=True, loss_agg="seq_mean_token_mean", beta=0.04`.
- Dr.GRPO: no std division, no per-sequence length division (both bias the gradient): A = r - mean,
  loss = sum / (B * max_tokens). `std_normalize=False, loss_agg="seq_mean_token_sum_norm", max_tokens=L`.
- DAPO: clip-higher, token-level mean over the batch, dynamic sampling, overlong shaping.
  `eps_high=0.28, loss_agg="token_mean"` + `keep_groups`, `overlong_penalty`/`overlong_filter_mask`.
- GSPO: one ratio per sequence, s = exp(mean_t(logp - old_logp)), clipped per sequence.
  `ratio_level="sequence", eps_low=3e-4, eps_high=4e-4, loss_agg="seq_mean_token_mean"`.
- RLOO: baseline = mean of the other G-1 rewards, i.e. G/(G-1) * (r - mean): unbiased for small G.
  `baseline="rloo", std_normalize=False`.
- LUFFY (off-policy guidance): a group may hold a demonstration that the policy did not sample
  (``rlft.training.guidance``). Its tokens have no behaviour logprobs, so their importance ratio is
  taken as pi_theta itself (behaviour probability 1), shaped as f(p) = p / (p + gamma) and not
  clipped: `off_policy_B` marks those rows, `shaping_gamma=0.1` (`shaped_objective`).

Recommended for small models on small data (the arguments train.py should pass):
- `baseline="mean", std_normalize=False`: std division up-weights prompts that are almost always
  right or wrong (tiny std), the difficulty bias Dr.GRPO found; zero-variance groups give 0.
- `loss_agg="token_mean"`: every sampled token weighs the same, so a long wrong answer is not
  diluted by its own length (GRPO's per-sequence mean) and no max_tokens constant is needed.
- `eps_low=0.2, eps_high=0.28`: clip-higher lets rare good tokens grow; slows entropy collapse.
- `beta=0.0`: no reference model (one forward pass and one model copy fewer); the clip bounds
  each step and verifiable rewards leave little to regularize towards.
- `ratio_level="token"`: GSPO's gain is stability of large MoE models; not needed here.
- `tis_weights(cap=2.0)` when the sampler is another engine (vLLM): its logprobs drift from
  the trainer's. Drop zero-variance groups (`keep_groups`): they carry no gradient and only
  inflate token_mean's denominator.

Logprobs must match between sampler and trainer: divide logits by the sampling temperature
(`token_logprobs(..., temperature)`) and let the engine report logprobs of that same full
distribution (before top-k/top-p truncation), or the ratio is biased even on-policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

LossAgg = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]


@dataclass(frozen=True)
class LossConfig:
    """The arguments of `policy_loss` (and `token_logprobs`' temperature) that a run fixes,
    resolved: no "auto", no sentinels (``TrainConfig`` presets resolve into this)."""

    loss_agg: LossAgg = "token_mean"
    ratio_level: Literal["token", "sequence"] = "token"
    eps_low: float = 0.2
    eps_high: float = 0.28
    beta: float = 0.0  # KL to the reference; 0 = no reference forward at all
    kl_estimator: Literal["k1", "k3"] = "k3"
    tis_cap: float = 0.0  # truncated importance sampling vs the sampler's logprobs; 0 = off
    temperature: float = 1.0  # the sampling temperature: logits are divided by it
    max_tokens: int = 2048  # Dr.GRPO's constant (seq_mean_token_sum_norm): the context limit
    shaping_gamma: float = 0.1  # LUFFY's policy shaping of demonstration tokens: p / (p + gamma)
_MAX_LOG_RATIO = 20.0  # exp(20) ~ 5e8: beyond this a token is garbage, not a policy update
_CHUNK_ELEMS = 1 << 25  # float32 elements per (chunk, V) slice in token_logprobs / entropy


# ---- advantages ------------------------------------------------------------------------------


def zero_variance_mask(rewards_PG: Tensor) -> Tensor:
    """(P,) bool: True where all G rewards of a prompt are equal (no learning signal)."""
    rewards_PG = rewards_PG.reshape(-1, rewards_PG.shape[-1])
    return (rewards_PG == rewards_PG[:, :1]).all(dim=-1)  # (P,)


def keep_groups(rewards_PG: Tensor) -> Tensor:
    """DAPO dynamic sampling: (K,) long indices of the prompts whose rewards vary."""
    return torch.nonzero(~zero_variance_mask(rewards_PG)).squeeze(-1)  # (K,)


def group_advantages(
    rewards_PG: Tensor,
    *,
    baseline: Literal["mean", "rloo"] = "mean",
    std_normalize: bool,
    eps: float = 1e-6,
) -> Tensor:
    """Group-relative advantages, same shape as the input: (G,) for one group or (P, G).

    mean: A = r - mean(r) (Dr.GRPO); with std_normalize A /= std(r) + eps (GRPO; sample std,
    Bessel-corrected, as TRL and verl compute it). rloo: A_i = r_i - mean_{j != i} r_j, which
    equals G/(G-1) * (r_i - mean(r)): the same direction, a constant scale. A zero-variance
    group gets exactly 0, never eps-sized noise.
    """
    r_PG = rewards_PG.reshape(-1, rewards_PG.shape[-1]).float()
    G = r_PG.shape[-1]
    if G < 2:  # a lone sample has no group to compare with
        return torch.zeros_like(rewards_PG, dtype=torch.float32)
    mean_P1 = r_PG.mean(dim=-1, keepdim=True)
    if baseline == "mean":
        adv_PG = r_PG - mean_P1
    elif baseline == "rloo":
        adv_PG = r_PG - (r_PG.sum(dim=-1, keepdim=True) - r_PG) / (G - 1)
    else:
        raise ValueError(f"baseline must be 'mean' or 'rloo', got {baseline!r}")
    if std_normalize:
        adv_PG = adv_PG / (r_PG.std(dim=-1, keepdim=True) + eps)
    adv_PG = torch.where(zero_variance_mask(r_PG)[:, None], 0.0, adv_PG)
    return adv_PG.reshape(rewards_PG.shape)


# ---- DAPO extras -----------------------------------------------------------------------------


def overlong_penalty(lengths_B: Tensor, max_len: int, cache_len: int) -> Tensor:
    """DAPO soft overlong punishment, added to the reward: 0 up to max_len - cache_len, then
    linear down to -1 at max_len, -1 beyond. (B,) float."""
    lengths_B = torch.as_tensor(lengths_B, dtype=torch.float32)
    start = max_len - cache_len
    if cache_len <= 0:
        return torch.where(lengths_B > max_len, -1.0, 0.0)
    return ((start - lengths_B) / cache_len).clamp(min=-1.0, max=0.0)  # (B,)


def overlong_filter_mask(truncated_B: Tensor) -> Tensor:
    """DAPO overlong filtering: (B,) bool, False for truncated sequences. Use it as
    `mask_BT = mask_BT * keep_B[:, None]` so they leave the loss (and its denominator)."""
    return ~torch.as_tensor(truncated_B, dtype=torch.bool)


def tis_weights(old_logp_BT: Tensor, sampler_logp_BT: Tensor, cap: float = 2.0) -> Tensor:
    """Truncated importance sampling: min(exp(old_logp - sampler_logp), cap), no gradient.
    old_logp: the trainer's logprobs at rollout time; sampler_logp: what the engine reported.
    Corrects the trainer/sampler mismatch (another engine, kernels, precision). (B, T)"""
    return torch.exp(old_logp_BT.detach() - sampler_logp_BT.detach()).clamp(max=cap)


def shaped_objective(logp_BT: Tensor, gamma: float) -> Tensor:
    """LUFFY's policy shaping of a demonstration token: f(p) = p / (p + gamma) with p = exp(logp).
    Its gradient, gamma / (p + gamma)^2 * dp = gamma * p / (p + gamma)^2 * dlogp, is largest for
    tokens of middling probability and vanishes for near-certain ones, so low-probability tokens of
    the demonstration are learned instead of the gradient going to those the policy already takes
    (plain importance sampling with behaviour probability 1 would weigh each token by p). (B, T)"""
    if gamma <= 0:
        raise ValueError(f"shaping gamma must be > 0, got {gamma}")
    p_BT = torch.exp(logp_BT.clamp(max=0.0))
    return p_BT / (p_BT + gamma)


# ---- KL and losses ---------------------------------------------------------------------------


def kl_penalty(
    logp_BT: Tensor, ref_logp_BT: Tensor, mask_BT: Tensor | None = None, estimator: str = "k3"
) -> Tensor:
    """Per-token estimate of KL(policy || ref) from sampled tokens, 0 outside mask. (B, T)
    k1 = logp - ref_logp (unbiased, can be negative); k3 = exp(d) - d - 1 with d = ref_logp - logp
    (unbiased, always >= 0, low variance; GRPO's choice)."""
    d_BT = (ref_logp_BT - logp_BT).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    if estimator == "k3":
        kl_BT = torch.exp(d_BT) - d_BT - 1.0
    elif estimator == "k1":
        kl_BT = -d_BT
    else:
        raise ValueError(f"estimator must be 'k1' or 'k3', got {estimator!r}")
    return kl_BT if mask_BT is None else torch.where(mask_BT.bool(), kl_BT, 0.0)


def loss_normalizer(mask_BT: Tensor, loss_agg: LossAgg, max_tokens: int | None = None) -> Tensor:
    """The denominator `policy_loss` divides by: masked tokens (token_mean), sequences with at
    least one masked token (seq_mean_token_mean), or those sequences * max_tokens (Dr.GRPO).
    Counts add up: for gradient accumulation, sum this over all micro-batches of the step and
    pass the total as `normalizer` to each, then add (not average) the micro-batch losses.
    Under DDP also all-reduce the total over ranks and scale the loss by world size."""
    m_BT = mask_BT.bool()
    if loss_agg == "token_mean":
        return m_BT.sum().float()
    n_seq = m_BT.any(dim=-1).sum().float()
    if loss_agg == "seq_mean_token_mean":
        return n_seq
    if loss_agg == "seq_mean_token_sum_norm":
        if max_tokens is None:
            raise ValueError("loss_agg='seq_mean_token_sum_norm' needs max_tokens (the generation limit)")
        return n_seq * max_tokens
    raise ValueError(f"unknown loss_agg {loss_agg!r}")


def policy_loss(
    logp_BT: Tensor,
    old_logp_BT: Tensor,
    advantages_B: Tensor,
    mask_BT: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    ratio_level: Literal["token", "sequence"] = "token",
    loss_agg: LossAgg = "token_mean",
    max_tokens: int | None = None,
    normalizer: Tensor | float | None = None,
    ref_logp_BT: Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    is_weights_BT: Tensor | None = None,
    off_policy_B: Tensor | None = None,
    shaping_gamma: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped policy-gradient loss over a flat micro-batch of B sequences.

    per token: -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) [* is_weights]
               + beta * KL(policy || ref)
    ratio_level "token": ratio = exp(logp - old_logp) per token (PPO/GRPO/DAPO); "sequence":
    one ratio per sequence, exp(mean of its masked log-ratios), broadcast to its tokens (GSPO).
    Aggregation (see `loss_normalizer` for the denominators):
      token_mean               sum over masked tokens / number of masked tokens (DAPO)
      seq_mean_token_mean      sum over sequences of (token mean) / number of sequences (GRPO)
      seq_mean_token_sum_norm  sum over masked tokens / (sequences * max_tokens) (Dr.GRPO)
    `advantages_B` is (B,) (or (B, T) per token); mask_BT is 1/True on sampled tokens only.
    `off_policy_B` (B,) bool: rows that are demonstrations, not samples (LUFFY): their per-token
    term is -shaped_objective(logp, shaping_gamma) * A, no ratio to old_logp, no clip, no
    is_weights; they count in the normalizer like any row.
    Returns (loss, stats); stats are detached 0-dim tensors (no device sync): pg_loss, kl,
    clip_ratio (share of masked tokens whose gradient the clip removed) = clip_ratio_low
    (A < 0, ratio < 1 - eps_low) + clip_ratio_high (A > 0, ratio > 1 + eps_high), ratio_mean,
    ratio_max (the ratio statistics over sampled rows only).
    """
    m_BT = mask_BT.bool()
    adv_BT = advantages_B[:, None] if advantages_B.dim() == 1 else advantages_B
    adv_BT = adv_BT.detach().to(logp_BT.dtype)
    log_ratio_BT = torch.where(m_BT, logp_BT - old_logp_BT.detach(), 0.0)  # pads may hold garbage
    if ratio_level == "sequence":
        n_B1 = m_BT.sum(dim=-1, keepdim=True).clamp(min=1)
        log_ratio_BT = (log_ratio_BT.sum(dim=-1, keepdim=True) / n_B1).expand_as(log_ratio_BT)
    elif ratio_level != "token":
        raise ValueError(f"ratio_level must be 'token' or 'sequence', got {ratio_level!r}")
    ratio_BT = torch.exp(log_ratio_BT.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    clipped_BT = ratio_BT.clamp(1.0 - eps_low, 1.0 + eps_high)
    pg_BT = -torch.minimum(ratio_BT * adv_BT, clipped_BT * adv_BT)  # (B, T)
    if is_weights_BT is not None:
        pg_BT = pg_BT * is_weights_BT.detach()
    if off_policy_B is not None:  # demonstrations: shaped, unclipped, no ratio to a behaviour policy
        off_B1 = off_policy_B.bool()[:, None]
        pg_BT = torch.where(off_B1, -shaped_objective(logp_BT, shaping_gamma) * adv_BT, pg_BT)
        m_ratio_BT = m_BT & ~off_B1
    else:
        m_ratio_BT = m_BT
    kl_BT = None
    if ref_logp_BT is not None:
        kl_BT = kl_penalty(logp_BT, ref_logp_BT.detach(), m_BT, kl_estimator)
    elif beta != 0.0:
        raise ValueError("beta > 0 needs ref_logp_BT")

    denom = loss_normalizer(m_BT, loss_agg, max_tokens) if normalizer is None else normalizer
    denom = denom.clamp(min=1.0) if isinstance(denom, Tensor) else max(float(denom), 1.0)

    def aggregate(x_BT: Tensor) -> Tensor:
        x_BT = torch.where(m_BT, x_BT, 0.0)
        if loss_agg == "seq_mean_token_mean":
            x_BT = x_BT / m_BT.sum(dim=-1, keepdim=True).clamp(min=1)
        return x_BT.sum() / denom

    pg_loss = aggregate(pg_BT)
    loss = pg_loss + beta * aggregate(kl_BT) if (kl_BT is not None and beta != 0.0) else pg_loss

    with torch.no_grad():
        n_tok = m_BT.sum().clamp(min=1)
        n_ratio = m_ratio_BT.sum().clamp(min=1)
        clip_low = ((ratio_BT < 1.0 - eps_low) & (adv_BT < 0) & m_ratio_BT).sum() / n_ratio
        clip_high = ((ratio_BT > 1.0 + eps_high) & (adv_BT > 0) & m_ratio_BT).sum() / n_ratio
        stats = {
            "pg_loss": pg_loss.detach(),
            "kl": (kl_BT.sum() / n_tok).detach() if kl_BT is not None else logp_BT.new_zeros(()),
            "clip_ratio": clip_low + clip_high,
            "clip_ratio_low": clip_low,
            "clip_ratio_high": clip_high,
            "ratio_mean": torch.where(m_ratio_BT, ratio_BT, 0.0).sum() / n_ratio,
            "ratio_max": torch.where(m_ratio_BT, ratio_BT, 0.0).max(),
        }
    return loss, stats


# ---- logprobs and entropy from logits --------------------------------------------------------


def _chunks(B: int, T: int, V: int):
    """(b, slice over T) pieces of at most _CHUNK_ELEMS logits each."""
    step = max(1, _CHUNK_ELEMS // max(V, 1))
    for b in range(B):
        for t0 in range(0, T, step):
            yield b, slice(t0, min(t0 + step, T))


class _TokenLogprobs(torch.autograd.Function):
    """log_softmax(logits / temperature) gathered at tokens, one (chunk, V) float32 slice at a
    time. Saves only the input logits (no copy) and the (B, T) logsumexp; backward recomputes
    softmax per chunk: d logp / d z = (onehot - softmax) / temperature."""

    @staticmethod
    def forward(ctx, logits_BTV: Tensor, tokens_BT: Tensor, temperature: float) -> Tensor:
        B, T, V = logits_BTV.shape
        dtype = torch.promote_types(logits_BTV.dtype, torch.float32)  # bf16 -> f32, f64 stays
        logp_BT = torch.empty((B, T), dtype=dtype, device=logits_BTV.device)
        lse_BT = torch.empty_like(logp_BT)
        for b, ts in _chunks(B, T, V):
            z_CV = logits_BTV[b, ts].to(dtype) / temperature  # (C, V), the only wide copy
            lse_BT[b, ts] = torch.logsumexp(z_CV, dim=-1)
            logp_BT[b, ts] = z_CV.gather(-1, tokens_BT[b, ts, None]).squeeze(-1) - lse_BT[b, ts]
        ctx.save_for_backward(logits_BTV, tokens_BT, lse_BT)
        ctx.temperature = temperature
        return logp_BT

    @staticmethod
    def backward(ctx, grad_BT: Tensor):
        logits_BTV, tokens_BT, lse_BT = ctx.saved_tensors
        B, T, V = logits_BTV.shape
        grad_BTV = torch.empty_like(logits_BTV)
        for b, ts in _chunks(B, T, V):
            z_CV = logits_BTV[b, ts].to(lse_BT.dtype) / ctx.temperature
            g_C1 = grad_BT[b, ts, None].to(lse_BT.dtype)
            d_CV = torch.exp(z_CV - lse_BT[b, ts, None]).mul_(-g_C1)  # -softmax * g
            d_CV.scatter_add_(-1, tokens_BT[b, ts, None], g_C1)  # + onehot * g
            grad_BTV[b, ts] = d_CV / ctx.temperature
        return grad_BTV, None, None


def token_logprobs(logits_BTV: Tensor, tokens_BT: Tensor, temperature: float = 1.0) -> Tensor:
    """log p(token) under softmax(logits / temperature), float32 (float64 if given). (B, T)

    logits_BTV[:, t] must be the distribution that produced tokens_BT[:, t] (already shifted by
    one) and tokens must be valid ids everywhere (put 0 on padding; the mask drops it). Divide
    by the *sampling* temperature, as this does, or trainer and sampler logprobs disagree and
    the on-policy ratio is not 1. Memory: no (B, T, V) float32 copy of bf16 logits in forward
    or backward, only chunks of about 32M elements; the gradient comes back in the logits' dtype.
    """
    if temperature <= 0:
        raise ValueError("temperature must be > 0 (greedy decoding has no logprobs to train on)")
    return _TokenLogprobs.apply(logits_BTV, tokens_BT, float(temperature))


@torch.no_grad()
def entropy_from_logits(logits_BTV: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of softmax(logits / temperature) per position, float32, no gradient (it is
    the `policy/entropy` metric). Chunked like token_logprobs. (B, T)"""
    B, T, V = logits_BTV.shape
    dtype = torch.promote_types(logits_BTV.dtype, torch.float32)
    ent_BT = torch.empty((B, T), dtype=dtype, device=logits_BTV.device)
    for b, ts in _chunks(B, T, V):
        z_CV = logits_BTV[b, ts].to(dtype) / temperature
        lse_C = torch.logsumexp(z_CV, dim=-1)
        p_CV = torch.exp(z_CV - lse_C[:, None])
        pz_CV = torch.where(p_CV > 0, p_CV * z_CV, 0.0)  # 0 * -inf (a banned token) is 0 here
        ent_BT[b, ts] = lse_C - pz_CV.sum(dim=-1)  # H = lse - E_p[z]
    return ent_BT

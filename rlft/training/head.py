"""The output head at sampled positions only: logprobs and entropies in chunks, without a vocabulary-wide batch tensor.

The update needs log p(token) at the tokens the sampler chose (mask 1), and their entropies as
a metric. Instead of the model's logits over a whole completion window (B, C, V), the decoder's
final (normed) hidden states are gathered at the positions that predict a sampled token, and the
output head, the float32 log-softmax and the gather run over them ``chunk_tokens`` rows at a
time. In the backward each chunk is recomputed (``torch.utils.checkpoint``), so at most one
chunk's (chunk, V) logits exist, in forward or backward, whatever the micro-batch size: the
cost is one more head matmul over the sampled positions (~1/3 of the head's work, measured in
benchmarks/README.md) against two (B, C, V) tensors (the logits and their gradient) and the
float32 passes over them. The head runs as the model's own module (tied embeddings, a trained
head in a full finetune and its gradients included); final logit soft-capping is applied as the
model's forward applies it. bf16 logits on the CPU take ``rlft.kernels.token_logprobs`` for the
log-softmax, the gather, the entropy and their backward (two passes over each bf16 row forward,
one backward, where torch makes five float32 passes); elsewhere, or soft-capped, torch's ops run.
Left out: models whose forward scales the logits otherwise (see :func:`supported`); the update
keeps the full-window path for them.
"""

from __future__ import annotations

from typing import Any

import torch

from rlft.kernels.token_logprobs import token_logprobs_kernel

CHUNK_TOKENS = 256  # sampled positions per head chunk: 256 x V float32 (48 MiB for a 49k vocabulary)
# config attributes of logit transforms this module does not reproduce (Cohere, Granite)
_UNSUPPORTED_SCALES = ("logit_scale", "logits_scaling")


def supported(config: Any) -> bool:
    """Whether the model's logits are ``head(h)`` (soft-capped when its config says so), which this module computes."""
    return not any(getattr(config, k, None) not in (None, 1, 1.0) for k in _UNSUPPORTED_SCALES)


def _log_softmax(z_CV: torch.Tensor, temperature: float, softcap: float | None) -> torch.Tensor:
    z_CV = z_CV.float()
    if softcap:  # Gemma-2 style final soft-capping, as the model's own forward applies it
        z_CV = torch.tanh(z_CV / softcap) * softcap
    if temperature != 1.0:  # skipped at 1.0: z / 1.0 is z, and it is a full pass over (C, V)
        z_CV = z_CV.div_(temperature)  # in place: the cast's output, which no backward needs
    return torch.log_softmax(z_CV, dim=-1)


@torch.no_grad()
def _entropy_C(logp_CV: torch.Tensor) -> torch.Tensor:
    # log-softmax of finite logits is finite (an underflowed p is 0, and 0 * finite is 0): no
    # masking of 0 * -inf needed, which made this pass 2x slower (measured, benchmarks/README.md)
    return -(logp_CV.exp() * logp_CV).sum(-1)


class _TokenLogprobs(torch.autograd.Function):
    """log p(t_C) per row of bf16 logits z_CV at a temperature, and (no gradient) the entropies,
    by ``rlft.kernels.token_logprobs``: two passes over each bf16 row forward, one backward,
    instead of torch's float32 cast, log-softmax, gather and their backward passes."""

    @staticmethod
    def forward(ctx, z_CV, t_C, temperature: float, kernel, entropy: bool):
        logp_C, lse_C, ent_C = kernel.forward(z_CV, t_C, temperature, entropy)
        ctx.save_for_backward(z_CV, t_C, lse_C)
        ctx.temperature, ctx.kernel = temperature, kernel
        ent_C = ent_C if ent_C is not None else logp_C.new_zeros(0)
        ctx.mark_non_differentiable(ent_C)
        return logp_C, ent_C

    @staticmethod
    def backward(ctx, grad_C, _grad_ent):
        z_CV, t_C, lse_C = ctx.saved_tensors
        return ctx.kernel.backward(z_CV, t_C, lse_C, grad_C, ctx.temperature), None, None, None, None


def _chunk(head: Any, h_CH: torch.Tensor, t_C: torch.Tensor, temperature: float, softcap: float | None,
           ent_out: list[torch.Tensor] | None) -> torch.Tensor:
    first = ent_out is not None and not ent_out  # checkpoint's recompute calls this again: entropy once
    z_CV = head(h_CH)
    kernel = None if softcap else token_logprobs_kernel()
    if kernel is not None and kernel.handles(z_CV):  # bf16 logits on the CPU
        logp_C, ent_C = _TokenLogprobs.apply(z_CV, t_C, temperature, kernel, first)
        if first:
            ent_out.append(ent_C)
        return logp_C
    logp_CV = _log_softmax(z_CV, temperature, softcap)
    if first:
        ent_out.append(_entropy_C(logp_CV.detach()))
    return logp_CV.gather(-1, t_C[:, None]).squeeze(-1)


def sampled_logprobs(head: Any, h_NH: torch.Tensor, targets_N: torch.Tensor, temperature: float, *,
                     entropy: bool = False, softcap: float | None = None, chunk_tokens: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(targets_N[n]) under softmax(head(h_NH[n]) / temperature), float32 (N,), differentiable
    in ``h_NH`` and the head's parameters; with ``entropy`` also the entropies there (N,), no
    gradient. ``h_NH`` are the final hidden states at the positions predicting the targets;
    ``chunk_tokens``: rows per chunk (default ``CHUNK_TOKENS``)."""
    chunk_tokens = chunk_tokens or CHUNK_TOKENS
    if temperature <= 0:
        raise ValueError("temperature must be > 0 (greedy decoding has no logprobs to train on)")
    starts = range(0, h_NH.shape[0], chunk_tokens)
    recompute = len(starts) > 1 and torch.is_grad_enabled()  # one chunk: nothing to save by recomputing
    logp, ent = [], []
    for s in starts:
        h_CH, t_C = h_NH[s:s + chunk_tokens], targets_N[s:s + chunk_tokens]
        ent_out: list[torch.Tensor] | None = [] if entropy else None
        if recompute:
            logp.append(torch.utils.checkpoint.checkpoint(_chunk, head, h_CH, t_C, float(temperature), softcap,
                                                          ent_out, use_reentrant=False))
        else:
            logp.append(_chunk(head, h_CH, t_C, float(temperature), softcap, ent_out))
        if ent_out:
            ent.append(ent_out[0])
    return torch.cat(logp), (torch.cat(ent) if entropy else None)


__all__ = ["CHUNK_TOKENS", "sampled_logprobs", "supported"]

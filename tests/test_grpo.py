"""rlft.training.grpo against values worked out by hand in the comments beside each check."""

import math

import pytest
import torch

from rlft.training import grpo
from rlft.training.grpo import (
    entropy_from_logits,
    group_advantages,
    keep_groups,
    kl_penalty,
    loss_normalizer,
    overlong_filter_mask,
    overlong_penalty,
    policy_loss,
    tis_weights,
    token_logprobs,
    zero_variance_mask,
)

L = math.log
close = torch.testing.assert_close


def t(x, **kw):
    return torch.tensor(x, dtype=kw.pop("dtype", torch.float32), **kw)


# ---- advantages ------------------------------------------------------------------------------


def test_grpo_advantages_are_centered_and_divided_by_sample_std():
    # mean 0.5; sample std sqrt(4 * 0.25 / 3) = sqrt(1/3); 0.5 / sqrt(1/3) = sqrt(3)/2
    a = group_advantages(t([1, 0, 0, 1]), std_normalize=True, eps=0.0)
    h = math.sqrt(3) / 2
    close(a, t([h, -h, -h, h]))


def test_dr_grpo_advantages_are_only_centered():
    close(group_advantages(t([1, 0, 0, 1]), std_normalize=False), t([0.5, -0.5, -0.5, 0.5]))
    close(group_advantages(t([[3, 1], [0, 2]]), std_normalize=False), t([[1, -1], [-1, 1]]))


def test_rloo_baseline_is_mean_of_the_others_and_G_over_G_minus_1_times_centered():
    # r = [1, 0, 0, 0]: A_0 = 1 - 0 = 1; A_1 = 0 - (1 + 0 + 0)/3 = -1/3
    a = group_advantages(t([[1, 0, 0, 0]]), baseline="rloo", std_normalize=False)
    close(a, t([[1, -1 / 3, -1 / 3, -1 / 3]]))
    centered = group_advantages(t([[1, 0, 0, 0]]), std_normalize=False)
    close(a, centered * 4 / 3)


def test_zero_variance_group_has_zero_advantage():
    r = t([[1, 1, 1], [0.3, 0.3, 0.3], [0, 1, 0]])
    for baseline in ("mean", "rloo"):
        for std_normalize in (False, True):
            a = group_advantages(r, baseline=baseline, std_normalize=std_normalize)
            assert torch.equal(a[:2], torch.zeros(2, 3))  # exactly 0, not float noise / eps
            assert (a[2] != 0).all()
    assert zero_variance_mask(r).tolist() == [True, True, False]
    assert keep_groups(r).tolist() == [2]


def test_single_sample_group_has_zero_advantage():
    assert torch.equal(group_advantages(t([[5.0], [1.0]]), std_normalize=True), torch.zeros(2, 1))


def test_unknown_baseline_is_rejected():
    with pytest.raises(ValueError, match="baseline"):
        group_advantages(t([1, 0]), baseline="median", std_normalize=False)


# ---- policy loss -----------------------------------------------------------------------------


def _logp(ratios, requires_grad=True):
    """logp with old_logp = 0, so that exp(logp - old_logp) = the given ratios."""
    return torch.log(t(ratios)).requires_grad_(requires_grad)


def test_clip_is_active_only_where_it_removes_the_gradient():
    # 4 sequences of 1 token, eps 0.2: (ratio, A) ->  -min(ratio*A, clip(ratio)*A)
    #   (1.5, +1) -> -min(1.5, 1.2)   = -1.2  clipped high (no gradient)
    #   (1.5, -1) -> -min(-1.5, -1.2) =  1.5  not clipped
    #   (0.5, -1) -> -min(-0.5, -0.8) =  0.8  clipped low (no gradient)
    #   (0.5, +1) -> -min(0.5, 0.8)   = -0.5  not clipped
    logp = _logp([[1.5], [1.5], [0.5], [0.5]])
    loss, stats = policy_loss(logp, torch.zeros(4, 1), t([1, -1, -1, 1]), torch.ones(4, 1))
    close(loss, t((-1.2 + 1.5 + 0.8 - 0.5) / 4))
    close(stats["clip_ratio"], t(0.5))
    close(stats["clip_ratio_low"], t(0.25))
    close(stats["clip_ratio_high"], t(0.25))
    close(stats["ratio_mean"], t(1.0))
    close(stats["ratio_max"], t(1.5))
    loss.backward()
    # d/dlogp of -ratio*A/4 = -ratio*A/4 where not clipped: 1.5/4 and -0.5/4
    close(logp.grad, t([[0.0], [0.375], [0.0], [-0.125]]))


def test_clip_higher_keeps_gradient_of_a_ratio_between_the_two_eps():
    # ratio 1.25, A = +1: eps_high 0.2 clips (loss -1.2), DAPO's 0.28 does not (loss -1.25)
    args = (_logp([[1.25]]), torch.zeros(1, 1), t([1.0]), torch.ones(1, 1))
    loss_ppo, s_ppo = policy_loss(*args, eps_high=0.2)
    loss_dapo, s_dapo = policy_loss(*args, eps_high=0.28)
    close(loss_ppo, t(-1.2))
    close(loss_dapo, t(-1.25))
    assert s_ppo["clip_ratio_high"] == 1 and s_dapo["clip_ratio_high"] == 0


# A 2x3 micro-batch: seq0 has 3 sampled tokens with ratios 1.0, 1.1, 0.9 and A = +1;
# seq1 has 1 sampled token with ratio 1.15 and A = -2, then 2 pads holding garbage.
# eps_high 0.5 so nothing clips. Token losses -ratio*A: seq0 [-1, -1.1, -0.9] (sum -3, mean -1),
# seq1 [2.3] (sum 2.3, mean 2.3).
MASK_2x3 = t([[1, 1, 1], [1, 0, 0]])
ADV_2 = t([1.0, -2.0])


def _logp_2x3():
    logp = torch.log(t([[1.0, 1.1, 0.9], [1.15, 1.0, 1.0]]))
    logp[1, 1:] = 1e4  # garbage on padding must not reach loss or gradient
    return logp.requires_grad_(True)


@pytest.mark.parametrize(
    "loss_agg, max_tokens, expected",
    [
        ("token_mean", None, (-3.0 + 2.3) / 4),  # all tokens / 4 tokens
        ("seq_mean_token_mean", None, (-1.0 + 2.3) / 2),  # mean of the per-sequence means
        ("seq_mean_token_sum_norm", 3, (-3.0 + 2.3) / (2 * 3)),  # sum / (B * max_tokens)
        ("seq_mean_token_sum_norm", 10, (-3.0 + 2.3) / (2 * 10)),
    ],
)
def test_each_loss_agg_matches_its_hand_computed_value(loss_agg, max_tokens, expected):
    logp = _logp_2x3()
    loss, stats = policy_loss(
        logp, torch.zeros(2, 3), ADV_2, MASK_2x3, eps_high=0.5, loss_agg=loss_agg, max_tokens=max_tokens
    )
    close(loss, t(expected))
    assert stats["clip_ratio"] == 0
    close(stats["ratio_mean"], t((1.0 + 1.1 + 0.9 + 1.15) / 4))
    loss.backward()
    assert torch.isfinite(logp.grad).all() and (logp.grad[1, 1:] == 0).all()


def test_dr_grpo_aggregation_requires_max_tokens():
    with pytest.raises(ValueError, match="max_tokens"):
        policy_loss(_logp_2x3(), torch.zeros(2, 3), ADV_2, MASK_2x3, loss_agg="seq_mean_token_sum_norm")


def test_gspo_ratio_is_the_geometric_mean_of_token_ratios_clipped_per_sequence():
    # s0 = (1.0 * 1.1 * 0.9)^(1/3) = 0.99^(1/3); s1 = 1.15. eps (3e-4, 4e-4), A = [+1, +2]:
    #   seq0: -min(s0, 0.9997) = -s0 (A > 0 below the band: not clipped)
    #   seq1: -min(2 * 1.15, 2 * 1.0004) = -2.0008 (clipped high, no gradient)
    s0 = 0.99 ** (1 / 3)
    logp = _logp_2x3()
    loss, stats = policy_loss(
        logp, torch.zeros(2, 3), t([1.0, 2.0]), MASK_2x3,
        ratio_level="sequence", eps_low=3e-4, eps_high=4e-4, loss_agg="seq_mean_token_mean",
    )  # fmt: skip
    close(loss, t((-s0 - 2.0008) / 2))
    close(stats["clip_ratio_high"], t(0.25))  # 1 of 4 sampled tokens
    close(stats["ratio_mean"], t((3 * s0 + 1.15) / 4))
    close(stats["ratio_max"], t(1.15))
    loss.backward()
    # seq0's loss is -s0 / 2, s0 = exp(mean of 3 log-ratios): d/dlogp_t = -s0 / 3 / 2
    close(logp.grad, t([[-s0 / 6] * 3, [0.0, 0.0, 0.0]]))


def test_on_policy_loss_is_minus_the_token_weighted_mean_advantage():
    # ratio = 1, A = [+1, -1], lengths 3 and 1:
    #   token_mean: -(1*3 - 1*1) / 4 = -0.5; gradient -A_b / 4 on each sampled token
    #   seq_mean_token_mean: -(1 - 1) / 2 = 0
    logp = torch.full((2, 3), -1.0, requires_grad=True)
    old = logp.detach().clone()
    adv = t([1.0, -1.0])
    loss, stats = policy_loss(logp, old, adv, MASK_2x3, eps_high=0.28)
    close(loss, t(-0.5))
    assert stats["clip_ratio"] == 0 and stats["ratio_max"] == 1
    loss.backward()
    close(logp.grad, t([[-0.25] * 3, [0.25, 0.0, 0.0]]))
    loss_seq, _ = policy_loss(logp, old, adv, MASK_2x3, loss_agg="seq_mean_token_mean")
    close(loss_seq, t(0.0))


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_micro_batches_with_the_full_batch_normalizer_give_the_full_batch_loss_and_gradient(
    loss_agg, ratio_level
):
    g = torch.Generator().manual_seed(0)
    B, T = 6, 7
    base = torch.randn(B, T, generator=g) - 2
    old = base + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    lengths = t([7, 2, 5, 1, 3, 6], dtype=torch.long)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    ref = base + 0.1 * torch.randn(B, T, generator=g)
    kw = dict(loss_agg=loss_agg, max_tokens=16, ratio_level=ratio_level, eps_high=0.28, beta=0.05)
    if ratio_level == "sequence":
        kw.update(eps_low=3e-4, eps_high=4e-4)

    full = base.clone().requires_grad_(True)
    loss_full, _ = policy_loss(full, old, adv, mask, ref_logp_BT=ref, **kw)
    loss_full.backward()

    parts = base.clone().requires_grad_(True)
    total = loss_normalizer(mask, loss_agg, max_tokens=16)
    loss_sum = 0.0
    for sl, T_mb in ((slice(0, 3), 7), (slice(3, 6), 6)):  # the second micro-batch is padded shorter
        mb = (sl, slice(0, T_mb))
        loss_mb, _ = policy_loss(
            parts[mb], old[mb], adv[sl], mask[mb], normalizer=total, ref_logp_BT=ref[mb], **kw
        )
        loss_mb.backward()
        loss_sum = loss_sum + loss_mb.detach()
    close(loss_sum, loss_full.detach())
    close(parts.grad, full.grad)


def test_fully_masked_micro_batch_gives_zero_loss_and_finite_gradient():
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, stats = policy_loss(logp, torch.zeros(2, 3), t([1.0, -1.0]), torch.zeros(2, 3))
    loss.backward()
    assert loss.item() == 0 and torch.equal(logp.grad, torch.zeros(2, 3))
    assert all(torch.isfinite(v) for v in stats.values())


def test_is_weights_multiply_the_per_token_policy_loss():
    # on-policy, A = +1, weights [2, 2, 0.5]: token losses [-2, -2, -0.5], token mean -1.5
    logp = torch.zeros(1, 3, requires_grad=True)
    loss, _ = policy_loss(logp, torch.zeros(1, 3), t([1.0]), torch.ones(1, 3), is_weights_BT=t([[2, 2, 0.5]]))
    close(loss, t(-1.5))


def test_tis_weights_are_capped_and_carry_no_gradient():
    # exp(old - sampler): 0.5/0.25 = 2; 0.9/0.1 = 9 -> capped at 2; 0.25/0.5 = 0.5
    old = torch.log(t([[0.5, 0.9, 0.25]])).requires_grad_(True)
    w = tis_weights(old, torch.log(t([[0.25, 0.1, 0.5]])), cap=2.0)
    close(w, t([[2.0, 2.0, 0.5]]))
    assert not w.requires_grad


# ---- KL --------------------------------------------------------------------------------------


def test_k1_and_k3_match_hand_values():
    # logp = [log .5, log .25], ref = [log .25, log .5]; d = ref - logp = [-log 2, log 2]
    #   k1 = logp - ref = [log 2, -log 2]
    #   k3 = exp(d) - d - 1 = [0.5 + log 2 - 1, 2 - log 2 - 1]
    logp, ref = t([[L(0.5), L(0.25)]]), t([[L(0.25), L(0.5)]])
    close(kl_penalty(logp, ref, estimator="k1"), t([[L(2), -L(2)]]))
    close(kl_penalty(logp, ref, estimator="k3"), t([[L(2) - 0.5, 1 - L(2)]]))
    close(kl_penalty(logp, ref, t([[1, 0]]), estimator="k3"), t([[L(2) - 0.5, 0.0]]))
    assert torch.equal(kl_penalty(logp, logp), torch.zeros(1, 2))


def test_kl_term_adds_beta_times_mean_k3():
    # the k3 values above sum to (log2 - 0.5) + (1 - log2) = 0.5, mean 0.25; A = 0 leaves only KL
    logp = t([[L(0.5), L(0.25)]])
    ref = t([[L(0.25), L(0.5)]])
    loss, stats = policy_loss(logp, logp, t([0.0]), torch.ones(1, 2), ref_logp_BT=ref, beta=0.1)
    close(loss, t(0.025))
    close(stats["kl"], t(0.25))
    close(stats["pg_loss"], t(0.0))


def test_beta_without_reference_is_rejected():
    with pytest.raises(ValueError, match="ref_logp_BT"):
        policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), t([1.0]), torch.ones(1, 2), beta=0.1)


# ---- token logprobs and entropy --------------------------------------------------------------


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(grpo, "_CHUNK_ELEMS", 23)  # V = 11: 2 positions per chunk, many chunks


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_equal_log_softmax_gather_in_value_and_gradient(small_chunks, temperature):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 11, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    upstream = torch.randn(3, 5, generator=g, dtype=torch.float64)

    ref_in = logits.clone().requires_grad_(True)
    ref = torch.log_softmax(ref_in / temperature, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    (ref * upstream).sum().backward()

    x = logits.clone().requires_grad_(True)
    out = token_logprobs(x, tokens, temperature)
    (out * upstream).sum().backward()
    close(out, ref)
    close(x.grad, ref_in.grad)


def test_token_logprobs_pass_gradcheck(small_chunks):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 11, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 11, (2, 3), generator=g)
    assert torch.autograd.gradcheck(lambda z: token_logprobs(z, tokens, 0.9), (logits,))


def test_token_logprobs_of_bf16_logits_are_float32_and_grad_stays_bf16(small_chunks):
    g = torch.Generator().manual_seed(3)
    logits = (3 * torch.randn(2, 4, 11, generator=g)).to(torch.bfloat16).requires_grad_(True)
    tokens = torch.randint(0, 11, (2, 4), generator=g)
    out = token_logprobs(logits, tokens)
    ref = torch.log_softmax(logits.detach().float(), -1).gather(-1, tokens[..., None]).squeeze(-1)
    assert out.dtype == torch.float32
    close(out, ref)  # exact float32 math on the bf16 values, not bf16-rounded logprobs
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_token_logprobs_rejects_zero_temperature():
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.zeros(1, 1, 3), torch.zeros(1, 1, dtype=torch.long), 0.0)


def test_entropy_of_uniform_is_log_V_and_of_one_hot_is_zero(small_chunks):
    close(entropy_from_logits(torch.zeros(2, 3, 11)), torch.full((2, 3), L(11)))
    one_hot = t([[[0.0, -math.inf, -math.inf]]])  # a banned token (-inf) must not give nan
    close(entropy_from_logits(one_hot), t([[0.0]]))
    # [0, log 3] -> p = [1/4, 3/4]: H = -(1/4 log 1/4 + 3/4 log 3/4)
    h = -(0.25 * L(0.25) + 0.75 * L(0.75))
    close(entropy_from_logits(t([[[0.0, L(3)]]])), t([[h]]))
    # temperature 2 on [0, 2 log 3] is the same distribution
    close(entropy_from_logits(t([[[0.0, 2 * L(3)]]]), temperature=2.0), t([[h]]))


# ---- DAPO extras -----------------------------------------------------------------------------


def test_overlong_penalty_is_zero_then_linear_to_minus_one():
    # max_len 10, cache 4: free up to 6, then -(L - 6)/4, -1 from 10 on
    p = overlong_penalty(t([0, 6, 7, 8, 10, 12], dtype=torch.long), max_len=10, cache_len=4)
    close(p, t([0, 0, -0.25, -0.5, -1, -1]))


def test_overlong_filter_mask_drops_truncated_sequences():
    assert overlong_filter_mask(torch.tensor([True, False])).tolist() == [False, True]

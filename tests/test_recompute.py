"""A micro-batch over ``micro_batch_tokens`` (one sequence longer than the budget) is trained with
activation recompute: the same loss and gradients as without it, far fewer saved activations,
and the model's layers as they were afterwards. Tiny float32 model, LoRA with random adapters."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from rlft.policy import LoraSpec, load_policy  # noqa: E402
from rlft.training.recompute import recompute_if_over  # noqa: E402
from test_shared_prefix import _groups, _update  # noqa: E402


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    p = load_policy(tiny_model_dir, dtype="float32", lora=LoraSpec(rank=4))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in p.trainable_parameters():
            t.copy_(torch.randn(t.shape, generator=gen) * 0.05)
    return p


def _saved_bytes(model, ids, *, padded_tokens, budget):
    """Bytes the autograd graph keeps for the backward of one forward, and the input gradients'."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    model.train()
    with recompute_if_over(model, padded_tokens, budget) as on:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids).logits.float().logsumexp(-1).mean()
        loss.backward()
    model.eval()
    grads = [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return on, total[0], loss.detach(), grads


def test_a_micro_batch_over_the_budget_keeps_a_fraction_of_the_activations_for_the_same_gradients(policy, one_thread):
    ids = torch.randint(3, len(policy.tokenizer), (1, 96))
    off, plain_bytes, plain_loss, plain_grads = _saved_bytes(policy.model, ids, padded_tokens=96, budget=128)
    on, recomputed_bytes, loss, grads = _saved_bytes(policy.model, ids, padded_tokens=96, budget=64)
    assert (off, on) == (False, True)
    assert recomputed_bytes < plain_bytes / 2, (recomputed_bytes, plain_bytes)
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    for a, b in zip(plain_grads, grads):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    # the layers are as they were: the next micro-batch under the budget saves everything again
    again = _saved_bytes(policy.model, ids, padded_tokens=96, budget=128)
    assert again[0] is False and again[1] == plain_bytes


def test_the_update_recomputes_only_the_sequence_over_the_budget_and_its_gradients_do_not_change(policy, one_thread):
    groups = _groups(policy.tokenizer, n_groups=2, G=4, max_new=9, seed=5)
    longest = max(len(r.prompt_ids) + len(r.completion_ids) for g in groups for r in g.rollouts)
    plain, g_plain = _update(policy, groups, "false", micro_batch_tokens=4 * longest)
    tight, g_tight = _update(policy, groups, "false", micro_batch_tokens=longest - 1)
    assert plain["batch/recomputed_micro_batches"] == 0
    assert 1 <= tight["batch/recomputed_micro_batches"] < 8  # only the rows longer than the budget
    assert tight["loss/policy"] == pytest.approx(plain["loss/policy"], rel=1e-5, abs=1e-6)
    for a, b in zip(g_plain, g_tight):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)

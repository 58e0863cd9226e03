"""Logprobs at sampled positions only (rlft.training.head) give the full-window path's results.

``policy_update`` runs twice on the same batch of the tiny float32 model: once through
``forward_logprobs``' default path (the decoder's final states gathered at the sampled positions,
the output head and log-softmax over them in chunks, recomputed in the backward) and once through
the model's own logits over the whole completion window (``_window_logprobs``, the path before
this change, forced by making ``head.supported`` say no). Metrics, loss and every trainable
gradient must agree within float32 tolerance (rtol 1e-5, atol 1e-6: the same sums in another
order), for plain and shared-prefix rows, LoRA and full finetunes (a full finetune trains the
tied output head through the chunks), multi-turn masks, a sampling temperature, KL and epochs.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from rlft.training import head  # noqa: E402
from tests.test_shared_prefix import ATOL, RTOL, _groups, _update  # noqa: E402
from tests.test_shared_prefix import policies as policies  # noqa: E402  (the module fixture)

KEYS = ("loss/policy", "loss/kl", "policy/entropy", "policy/clip_ratio", "sync/logprob_diff_mean",
        "sync/logprob_diff_max", "batch/trained_sequences", "batch/forward_tokens")


def _assert_same_as_window(monkeypatch, policy, groups, shared: str, **kw):
    sampled, g_sampled = _update(policy, groups, shared, **dict(kw))
    with monkeypatch.context() as m:
        m.setattr(head, "supported", lambda config: False)
        window, g_window = _update(policy, groups, shared, **kw)
    for k in KEYS:
        assert sampled[k] == pytest.approx(window[k], rel=RTOL, abs=ATOL), k
    assert any(float(g.abs().max()) > 0 for g in g_window)
    for a, b in zip(g_window, g_sampled, strict=True):
        torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", ["lora", "full"])
@pytest.mark.parametrize("shared", ["false", "true"])
def test_sampled_positions_give_the_window_loss_and_gradients(policies, one_thread, monkeypatch, kind, shared):
    policy = policies[kind]
    groups = _groups(policy.tokenizer, tools=True, tool_turns=2, seed=1)  # mask-0 tool results in the completions
    _assert_same_as_window(monkeypatch, policy, groups, shared=shared)


@pytest.mark.parametrize("shared", ["false", "true"])
def test_many_chunks_a_temperature_kl_and_epochs_give_the_window_loss_and_gradients(
        policies, one_thread, monkeypatch, shared):
    monkeypatch.setattr(head, "CHUNK_TOKENS", 7)  # several chunks per micro-batch: the recomputed backward
    policy = policies["lora"]
    groups = _groups(policy.tokenizer, tool_turns=1, seed=4)
    _assert_same_as_window(monkeypatch, policy, groups, shared=shared, epochs=2,
                           loss={"beta": 0.1, "temperature": 0.7, "loss_agg": "seq_mean_token_mean"})


def test_the_full_finetune_trains_the_tied_head_through_recomputed_chunks(policies, one_thread, monkeypatch):
    monkeypatch.setattr(head, "CHUNK_TOKENS", 5)
    policy = policies["full"]
    _assert_same_as_window(monkeypatch, policy, _groups(policy.tokenizer, seed=6), shared="true")


def test_chunks_give_log_softmax_and_entropy_and_keep_no_vocabulary_wide_tensor_of_all_positions():
    gen = torch.Generator().manual_seed(0)
    N, H, V, chunk = 50, 8, 97, 16
    lin = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(V, H, generator=gen))
    h = torch.randn(N, H, generator=gen, requires_grad=True)
    t = torch.randint(0, V, (N,), generator=gen)
    w = torch.randn(N, generator=gen)
    sizes: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: sizes.append(x.numel()) or x, lambda x: x):
        logp, ent = head.sampled_logprobs(lin, h, t, 0.8, entropy=True, chunk_tokens=chunk)
        (logp * w).sum().backward()
    ref_all = torch.log_softmax(lin(h.detach()) / 0.8, -1)
    torch.testing.assert_close(logp, ref_all.gather(-1, t[:, None]).squeeze(-1))
    torch.testing.assert_close(ent, -(ref_all.exp() * ref_all).sum(-1))
    h2 = h.detach().clone().requires_grad_(True)
    (torch.log_softmax(lin(h2) / 0.8, -1).gather(-1, t[:, None]).squeeze(-1) * w).sum().backward()
    torch.testing.assert_close(h.grad, h2.grad)
    assert max(sizes) <= chunk * V  # one chunk's logits at most, never (N, V)


needs_logprobs_kernel = pytest.mark.skipif(
    __import__("rlft.kernels.token_logprobs", fromlist=["x"]).token_logprobs_kernel() is None,
    reason="the token_logprobs kernel does not build here (needs AVX512-BF16)")


@needs_logprobs_kernel
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_bf16_kernel_gives_torchs_float32_log_softmax_entropy_and_logit_gradient(temperature):
    from rlft.kernels.token_logprobs import token_logprobs_kernel

    kernel = token_logprobs_kernel()
    gen = torch.Generator().manual_seed(1)
    C, V = 37, 1003  # a row tail that is not a multiple of 16
    z = (torch.randn(C, V + 5, generator=gen) * 4).bfloat16()[:, :V]  # rows strided: a view of a wider tensor
    t = torch.randint(0, V, (C,), generator=gen)
    t[0], t[1] = 0, V - 1  # the first and the last entry
    g = torch.randn(C, generator=gen)
    logp, lse, ent = kernel.forward(z, t, temperature, entropy=True)
    zf = z.float().requires_grad_()
    ref = torch.log_softmax(zf / temperature, -1)
    torch.testing.assert_close(logp, ref.gather(-1, t[:, None]).squeeze(-1).detach(), rtol=0, atol=2e-6)
    torch.testing.assert_close(ent, -(ref.exp() * ref).sum(-1).detach(), rtol=0, atol=2e-5)
    (ref.gather(-1, t[:, None]).squeeze(-1) * g).sum().backward()
    dz = kernel.backward(z, t, lse, g, temperature)
    assert dz.dtype == torch.bfloat16 and dz.shape == (C, V)
    torch.testing.assert_close(dz.float(), zf.grad.bfloat16().float(), rtol=1e-2, atol=1e-6)  # one bf16 rounding


@needs_logprobs_kernel
def test_logits_far_below_the_max_give_torchs_logprob_and_entropy_and_zero_gradient():
    # rlft's kernels take exp below e^-86 as 0 (a subnormal float32 result costs a microcode assist per
    # vector: attention's masked keys made ~a quarter of its time); a sum whose largest term is 1 cannot
    # see such terms and bf16 has no room for them, so the results must stay torch's
    from rlft.kernels.token_logprobs import token_logprobs_kernel

    kernel = token_logprobs_kernel()
    z = torch.tensor([[0.0, -50.0, -90.0, -100.0, -120.0] * 4]).bfloat16()
    t = torch.tensor([1])
    logp, lse, ent = kernel.forward(z, t, 1.0, entropy=True)
    ref = torch.log_softmax(z.float(), -1)
    torch.testing.assert_close(logp, ref[:, 1], rtol=0, atol=2e-6)
    torch.testing.assert_close(ent, -(ref.exp() * ref).sum(-1), rtol=0, atol=2e-6)
    dz = kernel.backward(z, t, lse, torch.ones(1), 1.0).float()
    assert (dz[0, 2::5] == 0).all() and (dz[0, 3::5] == 0).all() and (dz[0, 4::5] == 0).all()
    torch.testing.assert_close(dz[0, 0::5], torch.full((4,), -0.25), rtol=1e-2, atol=0)  # -softmax of the four 0s
    assert float(dz[0, 1]) == pytest.approx(1.0 - float(ref[0, 1].exp()), abs=1e-6)  # d log p(target) / dz


@needs_logprobs_kernel
def test_a_target_outside_the_vocabulary_is_an_error_not_a_read_past_the_row():
    from rlft.kernels.token_logprobs import token_logprobs_kernel

    z = torch.zeros(2, 40, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        token_logprobs_kernel().forward(z, torch.tensor([3, 40]), 1.0, entropy=False)


@needs_logprobs_kernel
def test_bf16_chunks_take_the_kernel_and_give_the_torch_paths_logprobs_and_gradients(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    N, H, V = 40, 16, 301
    lin = torch.nn.Linear(H, V, bias=False).bfloat16()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(V, H, generator=gen))
    h0 = torch.randn(N, H, generator=gen).bfloat16()
    t = torch.randint(0, V, (N,), generator=gen)
    w = torch.randn(N, generator=gen)
    runs = {}
    calls: list[int] = []
    real = head._TokenLogprobs.apply
    monkeypatch.setattr(head._TokenLogprobs, "apply", lambda *a: calls.append(1) or real(*a))
    for path in ("kernel", "torch"):
        calls.clear()
        with monkeypatch.context() as m:
            if path == "torch":
                m.setattr(head, "token_logprobs_kernel", lambda: None)
            h = h0.clone().requires_grad_()
            lin.zero_grad()
            logp, ent = head.sampled_logprobs(lin, h, t, 0.9, entropy=True, chunk_tokens=16)
            (logp * w).sum().backward()
            runs[path] = (logp.detach(), ent, h.grad.float(), lin.weight.grad.float(), len(calls))
    k, r = runs["kernel"], runs["torch"]
    assert k[4] == 2 * 3 and r[4] == 0  # 3 chunks, each forwarded and recomputed in the backward
    torch.testing.assert_close(k[0], r[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(k[1], r[1], rtol=0, atol=1e-4)
    for a, b in zip(k[2:4], r[2:4]):  # bf16 gradients: the logits' gradient rounded once either way
        assert float((a - b).abs().max()) <= 0.02 * float(b.abs().max())

"""rlft's attention over packed shared-prefix rows (rlft.packed_attention) equals the dense masked one.

The kernel visits, for each token, the keys its packed row lets it see (its row's shared part, and
its own segment, up to itself); the reference is float64 softmax attention of the same bf16
inputs under the row's dense 4-D mask from ``rlft.training.prefix.pack``. Compared at the rows'
real tokens (left padding is zeros here, its own value in the dense path; nothing reads it): the
outputs, and the gradients of queries, keys and values for a loss on those outputs. Tolerance:
the kernel computes in float32 and rounds each result to bf16 once, so 1 % of the largest entry
(a bf16 step is 0.4 %). These tests skip where the kernel cannot build (no AVX512-BF16).
"""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from rlft import attention, packed_attention  # noqa: E402
from rlft.kernels.packed_attention import packed_attention_kernel  # noqa: E402
from rlft.training import prefix  # noqa: E402

needs_kernel = pytest.mark.skipif(packed_attention_kernel() is None,
                                  reason="the packed attention kernel does not build here (needs AVX512-BF16)")


@pytest.fixture(params=["avx512", "amx"])
def path(request):
    """Each kernel test runs on both paths: AVX512-BF16 dot products, and AMX tiles (which round p
    and ds to bf16 before they multiply; skipped where the CPU or Linux has no AMX)."""
    kernel = packed_attention_kernel()
    if kernel is None:
        pytest.skip("the packed attention kernel does not build here (needs AVX512-BF16)")
    if request.param == "amx" and not kernel.amx_runs:
        pytest.skip("no AMX tiles here (CPU without AMX-BF16, or Linux did not grant the tile state)")
    default = kernel.amx
    kernel.amx = request.param == "amx"
    yield request.param
    kernel.amx = default


class _Module:  # what transformers passes as ``module``: only ``is_causal`` is read
    is_causal = True


def _packed(seed: int, groups: list[tuple[int, list[int]]]):
    """Packed inputs of groups given as (prompt length, [completion lengths]), one micro-batch."""
    rng = random.Random(seed)
    seqs, gids, prompt_lens = [], [], []
    for g, (p, comps) in enumerate(groups):
        prompt = [rng.randrange(3, 50) for _ in range(p)]
        for c in comps:
            seqs.append(prompt + [rng.randrange(3, 50) for _ in range(c)])
            gids.append(g)
            prompt_lens.append(p)
    order, local = prefix.renumbered(prefix.micro_batches(prefix.plan_rows(seqs, gids, 10_000), 10_000)[0])
    C = max(len(seqs[n]) - prompt_lens[n] for n in order)
    packed = prefix.pack(local, [seqs[n] for n in order], [prompt_lens[n] for n in order], C, pad_id=0)
    real_BL = torch.zeros(packed.ids_BL.shape, dtype=torch.bool)
    for b, r in enumerate(local):
        real_BL[b, packed.ids_BL.shape[1] - r.length:] = True
    return packed, real_BL


def _reference(q, k, v, mask_B1LL, scale):
    """float64 softmax(q k^T scale + mask) v with grouped heads: (B, L, H, D)."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask_B1LL, float("-inf"))
    return (torch.softmax(s, -1) @ v).transpose(1, 2)


def _close(got, want):
    err = float((got.detach().double() - want).abs().max())
    assert err <= 0.01 * float(want.abs().max()), (err, float(want.abs().max()))


def _compare(packed, real_BL, H=6, KV=2, D=64, seed=0):
    B, L = packed.ids_BL.shape
    gen = torch.Generator().manual_seed(seed)
    # token-major storage, as the projections leave it
    q0 = torch.randn(B, L, H, D, generator=gen).transpose(1, 2).to(torch.bfloat16)
    k0, v0 = (torch.randn(B, L, KV, D, generator=gen).transpose(1, 2).to(torch.bfloat16) for _ in range(2))
    w = torch.randn(B, L, H, D, generator=gen) * real_BL[:, :, None, None]  # a loss on the real tokens only
    scale = D ** -0.5
    xs = [t.detach().requires_grad_() for t in (q0, k0, v0)]
    out, _ = attention.rlft_attention(_Module(), *xs, packed.mask_B1LL, scaling=scale,
                                      **{packed_attention.KWARG: packed.segments})
    (out.float() * w).sum().backward()
    rs = [t.detach().double().requires_grad_() for t in (q0, k0, v0)]
    ref = _reference(*rs, packed.mask_B1LL, scale)
    (ref * w.double()).sum().backward()
    _close(out[real_BL], ref.detach()[real_BL])
    assert torch.isfinite(out).all() and (out[~real_BL] == 0).all()
    for x, r in zip(xs, rs):
        assert x.grad.dtype == torch.bfloat16
        _close(x.grad, r.grad)


def test_packed_rows_attend_as_their_dense_mask_says_outputs_and_gradients(path):
    # two rows of different lengths (left padding), segments of 1..13 tokens, grouped-query heads
    packed, real = _packed(0, [(9, [5, 1, 13, 7]), (4, [3, 8, 2])])
    assert packed.ids_BL.shape[0] == 2
    _compare(packed, real)


@pytest.mark.parametrize("H,KV,D", [(9, 3, 64), (4, 4, 32), (5, 1, 16), (6, 2, 16), (8, 2, 128), (6, 2, 96),
                                    (16, 2, 64)])
def test_head_layouts_and_sizes_match(H, KV, D, path):
    # the AMX path takes head_dim 32, 64, 96, 128 (others run the AVX-512 one) and up to 8 query heads a KV head
    packed, real = _packed(1, [(30, [17, 40, 3, 22, 9, 31, 1, 12])])
    _compare(packed, real, H=H, KV=KV, D=D, seed=1)


def test_a_group_sharing_one_token_has_no_shared_part_and_still_matches(path):
    packed, real = _packed(2, [(1, [6, 4, 9]), (7, [2, 5])])
    _compare(packed, real)


def test_a_long_shared_prompt_with_many_segments_matches(path):
    # the tool_use recipe's shape: a long prompt, segments longer than a 16-query block, ranges at odd starts
    packed, real = _packed(7, [(131, [37, 80, 1, 16, 33, 64, 17, 49]), (3, [40, 2])])
    _compare(packed, real, H=9, KV=3, D=64, seed=7)


def test_the_backward_gives_the_same_bits_every_run_on_two_threads(path):
    # each thread sums dk, dv over its blocks: which thread gets which block must not depend on timing
    from rlft.kernels.packed_attention import packed_attention_kernel

    kernel = packed_attention_kernel()
    packed, _ = _packed(6, [(40, [9, 30, 17, 25, 3, 40, 12, 21])])
    T = packed.ids_BL.numel()
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(T, h, 64, generator=gen).bfloat16() for h in (9, 3, 3))
    g = torch.randn(T, 9, 64, generator=gen).bfloat16()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out, lse = kernel.forward(q, k, v, packed.segments.qr_T4, 0.125)
        first = kernel.backward(q, k, v, out, lse, g, packed.segments.qr_T4, 0.125)
        for _ in range(20):
            again = kernel.backward(q, k, v, out, lse, g, packed.segments.qr_T4, 0.125)
            for a, b in zip(first, again):
                assert torch.equal(a, b)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_key_ranges_outside_the_tokens_are_refused_not_read():
    from rlft.kernels.packed_attention import packed_attention_kernel

    q, kv = torch.zeros(4, 2, 16, dtype=torch.bfloat16), torch.zeros(4, 1, 16, dtype=torch.bfloat16)
    for bad in ([0, 5, 0, 0], [-1, 1, 0, 0], [2, 1, 0, 0], [0, 0, 3, 9]):
        qr = torch.zeros(4, 4, dtype=torch.int32)
        qr[2] = torch.tensor(bad, dtype=torch.int32)
        with pytest.raises(RuntimeError, match="forward failed"):
            packed_attention_kernel().forward(q, kv, kv, qr, 0.25)


def test_the_ranges_say_which_keys_each_token_sees():
    # one row: 2 padding, shared [2, 5), segments [5, 8) and [8, 10)
    seg = packed_attention.layout(10, [(2, 3)], [(0, 5, 3), (0, 8, 2)])
    assert seg.qr_T4[:2].tolist() == [[0, 0, 0, 0]] * 2  # padding sees nothing
    assert seg.qr_T4[3].tolist() == [2, 4, 0, 0]  # shared: causal over the shared part
    assert seg.qr_T4[6].tolist() == [2, 5, 5, 7]  # segment: the shared part, then its own up to itself
    assert seg.qr_T4[9].tolist() == [2, 5, 8, 10]


def test_float32_and_dropout_take_the_dense_mask(monkeypatch):
    ran = []
    real = packed_attention._PackedAttention.apply
    monkeypatch.setattr(packed_attention._PackedAttention, "apply", lambda *a: ran.append(1) or real(*a))
    packed, _ = _packed(4, [(6, [3, 4])])
    B, L = packed.ids_BL.shape
    q, kv = torch.randn(B, 4, L, 16), torch.randn(B, 4, L, 16)  # no grouped heads: _Module has no groups
    attention.rlft_attention(_Module(), q, kv, kv, packed.mask_B1LL, **{packed_attention.KWARG: packed.segments})
    q, kv = q.bfloat16(), kv.bfloat16()
    attention.rlft_attention(_Module(), q, kv, kv, packed.mask_B1LL, dropout=0.5,
                             **{packed_attention.KWARG: packed.segments})
    assert ran == []


@pytest.mark.parametrize("head_dim", [16, 64])
def test_a_bf16_update_of_packed_rows_runs_the_kernel_and_gives_the_plain_gradients(head_dim, path, tiny_model_dir,
                                                                                     tmp_path, monkeypatch):
    from rlft.policy import LoraSpec, load_policy
    from rlft.testing.models import save_tiny_model
    from rlft.training.grpo import LossConfig
    from rlft.training.update import UpdateConfig, policy_update
    from rlft.types import Group, Rollout

    class Recorder(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})
            self.grads = []

        def step(self, closure=None):
            self.grads = [p.grad.detach().float().clone() for g in self.param_groups for p in g["params"]]

    if path == "amx" and head_dim == 16:
        pytest.skip("the AMX path takes head_dim 32, 64, 96, 128")
    calls, paths = [], []
    real = packed_attention._PackedAttention.apply
    monkeypatch.setattr(packed_attention._PackedAttention, "apply", lambda *a: calls.append(1) or real(*a))
    kernel = packed_attention_kernel()
    real_amx = kernel._amx
    monkeypatch.setattr(kernel, "_amx", lambda amx: paths.append(real_amx(amx)) or paths[-1])
    # head_dim 64: SmolLM2's head size and grouping (3 query heads a KV head), which the AMX path takes
    model_dir = tiny_model_dir if head_dim == 16 else save_tiny_model(tmp_path / "m", hidden=192, heads=3, kv_heads=1)
    policy = load_policy(model_dir, dtype="bfloat16", lora=LoraSpec(rank=4))
    with torch.no_grad():  # non-zero adapters: the LoRA gradient of A is 0 while B is 0
        gen = torch.Generator().manual_seed(0)
        for p in policy.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    rng = random.Random(0)
    prompt = [rng.randrange(3, 50) for _ in range(12)]
    groups = [Group(example={}, example_id=0, rollouts=[
        Rollout(example={}, prompt_ids=prompt, completion_ids=[rng.randrange(3, 50) for _ in range(5 + i)],
                logprobs=[-1.0] * (5 + i), mask=[1] * (5 + i), advantage=1.0 if i % 2 else -1.0, group_index=i)
        for i in range(4)])]
    grads = {}
    for shared in ("false", "true"):
        opt = Recorder(policy.trainable_parameters())
        stats = policy_update(policy, groups, UpdateConfig(loss=LossConfig(), shared_prefix=shared, bf16=True,
                                                           max_grad_norm=0.0), opt)
        grads[shared] = (stats["loss/policy"], opt.grads)
    assert len(calls) == policy.base_model.config.num_hidden_layers  # every layer, forward
    assert set(paths) == {int(path == "amx")}  # forward and backward on the path under test
    assert grads["true"][0] == pytest.approx(grads["false"][0], rel=2e-2, abs=1e-3)
    # bf16 noise of two summation orders (and, on AMX, p and ds rounded to bf16): measured up to 2.3 % of
    # the largest entry at head_dim 16, 3.4 % in norm at 64 on either path; a wrong kernel is off by far more
    for a, b in zip(grads["false"][1], grads["true"][1]):
        assert float((a - b).abs().max()) <= 0.05 * float(a.abs().max()) + 1e-6
        assert float((a - b).norm()) <= 0.05 * float(a.norm()) + 1e-6

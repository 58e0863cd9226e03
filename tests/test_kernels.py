"""rlft's C kernels (rlft.kernels): built on first use, equal to the torch paths they replace within
one bf16 step, and never in the way where they cannot build."""

from __future__ import annotations

import copy

import pytest
import torch

from rlft.attention import use_fast_attention
from rlft.engines.base import SamplingParams
from rlft.engines.fast_forward import FastForward
from rlft.engines.hf import HFEngine
from rlft.engines.sampling import sample_tokens
from rlft.kernels import (
    DISABLE_ENV,
    AmxWeight,
    PlainSampler,
    amx_linear_kernel,
    decode_attention_kernel,
    layer_ops_kernels,
    plain_sampler,
)
from rlft.kernels import build as kernel_build
from rlft.testing.models import build_tiny_model
from tests.test_hf_engine import PROMPTS, chat, gather

KERNEL = decode_attention_kernel()
OPS = layer_ops_kernels()
needs_kernel = pytest.mark.skipif(KERNEL is None or OPS is None, reason="rlft's kernels do not build here "
                                  "(no C compiler, or a CPU without AVX-512 BF16): the torch paths run instead")


def four_ops(query, kbuf, vbuf, mask, scale):
    """The engine's torch decode attention (FastForward._decode_attention), on [B, H, D] queries."""
    B, H, D = query.shape
    _, KV, cap, _ = kbuf.shape
    G = H // KV
    bias = torch.full((B, cap), torch.finfo(kbuf.dtype).min, dtype=kbuf.dtype)
    bias[:, :mask.shape[1]].masked_fill_(mask, 0.0)
    bias = bias[:, None, None].expand(B, KV, G, cap).reshape(B * KV, G, cap)
    scores = torch.baddbmm(bias, query.reshape(B * KV, G, D), kbuf.view(B * KV, cap, D).transpose(1, 2), alpha=scale)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(vbuf.dtype)
    return torch.bmm(probs, vbuf.view(B * KV, cap, D)).view(B, H, D)


def _inputs(gen, KV, G, D, length, cap, B=3):
    query = (torch.randn(B, KV * G, D, generator=gen) * 2).bfloat16()
    kbuf, vbuf = (torch.randn(B, KV, cap, D, generator=gen).bfloat16() for _ in range(2))
    mask = torch.ones(B, length, dtype=torch.bool)
    mask[1, : length // 2] = False  # left padding
    if length > 2:
        mask[2, length // 3] = False  # a hole
    return query, kbuf, vbuf, mask


@needs_kernel
@pytest.mark.parametrize("heads", [(3, 3, 64), (2, 7, 128), (2, 2, 16), (1, 4, 32), (4, 1, 256)],
                         ids=lambda h: "kv{}-g{}-d{}".format(*h))
def test_decode_attention_kernel_equals_the_torch_path_within_one_bf16_step(heads):
    """SmolLM2's heads (3 KV x 3 queries, 64), Qwen2.5-0.5B's (2 x 7, 128: a partial block of query
    heads), and others; every cache length to 70 and two long ones; buffers full and with unwritten
    slots. Only the order of float32 sums differs, so an output may be off by one bf16 step of the
    head's largest value, and nearly all are equal."""
    KV, G, D = heads
    gen = torch.Generator().manual_seed(0)
    equal = total = 0
    for length in [*range(1, 71), 200, 1000]:
        for cap in {length, length + 7}:
            query, kbuf, vbuf, mask = _inputs(gen, KV, G, D, length, cap)
            expected = four_ops(query, kbuf, vbuf, mask, D ** -0.5).float()
            got = KERNEL(query, kbuf, vbuf, mask, D ** -0.5).float()
            step = 2.0 ** -7 * expected.abs().amax(-1, keepdim=True)
            assert ((got - expected).abs() <= step).all(), (length, cap, (got - expected).abs().max().item())
            equal += int((got == expected).sum())
            total += got.numel()
    assert equal / total > 0.999, equal / total


@needs_kernel
def test_decode_attention_kernel_reads_strided_query_rows_and_gives_the_same_bits_at_any_thread_count():
    gen = torch.Generator().manual_seed(1)
    B, KV, G, D, L = 5, 3, 3, 64, 90
    qkv = torch.randn(B, KV * G + 2 * KV, D, generator=gen).bfloat16()  # the engine's fused q|k|v rows
    _, kbuf, vbuf, mask = _inputs(gen, KV, G, D, L, L + 20, B=B)
    query = qkv[:, :KV * G]
    assert not query.is_contiguous()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = KERNEL(query, kbuf, vbuf, mask, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, KERNEL(query, kbuf, vbuf, mask, 0.125))
    assert torch.equal(one, KERNEL(query.contiguous(), kbuf, vbuf, mask, 0.125))
    expected = four_ops(query.contiguous(), kbuf, vbuf, mask, 0.125).float()
    assert ((one.float() - expected).abs() <= 2.0 ** -7 * expected.abs().amax(-1, keepdim=True)).all()


@needs_kernel
def test_decode_attention_kernel_refuses_what_it_does_not_handle():
    query, kbuf, vbuf, mask = _inputs(torch.Generator().manual_seed(2), 2, 2, 64, 10, 12)
    with pytest.raises(ValueError, match="unsupported"):
        KERNEL(query.float(), kbuf.float(), vbuf.float(), mask, 0.125)  # float32
    with pytest.raises(ValueError, match="unsupported"):
        KERNEL(query, kbuf[:, :, :10], vbuf[:, :, :10], mask, 0.125)  # strided buffers
    with pytest.raises(RuntimeError, match="failed"):
        KERNEL(query, kbuf, vbuf, torch.ones(3, 13, dtype=torch.bool), 0.125)  # more slots than the buffers


@needs_kernel
def test_engine_with_the_kernel_samples_the_tokens_it_samples_without_it(monkeypatch):
    """A model with SmolLM2's head layout (64-wide heads, 3 queries per KV head), bf16, through the
    engine's fast forward with the kernel and with the torch decode attention: the same tokens, and
    logprobs within what one bf16 step in the attention output moves them."""
    model, tok = build_tiny_model(seed=0, hidden=384, heads=6, kv_heads=2, layers=2)
    model = model.to(torch.bfloat16).eval()
    prompts = [chat(tok, f"{PROMPTS[i % len(PROMPTS)]} {i}") for i in range(6)]
    params = [SamplingParams(temperature=1.0, max_new_tokens=24, seed=300 + i) for i in range(len(prompts))]
    runs = {}
    for native in ("1", "0"):
        monkeypatch.setenv(DISABLE_ENV, native)
        engine = HFEngine(model, tok, seed=0, inline=True, copy_weights=True)
        try:
            assert (engine.fast_forward.kernel is not None) == (engine.fast_forward.ops is not None) == (native == "1")
            runs[native] = gather(engine, prompts, params)
        finally:
            engine.close()
    with_kernel, without = runs["1"], runs["0"]
    assert [s.tokens for s in with_kernel] == [s.tokens for s in without]
    diffs = [abs(a - b) for x, y in zip(with_kernel, without) for a, b in zip(x.logprobs, y.logprobs)]
    assert max(diffs) < 0.05, max(diffs)


def one_step(expected: torch.Tensor) -> torch.Tensor:
    """One bf16 step at each element's magnitude (the spacing of bf16 values around it)."""
    return 2.0 ** (torch.floor(torch.log2(expected.float().abs().clamp(min=2.0 ** -126))) - 7)


def torch_rms_norm(x, weight, eps):  # FastForward._rms_norm: LlamaRMSNorm's roundings
    xf = x.to(torch.float32, copy=True)
    xf.mul_(torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps)))
    return weight * xf.to(x.dtype)


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 1, 576), (64, 1, 576), (3, 40, 576), (5, 2, 72), (2, 3, 1000)], ids=str)
def test_add_rms_norm_updates_the_residual_exactly_and_normalises_within_one_bf16_step(shape):
    """Widths that are and are not multiples of 16, one row to 120 (threads split the larger ones)."""
    gen = torch.Generator().manual_seed(sum(shape))
    h = (torch.randn(*shape, generator=gen) * 3).bfloat16()
    delta = torch.randn(*shape, generator=gen).bfloat16()
    weight = (1 + 0.2 * torch.randn(shape[-1], generator=gen)).bfloat16()
    expected_h = h.clone().add_(delta)
    expected = torch_rms_norm(expected_h, weight, 1e-5)
    got = OPS.add_rms_norm(h, delta, weight, 1e-5)
    assert torch.equal(h, expected_h)  # the residual add: bf16(h + delta), in place
    assert ((got.float() - expected.float()).abs() <= one_step(expected)).all()
    assert (got == expected).float().mean() > 0.999
    assert torch.equal(OPS.add_rms_norm(h, None, weight, 1e-5), got)  # no delta: the norm alone
    assert torch.equal(h, expected_h)


@needs_kernel
@pytest.mark.parametrize("head_dim", [16, 64, 128, 40])
def test_rotary_in_place_gives_the_torch_ops_bits(head_dim):
    """``x * cos + swap_halves(x) * signed_sin`` with each product and the sum rounded to bf16: the
    same bits as FastForward's torch ops, on q|k heads sliced out of a fused q|k|v output (strided
    rows), with halves that are (64, 128) and are not (16, 40) multiples of 16 lanes."""
    gen = torch.Generator().manual_seed(head_dim)
    B, q, H, KV, D = 4, 3, 6, 2, head_dim
    qkv = torch.randn(B, q, H + 2 * KV, D, generator=gen).bfloat16()
    cos, sin = (torch.randn(B, q, D, generator=gen).bfloat16() for _ in range(2))
    signed = torch.cat([-sin[..., :D // 2], sin[..., D // 2:]], -1)
    expected = qkv.clone()
    qk = expected[:, :, :H + KV]
    swapped = qk.view(B, q, H + KV, 2, D // 2).flip(3).view(B, q, H + KV, D).mul_(signed[:, :, None])
    qk.mul_(cos[:, :, None]).add_(swapped)
    got = qkv.clone()
    OPS.rotary_(got[:, :, :H + KV], cos, signed)
    assert torch.equal(got, expected)  # v untouched too


@needs_kernel
@pytest.mark.parametrize("shape", [(64, 1, 3072), (2, 5, 200), (1, 1, 16)], ids=str)
def test_silu_mul_equals_the_torch_ops_within_one_bf16_step(shape):
    gen = torch.Generator().manual_seed(shape[-1])
    gate_up = (torch.randn(*shape, generator=gen) * 4).bfloat16()
    inter = shape[-1] // 2
    expected = torch.nn.functional.silu(gate_up[..., :inter]).mul_(gate_up[..., inter:])
    got = OPS.silu_mul(gate_up)
    assert got.shape == expected.shape
    assert ((got.float() - expected.float()).abs() <= one_step(expected)).all()
    assert (got == expected).float().mean() > 0.999


@needs_kernel
@pytest.mark.parametrize("shape", [(3, 37, 1536), (1, 5, 200), (2, 1, 7)], ids=str)
def test_swiglu_and_its_backward_equal_autograd_of_the_torch_ops_within_one_bf16_step(shape):
    """Forward and both gradients of silu(gate) * up in bf16 against autograd through F.silu and the
    product (the same roundings; float32 exp may differ in its last bit)."""
    gen = torch.Generator().manual_seed(shape[-1])
    gate, up, grad = ((torch.randn(*shape, generator=gen) * 4).bfloat16() for _ in range(3))
    g, u = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
    expected = torch.nn.functional.silu(g) * u
    expected.backward(grad)
    got = OPS.swiglu(gate, up)
    dgate, dup = OPS.swiglu_backward(gate, up, grad)
    for name, a, b in (("out", got, expected.detach()), ("dgate", dgate, g.grad), ("dup", dup, u.grad)):
        assert a.shape == b.shape, name
        assert ((a.float() - b.float()).abs() <= one_step(b)).all(), name
        assert (a == b).float().mean() > 0.99, name
    with pytest.raises(ValueError, match="gate"):
        OPS.swiglu(gate, up[..., :-1])


@needs_kernel
def test_the_fused_mlp_keeps_two_intermediate_tensors_and_gives_the_plain_gradients():
    """A bf16 Llama MLP routed through the kernel: output and input/weight gradients as the plain
    MLP's within bf16 noise, and the autograd graph keeps one [tokens, intermediate] tensor fewer
    (no silu(gate))."""
    from rlft.kernels.swiglu import use_fused_swiglu

    model, _ = build_tiny_model(seed=0, hidden=64, layers=2, heads=4, kv_heads=2)
    model = model.to(torch.bfloat16)
    plain = copy.deepcopy(model.model.layers[0].mlp)
    assert use_fused_swiglu(model) == 2  # both layers' MLPs
    fused = model.model.layers[0].mlp
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(4)).bfloat16()
    outs, grads = [], []
    for mlp in (plain, fused):
        xi = x.clone().requires_grad_(True)
        mlp.zero_grad(set_to_none=True)
        saved: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, kept=saved: kept.append(t) or t, lambda t: t):
            y = mlp(xi)
        big = [t for t in saved if t.numel() == 18 * mlp.gate_proj.out_features]  # [2 x 9 tokens, inter]
        y.float().square().sum().backward()
        outs.append((y.detach(), len({t.data_ptr() for t in big})))
        grads.append([xi.grad] + [p.grad for p in mlp.parameters()])
    (y_plain, n_plain), (y_fused, n_fused) = outs
    assert n_plain == 4 and n_fused == 3  # gate, silu(gate), up, the product (down's input): no silu(gate)
    assert ((y_fused.float() - y_plain.float()).abs() <= 2 * one_step(y_plain)).all()
    for a, b in zip(grads[1], grads[0]):
        assert float((a.float() - b.float()).norm() / b.float().norm()) < 2e-2


@needs_kernel
@pytest.mark.parametrize("batch_cos", [1, 2], ids=["shared-positions", "per-row-positions"])
def test_the_fused_rotary_embedding_gives_transformers_outputs_and_gradients_to_the_bit(batch_cos):
    """q and k as the projections leave them ([B, L, H, D] storage seen as [B, H, L, D]), cos and sin
    from the model's rotary embedding in bf16: the fused function's outputs and the gradients of q,
    k are transformers' own, bit for bit; other dtypes go to transformers' function."""
    from transformers.models.llama import modeling_llama

    from rlft.kernels import rotary

    model, _ = build_tiny_model(seed=0, hidden=128, layers=1, heads=4, kv_heads=2)  # head_dim 32
    assert rotary.use_fused_rotary() == len(rotary._MODULES)
    original, fused = rotary._ORIGINAL["llama"], modeling_llama.apply_rotary_pos_emb
    gen = torch.Generator().manual_seed(batch_cos)
    q0 = torch.randn(2, 11, 4, 32, generator=gen).bfloat16().transpose(1, 2)
    k0 = torch.randn(2, 11, 2, 32, generator=gen).bfloat16().transpose(1, 2)
    positions = torch.arange(11).repeat(batch_cos, 1) + torch.arange(batch_cos)[:, None] * 5
    cos, sin = (t.bfloat16() for t in model.model.rotary_emb(q0.float(), positions))
    g_q, g_k = (torch.randn(t.shape, generator=gen).bfloat16() for t in (q0, k0))
    results = []
    for fn in (original, fused):
        q, k = (t.detach().requires_grad_(True) for t in (q0, k0))
        out_q, out_k = fn(q, k, cos, sin)
        (out_q.float() * g_q.float()).sum().add((out_k.float() * g_k.float()).sum()).backward()
        results.append((out_q.detach(), out_k.detach(), q.grad, k.grad))
    for name, a, b in zip(("q", "k", "dq", "dk"), results[1], results[0]):
        assert a.shape == b.shape and torch.equal(a, b), name
    q32, k32 = q0.float(), k0.float()  # float32: transformers' function, untouched
    for a, b in zip(fused(q32, k32, cos.float(), sin.float()), original(q32, k32, cos.float(), sin.float())):
        assert torch.equal(a, b)


@needs_kernel
def test_layer_ops_refuse_other_dtypes_and_layouts():
    x = torch.randn(2, 1, 64)
    with pytest.raises(ValueError, match="bf16"):
        OPS.add_rms_norm(x, None, torch.ones(64), 1e-5)
    with pytest.raises(ValueError, match="contiguous"):
        OPS.silu_mul(x.bfloat16().transpose(0, 2))
    with pytest.raises(ValueError, match="unsupported"):
        qk = torch.randn(2, 1, 3, 64).bfloat16()
        OPS.rotary_(qk.transpose(1, 2), qk[:, :, 0], qk[:, :, 0])


def test_no_kernel_is_built_when_disabled_or_without_a_compiler(monkeypatch, tmp_path):
    model, _ = build_tiny_model(seed=0)
    model = model.to(torch.bfloat16).eval()
    assert use_fast_attention(model)
    monkeypatch.setenv(DISABLE_ENV, "0")
    assert decode_attention_kernel() is None and layer_ops_kernels() is None
    assert FastForward(model).kernel is None and FastForward(model).ops is None
    assert kernel_build.status("layer_ops") == f"turned off ({DISABLE_ENV}=0)"  # what rlft doctor prints
    monkeypatch.setenv(DISABLE_ENV, "1")
    monkeypatch.setenv("RLFT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    kernel_build._load.cache_clear()
    try:
        assert decode_attention_kernel() is None and layer_ops_kernels() is None
        assert FastForward(model).kernel is None and FastForward(model).ops is None
        assert kernel_build.status("decode_attention").startswith("no C compiler")
        assert not (tmp_path / "kernels").exists() or not any((tmp_path / "kernels").glob("*.so"))
    finally:
        kernel_build._load.cache_clear()


@needs_kernel
def test_a_built_kernel_is_cached_under_a_key_of_source_compiler_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("RLFT_CACHE", str(tmp_path))
    kernel_build._load.cache_clear()
    try:
        assert decode_attention_kernel() is not None
        built = list((tmp_path / "kernels").glob("decode_attention-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        kernel_build._load.cache_clear()
        assert decode_attention_kernel() is not None  # a new process would load the same file
        assert [p.stat().st_mtime_ns for p in (tmp_path / "kernels").glob("*.so")] == [stamp]
        assert not [p for p in (tmp_path / "kernels").iterdir() if p.is_dir()]  # no build dirs left behind
    finally:
        kernel_build._load.cache_clear()


# ---- RMSNorm for training (rlft.kernels.rms_norm) ---------------------------------------------


def _norms(width=576, seed=0):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from rlft.kernels.rms_norm import FusedRMSNorm

    gen = torch.Generator().manual_seed(seed)
    hf = LlamaRMSNorm(width).to(torch.bfloat16)
    with torch.no_grad():
        hf.weight.add_((0.2 * torch.randn(width, generator=gen)).bfloat16())
    return hf, FusedRMSNorm(hf.weight, hf.variance_epsilon), gen


def _forward_backward(norm, x0, grad):
    norm.weight.grad = None
    x = x0.clone().requires_grad_(True)
    y = norm(x)
    y.backward(grad)
    return y.detach(), x.grad, norm.weight.grad


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 353, 576), (2, 7, 64), (3, 5, 100)], ids=str)
def test_fused_rms_norm_gives_transformers_output_and_input_gradient_within_one_bf16_step(shape):
    hf, fused, gen = _norms(shape[-1], seed=shape[1])
    x0 = (torch.randn(*shape, generator=gen) * 2).bfloat16()
    grad = torch.randn(*shape, generator=gen).bfloat16()
    (y_hf, dx_hf, dw_hf), (y, dx, dw) = _forward_backward(hf, x0, grad), _forward_backward(fused, x0, grad)
    for got, expected in ((y, y_hf), (dx, dx_hf)):
        assert got.dtype == expected.dtype == torch.bfloat16
        # one bf16 step, or of a typical value where the backward's subtraction cancels to ~0
        floor = 2.0 ** -8 * expected.float().abs().mean()
        assert ((got.float() - expected.float()).abs() <= torch.maximum(one_step(expected), floor)).all()
        assert (got == expected).float().mean() > 0.999
    # the weight's gradient sums dy * bf16(n) over rows: transformers rounds each product to bf16
    # first, the kernel does not, so it is compared with a float64 reference instead
    x = x0.double().requires_grad_(True)
    w = hf.weight.detach().double().requires_grad_(True)
    n = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + hf.variance_epsilon)).bfloat16().double()
    (w * n).backward(grad.double())
    assert (dw.double() - w.grad).abs().mean() <= (dw_hf.double() - w.grad).abs().mean()


def test_fused_rms_norm_in_float32_is_transformers_formula_bit_for_bit():
    hf, fused, gen = _norms(64)
    hf.float()
    x0 = torch.randn(4, 9, 64, generator=gen)
    grad = torch.randn(4, 9, 64, generator=gen)
    for a, b in zip(_forward_backward(hf, x0, grad), _forward_backward(fused, x0, grad)):
        assert torch.equal(a, b)


@needs_kernel
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_policy_loaded_on_the_cpu_trains_through_the_fused_norms_with_transformers_gradients(
        tiny_model_dir, monkeypatch, lora):
    """load_policy swaps every RMSNorm (2 per layer and the final one) for the fused one over the
    same parameters; the loss and every trained parameter's gradient match the unswapped model's
    (bf16, with activation recompute) within bf16 noise."""
    from rlft.kernels.rms_norm import FusedRMSNorm
    from rlft.policy import LoraSpec, load_policy

    spec = LoraSpec(rank=4) if lora else None
    monkeypatch.setenv(DISABLE_ENV, "0")
    plain = load_policy(tiny_model_dir, dtype="bfloat16", lora=spec, gradient_checkpointing=True)
    monkeypatch.setenv(DISABLE_ENV, "1")
    fused = load_policy(tiny_model_dir, dtype="bfloat16", lora=spec, gradient_checkpointing=True)
    layers = fused.base_model.config.num_hidden_layers
    assert sum(isinstance(m, FusedRMSNorm) for m in fused.model.modules()) == 2 * layers + 1
    assert not any(isinstance(m, FusedRMSNorm) for m in plain.model.modules())
    assert list(fused.model.state_dict()) == list(plain.model.state_dict())
    with torch.no_grad():  # the same adapters (peft initialises B to 0: make it count)
        for (_, a), (_, b) in zip(plain.named_trainable_parameters(), fused.named_trainable_parameters()):
            a.copy_(torch.randn_like(a) * 0.05)
            b.copy_(a)
    ids = torch.randint(0, len(plain.tokenizer), (3, 20), generator=torch.Generator().manual_seed(0))
    losses, grads = [], []
    for policy in (plain, fused):
        policy.model.train()
        logits = policy.model(input_ids=ids).logits
        loss = torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).mean()
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.float() for _, p in policy.named_trainable_parameters()])
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)
    for a, b in zip(*grads):
        assert (a - b).norm() <= 0.05 * a.norm() + 1e-6


# ---- linear layers on AMX tiles (rlft.kernels.amx_linear) -------------------------------------


def _amx_kernel(monkeypatch):
    """The AMX linear kernel with oneDNN's ISA cap (tests/conftest.py) lifted, or a skip."""
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    kernel = amx_linear_kernel()
    if kernel is None:
        pytest.skip("the AMX linear kernel does not run here (a CPU without AMX-BF16, no C compiler, or no tile "
                    "permission from Linux): oneDNN's packed linear runs instead")
    return kernel


@pytest.mark.parametrize("shape", [(1, 64, 64), (5, 200, 576), (16, 960, 576), (17, 576, 1536), (64, 3072, 576),
                                   (100, 49, 96), (300, 96, 64)], ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_amx_linear_rounds_the_exact_product_to_within_one_bf16_step(monkeypatch, shape, bias):
    """Rows M (partial tiles, several 256-row passes), outputs N (padded to 32 in the packed weight,
    only N written), inputs K: the float64 product, rounded once, within one bf16 step; and within
    one step of oneDNN's bf16 linear (``F.linear``) on the same tensors."""
    kernel = _amx_kernel(monkeypatch)
    M, N, K = shape
    gen = torch.Generator().manual_seed(M + N + K)
    x = torch.randn(M, K, generator=gen).bfloat16()
    w = (torch.randn(N, K, generator=gen) / K ** 0.5).bfloat16()
    b = torch.randn(N, generator=gen).bfloat16() if bias else None
    y = kernel.linear(x, kernel.pack(w), b)
    assert y.shape == (M, N) and y.dtype == torch.bfloat16
    exact = x.double() @ w.double().T + (b.double() if bias else 0)
    slack = 1e-5 * (x.double().abs() @ w.double().abs().T)  # float32 sums in another order than float64's
    assert ((y.double() - exact).abs() <= one_step(exact) + slack).all()
    reference = torch.nn.functional.linear(x, w, b)
    assert ((y.float() - reference.float()).abs() <= one_step(reference) + slack.float()).all()


@pytest.mark.parametrize("shape", [(960, 576), (49, 96), (1, 32)], ids=str)
def test_amx_pack_lays_each_weight_out_as_the_tiles_read_it_with_zero_padded_columns(monkeypatch, shape):
    kernel = _amx_kernel(monkeypatch)
    N, K = shape
    w = torch.randn(N, K + 32).bfloat16()[:, :K]  # strided rows, as a slice of a larger matrix
    # packed[nb, kb, t, r, c, j] = w[32 nb + 16 t + c, 32 kb + 2 r + j]
    want = torch.nn.functional.pad(w, (0, 0, 0, -N % 32)).reshape(-1, 2, 16, K // 32, 16, 2)
    assert torch.equal(kernel.pack(w).packed, want.permute(0, 3, 1, 4, 2, 5).contiguous())


def test_amx_linear_reads_strided_rows_and_gives_the_same_bits_at_any_thread_count(monkeypatch):
    kernel = _amx_kernel(monkeypatch)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, 576, generator=gen).bfloat16()
    w = kernel.pack(torch.randn(1000, 576, generator=gen).bfloat16())
    last = x[:, -1]  # [64, 576] with a row stride of 3 x 576, as the engine's head reads its last positions
    assert not last.is_contiguous()
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(kernel.linear(last, w))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0], kernel.linear(last.contiguous(), w))
    assert torch.equal(kernel.linear(x, w)[:, -1], outs[0])  # [..., K] inputs keep their leading dimensions


def test_amx_linear_refuses_what_it_does_not_handle_and_follows_onednns_isa_cap(monkeypatch):
    kernel = _amx_kernel(monkeypatch)
    assert not kernel.handles(torch.zeros(64, 100, dtype=torch.bfloat16))  # K not a multiple of 32
    assert not kernel.handles(torch.zeros(64, 64))  # float32
    with pytest.raises(ValueError, match="K % 32"):
        kernel.pack(torch.zeros(64, 100, dtype=torch.bfloat16))
    w = kernel.pack(torch.zeros(64, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="bf16 CPU"):
        kernel.linear(torch.zeros(2, 32, dtype=torch.bfloat16), w)
    with pytest.raises(ValueError, match="bias"):
        kernel.linear(torch.zeros(2, 64, dtype=torch.bfloat16), w, torch.zeros(63, dtype=torch.bfloat16))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # bf16 matmuls kept off AMX: this one too
    assert amx_linear_kernel() is None
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert amx_linear_kernel() is not None


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fast_forward_on_amx_tiles_decodes_the_tokens_onednn_decodes(monkeypatch, arch):
    """The engine's fast forward with its linear layers on the AMX kernel and on oneDNN's packed
    linear (the ISA cap): a padded prefill and greedy steps pick the same tokens, logits within
    bf16 noise. Qwen2: q/k/v biases added by the kernel."""
    from tests.test_fast_forward import _decode, _tiny

    _amx_kernel(monkeypatch)
    model, _ = _tiny(arch, torch.bfloat16)
    on_tiles = FastForward(model)
    assert on_tiles.amx is not None and isinstance(on_tiles.layers[0].qkv, AmxWeight)
    assert isinstance(on_tiles.head, AmxWeight)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    on_onednn = FastForward(model)
    assert on_onednn.amx is None
    for changed in (False, True):
        if changed:  # new weights (as after a sync): both repack them
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).bfloat16() * 0.02)
            on_tiles.refresh()
            on_onednn.refresh()
        ours, theirs = _decode(model, on_tiles, steps=8), _decode(model, on_onednn, steps=8)
        for a, b in zip(ours, theirs):
            assert torch.equal(a.float().argmax(-1), b.float().argmax(-1))
            assert (a.float() - b.float()).abs().max() < 0.05 * b.float().abs().max()


# ---- sampling (rlft.kernels.sampling) ----------------------------------------------------------

SAMPLER = plain_sampler()
needs_sampler = pytest.mark.skipif(SAMPLER is None, reason="rlft's kernels do not build here: the torch sampler runs")


def _torch_draws(monkeypatch, logits, temperature, uniform):
    monkeypatch.setenv(DISABLE_ENV, "0")  # sample_tokens' torch inverse CDF
    B = logits.shape[0]
    try:
        return sample_tokens(logits, temperature, torch.ones(B), torch.zeros(B, dtype=torch.long), uniform)
    finally:
        monkeypatch.setenv(DISABLE_ENV, "1")


@needs_sampler
@pytest.mark.parametrize("vocab", [49152, 1000, 17])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_plain_sampler_draws_the_torch_inverse_cdfs_tokens_except_at_token_boundaries(monkeypatch, vocab, temperature):
    """Same uniforms, same logits: the same token, or (float32 sums in another order) a neighbour
    of one whose CDF boundary lies within 1e-5 of the uniform; logprobs of equal draws within 1e-5."""
    gen = torch.Generator().manual_seed(vocab)
    B = 256
    logits = (torch.randn(B, vocab, generator=gen) * 3).bfloat16()
    temp, uniform = torch.full((B,), temperature), torch.rand(B, generator=gen)
    tokens, logprobs = SAMPLER(logits, temp, uniform)
    want, want_lp = _torch_draws(monkeypatch, logits, temp, uniform)
    same = tokens == want
    assert same.float().mean() >= 0.99
    assert (logprobs[same] - want_lp[same]).abs().max() < 1e-5
    cdf = torch.softmax(logits.double() / temperature, -1).cumsum(-1)
    for row in (~same).nonzero().flatten().tolist():
        lo, hi = sorted((int(tokens[row]), int(want[row])))
        boundaries = cdf[row, lo:hi]  # the CDF values between the two draws
        assert (boundaries - uniform[row].double()).abs().min() < 1e-5, (row, lo, hi)
    exact = torch.log_softmax(logits.double() / temperature, -1).gather(1, tokens[:, None]).squeeze(1)
    assert (logprobs.double() - exact).abs().max() < 1e-4  # the logprob of the token drawn, at T


@needs_sampler
def test_plain_sampler_frequencies_follow_the_softmax_at_the_temperature():
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(1, 40, generator=gen) * 2).bfloat16()
    n = 40_000
    tokens, _ = SAMPLER(logits.expand(n, 40), torch.full((n,), 0.7), torch.rand(n, generator=gen))
    freq = torch.bincount(tokens, minlength=40).double() / n
    p = torch.softmax(logits[0].double() / 0.7, -1)
    assert ((freq - p).abs() <= 4 * (p * (1 - p) / n).sqrt() + 1e-4).all()  # within 4 standard errors


@needs_sampler
def test_plain_sampler_never_draws_a_masked_token():
    """Grammar-constrained rows reach the sampler with disallowed tokens at -inf."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(64, 1000, generator=gen).bfloat16()
    allowed = torch.rand(64, 1000, generator=gen) < 0.01
    allowed[:, 999] = True  # at least one per row, one in the vocabulary's last (partial) block
    logits[~allowed] = float("-inf")
    for seed in range(20):
        tokens, logprobs = SAMPLER(logits, torch.ones(64), torch.rand(64, generator=torch.Generator().manual_seed(seed)))
        assert allowed.gather(1, tokens[:, None]).all() and torch.isfinite(logprobs).all()


@needs_sampler
def test_sample_tokens_takes_the_kernel_for_bf16_rows_without_truncation_only(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(8, 300, generator=gen).bfloat16()
    temp, uniform = torch.full((8,), 0.9), torch.rand(8, generator=gen)
    ones, zeros = torch.ones(8), torch.zeros(8, dtype=torch.long)
    assert torch.equal(sample_tokens(logits, temp, ones, zeros, uniform)[0], SAMPLER(logits, temp, uniform)[0])
    with pytest.raises(ValueError, match="temperature"):
        SAMPLER(logits, torch.zeros(8), uniform)
    with pytest.raises(ValueError, match="bf16"):
        SAMPLER(logits.float(), temp, uniform)
    calls = []
    monkeypatch.setattr(PlainSampler, "__call__", lambda self, *a: calls.append(a))
    sample_tokens(logits.float(), temp, ones, zeros, uniform)  # float32: the torch path
    sample_tokens(logits, temp, torch.full((8,), 0.5), zeros, uniform)  # top-p: the torch path
    assert not calls

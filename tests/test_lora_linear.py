"""The fused LoRA linear (rlft.training.lora_linear) against peft's own forward and backward."""

from __future__ import annotations

import copy

import pytest
import torch

from rlft.testing.models import build_tiny_model
from rlft.training.lora_linear import _fused_forward, use_fused_lora

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_model(dtype=torch.bfloat16, dropout=0.0, bias=False, **config):
    model, _ = build_tiny_model(seed=0, hidden=64, layers=2, heads=4, kv_heads=2)
    if bias:  # a base bias (as Qwen2's q/k/v) the fused node must add
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.q_proj.bias = torch.nn.Parameter(torch.randn(attn.q_proj.out_features) * 0.1)
    model = model.to(dtype)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                       target_modules=TARGETS, **config))
    with torch.no_grad():  # B starts at zero: random B so the adapters' path carries signal
        gen = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _loss_and_grads(model, ids, autocast=True):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
            peft.helpers.disable_input_dtype_casting(model):
        logits = model(input_ids=ids).logits
    loss = torch.log_softmax(logits.float(), -1)[..., 0].mean()
    loss.backward()
    return loss.detach(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _assert_at_least_as_close_to_float32(grads_new, grads_old, grads_fp32):
    """The new path's gradients, on average over the parameters, no farther from float32's than the
    old path's (10 % slack: both are bf16 noise)."""
    err_new = sum(_rel(grads_new[n], grads_fp32[n]) for n in grads_fp32) / len(grads_fp32)
    err_old = sum(_rel(grads_old[n], grads_fp32[n]) for n in grads_fp32) / len(grads_fp32)
    assert err_new <= 1.1 * err_old, (err_new, err_old)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "base-bias"])
def test_fused_lora_gives_peft_loss_and_adapter_gradients_within_bf16_noise(bias):
    """bf16 base + float32 adapters under autocast (the trainer's setting): the fused node's loss and
    LoRA gradients against peft's, both against a float32 copy of the same model: the fused one is
    at least as close to float32 (one rounding of the [tokens, out] tensor instead of three)."""
    ids = torch.randint(0, 400, (3, 21), generator=torch.Generator().manual_seed(2))
    plain = _lora_model(bias=bias)
    fused = copy.deepcopy(plain)
    assert use_fused_lora(fused) == 2 * len(TARGETS)
    exact = copy.deepcopy(plain).float()
    loss_p, grads_p = _loss_and_grads(plain, ids)
    loss_f, grads_f = _loss_and_grads(fused, ids)
    loss_x, grads_x = _loss_and_grads(exact, ids, autocast=False)
    assert set(grads_f) == set(grads_p) and all("lora_" in n for n in grads_f)
    assert all(p.grad.dtype == torch.float32 for n, p in fused.named_parameters() if "lora_" in n)
    assert abs(float(loss_f - loss_p)) < 2e-2 * abs(float(loss_x))
    for name in grads_x:
        assert _rel(grads_f[name], grads_p[name]) < 0.1, name
    _assert_at_least_as_close_to_float32(grads_f, grads_p, grads_x)


def test_fused_lora_leaves_float32_models_disabled_adapters_and_dropout_to_peft():
    ids = torch.randint(0, 400, (2, 9), generator=torch.Generator().manual_seed(3))
    plain = _lora_model(dtype=torch.float32)
    fused = copy.deepcopy(plain)
    use_fused_lora(fused)
    assert torch.equal(_loss_and_grads(plain, ids, autocast=False)[0], _loss_and_grads(fused, ids, autocast=False)[0])
    bf16 = _lora_model()
    use_fused_lora(bf16)
    with torch.no_grad(), bf16.disable_adapter():  # the reference policy of a KL penalty: the base alone
        without = bf16(input_ids=ids).logits
        base = bf16.get_base_model()
        assert not any(type(m).__name__ == "Linear" and hasattr(m, "lora_A") and m.disable_adapters is False
                       for m in base.modules())
    with torch.no_grad():
        with_adapters = bf16(input_ids=ids).logits
    assert not torch.equal(without, with_adapters)
    assert use_fused_lora(_lora_model(dropout=0.1)) == 0  # dropout: peft's forward
    assert use_fused_lora(_lora_model(lora_bias=True)) == 0  # a bias on lora_B: peft's forward
    assert use_fused_lora(_lora_model(use_dora=True)) == 0


def test_load_policy_routes_a_bf16_lora_policy_through_the_fused_node(tmp_path):
    from rlft.policy import LoraSpec, load_policy
    from rlft.testing.models import save_tiny_model

    save_tiny_model(tmp_path / "m", seed=0)
    policy = load_policy(str(tmp_path / "m"), dtype="bfloat16", lora=LoraSpec(rank=4))
    fused = [m for m in policy.model.modules() if getattr(m.forward, "__func__", None) is _fused_forward]
    assert fused and len(fused) == sum(1 for n, _ in policy.model.named_modules() if n.endswith("lora_A"))


def _clear_siblings(model):
    for m in model.modules():
        if hasattr(m, "_rlft_siblings"):
            del m._rlft_siblings


def test_siblings_share_one_node_and_give_the_separate_nodes_loss_and_gradients(monkeypatch):
    """q, k, v (and gate, up) read one input: one shared node computes them. Loss and every LoRA
    gradient as the separate nodes give them, within bf16 noise, and as close to float32."""
    import rlft.training.lora_linear as lora_linear

    ids = torch.randint(0, 400, (3, 21), generator=torch.Generator().manual_seed(6))
    plain = _lora_model(bias=True)
    shared, separate = copy.deepcopy(plain), copy.deepcopy(plain)
    use_fused_lora(shared)
    use_fused_lora(separate)
    _clear_siblings(separate)
    layers = len(plain.base_model.model.model.layers)
    runs = []
    real = lora_linear._SharedInputLora.apply
    # the nodes computing several projections (o and down, alone, take the one-member node)
    monkeypatch.setattr(lora_linear._SharedInputLora, "apply",
                        lambda *a: (len(a) > 6 and runs.append(len(a) - 2)) or real(*a))
    loss_s, grads_s = _loss_and_grads(shared, ids)
    assert sorted(runs) == sorted([12] * layers + [8] * layers)  # q, k, v and gate, up: 4 tensors each
    runs.clear()
    loss_p, grads_p = _loss_and_grads(separate, ids)
    assert not runs
    loss_x, grads_x = _loss_and_grads(copy.deepcopy(plain).float(), ids, autocast=False)
    assert abs(float(loss_s - loss_p)) < 1e-2 * abs(float(loss_x))
    assert set(grads_s) == set(grads_p)
    for name in grads_p:
        assert _rel(grads_s[name], grads_p[name]) < 0.05, name
    _assert_at_least_as_close_to_float32(grads_s, grads_p, grads_x)


def test_the_shared_node_gives_each_members_node_outputs_and_gradients_with_other_ranks_and_scales():
    """Members of different ranks, scales and output widths, one with a bias, one output unused:
    the shared node's outputs and gradients against each member's own node."""
    from rlft.training.lora_linear import _lora_linear, _SharedInputLora

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 33, 64, generator=gen).bfloat16()
    members = []
    for n_out, rank, scale, bias in [(64, 4, 2.0, True), (32, 8, 0.5, False), (48, 4, 1.0, False)]:
        members.append(dict(w=(torch.randn(n_out, 64, generator=gen) / 8).bfloat16(),
                            bias=torch.randn(n_out, generator=gen).bfloat16().requires_grad_() if bias else None,
                            a=(torch.randn(rank, 64, generator=gen) * 0.1).requires_grad_(),
                            b=(torch.randn(n_out, rank, generator=gen) * 0.1).requires_grad_(), s=scale))
    dys = [torch.randn(2, 33, m["w"].shape[0], generator=gen).bfloat16() for m in members]
    used = [0, 2]  # the second output is not used

    def grads():
        out = [xx.grad]
        for m in members:
            out += [m["a"].grad, m["b"].grad] + ([m["bias"].grad] if m["bias"] is not None else [])
            m["a"].grad = m["b"].grad = None
            if m["bias"] is not None:
                m["bias"].grad = None
        return out

    xx = x.clone().requires_grad_()
    params = [t for m in members for t in (m["w"], m["bias"], m["a"], m["b"])]
    ys = _SharedInputLora.apply(xx, tuple(m["s"] for m in members), *params)
    sum((ys[i].float() * dys[i].float()).sum() for i in used).backward()
    shared = [ys[i].detach() for i in used], grads()
    xx = x.clone().requires_grad_()
    ys = [_lora_linear(xx, m["w"], m["bias"], m["a"], m["b"], m["s"]) for m in members]
    sum((ys[i].float() * dys[i].float()).sum() for i in used).backward()
    separate = [ys[i].detach() for i in used], grads()
    for got, want in zip(shared[0], separate[0]):
        assert torch.equal(got, want)  # the same products, the same roundings
    for got, want in zip(shared[1], separate[1]):
        assert (got is None) == (want is None)
        if got is not None:
            assert _rel(got.float(), want.float()) < 1e-2


def test_a_sibling_called_on_another_input_or_first_takes_its_own_node():
    from rlft.training.lora_linear import _lora_linear

    model = _lora_model()
    use_fused_lora(model)
    attn = model.base_model.model.model.layers[0].self_attn
    gen = torch.Generator().manual_seed(8)
    x, other = (torch.randn(1, 5, 64, generator=gen).bfloat16() for _ in range(2))

    def own(module, inp):
        return _lora_linear(inp, module.base_layer.weight, module.base_layer.bias,
                            module.lora_A["default"].weight, module.lora_B["default"].weight,
                            float(module.scaling["default"]))

    with torch.no_grad():
        assert torch.equal(attn.k_proj(x), own(attn.k_proj, x))  # first, before q: its own node
        q = attn.q_proj(x)  # computes q, k and v together
        assert torch.equal(attn.k_proj(other), own(attn.k_proj, other))  # another input: not the kept one
        assert torch.equal(attn.v_proj(x), own(attn.v_proj, x))  # the kept v for x
        assert torch.equal(attn.v_proj(x), own(attn.v_proj, x))  # taken once: now its own node
        assert torch.equal(q, own(attn.q_proj, x))

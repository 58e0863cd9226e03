"""Shared-prefix training (rlft.training.prefix) gives the plain update's loss and gradients.

Each case runs ``policy_update`` twice on the same batch of the tiny float32 model, with
``shared_prefix = "false"`` (one left-padded row per rollout) and ``"true"`` (one packed row per
group), and compares what the update computed: the stored metrics, the loss, and every trainable
parameter's gradient (captured by an optimizer whose step records them). Tolerance: rtol 1e-5 and
atol 1e-6 on gradients whose entries are ~1e-3 to 1e-1 (float32 with a different summation
order in attention and in the shared prefix's accumulated gradient; measured differences: at
most 7e-8 absolute on the multi-turn case). LoRA adapters start from random (non-zero) values,
so the adapters and the base both shape the logits.
"""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from rlft.policy import LoraSpec, load_policy  # noqa: E402
from rlft.training import prefix  # noqa: E402
from rlft.training.grpo import LossConfig  # noqa: E402
from rlft.training.update import UpdateConfig, policy_update  # noqa: E402
from rlft.types import Group, Rollout  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6


class _GradRecorder(torch.optim.Optimizer):
    """An optimizer that changes nothing and keeps a copy of each gradient its step sees."""

    def __init__(self, params):
        super().__init__(params, {})
        self.grads: list[torch.Tensor] = []

    def step(self, closure=None):
        self.grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                      for g in self.param_groups for p in g["params"]]


@pytest.fixture(scope="module")
def policies(tiny_model_dir):
    lora = load_policy(tiny_model_dir, dtype="float32", lora=LoraSpec(rank=4))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero adapters: the LoRA gradient of A is 0 while B is 0
        for p in lora.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return {"lora": lora, "full": load_policy(tiny_model_dir, dtype="float32")}


def _completion(rng: random.Random, vocab: int, n: int, *, tool_turns: int = 0, head: list[int] = ()):
    """(ids, mask, logprobs): sampled tokens (mask 1), with ``tool_turns`` tool results (mask 0)
    between assistant turns, as a multi-turn rollout's completion holds them."""
    ids, mask = list(head), [1] * len(head)
    for turn in range(tool_turns + 1):
        k = rng.randint(1, n)
        ids += [rng.randrange(3, vocab) for _ in range(k)]
        mask += [1] * k
        if turn < tool_turns:
            k = rng.randint(2, 6)
            ids += [rng.randrange(3, vocab) for _ in range(k)]
            mask += [0] * k
    logprobs = [-rng.random() * 3 if m else 0.0 for m in mask]
    return ids, mask, logprobs


def _groups(tokenizer, *, n_groups=2, G=4, max_new=9, tools=False, tool_turns=0, same_head=False, seed=0):
    rng = random.Random(seed)
    vocab = len(tokenizer)
    schema = {"type": "function", "function": {"name": "max_of", "description": "The largest number.",
                                               "parameters": {"type": "object", "properties": {
                                                   "numbers": {"type": "array", "items": {"type": "number"}}}}}}
    groups = []
    for p in range(n_groups):
        messages = [{"role": "user", "content": f"Which is the largest of {rng.sample(range(100), 4)}? ({p})"}]
        prompt = tokenizer.encode(tokenizer.apply_chat_template(messages, tools=[schema] if tools else None,
                                                                add_generation_prompt=True, tokenize=False))
        head = tokenizer.encode("<tool_call>") if same_head else []
        rollouts = []
        for i in range(G):
            ids, mask, lp = _completion(rng, vocab, max_new, tool_turns=tool_turns, head=head)
            rollouts.append(Rollout(example={}, prompt_ids=prompt, completion_ids=ids, mask=mask, logprobs=lp,
                                    advantage=rng.choice([-1.0, -0.5, 0.5, 1.0]), group_index=i))
        groups.append(Group(example={}, rollouts=rollouts, example_id=p))
    return groups


def _update(policy, groups, shared: str, **kw):
    opt = _GradRecorder(policy.trainable_parameters())
    cfg = UpdateConfig(loss=LossConfig(**kw.pop("loss", {})), max_grad_norm=0.0, shared_prefix=shared, **kw)
    stats = policy_update(policy, groups, cfg, opt)
    return stats, opt.grads


def _assert_same(policy, groups, **kw):
    plain, g_plain = _update(policy, groups, "false", **kw)
    shared, g_shared = _update(policy, groups, "true", **kw)
    for k in ("loss/policy", "loss/kl", "policy/entropy", "policy/clip_ratio", "sync/logprob_diff_mean",
              "sync/logprob_diff_max", "batch/trained_sequences"):
        assert shared[k] == pytest.approx(plain[k], rel=RTOL, abs=ATOL), k
    assert len(g_plain) == len(g_shared) and any(float(g.abs().max()) > 0 for g in g_plain)
    for a, b in zip(g_plain, g_shared):
        torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL)
    assert shared["batch/forward_tokens"] < plain["batch/forward_tokens"]
    return plain, shared


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_single_turn_groups_give_the_plain_loss_and_gradients(policies, one_thread, kind):
    policy = policies[kind]
    _assert_same(policy, _groups(policy.tokenizer))


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_tool_schemas_in_the_prompt_and_multi_turn_rollouts_give_the_plain_loss_and_gradients(
        policies, one_thread, kind):
    # only the prompt (with the tool schemas) is shared: the tool results after the first turn are each rollout's
    policy = policies[kind]
    _assert_same(policy, _groups(policy.tokenizer, tools=True, tool_turns=2, seed=1))


def test_a_shared_prefix_reaching_into_the_completions_gives_the_plain_loss_and_gradients(policies, one_thread):
    # every completion starts with the same tokens: the common prefix goes past the prompt
    policy = policies["lora"]
    groups = _groups(policy.tokenizer, tools=True, tool_turns=1, same_head=True, seed=2)
    seqs = [r.prompt_ids + r.completion_ids for r in groups[0].rollouts]
    assert prefix.common_prefix(seqs) > len(groups[0].rollouts[0].prompt_ids)
    _assert_same(policy, groups)


def test_groups_split_over_micro_batches_give_the_plain_loss_and_gradients(policies, one_thread):
    # a budget below one group's packed row: each group becomes several rows, each repeating the prompt
    policy = policies["lora"]
    groups = _groups(policy.tokenizer, n_groups=3, G=6, max_new=12, tool_turns=1, seed=3)
    P = len(groups[0].rollouts[0].prompt_ids)
    budget = P + 30
    seqs = [r.prompt_ids + r.completion_ids for g in groups for r in g.rollouts]
    rows = prefix.plan_rows(seqs, [i // 6 for i in range(len(seqs))], budget)
    assert len(rows) > 3 and all(r.length <= budget or len(r.members) == 1 for r in rows)
    assert len(prefix.micro_batches(rows, budget)) > 1
    _assert_same(policy, groups, micro_batch_tokens=budget)


def test_kl_to_the_reference_and_several_epochs_give_the_plain_loss_and_gradients(policies, one_thread):
    # the reference forward (adapters off) takes the packed rows too; epoch 2's ratios use epoch 1's logprobs
    policy = policies["lora"]
    _assert_same(policy, _groups(policy.tokenizer, tool_turns=1, seed=4),
                 loss={"beta": 0.1, "loss_agg": "seq_mean_token_mean"}, epochs=2)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_sdpa_and_eager_attention_give_the_plain_loss_and_gradients(tiny_model_dir, one_thread, attn):
    # rlft's CPU attention is the default; sdpa takes the boolean mask, eager an additive one
    policy = load_policy(tiny_model_dir, dtype="float32")
    policy.model.set_attn_implementation(attn)
    assert prefix.enabled("auto", policy.base_model.config)
    _assert_same(policy, _groups(policy.tokenizer, tool_turns=1, seed=5))


def test_the_forwarded_tokens_drop_to_one_prompt_per_group(policies, one_thread):
    policy = policies["lora"]
    groups = _groups(policy.tokenizer, n_groups=1, G=8, tools=True)
    rollouts = groups[0].rollouts
    plain, shared = _assert_same(policy, groups, micro_batch_tokens=100_000)
    P = len(rollouts[0].prompt_ids)
    S = prefix.common_prefix([r.prompt_ids + r.completion_ids for r in rollouts])
    longest = max(P + len(r.completion_ids) for r in rollouts)
    assert plain["batch/forward_tokens"] == len(rollouts) * longest  # one padded row per rollout
    # one row: the shared part once, then each rollout's own tokens after it (and the last shared token)
    assert shared["batch/forward_tokens"] == (S - 1) + sum(P + len(r.completion_ids) - S + 1 for r in rollouts)
    assert shared["batch/forward_tokens"] < 0.4 * plain["batch/forward_tokens"]


def test_auto_packs_llama_on_masked_attention_and_true_refuses_flash_attention(policies):
    config = policies["lora"].base_model.config
    assert config.model_type == "llama" and prefix.enabled("auto", config) and not prefix.enabled("false", config)
    flash = type(config).from_dict(config.to_dict())
    flash._attn_implementation = "flash_attention_2"
    assert not prefix.enabled("auto", flash)
    with pytest.raises(prefix.SharedPrefixError, match="shared_prefix = true needs an attention"):
        prefix.enabled("true", flash)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_the_other_auto_model_types_give_the_plain_loss_and_gradients(tmp_path, tiny_tokenizer, one_thread, model_type):
    # EXACT_MODEL_TYPES beyond Llama: a tiny random model of each, through load_policy as a run loads it
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  tie_word_embeddings=False, pad_token_id=tiny_tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    policy = load_policy(str(tmp_path), dtype="float32")
    assert policy.base_model.config.model_type == model_type
    assert prefix.enabled("auto", policy.base_model.config)
    _assert_same(policy, _groups(policy.tokenizer, tool_turns=1, seed=6))


def test_the_config_key_takes_a_toml_bool_and_refuses_other_values():
    from rlft.config import ConfigError, load_config

    assert load_config(overrides={}).resolved().shared_prefix == "auto"
    assert load_config(overrides={"shared_prefix": True}).resolved().shared_prefix == "true"
    assert load_config(overrides={"shared_prefix": "false"}).resolved().shared_prefix == "false"
    with pytest.raises(ConfigError, match="shared_prefix = 'yes' is not one of: auto, true, false"):
        load_config(overrides={"shared_prefix": "yes"}).resolved()

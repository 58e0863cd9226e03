"""Demonstration-guided groups (``guidance = "demonstrate"``, LUFFY): an unsolved group gets its
row's played demonstration as a member, and the update trains its tokens with the shaped,
unclipped off-policy term.

The tests check the pieces (which groups get a demonstration, its tokens, the loss term), that
one update on a guided group moves the policy towards the demonstration and away from the failed
samples, and that a guided run stores its demonstrations from train rows only. They do not claim
that guidance alone gets the tiny model out of its cold start: it did not, in 12 steps (see
docs/sft.md: the shaped gradient of a token the policy almost never samples is tiny).
"""

from __future__ import annotations

import asyncio

import pytest

from rlft.env import Environment

torch = pytest.importorskip("torch")

CALL = '<tool_call>{"name": "lookup", "arguments": {}}</tool_call>'  # as the tiny template renders the call


def lookup(rollout) -> str:
    """Look up the largest number of the question."""
    return str(rollout.example["ground_truth"])


def answered_with_tool(rollout) -> float:
    return float(bool(rollout.tool_calls) and rollout.completion.strip() == rollout.example["ground_truth"])


def demonstrate(example):
    if example["ground_truth"] == "0":
        return None  # no demonstration for this row
    return [{"tool_calls": [{"function": {"name": "lookup", "arguments": {}}}]}, example["ground_truth"]]


def lookup_env(**kw) -> Environment:
    opts = dict(system_prompt="Reply with the largest number.", tools=[lookup], rewards=[answered_with_tool],
                max_turns=2, max_tool_calls=1, max_tokens=48, demonstrate=demonstrate, name="tiny-lookup")
    return Environment(**{**opts, **kw})


def test_an_unsolved_group_gets_its_played_demonstration_as_the_tokens_a_rollout_would_hold(
        tiny_renderer, scripted_sampler):
    from rlft.training.guidance import guide_groups

    env = lookup_env()
    rows = [{"prompt": "max of 3 9 1", "ground_truth": "9"}, {"prompt": "max of 2 4", "ground_truth": "4"},
            {"prompt": "max of 0 0", "ground_truth": "0"}]
    wrong = asyncio.run(env.run_groups([rows[0], rows[2]], scripted_sampler(["7"]), 3, example_ids=[5, 7]))
    solved = asyncio.run(env.run_groups([rows[1]], scripted_sampler([CALL, "4"]), 3, example_ids=[6]))
    groups = [wrong[0], solved[0], wrong[1]]
    before = [list(g.rollouts) for g in groups]
    assert [r.reward for g in groups for r in g.rollouts] == [0, 0, 0, 1, 1, 1, 0, 0, 0]

    report = asyncio.run(guide_groups(env, groups, tiny_renderer, success_threshold=0.0, policy_version=3))

    assert report.groups == 1
    assert [p for p in report.problems if "example 7" in p and "None" in p]  # its row has no demonstration
    assert groups[1].rollouts == before[1] and groups[2].rollouts == before[2]  # solved / undemonstrated: untouched
    kept, demo = groups[0].rollouts[:2], groups[0].rollouts[2]
    assert kept == before[0][:2]
    assert demo.demonstration and demo.group_index == 2 and demo.example_id == 5 and demo.policy_version == 3
    assert demo.reward == 1.0 and demo.tool_calls == 1 and demo.metrics["demonstration"] == 1.0
    # token for token what the policy would hold had it sampled the demonstration itself
    ref = asyncio.run(env.run_groups([rows[0]], scripted_sampler([CALL, "9"]), 1, example_ids=[5]))[0].rollouts[0]
    assert demo.prompt_ids == ref.prompt_ids == kept[0].prompt_ids
    assert demo.completion_ids == ref.completion_ids and demo.mask == ref.mask
    assert demo.logprobs == [0.0] * len(demo.completion_ids)  # nothing was sampled


def test_a_demonstration_that_does_not_succeed_is_not_put_into_a_group(tiny_renderer, scripted_sampler):
    from rlft.training.guidance import guide_groups

    env = lookup_env(demonstrate=lambda ex: "9")  # answers without the tool: reward 0
    groups = asyncio.run(env.run_groups([{"prompt": "max of 9", "ground_truth": "9"}], scripted_sampler(["1"]), 2))
    report = asyncio.run(guide_groups(env, groups, tiny_renderer, success_threshold=0.0, policy_version=0))
    assert report.groups == 0 and not any(r.demonstration for r in groups[0].rollouts)
    assert "not above success_threshold" in report.problems[0]


def test_a_demonstration_row_takes_the_shaped_unclipped_term_and_sampled_rows_keep_theirs():
    from rlft.training.grpo import policy_loss

    g = torch.Generator().manual_seed(0)
    logp = (-3 * torch.rand(3, 5, generator=g, dtype=torch.float64)).requires_grad_()
    old = logp.detach() - 1.0  # ratio e for the sampled rows: clipped where A > 0
    old[2] = 50.0  # a demonstration's "old" logprobs mean nothing: they must not matter
    adv = torch.tensor([1.0, -0.5, 0.75], dtype=torch.float64)
    mask = torch.ones(3, 5)
    off = torch.tensor([False, False, True])
    kw = dict(eps_low=0.2, eps_high=0.28, normalizer=15.0)
    loss, stats = policy_loss(logp, old, adv, mask, off_policy_B=off, shaping_gamma=0.1, **kw)
    (grad,) = torch.autograd.grad(loss, logp)

    p = logp.detach()[2].exp()
    # d/dlogp of -A * p / (p + gamma) = -A * gamma * p / (p + gamma)^2, over the batch's normalizer
    torch.testing.assert_close(grad[2], -0.75 * 0.1 * p / (p + 0.1) ** 2 / 15)
    plain, _ = policy_loss(logp, old, adv, mask * torch.tensor([[1.0], [1.0], [0.0]]), **kw)
    (plain_grad,) = torch.autograd.grad(plain, logp)
    torch.testing.assert_close(grad[:2], plain_grad[:2])  # the sampled rows' clipped terms, unchanged
    assert float(stats["ratio_max"]) == pytest.approx(torch.e)  # the demonstration's ratio is not a ratio
    assert float(stats["clip_ratio"]) == pytest.approx(0.5)  # row 0's 5 tokens of the 10 sampled ones


def test_the_shaped_gradient_is_largest_for_unlikely_tokens_of_a_demonstration():
    from rlft.training.grpo import shaped_objective

    logp = torch.log(torch.tensor([0.01, 0.1, 0.5, 0.99], dtype=torch.float64)).requires_grad_()
    (grad,) = torch.autograd.grad(shaped_objective(logp, 0.1).sum(), logp)
    # per unit of log-probability: gamma * p / (p + gamma)^2, peaking at p = gamma
    assert grad.argmax() == 1 and grad[3] < grad[0] * 1.2
    torch.testing.assert_close(grad, 0.1 * logp.detach().exp() / (logp.detach().exp() + 0.1) ** 2)


def test_guidance_without_a_demonstrate_function_is_a_config_error_before_step_1(tmp_path, tiny_model_dir):
    from rlft.config import ConfigError
    from rlft.training.loop import train

    env = lookup_env(demonstrate=None)
    with pytest.raises(ConfigError, match=r"guidance = \"demonstrate\".*no demonstrate function"):
        train(dict(model=tiny_model_dir, runs_dir=str(tmp_path), guidance="demonstrate", steps=1, validate=False,
                   batch_size=2, group_size=2, eval_fraction=0.0, progress=False),
              environment=env, dataset=[{"prompt": f"max of {i}", "ground_truth": str(i)} for i in range(4)])


def test_one_update_on_a_guided_group_raises_the_demonstration_and_lowers_the_failed_samples(tiny_model_dir,
                                                                                           monkeypatch):
    from rlft.env import Sampler
    from rlft.policy import load_policy
    from rlft.renderer import Renderer
    from rlft.testing import ScriptedPolicy
    from rlft.training.grpo import LossConfig
    from rlft.training.guidance import guide_groups
    from rlft.training.update import UpdateConfig, policy_update, select_groups

    torch.manual_seed(0)
    policy = load_policy(tiny_model_dir, dtype="float32", lora=None)
    renderer = Renderer(policy.tokenizer)
    env = lookup_env()
    sampler = Sampler(ScriptedPolicy(renderer, ["7"]), renderer)
    groups = asyncio.run(env.run_groups([{"prompt": "max of 3 9 1", "ground_truth": "9"}], sampler, 8))
    asyncio.run(guide_groups(env, groups, renderer, success_threshold=0.0, policy_version=0))
    select_groups(groups, baseline="mean", std_normalize=False, drop_tied=False)
    demo, failed = groups[0].rollouts[-1], groups[0].rollouts[0]
    assert demo.demonstration and demo.advantage == pytest.approx(0.875) and failed.advantage == pytest.approx(-0.125)

    def mean_logp(ro) -> float:
        ids = torch.tensor([ro.prompt_ids + ro.completion_ids])
        with torch.no_grad():
            logp = torch.log_softmax(policy.model(input_ids=ids).logits[0, :-1].float(), -1)
        lp = logp.gather(-1, ids[0, 1:, None])[:, 0][len(ro.prompt_ids) - 1:]
        m = torch.tensor(ro.mask, dtype=torch.bool)
        return float(lp[m].mean())

    from rlft.training import grpo

    seen = []  # the rows the update marks off-policy, and their advantages
    loss_fn = grpo.policy_loss

    def spy(logp, old, adv, mask, **kw):
        off = kw.get("off_policy_B")
        seen.append((off.tolist() if off is not None else [False] * len(adv), adv.tolist()))
        return loss_fn(logp, old, adv, mask, **kw)

    monkeypatch.setattr(grpo, "policy_loss", spy)
    before = mean_logp(demo), mean_logp(failed)
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-3)
    stats = policy_update(policy, groups, UpdateConfig(loss=LossConfig(), max_grad_norm=0.0), opt)
    after = mean_logp(demo), mean_logp(failed)
    assert stats["batch/trained_sequences"] == 8
    marked = [a for offs, advs in seen for o, a in zip(offs, advs) if o]
    assert marked == [pytest.approx(0.875)]  # exactly the demonstration takes the off-policy term
    assert after[0] > before[0] + 0.01, (before, after)  # the demonstration's tokens were learned
    assert after[1] < before[1], (before, after)  # and the failed samples pushed down


def test_a_guided_run_stores_its_demonstrations_from_train_rows_only(tmp_path, tiny_model_dir, one_thread):
    from rlft.store import RunStore
    from rlft.training.loop import train

    rows = [{"prompt": f"max of {a} {b}", "ground_truth": str(max(a, b)), "split": "eval" if a == 9 else "train"}
            for a in range(10) for b in range(3)]
    rid = train(dict(model=tiny_model_dir, dtype="float32", lora=False, runs_dir=str(tmp_path), steps=2, batch_size=4,
                     group_size=4, eval_k=1, eval_max_examples=2, checkpoint_every=0, progress=False, validate=False,
                     guidance="demonstrate"), environment=lookup_env(), dataset=rows)
    store = RunStore(tmp_path)
    guided = store.metrics(rid, ["batch/guided_groups"])["batch/guided_groups"]
    assert [n for _, n in guided] == [4.0, 4.0]  # the random tiny model solves nothing: every group is guided
    demos = [r for r in store.rollouts(rid, split=None, limit=1000) if (r.get("metrics") or {}).get("demonstration")]
    assert len(demos) == 8 and all(r["split"] == "train" and r["group_index"] == 3 and r["reward"] == 1.0
                                   for r in demos)
    assert not any(r["example"]["prompt"].startswith("max of 9") for r in demos)  # held-out rows never guide
    assert store.get_run(rid)["status"] == "completed"

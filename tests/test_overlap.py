"""Overlap (``overlap = true``): step n+1's rollouts are sampled while step n trains.

With overlap on, the tiny model trains end to end; the first step's rollouts are on-policy and
every later step's were sampled by the weights one optimizer step older (``policy_version`` =
step - 1 in 0-based loop steps, so the run store's step s >= 2 holds version s - 2), which
``sync/policy_lag`` reports as 1. Off: lag 0 everywhere. The engine samples from its own copy of
the weights, refreshed after each step (the sync probe matches the trainer to fp32 noise). In the
update, a rollout from an older version takes the sampler's logprobs as the old policy's.
"""

import textwrap

import pytest

from rlft.store import RunStore

ENV = textwrap.dedent('''
    from rlft.env import Environment

    def variety(ro):
        return len(set(ro.completion)) / 16

    env = Environment(rewards=[variety], max_tokens=12)
    dataset = [{"prompt": f"write something {i}"} for i in range(40)]
''')
STEPS = 3
CFG = dict(steps=STEPS, batch_size=2, group_size=4, dtype="float32", eval_size=2, eval_k=2, eval_every=2,
           validate=False, progress=False, learning_rate=1e-3, seed=1)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("overlap")
    (d / "env.py").write_text(ENV)
    return d


def _run(d, model: str, overlap: bool):
    from rlft.training.loop import train

    runs = d / f"runs-{overlap}"
    run_id = train(**CFG, env=str(d / "env.py"), model=model, runs_dir=str(runs), overlap=overlap)
    store = RunStore(runs, readonly=True)
    assert store.get_run(run_id)["status"] == "completed" and store.get_run(run_id)["step"] == STEPS
    versions = {s: {r["policy_version"] for r in store.rollouts(run_id, step=s, limit=100)} for s in range(1, STEPS + 1)}
    metrics = store.metrics(run_id)
    return versions, metrics


def test_overlap_samples_one_version_behind_and_trains(workdir, tiny_model_dir):
    versions, metrics = _run(workdir, tiny_model_dir, overlap=True)
    # store step s = loop step s-1; loop step k > 0 was sampled while step k-1 trained: version k-1
    assert versions == {1: {0}, 2: {0}, 3: {1}}
    assert dict(metrics["sync/policy_lag"]) == {1: 0.0, 2: 1.0, 3: 1.0}
    assert dict(metrics["sync/policy_lag_max"]) == {1: 0.0, 2: 1.0, 3: 1.0}
    # the engine's snapshot got every new version (checked by the sync probe: fp32 copy, noise only)
    assert max(v for _, v in metrics["sync/probe_logprob_diff"]) < 1e-4
    assert all(v > 0 for _, v in metrics["optim/grad_norm"])
    assert {s for s, _ in metrics["eval/reward/mean"]} == {0, 2, 3}  # eval after step 2 saw the step-2 weights
    # time/generate is the sampling's own clock, not the (often zero) wait for a finished task:
    # step 1 is sampled alone, later steps beside the update; the rate stays of one order
    tps = dict(metrics["throughput/tokens_per_s"])
    assert all(tps[s] < 20 * tps[1] for s in (2, 3)), tps


def test_without_overlap_rollouts_are_on_policy(workdir, tiny_model_dir):
    versions, metrics = _run(workdir, tiny_model_dir, overlap=False)
    assert versions == {1: {0}, 2: {1}, 3: {2}}
    assert dict(metrics["sync/policy_lag"]) == {1: 0.0, 2: 0.0, 3: 0.0}


def test_stale_rollouts_use_the_samplers_logprobs_in_the_ratio(tiny_model_dir):
    import torch

    from rlft.config import load_config
    from rlft.policy import load_policy
    from rlft.training.run import update_config
    from rlft.training.sync import trainer_logprobs
    from rlft.training.update import policy_update
    from rlft.types import Group, Rollout

    policy = load_policy(tiny_model_dir, dtype="float32")
    prompt = policy.tokenizer.encode("count to ten")
    tokens = policy.tokenizer.encode(" one two three")
    lp = trainer_logprobs(policy, prompt, tokens)
    cfg = load_config(overrides={"learning_rate": 0.0, "max_grad_norm": 0.0, "dtype": "float32"}).resolved()

    def update(policy_version):
        # the sampler saw these tokens as less likely (by 0.5 nats) than the trainer does: ratio e^0.5
        rollouts = [Rollout(example={}, prompt_ids=prompt, completion_ids=tokens, logprobs=[x - 0.5 for x in lp],
                            mask=[1] * len(tokens), advantage=a, policy_version=0, group_index=i)
                    for i, a in enumerate((1.0, -1.0))]
        opt = torch.optim.AdamW(policy.trainable_parameters(), lr=0.0)
        return policy_update(policy, [Group(example={}, rollouts=rollouts)], update_config(cfg), opt,
                             policy_version=policy_version)

    on_policy = update(policy_version=0)  # version 0 rollouts at version 0: ratio vs the trainer's own pass = 1
    assert on_policy["policy/clip_ratio"] == 0.0 and on_policy["loss/policy"] == pytest.approx(0.0, abs=1e-6)
    stale = update(policy_version=1)  # sampled one version ago: ratio = trainer / sampler = e^0.5
    r = float(torch.tensor(0.5).exp())
    assert stale["policy/clip_ratio"] == pytest.approx(0.5)  # A > 0 tokens clipped at 1 + eps_high
    # the token mean of -1.28 (A = 1, clipped) and +e^0.5 (A = -1)
    assert stale["loss/policy"] == pytest.approx((-(1 + cfg.eps_high) + r) / 2, rel=1e-4)


def test_the_probes_batched_trainer_logprobs_equal_one_forward_per_completion(tiny_model_dir):
    from rlft.policy import load_policy
    from rlft.training.sync import trainer_logprobs_many

    policy = load_policy(tiny_model_dir, dtype="float32")
    prompt = policy.tokenizer.encode("count to ten")
    completions = [policy.tokenizer.encode(t) for t in (" one two three four", " one", " uno dos tres")]
    many = trainer_logprobs_many(policy, prompt, completions)
    assert [len(x) for x in many] == [len(c) for c in completions]  # the end padding is not scored
    for got, tokens in zip(many, completions):
        alone = trainer_logprobs_many(policy, prompt, [tokens])[0]
        assert got == pytest.approx(alone, abs=1e-5)

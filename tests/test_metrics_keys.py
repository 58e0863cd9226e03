"""``rlft.metrics.KEYS`` is the true list of what the trainer stores, checked against real runs.

A seeded 2-step run of the random tiny model, with evals: every stored metric key is one of KEYS or
matches one of PATTERNS, and every KEYS entry not marked OPTIONAL is stored. The run (a full
finetune) uses overlap, whose engine samples from its own copy of the weights, so the weight-sync
probe's keys are stored too; the same run without overlap (the HF engine then runs the trainer's
own module: nothing to probe) shows that they are optional for the reason OPTIONAL gives. ``rollout/worker`` needs Ray actors: tests/test_ray_workers.py.
"""

import textwrap

from rlft import metrics
from rlft.store import RunStore

ENV = textwrap.dedent('''
    from rlft.env import Environment

    def variety(ro):
        return len(set(ro.completion)) / 16

    env = Environment(rewards=[variety], max_tokens=8)
    dataset = [{"prompt": f"write something {i}"} for i in range(20)]
''')
CFG = dict(steps=2, batch_size=2, group_size=2, dtype="float32", lora=False, eval_size=2, eval_k=2,
           validate=False, progress=False, seed=1, checkpoint_every=0)
PROBE = {"sync/probe_logprob_diff", "sync/probe_logprob_diff_max"}


def _stored_keys(tmp_path, model: str, **opts) -> set[str]:
    from rlft.training.loop import train

    (tmp_path / "env.py").write_text(ENV)
    runs = tmp_path / "runs"
    run_id = train(**CFG, **opts, env=str(tmp_path / "env.py"), model=model, runs_dir=str(runs))
    with RunStore(runs, readonly=True) as store:
        assert store.get_run(run_id)["status"] == "completed"
        return set(store.metric_keys(run_id))


def test_every_stored_key_is_listed_and_every_listed_key_is_stored(tmp_path, tiny_model_dir, one_thread):
    keys = _stored_keys(tmp_path, tiny_model_dir, overlap=True)
    assert not [k for k in keys if not metrics.is_known(k)], "stored but neither in KEYS nor PATTERNS"
    assert sorted(set(metrics.KEYS) - set(metrics.OPTIONAL) - keys) == [], "in KEYS but not stored"
    assert keys >= PROBE  # overlap: the engine's own copy is probed after each push
    # the dynamic families: this environment's one reward component and its terminations
    dynamic = {k.removeprefix("eval/") for k in keys - set(metrics.KEYS)}
    assert "reward/variety" in dynamic and all(k == "reward/variety" or k.startswith("termination/") for k in dynamic)


def test_probe_keys_are_optional_as_an_engine_sharing_the_trainers_module_is_not_probed(tmp_path, tiny_model_dir,
                                                                                         one_thread):
    keys = _stored_keys(tmp_path, tiny_model_dir, overlap=False)
    assert set(metrics.OPTIONAL) >= PROBE and not PROBE & keys
    assert set(metrics.KEYS) - set(metrics.OPTIONAL) <= keys


def test_keys_are_unique_and_patterns_do_not_swallow_unknown_names():
    assert len(metrics.KEYS) == len(set(metrics.KEYS))
    assert set(metrics.OPTIONAL) <= set(metrics.KEYS)
    assert metrics.is_known("reward/exact_match") and metrics.is_known("eval/termination/length")
    assert metrics.is_known("judge/requests_total") and metrics.is_known("usage/cost")
    assert not metrics.is_known("time/score") and not metrics.is_known("reward/a/b")
    assert not metrics.is_known("eval/eval/reward/mean")

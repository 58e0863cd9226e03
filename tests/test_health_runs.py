"""Each training-health diagnosis fires on a real run that has its problem, and none fires on a
run that learns.

Real runs of the SFT-pretrained tiny models (``rlft.testing.pretrained``: the "max of a list"
task, and its variant that calls a ``max_of`` tool), a few seconds each, each with a deliberately
bad environment or config: a reward hackable by length, a task with no signal, a learning rate
that collapses entropy, a tool that starts timing out, a tool the model never calls, a success
threshold nothing reaches (reward rises, pass@k cannot), and data half of which cannot be solved
(learning rises, then stalls). The healthy run is tests/test_learning.py's recipe (20 steps, the
same seed): the "recipe that learns" here, since the SmolLM2 demo takes minutes per run.
``logprob_mismatch`` is reproduced with an engine that acknowledges weight pushes without loading
them (the tiny model's bf16 copy alone differs from the fp32 trainer by <0.01 nats on this CPU,
too little to trigger it).
"""

from __future__ import annotations

import time

import pytest

torch = pytest.importorskip("torch")

from rlft.env import Environment  # noqa: E402
from rlft.health.source import error_summary, run_findings  # noqa: E402
from rlft.rewards import Reward  # noqa: E402
from rlft.store import RunStore  # noqa: E402
from rlft.testing.pretrained import build_pretrained_tiny, max_of, task_environment  # noqa: E402
from rlft.types import Termination  # noqa: E402

BASE = dict(seed=0, lora=False, dtype="float32", batch_size=4, group_size=4, max_seq_len=128, checkpoint_every=0,
            keep_checkpoints=1, progress=False, validate=False, eval_size=16, eval_k=2)
SYSTEM = "Reply with the largest number."


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread per module


@pytest.fixture(scope="module")
def rows():
    return task_environment("max", n=512)[1]


def _run(tmp_path, env, rows, model=None, **kw):
    from rlft.training.loop import train

    runs = tmp_path / "runs"
    run_id = train(environment=env, dataset=rows, model=model or build_pretrained_tiny(task="max", seed=0),
                   runs_dir=str(runs), **(BASE | kw))
    store = RunStore(runs, readonly=True)
    return store, run_id, {f.name: f for f in run_findings(store, run_id)}


def test_silent_on_the_recipe_that_learns(tmp_path):
    env, rows = task_environment("max", n=512)
    store, run_id, found = _run(tmp_path, env, rows, steps=20, batch_size=8, group_size=8, learning_rate=1e-3,
                                eval_size=64, eval_every=10)
    evals = {e["step"]: e["metrics"]["reward/mean"] for e in store.evals(run_id)}
    assert evals[20] - evals[0] > 0.2, evals  # it did learn
    assert found == {}, [f.line() for f in found.values()]
    # nothing was announced during training either
    assert not [r for r in store.logs(run_id) if r["source"] == "health"]


def test_no_signal_and_trained_on_nothing_on_a_constant_reward(tmp_path, rows):
    def nothing(ro):
        return 0.0

    env = Environment(system_prompt=SYSTEM, rewards=[nothing], max_tokens=4, max_turns=1)
    store, run_id, found = _run(tmp_path, env, rows, steps=6, learning_rate=1e-3)
    assert {"no_signal", "trained_on_nothing"} <= set(found)
    assert found["no_signal"].details["tied_share"] == 1.0
    assert found["trained_on_nothing"].details["share"] == 1.0
    # the trainer said so when the finding first appeared, once
    lines = [r["message"] for r in store.logs(run_id) if r["source"] == "health"]
    assert sum("no learning signal" in m for m in lines) == 1


def test_reward_hacking_and_truncation_on_a_length_hackable_reward(tmp_path, rows):
    def verbose(ro):  # "effort": longer answers score more, up to the limit
        return min(ro.num_sampled_tokens / 8, 1.0)

    def finished(ro):
        return float(ro.termination == Termination.FINISHED)

    env = Environment(system_prompt=SYSTEM, rewards=[verbose, Reward(finished, weight=0.3)], max_tokens=8, max_turns=1)
    _, _, found = _run(tmp_path, env, rows, steps=10, learning_rate=5e-3, temperature=2.0)
    assert found["reward_hacking"].details == {"rising": "reward/verbose", "falling": "reward/finished"}
    assert found["truncation"].chart == "response/truncated_ratio"


def test_entropy_collapse_at_a_learning_rate_too_high(tmp_path, rows):
    env, _ = task_environment("max")
    # 16 steps: on the tiny model as rebuilt on 2026-12-06 the entropy had not yet collapsed
    # after 12 (the earlier setting), after 16 it had
    _, _, found = _run(tmp_path, env, rows, steps=16, learning_rate=5e-3, eval_size=0)
    f = found["entropy_collapse"]
    assert f.details["late"] < 0.4 * f.details["early"] and "learning rate 0.005" in f.summary


def test_errors_rise_when_a_tool_starts_timing_out(tmp_path, rows):
    calls = {"n": 0}

    def slow_max_of(numbers: list[int]) -> int:
        """Return the largest of the numbers."""
        calls["n"] += 1
        if calls["n"] > 40:  # from about step 3 on, the tool hangs past its timeout
            time.sleep(1.0)
        return max(numbers)

    slow_max_of.__name__ = "max_of"  # the name the tool-calling tiny model was trained on
    env, _ = task_environment("max", with_tools=True, tools=[slow_max_of], tool_timeout=0.3)
    store, run_id, found = _run(tmp_path, env, rows, model=build_pretrained_tiny(task="max", seed=0, tools=True),
                                steps=8, learning_rate=1e-6, max_seq_len=512, eval_size=0)
    f = found["errors"]
    assert f.details["rollouts_with_errors"] > 0 and f.details["top_error"]
    timeouts = [e for e in error_summary(store, run_id)[0] if e["where"] == "tool:max_of" and e["message"] == "timeout"]
    assert timeouts and timeouts[0]["count"] >= 5


def test_tools_never_used_while_reward_rises_on_partial_credit(tmp_path, rows):
    env, _ = task_environment("max", tools=[max_of], max_turns=2)  # offers a tool the model never learned to call
    _, _, found = _run(tmp_path, env, rows, steps=8, learning_rate=1e-3, max_seq_len=512)
    f = found["tools_never_used"]
    assert f.severity == "critical" and "rlft sft" in f.advice


def test_exploiting_subset_when_nothing_reaches_the_success_threshold(tmp_path, rows):
    env, _ = task_environment("max")
    _, _, found = _run(tmp_path, env, rows, steps=10, learning_rate=1e-3, success_threshold=1.0)
    assert "exploiting_subset" in found


def test_learning_stalled_when_half_the_data_cannot_be_solved(tmp_path, rows):
    half = [dict(r, ground_truth=r["ground_truth"] if i % 2 == 0 else "none") for i, r in enumerate(rows)]
    env, _ = task_environment("max")
    _, _, found = _run(tmp_path, env, half, steps=32, batch_size=16, group_size=8, learning_rate=1e-3, eval_size=0)
    assert "learning_stalled" in found and "learning rate now 0.001" in found["learning_stalled"].summary


def test_the_monitor_reads_incrementally_and_still_sees_what_the_store_holds(tmp_path):
    """Each call reads only the steps from the previous call on, yet its series equal a full read:
    rows written after a call at that same step (the eval after a step) are picked up next time,
    and a step that goes back (a resume) starts over from the store."""
    from rlft.health.source import Monitor
    from rlft.store import RunStore

    store = RunStore(tmp_path / "runs")
    run_id = store.create_run(name="m", config={})
    monitor = Monitor()
    reads: list[int | None] = []
    real = store.metrics
    store.metrics = lambda rid, keys=None, since_step=None: reads.append(since_step) or real(rid, keys, since_step=since_step)
    for step in range(1, 8):
        assert monitor.series(store, run_id, step) == real(run_id)
        store.log_metrics(run_id, step, {"reward/mean": step / 10, "loss": -step})
        if step % 3 == 0:
            store.log_metrics(run_id, step, {"eval/reward/mean": step / 5})  # after the step's own rows
    assert reads == [None, 1, 2, 3, 4, 5, 6]  # never the whole series again
    store.truncate_after(run_id, 4)  # a resume from step 4
    assert monitor.series(store, run_id, 5) == real(run_id) and reads[-1] is None
    store.close()


def test_logprob_mismatch_on_a_run_whose_engine_drops_the_weight_pushes(tmp_path, rows, monkeypatch):
    """A real failure mode: the engine acknowledges each new version but keeps serving the old
    weights (a push that silently did not load). With the sync probe off, the rollouts' logprobs
    drift away from the learning trainer's, and the diagnosis says so."""
    from rlft.engines import factory

    real = factory.make_engine

    def stale_engine(options, policy, **kw):
        engine = real(options, policy, **kw)

        def dropped(update):
            engine.policy_version = update.version  # acknowledged, never loaded

        engine.sync_weights = dropped
        return engine

    monkeypatch.setattr(factory, "make_engine", stale_engine)
    env, _ = task_environment("max", n=512)
    store, run_id, found = _run(tmp_path, env, rows, steps=10, batch_size=8, group_size=8, learning_rate=3e-3,
                                sync_check=False, dtype="bfloat16")  # bf16: the engine holds its own copy
    diffs = [v for _, v in store.metrics(run_id, ["sync/logprob_diff_mean"])["sync/logprob_diff_mean"]]
    assert diffs[0] < 0.02 < diffs[-1]  # ~on-policy at step 1 (bf16 noise), then the trainer moves on alone
    assert "logprob_mismatch" in found, ([f.line() for f in found.values()], diffs)
    assert found["logprob_mismatch"].chart == "sync/logprob_diff_mean"

"""What a newcomer sees in the terminal (#17 points 2 and 5), on a run store written directly:
``rlft runs health`` (+ ``--json``), ``runs show`` labelling values from other steps (a base eval
at step 0), ``runs rollouts --split eval`` with the rendered prompt, ``runs logs`` listing the
errors recorded on rollouts, ``runs list`` saying "completed with errors" and a whole failure
reason, and the progress line showing each step's own time and its error share."""

from __future__ import annotations

import json

import pytest

from rlft.cli.main import main
from rlft.store import RunStore
from rlft.types import Rollout, RolloutError, Termination


@pytest.fixture
def runs(tmp_path):
    store = RunStore(tmp_path / "runs")
    rid = store.create_run(name="trunc", config={"batch_size": 2, "steps": 8})
    for s in range(1, 9):
        store.log_metrics(rid, s, {"reward/mean": 0.3, "pass@k": 0.5, "response/truncated_ratio": 0.08 * s,
                                   "batch/zero_variance_groups": 0, "batch/trained_sequences": 4})
    store.log_metrics(rid, 0, {"eval/reward/mean": 0.25})
    store.update_run(rid, step=8)
    bad = [Rollout(example={"prompt": "q"}, messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                   termination=Termination.REWARD_ERROR, example_id=i,
                   errors=[RolloutError("reward:correct", f"KeyError: 'answer' in row {i}")]) for i in range(3)]
    store.add_rollouts(rid, 8, bad)
    held = Rollout(example={"prompt": "q"}, messages=[{"role": "system", "content": "Be brief."},
                                                      {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                   termination=Termination.FINISHED, prompt_text="<|im_start|>system\nBe brief.\n# Tools\nlookup(...)")
    store.add_rollouts(rid, 0, [held], split="eval")
    store.set_status(rid, "completed")
    failed = store.create_run(name="doomed")
    store.set_status(failed, "failed", error="WeightSyncError: engine at version 3: expected 4: stale weights")
    return tmp_path / "runs", rid, failed


def test_runs_health_prints_findings_and_json(runs, capsys):
    d, rid, _ = runs
    assert main(["runs", "health", rid, "--runs", str(d)]) == 0
    out = capsys.readouterr().out
    assert "[health] WARNING responses run into the length limit (steps 1-8)" in out and "overlong" in out
    assert main(["runs", "health", rid, "--runs", str(d), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [f["name"] for f in data["findings"]] == ["truncation"] and data["findings"][0]["window"] == [1, 8]


def test_runs_show_labels_values_from_another_step(runs, capsys):
    d, rid, _ = runs
    assert main(["runs", "show", rid, "--runs", str(d)]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "eval/reward/mean" in ln)
    assert "(step 0: before training)" in line
    assert "(step" not in next(ln for ln in out.splitlines() if "reward/mean " in ln and "eval" not in ln)
    assert "completed with errors (3 rollouts with reward errors)" in out


def test_runs_list_says_completed_with_errors_and_prints_the_whole_failure_reason(runs, capsys):
    d, rid, failed = runs
    assert main(["runs", "list", "--runs", str(d)]) == 0
    out = capsys.readouterr().out
    assert f"{failed} failed: WeightSyncError: engine at version 3: expected 4: stale weights" in out
    from rlft.health.source import status_label

    store = RunStore(d, readonly=True)
    assert status_label(store, store.get_run(rid)) == "completed with errors (3 rollouts with reward errors)"
    assert status_label(store, store.get_run(failed)) == "failed"


def test_runs_rollouts_split_eval_shows_the_prompt_the_model_saw(runs, capsys):
    d, rid, _ = runs
    assert main(["runs", "rollouts", rid, "--runs", str(d), "--split", "eval"]) == 0
    out = capsys.readouterr().out
    assert "--- eval step 0" in out and "# Tools\nlookup(...)" in out
    assert "[system] Be brief." not in out  # the plain text is replaced by what the model saw
    assert main(["runs", "rollouts", rid, "--runs", str(d)]) == 0
    assert "--- train step 8" in capsys.readouterr().out


def test_runs_logs_lists_rollout_errors_by_message(runs, capsys):
    d, rid, _ = runs
    assert main(["runs", "logs", rid, "--runs", str(d)]) == 0
    out = capsys.readouterr().out
    assert "errors on 3 train rollouts" in out
    assert "3 x reward:correct: KeyError: 'answer' in row 0" in out  # one message, numbers blurred when counting


def test_progress_shows_the_steps_own_time_and_errors(capsys):
    from rlft.progress import Progress

    p = Progress(10, enabled=False)
    p.start(0)
    p._t0 -= 200  # a slow first step (model load, compile) must not linger in later steps' s/step
    p.update(10, {"reward/mean": 0.5, "pass@k": 1.0, "time/step": 4.9, "rollout/errors": 0.25,
                  "termination/reward_error": 0.125})
    err = capsys.readouterr().err
    assert "4.9 s/step" in err and "errors 25% (reward 12%)" in err

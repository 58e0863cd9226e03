"""Training-health diagnoses on synthetic series: each fires on the pattern it names and stays
silent on a close healthy pattern (so none of these tests passes with a diagnosis that always or
never fires). Real runs that have each problem: tests/test_health_runs.py."""

from __future__ import annotations

import pytest

from rlft.health import Context, diagnose, diagnose_eval
from rlft.health.diagnoses import (
    diagnose_entropy_collapse,
    diagnose_errors,
    diagnose_exploiting_subset,
    diagnose_learning_stalled,
    diagnose_logprob_mismatch,
    diagnose_no_signal,
    diagnose_reward_hacking,
    diagnose_tools_never_used,
    diagnose_trained_on_nothing,
    diagnose_truncation,
)
from rlft.health.thresholds import THRESHOLDS

N = 12


def s(*values, start=1):
    return [(start + i, float(v)) for i, v in enumerate(values)]


def ramp(a, b, n=N):
    return [a + (b - a) * i / (n - 1) for i in range(n)]


def healthy(n=N):
    """A run that learns: reward and pass@k rise together, entropy eases down, nothing breaks."""
    return {"reward/mean": s(*ramp(0.2, 0.8, n)), "pass@k": s(*ramp(0.5, 0.95, n)),
            "batch/zero_variance_groups": s(*[1] * n), "batch/trained_sequences": s(*[48] * n),
            "policy/entropy": s(*ramp(1.0, 0.5, n)), "response/truncated_ratio": s(*[0.02] * n),
            "rollout/errors": s(*[0.0] * n), "sync/logprob_diff_mean": s(*[0.04] * n),
            "rollout/tool_calls": s(*ramp(0.5, 1.5, n)), "rollout/valid_tool_calls": s(*ramp(0.5, 1.5, n)),
            "reward/correct": s(*ramp(0.2, 0.8, n)), "reward/format": s(*ramp(0.6, 0.9, n)),
            "eval/reward/mean": [(0, 0.2), (6, 0.5), (12, 0.7)], "optim/lr": s(*[1e-3] * n),
            "reward/max": s(*[1.0] * n)}


CTX = Context(groups=8, learning_rate=1e-3, tools=1)


def test_a_healthy_run_has_no_findings():
    assert diagnose(healthy(), CTX) == []


def test_no_signal_fires_on_flat_reward_with_tied_groups_and_not_on_a_rising_one():
    sick = healthy() | {"reward/mean": s(*[0.0] * N), "pass@k": s(*[0.0] * N),
                        "batch/zero_variance_groups": s(*[7] * N)}
    f = diagnose_no_signal(sick, CTX)
    assert f and f.severity == "critical" and f.details["tied_share"] == pytest.approx(7 / 8)
    assert f.evidence[0].key == "reward/mean" and f.window == (1, N)
    # flat but the groups disagree (mixed results that average out): there is a gradient
    assert diagnose_no_signal(sick | {"batch/zero_variance_groups": s(*[2] * N)}, CTX) is None
    assert diagnose_no_signal(healthy(), CTX) is None


def test_exploiting_subset_fires_when_reward_rises_and_pass_at_k_does_not():
    sick = healthy() | {"pass@k": s(*[0.4] * N)}
    f = diagnose_exploiting_subset(sick, CTX)
    assert f and f.chart == "pass@k"
    # at the ceiling, reward rising with pass@k flat is healthy sharpening
    assert diagnose_exploiting_subset(healthy() | {"pass@k": s(*[1.0] * N)}, CTX) is None
    assert diagnose_exploiting_subset(healthy(), CTX) is None


def test_reward_hacking_fires_on_a_component_rising_while_another_falls():
    sick = healthy() | {"reward/length": s(*ramp(0.1, 0.9)), "reward/correct": s(*ramp(0.5, 0.2))}
    f = diagnose_reward_hacking(sick, CTX)
    assert f and f.details == {"rising": "reward/length", "falling": "reward/correct"}
    assert diagnose_reward_hacking(healthy(), CTX) is None


def test_reward_hacking_fires_on_train_up_and_held_out_down():
    sick = healthy() | {"eval/reward/mean": [(0, 0.5), (6, 0.4), (12, 0.3)]}
    f = diagnose_reward_hacking(sick, CTX)
    assert f and f.chart == "eval/reward/mean" and f.window == (0, 12)
    assert diagnose_reward_hacking(healthy() | {"eval/reward/mean": [(0, 0.5), (12, 0.48)]}, CTX) is None


def test_entropy_collapse_fires_below_ratio_and_floor_and_ignores_steps_that_trained_on_nothing():
    sick = healthy() | {"policy/entropy": s(*ramp(1.0, 0.2)), "reward/mean": s(*[0.3] * N)}
    assert diagnose_entropy_collapse(sick, CTX).details["reward_gain"] == 0
    # the same entropy drop while the reward climbs: the policy gets sure as it gets right
    assert diagnose_entropy_collapse(sick | {"reward/mean": s(*ramp(0.2, 0.9))}, CTX) is None
    # near-zero entropy is collapse whatever the reward does
    assert diagnose_entropy_collapse(healthy() | {"policy/entropy": s(*[1.0] * 6, *[0.01] * 6)}, CTX)
    # a step with no trained sequence reports entropy 0: those zeros are no collapse
    zeros = healthy() | {"policy/entropy": s(*[0.8, 0.0] * (N // 2)), "batch/trained_sequences": s(*[48, 0] * (N // 2))}
    assert diagnose_entropy_collapse(zeros, CTX) is None
    assert diagnose_entropy_collapse(healthy(), CTX) is None


def test_truncation_fires_when_the_truncated_share_rises():
    f = diagnose_truncation(healthy() | {"response/truncated_ratio": s(*ramp(0.0, 0.6))}, CTX)
    assert f and f.summary.startswith("truncated share 5% -> 55%")
    assert diagnose_truncation(healthy() | {"response/truncated_ratio": s(*[0.15] * N)}, CTX) is None


def test_errors_fire_when_rising_and_name_the_top_error_message():
    ctx = Context(groups=8, top_error=lambda a, b: ("tool:lookup: timeout", 9, 11))
    f = diagnose_errors(healthy() | {"termination/timeout": s(*ramp(0.0, 0.4))}, ctx)
    assert f and f.chart == "termination/timeout" and f.details["top_error"] == "tool:lookup: timeout"
    assert "tool:lookup: timeout" in f.summary
    # a steady low level of failures is not "rising"
    assert diagnose_errors(healthy() | {"rollout/errors": s(*[0.05] * N)}, ctx) is None


def test_logprob_mismatch_fires_on_growth_and_not_on_steady_bf16_noise():
    assert diagnose_logprob_mismatch(healthy() | {"sync/probe_logprob_diff": s(*ramp(0.01, 0.09))}, CTX)
    assert diagnose_logprob_mismatch(healthy() | {"sync/logprob_diff_mean": s(*[0.2] * N)}, CTX)
    assert diagnose_logprob_mismatch(healthy(), CTX) is None  # 0.04 flat: bf16 noise


def test_learning_stalled_fires_on_a_plateau_after_a_rise():
    f = THRESHOLDS["learning_stalled"]["flat_steps"]
    stalled = ramp(0.1, 0.5, int(f)) + [0.5] * int(2 * f)  # the last 2 x flat_steps: no better than before
    sick = healthy(len(stalled)) | {"reward/mean": s(*stalled), "optim/lr": s(*ramp(1e-3, 0.0, len(stalled)))}
    finding = diagnose_learning_stalled(sick, CTX)
    assert finding and "learning rate now 0" in finding.summary
    rising = ramp(0.1, 0.5, int(f)) + ramp(0.5, 0.8, int(2 * f))
    assert diagnose_learning_stalled(healthy(len(rising)) | {"reward/mean": s(*rising)}, CTX) is None
    # at the ceiling a plateau is done, not stalled
    done = ramp(0.1, 0.95, int(f)) + [0.95] * int(2 * f)
    assert diagnose_learning_stalled(healthy(len(done)) | {"reward/mean": s(*done)}, CTX) is None


def test_tools_never_used_fires_when_an_environment_with_tools_gets_no_valid_call():
    sick = healthy() | {"rollout/tool_calls": s(*[0.3] * N), "rollout/valid_tool_calls": s(*[0.0] * N)}
    f = diagnose_tools_never_used(sick, CTX)
    assert f and f.severity == "critical" and "partial credit" in f.summary and "rlft sft" in f.advice
    assert diagnose_tools_never_used(sick, Context(tools=0)) is None  # no tools: nothing to call
    assert diagnose_tools_never_used(healthy(), CTX) is None


def test_trained_on_nothing_reports_the_share_of_empty_steps():
    seqs = [48, 0, 0, 48, 0, 48, 48, 48, 48, 48, 48, 48]
    f = diagnose_trained_on_nothing(healthy() | {"batch/trained_sequences": s(*seqs)}, CTX)
    assert f and f.details["steps"] == [2, 3, 5] and f.details["share"] == pytest.approx(0.25)
    one = [48, 0] + [48] * (N - 2)  # one empty step in twelve: noise
    assert diagnose_trained_on_nothing(healthy() | {"batch/trained_sequences": s(*one)}, CTX) is None


def test_findings_carry_numbers_a_chart_and_a_window_as_json():
    sick = healthy() | {"response/truncated_ratio": s(*ramp(0.0, 0.6))}
    (f,) = diagnose(sick, CTX)
    d = f.to_dict()
    assert d["chart"] == "response/truncated_ratio" and d["window"] == [1, N]
    assert d["evidence"][0]["steps"] == list(range(1, N + 1)) and d["evidence"][0]["values"][-1] == pytest.approx(0.6)
    assert "`" in d["advice"]  # names the config key to change


def test_eval_diagnoses_flag_levels_of_one_eval():
    bad = {"examples": 10, "batch/zero_variance_groups": 9, "pass@k": 0.0, "response/truncated_ratio": 0.4,
           "rollout/errors": 0.0, "rollout/tool_calls": 0.0, "rollout/valid_tool_calls": 0.0}
    names = {f.name for f in diagnose_eval(bad, Context(tools=2))}
    assert names == {"no_signal", "truncation", "tools_never_used"}
    good = bad | {"batch/zero_variance_groups": 2, "response/truncated_ratio": 0.0, "rollout/valid_tool_calls": 1.0}
    assert diagnose_eval(good, Context(tools=2)) == []


def test_docs_name_every_finding_and_threshold():
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "health.md").read_text()
    for name, values in THRESHOLDS.items():
        assert f"`{name}`" in doc, name
        for key, value in values.items():
            assert f"`{key}` = {value:g}" in doc, (name, key, value)

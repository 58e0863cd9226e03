"""Nothing lost, nothing twice: a run SIGKILLed at any phase boundary and resumed ends with the
same metrics, evals, rollouts and checkpoint rows as a run that was never interrupted.

The kills come from ``rlft.faults`` (``RLFT_KILL_AT=<point>:<step>``): inside a step, inside a
checkpoint write, between a checkpoint and its store row, between a checkpoint and its eval,
inside pruning; and inside ``rlft export``. Runs are real ``rlft train`` processes on the tiny
model (float32, one thread: bit-for-bit repeatable), 4 steps, a checkpoint every step (2 kept),
an eval every 2 steps.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rlft.store import RunStore
from rlft.training.checkpoint import best_checkpoint

ENV = textwrap.dedent('''
    from rlft import Environment

    def variety(ro):
        return len(set(ro.completion)) / 16

    env = Environment(rewards=[variety], max_tokens=10)
    dataset = [{"prompt": f"write something {i}"} for i in range(24)]
''')
CONFIG = textwrap.dedent('''
    env = "env.py"
    model = "model"
    steps = 4
    batch_size = 2
    group_size = 2
    dtype = "float32"
    lora = false
    learning_rate = 1e-3
    checkpoint_every = 1
    keep_checkpoints = 2
    eval_every = 2
    eval_size = 2
    eval_k = 2
    validate = false
    progress = false
    seed = 5
''')
WALL_CLOCK = ("time/", "throughput/", "latency")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from rlft.testing.models import save_tiny_model

    d = tmp_path_factory.mktemp("crash")
    save_tiny_model(str(d / "model"))
    (d / "env.py").write_text(ENV)
    (d / "config.toml").write_text(CONFIG)
    return d


def _rlft(d: Path, *args: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("RLFT_KILL_AT", None)
    if kill_at:
        env["RLFT_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "rlft", *args], cwd=d, env=env, capture_output=True, text=True,
                          timeout=600)


def _train(d: Path, runs: str, *, kill_at: str | None = None, resume: str | None = None):
    args = ["train", "config.toml", "--set", f"runs_dir={runs}", "--set", f"run_name={runs}"]
    return _rlft(d, *args, *(["--resume", resume] if resume else []), kill_at=kill_at)


def _state(d: Path, runs: str) -> dict:
    """What a run leaves in the store, minus wall-clock values and per-run ids."""
    store = RunStore(d / runs, readonly=True)
    try:
        (run,) = store.list_runs()
        rid = run["id"]
        metrics = {k: v for k, v in store.metrics(rid).items() if not any(w in k for w in WALL_CLOCK)}
        evals = sorted((e["step"], e["split"], {k: v for k, v in e["metrics"].items() if not any(w in k for w in WALL_CLOCK)})
                       for e in store.evals(rid))
        rollouts = sorted((r["split"], r["step"], r["example_id"], r["group_index"], json.dumps(r["messages"]),
                           r["reward"], r["advantage"], r["num_sampled_tokens"])
                          for r in store.rollouts(rid, split=None, limit=10_000))
        ckpts = [c["step"] for c in store.checkpoints(rid)]
        on_disk = sorted(p.name for p in (store.run_dir(rid) / "checkpoints").iterdir())
        best = best_checkpoint(store.run_dir(rid))
        return dict(status=run["status"], step=run["step"], metrics=metrics, evals=evals, rollouts=rollouts,
                    checkpoints=ckpts, on_disk=on_disk, best=best[0] if best else None)
    finally:
        store.close()


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module")
def reference(workdir):
    proc = _train(workdir, "ref")
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = _state(workdir, "ref")
    assert [s for s, _, _ in state["evals"]] == [0, 2, 4]
    # keep_best: the newest two and the best held-out eval's (ties go to the later step)
    best = max((m["reward/mean"], s) for s, _, m in state["evals"] if s > 0)[1]
    assert state["status"] == "completed" and state["checkpoints"] == sorted({3, 4, best})
    assert state["best"] == best and "best.json" in state["on_disk"]
    return state


@pytest.mark.parametrize("kill_at", ["mid_step:1", "mid_step:3", "checkpoint_write:2", "checkpoint_unrecorded:2",
                                     "before_eval:2", "best_unmarked:2", "prune:1", "before_eval:2+mid_step:3"])
def test_a_run_killed_at_a_phase_boundary_resumes_to_the_uninterrupted_result(workdir, reference, kill_at):
    runs = "runs-" + kill_at.replace(":", "-").replace("+", "_")
    first, *more = kill_at.split("+")
    proc = _train(workdir, runs, kill_at=first)
    assert proc.returncode == -9, f"the run was not killed at {first}: rc {proc.returncode}\n{proc.stderr[-3000:]}"
    for point in more:  # killed again while resuming
        proc = _train(workdir, runs, kill_at=point, resume=runs)
        assert proc.returncode == -9, proc.stderr[-3000:]
    proc = _train(workdir, runs, resume=runs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = _state(workdir, runs)
    for key in ("status", "step", "checkpoints", "on_disk", "best", "evals", "rollouts", "metrics"):
        assert _same(state[key], reference[key]), f"{key} after a kill at {kill_at}:\n{state[key]}\nvs\n{reference[key]}"


def test_a_kill_during_export_leaves_no_half_written_model(workdir, reference):
    out = workdir / "exported"
    proc = _rlft(workdir, "export", "ref", "--runs", "ref", "--merge", str(out), kill_at="export")
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert not out.exists()  # never a directory with an empty config.json
    proc = _rlft(workdir, "export", "ref", "--runs", "ref", "--merge", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert not [p for p in workdir.iterdir() if p.name.startswith(".exported")]  # no temporary left behind


def test_a_corrupt_checkpoint_is_named_and_the_resume_falls_back_to_the_previous_one(workdir, reference):
    runs = "runs-corrupt"
    proc = _train(workdir, runs, kill_at="mid_step:4")  # checkpoints 2 and 3 kept
    assert proc.returncode == -9, proc.stderr[-3000:]
    store = RunStore(workdir / runs, readonly=True)
    run_dir = store.run_dir(store.list_runs()[0]["id"])
    store.close()
    weights = run_dir / "checkpoints" / "step-000003" / "model.safetensors"
    weights.write_bytes(b"\x00" * 16)  # "header too small" for safetensors
    proc = _train(workdir, runs, resume=runs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = _state(workdir, runs)
    assert "step-000003.corrupt" in state["on_disk"]
    for key in ("status", "step", "checkpoints", "evals", "rollouts", "metrics"):
        assert _same(state[key], reference[key]), key
    store = RunStore(workdir / runs, readonly=True)
    logs = [entry["message"] for entry in store.logs(store.list_runs()[0]["id"])]
    store.close()
    assert any("step-000003" in m and "corrupt" in m and "model.safetensors" in m for m in logs), logs

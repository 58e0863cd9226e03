"""keep_best: the checkpoint of a run's best held-out eval is kept beside the newest ones, marked,
and found by ``--step best`` (export, eval) and by ``rlft serve`` as ``ft:<base>:<run>:best``."""

import json
import textwrap

import pytest

from rlft.training.checkpoint import (
    BEST_FILE,
    STATE_FILE,
    CheckpointError,
    best_checkpoint,
    checkpoint_dir,
    list_checkpoints,
    mark_best,
    prune_checkpoints,
    resolve_checkpoint,
)

# The held-out reward is a function of the weights' version, so which eval is best does not depend
# on what the tiny model samples: step 2 scores 1, step 3 scores 0.5, the others 0.
ENV = textwrap.dedent('''
    from rlft import Environment

    def by_version(ro):
        return {2: 1.0, 3: 0.5}.get(ro.policy_version, 0.0)

    env = Environment(rewards=[by_version], max_tokens=6)
    dataset = [{"prompt": f"write something {i}"} for i in range(24)]
''')
CFG = dict(steps=4, batch_size=2, group_size=2, eval_size=2, eval_k=1, eval_every=1, checkpoint_every=0,
           keep_checkpoints=1, dtype="float32", validate=False, progress=False, learning_rate=1e-3, seed=0)


def _fake_checkpoints(run_dir, steps):
    for s in steps:
        checkpoint_dir(run_dir, s).mkdir(parents=True)
        (checkpoint_dir(run_dir, s) / STATE_FILE).write_bytes(b"")


def test_pruning_spares_the_best_and_keeps_the_newest(tmp_path):
    _fake_checkpoints(tmp_path, [1, 2, 3, 4, 5])
    mark_best(tmp_path, 2, 0.9)
    assert prune_checkpoints(tmp_path, 2, keep_best=True) == [1, 3]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4, 5]


def test_a_best_among_the_newest_keeps_no_extra_checkpoint(tmp_path):
    _fake_checkpoints(tmp_path, [2, 3, 4])
    mark_best(tmp_path, 4, 0.9)
    assert prune_checkpoints(tmp_path, 2, keep_best=True) == [2]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]


def test_the_marker_names_the_best_step_and_resolve_finds_it(tmp_path):
    _fake_checkpoints(tmp_path, [3, 6])
    mark_best(tmp_path, 3, 0.75)
    assert best_checkpoint(tmp_path) == (3, 0.75)
    assert resolve_checkpoint(tmp_path, "best") == (3, checkpoint_dir(tmp_path, 3))
    assert resolve_checkpoint(tmp_path, "latest")[0] == 6


def test_a_marker_whose_checkpoint_is_gone_counts_as_none(tmp_path):
    _fake_checkpoints(tmp_path, [6])
    mark_best(tmp_path, 3, 0.75)  # e.g. a resume that fell back past a corrupt checkpoint 3
    assert best_checkpoint(tmp_path) is None
    with pytest.raises(FileNotFoundError, match=r"no best checkpoint.*keep_best"):
        resolve_checkpoint(tmp_path, "best")


def test_a_damaged_marker_is_an_error_naming_the_file(tmp_path):
    _fake_checkpoints(tmp_path, [1])
    (tmp_path / "checkpoints" / BEST_FILE).write_text('{"step": 1}')
    with pytest.raises(CheckpointError, match=BEST_FILE):
        best_checkpoint(tmp_path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, one_thread):
    from rlft.training.loop import train

    d = tmp_path_factory.mktemp("best")
    (d / "env.py").write_text(ENV)
    ids = {}
    for name, keep_best in (("best", True), ("plain", False)):
        ids[name] = train(**CFG, env=str(d / "env.py"), model=tiny_model_dir, runs_dir=str(d / name),
                          run_name=name, keep_best=keep_best)
    return d, ids


def test_a_run_keeps_its_best_eval_checkpoint_beside_the_newest(runs):
    from rlft.store import RunStore

    d, ids = runs
    store = RunStore(d / "best", readonly=True)
    run_dir = store.run_dir(ids["best"])
    evals = {e["step"]: e["metrics"]["reward/mean"] for e in store.evals(ids["best"])}
    assert evals == {0: 0.0, 1: 0.0, 2: 1.0, 3: 0.5, 4: 0.0}
    # step 2 saved when its eval beat the others (checkpoint_every = 0), step 4 as the last step;
    # step 1's (the first best) pruned when step 2 took over
    assert [s for s, _ in list_checkpoints(run_dir)] == [2, 4]
    assert sorted(c["step"] for c in store.checkpoints(ids["best"])) == [2, 4]
    assert json.loads((run_dir / "checkpoints" / BEST_FILE).read_text()) == {"step": 2, "reward": 1.0}
    assert resolve_checkpoint(run_dir, "best")[0] == 2
    assert any("best held-out eval so far: step 2" in log["message"] for log in store.logs(ids["best"]))


def test_serve_names_the_best_checkpoint(runs):
    from rlft.serve.models import ModelRegistry

    d, _ = runs
    registry = ModelRegistry(runs_dir=d / "best")
    best = [e for e in registry.entries() if e.name.endswith(":best")]
    assert len(best) == 1 and best[0].path.endswith("step-000002")
    assert registry.resolve(best[0].name).name.endswith(":2")


def test_keep_best_false_keeps_only_the_newest(runs):
    from rlft.store import RunStore

    d, ids = runs
    run_dir = RunStore(d / "plain", readonly=True).run_dir(ids["plain"])
    assert [s for s, _ in list_checkpoints(run_dir)] == [4]
    assert not (run_dir / "checkpoints" / BEST_FILE).exists()
    with pytest.raises(FileNotFoundError, match="no best checkpoint"):
        resolve_checkpoint(run_dir, "best")


def test_a_kill_between_the_best_checkpoint_and_its_mark_is_marked_on_resume(tmp_path, tiny_model_dir):
    """Killed after step 2's checkpoint was saved for its best eval and before the mark: the resume
    starts at step 2, finds the recorded eval and marks it (else step 3's 0.5 would beat step 1's 0)."""
    import os
    import subprocess
    import sys

    from rlft.store import RunStore
    from rlft.training.loop import train

    (tmp_path / "env.py").write_text(ENV)
    args = dict(CFG, env=str(tmp_path / "env.py"), model=tiny_model_dir, runs_dir=str(tmp_path / "runs"), run_name="k")
    proc = subprocess.run([sys.executable, "-c", f"from rlft.training.loop import train; train(**{args!r})"],
                          env={**os.environ, "RLFT_KILL_AT": "best_unmarked:2", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    store = RunStore(tmp_path / "runs", readonly=True)
    run_dir = store.run_dir(store.resolve("k"))
    assert [s for s, _ in list_checkpoints(run_dir)] == [1, 2] and best_checkpoint(run_dir) == (1, 0.0)
    train(**args, resume="k")
    assert [s for s, _ in list_checkpoints(run_dir)] == [2, 4]
    assert best_checkpoint(run_dir) == (2, 1.0)


def test_two_gloo_ranks_keep_the_same_best_checkpoint_and_the_cli_names_it(tmp_path, tiny_model_dir):
    """Under torchrun every rank follows rank 0's decisions (the eval runs there): no rank waits on a
    collective the others skip, and the run keeps what one process keeps."""
    import os
    import subprocess
    import sys

    from rlft.store import RunStore

    (tmp_path / "env.py").write_text(ENV)
    cfg = dict(CFG, env=str(tmp_path / "env.py"), model=tiny_model_dir, runs_dir=str(tmp_path / "runs"),
               run_name="ddp", device="cpu")
    (tmp_path / "config.toml").write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in cfg.items()))  # JSON scalars are TOML
    proc = subprocess.run([sys.executable, "-m", "rlft", "train", "config.toml", "--nproc", "2"], cwd=tmp_path,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    store = RunStore(tmp_path / "runs", readonly=True)
    run_dir = store.run_dir(store.resolve("ddp"))
    assert [s for s, _ in list_checkpoints(run_dir)] == [2, 4]
    assert best_checkpoint(run_dir) == (2, 1.0)
    # rank 0 alone says where the best was, and `rlft runs show` marks it
    said = " ".join(proc.stderr.split())  # the progress display's lines, wrapped to the terminal
    assert said.count("; the best was at step 2 (1.000), its checkpoint kept: `rlft export ") == 1
    show = subprocess.run([sys.executable, "-m", "rlft", "runs", "show", "ddp", "--runs", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=300)
    assert "step-000002 (good, the best held-out eval: reward 1.0000, --step best)" in show.stdout, show.stdout

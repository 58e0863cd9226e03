"""Checkpoints and resume: a SIGKILLed run continues at the next step with the same data and
no duplicated or lost rows, and matches an uninterrupted run where determinism allows."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from rlft.store import RunStore
from rlft.training.checkpoint import list_checkpoints

ENV = textwrap.dedent('''
    import time
    from rlft.env import Environment

    def variety(ro):
        time.sleep(0.2)  # slow enough for the test to kill the run between checkpoints
        return len(set(ro.completion)) / 16

    env = Environment(rewards=[variety], max_tokens=12)
    dataset = [{"prompt": f"write something {i}"} for i in range(40)]
''')
STEPS = 12
CFG = dict(steps=STEPS, batch_size=2, group_size=4, checkpoint_every=3, keep_checkpoints=10, dtype="float32",
           eval_fraction=0.0, validate=False, progress=False, learning_rate=1e-3, seed=3)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    (d / "env.py").write_text(ENV)
    return d


def _args(d, model, runs, name):
    return dict(CFG, env=str(d / "env.py"), model=model, runs_dir=str(runs), run_name=name)


def test_sigkilled_run_resumes_at_the_next_step_without_duplicates(workdir, tiny_model_dir):
    from rlft.training.loop import train

    ref_id = train(**_args(workdir, tiny_model_dir, workdir / "ref", "ref"))
    runs = workdir / "killed"
    code = f"from rlft.training.loop import train; train(**{_args(workdir, tiny_model_dir, runs, 'victim')!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 600  # a loaded machine starts Python slowly
        while time.time() < deadline:
            time.sleep(0.2)
            if (runs / "rlft.db").exists():
                try:
                    store = RunStore(runs, readonly=True)
                except RuntimeError:  # the child has created the file and not yet its schema: poll again
                    continue
                runs_ = store.list_runs()
                if runs_ and (runs_[0].get("step") or 0) >= 4:
                    break
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    store = RunStore(runs)
    run_id = store.resolve("victim")
    killed_at = store.get_run(run_id)["step"]
    assert 4 <= killed_at < STEPS
    last_ckpt = list_checkpoints(store.run_dir(run_id))[-1][0]
    assert last_ckpt % 3 == 0 and last_ckpt <= killed_at

    train(resume=run_id, runs_dir=str(runs))

    store = RunStore(runs, readonly=True)
    run = store.get_run(run_id)
    assert run["status"] == "completed" and run["step"] == STEPS
    series = store.metrics(run_id)["reward/mean"]
    assert [s for s, _ in series] == list(range(1, STEPS + 1))  # no step lost, none twice
    for step in range(1, STEPS + 1):
        assert len(store.rollouts(run_id, step=step, limit=100)) == 2 * 4
    # the same data order as an uninterrupted run, and here (fp32, seeded sampling) the same samples
    ref = RunStore(workdir / "ref", readonly=True)
    for step in range(1, STEPS + 1):
        got = sorted((r["example_id"], r["group_index"], r["messages"][-1]["content"]) for r in store.rollouts(run_id, step=step))
        want = sorted((r["example_id"], r["group_index"], r["messages"][-1]["content"]) for r in ref.rollouts(ref_id, step=step))
        assert [g[:2] for g in got] == [w[:2] for w in want], f"data order differs at step {step}"
        assert got == want, f"samples differ at step {step}"

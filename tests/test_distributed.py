"""Multi-process training (torchrun, DDP over gloo on CPU) on the tiny model.

Two processes with the same global batch (4 prompts: 2 per rank) and seeds train exactly what one
process trains: same rollouts, same loss and gradient norm, and after each step the same weights
within ``WEIGHT_ATOL`` (fp32; measured max difference 8.6e-7, from the order of the gradient sums).
Rank 1's two prompts of step 1 have a constant reward (tied groups: no gradient), so rank 1 has no
micro-batch at all while rank 0 has several: the ranks must still run matching passes. Resume
under torchrun redoes a step identically. Also: ``rlft train --nproc 2`` is the launcher, rank 0
alone writes the store and checkpoints, and the helpers' single-process behaviour.
"""

import glob
import os
import subprocess
import sys

import pytest

from rlft import distributed
from rlft.store import RunStore

WEIGHT_ATOL = 1e-5  # fp32 weights after a step: DDP's gradient all-reduce sums in another order
METRIC_RTOL = 1e-5  # loss/policy, optim/grad_norm: all-reduced float64 sums of fp32 values
STEPS = 2
CFG = dict(steps=STEPS, batch_size=4, group_size=4, checkpoint_every=1, keep_checkpoints=5, dtype="float32",
           lora=False, eval_fraction=0.0, validate=False, progress=False, learning_rate=1e-3, seed=3,
           micro_batch_tokens=48)  # several micro-batches per rank, and different counts per rank
ENV = '''
from rlft.env import Environment

TIED = {tied!r}

def variety(ro):
    return 0.5 if ro.example.get("tied") else len(set(ro.completion)) / 16

env = Environment(rewards=[variety], max_tokens=12)
dataset = [{{"prompt": f"write something {{i}}", "tied": i in TIED}} for i in range(40)]
'''


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A single-process run and a 2-process run of the same config (the latter via the CLI)."""
    from rlft.data import load_dataset
    from rlft.testing_models import save_tiny_model
    from rlft.train import train

    d = tmp_path_factory.mktemp("ddp")
    save_tiny_model(str(d / "model"))
    # rank 1 takes the second half of step 0's batch: make those prompts' groups tied
    first = load_dataset([{"prompt": str(i)} for i in range(40)]).batch(0, CFG["batch_size"], CFG["seed"])
    tied = sorted(ex["example_id"] for ex in first[2:])
    (d / "env.py").write_text(ENV.format(tied=tied))
    cfg = dict(CFG, env=str(d / "env.py"), model=str(d / "model"))
    (d / "config.toml").write_text("\n".join(f"{k} = {_toml(v)}" for k, v in cfg.items()) + "\n")
    single = train(**cfg, runs_dir=str(d / "single"), run_name="single")
    proc = _rlft(d, "train", str(d / "config.toml"), "--nproc", "2", "--set", f"runs_dir={d / 'ddp'}",
                 "--set", "run_name=ddp")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("finished; inspect it") == 1  # rank 0 alone reports
    return d, single


def _toml(v):
    return ("true" if v else "false") if isinstance(v, bool) else repr(v) if isinstance(v, (int, float)) else f'"{v}"'


def _rlft(cwd, *args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "rlft", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def _weights(runs_dir, run_id, step):
    from safetensors.torch import load_file

    (f,) = glob.glob(str(runs_dir / run_id / "checkpoints" / f"step-{step:06d}" / "*.safetensors"))
    return load_file(f)


def _rollouts(store, run_id, step):
    return sorted((r["example_id"], r["group_index"], r["messages"][-1]["content"], r["advantage"], r["policy_version"])
                  for r in store.rollouts(run_id, step=step, limit=100))


def test_two_gloo_processes_match_one_process(runs):
    d, single_id = runs
    one, two = RunStore(d / "single", readonly=True), RunStore(d / "ddp", readonly=True)
    ddp_id = two.resolve("ddp")
    assert two.get_run(ddp_id)["status"] == "completed" and two.get_run(ddp_id)["step"] == STEPS
    keys = ["loss/policy", "optim/grad_norm", "reward/mean", "reward/std", "batch/trained_sequences", "policy/entropy"]
    m1, m2 = one.metrics(single_id, keys), two.metrics(ddp_id, keys)
    from safetensors.torch import load_file

    (base_file,) = glob.glob(str(d / "model" / "*.safetensors"))
    base = load_file(base_file)
    for step in range(1, STEPS + 1):
        # the same rollouts: per-prompt seeded sampling does not care which rank samples a prompt
        assert _rollouts(two, ddp_id, step) == _rollouts(one, single_id, step), f"rollouts differ at step {step}"
        assert len(_rollouts(two, ddp_id, step)) == CFG["batch_size"] * CFG["group_size"]  # gathered from both ranks
        for k in keys:
            a, b = dict(m1[k])[step], dict(m2[k])[step]
            assert b == pytest.approx(a, rel=METRIC_RTOL, abs=1e-8), f"{k} at step {step}: {a} vs {b}"
        w1, w2 = _weights(d / "single", single_id, step), _weights(d / "ddp", ddp_id, step)
        assert w1.keys() == w2.keys()
        worst = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
        moved = max(float((w1[k] - base[k].float()).abs().max()) for k in w1)
        assert worst <= WEIGHT_ATOL < moved / 10, f"step {step}: max |single - ddp| = {worst:.2e}, step moved {moved:.2e}"
    # step 1: rank 1's groups were tied (advantage 0, nothing to train), rank 0's were not
    assert dict(m2["batch/trained_sequences"])[1] == 2 * CFG["group_size"]


def test_rank_zero_alone_writes(runs):
    d, _ = runs
    store = RunStore(d / "ddp", readonly=True)
    run_id = store.resolve("ddp")
    assert [r["name"] for r in store.list_runs()] == ["ddp"]
    assert [c["step"] for c in store.checkpoints(run_id)] == [1, 2]
    assert sorted(p.name for p in (d / "ddp" / run_id).iterdir()) == ["checkpoints", "config.toml"]  # no rank dirs
    assert [s for s, _ in store.metrics(run_id)["reward/mean"]] == [1, 2]


def test_resume_under_torchrun_redoes_the_step_identically(runs):
    import shutil

    d, _ = runs
    store = RunStore(d / "ddp", readonly=True)
    run_id = store.resolve("ddp")
    before = _rollouts(store, run_id, 2)
    loss = dict(store.metrics(run_id, ["loss/policy"])["loss/policy"])[2]
    w_before = _weights(d / "ddp", run_id, 2)
    shutil.rmtree(d / "ddp" / run_id / "checkpoints" / "step-000002")  # as if killed before step 2's checkpoint
    proc = _rlft(d, "train", "--nproc", "2", "--resume", run_id, "--set", f"runs_dir={d / 'ddp'}")
    assert proc.returncode == 0, proc.stderr[-6000:]
    store = RunStore(d / "ddp", readonly=True)
    assert store.get_run(run_id)["status"] == "completed"
    assert _rollouts(store, run_id, 2) == before
    assert dict(store.metrics(run_id, ["loss/policy"])["loss/policy"])[2] == pytest.approx(loss, rel=METRIC_RTOL)
    w_after = _weights(d / "ddp", run_id, 2)
    assert max(float((w_before[k] - w_after[k]).abs().max()) for k in w_before) <= WEIGHT_ATOL


def test_single_process_helpers_are_the_identity():
    assert not distributed.is_distributed() and distributed.is_main() and distributed.world_size() == 1
    assert distributed.init() is False  # no torchrun environment: nothing to join
    assert distributed.shard([1, 2, 3]) == [1, 2, 3]
    assert distributed.all_reduce_sum([1.0, 2.0]) == [1.0, 2.0] and distributed.all_reduce_max(3.0) == 3.0
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    model = object()
    assert distributed.wrap(model) is model and distributed.grad_scale(model) == 1.0
    assert list(distributed.micro_steps(model, [1, 2])) == [1, 2]


def test_shard_takes_a_contiguous_slice_per_rank(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    assert distributed.shard(["a", "b", "c", "d"]) == ["c", "d"]
    with pytest.raises(ValueError, match="evenly over 2 ranks"):
        distributed.shard(["a", "b", "c"])


def test_fsdp2_on_cpu_is_a_clear_error():
    import torch

    from rlft.config import load_config

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="needs CUDA"):
        distributed.check(load_config(overrides={"distributed": "fsdp2"}).resolved())
    distributed.check(load_config().resolved())  # ddp in one process: fine


def test_cli_builds_the_torchrun_command():
    cmd = distributed.torchrun_command(2, ["train", "c.toml"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rlft", "train",
                       "c.toml"]
    from rlft.cli import build_parser

    assert build_parser().parse_args(["train", "c.toml", "--nproc", "2"]).nproc == 2

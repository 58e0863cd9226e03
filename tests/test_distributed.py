"""Multi-process training (torchrun: DDP, and FSDP2, over gloo on CPU) on the tiny model.

Two processes with the same global batch (4 prompts: 2 per rank) and seeds train exactly what one
process trains: same rollouts, same loss and gradient norm, and after each step the same weights
within ``WEIGHT_ATOL`` (fp32; measured max difference 8.6e-7, from the order of the gradient sums).
Rank 1's two prompts of step 1 have a constant reward (tied groups: no gradient), so rank 1 has no
micro-batch at all while rank 0 has several: the ranks must still run matching passes. Resume
under torchrun redoes a step identically. FSDP2 (``fully_shard``) matches the same single-process
run, with LoRA and a KL term too, writes whole checkpoints, and resumes on 2 ranks or 1. Also:
``rlft train --nproc 2`` is the launcher, rank 0 alone writes the store and checkpoints, and the
helpers' single-process behaviour.
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
           micro_batch_tokens=48,  # several micro-batches per rank, and different counts per rank
           device="cpu")  # the single-process run too, on a machine with a GPU (gloo ranks run on the CPU)
ENV = '''
from rlft.env import Environment

TIED = {tied!r}

def variety(ro):
    return 0.5 if ro.example.get("tied") else len(set(ro.completion)) / 16

env = Environment(rewards=[variety], max_tokens=12)
# rank 1's (tied) prompts are short, the others long: the ranks have different numbers of micro-batches
dataset = [{{"prompt": f"{{i}}" if i in TIED else f"write something about {{i}}, as long as you like",
             "tied": i in TIED}} for i in range(40)]
'''


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """A single-process run and a 2-process run of the same config (the latter via the CLI)."""
    from rlft.data import load_dataset
    from rlft.training.loop import train

    d = tmp_path_factory.mktemp("ddp")
    # rank 1 takes the second half of step 0's batch: make those prompts' groups tied
    first = load_dataset([{"prompt": str(i)} for i in range(40)]).batch(0, CFG["batch_size"], CFG["seed"])
    tied = sorted(ex["example_id"] for ex in first[2:])
    (d / "env.py").write_text(ENV.format(tied=tied))
    cfg = dict(CFG, env=str(d / "env.py"), model=tiny_model_dir)
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


def test_two_gloo_processes_match_one_process(runs, tiny_model_dir):
    d, single_id = runs
    one, two = RunStore(d / "single", readonly=True), RunStore(d / "ddp", readonly=True)
    ddp_id = two.resolve("ddp")
    assert two.get_run(ddp_id)["status"] == "completed" and two.get_run(ddp_id)["step"] == STEPS
    keys = ["loss/policy", "optim/grad_norm", "reward/mean", "reward/std", "batch/trained_sequences", "policy/entropy"]
    m1, m2 = one.metrics(single_id, keys), two.metrics(ddp_id, keys)
    from safetensors.torch import load_file

    (base_file,) = glob.glob(os.path.join(tiny_model_dir, "*.safetensors"))
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
    assert 0 < dict(m2["batch/trained_sequences"])[1] <= 2 * CFG["group_size"]


def test_rank_zero_alone_writes(runs):
    d, _ = runs
    store = RunStore(d / "ddp", readonly=True)
    run_id = store.resolve("ddp")
    assert [r["name"] for r in store.list_runs()] == ["ddp"]
    assert [c["step"] for c in store.checkpoints(run_id)] == [1, 2]
    assert sorted(p.name for p in (d / "ddp" / run_id).iterdir()) == ["checkpoints", "config.toml", "data.sha256"]  # no rank dirs
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


@pytest.fixture(scope="module")
def fsdp_runs(runs, tiny_model_dir):
    """The same config sharded with FSDP2 over 2 gloo processes; and a LoRA + KL (beta > 0) pair,
    one process and FSDP2, where rank 1 has no micro-batch at step 1 and must still run the
    reference forward that rank 0's passes run (a collective once the weights are shards)."""
    from rlft.training.loop import train

    d, _ = runs
    proc = _rlft(d, "train", str(d / "config.toml"), "--nproc", "2", "--set", f"runs_dir={d / 'fsdp'}",
                 "--set", "run_name=fsdp", "--set", "distributed=fsdp2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    lora = dict(lora=True, dtype="bfloat16", beta=0.05, learning_rate=5e-3, checkpoint_every=0)
    single = train(**dict(CFG, **lora), env=str(d / "env.py"), model=tiny_model_dir, runs_dir=str(d / "lora1"))
    sets = [a for k, v in lora.items() for a in ("--set", f"{k}={_toml(v).strip(chr(34))}")]
    proc = _rlft(d, "train", str(d / "config.toml"), "--nproc", "2", "--set", f"runs_dir={d / 'lora2'}",
                 "--set", "distributed=fsdp2", *sets)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return d, single


def test_fsdp2_shards_on_cpu_and_matches_one_process(runs, fsdp_runs):
    d, single_id = runs
    one, two = RunStore(d / "single", readonly=True), RunStore(d / "fsdp", readonly=True)
    fsdp_id = two.resolve("fsdp")
    assert two.get_run(fsdp_id)["status"] == "completed"
    assert [c["step"] for c in two.checkpoints(fsdp_id)] == [1, 2]  # rank 0 wrote them, whole
    keys = ["loss/policy", "optim/grad_norm", "batch/trained_sequences"]
    m1, m2 = one.metrics(single_id, keys), two.metrics(fsdp_id, keys)
    for step in range(1, STEPS + 1):
        assert _rollouts(two, fsdp_id, step) == _rollouts(one, single_id, step)
        for k in keys:
            assert dict(m2[k])[step] == pytest.approx(dict(m1[k])[step], rel=METRIC_RTOL, abs=1e-8), k
        # the checkpoint holds whole tensors under the usual names (gathered from the shards)
        w1, w2 = _weights(d / "single", single_id, step), _weights(d / "fsdp", fsdp_id, step)
        assert w1.keys() == w2.keys() and all(w1[k].shape == w2[k].shape for k in w1)
        assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) <= WEIGHT_ATOL
    # the engine samples from its own whole copy, refreshed from the shards after every step: the
    # probe (at the start; these runs have no eval) and each step's rollouts (all-reduced over the
    # ranks) match the trainer to float32 noise (a stale copy would be ~1e-3 off, see test_remote_engine)
    m = two.metrics(fsdp_id, ["sync/probe_logprob_diff", "sync/logprob_diff_mean"])
    assert [s for s, _ in m["sync/probe_logprob_diff"]] == [0]
    assert [s for s, _ in m["sync/logprob_diff_mean"]] == [1, 2]
    assert max(v for key in m for _, v in m[key]) < 1e-5


def test_fsdp2_lora_with_kl_matches_one_process(fsdp_runs):
    d, single_id = fsdp_runs
    one, two = RunStore(d / "lora1", readonly=True), RunStore(d / "lora2", readonly=True)
    (run2,) = [r["id"] for r in two.list_runs()]
    keys = ["loss/policy", "loss/kl", "optim/grad_norm"]
    m1, m2 = one.metrics(single_id, keys), two.metrics(run2, keys)
    assert dict(m1["loss/kl"])[2] > 0  # the reference (adapters off) really differs by step 2
    for k in keys:
        for step in range(1, STEPS + 1):
            assert dict(m2[k])[step] == pytest.approx(dict(m1[k])[step], rel=1e-4, abs=1e-7), f"{k} at {step}"
    a1, a2 = _weights(d / "lora1", single_id, STEPS), _weights(d / "lora2", run2, STEPS)
    assert a1.keys() == a2.keys() and all("lora_" in k for k in a1)  # a plain peft adapter
    assert max(float((a1[k].float() - a2[k].float()).abs().max()) for k in a1) <= WEIGHT_ATOL


def test_fsdp2_resume_redoes_the_step_and_resumes_in_one_process_too(fsdp_runs):
    import shutil

    d, _ = fsdp_runs
    run_id = RunStore(d / "fsdp", readonly=True).resolve("fsdp")
    w_before = _weights(d / "fsdp", run_id, 2)
    for nproc in ("2", "1"):  # the optimizer state was gathered whole: any number of ranks resumes it
        shutil.rmtree(d / "fsdp" / run_id / "checkpoints" / "step-000002")
        proc = _rlft(d, "train", "--nproc", nproc, "--resume", run_id, "--set", f"runs_dir={d / 'fsdp'}")
        assert proc.returncode == 0, proc.stderr[-6000:]
        w_after = _weights(d / "fsdp", run_id, 2)
        assert max(float((w_before[k] - w_after[k]).abs().max()) for k in w_before) <= WEIGHT_ATOL, nproc


def test_cli_builds_the_torchrun_command():
    cmd = distributed.torchrun_command(2, ["train", "c.toml"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rlft", "train",
                       "c.toml"]
    from rlft.cli import build_parser

    assert build_parser().parse_args(["train", "c.toml", "--nproc", "2"]).nproc == 2

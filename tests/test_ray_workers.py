"""Ray rollout workers on a local Ray instance: same results as in-process; a worker killed
mid-step has its groups retried elsewhere; with retries exhausted they are marked failed."""

import asyncio
import os
import re
import threading
import time
from pathlib import Path

import pytest

try:
    import ray
except ImportError:  # the config checks below still run
    ray = None
needs_ray = pytest.mark.skipif(ray is None, reason="Ray is not installed (pip install 'rlft[ray]')")

from rlft.engines.base import SamplingParams  # noqa: E402
from rlft.env import Sampler  # noqa: E402
from rlft.types import Termination  # noqa: E402

HELPERS = Path(__file__).with_name("ray_helpers.py")
ENV_SPEC = str(HELPERS)  # each actor imports the environment from the file
ENGINE_SPEC = f"{HELPERS}:scripted"
ROWS = [("apple", 3), ("pear", 5), ("plum", 7), ("fig", 11)]


def examples(**extra):
    return [{"prompt": f"What is stored under key {k}?", "ground_truth": v, **extra} for k, v in ROWS]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def sampler():
    from rlft.ray_workers import build_engine

    engine, renderer = build_engine(ENGINE_SPEC)
    return Sampler(engine, renderer, SamplingParams(seed=1), max_seq_len=2048, policy_version=3)


def content(groups):
    """What must match across paths: messages (tool-call ids are random uuids, so numbered),
    tokens, masks, logprobs, rewards, terminations, errors."""
    out = []
    for g in groups:
        for ro in g.rollouts:
            ids = {}
            msgs = repr(ro.messages)
            msgs = re.sub(r"call_[0-9a-f]{12}", lambda m, ids=ids: ids.setdefault(m.group(0), f"call{len(ids)}"), msgs)
            sampled = [t for t, m in zip(ro.completion_ids, ro.mask) if m]
            out.append((g.example_id, ro.group_index, msgs, ro.prompt_ids, sampled, len(ro.completion_ids), ro.mask,
                        ro.logprobs, ro.rewards, ro.reward, ro.termination, [(e.where, e.message) for e in ro.errors],
                        ro.turns, ro.tool_calls, ro.policy_version))
    return out


def run_in_thread(coro_fn):
    box = {}

    def target():
        try:
            box["result"] = asyncio.run(coro_fn())
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


def wait_for(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def markers_of(marker_dir, pid):
    return [n for n in os.listdir(marker_dir) if n.split("-")[1] == str(pid)]


@needs_ray
def test_same_results_as_in_process_and_retry_after_a_kill(local_ray, tmp_path):
    from rlft.ray_workers import RayRolloutPool, import_attr

    env = import_attr(f"{HELPERS}:env")
    expected = asyncio.run(env.run_groups(examples(), sampler(), 2))
    pool = RayRolloutPool(ENV_SPEC, ENGINE_SPEC, 2, num_cpus=0.5)
    try:
        # (a) identical content to the single-process path
        got = asyncio.run(pool.run_groups(examples(), sampler(), 2))
        assert [g.example_id for g in got] == [0, 1, 2, 3]
        assert content(got) == content(expected)
        assert {ro.metrics["rollout/worker"] for g in got for ro in g.rollouts} == {0.0, 1.0}
        assert all(ro.termination == Termination.FINISHED for g in got for ro in g.rollouts)

        # (b) kill worker 0 while its slow tool runs: its groups are retried elsewhere
        rows = examples(marker_dir=str(tmp_path), slow=20, slow_first_only=True)
        victim = pool.info[0]["pid"]
        t, box = run_in_thread(lambda: pool.run_groups(rows, sampler(), 2))
        wait_for(lambda: markers_of(tmp_path, victim), 120, "worker 0's tool to start")
        ray.kill(pool.actors[0])
        t.join(180)
        assert not t.is_alive() and "error" not in box, box.get("error")
        got = box["result"]
        assert pool.retried_groups >= 1 and pool.failed_groups == 0 and pool.restarts >= 1
        assert [g.example_id for g in got] == [0, 1, 2, 3]
        assert content(got) == content(expected)  # whoever ran them
        # the replacement actor is alive and serves the next step
        again = asyncio.run(pool.run_groups(examples(), sampler(), 2))
        assert content(again) == content(expected)
    finally:
        pool.shutdown()


@needs_ray
def test_retries_exhausted_marks_rollouts_failed_and_the_step_completes(local_ray, tmp_path):
    from rlft.ray_workers import RayRolloutPool

    pool = RayRolloutPool(ENV_SPEC, ENGINE_SPEC, 1, num_cpus=0.5)
    try:
        rows = examples(marker_dir=str(tmp_path), slow=60)[:2]
        first, first_pid = pool.actors[0], pool.info[0]["pid"]
        t, box = run_in_thread(lambda: pool.run_groups(rows, sampler(), 2))
        wait_for(lambda: markers_of(tmp_path, first_pid), 120, "the worker's tool to start")
        ray.kill(first)
        wait_for(lambda: pool.actors[0] is not first and pool.info[0]["pid"] != first_pid
                 and markers_of(tmp_path, pool.info[0]["pid"]), 180, "the replacement's tool to start")
        ray.kill(pool.actors[0])
        t.join(120)
        assert not t.is_alive() and "error" not in box, box.get("error")
        got = box["result"]
        assert len(got) == 2 and pool.failed_groups == 2
        for g in got:
            assert len(g.rollouts) == 2
            for ro in g.rollouts:
                assert ro.termination == Termination.ERROR and ro.reward == 0.0
                assert ro.errors and ro.errors[0].where == "worker"
                assert "rollout worker 0" in ro.errors[0].message and "retries exhausted" in ro.errors[0].message
    finally:
        pool.shutdown()


def test_config_keys_default_in_process_and_remote_engine_required():
    import subprocess
    import sys

    from rlft.config import ConfigError, TrainConfig
    from rlft.engines.remote import RemoteEngine
    from rlft.ray_workers import engine_spec_for

    cfg = TrainConfig()
    assert cfg.rollout_workers == 0 and cfg.ray_address == ""
    with pytest.raises(ConfigError, match="engine = \"openai\""):
        TrainConfig(rollout_workers=2).resolved()
    with pytest.raises(ConfigError, match="rollout_workers"):
        TrainConfig(rollout_workers=-1).resolved()
    TrainConfig(rollout_workers=2, engine="openai", engine_url="http://h:8000", model="m").resolved()
    # the actors' engine reaches the trainer's server, under the same tag and stop ids
    trainer_engine = RemoteEngine("http://h:8000/v1", "m", tag="run1", stop_token_ids={2, 1}, max_concurrency=8)
    target, kwargs = engine_spec_for(trainer_engine, tokenizer="m")
    assert target == "rlft.ray_workers:remote_engine"
    assert (kwargs["base_url"], kwargs["model"], kwargs["tokenizer"], kwargs["stop_token_ids"], kwargs["tag"],
            kwargs["max_concurrency"]) == ("http://h:8000", "m", "m", [1, 2], "run1", 8)
    # the default path never imports Ray
    code = "import sys, rlft, rlft.training.loop, rlft.env, rlft.loader; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_pool_refuses_an_in_process_engine_before_starting_ray():
    from rlft.ray_workers import rollout_pool

    with pytest.raises(ValueError, match=r'engine = "openai".*not a ScriptedPolicy'):
        rollout_pool(ENV_SPEC, 2, sampler().engine, tokenizer="m")


def test_an_actor_serves_the_version_the_trainers_engine_serves():
    from rlft.ray_workers import RolloutWorker

    worker = RolloutWorker(ENV_SPEC, ENGINE_SPEC)  # the actor's class, called in-process (no Ray)
    s = sampler()
    group = asyncio.run(worker.run_group(examples()[0], 0, 2, s.params, s.max_seq_len, policy_version=3,
                                         engine_version=5))
    # the rollouts are labelled by the version that sampled them: the trainer's engine's, not the step
    assert worker.engine.policy_version == 5 and [r.policy_version for r in group.rollouts] == [5, 5]


def test_remote_engine_factory_builds_from_plain_values(tmp_path):
    import pickle

    from rlft.ray_workers import build_engine
    from rlft.testing.tokenizer import build_tiny_tokenizer

    build_tiny_tokenizer().save_pretrained(tmp_path)
    spec = pickle.loads(pickle.dumps(("rlft.ray_workers:remote_engine", {
        "base_url": "http://127.0.0.1:9/v1", "model": "m", "tokenizer": str(tmp_path), "tag": "r", "stop_token_ids": [0]})))
    engine, renderer = build_engine(spec)
    assert engine.base_url == "http://127.0.0.1:9" and engine.adapter_name(3) == "m@r@v3" and engine.stop_token_ids == [0]
    assert renderer.render_prompt([{"role": "user", "content": "hi"}])


NO_NAMESPACES = {"env_vars": {"RLFT_SANDBOX_NO_NAMESPACES": "1"}}  # each actor's sandbox: rlimits only


@needs_ray
def test_a_worker_without_namespaces_refuses_untrusted_code_unless_the_run_opted_in(local_ray):
    from rlft.ray_workers import RayRolloutPool
    from rlft.rewards.sandbox import SandboxRefusedError

    spec = f"{HELPERS.with_name('ray_sandbox_helpers.py')}:env"
    with pytest.raises(SandboxRefusedError, match=r"Ray rollout worker.*sandbox_unconfined = true"):
        RayRolloutPool(spec, ENGINE_SPEC, 1, num_cpus=0.5, runtime_env=NO_NAMESPACES)

    pool = RayRolloutPool(spec, ENGINE_SPEC, 1, num_cpus=0.5, runtime_env=NO_NAMESPACES, unconfined=True)
    try:
        assert pool.info[0]["isolation"].startswith("sandbox isolation: rlimits-only")
        got = asyncio.run(pool.run_groups(examples()[:2], sampler(), 2))
        assert [ro.rewards["ran_in_sandbox"] for g in got for ro in g.rollouts] == [1.0] * 4  # the code ran
    finally:
        pool.shutdown()

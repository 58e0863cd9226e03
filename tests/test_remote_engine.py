"""Remote engine and the weight-sync check: /v1/completions on rlft serve, RemoteEngine, LoRA pushes,
a training run whose samples all come from an `rlft serve` subprocess, stale/mismatched engines caught."""

import asyncio
import copy
import os
import re
import socket
import subprocess
import sys
import textwrap
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
pytest.importorskip("peft")

from rlft.engines.base import SamplingParams, WeightFormat, WeightUpdate  # noqa: E402
from rlft.engines.remote import RemoteEngine, RemoteEngineError, version_of  # noqa: E402
from rlft.serve import BackgroundServer, create_app  # noqa: E402
from rlft.store import RunStore  # noqa: E402
from rlft.training.sync import WeightSyncError  # noqa: E402

ENV = textwrap.dedent('''
    from rlft.env import Environment

    def variety(ro):
        return len(set(ro.completion)) / 16

    env = Environment(system_prompt="Say something.", rewards=[variety], max_tokens=8)
    dataset = [{"prompt": f"write {i}", "ground_truth": str(i)} for i in range(20)]
''')


@pytest.fixture(scope="module")
def local(tiny_model_dir):
    """The tiny model in this process (fp32): the reference the server must agree with."""
    from rlft.engines.hf import HFEngine
    from rlft.policy import load_policy

    policy = load_policy(tiny_model_dir, dtype="float32")
    engine = HFEngine(policy.model, policy.tokenizer)
    yield policy, engine
    engine.close()


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    app = create_app(tiny_model_dir, dtype="float32", device="cpu", max_loaded=3, max_batch_size=8)
    with BackgroundServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("proj")
    (d / "env.py").write_text(ENV)
    return d


def _config(project, tiny_model_dir, **kw):
    base = dict(env=str(project / "env.py"), model=tiny_model_dir, dtype="float32", runs_dir=str(project / "runs"), steps=2,
                batch_size=2, group_size=4, eval_size=2, eval_k=1, progress=False, validate=False, seed=0)
    return {**base, **kw}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def subprocess_server(tmp_path_factory, tiny_model_dir):
    """`rlft serve` in its own process on 127.0.0.1 (its access log counts the requests it answered)."""
    d = tmp_path_factory.mktemp("srv")
    port, log = _free_port(), d / "server.log"
    cmd = [sys.executable, "-m", "rlft.cli", "serve", "--model", tiny_model_dir, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--device", "cpu", "--runs-dir", str(d / "runs"), "--max-loaded", "2"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 400  # a loaded machine can take minutes to import torch
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"rlft serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"rlft serve did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        yield url, log, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def completions_answered(log) -> int:
    return len(re.findall(r'"POST /v1/completions HTTP/1\.1" 200', log.read_text()))


# -- /v1/completions on rlft serve -------------------------------------------------------------------

def test_completions_take_token_ids_and_return_sampled_ids_with_one_logprob_each(server, tiny_model_dir, local):
    r = httpx.post(server.url + "/v1/completions", json={
        "model": tiny_model_dir, "prompt": [5, 6, 7, 8], "max_tokens": 6, "temperature": 0, "logprobs": 0,
        "return_token_ids": True}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    c = body["choices"][0]
    assert body["object"] == "text_completion" and body["model"] == tiny_model_dir
    assert c["prompt_token_ids"] == [5, 6, 7, 8] and 1 <= len(c["token_ids"]) <= 6
    assert len(c["logprobs"]["token_logprobs"]) == len(c["token_ids"]) == len(c["logprobs"]["tokens"])
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": len(c["token_ids"]),
                             "total_tokens": 4 + len(c["token_ids"])}
    # the same ids and logprobs as the model in this process (greedy, fp32)
    _, engine = local
    mine = asyncio.run(engine.generate([5, 6, 7, 8], SamplingParams(temperature=0, max_new_tokens=6)))
    assert c["token_ids"] == mine.tokens
    assert c["logprobs"]["token_logprobs"] == pytest.approx(mine.logprobs, abs=1e-4)


def test_completions_accept_strings_and_several_prompts_with_n(server, tiny_model_dir):
    r = httpx.post(server.url + "/v1/completions", json={
        "model": tiny_model_dir, "prompt": ["hello there", [3, 4, 5]], "n": 2, "max_tokens": 3, "seed": 7,
        "return_token_ids": True}, timeout=60)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert choices[2]["prompt_token_ids"] == [3, 4, 5] and choices[0]["prompt_token_ids"] != [3, 4, 5]
    assert all(c["finish_reason"] in ("stop", "length") and c["logprobs"] is None for c in choices)


@pytest.mark.parametrize("extra, param", [
    ({"logprobs": 21}, "logprobs"), ({"echo": True}, "echo"), ({"stream": True}, "stream"),
    ({"prompt": [10 ** 9]}, "prompt"), ({"prompt": []}, "prompt"), ({"prompt": [{"x": 1}]}, "prompt"),
])
def test_completions_reject_what_they_do_not_support_naming_the_field(server, tiny_model_dir, extra, param):
    r = httpx.post(server.url + "/v1/completions", json={"model": tiny_model_dir, "prompt": [1, 2], **extra}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


# -- RemoteEngine -----------------------------------------------------------------------------------

def test_version_names():
    assert version_of("m", "m") == 0 and version_of("m@v12", "m") == 12 and version_of("m@run1@v3", "m", "run1") == 3
    assert version_of("other@v3", "m") is None and version_of("m@run2@v3", "m", "run1") is None
    assert version_of("m@vx", "m") is None


def test_requests_go_to_the_adapter_of_the_engines_policy_version():
    eng = RemoteEngine("http://127.0.0.1:1", "m", tag="run1")
    body = lambda: eng.request_body([1], SamplingParams())["model"]  # noqa: E731
    assert body() == "m"  # version 0: the base model
    eng.policy_version = 3  # what a Ray worker does to follow the trainer's engine: nothing is pushed
    assert body() == "m@run1@v3" and version_of(body(), "m", "run1") == 3 and eng.stats.adapters_loaded == 0


def test_remote_engine_sync_needs_an_adapter_except_for_the_base_model(tmp_path):
    eng = RemoteEngine("http://127.0.0.1:1", "m")
    with pytest.raises(RemoteEngineError, match="adapter_dir"):
        eng.sync_weights(WeightUpdate(1))
    with pytest.raises(ValueError, match="version 0 is the base model"):
        eng.sync_weights(WeightUpdate(0, adapter_dir=str(tmp_path)))
    eng.sync_weights(WeightUpdate(0))  # the base model: nothing to push, nothing to unload
    assert eng.served_name == "m" and eng.stats.adapters_loaded == eng.stats.adapters_unloaded == 0


def test_remote_engine_fails_loudly_without_token_ids_or_with_an_unknown_model(tiny_model_dir):
    eng = RemoteEngine("http://127.0.0.1:1/v1", tiny_model_dir)
    assert eng.base_url == "http://127.0.0.1:1"
    with pytest.raises(RemoteEngineError, match="token ids"):
        eng._sample({"model": tiny_model_dir, "choices": [{"text": "hi", "finish_reason": "stop"}]})
    with pytest.raises(RemoteEngineError, match="neither the base"):
        eng._sample({"model": "someone-else", "choices": [{"token_ids": [1], "logprobs": {"token_logprobs": [-1.0]}}]})


def test_remote_engine_samples_concurrently_like_the_local_engine(server, tiny_model_dir, local):
    eng = RemoteEngine(server.url, tiny_model_dir, max_concurrency=4)
    _, engine = local
    prompt = [11, 12, 13]

    async def both():
        remote = await asyncio.gather(*(eng.generate(prompt, SamplingParams(max_new_tokens=5, seed=s))
                                        for s in range(6)))
        greedy = await eng.generate(prompt, SamplingParams(temperature=0, max_new_tokens=5))
        return remote, greedy

    remote, greedy = asyncio.run(both())
    mine = asyncio.run(engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=5)))
    assert greedy.tokens == mine.tokens and greedy.logprobs == pytest.approx(mine.logprobs, abs=1e-4)
    assert all(len(s.tokens) == len(s.logprobs) and s.policy_version == 0 for s in remote)
    assert eng.stats.requests == 7
    eng.close()


def test_pushed_adapter_serves_the_new_version_and_the_old_one_is_unloaded(server, tiny_model_dir, tmp_path):
    import torch

    from rlft.engines.hf import HFEngine
    from rlft.policy import LoraSpec, load_policy

    policy = load_policy(tiny_model_dir, dtype="float32", lora=LoraSpec(rank=4))
    eng = RemoteEngine(server.url, tiny_model_dir, tag="t")
    local_engine = HFEngine(policy.model, policy.tokenizer)
    prompt, greedy = [21, 22, 23], SamplingParams(temperature=0, max_new_tokens=6)
    names = []
    for version in (1, 2):
        gen = torch.Generator().manual_seed(version)
        with torch.no_grad():
            for n, p in policy.model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        policy.save(tmp_path / f"v{version}")
        eng.sync_weights(WeightUpdate(version, adapter_dir=tmp_path / f"v{version}"))
        got = asyncio.run(eng.generate(prompt, greedy))
        want = asyncio.run(local_engine.generate(prompt, greedy))
        assert got.policy_version == version and got.tokens == want.tokens
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)
        names.append(eng.adapter_name(version))
    served = {m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]}
    assert names[1] in served and names[0] not in served  # the old version was unloaded
    assert eng.stats.adapters_loaded == 2 and eng.stats.adapters_unloaded == 1
    eng.sync_weights(WeightUpdate(2, adapter_dir=tmp_path / "v2"))  # re-pushing a name replaces it
    assert asyncio.run(eng.generate(prompt, greedy)).policy_version == 2
    local_engine.close()
    eng.close()


# -- training against a server in another process -------------------------------------------------

def test_training_run_samples_only_from_the_server_and_pushes_each_step(project, tiny_model_dir, subprocess_server,
                                                                        monkeypatch):
    import rlft.engines.factory
    import rlft.engines.hf
    from rlft.training.loop import train

    url, log, _ = subprocess_server
    made = []
    real = rlft.engines.factory.make_engine

    def capture(options, policy, tag=""):
        made.append(real(options, policy, tag=tag))
        return made[-1]

    def no_local_engine(*a, **k):
        raise AssertionError("engine = openai must not build an in-process engine")

    monkeypatch.setattr(rlft.engines.factory, "make_engine", capture)
    monkeypatch.setattr(rlft.engines.hf.HFEngine, "__init__", no_local_engine)
    before = completions_answered(log)
    run_id = train(_config(project, tiny_model_dir, engine="openai", engine_url=url + "/v1", run_name="remote"))

    store = RunStore(project / "runs", readonly=True)
    run = store.get_run(run_id)
    assert run["status"] == "completed", run.get("error")
    (engine,) = made
    # every sample came from the server: the requests it logged are the engine's, all of them
    answered = completions_answered(log) - before
    train_rollouts = [r for s in (1, 2) for r in store.rollouts(run_id, step=s)]
    assert len(train_rollouts) == 16 and answered == engine.stats.requests >= 16
    # sampled by the weights of the step before: version 0 at step 1, version 1 (the pushed adapter) at step 2
    assert [r["policy_version"] for r in train_rollouts] == [0] * 8 + [1] * 8
    assert {r["policy_version"] for r in store.rollouts(run_id, step=2, split="eval")} == {2}
    assert engine.stats.adapters_loaded == 2 and engine.served_name == f"{tiny_model_dir}@{run_id}@v2"
    assert sorted(p.name for p in (store.run_dir(run_id) / "sync").iterdir()) == ["v1", "v2"]
    served = {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}
    assert f"{tiny_model_dir}@{run_id}@v2" in served and f"{tiny_model_dir}@{run_id}@v1" not in served
    m = store.metrics(run_id, ["sync/policy_lag", "sync/policy_lag_max", "sync/probe_logprob_diff",
                               "sync/logprob_diff_mean"])
    assert m["sync/policy_lag"] == [(1, 0.0), (2, 0.0)] and m["sync/policy_lag_max"] == [(1, 0.0), (2, 0.0)]
    # probed at the start and before the final eval; step 2's rollouts were step 1's sync check
    assert [s for s, _ in m["sync/probe_logprob_diff"]] == [0, 2]
    assert all(v < 1e-3 for _, v in m["sync/probe_logprob_diff"])  # fp32 server copy: numerical noise only
    assert all(v < 1e-3 for _, v in m["sync/logprob_diff_mean"])


def test_a_remote_engine_that_ignores_sync_is_caught_at_the_next_step(project, tiny_model_dir, subprocess_server,
                                                                      monkeypatch):
    import rlft.engines.factory
    from rlft.training.loop import train

    class Stale(RemoteEngine):
        def sync_weights(self, update):
            pass  # keeps serving the weights it had

    def make(options, policy, tag=""):
        return Stale(options.url, options.served_model, tag=tag)

    monkeypatch.setattr(rlft.engines.factory, "make_engine", make)
    with pytest.raises(WeightSyncError, match="stale weights: after the sync to policy version 1 the engine "
                                              "answered with version 0"):
        train(_config(project, tiny_model_dir, engine="openai", engine_url=subprocess_server[0], run_name="stale"))
    run = RunStore(project / "runs", readonly=True).get_run("stale")
    assert run["status"] == "failed" and run["error"].startswith("WeightSyncError: stale weights")
    assert run["step"] == 1  # step 2's rollouts carried version 0: stopped before its update


# -- in-process engines ------------------------------------------------------------------------------

def test_on_policy_run_has_zero_lag(project, tiny_model_dir):
    from rlft.training.loop import train

    run_id = train(_config(project, tiny_model_dir, run_name="onpolicy"))
    store = RunStore(project / "runs", readonly=True)
    assert store.metrics(run_id, ["sync/policy_lag"])["sync/policy_lag"] == [(1, 0.0), (2, 0.0)]
    # with LoRA the default engine samples from a merged copy of the weights: probed at the start and
    # before the final eval, and in between each step's rollouts are the check
    probe = store.metrics(run_id, ["sync/probe_logprob_diff"])["sync/probe_logprob_diff"]
    assert [s for s, _ in probe] == [0, 2] and all(v < 1e-4 for _, v in probe)  # float32: merged == adapted


def test_full_finetune_engine_runs_the_trainers_module_so_nothing_is_probed(project, tiny_model_dir):
    from rlft.training.loop import train

    run_id = train(_config(project, tiny_model_dir, run_name="shared", lora=False, steps=1))
    store = RunStore(project / "runs", readonly=True)
    assert store.metrics(run_id, ["sync/policy_lag"])["sync/policy_lag"] == [(1, 0.0)]
    assert "sync/probe_logprob_diff" not in store.metric_keys(run_id)


def _copy_engine(options, policy, tag=""):
    from rlft.engines.hf import HFEngine

    # a plain copy of the peft model, adapters unmerged (sync_weights copies the trainer's parameters in)
    return HFEngine(policy.model, policy.tokenizer, copy_weights=True)


@pytest.mark.parametrize("setting,probed", [
    # on-policy, untruncated: at the start and before each eval; each step's rollouts check the rest
    ({"eval_every": 2}, [0, 2, 4]),
    # rollouts one version behind cannot check the sync: every sync probed (under overlap the one at
    # the start of steps 2-4, recorded with them, and the last one)
    ({"overlap": True}, [0, 2, 3, 4]),
    ({"top_p": 0.9}, [0, 1, 2, 3, 4]),  # an engine may report truncated logprobs: every sync probed
])
def test_an_engine_with_its_own_copy_is_probed_where_the_rollouts_cannot_check_it(project, tiny_model_dir,
                                                                                  monkeypatch, setting, probed):
    import rlft.engines.factory
    from rlft.training.loop import train

    monkeypatch.setattr(rlft.engines.factory, "make_engine", _copy_engine)
    run_id = train(_config(project, tiny_model_dir, run_name="copy", learning_rate=5e-3, sync_tolerance=1e-3,
                           steps=4, **setting))
    m = RunStore(project / "runs", readonly=True).metrics(run_id, ["sync/probe_logprob_diff", "sync/logprob_diff_mean"])
    assert [s for s, _ in m["sync/probe_logprob_diff"]] == probed
    assert all(v < 1e-5 for _, v in m["sync/probe_logprob_diff"])  # fp32 copy: numerical noise only
    if "eval_every" in setting:  # each step's trained tokens compared, the same noise
        assert [s for s, _ in m["sync/logprob_diff_mean"]] == [1, 2, 3, 4]
        assert all(v < 1e-5 for _, v in m["sync/logprob_diff_mean"])


def test_rollouts_that_disagree_with_the_trainer_stop_the_update_before_its_optimizer_step(tiny_model_dir):
    import torch

    from rlft.config import load_config
    from rlft.policy import load_policy
    from rlft.training.run import update_config
    from rlft.training.sync import trainer_logprobs
    from rlft.training.update import policy_update
    from rlft.types import Group, Rollout

    policy = load_policy(tiny_model_dir, dtype="float32")
    prompt, tokens = policy.tokenizer.encode("count to ten"), policy.tokenizer.encode(" one two three")
    lp = trainer_logprobs(policy, prompt, tokens)
    cfg = load_config(overrides={"learning_rate": 1e-2, "dtype": "float32"}).resolved()
    before = [p.detach().clone() for p in policy.trainable_parameters()]

    def update(shift: float, tolerance: float):
        rollouts = [Rollout(example={}, prompt_ids=prompt, completion_ids=tokens, logprobs=[x - shift for x in lp],
                            mask=[1] * len(tokens), advantage=a, policy_version=3, group_index=i)
                    for i, a in enumerate((1.0, -1.0))]
        opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
        return policy_update(policy, [Group(example={}, rollouts=rollouts)], update_config(cfg, sync_tolerance=tolerance),
                             opt, policy_version=3)

    # the sampler's logprobs 0.2 nats off the trainer's: another model answered
    with pytest.raises(WeightSyncError, match=rf"mismatched weights at policy version 3: .* {2 * len(tokens)} sampled "
                                              r"tokens .* by 0\.2000 on average"):
        update(0.2, tolerance=0.15)
    assert all(torch.equal(a, b) for a, b in zip(before, policy.trainable_parameters()))  # no update applied
    assert all(p.grad is None for p in policy.trainable_parameters())
    stats = update(0.2, tolerance=0.0)  # unchecked (overlap, a probed engine): the update runs
    assert stats["sync/logprob_diff_mean"] == pytest.approx(0.2, abs=1e-5)
    assert not all(torch.equal(a, b) for a, b in zip(before, policy.trainable_parameters()))


class LabelOnly:
    """Reports the new version after a sync but keeps its own copy of the old weights."""

    weight_format = WeightFormat.MODULE

    def __init__(self, policy):
        from rlft.engines.hf import HFEngine

        self.inner = HFEngine(copy.deepcopy(policy.model), policy.tokenizer)
        self.policy_version = 0

    async def generate(self, prompt_ids, params):
        return await self.inner.generate(prompt_ids, params)

    def paused(self):
        return self.inner.paused()

    def clear_prefix_cache(self):
        self.inner.clear_prefix_cache()

    def sync_weights(self, update):
        self.inner.policy_version = self.policy_version = update.version

    def close(self):
        self.inner.close()


@pytest.mark.parametrize("setting,caught_by", [({}, "sampled tokens"), ({"overlap": True}, "-token probe")])
def test_old_weights_under_a_new_label_are_caught_at_the_next_step(project, tiny_model_dir, monkeypatch, setting,
                                                                   caught_by):
    import rlft.engines.factory
    from rlft.training.loop import train

    monkeypatch.setattr(rlft.engines.factory, "make_engine", lambda options, policy, tag="": LabelOnly(policy))
    # fp32: a fresh engine differs by ~1e-7; one step at this learning rate moves the logprobs by ~1e-2.
    # On-policy the next step's rollouts show it, under overlap the probe after the sync
    with pytest.raises(WeightSyncError, match=f"mismatched weights at policy version 1: .*{caught_by}"):
        train(_config(project, tiny_model_dir, run_name="label-only", learning_rate=5e-3, sync_tolerance=1e-3,
                      **setting))
    run = RunStore(project / "runs", readonly=True).get_run("label-only")
    assert run["status"] == "failed" and "WeightSyncError: mismatched weights" in run["error"]
    assert run["step"] == 1  # step 1 recorded, step 2 never applied


def test_sync_check_can_be_turned_off(project, tiny_model_dir, monkeypatch):
    import rlft.engines.factory
    from rlft.training.loop import train

    monkeypatch.setattr(rlft.engines.factory, "make_engine", lambda options, policy, tag="": LabelOnly(policy))
    run_id = train(_config(project, tiny_model_dir, run_name="unchecked", steps=1, learning_rate=5e-3,
                           sync_tolerance=1e-3, sync_check=False))
    store = RunStore(project / "runs", readonly=True)
    assert store.get_run(run_id)["status"] == "completed"
    assert "sync/probe_logprob_diff" not in store.metric_keys(run_id)

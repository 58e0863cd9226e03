"""The training loop's phases, run one at a time on a real run context (tiny random model)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from rlft import Environment  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from rlft.testing.models import save_tiny_model

    d = tmp_path_factory.mktemp("phases") / "model"
    save_tiny_model(str(d))
    return str(d)


def _cfg(model_dir, runs_dir, **kw):
    from rlft.training.run import as_config

    base = dict(model=model_dir, dtype="float32", lora=False, batch_size=2, group_size=4, eval_fraction=0.0,
                validate=False, progress=False, sync_check=False, runs_dir=str(runs_dir), seed=3)
    return as_config(None, {**base, **kw})


def test_refill_samples_new_tokens_for_an_example_already_in_the_step(model_dir, tmp_path):
    """Dynamic sampling's refill draws prompts from a seeded side stream of the data, which can hold
    an example the step already sampled. Rollout seeds derive from (sampler seed, example,
    index): with the step's own sampler seed such a refill repeats the first group's tokens from
    the same weights, ties again, and the refill is wasted compute."""
    from rlft.training.loop import advantages, sample
    from rlft.training.run import open_run

    env = Environment(rewards=[lambda ro: 1.0], max_tokens=8)  # every group ties: refill runs 3 times
    rows = [{"prompt": "say a"}, {"prompt": "say b"}]  # so every refill draws examples already in the step
    cfg = _cfg(model_dir, tmp_path / "runs", dynamic_sampling="refill")
    with open_run(cfg, environment=env, dataset=rows) as run:
        groups, _ = run.wait(sample(run, 0))
        kept, skipped = advantages(run, groups, 0)
    assert (kept, skipped, len(groups)) == ([], 2, 2 + 3 * 2)
    seen: dict[int, list[list[int]]] = {}
    for g in groups:
        tokens = [r.completion_ids for r in g.rollouts]
        assert all(t != s for s in seen.get(g.example_id, []) for t in tokens), "a refill repeated earlier samples"
        seen.setdefault(g.example_id, []).extend(tokens)
    # every rollout of the step keeps its own row in the store: (example, group_index) is unique
    keys = [(r.example_id, r.group_index) for g in groups for r in g.rollouts]
    assert len(keys) == len(set(keys)) == 8 * 4


def test_an_eval_leaves_no_kept_kv_for_the_next_step_to_reuse(model_dir, tmp_path):
    """The engine keeps finished sequences' KV for reuse (``rlft.engines.prefix_cache``). A step
    that reused what an eval kept would prefill in other batch shapes than the same step without
    the eval, so the eval schedule would change training (in bf16 an ulp, then a near-tie's token:
    SmolLM2's rewards moved with ``eval_every``; ``tests/test_demo.py`` checks that end to end)."""
    from rlft.evaluate import evaluate as run_eval
    from rlft.training.loop import evaluate
    from rlft.training.run import open_run

    env = Environment(rewards=[lambda ro: 1.0], max_tokens=8)
    rows = [{"prompt": f"say {c}"} for c in "abcdef"]
    with open_run(_cfg(model_dir, tmp_path / "runs", eval_size=2, eval_k=2), environment=env, dataset=rows) as run:
        run.wait(run_eval(run.env, list(run.eval_set), run.sampler_at(0, "eval"), k=2))
        assert len(run.engine.prefix_cache) > 0  # an eval's finished sequences are kept, as any request's
        evaluate(run, 0)
        assert len(run.engine.prefix_cache) == 0


def test_a_failure_during_setup_closes_the_store_and_marks_the_run_failed(model_dir, tmp_path):
    from rlft.engines import factory
    from rlft.store import RunStore
    from rlft.training import loop

    env = Environment(rewards=[lambda ro: 1.0], max_tokens=8)
    rows = [{"prompt": "say a"}, {"prompt": "say b"}]

    def broken_engine(options, policy, tag=""):
        raise RuntimeError("no engine today")

    mp = pytest.MonkeyPatch()
    mp.setattr(factory, "make_engine", broken_engine)
    try:
        with pytest.raises(RuntimeError, match="no engine today"):
            loop.train(_cfg(model_dir, tmp_path / "runs"), environment=env, dataset=rows)
    finally:
        mp.undo()
    store = RunStore(tmp_path / "runs", readonly=True)
    (run,) = store.list_runs()
    assert run["status"] == "failed" and "no engine today" in run["error"]


def test_mcp_restart_false_makes_every_mcp_server_of_the_environment_fail_fast():
    import sys

    from rlft import MCPServer
    from rlft.training.run import without_mcp_restarts

    env = Environment(tools=[MCPServer(command=sys.executable, args=["a.py"]), lambda x: x], rewards=[lambda ro: 1.0])
    strict = without_mcp_restarts(env)
    assert [s.restart for s in strict.mcp_servers] == [False] and [s.restart for s in env.mcp_servers] == [True]
    assert strict.function_tools.keys() == env.function_tools.keys()


def test_the_step_1_signal_line_says_which_warm_up_to_run_when_no_tool_call_is_valid(model_dir, tmp_path):
    from rlft.store import RunStore
    from rlft.training.loop import train

    def lookup(key: str) -> str:
        """Look a key up.

        Args:
            key: what to look up
        """
        return key

    # partial credit keeps groups untied, so the tied-groups warning alone would say nothing
    env = Environment(tools=[lookup], rewards=[lambda ro: len(set(ro.completion)) / 16], max_tokens=8)
    rows = [{"prompt": f"say {i}"} for i in range(8)]
    run_id = train(_cfg(model_dir, tmp_path / "runs", steps=1), environment=env, dataset=rows)
    store = RunStore(tmp_path / "runs", readonly=True)
    signal = [e["message"] for e in store.logs(run_id) if e["source"] == "signal"]
    store.close()
    assert any("made a valid tool call" in m and "rlft sft" in m for m in signal), signal

"""The rollout loop: token exactness, limits, failure isolation, rewards, custom control."""

import asyncio
import math
import sqlite3
import time

import pytest

from rlft.engines.base import Sample, SamplingParams
from rlft.env import Environment, Sampler
from rlft.rewards import Reward
from rlft.testing import ScriptedPolicy
from rlft.tools import tool
from rlft.types import Rollout, Termination

CALL = '<tool_call>{{"name": "add", "arguments": {{"a": {a}, "b": {b}}}}}</tool_call>'


@tool
def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: first addend
        b: second addend
    """
    return a + b


def run(coro):
    return asyncio.run(coro)


def sampler_for(renderer, script, **kw):
    return Sampler(engine=ScriptedPolicy(renderer, script), renderer=renderer, **{"max_seq_len": 4096, **kw})


def correct(ro: Rollout) -> float:
    return float(ro.completion.strip() == str(ro.ground_truth))


class Recording:
    """Wraps an engine and records what it was given and what it returned."""

    def __init__(self, inner):
        self.inner, self.inputs, self.outputs = inner, [], []

    async def generate(self, prompt_ids, params):
        s = await self.inner.generate(prompt_ids, params)
        self.inputs.append(list(prompt_ids))
        self.outputs.append(list(s.tokens))
        return s


def test_single_turn_answer_finishes_and_is_scored(tiny_renderer):
    env = Environment(system_prompt="Answer with a number.", rewards=[correct])
    groups = run(env.run_groups([{"prompt": "2+3?", "ground_truth": 5}], sampler_for(tiny_renderer, ["5"]), 2))
    ro = groups[0].rollouts[0]
    assert ro.termination == Termination.FINISHED and ro.rewards == {"correct": 1.0} and ro.reward == 1.0
    assert [m["role"] for m in ro.messages] == ["system", "user", "assistant"]
    assert [r.group_index for r in groups[0].rollouts] == [0, 1]


def test_trained_tokens_are_exactly_the_sampled_tokens_across_turns(tiny_renderer):
    script = [CALL.format(a=2, b=3), CALL.format(a=5, b=1), "The sum is 6"]
    engine = Recording(ScriptedPolicy(tiny_renderer, script))
    env = Environment(tools=[add], max_turns=5)
    ro = run(env.rollout({"prompt": "2+3+1?"}, Sampler(engine, tiny_renderer)))
    assert ro.termination == Termination.FINISHED and ro.turns == 3 and ro.tool_calls == 2
    assert len(ro.completion_ids) == len(ro.mask) == len(ro.logprobs)
    # sampled tokens, in order, are exactly what the engine returned; nothing else is masked in
    sampled = [t for t, m in zip(ro.completion_ids, ro.mask) if m]
    assert sampled == [t for out in engine.outputs for t in out]
    # what the engine saw at each turn is a prefix of the sequence we train on
    full = ro.prompt_ids + ro.completion_ids
    for inp in engine.inputs:
        assert full[: len(inp)] == inp
    # tool turns are not trained on and carry no sampling logprob
    assert all(lp == 0.0 for lp, m in zip(ro.logprobs, ro.mask) if not m)
    # and the whole sequence is what the chat template renders for the final conversation
    # (up to the glue after the last end-of-turn token, which nobody sampled)
    text = tiny_renderer.tokenizer.decode(full, skip_special_tokens=False)
    assert text + tiny_renderer.glue == tiny_renderer.render_text(ro.messages, [add.schema()])
    assert [m["content"] for m in ro.tool_messages] == ["5", "6"]


class OddTokenization:
    """Samples 'hi' as single characters: a tokenization the tokenizer itself would never produce."""

    def __init__(self, renderer):
        self.r = renderer

    async def generate(self, prompt_ids, params):
        ids = [self.r.tokenizer.convert_tokens_to_ids(c) for c in "hi"] + self.r.eos_token_ids
        return Sample(tokens=ids, logprobs=[-0.5] * len(ids))


def test_non_canonical_sampled_tokens_are_kept_not_retokenized(tiny_renderer):
    ro = run(Environment().rollout({"prompt": "say hi"}, Sampler(OddTokenization(tiny_renderer), tiny_renderer)))
    odd = [tiny_renderer.tokenizer.convert_tokens_to_ids(c) for c in "hi"]
    assert ro.completion_ids[:2] == odd and ro.completion == "hi"
    assert ro.logprobs == [-0.5] * 3 and ro.mask == [1, 1, 1]


def test_max_turns_ends_the_rollout(tiny_renderer):
    env = Environment(tools=[add], max_turns=2)
    ro = run(env.rollout({"prompt": "q"}, sampler_for(tiny_renderer, [CALL.format(a=1, b=1)])))
    assert ro.termination == Termination.MAX_TURNS and ro.turns == 2


def test_max_tool_calls_ends_the_rollout_before_running_extra_calls(tiny_renderer):
    env = Environment(tools=[add], max_turns=10, max_tool_calls=3)
    ro = run(env.rollout({"prompt": "q"}, sampler_for(tiny_renderer, [CALL.format(a=1, b=1) * 2])))
    assert ro.termination == Termination.MAX_TOOL_CALLS and ro.tool_calls == 2


def test_token_budget_truncation_is_length(tiny_renderer):
    env = Environment(max_tokens=5)
    ro = run(env.rollout({"prompt": "q"}, sampler_for(tiny_renderer, ["a long answer that does not fit in five tokens"])))
    assert ro.termination == Termination.LENGTH and len(ro.completion_ids) == 5 and ro.truncated


def test_context_window_overflow_is_context_exceeded(tiny_renderer):
    env = Environment(max_tokens=1000)
    ro = run(env.rollout({"prompt": "q"}, sampler_for(tiny_renderer, ["a long answer " * 20], max_seq_len=40)))
    assert ro.termination == Termination.CONTEXT_EXCEEDED
    assert len(ro.prompt_ids) + len(ro.completion_ids) == 40


def test_failing_tool_becomes_a_tool_message_and_the_rollout_goes_on(tiny_renderer):
    @tool
    def boom(x: int) -> str:
        """Always fails."""
        raise RuntimeError("disk on fire")

    script = ['<tool_call>{"name": "boom", "arguments": {"x": 1}}</tool_call>', "gave up"]
    ro = run(Environment(tools=[boom]).rollout({"prompt": "q"}, sampler_for(tiny_renderer, script)))
    assert ro.termination == Termination.FINISHED and ro.completion == "gave up"
    assert "disk on fire" in ro.tool_messages[0]["content"]
    assert ro.errors[0].where == "tool:boom" and "RuntimeError" in ro.errors[0].traceback


def test_malformed_tool_call_is_reported_to_the_model(tiny_renderer):
    script = ['<tool_call>{"name": "add", "arguments": {"a": 1,</tool_call>', "ok"]
    ro = run(Environment(tools=[add]).rollout({"prompt": "q"}, sampler_for(tiny_renderer, script)))
    assert ro.termination == Termination.FINISHED and "JSON" in ro.tool_messages[0]["content"]


def test_setup_error_fails_only_that_rollout(tiny_renderer):
    def setup(ro):
        if ro.group_index == 1:
            raise OSError("no workspace")

    env = Environment(setup=setup, rewards=[lambda ro: 1.0])
    g = run(env.run_groups([{"prompt": "q"}], sampler_for(tiny_renderer, ["x"]), 3))[0]
    terms = [r.termination for r in g.rollouts]
    assert terms == [Termination.FINISHED, Termination.SETUP_ERROR, Termination.FINISHED]
    assert [r.reward for r in g.rollouts] == [1.0, 0.0, 1.0]
    assert "no workspace" in g.rollouts[1].errors[0].message


class FlakyEngine:
    def __init__(self, renderer):
        self.r, self.n = renderer, 0

    async def generate(self, prompt_ids, params):
        self.n += 1
        if self.n == 2:
            raise RuntimeError("CUDA out of memory")
        return Sample(tokens=self.r.encode("ok") + self.r.eos_token_ids, logprobs=[0.0] * 2)


def test_engine_error_fails_only_that_rollout_and_teardown_still_runs(tiny_renderer):
    torn = []
    env = Environment(teardown=lambda ro: torn.append(ro.group_index), rewards=[lambda ro: 1.0])
    g = run(env.run_groups([{"prompt": "q"}], Sampler(FlakyEngine(tiny_renderer), tiny_renderer), 3, max_concurrency=1))[0]
    assert sorted(r.termination for r in g.rollouts) == sorted([Termination.FINISHED, Termination.MODEL_ERROR, Termination.FINISHED])
    assert sorted(torn) == [0, 1, 2]
    bad = next(r for r in g.rollouts if r.termination == Termination.MODEL_ERROR)
    assert bad.reward == 0.0 and "out of memory" in bad.errors[0].message


def test_rollout_timeout_is_reported(tiny_renderer):
    env = Environment(rollout_timeout=0.2)
    sampler = Sampler(ScriptedPolicy(tiny_renderer, ["x"], delay=5), tiny_renderer)
    t0 = time.perf_counter()
    ro = run(env.rollout({"prompt": "q"}, sampler))
    assert ro.termination == Termination.TIMEOUT and time.perf_counter() - t0 < 2


def test_overriding_step_gives_a_simulated_user(tiny_renderer):
    class Tutor(Environment):
        async def step(self, rollout, message, calls):
            if "7" in message["content"]:
                return None
            return [{"role": "user", "content": "Not quite, try again."}]

    def script(prompt, turn):
        return ["6", "5", "7"][turn]

    ro = run(Tutor(max_turns=5).rollout({"prompt": "3+4?"}, sampler_for(tiny_renderer, script)))
    assert ro.termination == Termination.FINISHED and ro.turns == 3
    assert [m["role"] for m in ro.messages] == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert sum(ro.mask) == sum(len(tiny_renderer.encode(t)) + 1 for t in ["6", "5", "7"])


def test_reward_failures_score_zero_and_leave_siblings_and_components_alone(tiny_renderer):
    def fragile(ro):
        if ro.group_index == 0:
            raise ValueError("bad regex")
        return 1.0

    def nan_on_1(ro):
        return math.nan if ro.group_index == 1 else 0.5

    async def slow_on_2(ro):
        if ro.group_index == 2:
            await asyncio.sleep(5)
        return 1.0

    env = Environment(rewards=[fragile, nan_on_1, Reward(slow_on_2, timeout=0.2)])
    g = run(env.run_groups([{"prompt": "q"}], sampler_for(tiny_renderer, ["x"]), 4))[0]
    r0, r1, r2, r3 = g.rollouts
    assert r0.rewards == {"fragile": 0.0, "nan_on_1": 0.5, "slow_on_2": 1.0}
    assert r1.rewards == {"fragile": 1.0, "nan_on_1": 0.0, "slow_on_2": 1.0}
    assert r2.rewards == {"fragile": 1.0, "nan_on_1": 0.5, "slow_on_2": 0.0}
    assert r3.rewards == {"fragile": 1.0, "nan_on_1": 0.5, "slow_on_2": 1.0} and r3.errors == []
    assert "bad regex" in r0.errors[0].message and "ValueError" in r0.errors[0].traceback
    assert "nan" in r1.errors[0].message and "timed out" in r2.errors[0].message
    assert [r.termination for r in g.rollouts] == [Termination.REWARD_ERROR] * 3 + [Termination.FINISHED]


def test_weights_make_metrics_and_penalties(tiny_renderer):
    def parts(ro):
        return {"fmt": 1.0, "len": 0.5}

    env = Environment(rewards=[Reward(lambda ro: 1.0, name="correct"), Reward(lambda ro: 3.0, weight=0, name="logged"),
                               Reward(lambda ro: 1.0, weight=-0.5, name="penalty"), Reward(parts, weight=0.2)])
    ro = run(env.run_groups([{"prompt": "q"}], sampler_for(tiny_renderer, ["x"]), 1))[0].rollouts[0]
    assert ro.rewards == {"correct": 1.0, "logged": 3.0, "penalty": 1.0, "fmt": 1.0, "len": 0.5}
    assert ro.reward == pytest.approx(1.0 + 0 - 0.5 + 0.2 * 1.5)


def test_group_reward_sees_all_siblings(tiny_renderer):
    def rank_by_length(rollouts):
        lengths = [len(r.completion) for r in rollouts]
        return [float(n == max(lengths)) for n in lengths]

    script = lambda prompt, turn: "x" * 3  # noqa: E731
    env = Environment(rewards=[Reward(rank_by_length, group=True), correct])
    g = run(env.run_groups([{"prompt": "q", "ground_truth": "xxx"}], sampler_for(tiny_renderer, script), 4))[0]
    assert [r.rewards["rank_by_length"] for r in g.rollouts] == [1.0] * 4
    assert all(r.reward == 2.0 for r in g.rollouts)


def test_extra_fields_and_setup_state_reach_tools_and_rewards(tiny_renderer, tmp_path):
    src = tmp_path / "shop.db"
    with sqlite3.connect(src) as db:
        db.execute("create table items(name text)")

    def setup(ro):  # each rollout writes to its own copy of the database
        path = tmp_path / f"copy-{ro.group_index}.db"
        path.write_bytes(src.read_bytes())
        ro.state["db"] = str(path)

    @tool
    def insert(name: str, rollout: Rollout) -> str:
        """Insert an item."""
        with sqlite3.connect(rollout.state["db"]) as db:
            db.execute("insert into items values (?)", (name + rollout.example["suffix"],))
        return "ok"

    def rows(ro):
        with sqlite3.connect(ro.state["db"]) as db:
            return float(db.execute("select count(*) from items").fetchone()[0])

    script = ['<tool_call>{"name": "insert", "arguments": {"name": "pen"}}</tool_call>', "done"]
    env = Environment(tools=[insert], setup=setup, rewards=[rows])
    g = run(env.run_groups([{"prompt": "q", "suffix": "-x"}], sampler_for(tiny_renderer, script), 3))[0]
    assert [r.rewards["rows"] for r in g.rollouts] == [1.0, 1.0, 1.0]
    with sqlite3.connect(src) as db:
        assert db.execute("select count(*) from items").fetchone()[0] == 0


def test_rollouts_overlap_their_tool_latency(tiny_renderer):
    @tool
    async def slow(x: int) -> int:
        """Sleep then echo."""
        await asyncio.sleep(0.2)
        return x

    script = ['<tool_call>{"name": "slow", "arguments": {"x": 1}}</tool_call>'] * 2 + ["done"]
    env = Environment(tools=[slow], max_turns=4)
    t0 = time.perf_counter()
    groups = run(env.run_groups([{"prompt": f"q{i}"} for i in range(8)], sampler_for(tiny_renderer, script), 4))
    elapsed = time.perf_counter() - t0
    assert all(r.termination == Termination.FINISHED and r.tool_calls == 2 for g in groups for r in g.rollouts)
    assert elapsed < 2.0  # 32 rollouts x 2 sleeps of 0.2 s: serial would take 12.8 s


def test_sampling_params_reach_the_engine(tiny_renderer):
    seen = []

    class Spy(ScriptedPolicy):
        async def generate(self, prompt_ids, params):
            seen.append(params)
            return await super().generate(prompt_ids, params)

    sampler = Sampler(Spy(tiny_renderer, ["x"]), tiny_renderer, params=SamplingParams(temperature=0.7, top_p=0.9))
    run(Environment(max_tokens=33).rollout({"prompt": "q"}, sampler))
    assert seen[0].temperature == 0.7 and seen[0].top_p == 0.9 and seen[0].max_new_tokens == 33

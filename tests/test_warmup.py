"""The SFT warm-up: demonstrations played through the environment, and the cold start it solves.

The end-to-end test is the cold start of a tool environment: the pretrained tiny model answers
"max of ..." but has never seen a tool call, and the reward pays only answers that used the
tool, so the base model scores 0 and GRPO alone has nothing to reinforce. A warm-up on the
environment's own demonstrations (train rows only) makes it call the tool; RL then raises the
held-out reward by a margin over the same run with learning rate 0. Measured on the tiny model as
built on 2026-12-06 (AMX CPU, torch 2.13, transformers 5.25): 40 RL steps gave +0.17 over the
control with seed 0 (the test's), +0.05 with seed 1 and +0.30 with seed 2; 20 steps, the earlier
setting, gave +0.02 with seed 0."""

from __future__ import annotations

import asyncio
import json

import pytest

from rlft.env import Environment

torch = pytest.importorskip("torch")


def lookup(rollout) -> str:
    """Look up the largest number of the question."""
    return str(rollout.example["ground_truth"])


def answered_with_tool(rollout) -> float:
    from rlft.testing.pretrained import correct_answer

    return correct_answer(rollout) if rollout.tool_calls else 0.0


def demonstrate(example):
    return [{"tool_calls": [{"function": {"name": "lookup", "arguments": {}}}]}, example["ground_truth"]]


def lookup_env(**kw) -> Environment:
    opts = dict(system_prompt="Reply with the largest number.", tools=[lookup], rewards=[answered_with_tool],
                max_turns=2, max_tool_calls=1, max_tokens=48, demonstrate=demonstrate, name="tiny-lookup")
    return Environment(**{**opts, **kw})


def test_demonstrations_are_played_through_the_environment_with_real_tool_results():
    from rlft.sft.demonstrations import play

    rows = [{"prompt": "max of 3 9 1", "ground_truth": "9"}, {"prompt": "max of 2 4", "ground_truth": "4"}]
    demos = asyncio.run(play(lookup_env(), rows, example_ids=[10, 11]))
    assert demos.problems == [] and demos.rewards == [1.0, 1.0]
    t = demos.transcripts[0]
    roles = [m["role"] for m in t.messages]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    assert t.messages[3]["content"] == "9"  # the tool ran: its output, not the author's
    call = t.messages[2]["tool_calls"][0]
    assert call["function"]["name"] == "lookup" and json.loads(call["function"]["arguments"]) == {}
    assert t.tools and t.tools[0]["function"]["name"] == "lookup"
    assert t.meta["example_id"] == 10


def test_a_demonstration_that_fails_its_row_is_reported_and_left_out():
    from rlft.sft.demonstrations import play

    def demo(example):
        if example["prompt"].endswith("1"):
            return "7"  # wrong and no tool: scores 0
        if example["prompt"].endswith("2"):
            return [{"tool_calls": [{"function": {"name": "nope", "arguments": "{}"}}]}, "2"]
        if example["prompt"].endswith("3"):
            raise KeyError("answer")
        return None

    rows = [{"prompt": f"max of {i}", "ground_truth": str(i)} for i in (1, 2, 3, 4)]
    demos = asyncio.run(play(lookup_env(demonstrate=demo), rows, min_reward=1.0))
    assert demos.transcripts == []
    text = "\n".join(demos.problems)
    assert "example 0" in text and "min_reward" in text
    assert "example 1" in text and "unknown tool" in text
    assert "example 2" in text and "KeyError" in text
    assert "example 3" in text and "None" in text


def test_demonstrate_returning_a_non_assistant_turn_is_a_named_error():
    from rlft.sft.demonstrations import DemonstrationError, play

    env = lookup_env(demonstrate=lambda ex: [{"role": "tool", "content": "9"}])
    with pytest.raises(DemonstrationError, match=r"demonstrate\(example 0\): message 0 has role 'tool'"):
        asyncio.run(play(env, [{"prompt": "max of 9", "ground_truth": "9"}]))


def _run(tmp_path, model, env, rows, **over):
    from rlft.training.loop import train

    cfg = dict(model=model, dtype="float32", lora=False, learning_rate=1e-3, runs_dir=str(tmp_path / "runs"),
               steps=40, batch_size=8, group_size=8, max_seq_len=384, eval_k=4, eval_temperature=1.0,
               checkpoint_every=0, progress=False, validate=False, seed=0, sft_data="demonstrate", sft_epochs=8,
               sft_batch_size=8, sft_learning_rate=3e-3, eval_fraction=0.0)
    cfg.update(over)
    return train(cfg, environment=env, dataset=rows)


def test_warm_up_on_demonstrations_makes_the_model_call_its_tool_and_rl_then_beats_a_learning_rate_0_control(
        tmp_path, one_thread):
    from rlft.store import RunStore
    from rlft.testing.pretrained import build_pretrained_tiny, task_environment

    model = build_pretrained_tiny(task="max", seed=0)
    _, rows = task_environment("max", n=96)
    env = lookup_env()
    train_rows, held_out = rows[32:], rows[:32]
    data = [{**r, "split": "eval"} for r in held_out] + [{**r, "split": "train"} for r in train_rows]
    rl = _run(tmp_path, model, env, data)
    control = _run(tmp_path, model, env, data, learning_rate=0.0, run_name="lr0")
    store = RunStore(tmp_path / "runs")
    evals = {rid: {e["step"]: e["metrics"] for e in store.evals(rid)} for rid in (rl, control)}
    n_warm = min(evals[rl])
    assert n_warm < 0 and sorted(evals[rl]) == [n_warm, 0, 40]
    base, warm, after = evals[rl][n_warm], evals[rl][0], evals[rl][40]
    ctrl = evals[control][40]
    print(f"\nheld-out reward base {base['reward/mean']:.3f} -> warm-up {warm['reward/mean']:.3f} -> RL "
          f"{after['reward/mean']:.3f} (lr-0 control {ctrl['reward/mean']:.3f}); valid tool calls per rollout "
          f"{base['rollout/valid_tool_calls']:.2f} -> {warm['rollout/valid_tool_calls']:.2f}")
    assert base["rollout/valid_tool_calls"] == 0 and base["reward/mean"] == 0  # the cold start
    assert warm["rollout/valid_tool_calls"] >= 0.3  # the warm-up taught the call
    assert after["reward/mean"] - ctrl["reward/mean"] >= 0.1  # and RL learns from there
    # demonstrations came from the train split only, and are kept for inspection
    demos = [json.loads(line) for line in (store.run_dir(rl) / "warmup.jsonl").read_text().splitlines()]
    held_prompts = {r["prompt"] for r in held_out}
    assert len(demos) == len(train_rows)
    assert not any(m["content"] in held_prompts for d in demos for m in d["messages"] if m["role"] == "user")
    # the warm-up's curve sits left of RL (steps n_warm+1 .. 0); RL's own steps are unchanged
    loss_steps = [s for s, _ in store.metrics(rl, ["warmup/loss"])["warmup/loss"]]
    assert loss_steps == list(range(n_warm + 1, 1))
    assert [s for s, _ in store.metrics(rl, ["reward/mean"])["reward/mean"]] == list(range(1, 41))


ENV_FILE = '''
from rlft import Environment


def lookup(rollout) -> str:
    """Look up the largest number of the question."""
    return str(rollout.example["ground_truth"])


def right(rollout) -> float:
    return float(rollout.completion.strip() == rollout.example["ground_truth"])


def demonstrate(example):
    if example["prompt"] == "max of 0 0":
        return "1"  # a wrong demonstration: played, scored 0, left out with min_reward
    return [{"tool_calls": [{"function": {"name": "lookup", "arguments": {}}}]}, example["ground_truth"]]


env = Environment(system_prompt="Reply with the largest number.", tools=[lookup], rewards=[right],
                  demonstrate=demonstrate)
dataset = [{"prompt": f"max of {a} {b}", "ground_truth": str(max(a, b)), "split": "eval" if a == 9 else "train"}
           for a in range(10) for b in range(3)]
'''


def test_rlft_sft_demonstrate_writes_the_played_train_rows_only(tmp_path, capsys):
    from rlft.cli.main import main

    (tmp_path / "env.py").write_text(ENV_FILE)
    (tmp_path / "config.toml").write_text('env = "env.py"\n')
    out = tmp_path / "demos.jsonl"
    code = main(["sft", "--demonstrate", "--env", str(tmp_path / "config.toml"), "--min-reward", "1",
                 "--harvest-only", "--out", str(out), "--set", "eval_fraction=0", "--runs", str(tmp_path / "runs")])
    assert code == 0, capsys.readouterr()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    prompts = [r["messages"][1]["content"] for r in rows]
    assert len(rows) == 26 and "max of 0 0" not in prompts  # 27 train rows, the wrong demonstration left out
    assert not any(p.startswith("max of 9") for p in prompts)  # held-out rows are never demonstrated
    assert [m["role"] for m in rows[0]["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert "26 of 27 train rows demonstrated" in capsys.readouterr().out


def test_rlft_sft_demonstrate_without_env_is_a_one_line_user_error(capsys):
    from rlft.cli.main import main

    assert main(["sft", "--demonstrate"]) == 2
    assert "--demonstrate needs --env CONFIG" in capsys.readouterr().err

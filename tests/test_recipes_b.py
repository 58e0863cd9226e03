"""Recipes constrained/, code/ and roleplay/: each validates end to end and trains two steps on the
tiny model (in-process CLI); roleplay's logprob judge is the tiny pretrained model in process
(``RLFT_JUDGE_MODEL``), calibrated by ``rlft judge check`` on the recipe's judge_examples. Plus the
recipes' own graders on hand-written replies."""

import importlib.util
import json
from pathlib import Path

import pytest

from rlft.cli import main
from rlft.store import RunStore
from rlft.types import Rollout, Termination

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def load_env(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}_env", RECIPES / name / "env.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def done(text: str, **row) -> Rollout:
    return Rollout(example={"prompt": "p", **row}, messages=[{"role": "user", "content": "p"},
                                                             {"role": "assistant", "content": text}],
                   termination=Termination.FINISHED)


def tiny_overrides(model, runs):
    from rlft.rewards.sandbox import isolation

    # the code recipe's sandbox is refused where this machine grants no namespaces: opt in there
    unconfined = [] if isolation().confined else ["--set", "sandbox_unconfined=true"]
    return ["--set", f"model={model}", "--set", "dtype=float32", "--set", f"runs_dir={runs}", *unconfined]


@pytest.mark.parametrize("name", ["constrained", "code", "roleplay"])
def test_recipe_ships_data_config_and_readme(name):
    d = RECIPES / name
    train = [json.loads(line) for line in (d / "train.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (d / "eval.jsonl").read_text().splitlines()]
    assert len(train) >= 200 and len(held) >= 32
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert (d / "make_data.py").exists() and (d / "config.toml").exists() and "rlft train" in (d / "README.md").read_text()


@pytest.mark.parametrize("recipe_env", ["constrained", "code", "roleplay"])
def test_recipe_validates_and_trains_two_steps_on_the_tiny_model(recipe_env, tiny_model_dir, tmp_path, capsys):
    cfg = str(RECIPES / recipe_env / "config.toml")
    runs = tmp_path / "runs"
    assert main(["validate", cfg, *tiny_overrides(tiny_model_dir, runs)]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "validation passed" in out
    assert ("sandbox isolation: " in out) is (recipe_env == "code")  # only the code recipe runs code
    code = main(["train", cfg, *tiny_overrides(tiny_model_dir, runs), "--set", "steps=2", "--set", "batch_size=2",
                 "--set", "group_size=2", "--set", "eval_max_examples=2", "--set", "eval_k=2",
                 "--set", "checkpoint_every=2", "--set", f"run_name={recipe_env}", "--set", "progress=false"])
    assert code == 0
    run = RunStore(runs, readonly=True).get_run(recipe_env)
    assert run["status"] == "completed" and run["step"] == 2


def test_constrained_graders_give_partial_credit():
    env = load_env("constrained")
    assert env.constraints(done("C is for calm\nA is for air\nT is for time", kind="acrostic", word="CAT")) == 1.0
    assert env.constraints(done("Cats\nnap\nTall", kind="acrostic", word="CAT")) == pytest.approx(2 / 3)
    assert env.constraints(done("- one\n- two\n- three", kind="format", items=3)) == 1.0
    assert 0 < env.constraints(done("Facts:\n- one\n- two", kind="format", items=3)) < 1
    short = done("Blue waves roll in.", kind="words", max_words=10, required=["waves"])
    assert env.constraints(short) == 1.0
    assert env.constraints(done(" ".join(["sea"] * 15), kind="words", max_words=10, required=["waves"])) < 0.5


def test_code_rewards_run_the_hidden_tests_in_the_sandbox():
    import asyncio

    from rlft.rewards import score_group

    env = load_env("code").env
    row = {"entry_point": "add_3", "tests": ["assert add_3(1) == 4", "assert add_3(0) == 3"]}
    right = done("```python\ndef add_3(x):\n    return x + 3\n```", **row)
    half = done("```python\ndef add_3(x):\n    return 4\n```", **row)
    prose = done("def add_3(x) return x plus three", **row)
    asyncio.run(score_group([right, half, prose], env.rewards, 30.0))
    assert right.rewards == {"tests_passed": 1.0, "defines_function": 1.0, "fenced": 1.0}
    assert half.rewards["tests_passed"] == 0.5 and prose.rewards == {"tests_passed": 0.0, "defines_function": 0.0,
                                                                     "fenced": 0.0}
    assert right.reward == pytest.approx(1.3)


def test_roleplay_trains_the_checks_and_its_judged_env_scores_probabilities_from_a_local_judge(
        pretrained_tiny_dir, monkeypatch):
    import asyncio

    from rlft.rewards import score_group

    monkeypatch.delenv("RLFT_JUDGE_URL", raising=False)
    monkeypatch.setenv("RLFT_JUDGE_MODEL", pretrained_tiny_dir)
    mod = load_env("roleplay")
    assert mod.judge.lm is None  # importing the recipe loads no judge model
    assert [r.name for r in mod.env.rewards] == ["persona_words", "word_limit", "no_ai_talk"]
    pirate = done("Arr matey! Storms be loud, but me ship and crew sail through them with courage.")
    assistant = done("As an AI language model, I can explain storms in detail for you.")
    asyncio.run(score_group([pirate, assistant], mod.judged_env.rewards, 120.0))
    assert mod.judge.lm is not None and not pirate.errors and not assistant.errors
    for ro in (pirate, assistant):  # verdicts are probability-weighted levels in [0, 1], with their mass recorded
        assert 0.0 <= ro.rewards["in_character"] <= 1.0 and 0.0 <= ro.rewards["breaks_character"] <= 1.0
        assert 0.0 < ro.metrics["judge/mass_in_character"] <= 1.0
    judged = 0.5 * pirate.rewards["in_character"] - 0.5 * pirate.rewards["breaks_character"]
    assert pirate.reward == pytest.approx(judged + 0.3 + 0.2 + 0.2)
    assert assistant.rewards["no_ai_talk"] == 0.0 and assistant.rewards["persona_words"] == 0.0


def test_roleplay_judged_env_keeps_the_checks_signal_when_the_judge_endpoint_is_down(monkeypatch):
    import asyncio

    from rlft.rewards import score_group

    monkeypatch.setenv("RLFT_JUDGE_URL", "http://127.0.0.1:9/v1")  # nobody listens: judge components 0
    down = load_env("roleplay")
    down.judge.retries, down.judge.timeout = 0, 2
    ro = done("Arr matey! Storms be loud, but me ship and crew sail through them with courage.")
    asyncio.run(score_group([ro], down.judged_env.rewards, 30.0))
    assert ro.rewards["in_character"] == 0.0 and ro.reward == pytest.approx(0.7) and ro.errors


def test_roleplay_judge_check_calibrates_both_rubrics_on_the_judge_examples(pretrained_tiny_dir, monkeypatch,
                                                                             capsys):
    from rlft.rewards.calibration import load_examples

    examples = RECIPES / "roleplay" / "judge_examples.jsonl"
    pairs = load_examples(examples, None)
    prompts = {json.loads(line)["prompt"] for name in ("train", "eval")
               for line in (RECIPES / "roleplay" / f"{name}.jsonl").read_text().splitlines()}
    assert len(pairs) == 16 and not {p.messages[-1]["content"] for p in pairs} & prompts
    monkeypatch.delenv("RLFT_JUDGE_URL", raising=False)
    monkeypatch.setenv("RLFT_JUDGE_MODEL", pretrained_tiny_dir)
    code = main(["judge", "check", str(RECIPES / "roleplay" / "config.toml"), "--set", "env=env.py:judged_env",
                 "--json"])
    out = capsys.readouterr()
    if code == 0:  # the tiny judge passed: the figures come back as JSON
        names = [c["name"] for c in json.loads(out.out)]
    else:  # it did not (a judge that never saw a pirate): the named error carries every rubric's figures
        assert code == 2 and "agreement" in out.err + out.out
        names = [n for n in ("in_character", "breaks_character") if f"{n}: agreement" in out.err + out.out]
    assert names == ["in_character", "breaks_character"]

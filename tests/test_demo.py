"""The bundled demo (rlft.demo): its reward and data are sane (fast), and a 2-step run works (slow)."""

from __future__ import annotations

import json

import pytest

import rlft.demo as demo
from rlft.config import load_config
from rlft.loader import load_splits
from rlft.types import Rollout

GT = {"name": "Alice", "age": 30, "city": "Paris"}


def _reward(text: str, gt: dict = GT) -> float:
    ro = Rollout(example={"prompt": "x", "ground_truth": gt}, messages=[{"role": "assistant", "content": text}])
    return demo.extraction(ro)


def test_perfect_answer_scores_one():
    assert _reward(json.dumps(GT)) == 1.0
    assert _reward('{\n  "name": "Alice",\n  "age": 30,\n  "city": "Paris"\n}') == 1.0
    assert _reward('```json\n{"name": "alice", "age": "30", "city": "Paris"}\n```') == 1.0


def test_chatter_after_json_scores_lower():
    perfect = _reward(json.dumps(GT))
    chatty = _reward(json.dumps(GT) + "\n\nThis JSON object contains the person's name, age and city.")
    assert 0 < chatty < perfect
    assert _reward("Here it is: " + json.dumps(GT)) < perfect


def test_partial_credit_and_failures():
    assert _reward(json.dumps({"name": "Alice", "age": 31, "city": "Rome"})) == pytest.approx(1 / 3)
    assert _reward(json.dumps({"name": "Alice", "age": 30, "city": "Rome"})) == pytest.approx(2 / 3)
    assert _reward('{"name": Alice, "age": 30, "city": "Paris"}') == 0.0  # invalid JSON
    assert _reward("[1, 2, 3]") == 0.0
    assert _reward("Alice is 30 and lives in Paris.") == 0.0
    assert _reward("") == 0.0


def test_rows_are_well_formed_and_deterministic():
    rows = demo.make_rows(50, seed=3)
    assert rows == demo.make_rows(50, seed=3)
    for r in rows:
        gt = r["ground_truth"]
        assert set(gt) == {"name", "age", "city"}
        text = r["prompt"].split("Text: ", 1)[1]
        assert gt["name"] in text and str(gt["age"]) in text and gt["city"] in text
        assert _reward(json.dumps(gt), gt) == 1.0


def test_train_and_eval_rows_are_disjoint():
    cfg = load_config(overrides=demo.DEMO_CONFIG).resolved()
    train, held_out = load_splits(cfg, demo)
    assert len(held_out) == cfg.eval_size
    assert len(train) + len(held_out) == len(demo.dataset)
    assert len(train) >= cfg.batch_size * cfg.steps  # no prompt is trained on twice
    train_prompts = {r["prompt"] for r in train}
    assert not train_prompts & {r["prompt"] for r in held_out}
    assert len(train_prompts) == len(train)


def test_demo_config_is_valid_and_honest():
    cfg = load_config(overrides=demo.DEMO_CONFIG).resolved()
    assert cfg.eval_temperature == cfg.temperature > 0  # the eval samples, like training
    assert cfg.eval_k == 1 and cfg.lora


@pytest.mark.slow
def test_demo_two_steps(tmp_path, capsys):
    rc = demo.run_demo(["steps=2", "eval_size=8", "eval_max_examples=8", "eval_every=0", "batch_size=2",
                        "group_size=4", "progress=false", f"runs_dir={tmp_path}"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "held-out mean reward" in out
    svgs = list(tmp_path.glob("*/heldout_reward.svg"))
    assert len(svgs) == 1 and svgs[0].read_text().startswith("<svg")


@pytest.mark.slow
def test_the_eval_schedule_does_not_change_training(tmp_path):
    """SmolLM2 in bf16, the demo's task: two steps with an eval after the first train the same
    tokens as two steps without it (every step's loss, reward and trainer/sampler difference
    equal), because the eval drops the KV it kept. Without that, the second step reused the eval's
    KV and its loss moved (0.0304 vs 0.0285 in the run that found it)."""
    from rlft.store import RunStore
    from rlft.training.loop import train

    keys = ["loss/policy", "reward/mean", "sync/logprob_diff_mean", "policy/entropy"]
    seen = []
    for every in (0, 1):
        runs = tmp_path / f"every{every}"
        cfg = load_config(overrides={**demo.DEMO_CONFIG, "steps": 2, "eval_size": 8, "eval_max_examples": 8,
                                     "eval_k": 2, "eval_every": every, "progress": False, "runs_dir": str(runs)})
        run_id = train(cfg)
        with RunStore(runs) as store:
            seen.append(store.metrics(run_id, keys))
    assert seen[0] == seen[1]
    assert len(seen[0]["loss/policy"]) == 2

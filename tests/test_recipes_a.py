"""Recipes search, tool_use, structured/json, structured/sql and mcp: each validates end to end
and trains two steps, on the tiny model so that the suite stays fast (the SmolLM2 figures are
in each recipe's README). Plus the parts of each environment a tiny model never reaches:
tools and rewards on scripted answers."""

import asyncio
import json
from pathlib import Path

import pytest

from rlft.cli import main
from rlft.loader import load_environment
from rlft.store import RunStore

ROOT = Path(__file__).resolve().parent.parent / "recipes"
RECIPES = ["search", "tool_use", "structured/json", "structured/sql", "mcp"]


def _overrides(model, runs, extra=()):
    sets = [f"model={model}", "dtype=float32", f"runs_dir={runs}", "progress=false", *extra]
    return [arg for s in sets for arg in ("--set", s)]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_data_has_train_rows_and_a_held_out_split(recipe):
    from rlft.config import load_config
    from rlft.loader import load_splits

    cfg = load_config(str(ROOT / recipe / "config.toml"))
    _, module, _ = load_environment(cfg.env)
    train, held_out = load_splits(cfg, module)
    assert len(train) >= 200 and len(held_out) >= 32


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_validates_and_trains_two_steps(recipe, tiny_model_dir, tmp_path, capsys):
    config, runs = str(ROOT / recipe / "config.toml"), tmp_path / "runs"
    assert main(["validate", config, *_overrides(tiny_model_dir, runs)]) == 0, capsys.readouterr().out
    name = "smoke-" + recipe.replace("/", "-")
    # without the recipes' warm-up (sft_data): playing all train rows' demonstrations and an extra eval
    # would multiply this smoke test's time; the demonstrations are checked below, the warm-up in test_warmup
    small = ["steps=2", "batch_size=2", "group_size=2", "eval_max_examples=2", "eval_k=2", "validate=false",
             "sft_data=", f"run_name={name}"]
    assert main(["train", config, *_overrides(tiny_model_dir, runs, small)]) == 0
    run = RunStore(runs, readonly=True).get_run(name)
    assert run["status"] == "completed" and run["step"] == 2


def _scripted(recipe, example, script):
    """Run the recipe's environment on one example with scripted assistant turns."""
    from rlft.env import Sampler
    from rlft.renderer import Renderer
    from rlft.testing import ScriptedPolicy, build_tiny_tokenizer

    env, _, _ = load_environment(str(ROOT / recipe / "env.py"))
    renderer = Renderer(build_tiny_tokenizer())
    sampler = Sampler(ScriptedPolicy(renderer, script), renderer)
    return asyncio.run(env.run_groups([example], sampler, 1))[0].rollouts[0]


def _call(name, **arguments):
    return f'<tool_call>{json.dumps({"name": name, "arguments": arguments})}</tool_call>'


def test_search_scores_a_good_answer_fully():
    ro = _scripted("search", {"prompt": "What is the capital of Viaholzar?", "ground_truth": "Sapel",
                              "relevant_ids": ["doc-1"], "min_calls": 2},
                   [_call("search", query="Viaholzar"), _call("read", doc_id="doc-1"), "Sapel [doc-1]"])
    assert "[doc-1] Viaholzar Island" in ro.messages[3]["content"] and "capital is Sapel" in ro.messages[5]["content"]
    assert ro.rewards == {"correct": 1.0, "citation_precision": 1.0, "citation_recall": 1.0, "search_efficiency": 1.0,
                          "answer_format": 1.0}


def test_tool_use_rollouts_get_private_databases():
    ro = _scripted("tool_use", {"prompt": "How many units of the green mug are in stock?", "ground_truth": 10},
                   [_call("query", sql="UPDATE products SET stock = 0"), _call("query", sql="SELEC"),
                    _call("query", sql="SELECT stock FROM products WHERE name = 'green mug'"), "0"])
    assert ro.messages[-2]["content"] == "0" and "syntax error" in ro.messages[5]["content"]
    assert ro.rewards["valid_tool_calls"] == pytest.approx(2 / 3) and ro.rewards["correct"] == 0.0
    assert not Path(ro.state["workdir"]).exists()  # teardown removed the copy
    fresh = _scripted("tool_use", {"prompt": "?", "ground_truth": 10},
                      [_call("query", sql="SELECT stock FROM products WHERE name = 'green mug'"), "10"])
    assert fresh.messages[3]["content"] == "10" and fresh.rewards == {"correct": 1.0, "valid_tool_calls": 1.0}


def test_structured_json_rewards():
    gold = {"product": "notebook", "price": 37.78, "currency": "GBP", "quantity": 33, "in_stock": True}
    ro = _scripted("structured/json", {"prompt": "...", "ground_truth": gold}, [json.dumps({**gold, "quantity": "33"})])
    assert ro.rewards == {"json_fields_match": 0.8, "json_schema": 0.0, "json_only": 1.0}


def test_structured_sql_rewards():
    _, module, _ = load_environment(str(ROOT / "structured/sql/env.py"))
    row = next(r for r in module.dataset if "category = 'toys'" in r["ground_truth"])
    good = _scripted("structured/sql", row, ["```sql\nSELECT name FROM products WHERE category='toys';\n```"])
    assert good.rewards == {"sql_match": 1.0, "sql_executes": 1.0}
    runs = _scripted("structured/sql", row, ["SELECT name FROM products"])
    assert runs.rewards == {"sql_match": 0.0, "sql_executes": 1.0}


def test_mcp_calculator_server_answers_tool_calls():
    ro = _scripted("mcp", {"prompt": "A box holds 37 apples. How many apples are in 48 boxes?", "ground_truth": 1776},
                   [_call("calculate", expression="37 * 48"), "1776"])
    assert ro.messages[3]["content"] == "1776" and ro.rewards == {"correct": 1.0, "valid_tool_calls": 1.0}


# every reward component at 1: the sum of the weights (search's citations are two components of 0.25)
FULL_REWARD = {"tool_use": 1.3, "mcp": 1.2, "search": 1.85, "structured/sql": 1.3}


@pytest.mark.parametrize("recipe", FULL_REWARD)
def test_recipe_demonstrations_solve_train_rows_with_full_reward(recipe):
    """The warm-up's demonstrations, played through the recipe's environment (tools really run),
    score every reward component 1 on train rows, two-step ones (cost, two-hop) included."""
    from rlft.config import load_config
    from rlft.loader import load_splits
    from rlft.sft.demonstrations import play

    cfg = load_config(str(ROOT / recipe / "config.toml"))
    env, module, _ = load_environment(cfg.env)
    train, _ = load_splits(cfg, module)
    rows = train[:6] + [r for r in train if r.get("kind") == "cost" or len(r.get("relevant_ids", ())) == 2][:1]
    demos = asyncio.run(play(env, rows))
    assert demos.problems == [] and len(demos.transcripts) == len(rows)
    assert demos.rewards == pytest.approx([FULL_REWARD[recipe]] * len(rows))
    for t in demos.transcripts:
        calls = [m for m in t.messages if m.get("tool_calls")]
        assert (len(calls) > 0) == bool(env.tools)  # the tool recipes demonstrate real tool calls

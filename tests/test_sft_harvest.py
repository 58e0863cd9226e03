"""Demonstrations harvested from rollouts (issue #14 point 2): ``rlft sft --from-run`` on a real
run of the tiny tool-calling model (and on a run store written through ``RunStore``'s API, for
exact counts), and ``rlft sft --teacher`` against a real ``rlft serve`` on 127.0.0.1. Held-out
examples never become demonstrations; tool calls and results come out well formed and render,
then parse back, as RL would sample them."""

import json
import textwrap
from types import SimpleNamespace

import pytest

from rlft.cli import main
from rlft.sft.harvest import HarvestError, harvest_run
from rlft.sft.transcripts import load_transcripts, render_transcripts
from rlft.store import RunStore
from rlft.types import Rollout, Termination

pytestmark = pytest.mark.usefixtures("one_thread")

# the "max" task with its max_of tool; 12 rows, 4 of them held out by the run's config
ENV = textwrap.dedent('''
    from rlft.testing.pretrained import task_environment

    env, dataset = task_environment("max", n=12, with_tools=True)
''')


@pytest.fixture(scope="module")
def ws(tmp_path_factory, pretrained_tiny_tools_dir):
    """A real one-step run of the tiny tool-calling model (train and eval rollouts stored), and a
    hand-written run of the same config whose rollouts are written through RunStore.add_rollouts."""
    from rlft.training.loop import train

    d = tmp_path_factory.mktemp("harvest")
    (d / "env.py").write_text(ENV)
    run_id = train(env=str(d / "env.py"), model=pretrained_tiny_tools_dir, dtype="float32", lora=False,
                   runs_dir=str(d / "runs"), steps=1, batch_size=8, group_size=4, eval_size=4, eval_k=2,
                   eval_every=1, progress=False, validate=False, run_name="real")
    store = RunStore(d / "runs")
    config = store.get_run(run_id)["config"]
    from rlft.sft.harvest import run_environment

    _, train_set, eval_set = run_environment(config, "test")
    hand = store.create_run("hand", config=config, model=config["model"])
    return SimpleNamespace(dir=d, runs=str(d / "runs"), store=store, run_id=run_id, hand=hand, config=config,
                           train=list(train_set), eval=list(eval_set))


def _rollout(example, reward, *, answer="7", numbers=(1, 7), call_id="call_a", termination=Termination.FINISHED,
             group_index=0, tool_call_id=None):
    """A max_of rollout as the RL loop stores it (arguments as a dict, the tool result named)."""
    call = {"id": call_id, "type": "function", "function": {"name": "max_of", "arguments": {"numbers": list(numbers)}}}
    messages = [{"role": "system", "content": "Reply with the largest number."},
                {"role": "user", "content": example["prompt"]},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": str(max(numbers)), "tool_call_id": tool_call_id or call_id, "name": "max_of"},
                {"role": "assistant", "content": answer}]
    return Rollout(example=example, messages=messages, reward=reward, rewards={"correct_answer": reward},
                   termination=termination, example_id=example["example_id"], group_index=group_index)


def _prompts(transcripts):
    return [next(m["content"] for m in t.messages if m["role"] == "user") for t in transcripts]


def test_a_real_runs_best_train_rollouts_become_transcripts_that_render_and_parse_back(ws, tiny_renderer):
    result = harvest_run(ws.store, "real", 1.0)
    assert harvest_run(ws.store, "real", 1.0, renderer=tiny_renderer).counts == result.counts
    assert result.counts["read"] == ws.store.count_rollouts(ws.run_id, split="train") == 32  # eval rows never read
    assert result.transcripts and all(t.meta["reward"] >= 1.0 for t in result.transcripts)
    assert result.counts["kept"] + result.counts["below"] + result.counts["unfinished"] + result.counts["duplicate"] \
        + result.counts["malformed"] == 32
    held_out = {r["prompt"] for r in ws.eval}
    assert not held_out & set(_prompts(result.transcripts))
    for t in result.transcripts:
        assert [s["function"]["name"] for s in t.tools] == ["max_of"] and t.messages[0]["role"] == "system"
        calls = {tc["id"]: tc for m in t.messages for tc in m.get("tool_calls", [])}
        for tc in calls.values():  # OpenAI format: arguments are JSON text
            assert tc["type"] == "function" and isinstance(json.loads(tc["function"]["arguments"]), dict)
        assert all(m["tool_call_id"] in calls for m in t.messages if m["role"] == "tool")
    # a right answer given without the tool is kept too, but some of the kept ones call max_of
    with_calls = [i for i, t in enumerate(result.transcripts) if any(m.get("tool_calls") for m in t.messages)]
    assert with_calls, "the tiny tools model calls max_of in some of its rewarded rollouts"
    # the written file loads, and renders token for token as a rollout, its calls parsed back
    path = ws.dir / "real.jsonl"
    from rlft.sft.transcripts import write_transcripts

    write_transcripts(path, result.transcripts)
    examples, problems = render_transcripts(tiny_renderer, load_transcripts(str(path)))
    assert not problems and len(examples) == len(result.transcripts)
    first = with_calls[0]
    trained = tiny_renderer.decode([i for i, m in zip(examples[first].ids, examples[first].mask) if m])
    assert "<tool_call>" in trained and '"max_of"' in trained


def test_threshold_best_first_dedupe_and_top_k(ws):
    a, b = ws.train[0], ws.train[1]
    ws.store.add_rollouts(ws.hand, 1, [
        _rollout(a, 1.0, call_id="call_1", group_index=0),
        _rollout(a, 1.0, call_id="call_2", group_index=1),  # the same conversation, another call id
        _rollout(a, 0.8, answer="seven is 7", group_index=2),
        _rollout(a, 0.3, answer="1", group_index=3),
        _rollout(b, 0.5, group_index=0),
        _rollout(b, 1.0, termination=Termination.MAX_TURNS, group_index=1),  # cut by a limit
        _rollout(b, 1.0, tool_call_id="call_nowhere", group_index=2),  # a result that answers no call
    ])
    result = harvest_run(ws.store, "hand", 0.5)
    c = result.counts
    assert (c["read"], c["kept"], c["duplicate"], c["below"], c["unfinished"], c["malformed"]) == (7, 3, 1, 1, 1, 1)
    assert [(t.meta["example_id"], t.meta["reward"]) for t in result.transcripts] == [
        (a["example_id"], 1.0), (a["example_id"], 0.8), (b["example_id"], 0.5)]
    assert "call_nowhere" in result.problems[0]
    top1 = harvest_run(ws.store, "hand", 0.5, top_k_per_example=1)
    assert [t.meta["reward"] for t in top1.transcripts] == [1.0, 0.5] and top1.counts["over_top_k"] == 1
    with pytest.raises(HarvestError, match=r"best reward found: 1 over 6 finished"):
        harvest_run(ws.store, "hand", 1.5)


def test_with_a_renderer_a_call_left_as_text_is_dropped_as_the_trainer_would(ws, tiny_renderer):
    """A reply holding tool-call markup the run never parsed (nor ran) would teach a call whose
    result never comes: checks alone pass it, rendering with the run's parser does not."""
    run = ws.store.create_run("as-text", config=ws.config, model=ws.config["model"])
    as_text = '<tool_call>{"name": "max_of", "arguments": {"numbers": [7]}}</tool_call>'
    ws.store.add_rollouts(run, 1, [_rollout(ws.train[0], 1.0, answer=as_text), _rollout(ws.train[1], 1.0)])
    assert harvest_run(ws.store, run, 1.0).counts["kept"] == 2
    checked = harvest_run(ws.store, run, 1.0, renderer=tiny_renderer)
    assert _prompts(checked.transcripts) == [ws.train[1]["prompt"]] and checked.counts["malformed"] == 1
    assert "parser reads as calls" in checked.problems[0]


def test_held_out_examples_never_become_demonstrations(ws):
    store = ws.store
    leak = store.create_run("leaky", config=ws.config, model=ws.config["model"])
    ev = ws.eval[0]  # an example of the run's eval split (its config reloaded) ...
    sampled_as_train = {**ev, "example_id": ws.train[2]["example_id"]}  # ... stored as a train rollout
    stored_eval = {"prompt": "max of 1 2 9", "ground_truth": "9", "numbers": [1, 2, 9], "example_id": 0}
    store.add_rollouts(leak, 1, [_rollout(sampled_as_train, 1.0), _rollout({**stored_eval, "example_id": 5}, 1.0),
                                 _rollout(ws.train[3], 1.0)])
    store.add_rollouts(leak, 1, [_rollout(stored_eval, 1.0)], split="eval")  # only the store knows this one
    result = harvest_run(store, "leaky", 1.0)
    assert _prompts(result.transcripts) == [ws.train[3]["prompt"]]
    assert result.counts["held_out"] == 2 and result.counts["read"] == 3
    only_eval = store.create_run("only-eval", config=ws.config, model=ws.config["model"])
    store.add_rollouts(only_eval, 1, [_rollout(sampled_as_train, 1.0)])
    with pytest.raises(HarvestError, match="1 belong to held-out examples"):
        harvest_run(store, "only-eval", 1.0)


def test_unknown_runs_and_runs_without_train_rollouts_are_user_errors(ws, capsys):
    from rlft.errors import UnknownRunError

    with pytest.raises(UnknownRunError, match="no run 'nope'"):
        harvest_run(ws.store, "nope", 1.0)
    empty = ws.store.create_run("empty", config=ws.config)
    with pytest.raises(HarvestError, match="has no train rollouts"):
        harvest_run(ws.store, empty, 1.0)
    assert main(["sft", "--from-run", "nope", "--min-reward", "1", "--runs", ws.runs]) == 2
    assert "rlft sft: no run 'nope'" in capsys.readouterr().err
    assert main(["sft", "--from-run", "real", "--min-reward", "5", "--runs", ws.runs]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no finished rollout reaches reward 5 (best reward found: 1 " in err
    assert main(["sft", "--from-run", "real", "--runs", ws.runs]) == 2
    assert "--min-reward X is required" in capsys.readouterr().err


def test_cli_harvest_only_writes_transcripts_and_from_run_trains_the_runs_base_model(ws, capsys):
    out = ws.dir / "demos.jsonl"
    assert main(["sft", "--from-run", "real", "--min-reward", "1", "--runs", ws.runs, "--harvest-only",
                 "--out", str(out), "--set", "eval_fraction=0"]) == 0
    printed = capsys.readouterr().out
    assert f"-> {out}" in printed and f"rlft sft --data {out}" in printed
    assert len(load_transcripts(str(out))) == harvest_run(ws.store, "real", 1.0).counts["kept"]
    before = {r["id"] for r in ws.store.list_runs()}
    assert main(["sft", "--from-run", "real", "--min-reward", "1", "--runs", ws.runs, "--steps", "2",
                 "--name", "expert", "--set", "progress=false"]) == 0
    (new,) = [r for r in ws.store.list_runs() if r["id"] not in before]
    assert new["kind"] == "sft" and new["status"] == "completed"
    cfg = new["config"]
    assert cfg["model"] == ws.config["model"] and cfg["lora"] is False and cfg["dtype"] == "float32"
    demos = load_transcripts(cfg["data"])  # written under <runs>/demonstrations, whole examples held out
    assert cfg["data"].startswith(ws.runs) and demos[0].meta["source"] == f"run:{ws.run_id}"
    held = {t.meta["example_id"] for t in load_transcripts(cfg["eval_data"])}  # eval_fraction 0.1: one example
    assert len(held) == 1 and not held & {t.meta["example_id"] for t in demos}
    assert ws.store.metrics(new["id"], ["eval/loss"])["eval/loss"]


TEACHER_CONFIG = """env = "env.py"
eval_data = "teacher_eval.jsonl"
temperature = 0.0
"""


def test_teacher_through_a_real_server_runs_the_tools_and_never_sees_held_out_examples(ws, tiny_renderer, capsys):
    from rlft.serve import BackgroundServer, create_app
    from rlft.testing import ScriptedPolicy

    asked = []

    def teacher(prompt, turn):
        """Calls max_of on the user's numbers, then answers with its result; wrong (-1) when the
        list starts with an odd number, so that --min-reward has something to drop."""
        asked.append(prompt.split("max of ")[-1].split("<|im_end|>")[0])
        numbers = [int(x) for x in asked[-1].split()]
        if turn == 0:
            return '<tool_call>{"name": "max_of", "arguments": {"numbers": %s}}</tool_call>' % json.dumps(numbers)
        result = prompt.split("<|im_start|>tool\n")[-1].split("<|im_end|>")[0]
        return "-1" if numbers[0] % 2 else f"The largest is {result}"

    rows = [{k: v for k, v in r.items() if k != "example_id"} for r in ws.train + ws.eval]  # the module's 12
    leaked = next(r for r in rows if r["numbers"][0] % 2 == 0)  # held out, though also among the train rows
    (ws.dir / "teacher_eval.jsonl").write_text(json.dumps(leaked) + "\n")
    (ws.dir / "teacher.toml").write_text(TEACHER_CONFIG)
    out = ws.dir / "teacher.jsonl"
    app = create_app(engines={"teacher-7b": (ScriptedPolicy(tiny_renderer, teacher), tiny_renderer)})
    with BackgroundServer(app) as srv:
        code = main(["sft", "--teacher", srv.url + "/v1", "--teacher-model", "teacher-7b",
                     "--env", str(ws.dir / "teacher.toml"), "--samples", "2", "--min-reward", "1",
                     "--harvest-only", "--out", str(out), "--set", "eval_fraction=0"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    demos = load_transcripts(str(out))
    right = [r for r in rows if r["numbers"][0] % 2 == 0 and r is not leaked]
    # two identical samples per prompt (temperature 0): one kept per rightly answered train example
    assert right and sorted(_prompts(demos)) == sorted(r["prompt"] for r in right)
    assert leaked["prompt"] not in _prompts(demos) and leaked["prompt"][len("max of "):] not in asked
    assert "22 rollouts read" in printed and f"{len(right)} kept" in printed and "(1 held-out examples not sampled)" in printed
    for t in demos:
        (call,) = t.messages[2]["tool_calls"]
        numbers = json.loads(call["function"]["arguments"])["numbers"]
        assert t.messages[3] == {"role": "tool", "content": str(max(numbers)), "tool_call_id": call["id"],
                                 "name": "max_of"}
        assert t.messages[-1]["content"] == f"The largest is {max(numbers)}"
        assert t.meta["source"].startswith("teacher:teacher-7b@http://127.0.0.1:")
    examples, problems = render_transcripts(tiny_renderer, demos)
    assert not problems and len(examples) == len(demos)

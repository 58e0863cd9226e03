"""The run store: round trips, filters, upserts, resume truncation, read-only access, WAL readers."""

from __future__ import annotations

import json
import math
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rlft.store import RunStore
from rlft.types import Rollout, RolloutError, Termination, ToolCall

REPO = Path(__file__).resolve().parents[1]


def make_rollout(example_id=0, group_index=0, reward=1.0, termination=Termination.FINISHED, text="42", **kw):
    messages = [
        {"role": "system", "content": "You are a calculator."},
        {"role": "user", "content": f"What is 6*7? (example {example_id})"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "multiply", "arguments": {"a": 6, "b": 7}}}]},
        {"role": "tool", "tool_call_id": "c1", "name": "multiply", "content": "42"},
        {"role": "assistant", "content": text},
    ]
    return Rollout(example={"prompt": "What is 6*7?", "ground_truth": "42", "id": example_id}, messages=messages,
                   prompt_ids=[1, 2, 3], completion_ids=[4, 5, 6, 7, 8], logprobs=[-0.1] * 5, mask=[1, 1, 0, 0, 1],
                   termination=termination, rewards={"correct": reward, "format": 0.5}, reward=reward, advantage=0.25,
                   turns=2, tool_calls=1, example_id=example_id, group_index=group_index, policy_version=3,
                   logs=["setup ok"], metrics={"time/tool": 0.01}, **kw)


@pytest.fixture
def store(tmp_path):
    with RunStore(tmp_path / "runs") as s:
        yield s


def test_workspace_dir_holds_db_and_run_dirs(tmp_path):
    s = RunStore(tmp_path / "ws")
    run_id = s.create_run(config={})
    assert s.path == tmp_path / "ws" / "rlft.db" and s.path.is_file()
    assert s.run_dir(run_id) == tmp_path / "ws" / run_id
    assert s._conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert s._conn().execute("PRAGMA user_version").fetchone()[0] >= 1
    with pytest.raises(ValueError):
        s.run_dir("../escape")
    s.close()


def test_run_round_trip_with_failure_reason_and_traceback(store):
    cfg = {"lr": 1e-6, "model": "tiny", "nested": {"tools": ["a", "b"]}, "path": Path("/x")}
    run_id = store.create_run(name="GSM8K baseline", config=cfg, model="tiny", environment="calc",
                              env_source="def reward(r):\n    return 1.0  # <script>ünïcode</script>\n")
    assert run_id.startswith("gsm8k-baseline-")
    run = store.get_run(run_id)
    assert run["status"] == "created" and run["name"] == "GSM8K baseline"
    assert run["config"] == {**cfg, "path": "/x"}
    assert run["env_source"].endswith("<script>ünïcode</script>\n")
    store.set_status(run_id, "running")
    assert store.get_run(run_id)["started_at"] is not None
    store.update_run(run_id, step=7)
    tb = 'Traceback (most recent call last):\n  File "x.py", line 1\nRuntimeError: boom ✗'
    store.set_status(run_id, "failed", error="RuntimeError: boom ✗", traceback=tb)
    run = store.get_run(run_id)
    assert (run["status"], run["error"], run["traceback"], run["step"]) == ("failed", "RuntimeError: boom ✗", tb, 7)
    assert run["finished_at"] >= run["started_at"]
    store.set_status(run_id, "running")  # a resume clears the earlier failure
    run = store.get_run(run_id)
    assert run["error"] is None and run["finished_at"] is None
    with pytest.raises(ValueError):
        store.set_status(run_id, "exploded")
    with pytest.raises(KeyError):
        store.set_status("no-such-run", "running")


def test_get_run_accepts_exact_id_name_or_unique_prefix(store):
    a = store.create_run(name="alpha", config={})
    b = store.create_run(name="beta", config={})
    c = store.create_run(config={})
    assert c.startswith("r-") and store.get_run(c)["name"] == c
    assert store.get_run("alpha")["id"] == a
    assert store.get_run("bet")["id"] == b  # prefix of the id "beta-xxxx"
    assert store.get_run(a[:-1])["id"] == a
    with pytest.raises(KeyError):
        store.get_run("nope")
    store.create_run(name="alpha2", config={})
    assert store.get_run("alpha")["id"] == a  # an exact name wins over a prefix
    with pytest.raises(KeyError, match="ambiguous"):
        store.get_run("alp")
    assert [r["id"] for r in store.list_runs()][-2:] == [b, a]  # newest first


def test_logging_same_step_and_key_twice_keeps_one_row_with_latest_value(store):
    run_id = store.create_run(config={})
    store.log_metrics(run_id, 1, {"reward/mean": 0.1, "loss/policy": 2.0})
    store.log_metrics(run_id, 1, {"reward/mean": 0.3})
    store.log_metrics(run_id, 2, {"reward/mean": float("nan"), "optim/lr": 1e-6})
    assert store.metrics(run_id) == {"loss/policy": [(1, 2.0)], "optim/lr": [(2, 1e-6)],
                                     "reward/mean": [(1, 0.3), (2, None)]}
    n = store._conn().execute("SELECT COUNT(*) FROM metrics WHERE step=1 AND key='reward/mean'").fetchone()[0]
    assert n == 1
    assert store.metrics(run_id, keys=["optim/lr"]) == {"optim/lr": [(2, 1e-6)]}
    assert store.metric_keys(run_id) == ["loss/policy", "optim/lr", "reward/mean"]
    assert store.latest_metrics(run_id) == {"loss/policy": 2.0, "optim/lr": 1e-6, "reward/mean": None}


def test_rollout_round_trip_keeps_messages_errors_and_text_verbatim(store):
    run_id = store.create_run(config={})
    try:
        raise ValueError("tool exploded ☃")
    except ValueError as e:
        err = RolloutError.from_exception("tool:multiply", e)
    r = make_rollout(text='<script>alert("x")</script> résumé 你好\n**done**', errors=[err])
    r.messages[2]["tool_calls"].append(ToolCall(name="bad", arguments={}, error="unparsable").to_openai())
    r.rewards["nan_component"] = float("nan")
    store.add_rollouts(run_id, 5, [r])
    (row,) = store.rollouts(run_id)
    assert row["messages"][:-1] == r.messages[:-1]
    assert row["messages"][-1]["content"] == '<script>alert("x")</script> résumé 你好\n**done**'
    assert row["errors"] == [{"where": "tool:multiply", "message": "ValueError: tool exploded ☃",
                              "traceback": err.traceback}]
    assert "Traceback (most recent call last)" in row["errors"][0]["traceback"]
    assert row["rewards"] == {"correct": 1.0, "format": 0.5, "nan_component": None}
    assert (row["reward"], row["advantage"], row["termination"]) == (1.0, 0.25, "finished")
    assert (row["num_prompt_tokens"], row["num_completion_tokens"], row["num_sampled_tokens"]) == (3, 5, 3)
    assert (row["turns"], row["tool_calls"], row["policy_version"], row["step"]) == (2, 1, 3, 5)
    assert row["example"]["ground_truth"] == "42" and row["logs"] == ["setup ok"]
    assert row["metrics"] == {"time/tool": 0.01}
    assert "completion_ids" not in row and "logprobs" not in row  # token ids are not stored
    assert store.rollout(row["id"]) == row
    with pytest.raises(KeyError):
        store.rollout(row["id"] + 1000)


def test_storing_a_rollout_again_replaces_it(store):
    run_id = store.create_run(config={})
    store.add_rollouts(run_id, 1, [make_rollout(reward=0.0, text="first"), make_rollout(group_index=1)])
    store.add_rollouts(run_id, 1, [make_rollout(reward=1.0, text="second")])
    rows = store.rollouts(run_id, step=1)
    assert [(r["group_index"], r["reward"]) for r in rows] == [(0, 1.0), (1, 1.0)]
    assert store.rollouts(run_id, search="second")[0]["group_index"] == 0
    assert store.rollouts(run_id, search="first") == []  # the search index follows the replacement


def test_rollout_filters(store):
    run_id = store.create_run(config={})
    store.add_rollouts(run_id, 1, [make_rollout(0, 0, 0.0, Termination.LENGTH, "the answer is unknown"),
                                   make_rollout(0, 1, 1.0, Termination.FINISHED, "forty-two"),
                                   make_rollout(1, 0, 0.5, Termination.TOOL_ERROR, "tool_call failed 100%")])
    store.add_rollouts(run_id, 2, [make_rollout(1, 0, 1.0), make_rollout(2, 0, -1.0, Termination.TIMEOUT)])
    store.add_rollouts(run_id, 2, [make_rollout(0, 0, 0.7)], split="eval")

    def ids(**kw):
        return [(r["step"], r["example_id"], r["group_index"]) for r in store.rollouts(run_id, **kw)]

    assert ids(step=2) == [(2, 1, 0), (2, 2, 0)]
    assert ids(example_id=1) == [(1, 1, 0), (2, 1, 0)]
    assert ids(min_reward=0.5, max_reward=1.0) == [(1, 0, 1), (1, 1, 0), (2, 1, 0)]
    assert ids(termination=Termination.LENGTH) == [(1, 0, 0)]
    assert ids(termination=["tool_error", "timeout"]) == [(1, 1, 0), (2, 2, 0)]
    assert ids(search="forty") == [(1, 0, 1)]
    assert ids(search="FORTY-TWO") == [(1, 0, 1)]
    assert ids(search="tool_call fail") == [(1, 1, 0)]  # last word is a prefix
    assert ids(search="100%") == [(1, 1, 0)]
    assert ids(search="multiply") == ids()  # tool-call names are searchable
    assert ids(search="%") == [(1, 1, 0)]  # no word characters: literal substring, not a wildcard
    assert ids(split="eval") == [(2, 0, 0)] and len(ids(split=None)) == 6
    assert ids(limit=2, offset=1) == [(1, 0, 1), (1, 1, 0)]
    assert store.count_rollouts(run_id, min_reward=0.5) == 3
    assert store.rollout_steps(run_id) == [1, 2] and store.rollout_steps(run_id, split="eval") == [2]
    assert store.termination_counts(run_id) == {"finished": 2, "length": 1, "tool_error": 1, "timeout": 1}
    assert store.termination_counts(run_id, step=2) == {"finished": 1, "timeout": 1}


def test_reward_heatmap_is_mean_reward_per_example_and_step(store):
    run_id = store.create_run(config={})
    store.add_rollouts(run_id, 1, [make_rollout(0, 0, 0.0), make_rollout(0, 1, 1.0), make_rollout(3, 0, 0.25)])
    store.add_rollouts(run_id, 2, [make_rollout(0, 0, 1.0), make_rollout(0, 1, 1.0)])
    store.add_rollouts(run_id, 2, [make_rollout(0, 0, -5.0)], split="eval")
    assert store.reward_heatmap(run_id) == {0: {1: 0.5, 2: 1.0}, 3: {1: 0.25}}
    assert store.reward_heatmap(run_id, split="eval") == {0: {2: -5.0}}


def test_logs_checkpoints_and_evals_round_trip(store):
    run_id = store.create_run(config={})
    store.add_log(run_id, "starting", source="train")
    store.add_log(run_id, "slow judge", level="warning", step=3, source="reward:judge")
    store.add_log(run_id, "<b>crash</b>", level="error", step=4, traceback="Traceback...\nKeyError: 'x'")
    logs = store.logs(run_id)
    assert [(entry["level"], entry["message"], entry["step"]) for entry in logs] == [
        ("info", "starting", None), ("warning", "slow judge", 3), ("error", "<b>crash</b>", 4)]
    assert logs[2]["traceback"] == "Traceback...\nKeyError: 'x'" and logs[1]["source"] == "reward:judge"
    assert [entry["message"] for entry in store.logs(run_id, level="warning")] == ["slow judge", "<b>crash</b>"]
    assert [entry["message"] for entry in store.logs(run_id, after_id=logs[0]["id"], limit=1)] == ["slow judge"]

    store.add_checkpoint(run_id, 10, "runs/x/step-10", metrics={"reward/mean": 0.5})
    store.add_checkpoint(run_id, 20, Path("runs/x/step-20"))
    store.add_checkpoint(run_id, 10, "runs/x/step-10b")
    store.remove_checkpoint(run_id, 20)
    assert [(c["step"], c["path"], c["metrics"]) for c in store.checkpoints(run_id)] == [(10, "runs/x/step-10b", {})]

    e1 = store.add_eval(run_id, model="tiny@10", split="test", k=4, step=10, checkpoint="runs/x/step-10",
                        metrics={"pass@k": 0.75, "max@k": 0.9})
    e2 = store.add_eval(None, model="base", k=1, metrics={"reward/mean": 0.1})
    assert e2 > e1
    (ev,) = store.evals(run_id)
    assert (ev["id"], ev["model"], ev["split"], ev["k"], ev["step"], ev["metrics"]) == (
        e1, "tiny@10", "test", 4, 10, {"pass@k": 0.75, "max@k": 0.9})
    assert [e["id"] for e in store.evals()] == [e1, e2]


def test_truncate_after_removes_later_metrics_and_rollouts_and_keeps_logs(store):
    run_id = store.create_run(config={})
    other = store.create_run(config={})
    for step in range(1, 6):
        store.log_metrics(run_id, step, {"reward/mean": step / 10})
        store.add_rollouts(run_id, step, [make_rollout(0, 0, text=f"step{step}")])
        store.add_log(run_id, f"step {step}", step=step)
    store.log_metrics(other, 5, {"reward/mean": 1.0})
    store.update_run(run_id, step=5)
    store.truncate_after(run_id, 3)
    assert store.metrics(run_id)["reward/mean"] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert store.rollout_steps(run_id) == [1, 2, 3]
    assert store.rollouts(run_id, search="step5") == []
    assert len(store.logs(run_id)) == 5
    assert store.get_run(run_id)["step"] == 3
    assert store.metrics(other) == {"reward/mean": [(5, 1.0)]}
    store.log_metrics(run_id, 4, {"reward/mean": 0.45})  # the resumed run re-logs step 4 once
    assert store.metrics(run_id)["reward/mean"][-1] == (4, 0.45)


def test_stop_request_round_trip_and_cleared_on_restart(store):
    run_id = store.create_run(config={})
    store.set_status(run_id, "running")
    assert store.stop_requested(run_id) is False
    store.request_stop(run_id)
    assert store.stop_requested(run_id) is True and store.get_run(run_id)["stop_requested"] is True
    store.set_status(run_id, "stopped")
    store.set_status(run_id, "running")
    assert store.stop_requested(run_id) is False


def test_readonly_store_cannot_write_and_does_not_create_a_missing_db(tmp_path):
    with pytest.raises(FileNotFoundError):
        RunStore(tmp_path / "missing", readonly=True)
    assert not (tmp_path / "missing").exists()
    writer = RunStore(tmp_path)
    run_id = writer.create_run(name="r", config={"a": 1})
    writer.log_metrics(run_id, 1, {"x": 1.0})
    reader = RunStore(tmp_path / "rlft.db", readonly=True)
    assert reader.get_run("r")["config"] == {"a": 1} and reader.metrics(run_id) == {"x": [(1, 1.0)]}
    for write in (lambda: reader.create_run(config={}), lambda: reader.log_metrics(run_id, 2, {"x": 2.0}),
                  lambda: reader.request_stop(run_id), lambda: reader.truncate_after(run_id, 0)):
        with pytest.raises(PermissionError):
            write()
    with pytest.raises(sqlite3.OperationalError, match="readonly"):  # the connection itself is read-only
        reader._conn().execute("DELETE FROM metrics")
    writer.log_metrics(run_id, 2, {"x": 2.0})
    assert reader.metrics(run_id) == {"x": [(1, 1.0), (2, 2.0)]}  # sees later commits
    reader.close()
    writer.close()


def test_store_is_usable_from_several_threads(store):
    import threading

    run_id = store.create_run(config={})
    errors = []

    def work(i):
        try:
            for step in range(20):
                store.log_metrics(run_id, step, {f"k{i}": float(step)})
                store.add_log(run_id, f"t{i} s{step}")
        except Exception as e:  # pragma: no cover  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(store.metric_keys(run_id)) == 4 and len(store.logs(run_id)) == 80


READER = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, sys.argv[2])
    from rlft.store import RunStore
    store = RunStore(sys.argv[1], readonly=True)
    reads, errors, last, deadline = 0, [], 0, time.time() + 1.0
    while time.time() < deadline or reads < 20:
        try:
            series = store.metrics(sys.argv[3]).get("loss", [])
            store.rollouts(sys.argv[3], limit=5)
            assert [s for s, _ in series] == sorted(s for s, _ in series)
            last = max(last, len(series))
            reads += 1
        except Exception as e:
            errors.append(repr(e))
    print(json.dumps({"reads": reads, "errors": errors, "last": last}))
""")


def test_another_process_reads_while_this_one_keeps_writing(tmp_path):
    store = RunStore(tmp_path)
    run_id = store.create_run(config={})
    store.log_metrics(run_id, 0, {"loss": 1.0})
    proc = subprocess.Popen([sys.executable, "-c", READER, str(tmp_path), str(REPO), run_id],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    step = 0
    while proc.poll() is None and step < 100_000:
        step += 1
        store.log_metrics(run_id, step, {"loss": 1.0 / step, "reward/mean": step % 3})
        if step % 10 == 0:
            store.add_rollouts(run_id, step, [make_rollout(0, g) for g in range(4)])
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert result["errors"] == [] and result["reads"] >= 20
    assert result["last"] > 1  # it saw rows committed while it was reading
    assert len(store.metrics(run_id)["loss"]) == step + 1
    store.close()


def test_writer_refuses_a_db_from_a_newer_rlft(tmp_path):
    RunStore(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "rlft.db")
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(RuntimeError, match="schema version 99"):
        RunStore(tmp_path)


def test_json_values_are_plain_and_finite(store):
    run_id = store.create_run(config={"inf": math.inf, "t": Termination.LENGTH, "s": {1}})
    raw = store._conn().execute("SELECT config FROM runs WHERE id=?", (run_id,)).fetchone()[0]
    assert json.loads(raw) == {"inf": None, "t": "length", "s": [1]} and "Infinity" not in raw


def test_a_batch_of_rollouts_is_stored_all_or_nothing(store):
    run_id = store.create_run(config={})

    def batch():
        yield make_rollout(0, 0)
        raise RuntimeError("serialization failed mid-batch")

    with pytest.raises(RuntimeError):
        store.add_rollouts(run_id, 1, batch())
    assert store.count_rollouts(run_id) == 0
    store.add_rollouts(run_id, 1, [make_rollout(0, 0)])  # the store is still usable
    assert store.count_rollouts(run_id) == 1


def test_a_runs_eval_at_a_step_is_stored_once_however_often_it_is_recorded(store):
    run_id = store.create_run()
    for value in (0.1, 0.2, 0.3):  # e.g. the base eval re-run by two resumes
        store.add_eval(run_id, model="m@0", step=0, metrics={"reward/mean": value})
    store.add_eval(run_id, model="m@5", step=5, metrics={"reward/mean": 0.5})
    store.add_eval(model="gpt-x", metrics={"reward/mean": 0.9})  # external evals accumulate
    store.add_eval(model="gpt-x", metrics={"reward/mean": 0.8})
    assert [(e["step"], e["metrics"]["reward/mean"]) for e in store.evals(run_id)] == [(0, 0.3), (5, 0.5)]
    assert len(store.evals()) == 4
    store.truncate_after(run_id, 3)  # a resume from step 3 redoes the eval at 5
    assert [e["step"] for e in store.evals(run_id)] == [0] and store.has_eval(run_id, 0)


def test_upgrading_a_store_removes_duplicate_eval_rows_keeping_the_newest(tmp_path):
    store = RunStore(tmp_path)
    run_id = store.create_run()
    conn = store._conn()
    conn.execute("DROP INDEX evals_run_step")
    for value in (0.1, 0.2):
        conn.execute("INSERT INTO evals (run_id, step, model, split, k, metrics, created_at) VALUES (?,?,?,?,?,?,?)",
                     (run_id, 0, "m", "eval", 1, json.dumps({"v": value}), 0.0))
    conn.execute("PRAGMA user_version=1")
    store.close()
    store = RunStore(tmp_path)
    assert [e["metrics"]["v"] for e in store.evals(run_id)] == [0.2]
    store.close()


V6_INDEXES = {"rollouts_tally", "rollouts_errors", "metrics_written"}


def test_upgrading_a_v5_store_adds_the_v6_indexes_and_keeps_every_row(tmp_path):
    store = RunStore(tmp_path)
    run_id = store.create_run()
    bad = RolloutError("reward:correct", "boom")
    store.add_rollouts(run_id, 1, [make_rollout(0, 0), make_rollout(0, 1, termination=Termination.LENGTH),
                                   make_rollout(1, 0, errors=[bad], termination=Termination.REWARD_ERROR)])
    store.log_metrics(run_id, 1, {"reward/mean": 0.5})
    conn = store._conn()
    for name in V6_INDEXES:  # the store as rlft with schema v5 left it
        conn.execute(f"DROP INDEX {name}")
    conn.execute("DELETE FROM schema_version WHERE version=6")
    conn.execute("PRAGMA user_version=5")
    store.close()
    store = RunStore(tmp_path)
    conn = store._conn()
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 6
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert indexes >= V6_INDEXES
    assert store.termination_counts(run_id) == {"finished": 1, "length": 1, "reward_error": 1}
    assert [r["errors"][0]["message"] for r in store.rollouts(run_id) if r["errors"]] == ["boom"]
    assert store.metrics(run_id) == {"reward/mean": [(1, 0.5)]}
    store.close()


def test_a_metric_row_is_stamped_when_its_write_commits_not_when_it_began_waiting(tmp_path):
    """The console reads the metric rows written since the newest stamp it has: a row stamped
    before a write that committed ahead of it would never be read."""
    import threading
    import time

    store = RunStore(tmp_path)
    run_id = store.create_run()
    other = sqlite3.connect(tmp_path / "rlft.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    writer = threading.Thread(target=store.log_metrics, args=(run_id, 1, {"loss": 1.0}))
    writer.start()
    time.sleep(0.3)
    released = time.time()
    other.execute("COMMIT")
    writer.join()
    (stamp,) = store._conn().execute("SELECT wall_time FROM metrics WHERE run_id=?", (run_id,)).fetchone()
    assert stamp >= released
    other.close()
    store.close()

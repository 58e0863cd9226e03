"""User errors from the command line are one message naming the file, row, field or run, with
exit code 2 and no traceback (``--debug`` adds it); and a run resumes from any directory."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from rlft.cli import main
from rlft.store import RunStore

ENV = textwrap.dedent('''
    from rlft import Environment

    def variety(ro):
        return len(set(ro.completion)) / 16

    env = Environment(rewards=[variety], max_tokens=8)
    dataset = "data.jsonl"
''')
CONFIG = textwrap.dedent('''
    env = "env.py"
    model = "model"
    dtype = "float32"
    runs_dir = "runs"
    steps = 2
    batch_size = 2
    group_size = 2
    eval_size = 2
    eval_k = 1
    validate = false
    progress = false
    checkpoint_every = 1
''')


@pytest.fixture
def project(tmp_path):
    from rlft.testing.models import save_tiny_model

    save_tiny_model(str(tmp_path / "model"))
    (tmp_path / "env.py").write_text(ENV)
    (tmp_path / "config.toml").write_text(CONFIG)
    (tmp_path / "data.jsonl").write_text("".join(f'{{"prompt": "write {i}"}}\n' for i in range(12)))
    return tmp_path


def _fails_cleanly(argv, capsys, *needles) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_a_bad_dataset_row_is_one_message_naming_file_row_and_field(project, capsys, monkeypatch):
    monkeypatch.chdir(project)
    (project / "data.jsonl").write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    _fails_cleanly(["train", "config.toml"], capsys, "data.jsonl", "line 2", "prompt")


def test_a_syntax_error_in_the_environment_names_the_file_and_line(project, capsys, monkeypatch):
    monkeypatch.chdir(project)
    (project / "env.py").write_text("from rlft import Environment\nenv = Environment(\n")
    _fails_cleanly(["train", "config.toml"], capsys, "env.py", "line 2")
    assert main(["--debug", "train", "config.toml"]) == 2
    assert "Traceback" in capsys.readouterr().err  # --debug shows it


def test_an_import_error_in_the_environment_points_at_the_users_line(project, capsys, monkeypatch):
    monkeypatch.chdir(project)
    (project / "env.py").write_text("import not_a_module_anyone_has\n")
    _fails_cleanly(["validate", "config.toml"], capsys, "env.py", "ModuleNotFoundError", "not_a_module_anyone_has")


def test_resuming_an_unknown_run_names_it_and_the_store(project, capsys, monkeypatch):
    monkeypatch.chdir(project)
    RunStore(project / "runs").close()
    _fails_cleanly(["train", "config.toml", "--resume", "no-such-run"], capsys, "no run 'no-such-run'", "rlft.db")


def test_a_run_resumes_from_another_directory_and_reports_a_changed_environment(project, capsys, monkeypatch):
    monkeypatch.chdir(project)
    assert main(["train", "config.toml", "--set", "run_name=far"]) == 0
    store = RunStore(project / "runs", readonly=True)
    run = store.get_run("far")
    store.close()
    assert Path(run["config"]["env"]).is_absolute() and Path(run["config"]["model"]).is_absolute()
    elsewhere = project / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (project / "env.py").write_text(ENV.replace("/ 16", "/ 8"))  # the environment changed since
    runs = str(project / "runs")
    assert main(["train", "--resume", "far", "--set", f"runs_dir={runs}", "--set", "steps=3"]) == 0
    store = RunStore(runs, readonly=True)
    run = store.get_run("far")
    logs = [entry["message"] for entry in store.logs(run["id"])]
    store.close()
    assert run["status"] == "completed" and run["step"] == 2  # the run's own config (steps = 2) wins
    assert any("changed since the run started" in m for m in logs), logs


def test_a_resumed_run_whose_environment_file_is_gone_uses_the_kept_copy(project, capsys, monkeypatch):
    monkeypatch.chdir(project)
    assert main(["train", "config.toml", "--set", "run_name=moved", "--set", "steps=1"]) == 0
    os.remove(project / "env.py")
    assert main(["train", "--resume", "moved"]) == 0
    store = RunStore(project / "runs", readonly=True)
    run = store.get_run("moved")
    logs = [entry["message"] for entry in store.logs(run["id"])]
    store.close()
    assert run["status"] == "completed"
    assert any("no longer exists" in m and "environment.py" in m for m in logs), logs


def test_runs_show_says_which_checkpoints_are_good(project, capsys, monkeypatch):
    monkeypatch.chdir(project)
    assert main(["train", "config.toml", "--set", "run_name=ck", "--set", "keep_checkpoints=2"]) == 0
    store = RunStore(project / "runs", readonly=True)
    run_dir = store.run_dir(store.get_run("ck")["id"])
    store.close()
    weights = run_dir / "checkpoints" / "step-000002" / "adapter_model.safetensors"  # LoRA, the default
    weights.write_bytes(weights.read_bytes()[:-8] + b"\x00" * 8)  # same size, other bytes: bit rot
    capsys.readouterr()
    assert main(["runs", "show", "ck"]) == 0
    out = capsys.readouterr().out
    assert "step-000001 (good)" in out
    assert "step-000002 (NOT USABLE: adapter_model.safetensors does not match its checksum" in out

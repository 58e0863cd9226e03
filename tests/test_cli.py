"""The command line end to end on a tiny model: config, validate, train, runs, eval, export."""

import json
import textwrap

import pytest

from rlft.cli import main
from rlft.store import RunStore

ENV = textwrap.dedent('''
    from rlft.env import Environment

    def variety(ro):
        return len(set(ro.completion)) / 16

    def broken(ro):
        raise ZeroDivisionError("reward bug on purpose")

    env = Environment(system_prompt="Say something.", rewards=[variety], max_tokens=10)
    bad_env = Environment(rewards=[broken], max_tokens=10)
    dataset = [{"prompt": f"write {i}", "ground_truth": str(i)} for i in range(30)]
''')


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("cli")
    (d / "env.py").write_text(ENV)
    (d / "config.toml").write_text(textwrap.dedent(f'''
        env = "env.py"
        model = "{tiny_model_dir}"
        dtype = "float32"
        runs_dir = "{d / 'runs'}"
        steps = 2
        batch_size = 2
        group_size = 4
        eval_size = 4
        eval_k = 2
        progress = false
    '''))
    return d


def test_config_list_documents_every_key(capsys):
    from rlft.config import FIELDS

    assert main(["config", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(k in out for k in FIELDS)


def test_unknown_config_key_exits_2_naming_the_closest_key(project, capsys):
    assert main(["validate", str(project / "config.toml"), "--set", "group_sise=4"]) == 2
    assert "Did you mean 'group_size'" in capsys.readouterr().err


def test_validate_prints_transcripts_and_passes(project, capsys):
    assert main(["validate", str(project / "config.toml")]) == 0
    out = capsys.readouterr().out
    assert out.count("--- rollout") == 2 and "validation passed" in out
    # the prompt as the model saw it: the chat template's markers around the user's text
    assert out.count("[prompt as the model saw it") == 2 and "<|im_start|>user\nwrite" in out
    assert "reward audit over 2 rollouts" in out


def test_validate_fails_with_the_reward_traceback(project, capsys):
    code = main(["validate", str(project / "config.toml"), "--set", f"env={project / 'env.py'}:bad_env"])
    out = capsys.readouterr().out
    assert code == 1 and "ZeroDivisionError: reward bug on purpose" in out and "Traceback" in out


def test_validate_signal_reports_base_reward_and_tied_groups(project, capsys):
    assert main(["validate", str(project / "config.toml"), "--signal", "--prompts", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0 <= report["zero_variance_share"] <= 1 and "pass@k" in report["metrics"]


def test_train_then_inspect_eval_and_export(project, capsys, tmp_path):
    assert main(["train", str(project / "config.toml"), "--set", "run_name=cli-run"]) == 0
    capsys.readouterr()
    runs = str(project / "runs")
    assert main(["runs", "list", "--runs", runs, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    run = next(r for r in listed if r["name"] == "cli-run")
    assert run["status"] == "completed" and run["step"] == 2
    assert main(["runs", "metrics", "cli-run", "--runs", runs, "--json"]) == 0
    assert [s for s, _ in json.loads(capsys.readouterr().out)["reward/mean"]] == [1, 2]
    assert main(["runs", "rollouts", "cli-run", "--runs", runs, "--step", "1", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 8
    assert main(["runs", "show", "cli-run", "--runs", runs]) == 0
    assert "completed at step 2" in capsys.readouterr().out
    assert main(["runs", "logs", "cli-run", "--runs", runs]) == 0
    assert "[signal] step 1: mean reward" in capsys.readouterr().out  # train prints the signal figures
    assert main(["eval", str(project / "config.toml"), "--run", "cli-run", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["model"].endswith(":2") and ev["k"] == 2 and "pass@k" in ev["metrics"]
    out = tmp_path / "exported"
    assert main(["export", "cli-run", "--runs", runs, "--merge", str(out)]) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    ids = tok("hello", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def test_failed_run_records_reason_and_traceback(project, capsys):
    # a user error: one message with what to do, exit code 2, no traceback (it is in the run's logs)
    assert main(["train", str(project / "config.toml"), "--set", f"env={project / 'env.py'}:bad_env",
                 "--set", "run_name=doomed"]) == 2
    err = capsys.readouterr().err
    assert "validation failed" in err and "What to do" in err and "validate = false" in err
    assert "Traceback" not in err
    store = RunStore(project / "runs", readonly=True)
    run = store.get_run("doomed")
    assert run["status"] == "failed" and "validation failed" in run["error"] and "ZeroDivisionError" in run["traceback"]
    assert main(["runs", "show", "doomed", "--runs", str(project / "runs")]) == 0
    assert "FAILED" in capsys.readouterr().out


def test_tensorboard_reporting_writes_event_files(project):
    pytest.importorskip("tensorboard", reason="tensorboard not installed (dev extra)")
    from rlft.training.loop import train

    run_id = train(str(project / "config.toml"), run_name="tb", report_to="tensorboard", steps=1)
    store = RunStore(project / "runs", readonly=True)
    events = list((store.run_dir(run_id) / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_bad_inputs_fail_before_training_with_advice(project):
    from rlft.data import DatasetError
    from rlft.policy import PolicyLoadError
    from rlft.training.loop import train

    cfg = str(project / "config.toml")
    with pytest.raises(PolicyLoadError):
        train(cfg, model=str(project / "no-such-model"), run_name="nomodel")
    with pytest.raises(DatasetError, match="fewer than one batch"):
        train(cfg, batch_size=500, run_name="toobig")
    with pytest.raises(ValueError, match="report_to"):
        train(cfg, report_to="tensorbored", run_name="typo")
    store = RunStore(project / "runs", readonly=True)
    assert store.get_run("nomodel")["status"] == "failed" and store.get_run("nomodel")["error"]


@pytest.mark.parametrize("template", ["extraction", "tools"])
def test_init_scaffolds_a_project_that_validates(tmp_path, tiny_model_dir, template, capsys):
    out = tmp_path / f"proj-{template}"
    assert main(["init", str(out), "--template", template]) == 0
    assert {p.name for p in out.iterdir()} == {"env.py", "data.jsonl", "config.toml", "README.md"}
    # validate it end to end (the tiny model stands in for the demo model to keep the test fast)
    code = main(["validate", str(out / "config.toml"), "--set", f"model={tiny_model_dir}", "--set", "dtype=float32"])
    assert code == 0, capsys.readouterr().out
    with pytest.raises(FileExistsError):
        main(["init", str(out)])


STOP_ENV = textwrap.dedent('''
    from rlft.cli import main
    from rlft.env import Environment

    RUNS = {runs!r}
    asked = []

    def ask_to_stop(ro):
        if not asked:  # the first scored rollout asks, as a user would from another terminal
            asked.append(main(["stop", "stopme", "--runs", RUNS]))
        return 0.5

    env = Environment(rewards=[ask_to_stop], max_tokens=8)
    dataset = [{{"prompt": f"x {{i}}"}} for i in range(20)]
''')


def test_stop_finishes_the_step_checkpoints_and_marks_the_run_stopped(project, tmp_path, capsys):
    runs = str(project / "runs")
    (tmp_path / "stop_env.py").write_text(STOP_ENV.format(runs=runs))
    assert main(["train", str(project / "config.toml"), "--set", f"env={tmp_path / 'stop_env.py'}",
                 "--set", "run_name=stopme", "--set", "steps=5", "--set", "validate=false",
                 "--set", "eval_size=0", "--set", "eval_fraction=0"]) == 0
    store = RunStore(runs, readonly=True)
    run = store.get_run("stopme")
    assert run["status"] == "stopped" and run["step"] == 1
    assert [c["step"] for c in store.checkpoints(run["id"])] == [1]
    assert "asked run" in capsys.readouterr().out


def test_doctor_reports_each_part(capsys):
    main(["doctor"])
    out = capsys.readouterr().out
    for part in ("torch", "transformers", "peft", "mcp", "fastapi", "native CPU kernels", "GGUF models converted once"):
        assert part in out
    if "ok    native CPU kernels" in out:  # and whether the linear layers run on AMX tiles, or why not
        assert "AMX linear layers: built" in out or ("AMX linear layers: " in out and "could not compile" in out)
        assert "training attention over packed rows: on A" in out  # AMX tiles, or AVX512-BF16 and why

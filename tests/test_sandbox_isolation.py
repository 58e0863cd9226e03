"""The sandbox states its isolation level and refuses untrusted code without namespaces unless
the user opts in (issue #15 point 11): in run_code, a reward, `rlft doctor`, `rlft validate` and
a run's log. The rlimits-only path is real: ``RLFT_SANDBOX_NO_NAMESPACES=1`` makes the child skip
unshare, and a root process without CAP_SYS_ADMIN (as in a default container) is refused by the
kernel itself."""

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from rlft.rewards import sandbox
from rlft.rewards.sandbox import SandboxRefusedError, code_tests, isolation, run_code
from rlft.types import Rollout, Termination

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
WRITE_OUTSIDE = "open(%r, 'w').write('escaped')\n"  # a world-writable place outside the sandbox


@pytest.fixture(autouse=True)
def confined_by_default(monkeypatch):
    """Every test starts without any opt-in, and leaves the process setting as it found it."""
    monkeypatch.delenv(sandbox.UNCONFINED_ENV, raising=False)
    monkeypatch.delenv(sandbox.NO_NAMESPACES_ENV, raising=False)
    previous = sandbox.set_unconfined(False)
    yield
    sandbox.set_unconfined(previous)


@pytest.fixture
def no_namespaces(monkeypatch):
    monkeypatch.setenv(sandbox.NO_NAMESPACES_ENV, "1")


@pytest.fixture
def open_dir():
    """A world-writable directory the sandbox's uid can reach (pytest's tmp_path is root's 0700)."""
    d = Path(tempfile.mkdtemp(prefix="rlft-open-"))
    os.chmod(d, 0o777)
    yield d
    shutil.rmtree(d)


def confined_here() -> bool:
    return isolation().confined


needs_namespaces = pytest.mark.skipif(not confined_here(), reason="this machine grants no namespaces")


@needs_namespaces
def test_with_namespaces_code_runs_and_reports_level_namespaces(open_dir):
    iso = isolation()
    assert iso.level == "namespaces" and {"netns", "readonly_fs"} <= set(iso.protections)
    r = run_code(WRITE_OUTSIDE % str(open_dir / "x.txt"), ["assert True"])
    assert r.level == "namespaces" and r.error and "Read-only file system" in r.error
    assert not (open_dir / "x.txt").exists()


def test_without_namespaces_run_code_refuses_naming_what_is_missing_why_and_how_to_opt_in(no_namespaces, open_dir):
    with pytest.raises(SandboxRefusedError) as e:
        run_code(WRITE_OUTSIDE % str(open_dir / "x.txt"), ["assert True"])
    msg = str(e.value)
    for part in ("rlimits-only", "netns", "readonly_fs", "RLFT_SANDBOX_NO_NAMESPACES=1 is set",
                 "sandbox_unconfined = true", "RLFT_SANDBOX_UNCONFINED=1", "unconfined=True"):
        assert part in msg, part
    assert not (open_dir / "x.txt").exists()  # refused before anything ran


def test_asking_for_no_namespaces_is_refused_too():
    with pytest.raises(SandboxRefusedError, match="namespaces=False was asked"):
        run_code("pass", namespaces=False)


@pytest.mark.parametrize("how", ["argument", "set_unconfined", "env"])
def test_opting_in_runs_rlimits_only_and_says_so(no_namespaces, open_dir, monkeypatch, how):
    kwargs = {}
    if how == "argument":
        kwargs["unconfined"] = True
    elif how == "set_unconfined":
        sandbox.set_unconfined(True)
    else:
        monkeypatch.setenv(sandbox.UNCONFINED_ENV, "1")
    target = open_dir / "x.txt"
    r = run_code(WRITE_OUTSIDE % str(target) + "def f(x):\n    return x + 1\n", ["assert f(1) == 2"], **kwargs)
    assert r.passed == [True] and r.level == "rlimits-only"
    assert "socket_patch" in r.protections and "netns" not in r.protections and r.refused == {}
    # genuinely unconfined: the write to a world-writable directory outside got through
    assert target.read_text() == "escaped"


def test_an_explicit_false_overrides_the_process_opt_in(no_namespaces):
    sandbox.set_unconfined(True)
    with pytest.raises(SandboxRefusedError):
        run_code("pass", unconfined=False)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_a_root_process_without_cap_sys_admin_is_refused_with_the_kernels_reason(tmp_path):
    """Root without CAP_SYS_ADMIN, as in a default docker container: unshare fails with EPERM.
    The sandbox package runs standalone (no rlft import), so the check is quick."""
    script = ("import importlib.util, os, sys\nspec = importlib.util.spec_from_file_location('sbx', "
              "os.path.join(sys.argv[1], '__init__.py'), submodule_search_locations=[sys.argv[1]])\n"
              "m = sys.modules['sbx'] = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(m)\n"
              "print(m.isolation().line())\ntry:\n    m.run_code('pass')\nexcept m.SandboxRefusedError as e:\n"
              "    print('REFUSED', e)\nprint('LEVEL', m.run_code('pass', unconfined=True).level)\n")
    p = subprocess.run(["setpriv", "--bounding-set=-sys_admin", sys.executable, "-I", "-c", script,
                        os.path.dirname(sandbox.__file__)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "sandbox isolation: rlimits-only" in p.stdout
    assert "REFUSED refusing to run untrusted code" in p.stdout
    assert "unshare failed with EPERM" in p.stdout and "CAP_SYS_ADMIN" in p.stdout
    assert "LEVEL rlimits-only" in p.stdout


def test_a_refused_code_reward_stops_scoring_instead_of_scoring_zero(no_namespaces):
    from rlft.rewards import score_group

    ro = Rollout(example={"prompt": "p", "tests": ["assert f() == 1"]},
                 messages=[{"role": "user", "content": "p"},
                           {"role": "assistant", "content": "```python\ndef f():\n    return 1\n```"}],
                 termination=Termination.FINISHED)
    with pytest.raises(SandboxRefusedError, match="sandbox_unconfined = true"):
        asyncio.run(score_group([ro], [code_tests("tests")]))
    sandbox.set_unconfined(True)
    asyncio.run(score_group([ro], [code_tests("tests")]))
    assert ro.rewards == {"code_tests": 1.0}


def test_environment_isolation_is_checked_only_for_environments_that_run_code(no_namespaces):
    import types

    from rlft import Environment
    from rlft.rewards.confinement import environment_isolation

    plain = Environment(rewards=[lambda ro: 1.0])
    coder = Environment(rewards=[code_tests("tests")])
    module = types.ModuleType("user_env")
    module.run_code = run_code  # a user reward that calls run_code itself
    assert environment_isolation(plain) is None
    for env, mod in ((coder, None), (plain, module)):
        with pytest.raises(SandboxRefusedError):
            environment_isolation(env, mod)
    sandbox.set_unconfined(True)
    assert environment_isolation(coder).level == "rlimits-only"


def test_doctor_states_the_isolation_level(capsys, monkeypatch):
    from rlft.cli.runs import _sandbox_check

    assert _sandbox_check() is confined_here()
    assert f"sandbox isolation: {isolation().level}" in capsys.readouterr().out
    monkeypatch.setenv(sandbox.NO_NAMESPACES_ENV, "1")
    assert _sandbox_check() is False
    out = capsys.readouterr().out
    assert "LIMITED sandbox isolation: rlimits-only" in out and "sandbox_unconfined = true" in out


def test_validate_of_the_code_recipe_states_the_level_and_refuses_without_namespaces(tiny_model_dir, tmp_path,
                                                                                     capsys, monkeypatch):
    from rlft.cli import main

    cfg = str(RECIPES / "code" / "config.toml")
    tiny = ["--set", f"model={tiny_model_dir}", "--set", "dtype=float32", "--set", f"runs_dir={tmp_path}"]
    # (with namespaces: test_recipes_b's validate of this recipe checks the line)
    monkeypatch.setenv(sandbox.NO_NAMESPACES_ENV, "1")
    assert main(["validate", cfg, *tiny]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlft validate: refusing to run untrusted code") and "rlimits-only" in err
    assert main(["validate", cfg, *tiny, "--set", "sandbox_unconfined=true"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: sandbox isolation: rlimits-only" in out and "validation passed" in out


def test_a_run_logs_the_level_and_is_refused_before_it_exists(tiny_model_dir, tmp_path, monkeypatch):
    from rlft.store import RunStore
    from rlft.training.run import as_config, open_run

    env = sandbox_env()
    rows = [{"prompt": "p", "tests": ["assert True"]}] * 2
    base = dict(model=tiny_model_dir, dtype="float32", batch_size=2, group_size=2, eval_fraction=0.0,
                validate=False, progress=False, sync_check=False, runs_dir=str(tmp_path))
    monkeypatch.setenv(sandbox.NO_NAMESPACES_ENV, "1")
    with pytest.raises(SandboxRefusedError), open_run(as_config(None, base), environment=env, dataset=rows):
        pass
    assert RunStore(tmp_path).list_runs() == []  # refused before the run (or the model) existed
    with open_run(as_config(None, {**base, "sandbox_unconfined": True}), environment=env, dataset=rows) as run:
        assert sandbox.unconfined_allowed()  # the config's opt-in reaches run_code in the rewards
        run_id = run.run_id
    assert not sandbox.unconfined_allowed()  # and ends with the run
    logs = [(r["level"], r["message"]) for r in RunStore(tmp_path).logs(run_id)]
    assert any(level == "warning" and msg.startswith("sandbox isolation: rlimits-only") for level, msg in logs), logs


def sandbox_env():
    from rlft import Environment

    return Environment(rewards=[code_tests("tests")], max_tokens=8)

"""The code sandbox: per-test scoring, and hostile code contained, reported, host unharmed."""

import asyncio
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from rlft.rewards import sandbox
from rlft.rewards.sandbox import arun_code, code_tests, extract_code, run_code, runner, set_max_concurrency
from rlft.types import Rollout

MODES = ["namespaces", "fallback"]  # fallback: the child is denied the namespaces it could get


def kw(mode):  # the fallback is rlimits only: run_code refuses it unless asked to run unconfined
    return {"namespaces": True} if mode == "namespaces" else {"namespaces": False, "unconfined": True}


@pytest.fixture(autouse=True, scope="module")
def unconfined_where_the_machine_has_no_namespaces():
    """These tests check what each protection does at the level this machine grants; the
    refusal below level "namespaces" is tests/test_sandbox_isolation.py's."""
    previous = sandbox.set_unconfined(not sandbox.isolation().confined)
    yield
    sandbox.set_unconfined(previous)


def leftovers():
    """Live processes still running under a sandbox uid (root only; [] otherwise)."""
    return runner.uids_in_use()


@pytest.fixture(scope="module")
def prot():
    return sandbox.protections()


# -- scoring -----------------------------------------------------------------------------------
def test_correct_solution_passes_every_test():
    r = run_code("def add(a, b):\n    return a + b\n", ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"])
    assert r.passed == [True, True] and r.score == 1.0 and r.error is None and not r.timed_out


def test_wrong_solution_scores_per_test_with_reasons():
    r = run_code("def sq(x):\n    return x * 2\n", ["assert sq(2) == 4", "assert sq(3) == 9", "assert cube(2) == 8"])
    assert r.passed == [True, False, False] and r.score == pytest.approx(1 / 3)
    assert r.test_errors[0] is None and r.test_errors[1] == "AssertionError" and "NameError" in r.test_errors[2]
    assert r.error is None  # the run finished; only tests failed


def test_test_string_is_split_into_one_test_per_assert():
    tests = "import math\nassert f(4) == 2\nassert f(9) == 4\n"
    r = run_code("import math\ndef f(x):\n    return int(math.sqrt(x))\n", tests)
    assert r.passed == [True, False]


def test_humaneval_style_check_function_is_one_test():
    tests = "def check(candidate):\n    assert candidate(2) == 3\n    assert candidate(0) == 1\n\ncheck(inc)\n"
    assert run_code("def inc(x):\n    return x + 1\n", tests).passed == [True]
    assert run_code("def inc(x):\n    return x\n", tests).passed == [False]


def test_syntax_error_fails_every_test_and_is_reported():
    r = run_code("def f(:\n    pass\n", ["assert f() is None", "assert True"])
    assert r.passed == [False, False] and "SyntaxError" in r.error


def test_solution_raising_at_import_is_reported():
    r = run_code("raise ValueError('boom')", ["assert True"])
    assert r.passed == [False] and r.error == "ValueError: boom"


def test_printed_fake_results_do_not_score():
    code = "import json\nfor i in range(3):\n    print(json.dumps(['x' * 32, i, True, None]))\n"
    r = run_code(code, ["assert False", "assert False"])
    assert r.passed == [False, False]


def test_long_output_is_truncated():
    r = run_code("print('x' * 100000)\nimport sys\nprint('y' * 100000, file=sys.stderr)", ["assert True"],
                 max_output_chars=100)
    assert r.passed == [True]
    assert len(r.stdout) < 200 and "truncated" in r.stdout and len(r.stderr) < 200 and "truncated" in r.stderr


# -- hostile code --------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_infinite_loop_times_out_and_is_killed(mode):
    t0 = time.monotonic()
    r = run_code("while True:\n    pass\n", ["assert True"], timeout=1.0, **kw(mode))
    assert r.timed_out and "timed out" in r.error and r.passed == [False]
    assert time.monotonic() - t0 < 5
    assert leftovers() == {}


def test_cpu_limit_kills_a_spinning_child():
    r = run_code("while True:\n    pass\n", ["assert True"], timeout=10, cpu_seconds=1)
    assert not r.timed_out and r.passed == [False] and "killed by SIG" in r.error and r.duration < 6


@pytest.mark.parametrize("mode", MODES)
def test_process_count_is_bounded_and_no_process_survives(mode):
    code = ("import os, time\nn = 0\nfor i in range(200):\n    try:\n        pid = os.fork()\n"
            "    except OSError:\n        break\n    if pid == 0:\n        os.setsid()\n        time.sleep(60)\n"
            "        os._exit(0)\n    n += 1\nprint('forked', n)\n")
    r = run_code(code, ["assert True"], max_processes=10, timeout=10, **kw(mode))
    if os.geteuid() == 0:  # NPROC counts exactly the sandbox's own uid
        assert r.passed == [True] and 1 <= int(r.stdout.split()[1]) < 10, r.stdout
        assert leftovers() == {}  # the setsid() sleepers were killed too


def test_fork_bomb_is_contained_and_the_host_keeps_responding():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    box = {}
    th = threading.Thread(target=lambda: box.update(r=run_code(bomb, ["assert True"], timeout=2.0, max_processes=16)))
    th.start()
    time.sleep(0.7)
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", "pass"], check=True, timeout=30)  # the host still runs programs
    assert time.monotonic() - t0 < 10
    th.join(30)
    r = box["r"]
    assert r.timed_out and r.passed == [False]
    assert leftovers() == {}


def test_memory_hog_is_stopped_and_reported():
    r = run_code("x = bytearray(4 * 1024 ** 3)\n", ["assert True"], memory_mb=256)
    assert r.passed == [False] and "MemoryError" in r.error
    r = run_code("def grow():\n    x = []\n    while True:\n        x.append(bytearray(10 ** 7))\n",
                 ["grow()", "assert 1 + 1 == 2"], memory_mb=256, timeout=10)
    assert r.passed == [False, True] and "MemoryError" in r.test_errors[0]


@pytest.mark.parametrize("mode", MODES)
def test_writing_outside_the_sandbox_creates_nothing(tmp_path, mode, prot):
    private = tmp_path / "escape.txt"  # in the test's own 0700 directory
    shared_dir = tmp_path / "open"
    shared_dir.mkdir(mode=0o777)
    os.chmod(shared_dir, 0o777)
    shared = shared_dir / "escape.txt"  # world-writable: only a read-only mount stops it
    code = ("import os\nfor p in %r:\n    try:\n        open(p, 'w').write('pwned')\n"
            "    except OSError as e:\n        print(e)\n")
    run_code(code % [str(private), str(shared)], ["assert True"], **kw(mode))
    if os.geteuid() == 0 and "uid" in prot:
        assert not private.exists()
    if mode == "namespaces" and "readonly_fs" in prot:
        assert not shared.exists()


@pytest.mark.parametrize("mode", MODES)
def test_deleting_files_outside_the_sandbox_fails(tmp_path, mode, prot):
    private = tmp_path / "keep.txt"
    private.write_text("data")
    shared_dir = tmp_path / "open"
    shared_dir.mkdir()
    os.chmod(shared_dir, 0o777)
    shared = shared_dir / "keep.txt"
    shared.write_text("data")
    code = "import os\nfor p in %r:\n    try:\n        os.remove(p)\n    except OSError as e:\n        print(e)\n"
    run_code(code % [str(private), str(shared)], ["assert True"], **kw(mode))
    if os.geteuid() == 0 and "uid" in prot:
        assert private.read_text() == "data"
    if mode == "namespaces" and "readonly_fs" in prot:
        assert shared.read_text() == "data"


@pytest.mark.parametrize("mode", MODES)
def test_parent_environment_secret_is_invisible(monkeypatch, mode):
    secret = "s3cr3t-" + secrets.token_hex(8)
    monkeypatch.setenv("RLFT_TEST_SECRET", secret)
    code = ("import os\nfound = [k for k, v in os.environ.items() if 'RLFT' in k or 's3cr3t' in v]\n"
            "for pid in [%d] + [p for p in os.listdir('/proc') if p.isdigit()]:\n    try:\n"
            "        data = open(f'/proc/{pid}/environ', 'rb').read()\n    except OSError:\n        continue\n"
            "    if b's3cr3t' in data:\n        found.append(pid)\nprint('found', found)\n") % os.getpid()
    r = run_code(code, ["assert not found"], **kw(mode))
    assert r.passed == [True], r.stdout + r.stderr
    assert secret not in r.stdout


@pytest.mark.parametrize("mode", MODES)
def test_socket_to_a_host_listener_never_connects(mode):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(5)
    port = srv.getsockname()[1]
    code = ("import socket\nconnected = False\ntry:\n"
            "    socket.create_connection(('127.0.0.1', %d), timeout=2)\n    connected = True\n"
            "except OSError as e:\n    print('refused:', e)\n") % port
    try:
        r = run_code(code, ["assert not connected"], **kw(mode))
        srv.settimeout(0.3)
        with pytest.raises(socket.timeout):
            srv.accept()
    finally:
        srv.close()
    assert r.passed == [True], r.stdout + r.stderr


@pytest.mark.parametrize("mode", MODES)
def test_child_cannot_signal_the_host_process(mode):
    code = "import os\ntry:\n    os.kill(%d, 0)\n    reached = True\nexcept OSError:\n    reached = False\n"
    code %= os.getpid()
    r = run_code(code, ["assert not reached"], **kw(mode))
    if os.geteuid() == 0 or mode == "namespaces":  # another uid, or another PID namespace
        assert r.passed == [True]


def test_code_may_write_its_own_directory_and_tempfiles_within_the_file_size_cap():
    code = ("import os, tempfile\nopen('notes.txt', 'w').write('hi')\nwith tempfile.NamedTemporaryFile() as f:\n"
            "    f.write(b'x' * 1000)\n")
    tests = ["assert open('notes.txt').read() == 'hi'",
             "assert os.environ['HOME'] == os.getcwd() == os.environ['TMPDIR']",
             "open('big.bin', 'wb').write(b'x' * (3 * 1024 * 1024))"]
    r = run_code(code, tests, max_file_mb=1)
    assert r.passed == [True, True, False] and "File too large" in r.test_errors[2], r


def test_sandbox_directory_is_removed_without_following_symlinks(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data.txt").write_text("keep")
    before = {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("rlft-sandbox-")}
    code = "import os\nos.symlink(%r, 'dir_link')\nos.symlink(%r, 'file_link')\nopen('own.txt', 'w').write('x')\n"
    r = run_code(code % (str(victim), str(victim / "data.txt")), ["assert os.path.islink('dir_link')"])
    assert r.passed == [True]
    assert (victim / "data.txt").read_text() == "keep"
    after = {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("rlft-sandbox-")}
    assert after <= before


def test_protections_on_this_machine_are_reported(prot):
    assert "rlimits" in prot
    assert "netns" in prot or "socket_patch" in prot
    assert run_code("pass", [], namespaces=False, unconfined=True).protections.count("socket_patch") == 1


NON_ROOT = r"""
import importlib.util, json, os, sys
spec = importlib.util.spec_from_file_location("sbx", os.path.join(sys.argv[1], "__init__.py"),
                                              submodule_search_locations=[sys.argv[1]])
m = sys.modules["sbx"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
os.environ["RLFT_TEST_SECRET"] = "s3cr3t"
sleepers = "import os, time\nfor i in range(3):\n    if os.fork() == 0:\n        os.setsid()\n        time.sleep(60)\n"
out = {}
for ns in (True, False):
    a = m.run_code("import os\ndef f(x):\n    return x + 1\n", ["assert f(1) == 2", "assert f(1) == 3",
                   "assert 'RLFT_TEST_SECRET' not in os.environ"], namespaces=ns, unconfined=True)
    b = m.run_code("import socket\nsocket.create_connection(('127.0.0.1', %d), timeout=1)" % int(sys.argv[2]), [],
                   namespaces=ns, unconfined=True)
    m.run_code(sleepers, ["assert True"], namespaces=ns, unconfined=True)
    left = 0
    for p in os.listdir("/proc"):
        try:
            if os.stat(f"/proc/{p}").st_uid == os.getuid() and b"-B\0-c" in open(f"/proc/{p}/cmdline", "rb").read():
                left += 1
        except (OSError, ValueError):
            pass
    out[str(ns)] = {"passed": a.passed, "protections": a.protections, "net_error": b.error, "left": left}
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a non-root parent")
def test_non_root_parent_still_scores_isolates_and_cleans_up(tmp_path):
    python = runner.sandbox_python(True, None)
    if not python:
        pytest.skip("no interpreter that an unprivileged user can run")
    d = tempfile.mkdtemp()
    os.chmod(d, 0o755)
    mod = os.path.join(d, "sandbox_copy")  # the package, readable by the unprivileged user
    shutil.copytree(os.path.dirname(sandbox.__file__), mod, ignore=shutil.ignore_patterns("__pycache__"))
    for path in [mod] + [os.path.join(mod, f) for f in os.listdir(mod)]:
        os.chmod(path, 0o755 if os.path.isdir(path) else 0o644)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(5)
    try:
        p = subprocess.run([python, "-c", NON_ROOT, mod, str(srv.getsockname()[1])], user=65534, group=65534,
                           extra_groups=[], cwd="/", env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                           timeout=60)
        srv.settimeout(0.1)
        with pytest.raises(socket.timeout):
            srv.accept()
    finally:
        srv.close()
        shutil.rmtree(d)
    assert p.returncode == 0, p.stderr
    out = __import__("json").loads(p.stdout.strip().splitlines()[-1])
    for mode in out.values():
        assert mode["passed"] == [True, False, True]
        assert mode["left"] == 0
        assert "unreachable" in mode["net_error"] or "disabled" in mode["net_error"], mode["net_error"]
    assert "socket_patch" in out["False"]["protections"]


# -- concurrency and the reward ------------------------------------------------------------------
def test_async_runs_respect_the_concurrency_bound(monkeypatch):
    active, peak, lock = [0], [0], threading.Lock()
    real = sandbox.execute

    def counting(*a, **k):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            return real(*a, **k)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(sandbox, "execute", counting)
    old = sandbox.get_max_concurrency()
    set_max_concurrency(2)
    try:
        async def main():
            return await asyncio.gather(*(arun_code("import time\ntime.sleep(0.2)", ["assert True"]) for _ in range(5)))

        results = asyncio.run(main())
    finally:
        set_max_concurrency(old)
    assert all(r.passed == [True] for r in results)
    assert peak[0] == 2


def test_extract_code_prefers_the_last_python_block():
    text = "Idea:\n```\nnot this\n```\n```python\ndef f():\n    return 1\n```\nand\n```py\ndef f():\n    return 2\n```"
    assert extract_code(text).strip() == "def f():\n    return 2"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("x = 1") == "x = 1"


def _rollout(text, **example):
    return Rollout(example={"prompt": "p", **example}, messages=[{"role": "assistant", "content": text}])


def test_code_tests_reward_scores_the_fraction_passed():
    fn = code_tests()
    assert fn.__name__ == "code_tests"
    text = "Here:\n```python\ndef double(x):\n    return x * 2\n```"
    ro = _rollout(text, tests=["assert double(2) == 4", "assert double(0) == 0", "assert double(1) == 3"])
    assert asyncio.run(fn(ro)) == pytest.approx(2 / 3)
    ro = _rollout(text, tests='["assert double(5) == 10"]')  # JSON-encoded list, as in CSV datasets
    assert asyncio.run(fn(ro)) == 1.0
    ro = _rollout("I don't know", tests=["assert double(2) == 4"])
    assert asyncio.run(fn(ro)) == 0.0

"""Run one sandbox: choose the interpreter and a fresh uid, start the launcher (``child.py``)
in a new session with a scrubbed environment and a temporary directory, feed it the payload,
drain its output under caps until it ends or the wall-clock ``timeout``, kill whatever it left
running (its process group, and every process of its uid), and read the per-test results.

:func:`execute` is the whole of it; it neither checks the isolation level nor bounds how many
sandboxes run at once (``run_code`` in ``__init__.py`` does both). What each protection does and
does not cover is written in the package docstring.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from .child import HARNESS, LAUNCHER

_UID_BASE, _UID_SPAN = 1_600_000_000, 400_000_000  # the fresh uids a root parent hands out
_ENV_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass
class SandboxResult:
    """What one sandbox run gave: a pass/fail per test, the captured output, why it failed as a
    whole (if it did), and the protections the child was granted."""

    passed: list[bool]  # one per test
    stdout: str = ""
    stderr: str = ""
    error: str | None = None  # why the run as a whole failed (syntax error, crash, timeout, ...)
    timed_out: bool = False
    duration: float = 0.0  # wall seconds
    test_errors: list[str | None] = field(default_factory=list)  # per test: "AssertionError", ...
    returncode: int | None = None
    protections: list[str] = field(default_factory=list)  # what the child was granted
    refused: dict[str, int] = field(default_factory=dict)  # syscall -> errno: namespaces the kernel refused

    @property
    def score(self) -> float:
        return sum(self.passed) / len(self.passed) if self.passed else 0.0

    @property
    def level(self) -> str:
        """The isolation this run had: "namespaces" | "partial-namespaces" | "rlimits-only"."""
        return level_of(self.protections)


CONFINING = ("netns", "readonly_fs")  # what level "namespaces" needs: no network, nothing writable outside
NAMESPACED = ("netns", "readonly_fs", "pidns", "fresh_proc", "ipc_uts_ns")


def level_of(protections: list[str] | tuple[str, ...]) -> str:
    """The isolation level that ``protections`` give: "namespaces" | "partial-namespaces" | "rlimits-only"."""
    if all(p in protections for p in CONFINING):
        return "namespaces"
    return "partial-namespaces" if any(p in protections for p in NAMESPACED) else "rlimits-only"


# -- choosing the interpreter and the uid ------------------------------------------------------
_python_cache: dict[bool, str] = {}
_python_lock = threading.Lock()


def _minimal_env(workdir: str) -> dict[str, str]:
    return {"PATH": _ENV_PATH, "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}


def _runs_as(python: str, uid: int) -> bool:
    try:
        return subprocess.run([python, "-I", "-S", "-c", "import ctypes, json, resource"], env=_minimal_env("/"),
                              cwd="/", user=uid, group=uid, extra_groups=[], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def sandbox_python(drop_uid: bool, explicit: str | None) -> str:
    """An interpreter for the child; with ``drop_uid``, one that an unprivileged uid can run
    (probed once per process), or "" if there is none."""
    explicit = explicit or os.environ.get("RLFT_SANDBOX_PYTHON")
    if explicit:
        return explicit
    with _python_lock:
        if drop_uid not in _python_cache:
            cands = [os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3",
                     shutil.which("python3", path=_ENV_PATH) or ""]
            probe_uid = _UID_BASE + _UID_SPAN - 1  # never handed to a sandbox
            _python_cache[drop_uid] = (next((c for c in cands if c and _runs_as(c, probe_uid)), "")
                                       if drop_uid else cands[0])
        return _python_cache[drop_uid]


def uids_in_use() -> dict[int, list[int]]:
    """uid -> pids, over /proc, for the sandbox uid range only (zombies excluded)."""
    found: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/status") as fh:
                text = fh.read()
        except OSError:
            continue
        m, st = re.search(r"^Uid:\s+(\d+)", text, re.M), re.search(r"^State:\s+(\w)", text, re.M)
        if m and _UID_BASE <= int(m.group(1)) < _UID_BASE + _UID_SPAN and not (st and st.group(1) in "ZX"):
            found.setdefault(int(m.group(1)), []).append(int(p))
    return found


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of ``uid``: kill(-1) from that uid reaches all of them atomically."""
    for _ in range(5):
        if uid not in uids_in_use():
            return
        try:
            subprocess.run(["/bin/sh", "-c", "kill -9 -1"], user=uid, group=uid, extra_groups=[],
                           env={"PATH": _ENV_PATH}, cwd="/", capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            pass
        time.sleep(0.02)


class _Capped:
    def __init__(self, limit_bytes: int):
        self.buf, self.limit, self.total = bytearray(), limit_bytes, 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        if len(self.buf) < self.limit:
            self.buf += chunk[: self.limit - len(self.buf)]

    def text(self, max_chars: int) -> str:
        s = self.buf.decode("utf-8", "replace")
        if len(s) > max_chars or self.total > len(self.buf):
            return s[:max_chars] + f"\n... [truncated: {self.total} bytes in all]"
        return s


def execute(code: str, tests: list[str], *, timeout: float, cpu_seconds: float, memory_mb: int, max_file_mb: int,
             max_processes: int, max_output_chars: int, python: str | None, namespaces: bool) -> SandboxResult:
    """Run ``code`` then each of ``tests`` in one sandbox (limits as ``run_code`` documents them);
    always returns a result: a sandbox that cannot start, crashes or times out says so in ``error``."""
    t0 = time.monotonic()
    root = os.geteuid() == 0
    interp = sandbox_python(root, python)
    uid = 0
    if root and interp:
        busy = uids_in_use()
        while not uid or uid in busy:
            uid = _UID_BASE + secrets.randbelow(_UID_SPAN - 1)
    interp = interp or sandbox_python(False, python)
    workdir = tempfile.mkdtemp(prefix="rlft-sandbox-")
    if uid:
        os.chown(workdir, uid, uid)
    rfd, wfd = os.pipe()
    marker = secrets.token_hex(16)
    cfg = {"cpu": max(1, int(cpu_seconds + 0.999)), "mem": int(memory_mb) << 20, "fsize": int(max_file_mb) << 20,
           "nproc": int(max_processes), "uid": uid, "fd": wfd, "harness": HARNESS, "namespaces": namespaces}
    payload = json.dumps({"marker": marker, "code": code, "tests": tests}).encode()
    res = SandboxResult(passed=[False] * len(tests), test_errors=[None] * len(tests))
    outs = {"out": _Capped(max_output_chars * 4 + 64), "err": _Capped(max_output_chars * 4 + 64),
            "res": _Capped((1 << 20) + 4096 * len(tests))}
    proc = None
    try:
        proc = subprocess.Popen([interp, "-I", "-S", "-c", LAUNCHER, json.dumps(cfg)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(wfd,), cwd=workdir,
                                env=_minimal_env(workdir), start_new_session=True)
        os.close(wfd)
        wfd = -1
        sel = selectors.DefaultSelector()
        for f, key in ((proc.stdout, "out"), (proc.stderr, "err")):
            os.set_blocking(f.fileno(), False)
            sel.register(f.fileno(), selectors.EVENT_READ, key)
        os.set_blocking(rfd, False)
        sel.register(rfd, selectors.EVENT_READ, "res")
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE, "in")
        deadline, ended, sent = t0 + timeout, False, 0
        while sel.get_map():
            now = time.monotonic()
            if not ended and proc.poll() is not None:
                ended = True  # the harness is done: kill what it left behind, drain briefly
                _kill_all(proc, uid)
                deadline = min(deadline, now + 2.0)
            if now >= deadline:
                if not ended:
                    res.timed_out = True
                    _kill_all(proc, uid)
                    ended, deadline = True, now + 2.0
                    continue
                break
            for key, _ in sel.select(min(0.05, max(0.0, deadline - now))):
                fd = key.fd
                if key.data == "in":
                    try:
                        sent += os.write(fd, payload[sent: sent + 65536])
                        done = sent >= len(payload)
                    except (BrokenPipeError, OSError):
                        done = True
                    if done:
                        sel.unregister(fd)
                        proc.stdin.close()
                    continue
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if chunk:
                    outs[key.data].add(chunk)
                else:
                    sel.unregister(fd)
        sel.close()
        if not ended:  # every pipe closed first: the launcher may still be cleaning up
            _kill_all(proc, uid)
        res.returncode = proc.wait()
    except OSError as e:
        res.error = f"could not start the sandbox: {e}"
    finally:
        for fd in (rfd, wfd):
            if fd >= 0:
                os.close(fd)
        if proc is not None:
            for f in (proc.stdin, proc.stdout, proc.stderr):
                if f and not f.closed:
                    f.close()
        shutil.rmtree(workdir, ignore_errors=True)
    res.duration = time.monotonic() - t0
    res.stdout, res.stderr = outs["out"].text(max_output_chars), outs["err"].text(max_output_chars)
    _read_results(res, outs["res"].buf.decode("utf-8", "replace"), marker, timeout)
    return res


def _kill_all(proc: subprocess.Popen, uid: int) -> None:
    if proc.poll() is None:  # the launcher kills the code and cleans up its process tree itself
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(1.0)
        except (subprocess.TimeoutExpired, OSError):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if uid:
        _kill_uid(uid)


def _read_results(res: SandboxResult, text: str, marker: str, timeout: float) -> None:
    lines = text.splitlines()
    done = False
    if lines:
        try:
            first = json.loads(lines[0])
            res.protections = list(first.get("protections", []))
            res.refused = {str(k): int(v) for k, v in first.get("why", {}).items()}
        except (ValueError, AttributeError):
            pass
    seen: set[int] = set()
    for line in lines[1:]:
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if not (isinstance(item, list) and item and item[0] == marker):
            continue
        if item[1] == "done":
            done = True
        elif item[1] == "error" and res.error is None:
            res.error = str(item[2])
        elif isinstance(item[1], int) and 0 <= item[1] < len(res.passed) and item[1] not in seen:
            seen.add(item[1])
            res.passed[item[1]] = item[2] is True
            res.test_errors[item[1]] = None if item[2] is True else str(item[3])
    if res.timed_out:
        res.error = res.error or f"timed out after {timeout:g}s"
    elif not done and res.error is None:
        rc = res.returncode
        if rc is not None and rc < 0:
            name = signal.Signals(-rc).name if -rc in signal.valid_signals() else str(-rc)
            hint = {signal.SIGXCPU: " (CPU time limit)", signal.SIGKILL: " (CPU time limit, or killed)"}.get(-rc, "")
            res.error = f"killed by {name}{hint}"
        else:
            res.error = f"exited with code {rc} before finishing the tests"
    for i in range(len(res.passed)):
        if i not in seen and res.test_errors[i] is None:
            res.test_errors[i] = "not run"

"""Run untrusted Python (a model's solution) against test cases, contained, and score it.

``run_code(code, tests)`` runs ``code`` then each test (an ``assert ...`` statement, or any
statement) in a fresh Python process and returns a ``SandboxResult`` with one pass/fail per
test. ``arun_code`` is the async form, bounded by a module-wide limit on concurrent sandboxes
(``set_max_concurrency(n)``; default: the number of CPUs). ``code_tests(tests_field="tests")``
is the reward: the fraction of the example's tests that the completion's code passes (the last
```python fenced block of the completion, or the whole text). ``protections()`` reports which
of the protections below this machine grants.

**Isolation level, and the refusal.** ``isolation()`` probes once per process (one empty
sandbox) and says the level this machine gives: "namespaces" (at least its own network and a
read-only filesystem outside its directory), "partial-namespaces" or "rlimits-only" (containers
without CAP_SYS_ADMIN, kernels or sandboxes that forbid user namespaces, macOS), with what is
missing and why (the errno the kernel gave). Below "namespaces" the protections left are the
uid switch, the limits and the in-process socket patch: in issue #15, 7 of 35 hostile programs
escaped them (network, writes to /tmp). So ``run_code`` refuses there with
``SandboxRefusedError`` (its message names what is missing, why, and how to opt in) unless
running unconfined is allowed: ``run_code(..., unconfined=True)``, ``set_unconfined(True)``,
``RLFT_SANDBOX_UNCONFINED=1``, or ``sandbox_unconfined = true`` in a training config.
``RLFT_SANDBOX_NO_NAMESPACES=1`` makes the child skip namespaces altogether (a real
rlimits-only sandbox, for tests). ``rlft doctor``, ``rlft validate``/``eval`` and a run's log
state the level (``rlft.rewards.confinement``).

How a run is contained, and the limits of each protection:

- **Separate process, fresh directory.** The code runs in a new interpreter (``python -I -S
  -B``: no site-packages, no ``PYTHON*`` variables, no bytecode written), in a new session and
  process group, with a new temporary directory as cwd, ``HOME`` and ``TMPDIR``, removed after.
  Only the standard library is importable.
- **Scrubbed environment.** The child gets ``PATH``, ``LANG``, ``HOME`` and ``TMPDIR`` only: no
  secret from the parent's environment. ``/proc/<pid>/environ`` of other processes is unreadable
  once the child runs as another user (below).
- **Resource limits** (``setrlimit``, per process): CPU seconds (``cpu_seconds``, then SIGKILL),
  address space (``memory_mb``: allocations past it raise ``MemoryError``), size of any file
  written (``max_file_mb``), processes (``max_processes``), no core files, 256 open files.
  ``RLIMIT_NPROC`` counts all processes of the child's *user*, and does not apply to root at
  all, which is why the child gets a user of its own (below); a non-root parent sets it to "the
  user's current process count + max_processes". Wall time is bounded by ``timeout``.
  ``RLIMIT_AS`` counts virtual memory: threads (8 MiB stacks, malloc arenas) use it up fast.
- **Its own unprivileged user** (parent is root): after setting up, the child switches to a
  fresh random uid/gid in ``[1_600_000_000, 2_000_000_000)`` with no supplementary groups and
  ``no_new_privs`` (setuid binaries cannot raise it back). It cannot write root's files, read
  0600/0700 ones, signal or trace other processes (concurrent sandboxes have different uids), and
  ``RLIMIT_NPROC`` bounds exactly its own processes. Needs an interpreter that this user can
  execute: ``sys.executable`` when its install is world-readable, else ``/usr/bin/python3``
  (``RLFT_SANDBOX_PYTHON`` or ``python=`` to choose); when there is none the child stays root
  ("uid" is then missing from ``protections``). A non-root parent cannot switch users: the child
  runs as the parent's user and the protections below matter more.
- **Namespaces**, each only when the kernel allows it (tried in the child, reported in
  ``SandboxResult.protections``): a new *network* namespace (no interface but a down loopback:
  no connection anywhere, not even 127.0.0.1); a new *mount* namespace in which every mount is
  remounted read-only and nosuid except the sandbox directory (so world-writable places such as
  /tmp and /dev/shm are read-only too); a new *PID* namespace with a fresh /proc (the child
  sees only its own processes; when its first process ends the kernel kills the rest); new IPC
  and UTS namespaces. As non-root these need unprivileged user namespaces (``CLONE_NEWUSER``).
- **Fallback without a network namespace:** a prelude replaces ``socket.socket`` (and
  ``create_connection``, ``create_server``, ``fromfd``, ``_socket.socket``) with ones that raise
  ``PermissionError`` before the code runs. This is in-process and therefore weak: code that
  calls ``socket(2)`` through ``ctypes``, or runs another program, still reaches the network.
- **Cleanup.** A small launcher (our code, started first) sets all this up, forks the code's
  process and stays as its parent. When the code's process ends, or the caller stops it
  (SIGTERM on timeout), the launcher SIGKILLs every process left below it: it is their
  *subreaper*, so daemons that called ``setsid`` are reparented to it and caught too; in a PID
  namespace the kernel does it. The caller then SIGKILLs the process group and, as root, every
  process left with the sandbox's uid (``kill(-1, SIGKILL)`` run as that uid, which reaches all
  of them at once). Only code that kills the launcher itself (possible when both share the
  parent's uid: non-root without namespaces) can leave processes behind, bounded by
  ``RLIMIT_NPROC`` and the CPU limit.
- **Output.** stdout/stderr are drained as they come and truncated to ``max_output_chars``;
  test results travel on a separate pipe, each line tagged with a random marker the code never
  sees on disk or in argv, so printing fake results does not score.

What it does not protect against: hostile code in the same interpreter can tamper with the
harness or its tests (e.g. return an object whose ``__eq__`` is always True, patch
``AssertionError``) -- treat scores as rewards, not proofs; reading world-readable files;
kernel exploits. Without namespaces and as root the filesystem is protected only by file
permissions and the uid switch.

This file imports nothing from rlft but ``rlft.errors`` when it is there (the child's two
programs are strings in it): the tests run it as a standalone file under an unprivileged user
that cannot read the installed package.

Why one module: it must run as that standalone file, so the launcher, the harness, the parent's
side and the isolation probe (which ``run_code`` consults, and which probes with ``run_code``)
travel together; split into modules, the copy the tests load would no longer be the sandbox.
"""

from __future__ import annotations

import ast
import asyncio
import errno
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
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

try:  # the rlft CLI prints a UserError as one line; run as a standalone file, a RuntimeError
    from rlft.errors import UserError

    _ERROR_BASES: tuple[type, ...] = (UserError, RuntimeError)
except ImportError:
    _ERROR_BASES = (RuntimeError,)

_UID_BASE, _UID_SPAN = 1_600_000_000, 400_000_000


class SandboxRefusedError(*_ERROR_BASES):  # type: ignore[misc]
    """Untrusted code was not run: the sandbox is below level "namespaces" here and running it
    unconfined was not allowed (the message says what is missing, why, and how to opt in). A
    reward that gets it stops the run instead of scoring 0."""

_ENV_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass
class SandboxResult:
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
        return _level(self.protections)


# -- the two programs that run in the child ----------------------------------------------------
# The launcher runs first (as the parent's user): namespaces and mounts, then it forks; the child
# sets limits, switches uid and execs the harness, which reads its payload from stdin and reports
# on the results pipe, while the launcher waits, then kills whatever the code left running.
_LAUNCHER = r'''
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
NS, UTS, IPC, USER, PID, NET = 0x20000, 0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000
got = []
work, root = os.getcwd(), os.geteuid() == 0
def mount(src, dst, fs, flags):
    return libc.mount(src and src.encode(), dst.encode(), fs and fs.encode(), flags, None) == 0
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
L = ctypes.c_long
def setattr_(path, flags, set_, clr):  # mount_setattr(AT_FDCWD, path, flags, &attr, sizeof attr)
    attr = (ctypes.c_uint64 * 4)(set_, clr, 0, 0)
    return libc.syscall(L(442), L(-100), ctypes.c_char_p(path.encode()), L(flags), attr, L(32)) == 0
tries = [NS | PID | NET | IPC | UTS, NS | NET, NET] if root else [USER | NS | PID | NET | IPC | UTS, USER | NET]
flags, why = 0, {}  # why: syscall -> errno of what the kernel refused (the parent explains it)
if cfg["namespaces"]:
    for f in tries:
        if libc.unshare(f) == 0:
            flags = f
            break
        why.setdefault("unshare", ctypes.get_errno())  # the fullest set's refusal
if flags & USER:
    uid, gid = os.getuid(), os.getgid()
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        try:
            with open(f"/proc/self/{name}", "w") as fh:
                fh.write(text)
        except OSError:
            pass
if flags & NET:
    got.append("netns")
if flags & NS:
    mount(None, "/", None, (1 << 14) | (1 << 18))  # MS_REC | MS_PRIVATE
    mount(work, work, None, 4096 | (1 << 14))  # MS_BIND | MS_REC: the workdir as its own mount
    os.chdir(work)  # step onto the new mount (the old cwd is the directory under it)
if not flags & PID:
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans (setsid daemons) come back to us
def reap_tree():
    """Kill and reap every descendant (orphans are reparented to us: we are their subreaper)."""
    import time
    me = str(os.getpid())
    for _ in range(500):
        parent = {}
        for p in os.listdir("/proc"):
            try:
                with open(f"/proc/{p}/stat") as fh:
                    parent[p] = fh.read().rsplit(")", 1)[1].split()[1]
            except (OSError, IndexError):
                pass
        tree, todo = [], [me]
        while todo:
            cur = todo.pop()
            kids = [p for p, pp in parent.items() if pp == cur]
            tree += kids
            todo += kids
        for p in tree:
            try:
                os.kill(int(p), 9)
            except OSError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            if not tree:
                return
        time.sleep(0.005)
pid = os.fork()  # the launcher stays as the parent: it reaps, cleans up, and mirrors the end
if pid:
    import signal
    for fd in (0, 1, 2):
        os.close(fd)
    def stop(*_):  # the caller's "stop now"
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    signal.signal(signal.SIGTERM, stop)
    status = os.waitpid(pid, 0)[1]
    if not flags & PID:  # (in a PID namespace the kernel kills the rest, and /proc is the child's)
        reap_tree()
    if os.WIFSIGNALED(status):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        try:
            signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        except (OSError, ValueError):
            pass
        os.kill(os.getpid(), os.WTERMSIG(status))
    os._exit(os.waitstatus_to_exitcode(status))
if flags & PID:
    got.append("pidns")
    if flags & NS and mount("proc", "/proc", "proc", 2 | 4 | 8):
        got.append("fresh_proc")
if flags & NS:
    if setattr_("/", 0x8000, 1 | 2, 0) and setattr_(work, 0, 0, 1):  # all RO+nosuid, workdir RW
        got.append("readonly_fs")
    else:
        why["mount_setattr"] = ctypes.get_errno()
if flags & (IPC | UTS):
    got.append("ipc_uts_ns")
R = resource
lim = [(R.RLIMIT_CPU, cfg["cpu"], cfg["cpu"]), (R.RLIMIT_AS, cfg["mem"], cfg["mem"]),
       (R.RLIMIT_FSIZE, cfg["fsize"], cfg["fsize"]), (R.RLIMIT_CORE, 0, 0), (R.RLIMIT_NOFILE, 256, 256)]
nproc = cfg["nproc"]
if not (root and cfg["uid"]):  # NPROC counts the user's processes: ours plus the allowance
    me = str(os.getuid())
    for p in os.listdir("/proc"):
        try:
            with open(f"/proc/{p}/status") as fh:
                nproc += any(l.startswith("Uid:") and l.split()[1] == me for l in fh)
        except (OSError, ValueError):
            pass
lim.append((R.RLIMIT_NPROC, nproc, nproc))
for res, soft, hard in lim:
    cur = R.getrlimit(res)[1]
    hard = hard if cur == R.RLIM_INFINITY else min(hard, cur)
    try:
        R.setrlimit(res, (min(soft, hard), hard))
    except (ValueError, OSError):
        pass
got.append("rlimits")
if root and cfg["uid"]:
    u = cfg["uid"]
    os.setgroups([])
    os.setresgid(u, u, u)
    os.setresuid(u, u, u)
    if os.getuid() == u and os.geteuid() == u:
        got.append("uid")
if libc.prctl(38, 1, 0, 0, 0) == 0:  # PR_SET_NO_NEW_PRIVS
    got.append("no_new_privs")
libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the launcher, even after setsid
block = "netns" not in got
if block:
    got.append("socket_patch")
fd = cfg["fd"]
os.write(fd, (json.dumps({"protections": got, "why": why}) + "\n").encode())
os.execv(sys.executable, [sys.executable, "-I", "-S", "-B", "-c", cfg["harness"], str(fd), "1" if block else "0"])
'''

_HARNESS = r'''
import json, os, sys
def _fmt(e):
    s = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return s[:300]
def _block_sockets():
    import socket, _socket
    def deny(*a, **k):
        raise PermissionError(1, "network access is disabled in this sandbox")
    class NoSocket(socket.socket):
        def __init__(self, *a, **k):
            deny()
    socket.socket = socket.SocketType = _socket.socket = _socket.SocketType = NoSocket
    for name in ("create_connection", "create_server", "fromfd"):
        setattr(socket, name, deny)
def _main():
    fd, block = int(sys.argv[1]), sys.argv[2] == "1"
    data = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    marker = data.pop("marker")
    out = os.fdopen(fd, "w", buffering=1, encoding="utf-8")
    os.set_inheritable(fd, False)
    def report(*items):
        try:
            out.write(json.dumps([marker, *items]) + "\n")
            out.flush()
        except Exception:
            pass
    if block:
        _block_sockets()
    ns = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        exec(compile(data["code"], "solution.py", "exec"), ns)
    except SystemExit as e:
        if e.code not in (None, 0):
            report("error", f"solution exited with SystemExit({e.code!r})")
            return
    except BaseException as e:
        report("error", _fmt(e))
        return
    for i, test in enumerate(data["tests"]):
        try:
            exec(compile(test, f"<test {i}>", "exec"), ns)
            report(i, True, None)
        except BaseException as e:
            report(i, False, _fmt(e))
    report("done")
_main()
del _main
'''

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


def _sandbox_python(drop_uid: bool, explicit: str | None) -> str:
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


def _uids_in_use() -> dict[int, list[int]]:
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
        if uid not in _uids_in_use():
            return
        try:
            subprocess.run(["/bin/sh", "-c", "kill -9 -1"], user=uid, group=uid, extra_groups=[],
                           env={"PATH": _ENV_PATH}, cwd="/", capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            pass
        time.sleep(0.02)


def _split_tests(tests: list[str] | str) -> list[str]:
    """A list is used as is. A string is split into top-level statements: each ``assert`` is a
    test, and the non-assert statements before it (imports, defs) are its setup; trailing
    non-assert statements (``check(candidate)``) are one last test."""
    if not isinstance(tests, str):
        return [str(t) for t in tests]
    try:
        body = ast.parse(tests).body
    except SyntaxError:
        return [tests]
    out, pending = [], []
    for node in body:
        pending.append(ast.get_source_segment(tests, node) or "")
        if isinstance(node, ast.Assert):
            out.append("\n".join(pending))
            pending = []
    if pending:
        out.append("\n".join(pending))
    return out


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


def _execute(code: str, tests: list[str], *, timeout: float, cpu_seconds: float, memory_mb: int, max_file_mb: int,
             max_processes: int, max_output_chars: int, python: str | None, namespaces: bool) -> SandboxResult:
    t0 = time.monotonic()
    root = os.geteuid() == 0
    interp = _sandbox_python(root, python)
    uid = 0
    if root and interp:
        busy = _uids_in_use()
        while not uid or uid in busy:
            uid = _UID_BASE + secrets.randbelow(_UID_SPAN - 1)
    interp = interp or _sandbox_python(False, python)
    workdir = tempfile.mkdtemp(prefix="rlft-sandbox-")
    if uid:
        os.chown(workdir, uid, uid)
    rfd, wfd = os.pipe()
    marker = secrets.token_hex(16)
    cfg = {"cpu": max(1, int(cpu_seconds + 0.999)), "mem": int(memory_mb) << 20, "fsize": int(max_file_mb) << 20,
           "nproc": int(max_processes), "uid": uid, "fd": wfd, "harness": _HARNESS, "namespaces": namespaces}
    payload = json.dumps({"marker": marker, "code": code, "tests": tests}).encode()
    res = SandboxResult(passed=[False] * len(tests), test_errors=[None] * len(tests))
    outs = {"out": _Capped(max_output_chars * 4 + 64), "err": _Capped(max_output_chars * 4 + 64),
            "res": _Capped((1 << 20) + 4096 * len(tests))}
    proc = None
    try:
        proc = subprocess.Popen([interp, "-I", "-S", "-c", _LAUNCHER, json.dumps(cfg)], stdin=subprocess.PIPE,
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


# -- public API --------------------------------------------------------------------------------
_max_concurrency = max(1, os.cpu_count() or 1)
_thread_sem = threading.BoundedSemaphore(_max_concurrency)
_loop_sems: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loop -> (size, asyncio.Semaphore)


def set_max_concurrency(n: int) -> None:
    """At most ``n`` sandboxes run at once in this process (sync and async callers together)."""
    global _max_concurrency, _thread_sem
    if n < 1:
        raise ValueError("max concurrency must be >= 1")
    _max_concurrency, _thread_sem = n, threading.BoundedSemaphore(n)


def get_max_concurrency() -> int:
    return _max_concurrency


def run_code(code: str, tests: list[str] | str = (), *, timeout: float = 10.0, cpu_seconds: float = 5,
             memory_mb: int = 512, max_file_mb: int = 10, max_processes: int = 64, max_output_chars: int = 2000,
             python: str | None = None, namespaces: bool = True, unconfined: bool | None = None) -> SandboxResult:
    """Run ``code`` then each test in a contained child process; blocks until done or ``timeout``.
    Raises :class:`SandboxRefusedError` where the isolation is below "namespaces" (``isolation()``;
    ``namespaces=False`` is too) unless running unconfined is allowed (``unconfined=True``,
    ``set_unconfined(True)`` or ``RLFT_SANDBOX_UNCONFINED=1``)."""
    check_confined(isolation(namespaces), unconfined)
    namespaces = namespaces and not _flag(NO_NAMESPACES_ENV)
    tests = _split_tests(tests)
    sem = _thread_sem
    with sem:
        return _execute(code, tests, timeout=timeout, cpu_seconds=cpu_seconds, memory_mb=memory_mb,
                        max_file_mb=max_file_mb, max_processes=max_processes, max_output_chars=max_output_chars,
                        python=python, namespaces=namespaces)


async def arun_code(code: str, tests: list[str] | str = (), **kwargs: Any) -> SandboxResult:
    """``run_code`` without blocking the event loop; waits its turn under ``set_max_concurrency``."""
    loop = asyncio.get_running_loop()
    n, sem = _loop_sems.get(loop, (0, None))
    if sem is None or n != _max_concurrency:
        sem = asyncio.Semaphore(_max_concurrency)
        _loop_sems[loop] = (_max_concurrency, sem)
    async with sem:
        return await asyncio.to_thread(run_code, code, tests, **kwargs)


_FENCE = re.compile(r"```([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.S)


def extract_code(text: str) -> str:
    """The last ```python (or ```py) block; else the last fenced block; else the whole text."""
    blocks = _FENCE.findall(text or "")
    py = [b for lang, b in blocks if lang.lower() in ("python", "py", "python3")]
    if py or blocks:
        return (py or [b for _, b in blocks])[-1]
    return text or ""


def _tests_of(value: Any) -> list[str] | str:
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
            if isinstance(parsed, list):
                return [str(t) for t in parsed]
        except ValueError:
            pass
    if value is None:
        raise KeyError("the example has no tests")
    return value


def code_tests(tests_field: str = "tests", code_from: str | Callable[[Any], str] = "completion",
               **run_kwargs: Any) -> Callable[[Any], Any]:
    """Reward: the fraction of tests (``rollout.example[tests_field]``, or ``ground_truth``) that
    the completion's code passes. ``code_from``: "completion" (the last assistant message) or a
    function of the rollout returning the text; ``run_kwargs`` go to ``run_code``."""

    async def reward(rollout: Any) -> float:
        text = code_from(rollout) if callable(code_from) else rollout.completion
        value = rollout.ground_truth if tests_field == "ground_truth" else rollout.example.get(tests_field)
        result = await arun_code(extract_code(text), _tests_of(value), **run_kwargs)
        rollout.log(f"code_tests: passed {sum(result.passed)}/{len(result.passed)}"
                    + (f"; error: {result.error}" if result.error else ""))
        return result.score

    reward.__name__ = reward.__qualname__ = "code_tests"
    _rewards.add(reward)
    return reward


_rewards: weakref.WeakSet = weakref.WeakSet()  # the code_tests rewards made in this process


def uses_sandbox(objects: Iterable[Any]) -> bool:
    """Whether any of ``objects`` (an environment's rewards and tools, its module's globals) is
    this module, one of its entry points or a ``code_tests`` reward. Identity only: code that
    reaches ``run_code`` some other way is caught by the refusal in ``run_code`` itself."""
    mine = (sys.modules[__name__], run_code, arun_code, code_tests, *_rewards)
    return any(obj is m for obj in objects for m in mine)


# -- isolation level, and the refusal to run unconfined ---------------------------------------------
CONFINING = ("netns", "readonly_fs")  # what level "namespaces" needs: no network, nothing writable outside
NAMESPACED = ("netns", "readonly_fs", "pidns", "fresh_proc", "ipc_uts_ns")
NO_NAMESPACES_ENV = "RLFT_SANDBOX_NO_NAMESPACES"  # testing hook: the child does not even try unshare
UNCONFINED_ENV = "RLFT_SANDBOX_UNCONFINED"  # opt-in: run untrusted code without namespaces


def _level(protections: list[str] | tuple[str, ...]) -> str:
    if all(p in protections for p in CONFINING):
        return "namespaces"
    return "partial-namespaces" if any(p in protections for p in NAMESPACED) else "rlimits-only"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Isolation:
    """How well the sandbox contains code on this machine. ``level`` is "namespaces" (its own
    network and a read-only filesystem outside its directory, at least), "partial-namespaces"
    or "rlimits-only" (limits, a uid, a socket patch in the interpreter: the 7 of 35 hostile
    programs that escaped in issue #15 reached the network or wrote to /tmp)."""

    level: str
    protections: tuple[str, ...]  # what an empty sandbox was granted
    missing: tuple[str, ...]  # the namespace protections it was not granted
    reason: str  # why they are missing ("" when none is)

    @property
    def confined(self) -> bool:
        return self.level == "namespaces"

    def line(self) -> str:
        """One line for a log: the level, what is missing and why."""
        text = f"sandbox isolation: {self.level} ({', '.join(self.protections) or 'no protection'})"
        if self.missing:
            text += f"; missing {', '.join(self.missing)}: {self.reason}"
        return text


_ERRNO_HINTS = {
    "EPERM": "not permitted: {who}",
    "EACCES": "not permitted: {who}",
    "ENOSPC": "the namespace limit is reached (sysctl user.max_user_namespaces)",
    "EUSERS": "the namespace limit is reached (sysctl user.max_user_namespaces)",
    "EINVAL": "this kernel was built without these namespaces",
    "ENOSYS": "this kernel has no such system call",
}


def _reason(refused: dict[str, int], namespaces: bool, root: bool) -> str:
    """Why the namespaces are missing, in words, from what the launcher reported."""
    if not namespaces:
        return (f"{NO_NAMESPACES_ENV}=1 is set" if _flag(NO_NAMESPACES_ENV)
                else "namespaces=False was asked")
    if not sys.platform.startswith("linux"):
        return f"namespaces are a Linux feature (this is {sys.platform})"
    who = ("the process lacks CAP_SYS_ADMIN (a container without --cap-add SYS_ADMIN, or a seccomp profile "
           "that blocks unshare)") if root else (
        "unprivileged user namespaces are off (sysctl kernel.unprivileged_userns_clone, "
        "kernel.apparmor_restrict_unprivileged_userns, or a container's seccomp profile)")
    parts = []
    for call, err in refused.items():
        name = errno.errorcode.get(err, f"errno {err}")
        hint = _ERRNO_HINTS.get(name, os.strerror(err) if err else "failed").format(who=who)
        if call == "mount_setattr" and name == "ENOSYS":
            hint = "this kernel has no mount_setattr (Linux < 5.12), so mounts cannot be made read-only"
        parts.append(f"{call} failed with {name}: {hint}")
    return "; ".join(parts) or "the kernel granted fewer namespaces than asked"


_isolation_cache: dict[tuple[bool, bool], Isolation] = {}  # (namespaces asked, the testing hook set)
_isolation_lock = threading.Lock()


def isolation(namespaces: bool = True) -> Isolation:
    """The isolation a sandbox gets on this machine: probed once per process (one empty sandbox,
    in a child, as every run is), then cached. ``namespaces=False`` (or ``RLFT_SANDBOX_NO_NAMESPACES=1``):
    what the child gets without trying any namespace."""
    hook = _flag(NO_NAMESPACES_ENV)
    key, namespaces = (namespaces, hook), namespaces and not hook
    with _isolation_lock:
        if key not in _isolation_cache:
            probe = _execute("pass", [], timeout=30, cpu_seconds=5, memory_mb=512, max_file_mb=1, max_processes=8,
                             max_output_chars=2000, python=None, namespaces=namespaces)
            if probe.error:  # no sandbox at all: say so rather than report a level
                raise SandboxRefusedError(f"the code sandbox cannot start here: {probe.error} {probe.stderr}".strip())
            got = tuple(probe.protections)
            missing = tuple(p for p in NAMESPACED if p not in got)
            _isolation_cache[key] = Isolation(
                level=_level(got), protections=got, missing=missing,
                reason=_reason(probe.refused, namespaces, os.geteuid() == 0) if missing else "")
        return _isolation_cache[key]


def protections() -> list[str]:
    """Which protections a sandbox gets on this machine (runs one empty sandbox, once)."""
    return list(isolation().protections)


_unconfined = False


def set_unconfined(allow: bool) -> bool:
    """Allow (or stop allowing) ``run_code`` in this process to run code below level
    "namespaces"; returns the previous setting. ``sandbox_unconfined = true`` in a training
    config sets it for the run."""
    global _unconfined
    previous, _unconfined = _unconfined, bool(allow)
    return previous


def unconfined_allowed(unconfined: bool | None = None) -> bool:
    """Whether code may run below level "namespaces": ``unconfined`` when given, else
    ``set_unconfined(True)`` or ``RLFT_SANDBOX_UNCONFINED=1``."""
    return unconfined if unconfined is not None else _unconfined or _flag(UNCONFINED_ENV)


def check_confined(iso: Isolation, unconfined: bool | None = None) -> None:
    """Raise :class:`SandboxRefusedError` when ``iso`` is below level "namespaces" and running
    unconfined was not allowed."""
    if iso.confined or unconfined_allowed(unconfined):
        return
    raise SandboxRefusedError(
        f"refusing to run untrusted code: the sandbox's isolation here is {iso.level} (missing "
        f"{', '.join(iso.missing)}: {iso.reason}). Without a network namespace and a read-only mount "
        "namespace, code can reach the network and write to world-writable places outside its directory "
        "(/tmp, /dev/shm). To run it anyway with these weaker protections, set sandbox_unconfined = true "
        f"in the config (library use: {UNCONFINED_ENV}=1, sandbox.set_unconfined(True), or "
        "run_code(..., unconfined=True)); to confine it, run on a Linux host or VM that allows namespaces.")


__all__ = ["SandboxResult", "run_code", "arun_code", "set_max_concurrency", "get_max_concurrency", "code_tests",
           "extract_code", "protections", "Isolation", "isolation", "set_unconfined", "unconfined_allowed",
           "check_confined", "SandboxRefusedError", "uses_sandbox"]

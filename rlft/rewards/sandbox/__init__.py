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

The package, by job: ``child.py`` (the launcher and the harness, as text), ``runner.py`` (one
sandbox from start to cleanup), ``isolation_level.py`` (the probe, the level and the refusal), and
this file (the API: ``run_code``, the concurrency bound, the ``code_tests`` reward). It imports
nothing from rlft but ``rlft.errors`` when it is there (the child's two programs are strings):
the tests load a copy of the package standalone, under an unprivileged user that cannot read
the installed one.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import sys
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from .isolation_level import (
    NO_NAMESPACES_ENV,
    UNCONFINED_ENV,
    Isolation,
    SandboxRefusedError,
    check_confined,
    isolation,
    namespaces_tried,
    protections,
    set_unconfined,
    unconfined_allowed,
)
from .runner import SandboxResult, execute

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
    namespaces = namespaces_tried(namespaces)
    tests = _split_tests(tests)
    sem = _thread_sem
    with sem:
        return execute(code, tests, timeout=timeout, cpu_seconds=cpu_seconds, memory_mb=memory_mb,
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


__all__ = ["SandboxResult", "run_code", "arun_code", "set_max_concurrency", "get_max_concurrency", "code_tests",
           "extract_code", "protections", "Isolation", "isolation", "set_unconfined", "unconfined_allowed",
           "check_confined", "SandboxRefusedError", "uses_sandbox", "NO_NAMESPACES_ENV", "UNCONFINED_ENV"]

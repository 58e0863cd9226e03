"""The isolation level the sandbox gets on this machine, and the refusal to run untrusted code
below level "namespaces" unless running it unconfined was allowed.

:func:`isolation` probes once per process (one empty sandbox) and returns an :class:`Isolation`:
the level, what is missing and why, in words built from the errno the kernel gave.
:func:`check_confined` raises :class:`SandboxRefusedError` below "namespaces" unless
``set_unconfined(True)``, ``RLFT_SANDBOX_UNCONFINED=1`` or an explicit ``unconfined=True`` allows
it. Left out: running the sandbox (``runner.py``) and where an environment is checked before a
run spends compute (``rlft.rewards.confinement``).
"""

from __future__ import annotations

import errno
import os
import sys
import threading
from dataclasses import dataclass

from .runner import NAMESPACED, execute, level_of

try:  # the rlft CLI prints a UserError as one line; run as a standalone file, a RuntimeError
    from rlft.errors import UserError

    _ERROR_BASES: tuple[type, ...] = (UserError, RuntimeError)
except ImportError:
    _ERROR_BASES = (RuntimeError,)


class SandboxRefusedError(*_ERROR_BASES):  # type: ignore[misc]
    """Untrusted code was not run: the sandbox is below level "namespaces" here and running it
    unconfined was not allowed (the message says what is missing, why, and how to opt in). A
    reward that gets it stops the run instead of scoring 0."""


NO_NAMESPACES_ENV = "RLFT_SANDBOX_NO_NAMESPACES"  # testing hook: the child does not even try unshare
UNCONFINED_ENV = "RLFT_SANDBOX_UNCONFINED"  # opt-in: run untrusted code without namespaces


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def namespaces_tried(namespaces: bool = True) -> bool:
    """Whether a sandbox asked for ``namespaces`` tries them (not with ``RLFT_SANDBOX_NO_NAMESPACES=1``)."""
    return namespaces and not _flag(NO_NAMESPACES_ENV)


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
    key, namespaces = (namespaces, _flag(NO_NAMESPACES_ENV)), namespaces_tried(namespaces)
    with _isolation_lock:
        if key not in _isolation_cache:
            probe = execute("pass", [], timeout=30, cpu_seconds=5, memory_mb=512, max_file_mb=1, max_processes=8,
                             max_output_chars=2000, python=None, namespaces=namespaces)
            if probe.error:  # no sandbox at all: say so rather than report a level
                raise SandboxRefusedError(f"the code sandbox cannot start here: {probe.error} {probe.stderr}".strip())
            got = tuple(probe.protections)
            missing = tuple(p for p in NAMESPACED if p not in got)
            _isolation_cache[key] = Isolation(
                level=level_of(got), protections=got, missing=missing,
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

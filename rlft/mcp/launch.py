"""Start an MCP stdio server so that it dies with the process that started it.

Usage (``rlft.mcp`` builds this command line; it is not meant to be typed)::

    python -I -S /path/to/rlft/mcp/launch.py --parent PID -- COMMAND [ARGS...]

On Linux it asks the kernel for ``PR_SET_PDEATHSIG = SIGTERM`` and then ``execvp``s the
server, so the server keeps this process's PID, stdin/stdout and environment, and receives
SIGTERM the moment its parent dies -- even when the parent is SIGKILLed and gets no chance
to clean up. A well-behaved server would also exit on the EOF of its stdin, but many don't
(background threads, a busy tool call, a shell wrapper), and those become orphans that hold
GPUs, ports or databases until the machine reboots.

Why a separate script and these flags: ``subprocess``'s ``preexec_fn`` is not safe with
threads and the SDK's ``stdio_client`` offers no hook, so the child sets the flag on itself.
It is run as a file path with ``-I -S`` (not ``-m rlft.mcp.launch``) so that starting a
server imports neither the ``rlft`` package (whose ``__init__`` may pull in torch) nor
site-packages, and so that ``rlft/`` is not put on ``sys.path`` (``rlft/types.py`` would
shadow the standard library's ``types``). It costs one short Python start-up per server.

Limits, documented rather than hidden:
- The death signal follows the parent *thread* that forked the child: asyncio forks from the
  event-loop thread, so the server dies when that thread ends, which is at latest when the
  process ends.
- Only the exec'd process gets the signal. Its own children (``npx`` -> ``node``) are not
  signalled by the kernel; they still see their stdin close, and a normal shutdown by
  ``rlft.mcp`` kills the server's whole process group.
- Elsewhere than Linux there is no such flag: the server is exec'd unchanged and relies on
  the EOF of its stdin (``rlft.mcp`` does not use this launcher there at all).
"""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent (thread) dies. False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(int(sig)), ctypes.c_ulong(0), ctypes.c_ulong(0),
                          ctypes.c_ulong(0)) == 0
    except Exception:  # noqa: BLE001 - no libc symbol, seccomp, ...: run the server anyway
        return False


def main(argv: list[str]) -> int:
    parent: int | None = None
    if argv[:1] == ["--parent"] and len(argv) >= 2:
        parent = int(argv[1])
        argv = argv[2:]
    if argv[:1] != ["--"] or len(argv) < 2:
        print("usage: launch.py [--parent PID] -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    command = argv[1:]

    # An ignored or blocked SIGTERM is inherited across exec and would make the death signal a no-op.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    set_parent_death_signal(signal.SIGTERM)
    # The parent may have died between fork and prctl: then no signal will ever come, and
    # starting the server would create exactly the orphan this launcher exists to prevent.
    if parent is not None and os.getppid() != parent:
        return 0
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"rlft MCP launcher: cannot run {command[0]!r}: {exc}", file=sys.stderr)
        return 127
    return 0  # not reached: execvp replaced this process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""glibc malloc tuning for CPU tensor work: keep freed tensor memory in the heap for reuse.

By default glibc serves each allocation above a dynamic threshold (128 KiB to 32 MiB) with a
fresh ``mmap`` and gives it back on free, so a loop that allocates the same 12 MiB tensors at
every step (a batch-64 sampling step on a 49k vocabulary) pays a page fault for every 4 KiB
page, every time: measured on SmolLM2, the engine's sampling took 20 ms per decode step that
way and 4 ms with the memory kept (benchmarks/README.md). :func:`keep_freed_memory` raises
the mmap threshold to glibc's maximum (32 MiB) and stops heap trimming, once per process.
The cost: the process keeps its peak heap instead of returning it to the OS, in every malloc
arena (the update's activations stayed in RSS through the next sampling: 4.1 GB of a demo run's
4.6 GB peak, measured). :func:`release_freed_memory` (``malloc_trim``) hands the free part back
after each update, so the page faults come once per update and not once per decode step.
Left out: other allocators (jemalloc/tcmalloc via LD_PRELOAD do this too), non-glibc systems
(a no-op there).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

__all__ = ["keep_freed_memory", "release_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc refuses larger values on 64-bit (HEAP_MAX_SIZE / 2)
_done: bool | None = None


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, loaded once: ``find_library`` runs a subprocess, too slow for every training phase."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Tune glibc malloc (see the module docstring); True when it applied. Idempotent."""
    global _done
    if _done is not None:
        return _done
    _done = False
    try:
        mallopt = _libc().mallopt
    except AttributeError:  # no glibc (None), or a libc without mallopt (musl)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok
    _done = ok
    return ok


def release_freed_memory() -> bool:
    """Return the free memory of every glibc malloc arena to the OS (``malloc_trim(0)``); True
    when glibc did. For phase boundaries only: the next phase page-faults its memory in again."""
    try:
        trim = _libc().malloc_trim
    except AttributeError:  # no glibc (None), or a libc without malloc_trim
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim(0) == 1

"""Compile rlft's C kernels on first use, cache the shared library, load it with ctypes.

A kernel is one C file beside this module (and the headers beside it), compiled by the
machine's C compiler (``$CC``, else ``cc``) with ``-O3 -march=native -fopenmp`` into
``$RLFT_CACHE/kernels`` (default ``~/.cache/rlft/kernels``), under a name that hashes the source
and headers, the compiler's version, the flags and this CPU's model and feature flags: a home
directory shared between machines never loads a library built for another CPU. Compiling takes
well under a second; later processes load the file.

Where there is no compiler, the CPU lacks what a kernel needs (the compiler then refuses its
intrinsics), or ``RLFT_NATIVE_KERNELS=0`` is set, :func:`load` returns None once with one log line
and the callers keep their torch path. OpenMP: on Linux the library links ``libgomp.so.1``, the
runtime torch's CPU wheels already loaded, so a kernel's threads are torch's (one pool, sized by
``torch.set_num_threads``); a torch built on another threading runtime loads no kernels.

Left out: Windows and macOS toolchains (no kernels there), ahead-of-time builds in the wheel.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

log = logging.getLogger(__name__)

__all__ = ["DISABLE_ENV", "bind", "cache_dir", "load", "status"]

T = TypeVar("T")
DISABLE_ENV = "RLFT_NATIVE_KERNELS"  # "0": never compile or load a kernel (the torch paths run)
_FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fopenmp", "-std=c11", "-Wall", "-Werror"]
_SOURCES = Path(__file__).parent


def cache_dir() -> Path:
    root = os.environ.get("RLFT_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "rlft") / "kernels"


def enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "1") != "0"


def load(name: str) -> ctypes.CDLL | None:
    """The compiled kernel ``name`` (``name.c`` beside this module), or None where it cannot run
    here (no compiler, unsupported CPU or OS, torch not on OpenMP, or disabled)."""
    return _load(name)[0] if enabled() else None


def bind(name: str, wrapper: Callable[[ctypes.CDLL], T | None]) -> T | None:
    """``wrapper(library)`` for the compiled kernel ``name``, made once per loaded library (it
    declares the C signatures), or None where the kernel cannot run here (see :func:`load`)."""
    lib = load(name)
    return _bound(wrapper, lib) if lib is not None else None


@functools.cache
def _bound(wrapper: Callable[[ctypes.CDLL], T | None], lib: ctypes.CDLL) -> T | None:
    return wrapper(lib)


def status(name: str) -> str:
    """One line for ``rlft doctor``: where the kernel's library is, or why it is not used."""
    if not enabled():
        return f"turned off ({DISABLE_ENV}=0)"
    lib, why = _load(name)
    return f"built ({lib._name})" if lib is not None else why


@functools.cache
def _load(name: str) -> tuple[ctypes.CDLL | None, str]:
    lib, why = _build(name)
    if lib is None:
        log.info("rlft kernel %s not used: %s", name, why)
    return lib, why


def _build(name: str) -> tuple[ctypes.CDLL | None, str]:
    why = _unsupported()
    if why:
        return None, why
    source = _SOURCES / f"{name}.c"
    compiler = os.environ.get("CC") or "cc"
    version = _run([compiler, "--version"])
    if version is None:
        return None, f"no C compiler ({compiler}; set CC or install gcc)"
    headers = [h.read_text() for h in sorted(_SOURCES.glob("*.h"))]  # what the sources include
    key = hashlib.sha256("\0".join([source.read_text(), *headers, compiler, version, *_FLAGS, _cpu()]).encode())
    key = key.hexdigest()
    target = cache_dir() / f"{name}-{key[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # build beside, then rename: atomic
            built = Path(tmp) / target.name
            result = subprocess.run([compiler, *_FLAGS, str(source), "-o", str(built)],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                first = (result.stderr.strip().splitlines() or ["(no message)"])[0]
                return None, (f"{compiler} could not compile it here (a CPU without the instructions it needs: "
                              f"AVX-512 BF16, or AMX for amx_linear?): {first}")
            os.replace(built, target)
    return ctypes.CDLL(str(target)), ""


def _unsupported() -> str | None:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"{platform.system()} {platform.machine()} (kernels are built for Linux x86-64 only)"
    if "OpenMP" not in torch.__config__.parallel_info():
        return "torch is not built with OpenMP (the kernels share its thread pool)"
    return None


def _cpu() -> str:
    """This CPU's model and feature flags (the part of /proc/cpuinfo a -march=native build depends on)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = ("model name", "flags")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    result = subprocess.run(cmd, capture_output=True, text=True)
    return result.stdout if result.returncode == 0 else None

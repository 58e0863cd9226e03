"""glibc malloc tuning (rlft.allocator): kept freed memory is handed back by release_freed_memory.

Runs in a child process: the tuning is process-wide, and the check reads the child's RSS."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

CHILD = textwrap.dedent('''
    import re
    from pathlib import Path

    import torch

    from rlft.allocator import keep_freed_memory, release_freed_memory

    def rss_mb():
        return int(re.search(r"VmRSS:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) // 1024

    assert keep_freed_memory()
    base = rss_mb()
    blocks = [torch.ones(512 * 1024) for _ in range(150)]  # 2 MiB each: heap, not mmap, under the tuning
    grown = rss_mb()
    del blocks
    kept = rss_mb()
    assert release_freed_memory()
    print(base, grown, kept, rss_mb())
''')


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_freed_tensor_memory_stays_in_rss_until_released():
    root = str(Path(__file__).resolve().parent.parent)  # this checkout's rlft, whatever is installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    base, grown, kept, released = map(int, out.stdout.split())
    assert grown - base >= 250  # 300 MiB of blocks
    assert kept - base >= 250  # freed, but kept by the allocator (keep_freed_memory's purpose)
    assert kept - released >= 250  # handed back to the OS


def test_importing_rlft_caps_onednn_primitive_cache_unless_the_user_set_it():
    code = "import os, rlft; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "64"
    env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = "512"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "512"

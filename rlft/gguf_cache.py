"""A GGUF model converted once: later loads read the converted copy from ``$RLFT_CACHE/gguf``.

transformers loads a GGUF file by parsing its metadata field by field in Python and
dequantizing every tensor: for SmolLM2-135M-Instruct (Q4_1) ~4.8 s for the tokenizer and ~13.5 s
for the model on the 2-core CPU, a third of the demo's wall time, paid again by every process
(the demo, each recipe, ``rlft serve``, ``rlft eval``). Here the first load saves what it produced
(safetensors weights, config and generation config; tokenizer files and chat template) and later
loads read that back in ~0.2 s. The copy is the converted model bit for bit: the same tensors,
config and tokenizer (``tests/test_gguf_cache.py``).

An entry's key is the file (real path, size, modification time in ns), what shaped the result
(the tokenizer, or the model in one dtype) and the transformers version that converted it: a
replaced or upgraded file, or another transformers, converts again. An entry is written to a
temporary directory and renamed into place, so a reader never sees half of one, and two processes
converting at once both succeed (the second rename loses, harmlessly). An entry that fails to load
(a truncated file, disk trouble) is logged, removed and rebuilt from the GGUF file; failing to
write one (a full or read-only disk) is logged and the load goes on without it.
``RLFT_GGUF_CACHE=0`` turns the cache off.

Left out: eviction (an entry is the model's size in its dtype: 0.26 GB for SmolLM2 in bf16, 0.54 GB
in float32; delete ``$RLFT_CACHE/gguf`` to reclaim it), content hashing (a file rewritten in place
with the same size and modification time would be served stale), GGUF files that transformers
cannot load (they fail as before, and nothing is cached).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

__all__ = ["DISABLE_ENV", "cache_dir", "cached", "entry_dir", "usage"]

T = TypeVar("T")
DISABLE_ENV = "RLFT_GGUF_CACHE"  # "0": always convert from the GGUF file, never read or write entries
_FORMAT = 1  # bump when what an entry holds changes


def cache_dir() -> Path:
    root = os.environ.get("RLFT_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "rlft") / "gguf"


def entry_dir(gguf_path: str, what: str) -> Path | None:
    """Where the converted ``what`` (``"tokenizer"``, ``"model-torch.bfloat16"``, ...) of the GGUF
    file ``gguf_path`` is kept; None when the cache is off or the file cannot be read."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    import transformers

    try:
        real = os.path.realpath(gguf_path)
        st = os.stat(real)
    except OSError:
        return None  # the loader reports a missing file with its own message
    key = f"{_FORMAT}|{real}|{st.st_size}|{st.st_mtime_ns}|{what}|{transformers.__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    stem = Path(real).name.removesuffix(".gguf")
    return cache_dir() / f"{stem}-{what}-{digest}"


def cached(gguf_path: str, what: str, convert: Callable[[], T], load: Callable[[Path], T]) -> T:
    """``load(entry)`` where an entry for (``gguf_path``, ``what``) exists; else ``convert()`` (the
    slow load from the GGUF file), saved as a new entry with the result's ``save_pretrained``."""
    entry = entry_dir(gguf_path, what)
    if entry is None:
        return convert()
    if entry.is_dir():
        try:
            return load(entry)
        except Exception as e:  # noqa: BLE001 - any failure to read an entry means: rebuild it
            log.warning("rlft: the converted copy of %s at %s did not load (%s: %s); converting the GGUF file again",
                        gguf_path, entry, type(e).__name__, e)
            shutil.rmtree(entry, ignore_errors=True)
    result = convert()
    _store(entry, result)
    return result


def usage() -> str:
    """What ``rlft doctor`` prints: the cache's directory, entries and size, or that it is off."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return f"turned off ({DISABLE_ENV}=0)"
    root = cache_dir()
    entries = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")] if root.is_dir() else []
    size = sum(f.stat().st_size for e in entries for f in e.rglob("*") if f.is_file())
    return f"{root}: {len(entries)} entries, {size / 1e9:.2f} GB (delete the directory to reclaim it)"


def _store(entry: Path, obj: Any) -> None:
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    except OSError as e:
        log.warning("rlft: cannot write the GGUF cache under %s (%s); loads will convert the file again",
                    entry.parent, e)
        return
    try:
        obj.save_pretrained(tmp)
        os.rename(tmp, entry)
    except OSError as e:
        if not entry.is_dir():  # another process's rename won the race: theirs is as good
            log.warning("rlft: could not keep the converted GGUF model at %s (%s)", entry, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

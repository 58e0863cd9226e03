"""Datasets: load rows from a file or an in-memory source, validate them, split, and batch them.

A row has exactly one of ``prompt`` (a non-empty string) or ``messages`` (a non-empty chat list
of ``{"role", "content"}`` dicts ending with a user or tool message), an optional
``ground_truth`` (any value) and any extra fields, all kept as they are. Sources: ``.jsonl``
(``.ndjson``), ``.json`` (a list of rows, or ``{"data": [...]}`` / ``{"rows": [...]}``),
``.csv``, ``.parquet``, a list of dicts, or a Hugging Face ``datasets.Dataset``.

CSV has no types, so: a ``messages`` cell is JSON-decoded; every other cell stays a string
(``ground_truth`` included: use JSONL or Parquet for structured ground truths); an empty
cell becomes ``None``, and ``None`` counts as absent for ``prompt``/``messages`` (so a file
can have both columns, one filled per row).

Every problem fails loading with one :class:`DatasetError` naming the source, the row and the
field, and saying what to do. Rows are located as ``line N`` (JSONL: 1-based file line),
``data row N`` (CSV: 1-based, header not counted) or ``index N`` (0-based position: lists,
JSON, Parquet, ``datasets``). No row is ever dropped: N valid rows in, N examples out, each
with ``example_id`` = its 0-based position in the source (so ``example_id`` is reserved).

A ``split`` field ("train", or "eval"/"test"/"validation"), when rows have one, decides
:meth:`Dataset.split`; otherwise the split is seeded. :meth:`Dataset.batch` is a pure function
of (step, batch_size, seed, dataset), which is what makes resuming at step k exact.

Left out: Hub names (``datasets.load_dataset("gsm8k")`` first, then pass the split), streaming
and multimodal content parts, compressed files, and per-rank sharding (the trainer slices the
batch, since it alone knows the ranks).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlft.errors import UserError
from rlft.types import Message

__all__ = ["Dataset", "DatasetError", "initial_messages", "load_dataset"]

ROLES = ("system", "user", "assistant", "tool")
SPLIT_VALUES = {"train": "train", "eval": "eval", "test": "eval", "validation": "eval"}
MAX_SHOWN = 10  # problems listed in one error; the rest are counted

_NOTES = {
    "line": "line = 1-based line of the file",
    "data row": "data row = 1-based row of the CSV, header not counted",
    "index": "index = 0-based position of the row",
}


class DatasetError(UserError, ValueError):
    """A dataset that cannot be used; the message names the source, row and field, and the fix."""


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _fail(name: str, problems: list[str], unit: str) -> DatasetError:
    shown = "\n".join("  " + p for p in problems[:MAX_SHOWN])
    more = f"\n  ... and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
    return DatasetError(
        f"dataset {name!r}: {len(problems)} problem{'s' if len(problems) > 1 else ''} "
        f"({_NOTES[unit]}); fix them and load again:\n{shown}{more}"
    )


# -- reading: each reader yields (location, row) pairs and the problems it hit ----------------


def _read_text(path: Path, name: str) -> str:
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate the BOM Excel writes
    except UnicodeDecodeError as e:
        raise DatasetError(f"dataset {name!r} is not UTF-8 text ({e}); re-save it as UTF-8") from e
    if not text.strip():
        raise DatasetError(f"dataset {name!r} is empty; it needs at least one row")
    return text


def _read_jsonl(text: str) -> tuple[list[tuple[str, Any]], list[str]]:
    rows, problems = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue  # blank lines (a trailing newline, spacing) are not rows
        try:
            rows.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            problems.append(f"line {n}: not valid JSON ({e.msg} at column {e.colno}); "
                            "each line must be one JSON object")
    return rows, problems


def _read_json(text: str, name: str) -> list[tuple[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (one object per line? name the file .jsonl)" if e.msg == "Extra data" else ""
        raise DatasetError(f"dataset {name!r}: not valid JSON at line {e.lineno}, column {e.colno}: "
                           f"{e.msg}{hint}") from e
    if isinstance(data, dict):
        key = next((k for k in ("data", "rows") if isinstance(data.get(k), list)), None)
        data = data[key] if key else None
    if not isinstance(data, list):
        raise DatasetError(f"dataset {name!r}: a .json file must hold a list of rows or an object "
                           f"with a 'data' or 'rows' list")
    return [(f"index {i}", row) for i, row in enumerate(data)]


def _read_csv(text: str) -> tuple[list[tuple[str, Any]], list[str]]:
    rows, problems = [], []
    reader = csv.DictReader(text.splitlines(keepends=True))
    header = reader.fieldnames or []
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        problems.append(f"header: column{'s' if len(dupes) > 1 else ''} {dupes} repeated; give each column one name")
    for n, raw in enumerate(reader, 1):
        where = f"data row {n}"
        if None in raw:  # DictReader files surplus cells under the key None
            problems.append(f"{where}: {len(raw.pop(None))} more cell(s) than the header has columns; "
                            "quote cells that contain commas")
        row = {k: (None if v == "" else v) for k, v in raw.items()}
        if isinstance(row.get("messages"), str):
            try:
                row["messages"] = json.loads(row["messages"])
            except json.JSONDecodeError as e:
                problems.append(f"{where}, field 'messages': not valid JSON ({e.msg} at char {e.pos}); "
                                "a CSV messages cell must be a JSON list of {\"role\", \"content\"} objects")
                continue
        rows.append((where, row))
    return rows, problems


def _read_parquet(path: Path, name: str) -> list[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq  # optional extra: only Parquet users need it
    except ImportError as e:
        raise ImportError("reading .parquet needs pyarrow: pip install 'rlft[data]'") from e
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DatasetError(f"dataset {name!r} is not a readable Parquet file: {e}") from e
    return [(f"index {i}", row) for i, row in enumerate(table.to_pylist())]


def _read_file(path: Path, name: str) -> tuple[list[tuple[str, Any]], list[str], str]:
    suffix = path.suffix.lower()
    readers = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")
    if suffix not in readers:
        raise DatasetError(f"dataset {name!r}: unknown extension {repr(suffix) if suffix else '(none)'}; use one of "
                           f"{', '.join(readers)}; for a Hub dataset or another format, load it yourself "
                           "and pass a datasets.Dataset or a list of dicts")
    if not path.is_file():
        raise DatasetError(f"dataset {name!r}: no such file")
    if path.stat().st_size == 0:
        raise DatasetError(f"dataset {name!r} is empty; it needs at least one row")
    if suffix == ".parquet":
        return _read_parquet(path, name), [], "index"
    text = _read_text(path, name)
    if suffix == ".json":
        return _read_json(text, name), [], "index"
    if suffix == ".csv":
        return (*_read_csv(text), "data row")
    return (*_read_jsonl(text), "line")


# -- validation -------------------------------------------------------------------------------


def _messages_problems(messages: Any) -> list[tuple[str, str]]:
    if not isinstance(messages, list):
        return [("messages", f"must be a list of {{'role', 'content'}} dicts, got {_show(messages)}")]
    if not messages:
        return [("messages", "is empty; it needs at least one user message")]
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            out.append((f"messages[{i}]", f"must be a {{'role', 'content'}} dict, got {_show(m)}"))
            continue
        if m.get("role") not in ROLES:
            out.append((f"messages[{i}].role", f"{m.get('role')!r} is not one of {', '.join(ROLES)}"))
        content = m.get("content")
        # an assistant turn that only calls tools legitimately has no text
        tool_call_only = content is None and m.get("role") == "assistant" and m.get("tool_calls")
        if not isinstance(content, str) and not tool_call_only:
            out.append((f"messages[{i}].content", f"must be a string, got {_show(content)}"))
    last = messages[-1]
    if isinstance(last, dict) and last.get("role") in ("system", "assistant"):
        out.append((f"messages[{len(messages) - 1}].role",
                    f"the last message has role {last['role']!r}; end the chat with a user (or tool) message for "
                    "the model to answer (a reference answer belongs in ground_truth)"))
    return out


def _row_problems(row: Any) -> list[tuple[str, str]]:
    if not isinstance(row, dict):
        return [("(row)", f"must be an object with 'prompt' or 'messages', got {_show(row)}")]
    out: list[tuple[str, str]] = []
    prompt, messages = row.get("prompt"), row.get("messages")
    if prompt is not None and messages is not None:
        out.append(("prompt", "is set together with 'messages'; keep exactly one of the two"))
    elif prompt is None and messages is None:
        out.append(("prompt", "missing; each row needs a 'prompt' string or a 'messages' chat list"))
    elif messages is None and (not isinstance(prompt, str) or not prompt.strip()):
        out.append(("prompt", f"must be a non-empty string, got {_show(prompt)}"))
    elif messages is not None:
        out.extend(_messages_problems(messages))
    if "example_id" in row:
        out.append(("example_id", "is reserved (rlft sets it to the row's position); rename the field, e.g. to 'id'"))
    split = row.get("split")
    if split is not None and (not isinstance(split, str) or split not in SPLIT_VALUES):
        out.append(("split", f"{split!r} is not one of {', '.join(SPLIT_VALUES)}; fix it, or rename the field "
                             "if it is not a train/eval split"))
    return out


def load_dataset(source: Any, *, name: str | None = None) -> Dataset:
    """Load and validate rows from a path, a list of dicts, a ``datasets.Dataset``, or a
    :class:`Dataset` (returned as is). ``name`` labels errors; it defaults to the path."""
    if isinstance(source, Dataset):
        return source
    problems: list[str] = []
    if isinstance(source, (str, os.PathLike)):
        name = name or str(source)
        located, problems, unit = _read_file(Path(source), name)
    elif type(source).__module__.split(".")[0] == "datasets":  # no import: `datasets` is optional
        name, unit = name or f"<datasets.{type(source).__name__}>", "index"
        if hasattr(source, "keys"):
            raise DatasetError(f"dataset {name!r} holds several splits {list(source.keys())}; pass one, "
                               "e.g. load_dataset(ds['train']), and use Dataset.split() for an eval set")
        if not hasattr(source, "to_list"):
            raise DatasetError(f"dataset {name!r}: streaming datasets are not supported; materialize it first")
        located = [(f"index {i}", row) for i, row in enumerate(source.to_list())]
    elif isinstance(source, (list, tuple)):
        name, unit = name or "<list>", "index"
        located = [(f"index {i}", row) for i, row in enumerate(source)]
    else:
        raise DatasetError(f"cannot load a dataset from {type(source).__name__}; pass a file path, "
                           "a list of dicts or a datasets.Dataset")
    for where, row in located:
        problems += [f"{where}, field {field!r}: {msg}" if field != "(row)" else f"{where}: {msg}"
                     for field, msg in _row_problems(row)]
    with_split = [where for where, row in located if isinstance(row, dict) and row.get("split") is not None]
    if with_split and len(with_split) < len(located):
        missing = [where for where, row in located if isinstance(row, dict) and row.get("split") is None]
        problems += [f"{where}, field 'split': missing while other rows have one; set it on every row "
                     "or on none" for where in missing]
    if problems:
        raise _fail(name, problems, unit)
    if not located:
        raise DatasetError(f"dataset {name!r} has no rows; it needs at least one")
    # copy each row: adding example_id must not change the caller's dicts
    return Dataset([{**row, "example_id": i} for i, (_, row) in enumerate(located)], name=name)


# -- the dataset ------------------------------------------------------------------------------


def _rank(*key: Any) -> int:
    """A seeded pseudo-random number, the same on every Python and platform (``random.shuffle``
    only promises that per version), so that a run resumes with identical data anywhere."""
    digest = hashlib.blake2b("/".join(map(str, key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class Dataset(Sequence):
    """Validated examples (dicts, each with its ``example_id``). Build it with :func:`load_dataset`.

    Examples are shared, not copied, by ``__getitem__`` and :meth:`batch`: treat them as read-only.
    """

    def __init__(self, examples: list[dict[str, Any]], name: str = "<dataset>"):
        self.examples = list(examples)
        self.name = name
        self._orders: dict[tuple[int, int], list[int]] = {}

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):  # int -> example, slice -> list of examples
        return self.examples[i]

    def __repr__(self) -> str:
        return f"Dataset({self.name!r}, {len(self)} examples)"

    def split(self, eval_fraction: float | None = None, *, eval_size: int | None = None,
              seed: int = 0) -> tuple[Dataset, Dataset]:
        """(train, eval): disjoint, covering, in source order. Rows' own ``split`` field decides
        when present; otherwise ``eval_size`` examples, or ``eval_fraction`` (default 0.2, at
        least 1) of them, chosen by ``seed`` from their ``example_id``s."""
        if eval_fraction is not None and eval_size is not None:
            raise ValueError("pass eval_fraction or eval_size, not both")
        n = len(self)
        if any(ex.get("split") is not None for ex in self.examples):
            if eval_fraction is not None or eval_size is not None:
                raise ValueError(f"{self.name}: rows have a 'split' field, which decides the split; "
                                 "drop eval_fraction/eval_size or remove the field")
            is_eval = [SPLIT_VALUES[ex["split"]] == "eval" for ex in self.examples]
        else:
            if eval_size is None:
                fraction = 0.2 if eval_fraction is None else eval_fraction
                if not 0 < fraction < 1:
                    raise ValueError(f"eval_fraction must be between 0 and 1 (exclusive), got {fraction}")
                eval_size = min(max(1, round(n * fraction)), n - 1)
            if not 0 <= eval_size < n:
                raise ValueError(f"eval_size must be between 0 and {n - 1} for {n} examples "
                                 f"(training needs at least one), got {eval_size}")
            # rank by example_id, not position, so a subset splits the same way wherever it sits
            ranked = sorted(range(n), key=lambda i: (_rank(seed, "split", self.examples[i]["example_id"]), i))
            chosen = set(ranked[:eval_size])
            is_eval = [i in chosen for i in range(n)]
        train = [ex for ex, e in zip(self.examples, is_eval) if not e]
        if not train:
            raise DatasetError(f"dataset {self.name!r}: every row's 'split' is eval; mark some rows 'train'")
        return (Dataset(train, f"{self.name}[train]"),
                Dataset([ex for ex, e in zip(self.examples, is_eval) if e], f"{self.name}[eval]"))

    def check_batch_size(self, batch_size: int) -> None:
        """Raise if ``batch_size`` prompts per step cannot be drawn without repeating an example."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if len(self) < batch_size:
            raise DatasetError(f"dataset {self.name!r} has {len(self)} examples, fewer than one batch of "
                               f"{batch_size} prompts; lower the batch size to at most {len(self)} or add rows")

    def batch(self, step: int, batch_size: int, seed: int = 0) -> list[dict[str, Any]]:
        """The ``batch_size`` examples of training step ``step`` (0-based).

        The stream is epoch 0's seeded permutation, then epoch 1's, ...; step k takes positions
        ``k*batch_size ..`` of it, so a batch may run from the end of one epoch into the next
        and step k is the same whether or not steps 0..k-1 ran in this process."""
        self.check_batch_size(batch_size)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        out = []
        for pos in range(step * batch_size, (step + 1) * batch_size):
            epoch, i = divmod(pos, len(self))
            out.append(self.examples[self._order(seed, epoch)[i]])
        return out

    def _order(self, seed: int, epoch: int) -> list[int]:
        key = (seed, epoch)
        if key not in self._orders:
            if len(self._orders) >= 4:  # a batch touches at most two epochs: keep a few, not all
                self._orders.pop(next(iter(self._orders)))
            ids = [ex["example_id"] for ex in self.examples]
            self._orders[key] = sorted(range(len(ids)), key=lambda i: (_rank(seed, "epoch", epoch, ids[i]), i))
        return self._orders[key]


def initial_messages(example: dict[str, Any], system_prompt: str | None = None) -> list[Message]:
    """The chat a rollout starts from: the environment's system prompt (if any, and non-empty),
    then the row's prompt as a user message, or the row's own messages.

    A row whose messages start with a system message keeps it and the environment's is left
    out: the row's is the more specific, and many chat templates accept only one system message,
    at the start. Messages are copied, so the rollout can extend the list freely."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages = example.get("messages")
    if messages is not None:
        copied = [dict(m) for m in messages]
        return copied if copied and copied[0].get("role") == "system" else system + copied
    return system + [{"role": "user", "content": example["prompt"]}]

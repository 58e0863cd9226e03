"""``rlft traces import FILE``: normalise logged OpenAI / Anthropic calls into SFT transcripts.

Writes the kept transcripts as JSONL (``--out``, default ``transcripts.jsonl``) and, with
``--eval-fraction`` > 0, a held-out ``<out>.eval.jsonl``; prints what was read, kept, dropped by
each filter and every problem (first 10). A user error (missing file, unknown format, an
adapter that will not load, nothing kept) prints one line and exits 2. The work is
``rlft.sft.traces.import_traces``; this file parses arguments and prints.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

EPILOG = """examples:
  rlft traces import chat_logs.jsonl --tools-only --out demos.jsonl
  rlft traces import claude.jsonl --format anthropic --min-score 0.8 --eval-fraction 0.2
  rlft traces import logs.jsonl --adapter my_adapters:MyLogAdapter   # your own format"""

MAX_SHOWN = 10


def add_traces_command(subparsers) -> None:
    p = subparsers.add_parser("traces", help="turn logged LLM calls into SFT transcripts",
                              description="turn logged LLM calls into SFT transcripts", epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="traces_action", metavar="import", required=True)
    imp = sub.add_parser("import", help="normalise a JSONL of logged calls into transcripts JSONL", epilog=EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    imp.add_argument("file", help="JSONL (or .json list) of logged calls")
    imp.add_argument("--format", default="auto",
                     help="auto (default), openai-chat, openai-responses, anthropic, or a registered adapter's name")
    imp.add_argument("--out", default="transcripts.jsonl", help="train transcripts (default transcripts.jsonl)")
    imp.add_argument("--min-score", type=float, help="keep transcripts whose score/reward is at least this")
    imp.add_argument("--tools-only", action="store_true", help="keep only transcripts with a tool call")
    imp.add_argument("--no-dedupe", action="store_true", help="keep duplicate and prefix transcripts")
    imp.add_argument("--eval-fraction", type=float, default=0.1,
                     help="held out into <out>.eval.jsonl (default 0.1; 0: none)")
    imp.add_argument("--seed", type=int, default=0, help="seed of the train/eval split")
    imp.add_argument("--adapter", action="append", default=[], metavar="MODULE[:OBJECT]",
                     help="load a trace adapter (module name or .py path; OBJECT: an adapter or its class)")
    imp.add_argument("--json", action="store_true", help="print the counts as JSON")
    p.set_defaults(handler=cmd_traces)


def _load_adapter(spec: str) -> None:
    from rlft.sft.traces import register_adapter

    module_name, _, attr = spec.partition(":")
    if module_name.endswith(".py"):
        loc = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
        if loc is None or not Path(module_name).is_file():
            raise ValueError(f"--adapter {spec}: no such file {module_name!r}")
        module = importlib.util.module_from_spec(loc)
        loc.loader.exec_module(module)
    else:
        sys.path.insert(0, os.getcwd())  # `--adapter my_adapters` means ./my_adapters.py, as python -m does
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"--adapter {spec}: cannot import {module_name!r} ({e})") from e
        finally:
            sys.path.remove(os.getcwd())
    if attr:  # without OBJECT the module registers its adapters itself on import
        obj = getattr(module, attr, None)
        if obj is None:
            raise ValueError(f"--adapter {spec}: {module_name!r} has no {attr!r}")
        register_adapter(obj() if isinstance(obj, type) else obj, replace=True)


def _eval_path(out: Path) -> Path:
    return out.with_name(out.stem + ".eval" + out.suffix) if out.suffix else out.with_name(out.name + ".eval.jsonl")


def cmd_traces(args) -> int:
    from rlft.data import DatasetError
    from rlft.sft.traces import TraceError, import_traces
    from rlft.sft.transcripts import write_transcripts

    where = f"rlft traces {args.traces_action}"
    try:
        for spec in args.adapter:
            try:
                _load_adapter(spec)
            except TypeError as e:  # register_adapter: not an adapter
                raise ValueError(f"--adapter {spec}: {e}") from e
        result = import_traces(args.file, format=args.format, min_score=args.min_score, tools_only=args.tools_only,
                               dedupe=not args.no_dedupe, eval_fraction=args.eval_fraction, seed=args.seed)
    except (DatasetError, TraceError, ValueError) as e:
        print(f"{where}: {e}", file=sys.stderr)
        return 2
    out, c = Path(args.out), result.counts
    eval_out = _eval_path(out) if result.eval else None
    if args.json:
        print(json.dumps({"counts": c, "formats": result.formats, "train": len(result.train), "eval": len(result.eval),
                          "out": str(out), "eval_out": str(eval_out) if eval_out else None,
                          "problems": result.problems}))
    else:
        fmts = ", ".join(f"{k} {v}" for k, v in sorted(result.formats.items())) or "none"
        print(f"read {c['read']} records from {args.file}: {c['converted']} transcripts ({fmts}), "
              f"{c['problems']} problem{'' if c['problems'] == 1 else 's'}")
        for p in result.problems[:MAX_SHOWN]:
            print(f"  {p}")
        if len(result.problems) > MAX_SHOWN:
            print(f"  ... and {len(result.problems) - MAX_SHOWN} more")
        print(f"dropped: {c['dropped_score']} below --min-score, {c['dropped_no_score']} without a score, "
              f"{c['dropped_no_tools']} without a tool call, {c['dropped_duplicate']} duplicates or prefixes")
    if not c["kept"]:
        print(f"{where}: no transcript kept, nothing written (see the problems and filters above)", file=sys.stderr)
        return 2
    write_transcripts(out, result.train)
    if eval_out:
        write_transcripts(eval_out, result.eval)
    if not args.json:
        held = f", {len(result.eval)} -> {eval_out}" if eval_out else ""
        print(f"kept {c['kept']}: {len(result.train)} -> {out}{held}")
    return 0

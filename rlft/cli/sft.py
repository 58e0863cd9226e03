"""``rlft sft``: supervised finetuning on chat transcripts, from a config file or from flags.

    rlft sft config.toml [--set key=value ...]
    rlft sft --data transcripts.jsonl --model smollm2 [--eval-data F] [--steps N] [--set key=value ...]
    rlft sft --from-run RUN | --teacher URL ... --min-reward X   (rlft.cli.sft_harvest)

Flags are shorthands for config keys (applied after the file, before ``--set``). User errors
(unknown key, missing file, a model that does not load, no usable transcript) print one line and
exit 2; they are raised as ``ConfigError`` and ``rlft.cli.main`` reports them. Left out: the
training itself (``rlft.sft.trainer``).
"""

from __future__ import annotations

import argparse

EPILOG = ("example:\n  rlft sft --data demos.jsonl --model smollm2 --set epochs=3\n"
          "  rlft sft sft.toml --set learning_rate=1e-4\n"
          "  rlft sft --list                      # every config key with its default\n"
          "  rlft sft --from-run my-run --min-reward 1          # expert iteration: the run's best rollouts\n"
          "  rlft sft --teacher URL --teacher-model NAME --env config.toml --min-reward 1\n"
          "then start RL from it: model = \"runs/<run>/checkpoints/step-<N>\" (rlft runs show <run>)")

# flag -> config key
_FLAGS = {"data": "data", "eval_data": "eval_data", "model": "model", "steps": "steps", "epochs": "epochs",
          "runs": "runs_dir", "name": "run_name"}


def add_sft_command(subparsers) -> argparse.ArgumentParser:
    """Register ``sft`` on an argparse subparsers object (or rlft.cli.main's ``cmd`` helper)."""
    help_ = "supervised finetuning on chat transcripts (warm-up before RL)"
    if callable(subparsers) and not hasattr(subparsers, "add_parser"):
        p = subparsers("sft", help_)
    else:
        p = subparsers.add_parser("sft", help=help_, description=help_)
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("config", nargs="?", help="TOML config file (SFTConfig keys)")
    p.add_argument("--data", help="transcripts file (JSONL of {\"messages\": [...], \"tools\": [...]})")
    p.add_argument("--eval-data", dest="eval_data", help="held-out transcripts (default: a split of --data)")
    p.add_argument("--model", help="model to finetune (HF id, directory, .gguf, checkpoint dir, smollm2)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: from epochs)")
    p.add_argument("--epochs", type=int, help="passes over the train split")
    p.add_argument("--runs", help="workspace directory (default ./runs)")
    p.add_argument("--name", help="run name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--list", action="store_true", help="list every config key with its default and meaning")
    from rlft.cli.sft_harvest import add_harvest_args

    add_harvest_args(p)
    p.set_defaults(handler=cmd_sft)
    return p


def cmd_sft(args) -> int:
    import json

    from rlft.sft.config import describe, load_sft_config

    if args.list:
        for key, default, comment in describe():
            print(f"{key:24} {json.dumps(default):>16}  {comment}")
        return 0
    from rlft.sft.trainer import as_sft_config, sft

    flags = {key: getattr(args, flag) for flag, key in _FLAGS.items() if getattr(args, flag) is not None}
    from rlft.cli.sft_harvest import cmd_harvest, wants_harvest

    if wants_harvest(args):  # --from-run / --teacher: the transcripts come from rollouts
        return cmd_harvest(args, flags, _overrides(args.overrides))
    cfg = load_sft_config(args.config, flags)
    run_id = sft(as_sft_config(cfg, _overrides(args.overrides)))
    print(f"sft run {run_id} finished; inspect it with `rlft runs show {run_id}`")
    return 0


def _overrides(items: list[str]) -> dict[str, str]:
    from rlft.config import ConfigError

    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


__all__ = ["add_sft_command", "cmd_sft"]

"""``rlft judge check config.toml``: calibrate the environment's judged rubrics on contrast pairs
(``rlft.rewards.calibration``) without loading the policy or sampling anything. ``rlft validate``
runs the same check (:func:`run_judge_check`) before its rollouts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

EPILOG = ("example:\n  rlft judge check config.toml                       # each judged rubric on 12 contrast pairs\n"
          "  rlft judge check config.toml --set judge_examples=pairs.jsonl --json")


def add_judge_command(cmd) -> None:
    """Register ``judge check`` with rlft.cli.main's ``cmd`` helper."""
    p = cmd("judge", "check an environment's LLM judges before training")
    sub = p.add_subparsers(dest="judge_command", required=True)
    c = sub.add_parser("check", help="calibrate each judged rubric on contrast pairs (good vs corrupted answers)",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("config", help="TOML config file")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_judge)


def _examples_path(cfg: Any, config_file: str | None) -> str | None:
    if not cfg.judge_examples:
        return None
    path = Path(cfg.judge_examples).expanduser()
    if not path.is_absolute() and config_file and not path.exists():
        path = Path(config_file).parent / path
    return str(path)


def run_judge_check(cfg: Any, config_file: str | None, env: Any, rows: list[dict[str, Any]]) -> list[Any]:
    """Calibrate ``env``'s judged rubrics (raises JudgeCalibrationError); [] when it has none."""
    from rlft.rewards.calibration import check_judges

    return check_judges(env.rewards, rows, env.system_prompt, examples=_examples_path(cfg, config_file),
                        pairs=cfg.judge_pairs, min_agreement=cfg.judge_min_agreement, seed=cfg.seed)


def calibrate_judges(cfg: Any, config_file: str | None, env: Any, rows: list[dict[str, Any]], *, show: bool) -> None:
    """``rlft validate``'s judge check: calibrate (a judge at chance raises) and, with ``show``, print."""
    results = run_judge_check(cfg, config_file, env, rows)
    if show:
        print_calibrations(results, env)


def print_calibrations(results: list[Any], env: Any) -> None:
    from rlft.rewards.calibration import judged_rubrics

    if results:
        print("judge calibration (good vs corrupted answers; rlft judge check):")
        for c in results:
            print("  " + c.summary())
    elif judged_rubrics(env.rewards):
        print("judge calibration skipped: the data has no reference answers (ground_truth of 3+ words); "
              "give judge_examples = \"pairs.jsonl\" to calibrate the judge")


def cmd_judge(args) -> int:
    from rlft.cli.main import _config
    from rlft.loader import load_environment, load_splits
    from rlft.rewards.calibration import judged_rubrics

    cfg = _config(args)
    env, module, _ = load_environment(cfg.env)
    train_set, _ = load_splits(cfg, module)
    results = run_judge_check(cfg, args.config, env, list(train_set))
    if args.json:
        print(json.dumps([c.__dict__ for c in results], indent=2))
    elif not judged_rubrics(env.rewards):
        print("no judged rubrics in this environment (judge.reward(rubric)): nothing to check")
    else:
        print_calibrations(results, env)
        if results:
            print("judge check passed")
    return 0

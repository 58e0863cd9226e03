"""``rlft sft --from-run RUN`` and ``rlft sft --teacher URL``: SFT on the best rollouts of a run
(expert iteration) or of a teacher model driven through an environment; ``rlft sft --demonstrate``:
SFT on the environment's own ``demonstrate(example)``, played through it (``rlft.sft.demonstrations``).

    rlft sft --from-run my-run --min-reward 1 [--top-k-per-example K] [--model M] [--harvest-only --out F]
    rlft sft --teacher URL --teacher-model NAME --env config.toml --min-reward 1 [--samples N] [--prompts N]
    rlft sft --demonstrate --env config.toml [--min-reward X]   # the environment's demonstrate(example)

The source's config supplies the SFT run's defaults: ``model`` (the run's *base* model, not its
trained checkpoint: expert iteration trains the base on the best rollouts; ``--model`` picks
another), the LoRA, dtype and rendering keys (``chat_template``, ``tool_parser``,
``tool_format``), and ``seed``. A TOML file, flags and ``--set`` override them. The transcripts
are written as JSONL (``--out``, default ``<runs>/demonstrations/<source>-<time>.jsonl``), with
whole examples held out into ``<out>.eval.jsonl`` for the eval loss (``eval_fraction`` /
``eval_size`` of the examples), and the SFT run trains on them; ``--harvest-only`` stops after
writing. The harvest itself is ``rlft.sft.harvest``; this file parses, writes and prints.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

# the source's keys that an SFT run inherits (they must match the RL run that follows)
INHERITED = ("model", "dtype", "device", "lora", "lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules",
             "gradient_checkpointing", "chat_template", "tool_parser", "tool_format", "seed")
MAX_SHOWN = 10


def add_harvest_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("demonstrations from rollouts (expert iteration, a teacher)")
    g.add_argument("--from-run", dest="from_run", metavar="RUN",
                   help="train on the best train-split rollouts of this RL run (id or name)")
    g.add_argument("--teacher", metavar="URL", help="an OpenAI-compatible endpoint to sample demonstrations from "
                                                    "(with --teacher-model and --env; key: $OPENAI_API_KEY)")
    g.add_argument("--teacher-model", dest="teacher_model", metavar="NAME", help="the teacher's model name")
    g.add_argument("--env", metavar="CONFIG", help="with --teacher or --demonstrate: the RL config (or env.py) "
                                                   "whose environment and train split are played")
    g.add_argument("--demonstrate", action="store_true",
                   help="train on the environment's demonstrate(example) for each train row (with --env)")
    g.add_argument("--samples", type=int, default=1, metavar="N", help="teacher rollouts per train prompt (default 1)")
    g.add_argument("--prompts", type=int, default=0, metavar="N", help="teacher: first N train prompts (default all)")
    g.add_argument("--min-reward", dest="min_reward", type=float, metavar="X",
                   help="keep finished rollouts with reward >= X (required with --from-run/--teacher)")
    g.add_argument("--top-k-per-example", dest="top_k_per_example", type=int, default=0, metavar="K",
                   help="at most K distinct rollouts per example, best first (default 0: all)")
    g.add_argument("--out", metavar="FILE", help="where the transcripts go (default <runs>/demonstrations/...)")
    g.add_argument("--harvest-only", dest="harvest_only", action="store_true",
                   help="write the transcripts and stop (inspect or edit them, then rlft sft --data FILE)")


def wants_harvest(args: argparse.Namespace) -> bool:
    return bool(args.from_run or args.teacher or args.demonstrate)


def cmd_harvest(args: argparse.Namespace, flags: dict[str, Any], overrides: dict[str, Any]) -> int:
    """``flags``/``overrides``: the SFT config keys given by the plain flags and by ``--set``."""
    from rlft.config import ConfigError, read_values
    from rlft.sft.trainer import as_sft_config, sft

    if sum(map(bool, (args.from_run, args.teacher, args.demonstrate))) > 1:
        raise ConfigError("--from-run, --teacher and --demonstrate are different sources: pick one")
    if args.min_reward is None and not args.demonstrate:
        raise ConfigError("--min-reward X is required: which rollouts are good enough to imitate")
    if flags.get("data") or flags.get("eval_data"):
        raise ConfigError("--data/--eval-data and --from-run/--teacher/--demonstrate are different sources: pick one")
    file_values = read_values(args.config, None, {})[0] if args.config else {}
    runs_dir = {**file_values, **flags, **overrides}.get("runs_dir", "runs")
    if args.from_run:
        result, source_cfg, label = _from_run(args, runs_dir)
    elif args.demonstrate:
        result, source_cfg, label = _from_demonstrations(args)
    else:
        result, source_cfg, label = _from_teacher(args)
    inherited = {k: source_cfg[k] for k in INHERITED if k in source_cfg and k not in file_values}
    keys = {**inherited, **flags, **overrides}
    stamp = time.strftime("%y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path(runs_dir) / "demonstrations" / f"{label}-{stamp}.jsonl"
    cfg = as_sft_config(args.config, {**keys, "data": str(out)})
    train, held = _split_examples(result.transcripts, cfg)
    _print_result(result, args.min_reward or 0.0)
    out.parent.mkdir(parents=True, exist_ok=True)
    from rlft.sft.transcripts import write_transcripts

    write_transcripts(out, train)
    eval_out = out.with_name(out.stem + ".eval" + out.suffix) if held else None
    if eval_out:
        write_transcripts(eval_out, held)
    print(f"wrote {len(train)} transcripts -> {out}" + (f", {len(held)} held out -> {eval_out}" if held else ""))
    if args.harvest_only:
        data = f"--data {out}" + (f" --eval-data {eval_out}" if eval_out else "")
        print(f"train on them with: rlft sft {data} --model {cfg.model}")
        return 0
    split = {"eval_data": str(eval_out)} if eval_out else {"eval_fraction": 0.0, "eval_size": 0}
    run_id = sft(as_sft_config(cfg, split))
    print(f"sft run {run_id} finished; inspect it with `rlft runs show {run_id}`")
    return 0


def _from_run(args: argparse.Namespace, runs_dir: str) -> tuple[Any, dict[str, Any], str]:
    from rlft.sft.harvest import harvest_run
    from rlft.store import RunStore

    store = RunStore(runs_dir, readonly=True) if (Path(runs_dir) / "rlft.db").exists() else None
    if store is None:
        from rlft.errors import UnknownRunError

        raise UnknownRunError(f"no run {args.from_run!r}: there is no run store in {runs_dir} (--runs DIR)")
    try:
        run_id = store.resolve(args.from_run)
        result = harvest_run(store, run_id, args.min_reward, top_k_per_example=args.top_k_per_example)
        return result, store.get_run(run_id).get("config") or {}, f"{run_id}-best"
    finally:
        store.close()


def _from_teacher(args: argparse.Namespace) -> tuple[Any, dict[str, Any], str]:
    from rlft.config import ConfigError
    from rlft.engines.base import SamplingParams
    from rlft.engines.external_chat import OpenAIChatEngine
    from rlft.sft.harvest import harvest_teacher, run_environment

    if not args.teacher_model or not args.env:
        raise ConfigError("--teacher needs --teacher-model NAME and --env CONFIG (the RL config whose environment "
                          "it runs)")
    if args.samples < 1:
        raise ConfigError(f"--samples must be at least 1, got {args.samples}")
    rl = _rl_config(args.env)
    env, train_set, eval_set = run_environment(rl.to_dict(), f"config {args.env}")
    examples = list(train_set)[: args.prompts or None]
    engine = OpenAIChatEngine(args.teacher, args.teacher_model)
    params = SamplingParams(temperature=rl.temperature, top_p=rl.top_p)
    source = f"teacher:{args.teacher_model}@{args.teacher}"
    result = harvest_teacher(env, examples, engine, args.min_reward, samples=args.samples, held_out=list(eval_set),
                             top_k_per_example=args.top_k_per_example, params=params, source=source)
    return result, rl.to_dict(), "teacher-" + "".join(c if c.isalnum() else "-" for c in args.teacher_model)


def _rl_config(path: str) -> Any:
    from rlft.config import load_config

    return (load_config(None, {"env": path}) if path.endswith(".py") else load_config(path)).resolved()


def _from_demonstrations(args: argparse.Namespace) -> tuple[Any, dict[str, Any], str]:
    import asyncio

    from rlft.config import ConfigError
    from rlft.sft.demonstrations import play
    from rlft.sft.harvest import HarvestResult, run_environment

    if not args.env:
        raise ConfigError("--demonstrate needs --env CONFIG (the RL config whose environment has demonstrate)")
    rl = _rl_config(args.env)
    env, train_set, _ = run_environment(rl.to_dict(), f"config {args.env}")
    demos = asyncio.run(play(env, list(train_set), example_ids=[ex["example_id"] for ex in train_set],
                             min_reward=args.min_reward))
    if not demos.transcripts:
        raise ConfigError(f"--demonstrate: no train row gave a usable demonstration ({demos.rows} tried); first "
                          "problems: " + "; ".join(demos.problems[:3]))
    result = HarvestResult(demos.transcripts, problems=demos.problems, summary_line=(
        f"{len(demos.transcripts)} of {demos.rows} train rows demonstrated (mean reward "
        f"{sum(demos.rewards) / len(demos.rewards):.3f}); {len(demos.problems)} left out"))
    return result, rl.to_dict(), "demonstrate-" + (env.name or "env")


def _split_examples(transcripts: list[Any], cfg: Any) -> tuple[list[Any], list[Any]]:
    """(train, held out): whole examples held out (``eval_size`` or ``eval_fraction`` of them,
    seeded), so that no example's rollouts sit on both sides of the eval loss."""
    from rlft.sft.prepare import split_indices

    order = list(dict.fromkeys(t.meta["example_id"] for t in transcripts))
    if cfg.eval_data or len(order) < 2:
        return transcripts, []
    _, held = split_indices(len(order), eval_size=cfg.eval_size, eval_fraction=cfg.eval_fraction, seed=cfg.seed)
    held_ids = {order[i] for i in held}
    return ([t for t in transcripts if t.meta["example_id"] not in held_ids],
            [t for t in transcripts if t.meta["example_id"] in held_ids])


def _print_result(result: Any, min_reward: float) -> None:
    print(f"harvest: {result.summary(min_reward)}")
    for p in result.problems[:MAX_SHOWN]:
        print(f"  {p}", file=sys.stderr)
    if len(result.problems) > MAX_SHOWN:
        print(f"  ... and {len(result.problems) - MAX_SHOWN} more", file=sys.stderr)


__all__ = ["add_harvest_args", "cmd_harvest", "wants_harvest"]

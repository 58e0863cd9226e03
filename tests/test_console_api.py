"""rlft console: every JSON route, the chat proxy, and the security rules, over a run store made by
a real tiny-model training run (plus a failed run, a live run and hand-written rollouts carrying
XSS payloads). ``build_workspace()`` (built once per session: conftest's ``console_workspace``) and
``BackgroundServer`` are shared with test_console_browser.py."""

import json
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from fastapi import FastAPI  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from rlft.console.app import STATIC_DIR, create_app  # noqa: E402
from rlft.store import RunStore  # noqa: E402
from rlft.types import Rollout, RolloutError, Termination  # noqa: E402

XSS = ("<script>alert('xss-script');window.__pwned=1</script> "
       "<img src=x onerror=\"alert('xss-img');window.__pwned=1\"> "
       "[click](javascript:alert('xss-md')) <a href=\"javascript:alert('xss-a')\">link</a>")
ENV = textwrap.dedent('''
    from rlft.env import Environment

    XSS = %r

    def variety(ro):
        return len(set(ro.completion)) / 16

    def short(ro):
        return 1.0 if len(ro.completion) < 8 else 0.0

    def broken(ro):
        raise ZeroDivisionError("reward bug on purpose")

    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    env = Environment(system_prompt="Answer briefly. " + XSS, rewards=[variety, short], max_tokens=8)
    tools_env = Environment(system_prompt="You can add with the add tool.", tools=[add], max_turns=3)
    bad_env = Environment(rewards=[broken], max_tokens=8)
    dataset = [{"prompt": f"write {i}", "ground_truth": str(i)} for i in range(12)]
''') % XSS
CHAT_REPLY = ["Hello", " from", " the", " fake", " model", " <img src=x onerror=\"alert('xss-chat')\">"]


def xss_rollouts() -> list[Rollout]:
    """Two hand-written rollouts: tools, tool results, an error with a traceback, payloads everywhere."""
    call = {"id": "call_1", "type": "function",
            "function": {"name": "calc<img src=x onerror=alert('xss-toolname')>",
                         "arguments": {"expr": "6*7 <script>alert('xss-args')</script>"}}}
    messages = [
        {"role": "system", "content": "You can call tools. " + XSS},
        {"role": "user", "content": "zebracorn question: what is 6*7? " + XSS},
        {"role": "assistant", "content": "Let me check <b>bold</b>", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "name": "calc", "content": "42 " + XSS},
        {"role": "assistant", "content": "The answer is 42. " + XSS},
    ]
    bad = RolloutError("reward:short", "ZeroDivisionError: <script>alert('xss-err')</script>",
                       "Traceback (most recent call last):\n  File \"env.py\", line 9, in short\n"
                       "ZeroDivisionError: division by zero <img src=x onerror=alert('xss-tb')>")
    return [Rollout(example={"prompt": "zebracorn " + XSS, "ground_truth": "42"}, messages=messages,
                    termination=Termination.REWARD_ERROR, rewards={"variety": 0.5, "short": 0.0}, reward=0.5,
                    errors=[bad], turns=2, tool_calls=1, example_id=100, group_index=0,
                    logs=["env log " + XSS]),
            Rollout(example={"prompt": "zebracorn again"}, messages=messages[:2] + [messages[-1]],
                    termination=Termination.FINISHED, rewards={"variety": 0.9, "short": 1.0}, reward=1.9,
                    turns=1, example_id=100, group_index=1)]


def build_workspace(d: Path, model: str) -> SimpleNamespace:
    """A run store with a completed tiny-model run (evals at 0, 2, 3; checkpoints at 2 and 3), a failed run,
    a 'running' run written by hand, XSS rollouts/logs and an external model's eval."""
    from rlft.training.loop import train

    (d / "model").symlink_to(model)  # the session's tiny model, at the path the runs record
    (d / "env.py").write_text(ENV)
    cfg = dict(env=str(d / "env.py"), model=str(d / "model"), dtype="float32", runs_dir=str(d / "runs"), steps=3,
               batch_size=2, group_size=4, eval_size=4, eval_k=2, eval_every=2, progress=False)
    run_id = train(dict(cfg, run_name="tiny-run"))
    with pytest.raises(RuntimeError, match="validation failed"):
        train(dict(cfg, env=f"{d / 'env.py'}:bad_env", run_name="doomed"))
    store = RunStore(d / "runs")
    failed_id = store.resolve("doomed")
    store.add_rollouts(run_id, 1, xss_rollouts())
    store.add_log(run_id, "tool output was " + XSS, level="warning", step=1, source="env",
                  traceback="Traceback: <img src=x onerror=alert('xss-logtb')>")
    store.add_eval(None, model="external-gpt <script>alert('xss-model')</script>", k=2, step=None,
                   metrics={"reward/mean": 0.7, "pass@k": 0.5, "max@k": 0.9, "solve_rate": 0.4, "reward/variety": 0.6,
                            "reward/short": 0.1})
    # the live run's environment has an `add` tool: the chat tab runs it
    live_cfg = dict(store.get_run(run_id)["config"], steps=50, run_name="live-run", env=f"{d / 'env.py'}:tools_env")
    live_id = store.create_run("live-run", config=live_cfg, model="tiny", environment="env.py")
    store.set_status(live_id, "running")
    for step in (1, 2, 3):
        store.log_metrics(live_id, step, {"reward/mean": 0.1 * step, "pass@k": 0.2 * step, "loss/policy": -0.01 * step})
    store.update_run(live_id, step=3)
    return SimpleNamespace(dir=d, runs=d / "runs", run_id=run_id, failed_id=failed_id, live_id=live_id, store=store)


def build_sft_workspace(d: Path, model: str) -> SimpleNamespace:
    """A run store holding one finished SFT run of the tiny model (eval loss at steps 0, 2, 4, 5)."""
    from rlft.sft.trainer import sft

    rows = [{"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i} {i}"}]}
            for i in range(24)]
    (d / "demos.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_id = sft(model=model, data=str(d / "demos.jsonl"), runs_dir=str(d / "runs"), dtype="float32", steps=5,
                 batch_size=4, eval_size=4, eval_every=2, learning_rate=1e-3, run_name="warmup", progress=False)
    return SimpleNamespace(dir=d, runs=d / "runs", run_id=run_id)


class BackgroundServer:
    """An ASGI app served by uvicorn in a daemon thread on a free 127.0.0.1 port."""

    def __init__(self, app, host: str = "127.0.0.1"):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def fake_openai(model_names: list[str]) -> FastAPI:
    """A tiny OpenAI-compatible server: /v1/models and a streaming /v1/chat/completions."""
    app = FastAPI()
    app.state.requests = []

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": n, "object": "model"} for n in model_names]}

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        app.state.requests.append(body)
        if body.get("model") not in model_names:
            return JSONResponse({"error": {"message": f"no model {body.get('model')!r}"}}, status_code=404)
        if not body.get("stream"):
            return JSONResponse({"error": {"message": "this fake only streams"}}, status_code=400)

        last = body["messages"][-1]
        if body.get("tools") and last.get("role") == "user":  # call the add tool, arguments in pieces
            return StreamingResponse(sse(body["model"], [
                {"role": "assistant", "tool_calls": [{"index": 0, "id": "call_add", "type": "function",
                                                      "function": {"name": "add", "arguments": ""}}]},
                {"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 2, '}}]},
                {"tool_calls": [{"index": 0, "function": {"arguments": '"b": 3}'}}]}], "tool_calls"),
                media_type="text/event-stream")
        if last.get("role") == "tool":  # answer with the tool's result
            return StreamingResponse(sse(body["model"], [{"content": "The sum is "}, {"content": last["content"]}]),
                                     media_type="text/event-stream")

        async def events():
            for piece in CHAT_REPLY:
                chunk = {"object": "chat.completion.chunk", "model": body["model"],
                         "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            done = {"object": "chat.completion.chunk", "model": body["model"],
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            yield f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


async def sse(model: str, deltas: list[dict], finish: str = "stop"):
    for delta in deltas:
        chunk = {"object": "chat.completion.chunk", "model": model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
        yield f"data: {json.dumps(chunk)}\n\n"
    done = {"object": "chat.completion.chunk", "model": model, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
    yield f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n"


def fake_names(ws) -> list[str]:
    return ["base-model", f"ft:base:{ws.run_id}:3", f"ft:base:{ws.run_id}:latest", "ft:base:other-run:latest"]


@pytest.fixture(scope="module")
def ws(console_workspace):  # the short name this module uses
    return console_workspace


@pytest.fixture(scope="module")
def fake(ws):
    app = fake_openai(fake_names(ws))
    with BackgroundServer(app) as srv:
        srv.app = app
        yield srv


@pytest.fixture(scope="module")
def client(ws, fake):
    return TestClient(create_app(ws.runs, serve_url=fake.url, poll_ms=300), base_url="http://127.0.0.1")


# -- runs ------------------------------------------------------------------------------------------

def test_info_names_the_store_metrics_and_terminations(client, ws):
    info = client.get("/api/info").json()
    assert info["store"] == str(ws.runs / "rlft.db") and info["store_exists"] and info["poll_ms"] == 300
    assert "reward/mean" in info["metric_keys"] and "reward_error" in info["terminations"]


def test_runs_list_has_status_model_env_steps_reward_and_duration(client, ws):
    runs = {r["name"]: r for r in client.get("/api/runs").json()}
    assert set(runs) == {"tiny-run", "doomed", "live-run"}
    done = runs["tiny-run"]
    assert done["status"] == "completed" and done["step"] == done["steps"] == 3
    assert done["model"] == str(ws.dir / "model") and done["environment"]
    assert done["reward"] is not None and 0 <= done["pass_at_k"] <= 1 and done["duration"] > 0
    assert runs["doomed"]["status"] == "failed" and "validation failed" in runs["doomed"]["error"]
    assert runs["live-run"]["status"] == "running" and runs["live-run"]["steps"] == 50


def test_run_detail_resolves_names_and_carries_the_failure(client, ws):
    run = client.get("/api/runs/doomed").json()
    assert run["id"] == ws.failed_id and "ZeroDivisionError" in run["traceback"]
    ok = client.get(f"/api/runs/{ws.run_id}").json()
    assert ok["checkpoints"][-1]["step"] == 3 and ok["rollouts"]["train"] == 3 * 8 + 2 and ok["rollouts"]["eval"] > 0
    assert client.get("/api/runs/no-such-run").status_code == 404


def test_metrics_series_filter_by_key_and_step(client, ws):
    series = client.get(f"/api/runs/{ws.run_id}/metrics").json()
    assert [s for s, _ in series["reward/mean"]] == [1, 2, 3]
    assert {"loss/policy", "optim/lr", "time/generate", "throughput/tokens_per_s", "reward/variety"} <= set(series)
    some = client.get(f"/api/runs/{ws.run_id}/metrics", params={"keys": "reward/mean,pass@k", "after_step": 1}).json()
    assert set(some) == {"reward/mean", "pass@k"} and [s for s, _ in some["pass@k"]] == [2, 3]


def test_evals_per_checkpoint_and_external_models(client, ws):
    data = client.get(f"/api/runs/{ws.run_id}/evals").json()
    assert [e["step"] for e in data["run"]] == [0, 2, 3]
    assert all("reward/variety" in e["metrics"] and "pass@k" in e["metrics"] for e in data["run"])
    assert [e["model"].split()[0] for e in data["external"]] == ["external-gpt"]


def test_rollout_filters_narrow_the_list(client, ws):
    url = f"/api/runs/{ws.run_id}/rollouts"
    everything = client.get(url).json()
    assert everything["total"] == 26 and "messages" not in everything["items"][0]
    assert client.get(url, params={"step": 2}).json()["total"] == 8
    found = client.get(url, params={"search": "zebracorn"}).json()
    assert found["total"] == 2 and {r["example_id"] for r in found["items"]} == {100}
    assert client.get(url, params={"termination": "reward_error"}).json()["total"] == 1
    assert client.get(url, params={"termination": ["reward_error", "finished"]}).json()["total"] >= 2
    assert client.get(url, params={"example": 100, "min_reward": 1.0}).json()["total"] == 1
    assert client.get(url, params={"example": 100, "max_reward": 1.0}).json()["total"] == 1
    comp = client.get(url, params={"component": "short", "cmin": 1}).json()
    assert comp["total"] >= 1 and all(r["rewards"]["short"] >= 1 for r in comp["items"])
    errs = client.get(url, params={"errors": "true"}).json()
    assert errs["total"] == 1 and errs["items"][0]["errors"] == 1
    page = client.get(url, params={"limit": 5, "offset": 5}).json()
    assert page["total"] == 26 and [r["id"] for r in page["items"]] == [r["id"] for r in everything["items"][5:10]]
    assert client.get(url, params={"split": "eval"}).json()["total"] == 3 * 4 * 2
    assert client.get(url, params={"split": "all"}).json()["total"] == 26 + 24


def test_rollout_detail_has_messages_errors_and_meaning(client, ws):
    rid = client.get(f"/api/runs/{ws.run_id}/rollouts", params={"termination": "reward_error"}).json()["items"][0]["id"]
    r = client.get(f"/api/runs/{ws.run_id}/rollouts/{rid}").json()
    assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert r["errors"][0]["traceback"].startswith("Traceback") and "reward function raised" in r["termination_doc"]
    assert client.get(f"/api/runs/{ws.failed_id}/rollouts/{rid}").status_code == 404


def test_heatmap_steps_logs_config_and_compare(client, ws):
    h = client.get(f"/api/runs/{ws.run_id}/heatmap", params={"split": "train"}).json()
    assert h["steps"] == [1, 2, 3] and 100 in h["examples"] and len(h["values"]) == len(h["examples"])
    # by default: the split whose prompts were sampled at several steps (held-out, at every eval)
    auto = client.get(f"/api/runs/{ws.run_id}/heatmap").json()
    assert auto["split"] == "eval" and auto["steps"] == [0, 2, 3] and all(None not in row for row in auto["values"])
    assert client.get(f"/api/runs/{ws.run_id}/steps", params={"split": "eval"}).json() == [0, 2, 3]
    logs = client.get(f"/api/runs/{ws.failed_id}/logs", params={"level": "error"}).json()
    assert logs["logs"] and all(lg["level"] == "error" for lg in logs["logs"]) and logs["logs"][0]["traceback"]
    counts = client.get(f"/api/runs/{ws.run_id}/logs").json()["terminations"]
    assert sum(counts["train"].values()) == 26 and counts["train"]["reward_error"] == 1
    last = client.get(f"/api/runs/{ws.run_id}/logs").json()["logs"][-1]["id"]
    assert client.get(f"/api/runs/{ws.run_id}/logs", params={"after_id": last}).json()["logs"] == []
    cfg = client.get(f"/api/runs/{ws.run_id}/config").json()
    assert cfg["config"]["steps"] == 3 and "def variety" in cfg["env_source"]
    cmp = client.get("/api/compare", params={"runs": f"{ws.run_id},live-run"}).json()
    assert [r["id"] for r in cmp["runs"]] == [ws.run_id, ws.live_id]
    assert cmp["config_diff"] == {"steps": {ws.run_id: 3, ws.live_id: 50},
                                  "env": {ws.run_id: str(ws.dir / "env.py"), ws.live_id: f"{ws.dir / 'env.py'}:tools_env"},
                                  "run_name": {ws.run_id: "tiny-run", ws.live_id: "live-run"}}
    assert set(cmp["metrics"][ws.live_id]) == {"reward/mean", "pass@k", "loss/policy"}
    assert client.get("/api/compare", params={"runs": ""}).status_code == 400


def test_the_console_opens_the_store_read_only_and_never_imports_the_trainer(ws):
    app = create_app(ws.runs)
    TestClient(app, base_url="http://127.0.0.1").get("/api/runs")
    store = app.state.holder.store
    assert store.readonly
    with pytest.raises(PermissionError):
        store.request_stop(ws.live_id)
    # (rlft/__init__.py itself loads rlft.env and rlft.tools for the public API: not counted here)
    # nor does loading a run's environment for the chat tab
    code = ("import sys, rlft.console.app; from rlft.console.chat_proxy import EnvCache; "
            f"env, info = EnvCache().get('r', {{'env': {str(ws.dir / 'env.py') + ':tools_env'!r}}}); assert info['loaded'], info; "
            "bad = [m for m in ('torch', 'transformers', 'rlft.training.loop', 'rlft.policy', "
            "'rlft.training.update', 'rlft.serve') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_missing_store_gives_an_empty_list_then_503(tmp_path):
    c = TestClient(create_app(tmp_path / "nothing"), base_url="http://127.0.0.1")
    assert c.get("/api/runs").json() == [] and c.get("/api/info").json()["store_exists"] is False
    assert c.get("/api/runs/x").status_code == 503


# -- chat proxy ------------------------------------------------------------------------------------

def test_chat_models_default_to_the_runs_latest_checkpoint(client, ws):
    data = client.get("/api/chat/models", params={"run": "tiny-run"}).json()
    assert data["default"] == f"ft:base:{ws.run_id}:latest"
    assert data["models"][:2] == [f"ft:base:{ws.run_id}:latest", f"ft:base:{ws.run_id}:3"]


def test_chat_streams_the_servers_sse_through(client, fake):
    body = {"model": "base-model", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.5,
            "not_forwarded": 1}
    with client.stream("POST", "/api/chat", json=body) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in resp.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    text = "".join(json.loads(ln[6:])["choices"][0]["delta"].get("content", "") for ln in lines[:-1])
    assert text == "".join(CHAT_REPLY)
    sent = fake.app.state.requests[-1]
    assert sent["stream"] is True and sent["temperature"] == 0.5 and "not_forwarded" not in sent


def chat_events(client, body) -> list:
    with client.stream("POST", "/api/chat", json=body) as resp:
        assert resp.status_code == 200, resp.read()
        lines = [ln for ln in resp.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[6:]) for ln in lines[:-1]]


def test_chat_runs_the_environments_tools_and_asks_again(client, fake, ws):
    n = len(fake.app.state.requests)
    body = {"model": "base-model", "run": "live-run", "messages": [{"role": "user", "content": "what is 2+3?"}]}
    events = chat_events(client, body)
    mine = [e["rlft"] for e in events if "rlft" in e]
    assert [e["type"] for e in mine] == ["env", "tool_call", "tool_result", "turn", "done"]
    env, call, result, _, done = mine
    assert env["loaded"] and env["tools"] == ["add"] and env["max_turns"] == 3 and env["system_prompt_added"]
    assert call["name"] == "add" and json.loads(call["arguments"]) == {"a": 2, "b": 3} and call["id"] == "call_add"
    assert result == {"type": "tool_result", "id": "call_add", "name": "add", "content": "5", "error": None}
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
    assert text == "The sum is 5"
    assert [m["role"] for m in done["messages"]] == ["assistant", "tool", "assistant"] and done["stopped"] is None
    assert done["messages"][-1]["content"] == "The sum is 5"
    first, second = fake.app.state.requests[n:]
    assert first["tools"][0]["function"]["name"] == "add" and "run" not in first
    assert first["messages"][0] == {"role": "system", "content": "You can add with the add tool."}
    assert second["messages"][-2]["tool_calls"][0]["function"] == {"name": "add", "arguments": '{"a": 2, "b": 3}'}
    assert second["messages"][-1] == {"role": "tool", "content": "5", "tool_call_id": "call_add", "name": "add"}
    # the run without tools: the env is loaded, nothing is run, the reply streams as before
    events = chat_events(client, dict(body, run=ws.run_id))
    assert events[0]["rlft"]["loaded"] and events[0]["rlft"]["tools"] == []
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e.get("choices")) == "".join(CHAT_REPLY)


def test_chat_falls_back_to_plain_chat_when_the_environment_is_gone(tmp_path, fake):
    store = RunStore(tmp_path / "runs")
    moved = store.create_run("moved", config={"env": str(tmp_path / "gone" / "env.py")})
    store.close()
    c = TestClient(create_app(tmp_path / "runs", serve_url=fake.url), base_url="http://127.0.0.1")
    events = chat_events(c, {"model": "base-model", "run": moved, "messages": [{"role": "user", "content": "hi"}]})
    env = events[0]["rlft"]
    assert env["type"] == "env" and not env["loaded"] and "does not exist" in env["message"] and "plain chat" in env["message"]
    assert "tools" not in fake.app.state.requests[-1]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e.get("choices")) == "".join(CHAT_REPLY)


def test_chat_errors_name_the_problem(client, ws, tmp_path):
    bad_model = client.post("/api/chat", json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
    assert bad_model.status_code == 404 and "no model 'nope'" in bad_model.json()["error"]
    assert client.post("/api/chat", json={"model": "base-model", "messages": []}).status_code == 400
    form = client.post("/api/chat", content="model=x", headers={"content-type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    c = TestClient(create_app(ws.runs, serve_url=dead), base_url="http://127.0.0.1")
    r = c.get("/api/chat/models")
    assert r.status_code == 502 and "rlft serve" in r.json()["error"]
    r = c.post("/api/chat", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 502 and dead in r.json()["error"]


def test_chat_through_the_real_rlft_serve_on_the_trained_checkpoint(ws):
    serve = pytest.importorskip("rlft.serve")
    app = serve.create_app(runs_dir=str(ws.runs), dtype="float32", device="cpu")
    with BackgroundServer(app) as srv:
        c = TestClient(create_app(ws.runs, serve_url=srv.url), base_url="http://127.0.0.1")
        models = c.get("/api/chat/models", params={"run": ws.run_id}).json()
        assert models["default"].endswith(f":{ws.run_id}:latest")
        body = {"model": models["default"], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        with c.stream("POST", "/api/chat", json=body) as resp:
            assert resp.status_code == 200
            events = [json.loads(ln[6:]) for ln in resp.iter_lines() if ln.startswith("data: {")]
    assert events and events[-1]["model"] == models["default"].replace(":latest", ":3")
    assert any(e["choices"] and e["choices"][0].get("finish_reason") for e in events)


# -- security --------------------------------------------------------------------------------------

ROUTES = ["/", "/static/app.js", "/static/vendor/uPlot.iife.min.js", "/api/info", "/api/runs", "/api/runs/tiny-run",
          "/api/runs/tiny-run/metrics", "/api/runs/tiny-run/rollouts", "/api/runs/tiny-run/heatmap",
          "/api/runs/tiny-run/logs", "/api/runs/tiny-run/config", "/api/runs/tiny-run/evals",
          "/api/compare?runs=tiny-run", "/api/chat/models"]


def test_a_token_is_required_on_every_route(ws, fake):
    c = TestClient(create_app(ws.runs, token="s3cret-token", serve_url=fake.url), base_url="http://10.1.2.3")
    for route in ROUTES:
        assert c.get(route).status_code == 401, route
        assert c.get(route, headers={"x-rlft-token": "wrong-token"}).status_code == 401, route
        assert c.get(route, headers={"x-rlft-token": "s3cret-token"}).status_code == 200, route
        assert c.get(route, headers={"authorization": "Bearer s3cret-token"}).status_code == 200, route
    chat = {"model": "base-model", "messages": [{"role": "user", "content": "x"}]}
    assert c.post("/api/chat", json=chat).status_code == 401
    page = c.get("/?token=s3cret-token")
    cookie = page.headers["set-cookie"]
    assert page.status_code == 200 and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert c.get("/static/app.js").status_code == 200  # the cookie now carries it (what <script src> needs)
    c.cookies.clear()
    assert c.get("/static/app.js").status_code == 401


def test_without_a_token_only_loopback_hosts_are_served(ws):
    app = create_app(ws.runs)
    for host in ("127.0.0.1", "localhost:8765", "[::1]:8765", "127.0.0.1:9"):
        assert TestClient(app, base_url=f"http://{host}").get("/api/runs").status_code == 200, host
    for host in ("evil.example", "evil.example:8765", "192.168.1.5"):
        assert TestClient(app, base_url=f"http://{host}").get("/api/runs").status_code == 403, host


@pytest.mark.parametrize("path", ["/static/..%2fapp.py", "/static/..%2f..%2fstore.py", "/static/%2fetc%2fpasswd",
                                  "/static//etc/passwd", "/static/vendor/..%2f..%2fapp.py", "/static/..%5capp.py",
                                  "/static/%2e%2e/app.py", "/static/%2e%2e%2f%2e%2e%2fstore.py",
                                  "/static/app.js%00.css",
                                  "/static/C:%5cWindows%5cwin.ini", "/static/tabs", "/static/"])
def test_no_path_traversal_through_static(client, path):
    r = client.get(path)
    assert r.status_code == 404 and "import" not in r.text and "root:" not in r.text


def test_security_headers_and_no_html_sinks_in_the_page(client):
    r = client.get("/")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "object-src 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
    assert client.get("/api/runs").headers["cache-control"] == "no-store"
    ours = [p for p in STATIC_DIR.rglob("*.js") if "vendor" not in p.parts]
    assert len(ours) >= 9
    for p in ours:
        src = p.read_text()
        for sink in (".innerHTML", ".outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                     "DOMParser", "createContextualFragment"):
            assert sink not in src, f"{p.name} uses {sink}"
    assert (STATIC_DIR / "vendor" / "uPlot.LICENSE").read_text().startswith("The MIT License")


def test_cli_settings_generate_a_token_off_loopback():
    import argparse

    from rlft.cli.console import add_console_command, console_settings, console_url

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_console_command(lambda name, help: sub.add_parser(name, help=help))
    local = console_settings(parser.parse_args(["console"]))
    assert local["host"] == "127.0.0.1" and local["token"] is None and local["serve_url"] == "http://127.0.0.1:8000"
    remote = console_settings(parser.parse_args(["console", "--host", "0.0.0.0", "--runs", "r", "--poll", "0.5"]))
    assert len(remote["token"]) >= 20 and remote["runs_dir"] == "r" and remote["poll_ms"] == 500
    assert console_url("0.0.0.0", 9000, "abc") == "http://127.0.0.1:9000/?token=abc"
    given = console_settings(parser.parse_args(["console", "--host", "0.0.0.0", "--token", "my-token-123"]))
    assert given["token"] == "my-token-123"
    with pytest.raises(SystemExit):
        console_settings(parser.parse_args(["console", "--token", "bad token<>"]))


def test_an_sft_run_is_listed_as_sft_with_its_loss_curves(console_sft_workspace):
    sft_ws = console_sft_workspace
    c = TestClient(create_app(sft_ws.runs), base_url="http://127.0.0.1")
    (row,) = c.get("/api/runs").json()
    assert (row["kind"], row["name"], row["status"], row["step"], row["steps"]) == ("sft", "warmup", "completed", 5, 5)
    assert row["loss"] is not None and row["reward"] is None
    series = c.get(f"/api/runs/{sft_ws.run_id}/metrics").json()
    assert [s for s, _ in series["sft/loss"]] == [1, 2, 3, 4, 5]
    assert [s for s, _ in series["eval/loss"]] == [0, 2, 4, 5]
    assert {"optim/lr", "optim/grad_norm", "time/step", "sft/tokens_per_s"} <= set(series)
    detail = c.get(f"/api/runs/{sft_ws.run_id}").json()
    assert detail["kind"] == "sft" and detail["checkpoints"] and detail["checkpoints"][-1]["metrics"]["best"]

"""The console's ASGI app: read-only JSON over the run store, the static page, and a chat proxy.

Routes (all GET unless said; ``{run}`` is a run id, name or unique id prefix):

- ``/`` the page; ``/static/<file>`` its scripts, styles and the vendored uPlot (a fixed list
  of files found at start-up: no path from a request ever reaches the filesystem);
- ``/api/info`` store path, serve URL, poll interval, metric names, termination meanings;
- ``/api/runs`` the runs list; ``/api/runs/{run}`` one run (error + traceback, latest metrics,
  checkpoints, rollout counts); ``/api/runs/{run}/health`` its training-health findings
  (:mod:`rlft.health`: name, severity, summary, advice, the chart key and step window, evidence);
- ``/api/runs/{run}/metrics?keys=a,b&after_step=N`` (every point), with ``max_points=N`` or
  ``bucket=steps`` downsampled for a chart ([first step, mean, min, max] per bucket), with
  ``first_step``/``last_step`` a range (a zoomed chart asks for it at full resolution);
  ``/evals``, ``/rollouts`` (filters: step,
  split (train, eval or all), example, min_reward, max_reward, termination (repeatable), search,
  component + cmin + cmax, errors, limit, offset), ``/rollouts/{id}``, ``/steps``,
  ``/heatmap`` (split train, eval or auto; max_cols, examples_offset, examples_limit: the cells on
  screen, mean reward per example and column of steps; since_step + bin: only the newer columns),
  ``/logs`` (level, after_id, limit; termination counts), ``/config`` (resolved config, environment source);
- ``/api/compare?runs=a,b&keys=...&max_points=N`` several runs' series and the config keys that differ;
- ``/api/chat/models?run=...`` and ``POST /api/chat`` (JSON) proxied to ``serve_url``
  (:mod:`rlft.console.chat_proxy`), the latter streaming SSE. With ``"run"`` in the body the run's
  environment is loaded (from its config's ``env``, once per run) and the chat is an episode of
  it, run in the console process by the training loop (its tools, ``step`` and limits): tool
  calls and results stream as their own events; an environment that cannot be loaded means
  plain chat, and the stream says why.

Security: without a token only loopback ``Host`` headers are accepted (DNS rebinding); with a
token every route needs it as ``?token=``, ``X-RLFT-Token``, ``Authorization: Bearer`` or the
``rlft_console`` cookie that a valid ``?token=`` sets. Every response carries a strict
Content-Security-Policy (scripts from ``'self'`` only) and ``nosniff``; ``POST /api/chat`` needs
``Content-Type: application/json`` (so a cross-site form cannot post). The page renders every
text from the store with ``textContent``.

Left out: anything that writes to the store (stopping a run is ``rlft stop``), and
authentication beyond one shared token. The console never imports the trainer or torch; the
chat imports the run's environment module (user code, run with the console's rights) on first use.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import mimetypes
import re
import threading
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from rlft.console import views
from rlft.console.chat_proxy import ChatError, ChatProxy, EnvCache
from rlft.console.runcache import RunCache
from rlft.store import RunStore

STATIC_DIR = Path(__file__).parent / "static"
COOKIE = "rlft_console"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY")]
MEDIA_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".svg": "image/svg+xml",
               ".txt": "text/plain", "": "text/plain"}


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(host_header: str) -> str:
    if host_header.startswith("["):  # [::1]:8765
        return host_header[1:].split("]", 1)[0]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


class Guard:
    """ASGI middleware: the token or loopback-host check, and the security headers."""

    def __init__(self, app: Any, token: str | None):
        self.app = app
        self.token = token

    def _given(self, scope: dict[str, Any], headers: dict[str, str]) -> tuple[str | None, bool]:
        """(the token the request carries, whether it came in the query string)."""
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if query.get("token"):
            return query["token"][0], True
        if headers.get("x-rlft-token"):
            return headers["x-rlft-token"], False
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip(), False
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # noqa: BLE001 - a malformed cookie header is no token
            return None, False
        return (cookie[COOKIE].value if COOKIE in cookie else None), False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        set_cookie = None
        if self.token is None:
            if not is_loopback(_host_name(headers.get("host", ""))):
                await self._deny(send, 403, "this console only answers on a loopback address (Host header "
                                             "rejected); bind another address with a token (rlft console --host)")
                return
        else:
            given, from_query = self._given(scope, headers)
            if given is None or not hmac.compare_digest(given.encode(), self.token.encode()):
                await self._deny(send, 401, "this console needs its token: open the URL that `rlft console` "
                                             "printed (…/?token=…) or send the X-RLFT-Token header")
                return
            if from_query:
                set_cookie = f"{COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict".encode()

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                extra = list(SECURITY_HEADERS)
                if set_cookie:
                    extra.append((b"set-cookie", set_cookie))
                if scope.get("path", "").startswith("/api/"):
                    extra.append((b"cache-control", b"no-store"))
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        await self.app(scope, receive, send_with_headers)

    @staticmethod
    async def _deny(send: Any, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *SECURITY_HEADERS]})
        await send({"type": "http.response.body", "body": body})


class _Store:
    """Opens the run store read-only on first use (the console may start before any run)."""

    def __init__(self, runs_dir: str | Path):
        self.runs_dir = Path(runs_dir)
        self.store: RunStore | None = None
        self.lock = threading.Lock()

    def get(self) -> RunStore | None:
        if self.store is None:
            with self.lock:
                if self.store is None:
                    try:
                        self.store = RunStore(self.runs_dir, readonly=True)
                    except FileNotFoundError:
                        return None
        return self.store

    @property
    def path(self) -> str:
        p = self.runs_dir
        return str(p if p.suffix in (".db", ".sqlite", ".sqlite3") else p / "rlft.db")


class NoStore(Exception):
    pass


def static_files() -> dict[str, Path]:
    """Every servable file under ``static/``, by its URL path: the whitelist the routes use."""
    return {p.relative_to(STATIC_DIR).as_posix(): p for p in sorted(STATIC_DIR.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def _csv(value: str | None) -> list[str] | None:
    return [v for v in value.split(",") if v] if value else None


def _json(data: Any) -> Response:
    """JSON straight from ``json.dumps``: FastAPI's encoder walks every value in Python first,
    which for 20k-point series costs more than the query."""
    return Response(json.dumps(data, separators=(",", ":"), ensure_ascii=False), media_type="application/json")


def _json_text(text: str) -> Response:
    """JSON already serialized (the metric series' answers, kept between requests)."""
    return Response(text, media_type="application/json")


def create_app(runs_dir: str | Path = "runs", *, token: str | None = None,
               serve_url: str = "http://127.0.0.1:8000", serve_api_key: str | None = None,
               poll_ms: int = 2000) -> Any:
    """The console app over the run store in ``runs_dir`` (a directory or a ``.db`` file).

    ``token``: required on every route (see the module docstring); ``None`` = loopback only.
    ``serve_url``: the OpenAI-compatible server the chat tab talks to; ``poll_ms``: how often
    the page polls a running run."""
    if token is not None and not re.fullmatch(r"[A-Za-z0-9._~-]+", token):
        raise ValueError("the console token may use letters, digits and . _ ~ - only (it travels in URLs and a cookie)")
    holder = _Store(runs_dir)
    proxy = ChatProxy(serve_url, serve_api_key)
    envs = EnvCache()
    files = static_files()
    cache = RunCache()
    api = FastAPI(title="rlft console", docs_url=None, redoc_url=None, openapi_url=None)
    api.state.holder = holder

    def store() -> RunStore:
        s = holder.get()
        if s is None:
            raise NoStore(f"no run store at {holder.path} yet: start a run with `rlft train` (or pass --runs DIR)")
        return s

    def rid(ref: str) -> str:
        return store().resolve(ref)

    @api.exception_handler(KeyError)
    async def _not_found(request: Request, e: KeyError):
        return JSONResponse({"error": str(e.args[0]) if e.args else "not found"}, status_code=404)

    @api.exception_handler(NoStore)
    async def _no_store(request: Request, e: NoStore):
        return JSONResponse({"error": str(e)}, status_code=503)

    @api.exception_handler(ValueError)
    async def _bad(request: Request, e: ValueError):
        return JSONResponse({"error": str(e)}, status_code=400)

    @api.exception_handler(ChatError)
    async def _chat(request: Request, e: ChatError):
        return JSONResponse({"error": e.message}, status_code=e.status)

    # -- the page ------------------------------------------------------------------------------
    def _file(name: str) -> FileResponse:
        path = files.get(name)
        if path is None:
            raise KeyError(f"no file {name!r}")
        media = MEDIA_TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media, headers={"cache-control": "no-cache"})

    @api.get("/")
    def index():
        return _file("index.html")

    @api.get("/static/{name:path}")
    def static(name: str):
        return _file(name)

    # -- runs ----------------------------------------------------------------------------------
    @api.get("/api/info")
    def info():
        return {"store": holder.path, "store_exists": holder.get() is not None, "serve_url": proxy.serve_url,
                "poll_ms": poll_ms, **views.info_static()}

    @api.get("/api/runs")
    def runs():
        s = holder.get()
        return _json(views.list_runs(s, cache) if s is not None else [])

    @api.get("/api/runs/{ref}")
    def run(ref: str):
        return _json(views.run_detail(store(), cache, rid(ref)))

    @api.get("/api/runs/{ref}/metrics")
    def run_metrics(ref: str, keys: str | None = None, after_step: int | None = None, max_points: int | None = None,
                    bucket: int | None = None, first_step: int | None = None, last_step: int | None = None):
        return _json_text(views.metrics(store(), cache, rid(ref), _csv(keys), after_step, max_points=max_points,
                                        bucket=bucket, first_step=first_step, last_step=last_step))

    @api.get("/api/runs/{ref}/evals")
    def run_evals(ref: str):
        return _json(views.evals(store(), rid(ref)))

    @api.get("/api/runs/{ref}/rollouts")
    def run_rollouts(ref: str, split: str = "train", step: int | None = None, example: int | None = None,
                     min_reward: float | None = None, max_reward: float | None = None,
                     termination: list[str] | None = Query(None),  # noqa: B008 - FastAPI's way to take a list
                     search: str | None = None,
                     component: str | None = None, cmin: float | None = None, cmax: float | None = None,
                     errors: bool | None = None, limit: int = 50, offset: int = 0):
        return _json(views.rollouts(store(), cache, rid(ref), split=None if split in ("", "all") else split, step=step,
                              example_id=example, min_reward=min_reward, max_reward=max_reward,
                              termination=termination or None, search=search or None,
                              component=component or None, cmin=cmin, cmax=cmax, has_errors=errors,
                              limit=limit, offset=offset))

    @api.get("/api/runs/{ref}/rollouts/{rollout_id}")
    def run_rollout(ref: str, rollout_id: int):
        return _json(views.rollout(store(), rid(ref), rollout_id))

    @api.get("/api/runs/{ref}/steps")
    def run_steps(ref: str, split: str = "train"):
        return _json(cache.steps(store(), rid(ref), split))

    @api.get("/api/runs/{ref}/health")
    def run_health(ref: str):
        return _json(views.health(store(), cache, rid(ref)))

    @api.get("/api/runs/{ref}/heatmap")
    def run_heatmap(ref: str, split: str = "auto", max_cols: int = 200, examples_offset: int = 0,
                    examples_limit: int = 64, since_step: int | None = None, bin: int | None = None):
        return _json(views.heatmap(store(), cache, rid(ref), split=split, max_cols=max_cols,
                                   examples_offset=examples_offset, examples_limit=examples_limit,
                                   since_step=since_step, bin=bin))

    @api.get("/api/runs/{ref}/logs")
    def run_logs(ref: str, level: str | None = None, after_id: int = 0, limit: int = 500):
        return _json(views.logs(store(), cache, rid(ref), level=level, after_id=after_id, limit=limit))

    @api.get("/api/runs/{ref}/config")
    def run_config(ref: str):
        return _json(views.config(store(), rid(ref)))

    @api.get("/api/compare")
    def compare(runs: str, keys: str | None = None, max_points: int | None = None):
        ids = [rid(r) for r in _csv(runs) or []]
        if not ids:
            raise ValueError("name the runs to compare: ?runs=a,b")
        return _json_text(views.compare(store(), cache, ids, _csv(keys), max_points=max_points))

    # -- chat ----------------------------------------------------------------------------------
    @api.get("/api/chat/models")
    async def chat_models(run: str | None = None):
        run_id = None
        if run and holder.get() is not None:
            try:
                run_id = rid(run)
            except KeyError:
                run_id = run
        return await proxy.models(run_id or run)

    def _run_env(ref: str) -> tuple[Any, dict[str, Any]]:
        s = holder.get()
        try:
            run_id = s.resolve(ref) if s is not None else None
        except KeyError:
            run_id = None
        if run_id is None:
            return None, {"loaded": False, "message": f"no run {ref!r} in the store: plain chat, tools are not run"}
        return envs.get(run_id, (s.get_run(run_id) or {}).get("config"))

    @api.post("/api/chat")
    async def chat(request: Request):
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return JSONResponse({"error": "send the chat request as application/json"}, status_code=415)
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "the body is not valid JSON"}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"error": "the body must be a JSON object"}, status_code=400)
        env, env_info = None, None
        if body.get("run"):  # the run's environment: its tools run, its system prompt is used
            env, env_info = await run_in_threadpool(_run_env, str(body["run"]))
        stream = await proxy.open_stream(body, env, env_info)
        return StreamingResponse(stream, media_type="text/event-stream")

    @api.api_route("/api/{rest:path}", methods=["GET", "POST"])
    def api_404(rest: str):
        return JSONResponse({"error": f"no route /api/{rest}"}, status_code=404)

    app = Guard(api, token)
    app.state = api.state  # type: ignore[attr-defined]
    app.fastapi = api  # type: ignore[attr-defined]
    return app

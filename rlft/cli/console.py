"""``rlft console``: serve the web console over a run store (``rlft.console``) with uvicorn.

``add_console_command(cmd)`` adds the subcommand to the CLI's parser (``cmd(name, help)``
returns an argparse subparser, as in :mod:`rlft.cli`); ``cmd_console(args)`` runs it. On a
loopback address (the default 127.0.0.1) no token is needed; on any other address a token is
required on every route: ``--token`` or a generated one, printed in the URL to open.
Left out: opening a browser, TLS (put a reverse proxy in front for that).
"""

from __future__ import annotations

import os
import re
import secrets
from typing import Any

DEFAULT_PORT = 8765
EPILOG = ("example:\n  rlft console                      # http://127.0.0.1:8765, runs in ./runs\n"
          "  rlft console --runs /data/runs --port 9000\n"
          "  rlft console --host 0.0.0.0        # prints a URL with a generated token\n"
          "  rlft serve --runs-dir runs & rlft console   # with the chat tab talking to checkpoints")


def add_console_command(cmd) -> None:
    p = cmd("console", "web console: watch runs learn, read rollouts, compare runs, chat with checkpoints")
    p.add_argument("--runs", default="runs", help="workspace directory (or .db file) of the run store (default ./runs)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need a token)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = any free port)")
    p.add_argument("--token", default=os.environ.get("RLFT_CONSOLE_TOKEN"),
                   help="require this token on every route (default: $RLFT_CONSOLE_TOKEN; generated when --host "
                        "is not a loopback address)")
    p.add_argument("--serve-url", default=os.environ.get("RLFT_SERVE_URL", "http://127.0.0.1:8000"),
                   help="OpenAI-compatible server for the chat tab (default http://127.0.0.1:8000, `rlft serve`)")
    p.add_argument("--serve-api-key", default=os.environ.get("RLFT_API_KEY"),
                   help="bearer key for --serve-url (default: $RLFT_API_KEY)")
    p.add_argument("--poll", type=float, default=2.0, help="seconds between the page's updates of a running run")
    p.epilog = EPILOG


def console_settings(args: Any) -> dict[str, Any]:
    """What ``cmd_console`` serves: host, port, token (generated when needed) and app options."""
    from rlft.console.app import is_loopback

    token = args.token or None
    if token is not None and not re.fullmatch(r"[A-Za-z0-9._~-]{8,}", token):
        raise SystemExit("rlft console: --token must be at least 8 characters of letters, digits, . _ ~ -")
    if token is None and not is_loopback(args.host):
        token = secrets.token_urlsafe(24)
    return {"host": args.host, "port": args.port, "token": token, "runs_dir": args.runs,
            "serve_url": args.serve_url, "serve_api_key": args.serve_api_key,
            "poll_ms": max(int(args.poll * 1000), 200)}


def console_url(host: str, port: int, token: str | None) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host and host != "::" else host
    if host == "::":
        shown = "[::1]"
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def cmd_console(args: Any) -> int:
    try:
        import uvicorn

        from rlft.console.app import create_app
    except ImportError as e:
        raise SystemExit(f"rlft console needs fastapi and uvicorn: pip install 'rlft[serve]' ({e})") from e
    s = console_settings(args)
    app = create_app(s["runs_dir"], token=s["token"], serve_url=s["serve_url"], serve_api_key=s["serve_api_key"],
                     poll_ms=s["poll_ms"])
    config = uvicorn.Config(app, host=s["host"], port=s["port"], log_level="warning")
    server = uvicorn.Server(config)
    sock = config.bind_socket()  # bound before printing, so port 0 prints the real port
    port = sock.getsockname()[1]
    print(f"rlft console: open {console_url(s['host'], port, s['token'])}", flush=True)
    print(f"  run store: {app.state.holder.path} (read-only); chat via {s['serve_url']}", flush=True)
    if s["token"] and not args.token:
        print("  (a token was generated because the console listens on a non-loopback address)", flush=True)
    server.run(sockets=[sock])
    return 0

"""Running ``rlft serve``'s app: in the foreground with uvicorn (``rlft serve``, its command-line
options) or in a background thread (:class:`BackgroundServer`: tests, notebooks, the console).
Left out: the app itself (``app.py``).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

__all__ = ["MAX_BODY_BYTES", "BackgroundServer", "add_serve_arguments", "run_server", "serve_main"]

MAX_BODY_BYTES = 32 * 2**20  # a request body larger than this is refused (413), before it is read


class BackgroundServer:
    """Serve an app with uvicorn in a daemon thread (tests, notebooks); ``port=0`` picks a free one.
    ``with BackgroundServer(app) as srv: OpenAI(base_url=srv.url + "/v1", ...)``."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start (see its log)")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def run_server(model: str | None = None, *, runs_dir: str | None = None, run: str | None = None,
               host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, log_level: str = "info",
               **app_kwargs: Any) -> None:
    """Serve until interrupted (``app_kwargs`` as for :func:`create_app`); the base model loads first."""
    import uvicorn

    from rlft.serve.app import create_app  # (app.py imports this module)

    app = create_app(model, runs_dir=runs_dir, run=run, api_key=api_key, preload=True, **app_kwargs)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def add_serve_arguments(parser: Any) -> None:
    """The ``rlft serve`` options, on an argparse (sub)parser."""
    parser.add_argument("--model", help="base model: hub id, alias, local dir, .gguf or a checkpoint dir")
    parser.add_argument("--runs-dir", default="runs", help="run store workspace whose checkpoints are served")
    parser.add_argument("--run", help="serve only this run's checkpoints (id or name)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("RLFT_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $RLFT_API_KEY)")
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16, float32, float16 or auto")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--max-loaded", type=int, default=3, help="models kept loaded (LRU)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="sequences decoded together per model")
    parser.add_argument("--max-body-mb", type=float, default=MAX_BODY_BYTES / 2**20,
                        help="larger request bodies are refused with 413")


def serve_main(args: Any) -> int:
    """``rlft serve``: ``args`` parsed with :func:`add_serve_arguments`."""
    run_server(args.model, runs_dir=args.runs_dir, run=args.run, host=args.host, port=args.port,
               api_key=args.api_key, dtype=args.dtype, device=args.device, max_loaded=args.max_loaded,
               max_batch_size=args.max_batch_size, max_body_bytes=int(args.max_body_mb * 2**20))
    return 0

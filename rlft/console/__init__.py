"""``rlft console``: a local web console over the run store (read-only), with a chat proxy.

``create_app(runs_dir, token=..., serve_url=...)`` builds the ASGI app (:mod:`rlft.console.app`);
:mod:`rlft.console.views` shapes the store's data for it, :mod:`rlft.console.chat_proxy` forwards chat
to an OpenAI-compatible server, and ``static/`` holds the page (plain JS and CSS, no build step,
uPlot vendored with its license). The console imports the store and metric names only: never
the trainer, torch or transformers.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def create_app(*args: Any, **kwargs: Any) -> Any:
    """See :func:`rlft.console.app.create_app` (imported on first use: it needs fastapi)."""
    from rlft.console.app import create_app as _create_app

    return _create_app(*args, **kwargs)

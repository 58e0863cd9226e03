"""Errors ``rlft serve`` answers in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``),
and how an engine's exception becomes one. Left out: the HTTP side (``app.py`` maps them to
responses).
"""

from __future__ import annotations

from typing import Any

__all__ = ["APIError", "engine_error"]


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def engine_error(e: BaseException) -> APIError:
    """A generation failure: 400 for a request the engine refused (ContextLengthError, invalid
    sampling params: ValueErrors), else 500."""
    if isinstance(e, ValueError):
        return APIError(400, f"{type(e).__name__}: {e}")
    return APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")

"""The chat tab's server side: a thin proxy to an OpenAI-compatible server (``rlft serve``).

``models`` lists ``<serve-url>/v1/models`` and picks a default for a run: its
``ft:<base>:<run>:latest`` checkpoint, else its newest ``ft:<base>:<run>:<step>``, else the first
model. ``stream_chat`` forwards a chat request with ``stream: true`` to
``<serve-url>/v1/chat/completions`` and relays the SSE bytes as they arrive, so the browser
sees tokens as they are sampled. Upstream failures become :class:`ChatError` with a status and a
message that says what to do (the server is not running, the model is unknown, ...).

Left out: running the environment's tools during a chat (that would import the user's
environment and the trainer's rollout code into the console); tool calls the model emits are
relayed and shown, not executed.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

import httpx

ALLOWED_FIELDS = {"model", "messages", "temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens",
                  "stop", "seed", "tools", "tool_choice"}
CONNECT_TIMEOUT = 5.0


class ChatError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def parse_ft_name(name: str) -> tuple[str, str, str] | None:
    """``ft:<base>:<run>:<step|latest>`` -> (base, run, step); None for other names."""
    if not name.startswith("ft:"):
        return None
    parts = name[3:].rsplit(":", 2)
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 else None


def default_model(names: list[str], run_id: str | None) -> str | None:
    if not names:
        return None
    if run_id:
        mine = [(p[2], n) for n in names if (p := parse_ft_name(n)) and p[1] == run_id]
        for step, n in mine:
            if step == "latest":
                return n
        numbered = [(int(s), n) for s, n in mine if s.isdigit()]
        if numbered:
            return max(numbered)[1]
    return names[0]


class ChatProxy:
    """Talks to one OpenAI-compatible server; ``api_key`` is sent as a bearer token if given."""

    def __init__(self, serve_url: str, api_key: str | None = None):
        self.serve_url = serve_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _hint(self) -> str:
        return (f"cannot reach the model server at {self.serve_url}: start one with "
                f"`rlft serve --runs-dir <runs>` (or pass --serve-url to the console)")

    async def models(self, run_id: str | None = None) -> dict[str, Any]:
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=CONNECT_TIMEOUT)) as client:
                resp = await client.get(f"{self.serve_url}/v1/models", headers=self.headers)
        except httpx.HTTPError as e:
            raise ChatError(502, f"{self._hint()} ({type(e).__name__})") from e
        if resp.status_code != 200:
            raise ChatError(502, f"{self.serve_url}/v1/models answered {resp.status_code}: {_error_text(resp.content)}")
        names = [m.get("id") for m in (resp.json().get("data") or []) if isinstance(m, dict) and m.get("id")]
        if run_id:  # this run's checkpoints first, newest first; then everything else
            def order(n: str) -> tuple[int, int]:
                p = parse_ft_name(n)
                if not p or p[1] != run_id:
                    return (2, 0)
                return (0, 0) if p[2] == "latest" else (1, -int(p[2]) if p[2].isdigit() else 0)
            names = sorted(names, key=order)
        return {"serve_url": self.serve_url, "models": names, "default": default_model(names, run_id)}

    async def open_stream(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        """Start the upstream request (errors raise here, before any byte is sent) and return
        an iterator over the SSE bytes that closes the connection when done."""
        payload = {k: v for k, v in body.items() if k in ALLOWED_FIELDS}
        if not payload.get("model"):
            raise ChatError(400, "pick a model")
        if not isinstance(payload.get("messages"), list) or not payload["messages"]:
            raise ChatError(400, "messages must be a non-empty list")
        payload["stream"] = True
        client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT))
        try:
            req = client.build_request("POST", f"{self.serve_url}/v1/chat/completions", json=payload,
                                       headers=self.headers)
            resp = await client.send(req, stream=True)
        except httpx.HTTPError as e:
            await client.aclose()
            raise ChatError(502, f"{self._hint()} ({type(e).__name__})") from e
        if resp.status_code != 200:
            content = await resp.aread()
            await resp.aclose()
            await client.aclose()
            raise ChatError(resp.status_code if 400 <= resp.status_code < 500 else 502,
                            f"the model server answered {resp.status_code}: {_error_text(content)}")

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in resp.aiter_raw():
                    yield chunk
            except httpx.HTTPError as e:
                yield f'data: {{"error": {{"message": "stream broken: {type(e).__name__}"}}}}\n\n'.encode()
            finally:
                await resp.aclose()
                await client.aclose()

        return relay()


def _error_text(content: bytes) -> str:
    import json

    try:
        data = json.loads(content)
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:500]
        if isinstance(data, dict) and data.get("detail"):
            return str(data["detail"])[:500]
    except ValueError:
        pass
    return content.decode("utf-8", "replace")[:500]

"""``rlft serve`` stays responsive: a huge prompt is rendered off the event loop, and a body over
the limit is refused before it is read."""

from __future__ import annotations

import statistics
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from rlft.renderer import Renderer  # noqa: E402
from rlft.serve import BackgroundServer, create_app  # noqa: E402
from rlft.testing import ScriptedPolicy, build_tiny_tokenizer  # noqa: E402


def _app(**kwargs):
    renderer = Renderer(build_tiny_tokenizer())
    return create_app(engines={"scripted": (ScriptedPolicy(renderer, ["ok"]), renderer)}, **kwargs)


def test_health_answers_at_once_while_a_10_mb_message_is_being_tokenised():
    big = {"model": "scripted", "max_tokens": 4,
           "messages": [{"role": "user", "content": "hello world " * 850_000}]}  # ~10 MB, seconds to tokenise
    result: dict = {}
    with BackgroundServer(_app()) as srv:
        def send() -> None:
            t0 = time.perf_counter()
            result["response"] = httpx.post(srv.url + "/v1/chat/completions", json=big, timeout=300)
            result["seconds"] = time.perf_counter() - t0

        sender = threading.Thread(target=send)
        sender.start()
        time.sleep(1.0)  # the body is in; its prompt is being rendered
        latencies = []
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            for _ in range(10):
                t0 = time.perf_counter()
                assert client.get("/health").status_code == 200
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.05)
        in_flight = sender.is_alive()
        sender.join(timeout=300)
    assert result["response"].status_code == 200, result["response"].text[:300]
    assert in_flight, "the big request finished before /health was measured: the test measured nothing"
    # before rendering moved off the event loop, /health waited for the whole tokenisation (seconds)
    assert statistics.median(latencies) < 0.05, (latencies, result["seconds"])


def test_a_body_over_the_limit_is_refused_with_413_naming_the_limit():
    with BackgroundServer(_app(max_body_bytes=4096)) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=30,
                       json={"model": "scripted", "messages": [{"role": "user", "content": "x" * 10_000}]})
        small = httpx.post(srv.url + "/v1/chat/completions", timeout=30,
                           json={"model": "scripted", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"]
    assert small.status_code == 200

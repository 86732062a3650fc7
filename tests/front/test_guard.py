"""What the front checks before it works and how much it takes on (``orchmoe.front.guard``), before the recording
stand-in for vLLM: bodies over the bound, prompts over the context (refused before any routing), routing off the event
loop in lanes, bounded requests in flight and in the routing queue, clients that vanish, the API key, the metrics."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import anyio
import httpx
import pytest
from starlette.testclient import TestClient

from orchmoe.front import check_exposure
from orchmoe.front import guard as guard_module
from orchmoe.front.app import Front
from orchmoe.front.guard import Admission

from .conftest import PROMPTS, Served
from .test_app import CONTEXT, VLLM_METRICS, RecordingVLLM


def make_front(served: Served, **options) -> tuple[Front, RecordingVLLM]:
    app = Front(served.served, served.base, "http://vllm", **options)
    vllm = RecordingVLLM(app.base_name)
    app.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=vllm.app()), base_url="http://vllm")
    return app, vllm


@pytest.fixture
def client(served: Served) -> Iterator[tuple[TestClient, Front, RecordingVLLM]]:
    app, vllm = make_front(served, max_body_bytes=2_000)
    with TestClient(app.app()) as test_client:
        yield test_client, app, vllm


def slow_routing(app: Front, seconds: float, longer_than: int = 0) -> list[int]:
    """Make routing sleep ``seconds`` (in its worker thread) for prompts longer than ``longer_than`` tokens; returns
    the lengths routed, in order."""
    routed, route = [], app.route

    def slow(ids: list[int]) -> str:
        routed.append(len(ids))
        if len(ids) > longer_than:
            time.sleep(seconds)
        return route(ids)

    app.route = slow  # type: ignore[method-assign]
    return routed


@pytest.mark.parametrize(
    ("content", "headers"),
    [
        (b'{"prompt": "' + b"x" * 3_000 + b'"}', {}),  # announced by Content-Length
        (iter([b'{"prompt": "', b"x" * 1_500, b"x" * 1_500, b'"}']), {}),  # chunked: found while reading
    ],
)
def test_a_body_over_the_bound_gets_413_and_nothing_is_routed(client, content, headers: dict) -> None:
    test_client, app, vllm = client
    routed = slow_routing(app, 0.0)
    response = test_client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "over 2000 bytes" in response.json()["error"]["message"]
    assert routed == [] and vllm.bodies == []
    assert test_client.post("/v1/completions", json={"prompt": "fine"}).status_code == 200


def test_a_prompt_over_the_context_is_refused_before_routing(client) -> None:
    test_client, app, vllm = client
    routed = slow_routing(app, 0.0)
    response = test_client.post("/v1/completions", json={"prompt": "x" * (CONTEXT + 10)})
    assert response.status_code == 400 and f"context is {CONTEXT} tokens" in response.json()["error"]["message"]
    assert routed == [] and vllm.bodies == []


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def timed_post(http: httpx.AsyncClient, body: dict, into: dict, key: str) -> None:
    start = time.perf_counter()
    response = await http.post("/v1/completions", json=body)
    into[key] = (response.status_code, time.perf_counter() - start, response)


@pytest.mark.anyio
async def test_a_short_request_and_health_never_wait_for_a_long_prompts_routing(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guard_module, "LONG_PROMPT", 20)  # prompts over 20 tokens take the long lane
    app, _ = make_front(served)
    slow_routing(app, 1.5, longer_than=20)
    got: dict = {}
    transport = httpx.ASGITransport(app=app.app())
    async with httpx.AsyncClient(transport=transport, base_url="http://front") as http, anyio.create_task_group() as tg:
        tg.start_soon(timed_post, http, {"prompt": "y" * 40}, got, "long")
        tg.start_soon(timed_post, http, {"prompt": "z" * 41}, got, "long2")  # as many as the short lane's threads
        await anyio.sleep(0.2)  # the long prompts are routing (or queued for it) now
        start = time.perf_counter()
        health = await http.get("/health")
        got["health"] = (health.status_code, time.perf_counter() - start, health)
        for i, prompt in enumerate(PROMPTS[:3]):
            await timed_post(http, {"prompt": prompt}, got, f"short{i}")
    assert got["long"][0] == got["long2"][0] == 200 and max(got["long"][1], got["long2"][1]) >= 3.0  # one at a time
    for key in ("health", "short0", "short1", "short2"):
        assert got[key][0] == 200 and got[key][1] < 0.5, (key, got[key][1])


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("admission", "status", "reason"),
    [(Admission(max_in_flight=2), 503, "overloaded"), (Admission(max_waiting=0, threads=1), 429, "busy")],
)
async def test_beyond_its_bounds_a_request_is_refused_with_retry_after(
    served: Served, admission: Admission, status: int, reason: str
) -> None:
    app, _ = make_front(served, admission=admission)
    slow_routing(app, 0.5)
    got: dict = {}
    transport = httpx.ASGITransport(app=app.app())
    async with httpx.AsyncClient(transport=transport, base_url="http://front") as http:
        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(timed_post, http, {"prompt": PROMPTS[i]}, got, str(i))
        codes = sorted(v[0] for v in got.values())
        assert codes.count(200) >= 1 and status in codes and set(codes) <= {200, status}
        refused = next(v[2] for v in got.values() if v[0] == status)
        assert refused.headers["retry-after"] == "1" and refused.json()["error"]["code"] == status
        assert (await http.post("/v1/completions", json={"prompt": "after"})).status_code == 200  # it recovers
        metrics = (await http.get("/metrics")).text
    assert f'orchmoe_front_refusals_total{{reason="{reason}"}}' in metrics


@pytest.mark.anyio
async def test_a_client_that_vanishes_is_a_log_line_not_a_traceback(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    app, vllm = make_front(served)
    asgi = app.app()
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [(b"content-length", b"100")],
             "query_string": b"", "http_version": "1.1", "scheme": "http", "server": ("front", 80),
             "client": ("c", 1), "root_path": ""}  # fmt: skip
    messages = [{"type": "http.request", "body": b'{"prompt": "hal', "more_body": True}, {"type": "http.disconnect"}]

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        pass

    with caplog.at_level(logging.INFO, logger="orchmoe.front"):
        await asgi(scope, receive, send)
    assert any("went away" in r.getMessage() for r in caplog.records)
    assert not any(r.levelno >= logging.ERROR or r.exc_info for r in caplog.records)
    assert vllm.bodies == []


def test_with_an_api_key_v1_needs_it_and_health_does_not(served: Served) -> None:
    app, vllm = make_front(served, api_key="s3cret")
    with TestClient(app.app()) as test_client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for path, body in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", {"messages": []})):
                response = test_client.post(path, json=body, headers=headers)
                assert response.status_code == 401 and response.json()["error"]["type"] == "invalid_api_key"
            assert test_client.get("/v1/models", headers=headers).status_code == 401
        assert vllm.bodies == []
        good = {"Authorization": "Bearer s3cret"}
        assert test_client.post("/v1/completions", json={"prompt": "x"}, headers=good).status_code == 200
        assert test_client.get("/v1/models", headers=good).status_code == 200
        assert test_client.get("/health").status_code == 200 and test_client.get("/metrics").status_code == 200


def test_metrics_pass_vllms_through_and_add_the_fronts(client) -> None:
    test_client, _, _ = client
    for prompt in PROMPTS[:3]:
        assert test_client.post("/v1/completions", json={"prompt": prompt}).status_code == 200
    test_client.post("/v1/completions", json={"model": "abstract-task-0", "prompt": "x"})
    test_client.post("/v1/completions", content=b"{", headers={"content-type": "application/json"})
    text = test_client.get("/metrics").text
    assert text.startswith(VLLM_METRICS.decode())
    routed = [line for line in text.splitlines() if line.startswith("orchmoe_front_requests_total{")]
    assert sum(float(line.split()[-1]) for line in routed) == 4.0
    assert 'route="none"' in text and 'orchmoe_front_refusals_total{reason="invalid_json"} 1.0' in text
    assert "orchmoe_front_routing_seconds_count 3.0" in text


@pytest.mark.parametrize(
    ("host", "key", "allowed", "ok"),
    [("127.0.0.1", None, False, True), ("::1", None, False, True), ("localhost", None, False, True),
     ("0.0.0.0", None, False, False), ("0.0.0.0", "k", False, True), ("0.0.0.0", None, True, True),
     ("192.168.1.5", "", False, False), ("example.org", None, False, False)],
)  # fmt: skip
def test_serving_beyond_loopback_needs_a_key_or_an_explicit_choice(host: str, key, allowed: bool, ok: bool) -> None:
    if ok:
        check_exposure(host, key, allowed)
    else:
        with pytest.raises(ValueError, match="--api-key"):
            check_exposure(host, key, allowed)


def test_the_guard_state_is_balanced_after_refusals(client) -> None:
    """Every admitted request leaves the in-flight count and the lanes' queues as it found them."""
    test_client, app, _ = client
    threads = [threading.Thread(target=test_client.post, args=("/v1/completions",), kwargs={"json": {"prompt": p}})
               for p in PROMPTS]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    test_client.post("/v1/completions", content=b"{", headers={"content-type": "application/json"})
    for drop in (False, True):  # a stream counts until it ends, read to its end or dropped after one chunk
        with test_client.stream("POST", "/v1/completions", json={"prompt": "x", "stream": True}) as response:
            for _ in response.iter_lines():
                if drop:
                    break
    assert app.admission.in_flight == 0 and app.admission.short.waiting == 0 and app.admission.long.waiting == 0


def test_orchmoe_serve_refuses_to_serve_beyond_loopback_without_a_key(served: Served, capsys) -> None:
    from orchmoe.cli import main

    code = main(["serve", str(served.served), "--model", str(served.base), "--host", "0.0.0.0"])
    assert code == 2 and "--api-key" in capsys.readouterr().err

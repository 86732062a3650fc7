"""What the front checks before it does any work, and how much work it takes on at once.

- the API key (``Authorization: Bearer KEY``, as OpenAI's and vLLM's servers take it): 401 without it;
- the body: at most ``max_body_bytes`` (413, from ``Content-Length`` before reading, or while reading), valid JSON
  (400), an object, text that is valid Unicode (a lone surrogate is a 400, not a tokenizer crash);
- requests in flight (a stream until it ends): at most ``max_in_flight`` (503 with ``Retry-After``), and routing work
  queued per lane at
  most ``max_waiting`` (429 with ``Retry-After``) rather than a queue that grows without bound.

Routing runs in worker threads, never on the event loop, in two lanes: prompts up to ``LONG_PROMPT`` tokens and
longer ones, each with its own threads, so a short prompt never waits behind a long prompt's routing.
"""

from __future__ import annotations

import hmac
import json
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from starlette.requests import Request

T = TypeVar("T")
LONG_PROMPT = 2048  # tokens: the Task Router's attention is quadratic in the prompt, so long prompts get a lane


class Refused(Exception):
    """A request the front refuses: ``status`` (4xx, or 503), an OpenAI-style error body, the ``reason`` it is
    counted under, and headers (``Retry-After``)."""

    def __init__(self, status: int, message: str, code: str = "invalid_request_error", reason: str = "bad_request",
                 headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.code, self.reason, self.headers = status, code, reason, headers or {}


def check_key(request: Request, key: str | None) -> None:
    """401 unless the request carries ``Authorization: Bearer <key>`` (nothing is checked without a key)."""
    if key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise Refused(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                      "invalid_api_key", "unauthorized")  # fmt: skip


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 once it is over ``limit`` bytes (announced or received); a client that goes away
    raises starlette's ``ClientDisconnect``."""
    too_large = Refused(413, f"the request body is over {limit} bytes", reason="body_too_large")
    announced = request.headers.get("content-length", "")
    if announced.isdigit() and int(announced) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def parse(raw: bytes) -> dict:
    """A JSON object whose text is valid Unicode, or a 400 that says what is wrong."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise Refused(400, f"the request body is not valid JSON: {err}", reason="invalid_json") from None
    except RecursionError:
        raise Refused(400, "the request body is nested too deeply", reason="invalid_json") from None
    if not isinstance(body, dict):
        raise Refused(400, "the request body must be a JSON object", reason="invalid_json")
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise Refused(400, "the request holds invalid text (a lone UTF-16 surrogate such as \\ud800)",
                      reason="invalid_text") from None  # fmt: skip
    except RecursionError:
        raise Refused(400, "the request body is nested too deeply", reason="invalid_json") from None
    return body


class Lane:
    """Worker threads for one kind of routing work, with a bound on the requests waiting for them."""

    def __init__(self, name: str, threads: int, max_waiting: int) -> None:
        self.name, self.max_waiting = name, max_waiting
        self.limiter = anyio.CapacityLimiter(threads)
        self.waiting = 0

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self.waiting >= self.limiter.total_tokens + self.max_waiting:
            raise Refused(429, f"the front is busy routing {self.name} prompts; retry shortly",
                          "rate_limit_exceeded", "busy", {"Retry-After": "1"})  # fmt: skip
        self.waiting += 1
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self.limiter)
        finally:
            self.waiting -= 1


class Admission:
    """How many requests the front holds at once, and the lanes its tokenizing and routing run in."""

    def __init__(self, max_in_flight: int = 256, max_waiting: int = 32, threads: int = 2) -> None:
        self.max_in_flight, self.in_flight = max_in_flight, 0
        self.short = Lane("short", threads, max_waiting)
        self.long = Lane("long", 1, max(1, max_waiting // 16))
        self.tokenizer_lock = threading.Lock()  # one fast tokenizer object, shared by the worker threads

    def admit(self) -> Callable[[], None]:
        """Count one request in, or refuse it with a 503 at the bound; returns the call that counts it out (once,
        when its response is done: a stream's when it ends)."""
        if self.in_flight >= self.max_in_flight:
            raise Refused(503, f"the front holds {self.in_flight} requests, its bound; retry shortly",
                          "service_unavailable", "overloaded", {"Retry-After": "1"})  # fmt: skip
        self.in_flight += 1
        done = False

        def release() -> None:
            nonlocal done
            if not done:
                done = True
                self.in_flight -= 1

        return release

    def lane(self, tokens: int) -> Lane:
        return self.long if tokens > LONG_PROMPT else self.short

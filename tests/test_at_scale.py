"""benchmarks/at_scale.py: the plan follows the protocol (grid first, seeds and remedies once the lr is chosen on
validation), and the head benchmark prints its result line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import at_scale  # noqa: E402

from tests.test_benchmarks import script  # noqa: E402


def finish(results: Path, name: str, val_rouge_l: float) -> None:
    folder = results / "families" / name
    folder.mkdir(parents=True)
    for kept in at_scale.KEPT:
        (folder / kept).write_text("{}")
    (folder / "val_metrics.json").write_text(json.dumps({"val": {"macro": {"rougeL": val_rouge_l}}}))


@pytest.fixture
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(at_scale, "RESULTS", tmp_path)
    return tmp_path


def names(protocol: str = "families") -> list[str]:
    return [r.name for r in at_scale.plan(protocol)[0]]


def test_plan_runs_the_grid_first_then_waits_for_the_choice(results: Path) -> None:
    runs, waiting = at_scale.plan("families")
    assert names()[:4] == ["orchmoe-lr0.003-seed0", "lora-lr0.003-seed0", "poly-lr0.01-seed0", "mhr-lr0.003-seed0"]
    assert len(runs) == 8 and all(r.seed == 0 for r in runs)
    assert len(waiting) == 4  # OrchMoE and LoRA seeds, two remedies


@pytest.mark.parametrize(("low", "high", "chosen"), [(30.0, 31.0, 3e-3), (31.0, 30.0, 1e-3), (30.0, 30.0, 1e-3)])
def test_lr_chosen_on_validation_then_seeds_and_remedies(results: Path, low: float, high: float, chosen: float) -> None:
    finish(results, "orchmoe-lr0.001-seed0", low)
    finish(results, "orchmoe-lr0.003-seed0", high)
    assert at_scale.chosen_lr("families", "orchmoe") == chosen  # a tie goes to the lower lr
    planned = {r.name: r for r in at_scale.plan("families")[0]}
    for seed in (1, 2):
        assert f"orchmoe-lr{chosen:g}-seed{seed}" in planned
    remedy = planned[f"orchmoe-alloc-fade-lr{chosen:g}-seed0"]
    cfg = at_scale.config_of("families", "data", remedy, "tiny-gemma3")
    assert cfg.method == "orchmoe" and cfg.allocation_lr == 0.1 and cfg.noise_scale_end == 0.0 and cfg.lr == chosen
    assert cfg.n_train == 128 and cfg.n_test == 50 and len(cfg.tasks) == 16 and len(cfg.held_out_tasks) == 5
    assert at_scale.chosen_lr("families", "lora") is None  # LoRA's grid is not finished


def test_head_benchmark_prints_its_result_line() -> None:
    done = script("head.py", "--model", "tiny-gemma3", "--length", "24", "--repeats", "1")
    assert done.stdout.strip().splitlines()[-1].startswith("RESULT full_over_supervised_lora=")

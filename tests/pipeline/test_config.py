"""defaults < preset < config file < flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchmoe.cli import _flags, build_parser
from orchmoe.pipeline.common import read_run_config
from orchmoe.pipeline.config import RunConfig, read_config_file, resolve


def flags(*argv: str) -> dict:
    return _flags(build_parser().parse_args(["train", "--out", "x", *argv]))


@pytest.mark.parametrize("suffix", [".yaml", ".toml", ".json"])
def test_flags_beat_file_beat_preset_beat_defaults(tmp_path: Path, suffix: str) -> None:
    body = {
        ".yaml": "lr: 0.02\nbatch-size: 4\nn_tasks: 3\n",
        ".toml": "lr = 0.02\nbatch-size = 4\nn_tasks = 3\n",
        ".json": '{"lr": 0.02, "batch-size": 4, "n_tasks": 3}',
    }[suffix]
    path = tmp_path / f"run{suffix}"
    path.write_text(body)
    cfg = resolve(flags("--n-tasks", "5", "--preset", "paper"), path)
    assert cfg.n_tasks == 5  # flag over file
    assert cfg.lr == 0.02  # file over preset (paper: 5e-5)
    assert cfg.batch_size == 4  # file over default
    assert cfg.epochs == 1.0 and cfg.schedule == "linear"  # preset
    assert cfg.n_train == RunConfig().n_train  # default


def test_preset_and_flags_without_file() -> None:
    cfg = resolve(flags("--preset", "paper"))
    assert cfg.lr == 5e-5
    cfg = resolve(flags("--preset", "paper", "--lr", "0.1", "--temperature", "2", "--target-modules", "q", "v"))
    assert cfg.lr == 0.1 and cfg.temperature == 2.0 and cfg.target_modules == ["q", "v"]


def test_preset_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("preset: sni-10\nn_train: 7\n")
    cfg = resolve(flags(), path)
    assert cfg.n_tasks == 10 and cfg.n_train == 7


@pytest.mark.parametrize(
    ("body", "suffix", "match"),
    [
        ("lrr: 1", ".yaml", "unknown option.*lrr"),
        ("lr = ", ".toml", "cannot parse"),
        ("- 1\n- 2\n", ".yaml", "must map option names"),
    ],
)
def test_bad_config_files(tmp_path: Path, body: str, suffix: str, match: str) -> None:
    path = tmp_path / f"c{suffix}"
    path.write_text(body)
    with pytest.raises(ValueError, match=match):
        read_config_file(path)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"method": "prefix"}, "--method"),
        ({"batch_size": 6, "grad_accum": 4}, "multiple of --grad-accum"),
        ({"n_train": 0}, "--n-train"),
        ({"lr": 0.0}, "--lr"),
        ({"noise_scale_end": -1.0}, "--noise-scale-end"),
        ({"allocation": "mixing", "noise_scale_end": 0.0}, "--allocation mixing has neither"),
        ({"allocation": "mixing", "temperature_end": 4.0}, "--allocation mixing has neither"),
        ({"preset": "huge"}, "Unknown preset"),
    ],
)
def test_impossible_run_configs(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        resolve(options)


@pytest.mark.parametrize(
    ("saved", "expected"),
    [
        ({"method": "lora", "rank": 3}, {"method": "lora", "r": 3}),  # an earlier version's config.json
        ({"method": "lora", "r": 3}, {"method": "lora", "r": 3}),
    ],
)
def test_saved_configs_of_earlier_versions_load(tmp_path: Path, saved: dict, expected: dict) -> None:
    options = {k: v for k, v in RunConfig().to_dict().items() if k != "r"} | saved
    (tmp_path / "config.json").write_text(json.dumps(options))
    cfg = read_run_config(tmp_path)
    assert {k: getattr(cfg, k) for k in expected} == expected
    (tmp_path / "run.yaml").write_text("".join(f"{k}: {v}\n" for k, v in saved.items()))
    assert {k: getattr(resolve({}, tmp_path / "run.yaml"), k) for k in expected} == expected

"""The trainer's schedules (the training loop itself runs in test_end_to_end and test_reliability)."""

from __future__ import annotations

import pytest

from orchmoe.pipeline.config import RunConfig
from orchmoe.pipeline.trainer import relaxation_at


@pytest.mark.parametrize(
    ("options", "progress", "expected"),
    [
        ({}, 0.5, {"temperature": None, "noise_scale": None}),
        ({"temperature": 1.0, "temperature_end": 8.0}, 0.0, {"temperature": 1.0, "noise_scale": None}),
        ({"temperature": 1.0, "temperature_end": 8.0}, 1 / 3, {"temperature": 2.0, "noise_scale": None}),  # geometric
        ({"temperature": 1.0, "temperature_end": 8.0}, 1.0, {"temperature": 8.0, "noise_scale": None}),
        ({"noise_scale_end": 0.0}, 0.0, {"temperature": None, "noise_scale": 1.0}),
        ({"noise_scale_end": 0.0}, 0.25, {"temperature": None, "noise_scale": 0.75}),  # linear
        ({"noise_scale_end": 0.0}, 1.0, {"temperature": None, "noise_scale": 0.0}),
        (
            {"temperature": 4.0, "temperature_end": 1.0, "noise_scale_end": 0.5},
            0.5,
            {"temperature": 2.0, "noise_scale": 0.75},
        ),
    ],
)
def test_relaxation_schedule(options: dict, progress: float, expected: dict) -> None:
    got = relaxation_at(RunConfig(**options), progress)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == (None if value is None else pytest.approx(value))

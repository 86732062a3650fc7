"""The Skill Router's relaxation schedule (orchmoe.training.RelaxationSchedule), used by the trainers and the harness
(the training loops themselves run in test_training, test_end_to_end and test_reliability)."""

from __future__ import annotations

import pytest

from orchmoe.training import RelaxationSchedule


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
def test_relaxation_schedule_values(options: dict, progress: float, expected: dict) -> None:
    schedule = RelaxationSchedule(options.get("temperature_end"), options.get("noise_scale_end"))
    got = schedule.at(options.get("temperature", 1.0), progress)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == (None if value is None else pytest.approx(value))


@pytest.mark.parametrize(("options", "match"), [({"temperature_end": 0.0}, "temperature_end"),
                                                ({"noise_scale_end": -1.0}, "noise_scale_end")])  # fmt: skip
def test_impossible_schedules_are_rejected(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RelaxationSchedule(**options)

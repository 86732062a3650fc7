"""The data order of a run (``orchmoe.pipeline.batches``): fixed by the seed alone, full batches, every example once
per pass, and the step count a config asks for."""

from __future__ import annotations

import pytest

from orchmoe.pipeline.batches import FixedBatches, batch_order, total_steps
from orchmoe.pipeline.config import RunConfig


def test_the_order_is_the_seeds_and_every_pass_sees_each_example_once() -> None:
    batches = batch_order(n_examples=10, batch_size=4, steps=5, seed=3)
    assert batches == batch_order(10, 4, 5, 3)  # a resumed run recomputes exactly these
    assert batches != batch_order(10, 4, 5, 4)
    assert [len(b) for b in batches] == [4] * 5  # full global batches, even across a pass boundary
    stream = [i for b in batches for i in b]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert batch_order(10, 4, 3, 3) == batches[:3]  # fewer steps: a prefix of the same order


def test_fixed_batches_yield_them_in_order() -> None:
    batches = batch_order(7, 2, 4, 0)
    sampler = FixedBatches(batches, 2)
    assert list(sampler) == batches and len(sampler) == 4 and sampler.batch_size == 2


@pytest.mark.parametrize(
    ("epochs", "max_steps", "n_examples", "batch_size", "expected"),
    [(1, 0, 2000, 8, 250), (1, 0, 2001, 8, 251), (2.5, 0, 10, 4, 7), (3, 5, 100, 8, 5), (1, 0, 1, 8, 1)],
)
def test_total_steps(epochs: float, max_steps: int, n_examples: int, batch_size: int, expected: int) -> None:
    cfg = RunConfig(epochs=epochs, max_steps=max_steps, batch_size=batch_size)
    assert total_steps(cfg, n_examples) == expected

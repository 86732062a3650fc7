"""SNI's ROUGE / exact match on hand-checked pairs, and the routing agreement scores."""

from __future__ import annotations

import numpy as np
import pytest

from orchmoe.pipeline import metrics
from orchmoe.pipeline.metrics import normalize_answer, routing_agreement, score, score_example


@pytest.mark.parametrize(
    ("prediction", "references", "expected"),
    [
        # 5 of 6 unigrams shared, LCS 5 of 6: F = 5/6
        ("the cat sat on the mat", ["the cat is on the mat"], {"rouge1": 250 / 3, "rougeL": 250 / 3, "exact_match": 0}),
        # same bag of words, reversed order: LCS 1 of 4
        ("a b c d", ["d c b a"], {"rouge1": 100, "rougeL": 25}),
        # sentences swapped: ROUGE-L sees one sequence (LCS 2/4), ROUGE-Lsum scores per sentence
        ("a b\nc d", ["c d\na b"], {"rougeL": 50, "rougeLsum": 100}),
        ("running fast", ["run fast"], {"rouge1": 100, "exact_match": 0}),  # Porter stemmer
        ("The Answer!", ["answer"], {"exact_match": 100}),  # normalised exact match
        ("blue", ["red", "blue sky"], {"rouge1": 200 / 3}),  # max over references
        ("", ["anything"], {"rouge1": 0, "exact_match": 0}),
    ],
)
def test_score_example(prediction: str, references: list[str], expected: dict[str, float]) -> None:
    got = score_example(prediction, references)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


def test_macro_average_weights_tasks_equally() -> None:
    result = score(["5", "x", "x", "x"], [["5"], ["5"], ["5"], ["y"]], ["a", "b", "b", "b"])
    assert result["per_task"]["a"]["exact_match"] == 100
    assert result["per_task"]["b"]["exact_match"] == 0
    assert result["macro"]["exact_match"] == 50


def test_normalize_answer() -> None:
    assert normalize_answer("  The  quick, brown FOX. ") == "quick brown fox"


@pytest.mark.parametrize(
    ("assigned", "purity", "consistency", "nmi", "used"),
    [
        ([0, 0, 1, 1, 2, 2], 1.0, 1.0, 1.0, 3),
        ([2, 2, 0, 0, 1, 1], 1.0, 1.0, 1.0, 3),  # labels of abstract tasks do not matter
        ([0, 0, 0, 0, 0, 0], 1 / 3, 1.0, 0.0, 1),  # collapse: consistent but useless
        ([0, 0, 0, 0, 1, 1], 2 / 3, 1.0, None, 2),  # two tasks share an abstract task
        ([0, 1, 0, 1, 2, 2], 2 / 3, 2 / 3, None, 3),
    ],
)
def test_routing_agreement(
    assigned: list[int], purity: float, consistency: float, nmi: float | None, used: int
) -> None:
    weights = np.eye(3)[assigned] * 0.5 + 0.1
    got = routing_agreement(weights, list("aabbcc"))
    assert got["purity"] == pytest.approx(purity)
    assert got["consistency"] == pytest.approx(consistency)
    assert got["abstract_tasks_used"] == used and got["collapsed"] == (used == 1)
    assert routing_agreement(weights[:2], ["a", "a"])["nmi"] is None  # a single true task: undefined
    if nmi is not None:
        assert got["nmi"] == pytest.approx(nmi, abs=1e-9)
    else:
        assert 0 < got["nmi"] < 1


def noisy_scores(seed: int, tasks: int = 10, per_task: int = 10, shift: float = 0.0) -> dict[tuple[str, str], float]:
    rng = np.random.default_rng(seed)
    return {(f"task{t}", str(i)): float(np.clip(rng.normal(40 + 3 * t + shift, 25), 0, 100))
            for t in range(tasks) for i in range(per_task)}  # fmt: skip


def test_a_difference_zero_by_construction_has_an_interval_that_holds_zero() -> None:
    """b: a's scores shuffled within each task (the same per-task means, so the macro difference is exactly 0, while
    every example differs)."""
    a = noisy_scores(0)
    rng = np.random.default_rng(1)
    b = {}
    for task in sorted({t for t, _ in a}):
        keys = [k for k in a if k[0] == task]
        for key, other in zip(keys, rng.permutation(keys), strict=True):
            b[key] = a[tuple(other)]
    diff, low, high = metrics.macro_interval(a, b)
    assert diff == pytest.approx(0.0, abs=1e-9) and low < 0 < high and high - low > 2.0


@pytest.mark.parametrize(("shift", "resolved"), [(15.0, True), (0.5, False)])
def test_a_planted_difference_is_resolved_only_when_larger_than_the_noise(shift: float, resolved: bool) -> None:
    b = noisy_scores(0)
    rng = np.random.default_rng(2)
    a = {k: v + shift + rng.normal(0, 10) for k, v in b.items()}  # every example `shift` higher, plus noise
    diff, low, high = metrics.macro_interval(a, b)
    assert low < diff < high and (not low <= 0 <= high) == resolved


def test_the_bootstrapped_macro_is_the_macro_the_scores_report() -> None:
    rows = [{"task": f"t{i % 3}", "id": i, "prediction": "the cat sat" if i % 2 else "a dog", "references": ["the cat"]}
            for i in range(12)]  # fmt: skip
    value, low, high = metrics.macro_interval(metrics.example_scores(rows))
    reported = metrics.score(
        [r["prediction"] for r in rows], [r["references"] for r in rows], [r["task"] for r in rows]
    )
    assert value == pytest.approx(reported["macro"]["rougeL"]) and low <= value <= high
    with pytest.raises(ValueError, match="same test examples"):
        metrics.macro_interval(metrics.example_scores(rows), metrics.example_scores(rows[:-1]))

"""The built-in task suite: deterministic, in the SNI layout, exact answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchmoe.data import read_task, select, write_suite
from orchmoe.data.suite import TEST_TASKS, TRAIN_TASKS, number_words


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    a, b, c = (write_suite(tmp_path / name, seed=s, n_instances=30) for name, s in (("a", 1), ("b", 1), ("c", 2)))
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == len(TRAIN_TASKS) + len(TEST_TASKS) + 2
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files if f.suffix == ".json")


@pytest.mark.parametrize("name", sorted({**TRAIN_TASKS, **TEST_TASKS}))
def test_every_task_reads_back_with_distinct_inputs(tmp_path: Path, name: str) -> None:
    root = write_suite(tmp_path, seed=0, n_instances=40)
    task = read_task(root / "tasks" / f"{name}.json")
    assert len(task.instances) == 40 and len(task.positive_examples) == 2
    assert len({i.input for i in task.instances}) == 40
    assert all(i.outputs[0] for i in task.instances)


@pytest.mark.parametrize(
    ("name", "input_", "answer"),
    [
        ("suite001_addition", "12 + 35", "47"),
        ("suite005_sort_numbers", "9, 2, 5", "2, 5, 9"),
        ("suite010_maximum", "9, 2, 5", "9"),
        ("suite101_minimum", "9, 2, 5", "2"),
        ("suite003_reverse_word", "stone", "enots"),
    ],
)
def test_answers_are_exact(tmp_path: Path, name: str, input_: str, answer: str) -> None:
    """Each generated instance's answer is what the task's rule gives (checked on every instance)."""
    root = write_suite(tmp_path, seed=3, n_instances=60)
    rules = {
        "suite001_addition": lambda s: str(sum(int(x) for x in s.split(" + "))),
        "suite005_sort_numbers": lambda s: ", ".join(map(str, sorted(int(x) for x in s.split(", ")))),
        "suite010_maximum": lambda s: str(max(int(x) for x in s.split(", "))),
        "suite101_minimum": lambda s: str(min(int(x) for x in s.split(", "))),
        "suite003_reverse_word": lambda s: s[::-1],
    }
    rule = rules[name]
    assert rule(input_) == answer
    for inst in read_task(root / "tasks" / f"{name}.json").instances:
        assert inst.outputs == (rule(inst.input),)


def test_number_words() -> None:
    assert [number_words(n) for n in (0, 13, 20, 42, 99)] == ["zero", "thirteen", "twenty", "forty-two", "ninety-nine"]


def test_the_sni_loader_reads_the_suite(tmp_path: Path) -> None:
    root = write_suite(tmp_path, seed=0, n_instances=30, n_train_tasks=2)
    sel = select(root, n_tasks=2, n_train=10, n_test=5, seed=0, n_unseen=2)
    assert sorted(sel.train_tasks) == ["suite001_addition", "suite002_count_words"]
    assert sorted(sel.unseen_tasks) == sorted(TEST_TASKS)

"""The SNI loader on task files the tests write themselves, and on ../shared/sni when present."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchmoe.data import SNIDataError, format_prompt, read_task, select

SHARED_SNI = Path(__file__).resolve().parents[3] / "shared" / "sni"


def task_dict(n: int = 6, definition: object = ("Do the thing.",)) -> dict:
    return {
        "Definition": list(definition) if isinstance(definition, tuple) else definition,
        "Positive Examples": [{"input": "x1", "output": "y1"}, {"input": "x2", "output": "y2"}],
        "Instances": [{"id": f"i{k}", "input": f"in {k}", "output": [f"out {k}", f"alt {k}"]} for k in range(n)],
    }


def make_dir(root: Path, tasks: dict[str, object], train: list[str], test: list[str]) -> Path:
    (root / "tasks").mkdir(parents=True)
    (root / "splits" / "default").mkdir(parents=True)
    for name, content in tasks.items():
        data = content if isinstance(content, (str, bytes)) else json.dumps(content)
        mode = "wb" if isinstance(data, bytes) else "w"
        with open(root / "tasks" / f"{name}.json", mode) as f:
            f.write(data)
    (root / "splits" / "default" / "train_tasks.txt").write_text("\n".join(train))
    (root / "splits" / "default" / "test_tasks.txt").write_text("\n".join(test))
    return root


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    tasks = {f"task{i:03d}_t": task_dict(8) for i in range(6)}
    return make_dir(tmp_path, tasks, [f"task{i:03d}_t" for i in range(5)] + ["task999_absent"], ["task005_t"])


def test_read_task_and_prompt(data_dir: Path) -> None:
    task = read_task(data_dir / "tasks" / "task000_t.json")
    assert task.definition == "Do the thing." and len(task.instances) == 8
    assert task.instances[0].outputs == ("out 0", "alt 0")
    assert format_prompt(task, "hello") == "Definition: Do the thing.\n\nInput: hello\nOutput:"
    two_shot = format_prompt(task, "hello", k_shot=2)
    assert "Positive Example 2:\nInput: x2\nOutput: y2\n\nInput: hello\nOutput:" in two_shot


def test_selection_is_seeded_and_splits_are_fixed(data_dir: Path) -> None:
    a = select(data_dir, n_tasks=3, n_train=4, n_test=2, seed=7, n_unseen=1)
    b = select(data_dir, n_tasks=3, n_train=4, n_test=2, seed=7, n_unseen=1)
    assert a == b
    assert a.missing_from_split == 1 and a.unseen_tasks == ["task005_t"]
    assert len(a.train) == 12 and len(a.test) == 6 and len(a.unseen) == 2
    for name in a.train_tasks:
        test_ids = [e.id for e in a.test if e.task == name]
        train_ids = {e.id for e in a.train if e.task == name}
        assert test_ids == ["i0", "i1"]  # the first n_test instances
        assert not train_ids & set(test_ids)
    assert a.train[0].target == "out " + a.train[0].id[1:] and len(a.train[0].references) == 2
    others = {tuple(select(data_dir, 3, 4, 2, seed=s).train_tasks) for s in range(8)}
    assert len(others) > 1  # the seed matters


def test_validation_instances_leave_the_training_sample_alone(data_dir: Path) -> None:
    plain = select(data_dir, n_tasks=3, n_train=3, n_test=2, seed=1)
    with_val = select(data_dir, n_tasks=3, n_train=3, n_test=2, seed=1, n_val=2)
    assert plain.val == [] and with_val.train == plain.train and with_val.test == plain.test
    assert len(with_val.val) == 6
    for name in with_val.train_tasks:
        val = [e.id for e in with_val.val if e.task == name]
        used = {e.id for e in with_val.train + with_val.test if e.task == name}
        assert len(val) == 2 and not used & set(val)
    short = select(data_dir, n_tasks=3, n_train=5, n_test=2, seed=1, n_val=2)  # 8 instances: 1 left per task
    assert short.train == select(data_dir, n_tasks=3, n_train=5, n_test=2, seed=1).train and len(short.val) == 3


@pytest.mark.parametrize(("n_val", "n_extra", "per_task"), [(1, 1, 1), (1, 5, 2), (0, 2, 2), (2, 1, 1)])
def test_extra_test_instances_leave_the_training_sample_and_validation_alone(
    data_dir: Path, n_val: int, n_extra: int, per_task: int
) -> None:
    plain = select(data_dir, n_tasks=3, n_train=3, n_test=2, seed=1, n_unseen=1, n_val=n_val)
    more = select(data_dir, n_tasks=3, n_train=3, n_test=2, seed=1, n_unseen=1, n_val=n_val, n_extra=n_extra)
    assert (more.train, more.test, more.val, more.unseen) == (plain.train, plain.test, plain.val, plain.unseen)
    assert plain.extra_test == [] and plain.extra_unseen == []
    for name in more.train_tasks:  # 8 instances: 2 test + 3 train leave 3 for validation and extra
        extra = {e.id for e in more.extra_test if e.task == name}
        used = {e.id for e in more.train + more.test + more.val if e.task == name}
        assert len(extra) == per_task and not used & extra
    unseen_ids = [e.id for e in more.extra_unseen]
    assert unseen_ids == [f"i{i}" for i in range(2, 2 + min(n_extra, 6))]  # the unseen task's next instances


def test_named_tasks(data_dir: Path) -> None:
    sel = select(data_dir, n_tasks=0, n_train=3, n_test=2, tasks=["task001_t", "task003_t"])
    assert sel.train_tasks == ["task001_t", "task003_t"]
    with pytest.raises(SNIDataError, match="no task file for task777"):
        select(data_dir, n_tasks=0, n_train=3, n_test=2, tasks=["task777"])


BAD_TASKS = [
    ("{not json", "invalid JSON at line 1"),
    (b'{"Definition": ["caf\xe9"]}', "not valid UTF-8"),
    ('{"Definition": ["d"], "Instances": [{"id": "a", "input": "x", "output": ["y"]}', "invalid JSON"),
    ({"Instances": task_dict()["Instances"]}, "Definition is missing"),
    (task_dict(definition=[]), "Definition is missing"),
    ({"Definition": ["d"]}, "Instances is missing or empty"),
    ({"Definition": ["d"], "Instances": []}, "Instances is missing or empty"),
    ({"Definition": ["d"], "Instances": [{"id": "q1", "input": "x", "output": []}]}, r"\(q1\) has an empty output"),
    ({"Definition": ["d"], "Instances": [{"id": "q2", "output": ["y"]}]}, r"\(q2\) has no input"),
    ({"Definition": ["d"], "Instances": ["text"]}, "is not an object"),
    ([1, 2], "expected a JSON object"),
]


@pytest.mark.parametrize(("content", "message"), BAD_TASKS)
def test_bad_task_file_names_the_file_and_the_problem(tmp_path: Path, content: object, message: str) -> None:
    root = make_dir(tmp_path, {"task000_bad": content, "task001_ok": task_dict()}, ["task000_bad", "task001_ok"], [])
    with pytest.raises(SNIDataError, match=message) as err:
        read_task(root / "tasks" / "task000_bad.json")
    assert "task000_bad.json" in str(err.value)
    # a selection that draws the malformed task fails instead of dropping it
    with pytest.raises(SNIDataError, match=r"task000_bad\.json"):
        select(root, n_tasks=2, n_train=1, n_test=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_tasks": 9}, "asked for 9 training tasks but split 'default' has only 5"),
        ({"n_tasks": 2, "n_unseen": 3}, "asked for 3 unseen tasks"),
        ({"n_tasks": 2, "split": "xlingual"}, r"no such split .available: default"),
        ({"n_tasks": 2, "n_test": 8}, "need more than the 8 held out"),
    ],
)
def test_impossible_requests(data_dir: Path, kwargs: dict, message: str) -> None:
    args = {"n_train": 2, "n_test": 2, **kwargs}
    with pytest.raises(SNIDataError, match=message):
        select(data_dir, **args)


def test_missing_task_file(tmp_path: Path) -> None:
    with pytest.raises(SNIDataError, match="task file not found"):
        read_task(tmp_path / "nope.json")


@pytest.mark.skipif(not SHARED_SNI.is_dir(), reason="../shared/sni is not present")
def test_real_sni_subset_reads_and_selects() -> None:
    sel = select(SHARED_SNI, n_tasks=10, n_train=8, n_test=4, seed=0, n_unseen=3)
    assert len(sel.train_tasks) == 10 and len(sel.unseen_tasks) == 3
    assert len(sel.test) == 40 and len(sel.unseen) == 12
    assert all(e.prompt.startswith("Definition: ") and e.prompt.endswith("\nOutput:") for e in sel.test)

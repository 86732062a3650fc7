"""Own data: prompt/completion rows from JSONL, CSV, Parquet or a saved datasets directory."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset

from orchmoe.cli import main
from orchmoe.data.files import file_selection, read_rows
from orchmoe.data.sni import SNIDataError

ROWS = [{"prompt": f"Add: {i} + {i} =", "completion": str(2 * i), "task": "add" if i % 2 else "double"}
        for i in range(20)]  # fmt: skip


def write(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.csv", "rows.parquet", "saved_dataset"])
def test_every_format_reads_the_same_examples(tmp_path: Path, name: str) -> None:
    examples = read_rows(write(tmp_path / name, ROWS))
    assert [(e.prompt, e.target, e.task) for e in examples] == [(r["prompt"], r["completion"], r["task"]) for r in ROWS]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "c"\n', r"line 2: not valid JSON"),
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": ""}\n', r"line 2: 'completion' must"),
        ('{"prompt": 3, "completion": "b"}\n', r"line 1: 'prompt' must be non-empty text"),
        ('["a", "b"]\n', r"line 1: expected an object"),
        ('{"prompt": "a", "completion": "b", "task": 7}\n', r"line 1: 'task' must be text"),
        ("\n", r"no rows"),
    ],
)
def test_a_malformed_row_is_named(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(SNIDataError, match=match) as err:
        read_rows(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("bad.csv", b"prompt,completion\na,b\nc,d,e\n", r"bad\.csv, line 3: 3 fields, but the header names 2"),
        ("bad.csv", b"prompt,completion\na,b\nc,\n", r"bad\.csv, line 3: 'completion' must be non-empty text"),
        ("bad.csv", b"prompt,completion\na,b\n\xff\xfe,d\n", r"bad\.csv, line 3: not valid UTF-8"),
        ("bad.parquet", b"PAR1 this is not parquet", r"bad\.parquet: not a readable Parquet file"),
    ],
)
def test_a_malformed_csv_or_parquet_file_is_named_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, name: str, content: bytes, match: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SNIDataError, match=match):
        read_rows(path)
    code = main(["train", "--out", str(tmp_path / "run"), "--data", str(path), "--model", "tiny-gemma3", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(path) in err[0]


def test_held_out_fraction_or_a_second_file(tmp_path: Path) -> None:
    train = write(tmp_path / "train.jsonl", ROWS)
    a = file_selection(train, None, 0.25, seed=0)
    assert len(a.test) == 5 and len(a.train) == 15 and {e.id for e in a.test}.isdisjoint(e.id for e in a.train)
    assert [e.id for e in file_selection(train, None, 0.25, seed=0).test] == [e.id for e in a.test]  # seeded
    b = file_selection(train, write(tmp_path / "eval.csv", ROWS[:3]), 0.25, seed=0)
    assert len(b.train) == 20 and [e.prompt for e in b.test] == [r["prompt"] for r in ROWS[:3]]
    assert b.train_tasks == ["add", "double"] and not b.unseen


def test_train_and_eval_on_own_data_and_nothing_is_lost_on_a_bad_row(tmp_path: Path, capsys) -> None:
    data = write(tmp_path / "rows.jsonl", ROWS)
    out = tmp_path / "run"
    args = ["--data", str(data), "--model", "tiny-gemma3", "--max-steps", "2", "--eval-fraction", "0.2", "--quiet"]
    assert main(["train", "--out", str(out), *args]) == 0
    assert main(["eval", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["seen"]["macro"] and "unseen" not in metrics
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    code = main(["train", "--out", str(out), "--overwrite", "--data", str(tmp_path / "bad.jsonl"),
                 "--model", "tiny-gemma3", "--quiet"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl, line 2" in err[0]
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # the earlier run is untouched

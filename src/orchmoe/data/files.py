"""A user's own data: prompt/completion rows from JSONL, CSV, Parquet or a saved ``datasets`` directory.

Each row has ``prompt`` and ``completion`` (non-empty text) and optionally ``task``, a name used only to analyse the
routing afterwards (OrchMoE never sees it). A malformed row stops the run with one line naming the file and the row.
"""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path
from typing import Any

from .._extras import require
from .sni import Example, Selection, SNIDataError

DEFAULT_TASK = "data"


def _records(path: Path) -> list[tuple[str, Any]]:
    """(row label, raw record) of every row in ``path``."""
    if path.is_dir():
        require("harness", f"Reading the datasets directory {path}")
        from datasets import load_from_disk

        data = load_from_disk(str(path))
        if hasattr(data, "keys"):  # a DatasetDict: its "train" split
            if "train" not in data:
                raise SNIDataError(f"{path}: a DatasetDict without a 'train' split ({', '.join(data)}).")
            data = data["train"]
        return [(f"row {i}", row) for i, row in enumerate(data)]
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((f"line {i}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise SNIDataError(f"{path}, line {i}: not valid JSON ({err.msg}).") from err
        return rows
    if suffix == ".csv":
        return _csv_records(path)
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as err:
            raise SNIDataError(f"{path}: not a readable Parquet file ({' '.join(str(err).split())}).") from err
        return [(f"row {i}", row) for i, row in enumerate(table.to_pylist())]
    raise SNIDataError(f"{path}: unknown format; use .jsonl, .csv, .parquet or a `datasets` save_to_disk directory.")


def _csv_records(path: Path) -> list[tuple[str, Any]]:
    """CSV rows under their header, each labelled with the line it ends on; a malformed one is named."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise SNIDataError(f"{path}, line {line}: not valid UTF-8 ({err.reason} at byte {err.start}).") from err
    rows = []
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            label = f"line {reader.line_num}"
            if None in row:  # more fields than the header names
                n_header = len(reader.fieldnames or [])
                raise SNIDataError(f"{path}, {label}: {n_header + len(row[None])} fields, but the header names "
                                   f"{n_header}.")  # fmt: skip
            rows.append((label, row))
    except csv.Error as err:
        raise SNIDataError(f"{path}, line {reader.line_num}: not valid CSV ({err}).") from err
    return rows


def read_rows(path: str | Path) -> list[Example]:
    """Validated examples of a prompt/completion file, in file order."""
    path = Path(path)
    if not path.exists():
        raise SNIDataError(f"{path}: no such file or directory.")
    examples = []
    for label, row in _records(path):
        if not isinstance(row, dict):
            raise SNIDataError(f"{path}, {label}: expected an object with 'prompt' and 'completion'.")
        for key in ("prompt", "completion"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise SNIDataError(f"{path}, {label}: '{key}' must be non-empty text, got {row.get(key)!r}.")
        task = row.get("task") or DEFAULT_TASK
        if not isinstance(task, str):
            raise SNIDataError(f"{path}, {label}: 'task' must be text, got {task!r}.")
        completion = row["completion"].strip()
        examples.append(Example(task, label, row["prompt"], completion, (completion,)))
    if not examples:
        raise SNIDataError(f"{path}: no rows.")
    return examples


def file_selection(train: str | Path, eval_file: str | Path | None, eval_fraction: float, seed: int) -> Selection:
    """Training and test examples from files: a second file for evaluation, or a seeded held-out fraction."""
    examples = read_rows(train)
    if eval_file is not None:
        test = read_rows(eval_file)
    else:
        order = list(range(len(examples)))
        random.Random(f"holdout:{seed}").shuffle(order)
        n_test = round(eval_fraction * len(examples))
        if eval_fraction > 0 and not 0 < n_test < len(examples):
            raise SNIDataError(f"{train}: {len(examples)} rows cannot be split with --eval-fraction {eval_fraction}.")
        held = set(order[:n_test])
        test = [e for i, e in enumerate(examples) if i in held]
        examples = [e for i, e in enumerate(examples) if i not in held]
    tasks = sorted({e.task for e in examples})
    return Selection(train_tasks=tasks, unseen_tasks=[], train=examples, test=test)

"""Finished runs for the at-scale benchmark's tests (``benchmarks/at_scale*.py``, ``benchmarks/report.py``), each with
the files a finished run keeps, put in the results tree of the ``results`` fixture (``tests/conftest.py``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import at_scale  # noqa: E402
import at_scale_store  # noqa: E402


def finish(results: Path, name: str, val_rouge_l: float, protocol: str = "families") -> Path:
    """A finished run (its kept files, empty but its validation R-L): its folder."""
    folder = results / protocol / name
    folder.mkdir(parents=True)
    for kept in at_scale_store.KEPT:
        (folder / kept).write_text("{}")
    (folder / "val_metrics.json").write_text(json.dumps({"val": {"macro": {"rougeL": val_rouge_l}}}))
    return folder


def scored(
    results: Path, name: str, val: float, test: float | dict[str, float], routers: dict | None = None,
    protocol: str = "families",
) -> None:  # fmt: skip
    """A finished run with its test scores: every score ``test`` on every split, or {split: score} on those named."""
    folder = finish(results, name, val, protocol)
    splits = test if isinstance(test, dict) else dict.fromkeys(at_scale.SETS, test)
    (folder / "metrics.json").write_text(
        json.dumps({s: {"macro": dict.fromkeys(at_scale.SCORES, v)} for s, v in splits.items()})
    )
    if routers is not None:
        (folder / at_scale_store.ROUTERS).write_text(json.dumps(routers))

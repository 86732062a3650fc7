"""Paired comparison of two methods over seeds: per-seed differences of macro ROUGE-L, seen and unseen.

Seeds draw the tasks, so scores swing by several points between seeds; the per-seed difference between two methods
trained on the same draw is the quantity that says which one leads. Reads each run's ``extended_metrics.json``
(``--file metrics.json`` for the 5-instance test sets).

    python benchmarks/paired.py --a runs/quality/lr-sweep/orchmoe-router1-lr0.003-seed{0,1,2} \\
        --b runs/quality/lr-sweep/lora-lr0.003-seed{0,1,2}
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

SPLITS = ("seen", "unseen")


def macro_rouge_l(run: Path, file: str) -> dict[str, float]:
    """Macro ROUGE-L of one finished run on each split: {split: score}."""
    path = run / file
    if not path.is_file():
        raise SystemExit(f"{path}: missing (finish and score the run first).")
    scores: dict[str, Any] = json.loads(path.read_text())
    return {split: float(scores[split]["macro"]["rougeL"]) for split in SPLITS}


def seed_of(run: Path) -> str:
    config = json.loads((run / "config.json").read_text())
    return str(config["seed"])


def summary(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:+.2f}"
    return f"{statistics.mean(values):+.2f} ± {statistics.stdev(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", nargs="+", type=Path, required=True, help="run directories of method A")
    parser.add_argument("--b", nargs="+", type=Path, required=True, help="run directories of method B, same seeds")
    parser.add_argument("--file", default="extended_metrics.json", help="scores file in each run directory")
    args = parser.parse_args()

    a = {seed_of(run): macro_rouge_l(run, args.file) for run in args.a}
    b = {seed_of(run): macro_rouge_l(run, args.file) for run in args.b}
    if a.keys() != b.keys():
        raise SystemExit(f"--a has seeds {sorted(a)} but --b has seeds {sorted(b)}: pair runs of the same seeds.")
    print("| seed | " + " | ".join(f"{s} R-L A | {s} R-L B | {s} A - B" for s in SPLITS) + " |")
    print("|---|" + "---|" * 3 * len(SPLITS))
    for seed in sorted(a, key=int):
        cells = [f"{a[seed][s]:.2f} | {b[seed][s]:.2f} | {a[seed][s] - b[seed][s]:+.2f}" for s in SPLITS]
        print(f"| {seed} | " + " | ".join(cells) + " |")
    diffs = {s: [a[seed][s] - b[seed][s] for seed in a] for s in SPLITS}
    wins = {s: sum(d > 0 for d in diffs[s]) for s in SPLITS}
    print(
        "RESULT "
        + " ".join(f"{s}_diff={summary(diffs[s]).replace(' ', '')} {s}_a_ahead={wins[s]}/{len(a)}" for s in SPLITS)
    )


if __name__ == "__main__":
    main()

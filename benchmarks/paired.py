"""Paired comparison of two methods over seeds: per-seed differences of every macro score, on every split.

Seeds draw the tasks and the training examples, so scores swing by several points between seeds; the per-seed
difference between two methods trained on the same draw is the quantity that says which one leads. Reads each run's
``extended_metrics.json`` (``--file metrics.json`` for the 5-instance test sets and the at-scale runs), with the
splits it holds (seen, held_out, unseen) and the scores it holds (ROUGE-1, ROUGE-L, ROUGE-Lsum, exact match).

    python benchmarks/paired.py --a runs/quality/lr-sweep/orchmoe-router1-lr0.003-seed{0,1,2} \\
        --b runs/quality/lr-sweep/lora-lr0.003-seed{0,1,2}
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

SPLITS = ("seen", "held_out", "unseen")
SCORES = {"rouge1": "R-1", "rougeL": "R-L", "rougeLsum": "R-Lsum", "exact_match": "EM"}
Scores = dict[str, dict[str, float]]  # {split: {score: macro value}}


def macro_scores(run: Path, file: str) -> Scores:
    """Every macro score of one finished run on each split its scores file holds."""
    path = run / file
    if not path.is_file():
        raise SystemExit(f"{path}: missing (finish and score the run first).")
    return as_scores(json.loads(path.read_text()))


def as_scores(found: dict[str, Any]) -> Scores:
    """The macro scores of a scores file's content ({split: {"macro": {score: value}, ...}, ...})."""
    return {s: {k: float(v) for k, v in found[s]["macro"].items() if k in SCORES} for s in SPLITS if s in found}


def seed_of(run: Path) -> int:
    return int(json.loads((run / "config.json").read_text())["seed"])


def summary(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:+.2f}"
    return f"{statistics.mean(values):+.2f} ± {statistics.stdev(values):.2f}"


def standing(diffs: list[float]) -> str:
    """A against B over paired seeds: "leads" when ahead at every seed, "trails" when behind at every seed."""
    if all(d > 0 for d in diffs):
        return "leads"
    return "trails" if all(d < 0 for d in diffs) else "mixed"


def interval(diffs: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """The mean of paired per-seed differences and its t-interval (n - 1 degrees of freedom): (mean, low, high)."""
    from scipy import stats

    mean = statistics.mean(diffs)
    half = stats.t.ppf((1 + level) / 2, len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return mean, mean - half, mean + half


def word(low: float, high: float) -> str:
    """A against B, from the interval of their mean paired difference (``interval``): "helps" when it lies above 0,
    "hurts" when below, "ties" when it holds 0 (not resolved at this many seeds)."""
    return "helps" if low > 0 else "hurts" if high < 0 else "ties"


def differences(a: dict[int, Scores], b: dict[int, Scores]) -> dict[tuple[str, str], list[float]]:
    """A - B per seed (in seed order) for each (split, score) that every run of both holds."""
    seeds = sorted(a)
    if seeds != sorted(b):
        raise SystemExit(f"A has seeds {seeds} but B has seeds {sorted(b)}: pair runs of the same seeds.")
    runs = [a[s] for s in seeds] + [b[s] for s in seeds]
    return {
        (split, score): [a[s][split][score] - b[s][split][score] for s in seeds]
        for split in SPLITS
        if all(split in r for r in runs)
        for score in SCORES
        if all(score in r[split] for r in runs)
    }


def difference_table(a: dict[int, Scores], b: dict[int, Scores]) -> list[str]:
    """Markdown: each split and score, A - B as mean ± sd over seeds, how many seeds A leads at, and each seed's."""
    lines = ["| split | score | A - B (mean ± sd) | A ahead | per seed (" + ", ".join(map(str, sorted(a))) + ") |",
             "|---|---|---|---|---|"]  # fmt: skip
    for (split, score), diffs in differences(a, b).items():
        per_seed = ", ".join(f"{d:+.2f}" for d in diffs)
        lines.append(f"| {split} | {SCORES[score]} | {summary(diffs)} | {sum(d > 0 for d in diffs)}/{len(diffs)} | "
                     f"{per_seed} |")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", nargs="+", type=Path, required=True, help="run directories of method A")
    parser.add_argument("--b", nargs="+", type=Path, required=True, help="run directories of method B, same seeds")
    parser.add_argument("--file", default="extended_metrics.json", help="scores file in each run directory")
    args = parser.parse_args()

    a = {seed_of(run): macro_scores(run, args.file) for run in args.a}
    b = {seed_of(run): macro_scores(run, args.file) for run in args.b}
    diffs = differences(a, b)
    splits = [s for s in SPLITS if (s, "rougeL") in diffs]
    print("| seed | " + " | ".join(f"{s} R-L A | {s} R-L B | {s} A - B" for s in splits) + " |")
    print("|---|" + "---|" * 3 * len(splits))
    for seed in sorted(a):
        cells = [f"{a[seed][s]['rougeL']:.2f} | {b[seed][s]['rougeL']:.2f} | "
                 f"{a[seed][s]['rougeL'] - b[seed][s]['rougeL']:+.2f}" for s in splits]  # fmt: skip
        print(f"| {seed} | " + " | ".join(cells) + " |")
    print("", *difference_table(a, b), "", sep="\n")
    rouge_l = {s: diffs[s, "rougeL"] for s in splits}
    print("RESULT " + " ".join(f"{s}_diff={summary(d).replace(' ', '')} {s}_a_ahead={sum(x > 0 for x in d)}/{len(d)}"
                               for s, d in rouge_l.items()))  # fmt: skip


if __name__ == "__main__":
    main()

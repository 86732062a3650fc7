"""BENCHMARKS.md, its figures and the README's verdict table are what ``benchmarks/report.py`` makes of the committed
results: regenerated here, nothing may differ, so no figure or number can drift from its data."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import report  # noqa: E402


def test_the_committed_report_is_what_the_committed_results_make() -> None:
    outputs = report.build()
    assert {ROOT / "BENCHMARKS.md", ROOT / "README.md"} <= set(outputs)
    assert any(p.suffix == ".png" for p in outputs)
    changed = [str(p.relative_to(ROOT)) for p in report.stale(outputs)]
    assert not changed, f"run `python benchmarks/report.py` and commit: {changed} would change"


def test_the_report_fits_its_budget_and_the_readme_its_first_screen() -> None:
    benchmarks = (ROOT / "BENCHMARKS.md").read_text().splitlines()
    readme = (ROOT / "README.md").read_text().splitlines()
    assert len(benchmarks) < 300 and len(readme) < 200
    first_screen = "\n".join(readme[:60])
    for must in ("make compare", "make test", report.VERDICT_START, "at_scale_forest.png", "worth it"):
        assert must in first_screen, must
    table = readme[readme.index(report.VERDICT_START) + 1 : readme.index(report.VERDICT_END)]
    assert any(row.startswith("| lora | families |") for row in table)  # the verdict against LoRA, per protocol

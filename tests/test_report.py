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


def test_every_forest_panel_puts_each_method_on_its_own_labelled_row(monkeypatch) -> None:
    """Panels with different methods (sni-100 runs fewer than families) share one y axis: a dot's row label is the
    method it belongs to on every panel."""
    figures = []
    monkeypatch.setattr(report, "save", lambda fig, path: figures.append(fig))
    diffs = {
        "families": {"orchmoe": {"seen": {0: -5.0, 1: -4.0}}, "poly": {"seen": {0: -4.2}}, "mhr": {"seen": {0: -4.3}}},
        "sni-100": {"mhr": {"seen": {0: 1.5}}},
    }
    report.forest_figure(diffs, ROOT / "unused.png")
    (fig,) = figures
    fig.canvas.draw()
    shown = fig.axes[0]  # the panels share their y axis: its labels are the only ones shown, for all panels
    label_at = {round(y): t.get_text() for y, t in zip(shown.get_yticks(), shown.get_yticklabels(), strict=True)}
    assert list(label_at.values()) == ["orchmoe", "poly", "mhr"]
    for ax, protocol in zip(fig.axes, diffs, strict=True):
        dots = {label_at[round(line.get_ydata()[0])]: sorted(line.get_xdata()) for line in ax.get_lines()
                if line.get_marker() == "o"}  # fmt: skip
        assert dots == {m: sorted(v["seen"].values()) for m, v in diffs[protocol].items()}

"""BENCHMARKS.md, its figures and the README's verdict table are what ``benchmarks/report.py`` makes of the committed
results: regenerated here, nothing may differ, so no figure or number can drift from its data."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import report  # noqa: E402
import standing  # noqa: E402

from tests.at_scale_results import finish, scored  # noqa: E402


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


@pytest.fixture
def one_lr(results: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The results tree, every method at one lr (no grids needed)."""
    monkeypatch.setattr(standing, "lr_of", lambda protocol, variant: 0.003)
    return results


@pytest.mark.parametrize(
    ("mix_minus_diagonal", "says"),
    [
        ({("families", 0): 1.0, ("sni-100", 0): 2.0}, "above at every seed so far (2 of the 6 seeds the rule needs)"),
        ({("families", 0): 1.0, ("families", 1): -0.5}, "it cannot win"),
        ({("sni-100", 2): 0.0}, "it cannot win"),  # a tie is not above
        ({(p, s): 1.0 for p in ("families", "sni-100") for s in (0, 1, 2)}, "the rule makes it the default"),
    ],
)
def test_the_mixing_rule_says_where_it_stands(one_lr: Path, mix_minus_diagonal: dict, says: str) -> None:
    for (protocol, seed), diff in mix_minus_diagonal.items():
        finish(one_lr, f"orchmoe-lr0.003-seed{seed}", 30.0, protocol)
        finish(one_lr, f"orchmoe-mix-lr0.003-seed{seed}", 30.0 + diff, protocol)
    finish(one_lr, "orchmoe-mix-lr0.003-seed0", 99.0, "sni-10")  # the rule reads families and sni-100 only
    if ("sni-100", 1) not in mix_minus_diagonal:  # no diagonal run at this seed: not paired, not counted
        finish(one_lr, "orchmoe-mix-lr0.003-seed1", 99.0, "sni-100")
    text = "\n".join(standing.rule_lines(["families", "sni-10", "sni-100"]))
    assert says in text
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| ")}
    for (protocol, seed), diff in mix_minus_diagonal.items():
        assert f"seed {seed}: {diff:+.2f}" in rows[protocol]


def test_no_mixing_runs_no_rule(one_lr: Path) -> None:
    finish(one_lr, "orchmoe-lr0.003-seed0", 30.0)
    assert standing.rule_lines(["families"]) == []


def test_the_verdict_pairs_both_allocations_with_every_baseline_by_seed(one_lr: Path) -> None:
    for seed, (orchmoe, mix, lora, r17) in enumerate([(30, 33, 32, 31), (28, 29, 31, 30)]):
        for name, seen in (("orchmoe", orchmoe), ("orchmoe-mix", mix), ("lora", lora), ("lora-r17", r17)):
            scored(one_lr, f"{name}-lr0.003-seed{seed}", 0.0, {"seen": seen, "unseen": 20.0}, protocol="sni-100")
    scored(one_lr, "orchmoe-mix-lr0.003-seed2", 0.0, 50.0, protocol="sni-100")  # no baseline at seed 2: in no pair
    rows = {row.split(" | ")[0]: row.split(" | ")[2:] for row in standing.verdict_table(["sni-100"])[2:]}
    assert set(rows) == {"| lora", "| lora-r17"}  # no Poly or MHR run: no row
    assert rows["| lora"][0] == "-2.50 ± 0.71 (2 seeds, trails)"  # OrchMoE seen: 30-32, 28-31
    assert rows["| lora"][2] == "-0.50 ± 2.12 (2 seeds, mixed)"  # mixing seen: 33-32, 29-31
    assert rows["| lora-r17"][2] == "+0.50 ± 2.12 (2 seeds, mixed)"  # mixing seen: 33-31, 29-30
    assert rows["| lora"][1] == "+0.00 ± 0.00 (2 seeds, mixed)"  # unseen: 20 - 20 at each seed


def test_the_verdict_words_each_comparison_at_3_seeds_and_tallies_them(one_lr: Path) -> None:
    """families: OrchMoE 5 behind LoRA (±1) on seen tasks, even on unseen; the mixing allocation 5 ahead on seen; no
    lora-r17 run. sni-100: one seed of each, no word."""
    for seed, jitter in enumerate((-1.0, 0.0, 1.0)):
        scored(one_lr, f"lora-lr0.003-seed{seed}", 0.0, {"seen": 40.0, "unseen": 30.0})
        scored(one_lr, f"orchmoe-lr0.003-seed{seed}", 0.0, {"seen": 35.0 + jitter, "unseen": 30.0 + 2 * jitter})
        scored(one_lr, f"orchmoe-mix-lr0.003-seed{seed}", 0.0, {"seen": 45.0 + jitter, "unseen": 30.0 - jitter})
    for name in ("lora", "orchmoe", "orchmoe-mix", "lora-r17"):
        scored(one_lr, f"{name}-lr0.003-seed0", 0.0, 30.0, protocol="sni-100")
    bullets, tally = standing.verdict_lines(["families", "sni-10", "sni-100"])
    families, sni_100 = bullets  # sni-10 has no runs: no bullet
    assert (
        "The paper's OrchMoE against lora: on seen tasks it hurts (-5.00, 95\u00a0% interval -7.48 to -2.52" in families
    )
    assert "on unseen tasks it ties (+0.00, 95\u00a0% interval -4.97 to +4.97)" in families
    assert "The mixing allocation against lora: on seen tasks it helps (+5.00" in families
    assert "lora-r17" not in families
    assert sni_100 == ("- **sni-100**. The paper's OrchMoE against lora: 1 of 3 seeds, no word yet. The mixing "
                       "allocation against lora: 1 of 3 seeds, no word yet. The mixing allocation against lora-r17: 1 "
                       "of 3 seeds, no word yet.")  # fmt: skip
    assert tally.startswith("Of the 4 comparisons with 3 paired seeds so far, routing helps in 1 (mixing allocation "
                            "against lora, families, seen tasks), hurts in 1 (OrchMoE against lora, families, seen "
                            "tasks), ties in 2;")  # fmt: skip


def test_no_pairs_no_verdict_words(one_lr: Path) -> None:
    scored(one_lr, "orchmoe-lr0.003-seed0", 0.0, 30.0)
    assert standing.verdict_lines(["families"]) == ([], "")

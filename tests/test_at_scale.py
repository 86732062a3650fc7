"""benchmarks/at_scale.py: the plan follows the protocol (grid first, seeds and remedies once the lr is chosen on
validation; sni-100 borrows its choices; a remedy that cannot win drops its later seeds), ``run`` replans after each
run, and the mixing allocation's control matches its parameter count."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from orchmoe.pipeline.batches import total_steps
from orchmoe.pipeline.common import make_selection

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import at_scale  # noqa: E402

from tests.at_scale_results import finish  # noqa: E402

SNI_FULL = ROOT.parent / "shared" / "sni-full"


def names(protocol: str = "families") -> list[str]:
    return [r.name for r in at_scale.plan(protocol)[0]]


def test_plan_runs_the_grid_first_then_waits_for_the_choice(results: Path) -> None:
    runs, waiting = at_scale.plan("families")
    assert names()[:4] == ["orchmoe-lr0.003-seed0", "lora-lr0.003-seed0", "poly-lr0.01-seed0", "mhr-lr0.003-seed0"]
    assert len(runs) == 10 and all(r.seed == 0 for r in runs)  # 4 methods' grids, the mixing allocation's
    assert len(waiting) == 6  # OrchMoE and LoRA seeds, two remedies, the mixing allocation and its control


@pytest.mark.parametrize(("low", "high", "chosen"), [(30.0, 31.0, 3e-3), (31.0, 30.0, 1e-3), (30.0, 30.0, 1e-3)])
def test_lr_chosen_on_validation_then_seeds_and_remedies(results: Path, low: float, high: float, chosen: float) -> None:
    finish(results, "orchmoe-lr0.001-seed0", low)
    finish(results, "orchmoe-lr0.003-seed0", high)
    assert at_scale.chosen_lr("families", "orchmoe") == chosen  # a tie goes to the lower lr
    planned = {r.name: r for r in at_scale.plan("families")[0]}
    for seed in (1, 2):
        assert f"orchmoe-lr{chosen:g}-seed{seed}" in planned
    remedy = planned[f"orchmoe-alloc-fade-lr{chosen:g}-seed0"]
    cfg = at_scale.config_of("families", "data", remedy, "tiny-gemma3")
    assert cfg.method == "orchmoe" and cfg.allocation_lr == 0.1 and cfg.noise_scale_end == 0.0 and cfg.lr == chosen
    assert cfg.n_train == 128 and cfg.n_test == 50 and len(cfg.tasks) == 16 and len(cfg.held_out_tasks) == 5
    assert at_scale.chosen_lr("families", "lora") is None  # LoRA's grid is not finished


@pytest.mark.skipif(not SNI_FULL.is_dir(), reason="../shared/sni-full is not on this machine")
@pytest.mark.parametrize(
    ("protocol", "least"), [("families", 250), ("sni-10", 250), ("families-gpu", 2560), ("sni-100", 250)]
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_seed_trains_the_protocols_steps_on_the_real_data(protocol: str, least: int, seed: int) -> None:
    """The CPU protocols ask >= 250 optimizer steps per run, the GPU's 10x the families protocol's 256: each seed
    draws its own tasks, and a short task gives fewer instances than ``n_train``, so the count is checked on the data
    the runs read."""
    run = at_scale.Planned(at_scale.slug("lora", 1e-3, seed), "lora", "lora", 1e-3, seed, ())
    cfg = at_scale.config_of(protocol, str(SNI_FULL), run, "tiny-gemma3")
    assert total_steps(cfg, len(make_selection(cfg).train)) >= least


@pytest.mark.skipif(not SNI_FULL.is_dir(), reason="../shared/sni-full is not on this machine")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sni_100_draws_100_tasks_outside_the_families_and_sni_10s_unseen_tasks(seed: int) -> None:
    run = at_scale.variant_run("orchmoe", 3e-3, seed)
    cfg = at_scale.config_of("sni-100", str(SNI_FULL), run, "tiny-gemma3")
    sni_10 = at_scale.config_of("sni-10", str(SNI_FULL), run, "tiny-gemma3")
    assert len(set(cfg.tasks)) == 100 and not set(cfg.tasks) & at_scale.excluded_tasks("families")
    selection, other = make_selection(cfg, n_val=at_scale.N_VAL["sni-100"]), make_selection(sni_10)
    assert selection.unseen_tasks == other.unseen_tasks and len(selection.unseen) == 6 * 50
    assert len(selection.test) == 100 * 20 and len(selection.val) == 100 * 4
    assert cfg == at_scale.config_of("sni-100", str(SNI_FULL), run, "tiny-gemma3")  # the same draw every time


def test_sni_100_borrows_sni_10s_learning_rates_and_plans_seed_by_seed() -> None:
    """No grid of its own: each method at the lr sni-10 at scale chose (read from its committed runs); OrchMoE and
    LoRA at 3 seeds, Poly and MHR at 1; the mixing allocation waits for the families protocol's choice."""
    assert {m: at_scale.chosen_lr("sni-100", m) for m in at_scale.ORDER} == {
        "orchmoe": 3e-3, "lora": 3e-3, "poly": 1e-2, "mhr": 3e-3}  # fmt: skip
    runs, waiting = at_scale.plan("sni-100")
    base = [r.name for r in runs if r.variant in at_scale.ORDER]
    seed_0 = ["orchmoe-lr0.003-seed0", "lora-lr0.003-seed0", "poly-lr0.01-seed0", "mhr-lr0.003-seed0"]
    assert base == [*seed_0, "orchmoe-lr0.003-seed1", "lora-lr0.003-seed1", "orchmoe-lr0.003-seed2",
                    "lora-lr0.003-seed2"]  # fmt: skip
    control = [r for r in runs if r.variant == at_scale.CONTROL]
    assert [r.seed for r in control] == [0, 1, 2] and all(r.lr == 3e-3 for r in control)
    if at_scale.chosen_lr("families", at_scale.MIX) is None:
        assert waiting == ["orchmoe-mix seeds 0, 1, 2 (lr not chosen yet)"]


def test_sni_100_waits_for_the_protocols_it_borrows_from(results: Path) -> None:
    """Before sni-10 and families chose anything (an empty results folder), sni-100 plans no run and says why."""
    runs, waiting = at_scale.plan("sni-100")
    assert runs == []
    borrowed = [f"{m} (its lr comes from sni-10, not chosen there yet)" for m in at_scale.ORDER]
    mixing = [f"{v} seeds 0, 1, 2 (lr not chosen yet)" for v in (at_scale.MIX, at_scale.CONTROL)]
    assert waiting == borrowed + mixing


def test_the_mixing_allocation_chooses_its_lr_on_families_and_sni_100_follows(results: Path) -> None:
    finish(results, "orchmoe-mix-lr0.003-seed0", 30.0)
    finish(results, "orchmoe-mix-lr0.001-seed0", 31.0)
    finish(results, "lora-lr0.003-seed0", 31.0)
    finish(results, "lora-lr0.001-seed0", 30.0)
    assert at_scale.chosen_lr("families", at_scale.MIX) == 1e-3
    families = [r.name for r in at_scale.plan("families")[0] if r.variant in (at_scale.MIX, at_scale.CONTROL)]
    assert families == ["orchmoe-mix-lr0.003-seed0", "orchmoe-mix-lr0.001-seed0", "lora-r17-lr0.003-seed0",
                        "orchmoe-mix-lr0.001-seed1", "lora-r17-lr0.003-seed1",
                        "orchmoe-mix-lr0.001-seed2", "lora-r17-lr0.003-seed2"]  # fmt: skip
    mix = next(r for r in at_scale.plan("families")[0] if r.name == "orchmoe-mix-lr0.001-seed1")
    cfg = at_scale.config_of("families", "data", mix, "tiny-gemma3")
    assert cfg.method == "orchmoe" and cfg.allocation == "mixing" and cfg.lr == 1e-3 and cfg.seed == 1
    control = next(r for r in at_scale.plan("families")[0] if r.variant == at_scale.CONTROL)
    assert (at_scale.config_of("families", "data", control, "tiny-gemma3").n_skills, control.method) == (17, "lora")


def test_the_gpu_protocol_plans_every_method_seed_by_seed_at_the_families_choice() -> None:
    """families-gpu has no grid: each seed's four runs at the lrs the committed families runs chose on validation."""
    runs, waiting = at_scale.plan("families-gpu")
    assert not waiting and [r.seed for r in runs] == [0] * 4 + [1] * 4 + [2] * 4
    for method, lr in at_scale.FIXED_LRS["families-gpu"].items():
        assert at_scale.chosen_lr("families", method) == lr  # read from benchmarks/results/sni-full/families
    cfg = at_scale.config_of("families-gpu", "data", runs[0], "gemma3-270m")
    families = at_scale.config_of("families", "data", runs[0], "gemma3-270m")
    assert (cfg.tasks, cfg.held_out_tasks, cfg.n_test) == (families.tasks, families.held_out_tasks, families.n_test)
    assert cfg.precision == families.precision == "fp32" and cfg.batch_size == families.batch_size
    assert cfg.epochs == 1.0


def finish_all_but_remedies(results: Path) -> None:
    """Every families run but the remedies', finished: each grid at seed 0 (OrchMoE and LoRA choose 3e-3, at
    validation R-L 30), OrchMoE and LoRA at seeds 1 and 2 (30 each), the mixing allocation and its control."""
    for method in ("orchmoe", "lora"):
        finish(results, f"{method}-lr0.003-seed0", 30.0)
        finish(results, f"{method}-lr0.001-seed0", 20.0)
        for seed in (1, 2):
            finish(results, f"{method}-lr0.003-seed{seed}", 30.0)
    for method in ("poly", "mhr"):
        for lr in at_scale.GRID[method][:2]:
            finish(results, at_scale.slug(method, lr, 0), 20.0)
    for run in at_scale.mix_plan("families")[0]:  # the mixing allocation and its control: chosen, then every seed
        finish(results, run.name, 20.0)
    for run in at_scale.mix_plan("families")[0]:
        if not at_scale.finished("families", run.name):
            finish(results, run.name, 20.0)


@pytest.mark.parametrize(
    ("remedy_val", "planned_after", "dropped"),
    [
        (
            {0: 31.0, 1: 29.0},
            {"orchmoe-alloc-lr0.003-seed1"},
            "seeds 2+ dropped: not above OrchMoE on validation at seed 1",
        ),
        ({0: 30.0}, set(), "seeds 1+ dropped: not above OrchMoE on validation at seed 0"),  # a tie is not above
        ({0: 31.0, 1: 31.0}, {"orchmoe-alloc-lr0.003-seed1", "orchmoe-alloc-lr0.003-seed2"}, None),  # still in it
    ],
)
def test_a_remedy_that_cannot_win_on_validation_drops_its_later_seeds(
    results: Path, remedy_val: dict[int, float], planned_after: set[str], dropped: str | None
) -> None:
    finish_all_but_remedies(results)
    for seed, val in remedy_val.items():
        finish(results, f"orchmoe-alloc-lr0.003-seed{seed}", val)
    runs, waiting = at_scale.plan("families")
    alloc = [r.name for r in runs if r.variant == "orchmoe-alloc"]
    assert set(alloc) == {"orchmoe-alloc-lr0.003-seed0"} | planned_after
    fade = [r.name for r in runs if r.variant == "orchmoe-alloc-fade"]
    assert len(fade) == 3  # the other remedy, not yet run, keeps its three seeds
    remedies = [r.name for r in runs if r.variant in at_scale.REMEDIES]
    assert remedies[:2] == ["orchmoe-alloc-lr0.003-seed0", "orchmoe-alloc-fade-lr0.003-seed0"]  # seed by seed
    assert [w for w in waiting if "dropped" in w] == ([f"orchmoe-alloc {dropped}"] if dropped else [])


@pytest.mark.parametrize("limit, runs", [(0, 4), (2, 2)])
def test_run_replans_after_each_run_so_a_dropped_seed_never_starts(
    results: Path, monkeypatch: pytest.MonkeyPatch, limit: int, runs: int
) -> None:
    finish_all_but_remedies(results)
    executed: list[str] = []

    def execute(protocol: str, data_dir: str, run: at_scale.Planned, work: Path, model: str) -> Path:
        executed.append(run.name)
        finish(results, run.name, 20.0 if run.variant == "orchmoe-alloc" else 40.0)  # alloc loses at seed 0
        return results / protocol / run.name

    monkeypatch.setattr(at_scale, "execute", execute)
    monkeypatch.setattr(at_scale, "measure", lambda protocol, work: [])
    at_scale.run_all("families", "unused", results, "unused", None, limit)
    every = [
        "orchmoe-alloc-lr0.003-seed0",
        "orchmoe-alloc-fade-lr0.003-seed0",
        "orchmoe-alloc-fade-lr0.003-seed1",  # orchmoe-alloc's seeds 1 and 2 dropped as soon as its seed 0 lost
        "orchmoe-alloc-fade-lr0.003-seed2",
    ]
    assert executed == every[:runs]
    assert (at_scale.next_run("families", None) is None) == (runs == len(every))


def test_run_stops_when_a_run_leaves_incomplete_results(results: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(at_scale, "execute", lambda protocol, data_dir, run, work, model: results / run.name)
    with pytest.raises(RuntimeError, match="results are incomplete"):
        at_scale.run_all("families", "unused", results, "unused", None, 0)


def test_the_control_is_the_lora_rank_nearest_the_mixing_allocations_total_on_gemma_3_270m() -> None:
    """The protocol's parameter figures, counted on Gemma 3 270M's architecture (weights on the meta device)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    import orchmoe

    config = AutoConfig.from_pretrained(ROOT / "benchmarks" / "configs" / "gemma-3-270m.json")

    def trainable(peft_config) -> int:
        with torch.device("meta"):
            model = get_peft_model(AutoModelForCausalLM.from_config(config), peft_config)
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    targets = ["q_proj", "v_proj"]
    mix = orchmoe.OrchMoEConfig(n_abstract_tasks=4, n_skills=8, r=2, target_modules=targets, task_type="CAUSAL_LM",
                                allocation="mixing")  # fmt: skip
    with torch.device("meta"):
        counts = orchmoe.parameter_report(get_peft_model(AutoModelForCausalLM.from_config(config), mix))
    assert (counts["skills"], counts["skill_router"], counts["trainable"]) == (737_280, 36_864, 776_708)
    assert counts["skill_router"] / counts["skills"] == pytest.approx(0.05)  # the at most 5 %
    loras = {
        rank: trainable(LoraConfig(r=rank, target_modules=targets, task_type="CAUSAL_LM")) for rank in (16, 17, 18)
    }
    assert loras[17] == 783_360 and min(loras, key=lambda k: abs(loras[k] - counts["trainable"])) == 17
    _, changes = at_scale.VARIANTS[at_scale.CONTROL]
    assert changes["n_skills"] * changes["r"] == 17

"""benchmarks/at_scale.py, at_scale_store.py and router_measures.py: the plan follows the protocol (grid first, seeds
and remedies once the lr is chosen on validation), the report pairs seeds at the chosen lrs, parking carries what a run
needs, the router measures read the log and the allocation, and the head benchmark prints its result line."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from orchmoe.pipeline.common import make_selection
from orchmoe.pipeline.trainer import total_steps
from orchmoe.tuner.router import SkillRouter
from tests.conftest import make_peft

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import at_scale  # noqa: E402
import at_scale_store  # noqa: E402
import at_scale_tables  # noqa: E402
import router_measures  # noqa: E402

from tests.test_benchmarks import script  # noqa: E402


def finish(results: Path, name: str, val_rouge_l: float) -> None:
    folder = results / "families" / name
    folder.mkdir(parents=True)
    for kept in at_scale_store.KEPT:
        (folder / kept).write_text("{}")
    (folder / "val_metrics.json").write_text(json.dumps({"val": {"macro": {"rougeL": val_rouge_l}}}))


@pytest.fixture
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(at_scale_store, "RESULTS", tmp_path)
    return tmp_path


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


SNI_FULL = ROOT.parent / "shared" / "sni-full"


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


def test_head_benchmark_prints_its_result_line() -> None:
    done = script("head.py", "--model", "tiny-gemma3", "--length", "24", "--repeats", "1")
    assert done.stdout.strip().splitlines()[-1].startswith("RESULT full_over_supervised_lora=")


@pytest.mark.parametrize(
    ("task", "family"),
    [("task126_scan_structured_text_generation_command_action_all", "scan"),
     ("task141_odd-man-out_classification_category", "odd-man-out"),
     ("task140_detoxifying-lms_classification_style", "detoxifying-lms")],
)  # fmt: skip
def test_family_of_a_task(task: str, family: str) -> None:
    assert router_measures.family(task) == family


def test_log_measures_follow_the_allocation_and_the_gradient_ratio() -> None:
    log = [{"step": 8, "loss": 1.0},  # an entry without routing statistics is left out
           {"step": 16, "allocation_tv": 0.01, "grad_norm_allocation": 0.1, "grad_norm_adapter": 10.0},
           {"step": 24, "allocation_tv": 0.02, "grad_norm_allocation": 0.3, "grad_norm_adapter": 10.0},
           {"step": 32, "allocation_tv": 0.04, "grad_norm_allocation": 0.2, "grad_norm_adapter": 10.0}]  # fmt: skip
    measured = router_measures.log_measures(log)
    assert measured["allocation_tv_first"] == 0.01 and measured["allocation_tv_last"] == 0.04
    assert measured["grad_ratio_median"] == pytest.approx(0.02) and [e["step"] for e in measured["series"]] == [
        16,
        24,
        32,
    ]


def scored(results: Path, name: str, val: float, seen: float, routers: dict | None = None) -> None:
    finish(results, name, val)
    macro = {k: seen for k in at_scale.SCORES}
    (results / "families" / name / "metrics.json").write_text(json.dumps({s: {"macro": macro} for s in at_scale.SETS}))
    if routers is not None:
        (results / "families" / name / at_scale_store.ROUTERS).write_text(json.dumps(routers))


def test_report_pairs_seeds_at_the_chosen_learning_rates(results: Path) -> None:
    for method, (low, high) in {"orchmoe": (30.0, 31.0), "lora": (32.0, 31.0)}.items():
        scored(results, f"{method}-lr0.001-seed0", low, low)
        scored(results, f"{method}-lr0.003-seed0", high, high)
    scored(results, "orchmoe-lr0.003-seed1", 30.0, 35.0)
    scored(results, "lora-lr0.001-seed1", 30.0, 33.0)
    routers = {"allocation_tv_first": 0.003, "allocation_tv_last": 0.012, "grad_ratio_median": 0.02,
               "allocation_spread": {"between_tasks_tv_mean": 0.25, "between_tasks_tv_max": 0.5,
                                     "effective_skills": 6.0},
               "nmi": {"seen": {"task": 0.5, "family": 0.7}}, "hard": {"seen": {"rougeL": 30.0}},
               "soft": {"seen": {"rougeL": 31.0}}}  # fmt: skip
    scored(results, "orchmoe-lr0.003-seed2", 30.0, 30.0, routers)
    scored(results, "orchmoe-alloc-lr0.003-seed0", 32.0, 40.0)
    scored(results, "orchmoe-alloc-lr0.003-seed1", 29.0, 30.0)
    scored(results, "orchmoe-mix-lr0.003-seed0", 33.0, 33.0)
    scored(results, "orchmoe-mix-lr0.001-seed0", 32.0, 32.0)
    text = at_scale_tables.report("families")
    assert "orchmoe 0.003, lora 0.001" in text
    # seed 0: 31 - 32, seed 1: 35 - 33 (seed 2 has no LoRA partner), on every split and score
    for split in at_scale.SETS:
        for score in ("R-1", "R-L", "R-Lsum", "EM"):
            assert f"| {split} | {score} | +0.50 ± 2.12 | 1/2 | -1.00, +2.00 |" in text
    assert "| seen | R-L | +2.50 ± 7.78 | 1/2 | +8.00, -3.00 |" in text  # the remedy against LoRA: 40 - 32, 30 - 33
    # the remedy's rule is on validation against OrchMoE at the same seed: 32 - 31, 29 - 30
    assert "orchmoe-alloc minus OrchMoE, validation R-L at seeds [0, 1]: +1.00, -1.00 (above at 1" in text
    # the mixing allocation at its own chosen lr (3e-3: 33 > 32) against OrchMoE's 31; its rule spans both protocols
    mix = "orchmoe-mix minus OrchMoE, validation R-L at seeds [0]: +2.00 (above at 1; the rule needs all of 3"
    assert mix + ", here and on the other protocol)" in text
    # OrchMoE against every method at its chosen lr, over the seeds both ran: LoRA mixed (-1, +2), Poly absent
    assert "| lora | 0, 1 | +0.50 ± 2.12 (mixed) | +0.50 ± 2.12 (mixed) | +0.50 ± 2.12 (mixed) |" in text
    assert "| poly |" not in text
    row = "| orchmoe-lr0.003-seed2 | allocation 0.0030 -> 0.0120 | - | 0.250 / 0.500 | 6.00 | 0.0200 | 0.50 / 0.70 | -1.00 |"  # noqa: E501
    assert row in text


@pytest.mark.parametrize(
    ("diffs", "expected"), [([1.0, 0.5], "leads"), ([-1.0, -0.1], "trails"), ([1.0, -1.0], "mixed"), ([0.0], "mixed")]
)
def test_standing_needs_the_same_sign_at_every_seed(diffs: list[float], expected: str) -> None:
    assert at_scale.paired.standing(diffs) == expected


@pytest.mark.parametrize("trained", [False, True])
def test_park_and_unpark_carry_what_the_run_needs(results: Path, tmp_path: Path, trained: bool) -> None:
    from orchmoe.pipeline import checkpoint

    out = tmp_path / "work" / "families" / "orchmoe-lr0.003-seed0"
    checkpoint.save(out / "checkpoints", 32, {"step": 32, "adapter": {}})
    for name in at_scale_store.PARKED:
        (out / name).write_text("{}")
    if trained:
        (out / "adapter").mkdir()
        (out / "adapter" / "adapter_config.json").write_text("{}")
    (parked,) = at_scale_store.park("families", tmp_path / "work")
    fresh = tmp_path / "fresh"
    at_scale_store.unpark("families", "orchmoe-lr0.003-seed0", fresh)
    assert checkpoint.latest(fresh / "checkpoints") is not None and (fresh / "config.json").is_file()
    assert (fresh / "adapter" / "adapter_config.json").is_file() == trained  # a trained run is scored, not retrained
    assert parked == results / "families" / "orchmoe-lr0.003-seed0" / "in-progress"


@pytest.mark.parametrize(
    ("skills_of", "between", "effective"),
    [
        ("same", 0.0, 1.0),  # every abstract task on skill 0: far from uniform, yet one adapter for all
        ("own", 1.0, 1.0),  # abstract task i on skill i: disjoint mixes
        ("uniform", 0.0, 4.0),  # Z = 0: a LoRA of rank S*r
    ],
)
def test_allocation_spread_tells_whether_abstract_tasks_get_different_skills(
    tmp_path: Path, skills_of: str, between: float, effective: float
) -> None:
    model = make_peft("tiny-gemma3")  # S = 4 skills
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SkillRouter):
                module.logits.zero_()
                for task in range(module.logits.shape[0]):
                    if skills_of != "uniform":
                        module.logits[task, 0 if skills_of == "same" else task % module.logits.shape[1]] = 50.0
    model.save_pretrained(tmp_path / "adapter")
    spread = router_measures.allocation_spread(tmp_path / "adapter")
    assert spread["between_tasks_tv_mean"] == pytest.approx(between, abs=1e-4)
    assert spread["effective_skills"] == pytest.approx(effective, abs=1e-3)


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


@pytest.mark.parametrize("kind", ["diagonal", "mixing"])
@pytest.mark.parametrize("apart", [True, False])
def test_adapter_spread_is_the_relative_distance_between_the_abstract_tasks_exported_adapters(
    kind: str, apart: bool
) -> None:
    from orchmoe.export import lora_from_routing
    from orchmoe.tuner.router import Allocation

    model = make_peft("tiny-gemma3", allocation=kind).eval()
    if not apart:  # the allocation's start: every abstract task the same LoRA
        for module in model.modules():
            if isinstance(module, Allocation):
                module.freeze_uniform()
    exported = [lora_from_routing(model, torch.eye(3)[t : t + 1])[1] for t in range(3)]  # B op_t A, brute force
    ratios = []
    for name in exported[0]:
        deltas = [(b @ a).double() for a, b in (e[name] for e in exported)]
        for t in range(3):
            for u in range(t + 1, 3):
                mean = (deltas[t].norm() + deltas[u].norm()) / 2
                ratios.append(float((deltas[t] - deltas[u]).norm() / mean))
    spread = router_measures.adapter_spread(model)
    assert spread["between_tasks_mean"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-6, abs=1e-9)
    assert spread["between_tasks_max"] == pytest.approx(max(ratios), rel=1e-6, abs=1e-9)
    assert (spread["between_tasks_mean"] > 0.05) == apart


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


def test_a_pairing_across_stacks_says_so(results: Path) -> None:
    for method in ("orchmoe", "lora"):
        scored(results, f"{method}-lr0.001-seed0", 30.0, 30.0)
        scored(results, f"{method}-lr0.003-seed0", 20.0, 20.0)
    assert "Paired across stacks" not in at_scale_tables.report("families")  # both on the earlier stack
    versions = {"torch": "2.13.0", "transformers": "5.25.0", "peft": "0.21.2", "trl": "1.16.0", "accelerate": "1.16.0"}
    (results / "families" / "orchmoe-lr0.001-seed0" / "data.json").write_text(json.dumps({"versions": versions}))
    text = at_scale_tables.report("families")
    assert "Paired across stacks (orchmoe-lr0.001: torch 2.13.0, transformers 5.25.0" in text
    assert f"lora-lr0.001: {at_scale_tables.EARLIER_STACK}" in text


def test_the_rerun_on_the_new_stack_reports_how_far_the_stack_moves_a_run(results: Path) -> None:
    for method in ("orchmoe", "lora"):
        scored(results, f"{method}-lr0.001-seed0", 30.0, 30.0)
        scored(results, f"{method}-lr0.003-seed0", 20.0, 20.0)
    scored(results, "orchmoe-rerun-lr0.001-seed0", 31.0, 29.5)
    text = at_scale_tables.report("families")
    assert "R-L new minus old: val +1.00, seen -0.50, held_out -0.50, unseen -0.50" in text


@pytest.mark.parametrize(("kind", "distance"), [("diagonal", "allocation_tv"), ("mixing", "mixing_distance")])
def test_the_router_measures_of_a_finished_tiny_run(tmp_path: Path, kind: str, distance: str) -> None:
    from orchmoe.cli import main
    from tests.pipeline.test_end_to_end import TINY

    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *TINY, "--max-steps", "4", "--log-every", "2", "--allocation", kind]) == 0
    assert main(["eval", str(run), "--quiet"]) == 0
    measured = router_measures.of_run(run, run)
    assert measured[f"{distance}_last"] > 0 and measured["adapter_spread"]["between_tasks_mean"] >= 0
    assert ("allocation_spread" in measured) == (kind == "diagonal")
    assert set(measured["hard"]) == set(measured["nmi"]) == {"seen", "unseen"}
    row = at_scale_tables.router_row("r", json.loads(json.dumps(measured)))
    assert row.startswith(f"| r | {distance.split('_')[0]} ") and row.count("|") == 9


def test_park_keeps_an_unmeasured_adapter_and_measure_uses_then_drops_it(results: Path, tmp_path: Path) -> None:
    """A run that finished too late in a session to have its routers measured: park keeps its adapter with its
    results; a later session (a fresh work directory) measures it from there and deletes it."""
    from orchmoe.cli import main
    from tests.pipeline.test_end_to_end import TINY

    work = tmp_path / "work"
    out = work / "families" / "orchmoe-lr0.003-seed0"
    assert main(["train", "--out", str(out), *TINY, "--max-steps", "2"]) == 0
    assert main(["eval", str(out), "--quiet"]) == 0
    (out / "val_metrics.json").write_text(json.dumps({"val": {"macro": {"rougeL": 1.0}}}))
    folder = results / "families" / out.name
    folder.mkdir(parents=True)
    for name in at_scale_store.KEPT:
        shutil.copy2(out / name, folder / name)
    assert at_scale_store.park("families", work) == [folder / at_scale_store.UNMEASURED]
    assert (folder / at_scale_store.UNMEASURED / "adapter_config.json").is_file()
    assert (out / "adapter" / "README.md").is_file() and not (folder / at_scale_store.UNMEASURED / "README.md").exists()
    assert at_scale_store.measure("families", tmp_path / "fresh") == [folder / at_scale_store.ROUTERS]
    assert not (folder / at_scale_store.UNMEASURED).exists()
    assert "nmi" in json.loads((folder / at_scale_store.ROUTERS).read_text())
    assert at_scale_store.park("families", work) == []  # measured: nothing more to keep

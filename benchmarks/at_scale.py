"""The routing claim at scale: OrchMoE against LoRA, Poly and MHR on ../shared/sni-full (protocol in benchmarks/LOG.md,
"At scale on sni-full", fixed before any run).

    python benchmarks/at_scale.py run --data-dir ../shared/sni-full --protocol families   # the next runs, in order
    python benchmarks/at_scale.py run --data-dir ../shared/sni-full --only orchmoe-lr0.003-seed0
    python benchmarks/at_scale.py plan --protocol families                                 # what is done, what is next
    python benchmarks/at_scale.py park                                                     # carry unfinished runs
    python benchmarks/at_scale.py measure --protocol families     # the routers of each finished OrchMoE run
    python benchmarks/at_scale.py report --protocol families      # tables, paired differences, router measures

Each run trains (checkpointed every ``checkpoint_every`` steps, resumed from its last checkpoint when interrupted),
is tested (seen, held-out and unseen tasks) and validated, and its ``config.json``, ``data.json``, ``metrics.json``,
``val_metrics.json`` and ``train_log.jsonl`` are copied to ``benchmarks/results/sni-full/<protocol>/<run>/``; a run
found there is finished and never repeated. ``park`` copies each unfinished run's last complete checkpoint (and
its settings and log) to ``benchmarks/results/sni-full/<protocol>/<run>/in-progress/`` to be committed, so that a
later session, on a fresh checkout, resumes the run from that step; ``run`` restores it and deletes it once the run
ends. The plan is the protocol's: each method's learning-rate grid at seed 0,
each method's lr chosen on validation ROUGE-L, OrchMoE and LoRA at seeds 1 and 2 at their chosen lr, then the two
pre-registered OrchMoE remedies at OrchMoE's chosen lr, seed by seed (0, 1, 2); a remedy not above OrchMoE on
validation at a seed can no longer win (the rule asks it at every seed), and its later seeds are dropped. A run that
needs a choice not yet made waits for the runs that make it.

``run`` measures each OrchMoE run's routers as soon as it ends; ``measure`` (with the run directory's adapter:
adapters are not kept with the results, so that the tree a device call carries stays small) writes ``routers.json``
beside the kept files of each finished OrchMoE run: the allocation's mean TV distance from uniform over training and
the gradient norms of Z against the skills' (from its log), the NMI of the prompts' argmax abstract tasks against
their tasks and their families (the word after ``taskNNN_``; a test-split task is a family of its own) on every test
set, and the scores of hard routing (each prompt to its argmax abstract task: what the exported adapters serve)
beside soft routing's. ``report`` prints the protocol's tables from the committed files only
(`at_scale_tables.py`); where runs are kept, parked and measured is `at_scale_store.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import at_scale_store as store
import paired
from at_scale_store import KEPT, finished, measure, park, unpark

from orchmoe.pipeline.config import RunConfig, read_config_file

ROOT = Path(__file__).resolve().parent
CONFIGS = {
    "families": ROOT / "configs" / "sni-full-families.yaml",
    "sni-10": ROOT / "configs" / "sni-full-10.yaml",
    "families-gpu": ROOT / "configs" / "sni-full-families-gpu.yaml",
    "sni-100": ROOT / "configs" / "sni-full-100.yaml",
}
SETS = paired.SPLITS  # seen, held_out, unseen
SCORES = tuple(paired.SCORES)  # rouge1, rougeL, rougeLsum, exact_match
N_VAL = {"sni-100": 4}  # validation instances per training task (the protocol's; 16 unless named: 400 on sni-100)
SEEDS = (0, 1, 2)
# each method's learning-rate grid: its validated lr (sni-10, 40 steps) first, then a third of it (6x the steps here)
GRID = {"orchmoe": (3e-3, 1e-3), "lora": (3e-3, 1e-3), "poly": (1e-2, 3e-3), "mhr": (3e-3, 1e-3)}
# the two pre-registered remedies for an allocation that does not move (benchmarks/LOG.md): OrchMoE variants
REMEDIES: dict[str, dict[str, Any]] = {
    "orchmoe-alloc": {"allocation_lr": 0.1},  # Z at mttl's module_logits_learning_rate
    "orchmoe-alloc-fade": {"allocation_lr": 0.1, "noise_scale_end": 0.0},  # and the Gumbel noise faded to 0
}
ORDER = ("orchmoe", "lora", "poly", "mhr")
# the mixing allocation (benchmarks/LOG.md "sni-100 at scale and the mixing allocation": pre-registered): its own lr
# grid at seed 0 on families (OrchMoE's), then 3 seeds at the chosen lr on families and sni-100. Its mixing matrices
# add 5.0 % to the adapters' parameters on Gemma 3 270M (over the 1 % the protocol allows without a control), so
# LoRA at the rank that matches its total (17 against 16) runs beside it at LoRA's chosen lr, 3 seeds each.
MIX = "orchmoe-mix"
CONTROL = "lora-r17"
# families' OrchMoE and LoRA were made on an earlier stack (transformers 5.23 / 5.24) than the mixing allocation's runs:
# OrchMoE at its chosen lr, seed 0, again on the new stack, says how far the stack alone moves a run
RERUN = "orchmoe-rerun"
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    MIX: ("orchmoe", {"allocation": "mixing"}),
    CONTROL: ("lora", {"n_skills": 17, "r": 1}),  # LoRA's rank is n_skills * r
    RERUN: ("orchmoe", {}),
}
GRID[MIX] = GRID["orchmoe"]
# a protocol with its learning rates fixed in advance, no grid: families-gpu (benchmarks/gpu.py, 10x the families
# protocol's steps; a device session holds minutes) takes the lrs the families protocol chose on validation
FIXED_LRS: dict[str, dict[str, float]] = {"families-gpu": {"orchmoe": 1e-3, "lora": 3e-3, "poly": 3e-3, "mhr": 1e-3}}
# a protocol that takes each method's lr from another protocol's validation, no grid of its own: sni-100 (the same
# data source and step count as sni-10 at scale) takes sni-10's choices, and the mixing allocation's from families
BORROWED: dict[str, dict[str, str]] = {"sni-100": {**{m: "sni-10" for m in ORDER}, MIX: "families"}}
# train-split tasks a protocol never draws: sni-100 leaves out the 21 tasks of the families protocol
EXCLUDED = {"sni-100": "families"}


@dataclass(frozen=True)
class Planned:
    name: str
    variant: str  # a method, or a remedy
    method: str
    lr: float
    seed: int
    changes: tuple[tuple[str, Any], ...] = ()


def slug(variant: str, lr: float, seed: int) -> str:
    return f"{variant}-lr{lr:g}-seed{seed}"


def validation_rouge_l(folder: Path) -> float:
    """A finished run's macro validation ROUGE-L."""
    return float(json.loads((folder / "val_metrics.json").read_text())["val"]["macro"]["rougeL"])


def validation_score(protocol: str, name: str) -> float | None:
    folder = finished(protocol, name)
    return None if folder is None else validation_rouge_l(folder)


def chosen_lr(protocol: str, method: str) -> float | None:
    """The grid value with the best validation ROUGE-L at seed 0 (ties: the lower lr); None until all are done."""
    if protocol in FIXED_LRS:
        return FIXED_LRS[protocol].get(method)
    if method == CONTROL:  # the control runs at LoRA's lr
        return chosen_lr(protocol, "lora")
    if method == RERUN:
        return chosen_lr(protocol, "orchmoe")
    if protocol in BORROWED:
        return chosen_lr(BORROWED[protocol][method], method)
    scores = {lr: validation_score(protocol, slug(method, lr, 0)) for lr in GRID[method]}
    if any(s is None for s in scores.values()):
        return None
    return max(sorted(scores), key=lambda lr: scores[lr])  # max keeps the first (lowest) of equal scores


def plan(protocol: str) -> tuple[list[Planned], list[str]]:
    """(runs whose settings are known, in order; runs waiting for an lr choice)."""
    if protocol in FIXED_LRS:  # seed by seed, every method at each seed: what a device session finishes is paired
        lrs = FIXED_LRS[protocol]
        return [Planned(slug(m, lrs[m], s), m, m, lrs[m], s) for s in SEEDS for m in ORDER], []
    if protocol in BORROWED:
        return borrowed_plan(protocol)
    runs, waiting = grid_plan(protocol)
    if protocol in MIXED:
        more, wait = mix_plan(protocol)
        runs, waiting = runs + more, waiting + wait
    return runs, waiting


MIXED = ("families", "sni-100")  # the protocols the mixing allocation and its control run on


def variant_run(variant: str, lr: float, seed: int) -> Planned:
    method, changes = VARIANTS.get(variant, (variant, {}))
    return Planned(slug(variant, lr, seed), variant, method, lr, seed, tuple(changes.items()))


def mix_plan(protocol: str) -> tuple[list[Planned], list[str]]:
    """The mixing allocation (its lr grid at seed 0 first where the protocol has grids), then seed by seed the mixing
    allocation and LoRA at the matching rank."""
    runs = [variant_run(MIX, lr, 0) for lr in GRID[MIX]] if protocol not in BORROWED else []
    rerun_lr = chosen_lr(protocol, "orchmoe") if protocol not in BORROWED else None
    runs = ([variant_run(RERUN, rerun_lr, 0)] if rerun_lr else []) + runs
    waiting = []
    lrs = {v: chosen_lr(protocol, v) for v in (MIX, CONTROL)}
    for variant, lr in lrs.items():
        if lr is None:
            waiting.append(f"{variant} seeds 0, 1, 2 (lr not chosen yet)")
    for seed in SEEDS:
        runs += [variant_run(v, lr, seed) for v, lr in lrs.items() if lr is not None]
    return list(dict.fromkeys(runs)), waiting  # the grid's seed-0 run at the chosen lr once


def borrowed_plan(protocol: str) -> tuple[list[Planned], list[str]]:
    """Seed by seed at the borrowed lrs: the four methods at seed 0, OrchMoE and LoRA at every seed, then the
    mixing allocation and its control."""
    lrs = {m: chosen_lr(protocol, m) for m in ORDER}
    waiting = [f"{m} (its lr comes from {BORROWED[protocol][m]}, not chosen there yet)" for m in ORDER if not lrs[m]]
    runs = [variant_run(m, lrs[m], s) for s in SEEDS for m in ORDER
            if lrs[m] and (s == 0 or m in ("orchmoe", "lora"))]  # fmt: skip
    more, wait = mix_plan(protocol)
    return runs + more, waiting + wait


def grid_plan(protocol: str) -> tuple[list[Planned], list[str]]:
    """Each method's lr grid at seed 0, OrchMoE and LoRA at the other seeds once chosen, then the remedies."""
    runs = [Planned(slug(m, GRID[m][i], 0), m, m, GRID[m][i], 0) for i in range(2) for m in ORDER]
    waiting = []
    for method in ("orchmoe", "lora"):
        lr = chosen_lr(protocol, method)
        if lr is None:
            waiting += [f"{method} seeds 1, 2 (lr not chosen yet)"]
            continue
        runs += [Planned(slug(method, lr, s), method, method, lr, s) for s in SEEDS[1:]]
    lr = chosen_lr(protocol, "orchmoe")
    if lr is None:
        return runs, waiting + [f"{remedy} seeds 0, 1, 2 (OrchMoE's lr not chosen yet)" for remedy in REMEDIES]
    lost = {remedy: first_loss(protocol, remedy, lr) for remedy in REMEDIES}
    for seed in SEEDS:  # seed by seed, so that a remedy that cannot win stops costing runs
        for remedy, changes in REMEDIES.items():
            if lost[remedy] is None or seed <= lost[remedy]:
                runs.append(Planned(slug(remedy, lr, seed), remedy, "orchmoe", lr, seed, tuple(changes.items())))
    for remedy, seed in lost.items():
        if seed is not None and seed < SEEDS[-1]:
            waiting.append(f"{remedy} seeds {seed + 1}+ dropped: not above OrchMoE on validation at seed {seed}")
    return runs, waiting


def first_loss(protocol: str, remedy: str, lr: float) -> int | None:
    """The first seed at which the remedy's validation R-L is not above OrchMoE's (both finished): the pre-registered
    rule asks it to be above at every seed, so from there on it can no longer win; None if there is none yet."""
    for seed in SEEDS:
        ours, base = (validation_score(protocol, slug(v, lr, seed)) for v in (remedy, "orchmoe"))
        if ours is not None and base is not None and ours <= base:
            return seed
    return None


def config_of(protocol: str, data_dir: str, run: Planned, model: str) -> RunConfig:
    options = read_config_file(CONFIGS[protocol])
    if protocol in EXCLUDED:  # the draw, named in the run's config.json
        options["tasks"] = drawn_tasks(data_dir, options["n_tasks"], run.seed, excluded_tasks(EXCLUDED[protocol]))
    base = RunConfig(data_dir=data_dir, model=model, **options)
    return dataclasses.replace(base, method=run.method, lr=run.lr, seed=run.seed, **dict(run.changes))


def excluded_tasks(protocol: str) -> set[str]:
    """Every task a protocol names: its training tasks and its held-out ones."""
    options = read_config_file(CONFIGS[protocol])
    return set(options.get("tasks") or []) | set(options.get("held_out_tasks") or [])


def drawn_tasks(data_dir: str, n_tasks: int, seed: int, excluded: set[str]) -> list[str]:
    """``n_tasks`` train-split tasks drawn by the seed from those with a task file, leaving out ``excluded``: the
    draw `orchmoe.data.select` makes over a smaller pool."""
    from orchmoe.data.sni import read_split

    present = {p.stem for p in (Path(data_dir) / "tasks").glob("*.json")}
    pool = sorted(n for n in read_split(data_dir)[0] if n in present and n not in excluded)
    return random.Random(seed).sample(pool, n_tasks)


def execute(protocol: str, data_dir: str, run: Planned, work: Path, model: str) -> Path:
    """Train (resuming from the last checkpoint), test, validate; copy the kept files to the results folder."""
    from orchmoe.pipeline.evaluate import METRICS, VAL_METRICS, evaluate_run, validate_run
    from orchmoe.pipeline.trainer import train

    cfg = config_of(protocol, data_dir, run, model)
    out = work / protocol / run.name
    unpark(protocol, run.name, out)
    if not (out / "adapter" / "adapter_config.json").is_file():
        resume = (out / "config.json").is_file()
        train(cfg, out, resume=resume, overwrite=not resume, progress=False)
    if not (out / METRICS).is_file():
        evaluate_run(out, progress=False)
    if not (out / VAL_METRICS).is_file():
        validate_run(out, N_VAL.get(protocol, 16), progress=False)
    target = store.RESULTS / protocol / run.name
    target.mkdir(parents=True, exist_ok=True)
    for name in KEPT:
        shutil.copy2(out / name, target / name)
    shutil.rmtree(target / "in-progress", ignore_errors=True)
    return target


def only(runs: list[Planned], names: list[str]) -> list[Planned]:
    """The planned runs among ``names``, in the order given."""
    planned = {r.name: r for r in runs}
    return [planned[name] for name in names if name in planned]


def next_run(protocol: str, names: list[str] | None) -> Planned | None:
    """The first planned run not finished yet, planned afresh: each finished run may choose an lr or drop a remedy's
    later seeds."""
    runs = plan(protocol)[0]
    return next((r for r in (only(runs, names) if names else runs) if not finished(protocol, r.name)), None)


def run_all(protocol: str, data_dir: str, work: Path, model: str, names: list[str] | None, limit: int) -> None:
    """Run what the plan holds, one run at a time, re-planning after each (``limit`` runs at most, 0: all)."""
    done = 0
    while not (limit and done >= limit) and (r := next_run(protocol, names)) is not None:
        target = execute(protocol, data_dir, r, work, model)
        if not finished(protocol, r.name):
            raise RuntimeError(f"{r.name} ran but its results are incomplete in {target}: expected {KEPT}")
        print(f"finished {r.name} -> {target}", flush=True)
        if r.method == "orchmoe":  # its routers now, not beside the next run's training
            measure(protocol, work)
        done += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "plan", "park", "measure", "report"])
    parser.add_argument("--protocol", choices=list(CONFIGS), default="families")
    parser.add_argument("--data-dir", default="../shared/sni-full")
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--work", type=Path, default=Path("runs/sni-full"), help="run directories (checkpoints)")
    parser.add_argument(
        "--only", nargs="+", help="run these planned runs only, in this order (names as `plan` prints them)"
    )
    parser.add_argument("--limit", type=int, default=0, help="stop after this many runs (0: all that are known)")
    parser.add_argument("--results", type=Path, help=f"where finished runs are kept (default {store.RESULTS})")
    parser.add_argument("--config", type=Path, help="the protocol's settings from this YAML instead (a dry run)")
    args = parser.parse_args()
    if args.results:
        store.RESULTS = args.results  # every function reads it when called
    if args.config:
        CONFIGS[args.protocol] = args.config
    if args.command == "measure":
        measure(args.protocol, args.work)
        return
    if args.command == "report":
        import at_scale_tables  # its `import at_scale` is this module (see below)

        print(at_scale_tables.report(args.protocol))
        return
    if args.command == "park":
        for target in park(args.protocol, args.work):
            print(f"parked {target}")
        return
    if args.command == "plan":
        runs, waiting = plan(args.protocol)
        for r in only(runs, args.only) if args.only else runs:  # in the order given
            print(f"{'done' if finished(args.protocol, r.name) else 'todo'}  {r.name}")
        for w in waiting:
            print(f"wait  {w}")
        return
    run_all(args.protocol, args.data_dir, args.work, args.model, args.only, args.limit)


if __name__ == "__main__":
    sys.modules.setdefault("at_scale", sys.modules[__name__])  # one module, whether run or imported
    main()

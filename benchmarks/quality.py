"""Quality on Super-NaturalInstructions: OrchMoE vs LoRA, Poly and MHR at parity, several seeds, ablations.

    python benchmarks/quality.py --data-dir ../shared/sni               # everything (hours on a 2-core CPU)
    python benchmarks/quality.py --data-dir ../shared/sni --parts sni-10 --seeds 0

Parts: ``sni-10`` (10 random training tasks), ``sni-many`` (as many training tasks as the split holds, at most
100), ``ablations`` (OrchMoE variants on sni-10, seed 0), ``samples`` (ROUGE-L against training instances per task),
``lr-sweep`` (every method gets the same learning rates on sni-10 seed 0, scored on validation instances of the
training tasks; each method's best is then run with every seed and tested).
``--n-extra N`` also re-scores the lr-sweep's chosen-lr runs, without retraining, on up to N more test instances per
task (never trained on, not the validation ones). Every run also evaluates the split's test tasks (never trained on)
as the unseen set. Each finished run is kept under ``--out`` and skipped when the script is run again, so an
interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchmoe.pipeline.common import prepare_run_dir, read_run_config
from orchmoe.pipeline.config import PRESETS, RunConfig
from orchmoe.pipeline.evaluate import (
    EXTENDED_METRICS,
    METRICS,
    VAL_METRICS,
    evaluate_extended,
    evaluate_run,
    validate_run,
)
from orchmoe.pipeline.trainer import train

# name -> (peft method, RunConfig changes); "orchmoe-tau4" is the temperature fix found on the built-in suite,
# "orchmoe-anneal" anneals the Gumbel temperature from 4 to 1 over training (evaluated at 1), "orchmoe-router1" trains
# the routers at the adapters' learning rate (default: 10x), "orchmoe-t16" has 16 abstract tasks instead of 4,
# "orchmoe-router1-tau4" is orchmoe-router1 at temperature 4. Variants of options since removed from the library
# (Z's init range, one Z shared by all modules, router on layer 6, parameter mixing, one draw per example, the
# Gumbel-sigmoid ablation) are in benchmarks/LOG.md with their results; they ran at commit 637b08f.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "orchmoe": ("orchmoe", {}),
    "orchmoe-tau4": ("orchmoe", {"temperature": 4.0}),
    "orchmoe-anneal": ("orchmoe", {"temperature": 4.0, "temperature_end": 1.0}),  # 4 -> 1, geometric per step
    "orchmoe-router1": ("orchmoe", {"router_lr_multiplier": 1.0}),
    "orchmoe-t16": ("orchmoe", {"n_abstract_tasks": 16}),
    "orchmoe-router1-tau4": ("orchmoe", {"router_lr_multiplier": 1.0, "temperature": 4.0}),
    # Gumbel noise annealed away: tau 1 -> 8 (geometric per step), routers at 1x
    "orchmoe-router1-cool": ("orchmoe", {"router_lr_multiplier": 1.0, "temperature": 1.0, "temperature_end": 8.0}),
    # Gumbel noise scaled linearly 1 -> 0 at tau 1 (training ends on the eval relaxation, Z's sharpness kept)
    "orchmoe-fade": ("orchmoe", {"router_lr_multiplier": 1.0, "noise_scale_end": 0.0}),
    "orchmoe-fade-alloc": ("orchmoe", {"router_lr_multiplier": 1.0, "noise_scale_end": 0.0, "allocation_lr": 0.1}),
    "orchmoe-fade-alloc3": ("orchmoe", {"router_lr_multiplier": 1.0, "noise_scale_end": 0.0, "allocation_lr": 0.3}),
    # the paper's remaining open choices on top of fade-alloc: T = 10 abstract tasks (one per training task of
    # sni-10) and the router's MI term at 1.0 (default 0.1)
    "orchmoe-fade-alloc-t10": (
        "orchmoe",
        {"router_lr_multiplier": 1.0, "noise_scale_end": 0.0, "allocation_lr": 0.1, "n_abstract_tasks": 10},
    ),
    "orchmoe-fade-alloc-mi1": (
        "orchmoe",
        {"router_lr_multiplier": 1.0, "noise_scale_end": 0.0, "allocation_lr": 0.1, "router_mi_weight": 1.0},
    ),
    # the task-skill logits at mttl's absolute module_logits_learning_rate (0.1), for OrchMoE and the baselines alike
    "orchmoe-alloc": ("orchmoe", {"router_lr_multiplier": 1.0, "allocation_lr": 0.1}),
    "poly-alloc": ("poly", {"allocation_lr": 0.1}),
    "mhr-alloc": ("mhr", {"allocation_lr": 0.1}),
    "lora": ("lora", {}),
    "poly": ("poly", {}),
    "mhr": ("mhr", {}),
}
DEFAULT_ROWS = ("orchmoe", "orchmoe-tau4", "orchmoe-anneal", "lora", "poly", "mhr")  # the later attempts: by name
# ablation name -> RunConfig changes to the sni-10 OrchMoE run
ABLATIONS: dict[str, dict[str, Any]] = {
    "orchmoe (tau 1)": {},
    "no task router (uniform w)": {"uniform_task_router": True},
    "no skill router (uniform z)": {"uniform_skill_router": True},
    "tau 0.5": {"temperature": 0.5},
    "tau 4": {"temperature": 4.0},
}
KEYS = ("rouge1", "rougeL", "rougeLsum", "exact_match")


def run_one(cfg: RunConfig, out: Path) -> dict[str, Any]:
    """Train + evaluate once; reuse a finished run of exactly this configuration (any part may share it)."""
    if not ((out / METRICS).is_file() and read_run_config(out) == cfg):
        prepare_run_dir(out, overwrite=True, resume=False)
        train(cfg, out, overwrite=True, progress=False)
        evaluate_run(out, progress=False)
    return json.loads((out / METRICS).read_text())


def rescored(path: Path, settings: dict[str, int], score: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A run's extra scores kept in ``path`` beside its test metrics; ``score()`` again if made with other settings."""
    result = json.loads(path.read_text()) if path.is_file() else None
    if result is None or any(result[k] != v for k, v in settings.items()):
        result = score()
    return result


def validate_one(out: Path, n_val: int) -> float:
    """Validation ROUGE-L of a finished run."""
    result = rescored(out / VAL_METRICS, {"n_val": n_val}, lambda: validate_run(out, n_val, progress=False))
    return float(result["val"]["macro"]["rougeL"])


def extend_one(out: Path, n_val: int, n_extra: int) -> dict[str, Any]:
    """A finished run re-scored on its test instances plus at most n_extra more per task."""
    return rescored(out / EXTENDED_METRICS, {"n_val": n_val, "n_extra": n_extra},
                    lambda: evaluate_extended(out, n_val, n_extra, progress=False))  # fmt: skip


def macros(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The macro-averaged seen and unseen scores of each run, as quality.json keeps them."""
    return [{s: r[s]["macro"] for s in ("seen", "unseen")} for r in results]


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def routing_table(rows: dict[str, list[dict[str, Any]]]) -> str:
    """What the Task Router learned, for the rows that have one: NMI / consistency of argmax abstract task vs the
    true task, abstract tasks in use, and the per-seed seen R-L beside it."""
    lines = ["| method | seen NMI | seen consistency | unseen NMI | abstract tasks used (seen) | seen R-L per seed |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, results in rows.items():
        if "routing" not in results[0]["seen"]:
            continue
        keys = (("seen", "nmi"), ("seen", "consistency"), ("unseen", "nmi"), ("seen", "abstract_tasks_used"))
        cells = [mean_std([float(r[s]["routing"][k]) for r in results]) for s, k in keys]
        per_seed = " / ".join(f"{r['seen']['macro']['rougeL']:.2f}" for r in results)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {per_seed} |")
    return "\n".join(lines)


def table(rows: dict[str, list[dict[str, Any]]], sets: tuple[str, ...] = ("seen", "unseen")) -> str:
    head = "| method | " + " | ".join(f"{s} {k}" for s in sets for k in ("R-1", "R-L", "R-Lsum", "EM")) + " |"
    lines = [head, "|" + "---|" * (1 + 4 * len(sets))]
    for name, results in rows.items():
        cells = [mean_std([r[s]["macro"][k] for r in results]) for s in sets for k in KEYS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_samples(rows: dict[str, list[dict[str, Any]]], samples: list[int], path: Path) -> None:
    """Seen and unseen ROUGE-L against training instances per task, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for method, color in (("orchmoe", "tab:blue"), ("lora", "tab:green")):
        for split, style in (("seen", "-"), ("unseen", ":")):
            scores = [rows[f"{method}, {n} per task"][0][split]["macro"]["rougeL"] for n in samples]
            ax.plot(samples, scores, style, color=color, marker="o", label=f"{method} ({split})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(samples, [str(n) for n in samples])
    ax.set_xlabel("training instances per task (sni-10)")
    ax.set_ylabel("ROUGE-L")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--parts", nargs="+", default=["sni-10", "sni-many", "ablations", "samples", "lr-sweep"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_ROWS), choices=list(VARIANTS))
    parser.add_argument("--n-train", type=int, default=16, help="training instances per task (sni-10)")
    parser.add_argument("--n-test", type=int, default=5, help="test instances per task")
    parser.add_argument("--n-unseen", type=int, default=12, help="unseen tasks from the split's test list")
    parser.add_argument("--many-tasks", type=int, default=100)
    parser.add_argument("--many-train", type=int, default=2, help="training instances per task (sni-many)")
    parser.add_argument("--many-test", type=int, default=2, help="test instances per task (sni-many)")
    parser.add_argument("--many-seeds", type=int, nargs="+", default=[0], help="seeds for sni-many (budget: one)")
    parser.add_argument("--many-methods", nargs="+", choices=list(VARIANTS), help="sni-many rows (default: --methods)")
    parser.add_argument("--samples", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3], help="lr-sweep values")
    parser.add_argument("--n-val", type=int, default=5, help="lr-sweep validation instances per training task")
    parser.add_argument(
        "--n-extra",
        type=int,
        default=0,
        help="lr-sweep: also re-score the chosen-lr runs on up to this many more test instances per task",
    )
    parser.add_argument("--sweep-methods", nargs="+", default=["orchmoe", "lora", "poly", "mhr"], choices=VARIANTS)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-input-tokens", type=int, default=192)
    parser.add_argument("--max-target-tokens", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    args = parser.parse_args()

    base = RunConfig(
        model=args.model, data_dir=str(args.data_dir), n_test=args.n_test, epochs=args.epochs, lr=args.lr,
        max_input_tokens=args.max_input_tokens, max_target_tokens=args.max_target_tokens,
        max_new_tokens=args.max_new_tokens, n_unseen=args.n_unseen,
        router_lr_multiplier=10.0,  # this protocol's setting (the harness default became 1, which it validated)
        precision=args.precision,
    )  # fmt: skip
    report: dict[str, Any] = {"config": dataclasses.asdict(base), "args": {k: str(v) for k, v in vars(args).items()}}
    markdown = []
    settings = {
        "sni-10": {
            **PRESETS["sni-10"],
            "n_train": args.n_train,
            "n_test": args.n_test,
            "n_unseen": args.n_unseen,
            "max_input_tokens": args.max_input_tokens,
        },
        "sni-many": {
            "n_tasks": args.many_tasks,
            "n_train": args.many_train,
            "n_test": args.many_test,
            "n_unseen": args.n_unseen,
        },
    }

    def config(part: str, variant: str, seed: int, **change: Any) -> RunConfig:
        method, changes = VARIANTS[variant]
        return dataclasses.replace(base, method=method, seed=seed, **{**settings[part], **changes, **change})

    def sni10_dir(cfg: RunConfig) -> Path | None:
        """The sni-10 row directory that holds this configuration, if it is one."""
        for variant in VARIANTS:
            if cfg == config("sni-10", variant, cfg.seed):
                return args.out / "sni-10" / f"{variant}-seed{cfg.seed}"
        return None

    args.out.mkdir(parents=True, exist_ok=True)
    plan = {"sni-10": (args.methods, args.seeds), "sni-many": (args.many_methods or args.methods, args.many_seeds)}
    for part, (methods, seeds) in plan.items():
        if part not in args.parts:
            continue
        rows: dict[str, list[dict[str, Any]]] = {}
        for method in methods:
            for seed in seeds:
                result = run_one(config(part, method, seed), args.out / part / f"{method}-seed{seed}")
                rows.setdefault(method, []).append(result)
                print(f"{part} {method} seed {seed}: seen R-L {result['seen']['macro']['rougeL']:.2f}, unseen R-L "
                      f"{result['unseen']['macro']['rougeL']:.2f}", flush=True)  # fmt: skip
        report[part] = {m: macros(rs) for m, rs in rows.items()}
        n_seeds = len(next(iter(rows.values())))
        label = f"{n_seeds} seeds, mean ± std" if n_seeds > 1 else "one seed"
        markdown += [f"## {part} ({label})", "", table(rows), "", routing_table(rows), ""]
    if "ablations" in args.parts:
        rows = {}
        for name, change in ABLATIONS.items():
            cfg = config("sni-10", "orchmoe", args.seeds[0], **change)
            slug = name.replace(" ", "-").replace("(", "").replace(")", "")
            rows[name] = [run_one(cfg, sni10_dir(cfg) or args.out / "ablations" / slug)]
        report["ablations"] = {n: macros(rs)[0] for n, rs in rows.items()}
        markdown += [f"## Ablations on sni-10 (seed {args.seeds[0]})", "", table(rows), "", routing_table(rows), ""]
    if "samples" in args.parts:
        rows = {}
        for method in ("orchmoe", "lora"):
            for n in args.samples:
                cfg = config("sni-10", method, args.seeds[0], n_train=n)
                out = sni10_dir(cfg) or args.out / "samples" / f"{method}-{n}"
                rows[f"{method}, {n} per task"] = [run_one(cfg, out)]
        report["samples"] = {n: rs[0]["seen"]["macro"]["rougeL"] for n, rs in rows.items()}
        markdown += ["## Sample efficiency on sni-10 (seen R-L)", "", table(rows, ("seen",)), ""]
        plot_samples(rows, args.samples, args.out / "samples.png")
    if "lr-sweep" in args.parts:

        def swept(variant: str, cfg: RunConfig) -> Path:
            return sni10_dir(cfg) or args.out / "lr-sweep" / f"{variant}-lr{cfg.lr:g}-seed{cfg.seed}"

        val: dict[str, dict[float, float]] = {}
        for variant in args.sweep_methods:  # the whole sweep first: the choice needs every value
            for lr in args.lrs:
                cfg = config("sni-10", variant, args.seeds[0], lr=lr)
                out = swept(variant, cfg)
                run_one(cfg, out)
                val.setdefault(variant, {})[lr] = validate_one(out, args.n_val)
                print(f"lr-sweep {variant} lr {lr:g}: validation R-L {val[variant][lr]:.2f}", flush=True)
        chosen = {variant: max(scores, key=scores.__getitem__) for variant, scores in val.items()}
        rows, dirs = {}, {}
        for variant, best in chosen.items():
            for seed in args.seeds:
                cfg = config("sni-10", variant, seed, lr=best)
                name, out = f"{variant} (lr {best:g})", swept(variant, cfg)
                rows.setdefault(name, []).append(run_one(cfg, out))
                dirs.setdefault(name, []).append(out)
        tested = {n: macros(rs) for n, rs in rows.items()}
        report["lr-sweep"] = {"validation_rougeL": val, "chosen": chosen, "test": tested}
        sweep = ["| method | " + " | ".join(f"val R-L at lr {lr:g}" for lr in args.lrs) + " | chosen |",
                 "|" + "---|" * (len(args.lrs) + 2)]  # fmt: skip
        sweep += [f"| {v} | " + " | ".join(f"{s[lr]:.2f}" for lr in args.lrs) + f" | {chosen[v]:g} |"
                  for v, s in val.items()]  # fmt: skip
        title = f"## Learning-rate sweep (sni-10 seed {args.seeds[0]}, {args.n_val} validation instances per task)"
        markdown += [title, "", "\n".join(sweep), "", f"### Each method at its chosen lr ({len(args.seeds)} seeds)",
                     "", table(rows), "", routing_table(rows), ""]  # fmt: skip
        if args.n_extra:
            extended = {
                name: [extend_one(out, args.n_val, args.n_extra) for out in outs] for name, outs in dirs.items()
            }
            report["lr-sweep"]["extended"] = {n: macros(rs) for n, rs in extended.items()}
            size = next(iter(extended.values()))[0]["n_examples"]  # the same sets for every method of a seed
            markdown += [f"### The same runs on a larger test set (up to {args.n_extra} more instances per task)", "",
                         f"Seed {args.seeds[0]}: {size['seen']} seen, {size['unseen']} unseen test examples.", "",
                         table(extended), "", routing_table(extended), ""]  # fmt: skip
    (args.out / "quality.json").write_text(json.dumps(report, indent=1))
    (args.out / "quality.md").write_text("\n".join(markdown))
    print("\n".join(markdown))


if __name__ == "__main__":
    main()

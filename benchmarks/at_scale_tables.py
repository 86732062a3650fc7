"""The tables of ``at_scale.py report``, from the committed files only: every finished run's scores, OrchMoE against
every method at its chosen lr, the paired differences to LoRA of OrchMoE, its remedies and the mixing allocation (and
its control), the pre-registered rules on validation, how far the stack alone moves a run, the router measures."""

from __future__ import annotations

import json
from typing import Any

import at_scale
import at_scale_store as store
import paired
import router_measures
from at_scale import CONTROL, MIX, REMEDIES, RERUN, SCORES, SEEDS, SETS, chosen_lr, slug
from at_scale_store import ROUTERS, finished

from orchmoe.pipeline import common


def report(protocol: str) -> str:
    """The protocol's tables from the committed files: every finished run's scores, the paired differences of the
    chosen OrchMoE (and its remedies) against LoRA per seed, and the router measures."""
    folders = [f for f in sorted((store.RESULTS / protocol).glob("*")) if finished(protocol, f.name)]
    lines = [f"## {protocol}: {len(folders)} finished runs", "",
             "| run | val R-L | " + " | ".join(f"{s} R-1 / R-L / R-Lsum / EM" for s in SETS) + " |",
             "|---|---|" + "---|" * len(SETS)]  # fmt: skip
    scores: dict[str, dict[str, Any]] = {}
    val: dict[str, float] = {}
    for folder in folders:
        m = json.loads((folder / "metrics.json").read_text())
        scores[folder.name], val[folder.name] = m, at_scale.validation_rouge_l(folder)
        cells = [" / ".join(f"{m[s]['macro'][k]:.2f}" for k in SCORES) if s in m else "-" for s in SETS]
        lines.append(f"| {folder.name} | {val[folder.name]:.2f} | " + " | ".join(cells) + " |")
    chosen = {m: chosen_lr(protocol, m) for m in at_scale.ORDER}
    fixed = protocol in at_scale.FIXED_LRS
    lines += [
        "",
        ("Learning rates fixed in advance: " if fixed else "Learning rates chosen on validation R-L: ")
        + ", ".join(f"{m} {lr:g}" if lr else f"{m} (grid unfinished)" for m, lr in chosen.items()),
        "",
    ]
    lines += standing_lines(scores, chosen) + paired_lines(scores, val, chosen, protocol)
    measured = [f for f in folders if (f / ROUTERS).is_file()]
    if measured:
        if lines[-1]:  # one blank line before the table
            lines.append("")
        lines += ["| run | allocation from start, first -> last | adapters apart (mean / max) | TV between abstract "
                  "tasks (mean / max) | effective skills | allocation grad / skills grad (median) | NMI task / family "
                  "(seen, held-out, unseen) | hard - soft R-L (seen, held-out, unseen) |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        lines += [router_row(folder.name, json.loads((folder / ROUTERS).read_text())) for folder in measured]
    return "\n".join(lines)


def router_row(name: str, r: dict[str, Any]) -> str:
    """One run's router measures: its allocation's distance from the start (the diagonal's TV from uniform, the mixing
    matrices' distance from I), how far apart the abstract tasks' adapters end, the skill mixes, NMI, hard routing."""
    key = next((k for k in router_measures.DISTANCES if r.get(f"{k}_first") is not None), None)
    moved = f"{key.split('_')[0]} {r[f'{key}_first']:.4f} -> {r[f'{key}_last']:.4f}" if key else "-"
    nmi = ", ".join(f"{r['nmi'][s]['task']:.2f} / {r['nmi'][s]['family']:.2f}" for s in SETS if s in r["nmi"])
    hard = ", ".join(f"{r['hard'][s]['rougeL'] - r['soft'][s]['rougeL']:+.2f}" for s in SETS if s in r["hard"])
    apart = r.get("adapter_spread")
    apart_cell = f"{apart['between_tasks_mean']:.3f} / {apart['between_tasks_max']:.3f}" if apart else "-"
    spread = r.get("allocation_spread", {})
    between = (f"{spread['between_tasks_tv_mean']:.3f} / {spread['between_tasks_tv_max']:.3f} | "
               f"{spread['effective_skills']:.2f}") if spread else "- | -"  # fmt: skip
    return f"| {name} | {moved} | {apart_cell} | {between} | {r['grad_ratio_median']:.4f} | {nmi} | {hard} |"


STACK = common.STACK
EARLIER_STACK = "transformers 5.23 / 5.24 (before runs recorded their versions)"


def stack(protocol: str, name: str) -> str:
    """The stack a finished run was made on, as its data.json records it (the packages whose versions can move
    results), or the earlier stack for runs made before versions were recorded."""
    data = json.loads((store.RESULTS / protocol / name / "data.json").read_text())
    versions = data.get("versions_at_start", data.get("versions"))
    if not versions:
        return EARLIER_STACK
    return ", ".join(f"{k} {versions[k]}" for k in STACK if k in versions)


def stack_note(protocol: str, a: tuple[str, float], b: tuple[str, float], seeds: list[int]) -> list[str]:
    """A line when the paired runs of A and B were not all made on one stack (none when they were)."""
    stacks = {run: {stack(protocol, slug(*run, s)) for s in seeds} for run in (a, b)}
    if len(stacks[a] | stacks[b]) <= 1:
        return []
    said = "; ".join(f"{slug(*run, 0).rsplit('-seed', 1)[0]}: {' | '.join(sorted(s))}" for run, s in stacks.items())
    return [f"Paired across stacks ({said}).", ""]


def seed_pairs(
    scores: dict[str, dict[str, Any]], a: tuple[str, float], b: tuple[str, float]
) -> tuple[dict[int, paired.Scores], dict[int, paired.Scores]]:
    """The test scores of runs A and B, each a (variant, lr), at every seed both have finished."""
    seeds = [s for s in SEEDS if slug(*a, s) in scores and slug(*b, s) in scores]
    runs_a, runs_b = ({s: paired.as_scores(scores[slug(*run, s)]) for s in seeds} for run in (a, b))
    return runs_a, runs_b


def standing_lines(scores: dict[str, dict[str, Any]], chosen: dict[str, float | None]) -> list[str]:
    """OrchMoE against every other method, each at its chosen lr: test R-L paired over the seeds both ran."""
    lr, rows = chosen["orchmoe"], []
    for other in at_scale.ORDER[1:]:
        other_lr = chosen[other]
        a, b = seed_pairs(scores, ("orchmoe", lr), (other, other_lr)) if lr and other_lr else ({}, {})
        if a:
            diffs = paired.differences(a, b)
            cells = [f"{paired.summary(d)} ({paired.standing(d)})" if (d := diffs.get((s, "rougeL"))) else "-"
                     for s in SETS]  # fmt: skip
            rows.append(f"| {other} | {', '.join(map(str, a))} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    head = "OrchMoE minus each method, test R-L (mean ± sd over the paired seeds; leads / trails: at every seed):"
    return [head, "", "| method | seeds | " + " | ".join(SETS) + " |", "|---|---|" + "---|" * len(SETS), *rows, ""]


def paired_lines(
    scores: dict[str, dict[str, Any]], val: dict[str, float], chosen: dict[str, float | None], protocol: str
) -> list[str]:
    """OrchMoE, each remedy, the mixing allocation and its control against LoRA, paired by seed at the chosen lrs
    (`paired.py`'s table), and each remedy's and the mixing allocation's validation R-L against OrchMoE's per seed:
    the pre-registered rules (above it at every seed; for the mixing allocation, on both of its protocols)."""
    lr, lora_lr, lines = chosen["orchmoe"], chosen["lora"], []
    if lr is None:
        return lines
    variants = {"orchmoe": lr, **dict.fromkeys(REMEDIES, lr), MIX: chosen_lr(protocol, MIX), CONTROL: lora_lr}
    for variant, own_lr in variants.items():
        if own_lr is None:
            continue
        a, b = seed_pairs(scores, (variant, own_lr), ("lora", lora_lr)) if lora_lr else ({}, {})
        if a:
            lines += [f"{variant} (A) minus LoRA (B), test:", "", *paired.difference_table(a, b), ""]
            lines += stack_note(protocol, (variant, own_lr), ("lora", lora_lr), list(a))
        runs = {s: slug(variant, own_lr, s) for s in SEEDS if slug(variant, own_lr, s) in scores}
        ruled = variant in REMEDIES or variant == MIX
        base = {s: slug("orchmoe", lr, s) for s in runs if ruled and slug("orchmoe", lr, s) in scores}
        if base:
            diffs = [val[runs[s]] - val[base[s]] for s in base]
            lines += [f"{variant} minus OrchMoE, validation R-L at seeds {list(base)}: "
                      + ", ".join(f"{d:+.2f}" for d in diffs)
                      + f" (above at {sum(d > 0 for d in diffs)}; the rule needs all of {len(SEEDS)}"
                      + (", here and on the other protocol)" if variant == MIX else ")"), ""]  # fmt: skip
    return lines + rerun_lines(scores, val, lr, protocol)


def rerun_lines(scores: dict[str, dict[str, Any]], val: dict[str, float], lr: float, protocol: str) -> list[str]:
    """How far the same run (OrchMoE, seed 0) moves from one stack to the other: the rerun minus the original."""
    new, old = slug(RERUN, lr, 0), slug("orchmoe", lr, 0)
    if new not in scores or old not in scores:
        return []
    moved = [f"val {val[new] - val[old]:+.2f}"] + [
        f"{s} {scores[new][s]['macro']['rougeL'] - scores[old][s]['macro']['rougeL']:+.2f}"
        for s in SETS if s in scores[new] and s in scores[old]
    ]  # fmt: skip
    return [f"The same run on two stacks ({new} on {stack(protocol, new)}; {old} on {stack(protocol, old)}), "
            f"R-L new minus old: " + ", ".join(moved), ""]  # fmt: skip

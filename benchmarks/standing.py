"""The current standing, as BENCHMARKS.md and the README open with it: the paper's OrchMoE (its diagonal allocation) and
the mixing allocation, each minus every baseline at the same seed (test R-L, at the learning rates validation chose);
the verdict's words, by the reading rule fixed in ``benchmarks/LOG.md`` ("The verdict's words"); the mixing
allocation's pre-registered rule on validation. Everything here reads the committed results only
(``benchmarks/results/sni-full``); ``benchmarks/report.py`` writes it out.
"""

from __future__ import annotations

import json

import at_scale
import at_scale_store as store
import paired

SPLIT_NAMES = {"seen": "seen tasks", "held_out": "held-out members of seen families", "unseen": "unseen tasks"}
VERDICT_NAMES = {"orchmoe": "OrchMoE", at_scale.MIX: "mixing allocation"}
PROSE_NAMES = {"orchmoe": "The paper's OrchMoE", at_scale.MIX: "The mixing allocation"}
# the baselines each allocation is worded against: those its protocols run at 3 seeds
WORDED_AGAINST = {"orchmoe": ("lora",), at_scale.MIX: ("lora", at_scale.CONTROL)}
SEEDS_FOR_A_WORD = 3


def lr_of(protocol: str, variant: str) -> float | None:
    """The lr a variant's runs use: its own choice, or OrchMoE's for the remedies."""
    return at_scale.chosen_lr(protocol, "orchmoe" if variant in at_scale.REMEDIES else variant)


def test_scores(protocol: str, variant: str, lr: float | None) -> dict[int, paired.Scores]:
    """The finished runs of ``variant`` at ``lr``: {seed: macro test scores}."""
    if lr is None:
        return {}
    found = {}
    for seed in at_scale.SEEDS:
        folder = store.finished(protocol, at_scale.slug(variant, lr, seed))
        if folder is not None:
            found[seed] = paired.as_scores(json.loads((folder / "metrics.json").read_text()))
    return found


def differences(protocol: str, mine: str, other: str) -> dict[str, dict[int, float]]:
    """{split: {seed: R-L of ``mine`` minus ``other``'s}}, each at its chosen lr, over the seeds both finished."""
    a, b = (test_scores(protocol, v, lr_of(protocol, v)) for v in (mine, other))
    result: dict[str, dict[int, float]] = {}
    for split in paired.SPLITS:
        diffs = {s: a[s][split]["rougeL"] - b[s][split]["rougeL"] for s in a
                 if s in b and split in a[s] and split in b[s]}  # fmt: skip
        if diffs:
            result[split] = diffs
    return result


def cell(diffs: dict[int, float]) -> str:
    """mean ± sd (n seeds, leads / trails at every seed, or mixed); one seed is a single draw, no standing."""
    values = list(diffs.values())
    if len(values) == 1:
        return f"{values[0]:+.2f} (1 seed)"
    return f"{paired.summary(values)} ({len(values)} seeds, {paired.standing(values)})"


def verdict_table(protocols: list[str]) -> list[str]:
    """The paper's OrchMoE and the mixing allocation, each minus every baseline (LoRA, LoRA at the mixing
    allocation's parameter count, Poly, MHR), test R-L per protocol, seen and unseen tasks."""
    mine = tuple(VERDICT_NAMES)
    lines = ["| minus | protocol | " + " | ".join(f"{VERDICT_NAMES[m]}, {split} tasks" for m in mine
                                                   for split in ("seen", "unseen")) + " |",
             "|---|---|" + "---|" * 2 * len(mine)]  # fmt: skip
    for protocol in protocols:
        for other in ("lora", at_scale.CONTROL, "poly", "mhr"):
            found = [differences(protocol, m, other) for m in mine]
            cells = [cell(d[split]) if split in d else "-" for d in found for split in ("seen", "unseen")]
            if any(c != "-" for c in cells):
                lines.append(f"| {other} | {protocol} | " + " | ".join(cells) + " |")
    return lines


def worded(diffs: dict[int, float]) -> tuple[str | None, str]:
    """(helps / hurts / ties, or None before 3 paired seeds; the phrase that shows it: mean, 95 % interval, and
    whether it is ahead or behind at every seed)."""
    values = list(diffs.values())
    if len(values) < SEEDS_FOR_A_WORD:
        return None, f"has no word yet ({len(values)} of {SEEDS_FOR_A_WORD} seeds)"
    mean, low, high = paired.interval(values)
    every = {"leads": ", ahead at every seed", "trails": ", behind at every seed"}.get(paired.standing(values), "")
    word = paired.word(low, high)
    return word, f"{word} ({mean:+.2f}, 95\u00a0% interval {low:+.2f} to {high:+.2f}{every})"


def clause(protocol: str, mine: str, other: str, tally: dict[str, list[str]]) -> str | None:
    """One allocation against one baseline on every split they share, in words; each worded split goes to ``tally``
    ({word: [where]}). None when they share no seed."""
    found = differences(protocol, mine, other)
    if not found:
        return None
    said = {split: worded(found[split]) for split in paired.SPLITS if split in found}
    for split, (word, _) in said.items():
        if word is not None:
            tally[word].append(f"{VERDICT_NAMES[mine]} against {other}, {protocol}, {SPLIT_NAMES[split]}")
    head = f"{PROSE_NAMES[mine]} against {other}: "
    if all(word is None for word, _ in said.values()):
        return head + f"{max(map(len, found.values()))} of {SEEDS_FOR_A_WORD} seeds, no word yet"
    return head + "; ".join(f"on {SPLIT_NAMES[split]} it {phrase}" for split, (_, phrase) in said.items())


def verdict_lines(protocols: list[str]) -> tuple[list[str], str]:
    """(a bullet per protocol: each allocation against each baseline it is worded against, on each test split; the
    tally over every worded comparison). Nothing for a protocol with no pair."""
    bullets: list[str] = []
    tally: dict[str, list[str]] = {"helps": [], "hurts": [], "ties": []}
    for protocol in protocols:
        found = [
            clause(protocol, mine, other, tally) for mine, baselines in WORDED_AGAINST.items() for other in baselines
        ]
        if clauses := [c for c in found if c is not None]:
            bullets.append(f"- **{protocol}**. " + ". ".join(clauses) + ".")
    count = sum(map(len, tally.values()))
    if not count:
        return bullets, ""
    parts = [f"{w} in {len(where)}" + (f" ({'; '.join(where)})" if where and w != "ties" else "")
             for w, where in tally.items()]  # fmt: skip
    summary = (f"Of the {count} comparisons with {SEEDS_FOR_A_WORD} paired seeds so far, routing " + ", ".join(parts)
               + "; where it ties, the interval holds 0: the seeds do not resolve a difference.")  # fmt: skip
    return bullets, summary


def rule_lines(protocols: list[str]) -> list[str]:
    """The mixing allocation's pre-registered rule: it becomes the default only if its validation R-L is above the
    paper's allocation's at every seed of both of its protocols. Per protocol, the paired validation differences."""
    rows, every = [], []
    for protocol in (p for p in protocols if p in at_scale.MIXED):
        lrs = [(v, lr_of(protocol, v)) for v in (at_scale.MIX, "orchmoe")]
        if any(lr is None for _, lr in lrs):
            continue
        diffs = {}
        for seed in at_scale.SEEDS:
            mix, diagonal = (at_scale.validation_score(protocol, at_scale.slug(v, lr, seed)) for v, lr in lrs)
            if mix is not None and diagonal is not None:
                diffs[seed] = mix - diagonal
        if diffs:
            rows.append(f"| {protocol} | " + ", ".join(f"seed {s}: {d:+.2f}" for s, d in diffs.items())
                        + f" | {sum(d > 0 for d in diffs.values())} of {len(diffs)} |")  # fmt: skip
            every += diffs.values()
    if not rows:
        return []
    above, paired_seeds = sum(d > 0 for d in every), len(every)
    needed = len(at_scale.MIXED) * len(at_scale.SEEDS)
    if above < paired_seeds:
        state = "it cannot win: it is not above at every paired seed, so the paper's allocation stays the default"
    elif paired_seeds < needed:
        state = f"above at every seed so far ({above} of the {needed} seeds the rule needs)"
    else:
        state = "above at every seed of both protocols: the rule makes it the default"
    return [
        "The mixing allocation's rule, fixed before its runs (LOG.md): it becomes the default allocation only if its "
        "validation R-L is above the paper's allocation's at every seed of families and sni-100. Validation R-L, "
        f"mixing minus diagonal, at each paired seed: {state}.",
        "",
        "| protocol | mixing minus diagonal, validation R-L | above at |",
        "|---|---|---|",
        *rows,
        "",
    ]

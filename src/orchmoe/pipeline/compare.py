"""`orchmoe compare`: every method on one task selection, same data order, steps, lengths and decoding."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import metrics, plots
from .common import prepare_run_dir, resolve_data_dir, stack_versions, write_json
from .config import RunConfig
from .evaluate import METRICS, PREDICTIONS, evaluate_run
from .methods import METHOD_OBJECTS, ParamCounts, check_parity
from .trainer import LOG_FILE, train


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(results: dict[str, Any]) -> str:
    head = "| method | trainable params (adapter + router) | seen R-1 | seen R-L | seen R-Lsum | seen EM |" \
        " unseen R-1 | unseen R-L | unseen R-Lsum | unseen EM |"  # fmt: skip
    lines = [head, "|" + "---|" * 10]
    for method, r in results.items():
        p = r["parameters"]
        cells = [method, f"{p['adapter'] + p['router']:,} ({p['adapter']:,} + {p['router']:,})"]
        for name in ("seen", "unseen"):
            macro = r.get(name, {}).get("macro", {})
            cells += [_fmt(macro.get(k)) for k in ("rouge1", "rougeL", "rougeLsum", "exact_match")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(
    cfg: RunConfig, out: Path, methods: list[str], overwrite: bool = False, resume: bool = False, progress: bool = True
) -> str:
    """Train and evaluate ``methods``; write results.md, results.json and PNG plots in ``out``."""
    out = Path(out)
    began = time.time()
    prepare_run_dir(out, overwrite=overwrite, resume=resume)
    cfg = resolve_data_dir(cfg, out)
    results: dict[str, Any] = {}
    for i, method in enumerate(methods, start=1):
        run = out / method
        run_cfg = dataclasses.replace(cfg, method=method)
        if progress:
            print(f"[{i}/{len(methods)}] {method}", flush=True)
        t0 = time.time()
        if not (resume and (run / METRICS).is_file()):
            train(run_cfg, run, resume=resume, overwrite=not resume, progress=progress)
            t1 = time.time()
            evaluate_run(run, progress=progress)
            timing = {"train_seconds": round(t1 - t0, 1), "eval_seconds": round(time.time() - t1, 1)}
            write_json(run / "timing.json", timing)
        result = json.loads((run / METRICS).read_text())
        result["parameters"] = json.loads((run / "data.json").read_text())["parameters"]
        result["timing"] = json.loads((run / "timing.json").read_text())
        results[method] = result
    check_parity({m: ParamCounts(**r["parameters"]) for m, r in results.items()})
    intervals, differences = uncertainty(out, list(results))
    summary = {"config": cfg.to_dict(), "methods": results, "seconds": round(time.time() - began, 1),
               "versions": stack_versions(), "intervals": intervals, "differences_to_lora": differences}  # fmt: skip
    write_json(out / "results.json", summary)
    figures = _plots(out, results, cfg, intervals)
    report = _markdown(cfg, results, figures, summary["seconds"], out, differences)
    (out / "results.md").write_text(report)
    return report


SETS = ("seen", "unseen")


def uncertainty(out: Path, methods: list[str]) -> tuple[dict, dict]:
    """From each method's predictions: every method's macro ROUGE-L per test set with its 95 % interval, and each
    method's paired difference to LoRA with its interval and whether the test set resolves it (the interval leaves
    out 0); both from a bootstrap over test examples within tasks (``metrics.macro_interval``)."""
    scores = {}
    for method in methods:
        rows = [json.loads(line) for line in (out / method / PREDICTIONS).read_text().splitlines() if line.strip()]
        scores[method] = {s: metrics.example_scores([r for r in rows if r["set"] == s]) for s in SETS}
    intervals = {m: {s: list(metrics.macro_interval(v)) for s, v in by_set.items() if v}
                 for m, by_set in scores.items()}  # fmt: skip
    differences: dict[str, dict[str, dict[str, Any]]] = {}
    for method in methods:
        if method == "lora" or "lora" not in scores:
            continue
        for s in SETS:
            if scores[method][s]:
                diff, low, high = metrics.macro_interval(scores[method][s], scores["lora"][s])
                n = len(scores[method][s])
                differences.setdefault(method, {})[s] = {"diff": diff, "low": low, "high": high, "examples": n,
                                                         "resolved": not low <= 0.0 <= high}  # fmt: skip
    return intervals, differences


def difference_lines(differences: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """One line per comparison: the difference to LoRA, its interval, and whether this test size resolves it."""
    lines = []
    for method, by_set in differences.items():
        for s, d in by_set.items():
            verdict = (f"resolved at this test size ({'ahead' if d['diff'] > 0 else 'behind'})" if d["resolved"]
                       else "not resolved at this test size: the interval holds 0")  # fmt: skip
            lines.append(f"- {method} minus LoRA, {s} ROUGE-L: {d['diff']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] "
                         f"over {d['examples']} examples: {verdict}.")  # fmt: skip
    return lines


def _plots(out: Path, results: dict[str, Any], cfg: RunConfig, intervals: dict | None = None) -> list[str]:
    figures = ["rouge.png", "loss.png"]
    plots.rouge_bars(results, out / "rouge.png", intervals)
    logs = {m: [json.loads(line) for line in (out / m / LOG_FILE).read_text().splitlines()] for m in results}
    plots.loss_curves(logs, out / "loss.png")
    if "orchmoe" in results:
        if cfg.allocation == "diagonal":  # the skill mixes (the mixing allocation has none to draw)
            plots.allocation_figure(out / "orchmoe" / "adapter", out / "allocation.png")
            figures.append("allocation.png")
        rows, matrix = [], []
        for name in ("seen", "unseen"):
            by_task = results["orchmoe"].get(name, {}).get("task_weights_by_task", {})
            for task, weights in by_task.items():
                rows.append(f"{plots.short(task)} ({name})")
                matrix.append(weights)
        plots.heatmap(
            np.array(matrix), rows, [str(t) for t in range(len(matrix[0]))],
            "mean abstract-task weights per true task", "abstract task", out / "routing.png",
        )  # fmt: skip
        figures.append("routing.png")
    return figures


def lr_text(cfg: RunConfig) -> str:
    if cfg.lr is not None:
        return f"{cfg.lr:g}"
    validated = ", ".join(f"{name} {method.validated_lr:g}" for name, method in METHOD_OBJECTS.items())
    return f"each method's validated one ({validated}; benchmarks/LOG.md)"


AT_SCALE = ("The project's verdict at scale (sni-full: about 250 steps, 3 seeds, thousands of test examples; "
            "BENCHMARKS.md, \"At scale: every method minus LoRA\"): OrchMoE trails a tuned LoRA on trained tasks and "
            "ties it, or leads slightly, on unseen ones, and not by routing.")  # fmt: skip


def _markdown(cfg: RunConfig, results: dict[str, Any], figures: list[str], seconds: float, out: Path,
              differences: dict | None = None) -> str:  # fmt: skip
    data = json.loads((out / next(iter(results)) / "data.json").read_text())
    what = "the built-in suite" if cfg.data_dir and Path(cfg.data_dir).name == "suite" else f"`{cfg.data_dir}`"
    lines = [
        "# OrchMoE vs baselines",
        "",
        f"**One seed ({cfg.seed}) on {what}, a few test examples per task: a demonstration, not a verdict.** Each "
        "difference to LoRA below carries a 95 % interval (paired bootstrap over the test examples, within tasks); "
        "one the interval does not resolve is noise at this test size. " + AT_SCALE,
        "",
        *difference_lines(differences or {}),
        "",
        f"Model `{cfg.model}`, data `{cfg.data_dir}` (split `{cfg.split}`), seed {cfg.seed}: "
        f"{len(data['train_tasks'])} training tasks x {cfg.n_train} instances, {cfg.n_test} test instances per task, "
        f"{len(data['unseen_tasks'])} unseen tasks. Batch {cfg.batch_size}, {cfg.epochs} epoch(s)"
        f"{f', at most {cfg.max_steps} steps' if cfg.max_steps else ''}, lr {lr_text(cfg)} "
        f"(routers x{cfg.router_lr_multiplier:g}), {cfg.schedule} schedule, greedy decoding (<= {cfg.max_new_tokens} "
        "tokens). Scores: macro averages over tasks, 0-100.",
        "",
        table(results),
        "",
        f"Parity: LoRA rank {cfg.n_skills * cfg.r}; OrchMoE, Poly and MHR (n_splits {cfg.n_splits}) with "
        f"{cfg.n_skills} skills of rank {cfg.r}. Poly/MHR get the true task id of seen tasks; for unseen tasks "
        "they use the average of their trained task rows.",
    ]
    if "orchmoe" in results:
        for name in ("seen", "unseen"):
            routing = results["orchmoe"].get(name, {}).get("routing")
            if routing:
                lines.append(
                    f"OrchMoE routing on {name} test prompts: purity {routing['purity']:.2f}, consistency "
                    f"{routing['consistency']:.2f}, "
                    f"NMI {_fmt(routing['nmi'])}, {routing['abstract_tasks_used']} of {cfg.n_abstract_tasks} abstract "
                    "tasks used."
                )
    timing = ", ".join(
        f"{m} {r['timing']['train_seconds']:.0f}+{r['timing']['eval_seconds']:.0f} s" for m, r in results.items()
    )
    lines += ["", f"Time (train + eval): {timing}; total {seconds:.0f} s.", ""]
    lines += [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"

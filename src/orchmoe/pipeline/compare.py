"""`orchmoe compare`: every method on one task selection, same data order, steps, lengths and decoding."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import plots
from .common import prepare_run_dir, resolve_data_dir, write_json
from .config import RunConfig
from .evaluate import METRICS, evaluate_run
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
    summary = {"config": cfg.to_dict(), "methods": results, "seconds": round(time.time() - began, 1)}
    write_json(out / "results.json", summary)
    figures = _plots(out, results, cfg)
    report = _markdown(cfg, results, figures, summary["seconds"], out)
    (out / "results.md").write_text(report)
    return report


def _plots(out: Path, results: dict[str, Any], cfg: RunConfig) -> list[str]:
    figures = ["rouge.png", "loss.png"]
    plots.rouge_bars(results, out / "rouge.png")
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
    return f"each method's validated one ({validated}; BENCHMARKS.md)"


def _markdown(cfg: RunConfig, results: dict[str, Any], figures: list[str], seconds: float, out: Path) -> str:
    data = json.loads((out / next(iter(results)) / "data.json").read_text())
    lines = [
        "# OrchMoE vs baselines",
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

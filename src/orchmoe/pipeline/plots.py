"""Figures of a comparison: ROUGE per method, the learned task-skill allocation, inferred vs true tasks, losses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from safetensors.torch import load_file

from ..tuner import OrchMoEConfig, SkillRouter
from ..tuner.router import distance_from_uniform

METRIC_LABELS = {"rouge1": "ROUGE-1", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum", "exact_match": "EM"}


def rouge_bars(results: dict[str, Any], path: Path, intervals: dict[str, dict[str, list[float]]] | None = None) -> None:
    """Every score per method and test set; ``intervals`` ({method: {set: [value, low, high]}} of ROUGE-L) draws each
    ROUGE-L bar's 95 % interval."""
    sets = [s for s in ("seen", "unseen") if any(s in r for r in results.values())]
    fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 3.8), squeeze=False)
    methods = list(results)
    width = 0.8 / len(METRIC_LABELS)
    for ax, name in zip(axes[0], sets, strict=True):
        for k, (metric, label) in enumerate(METRIC_LABELS.items()):
            values = [results[m].get(name, {}).get("macro", {}).get(metric, 0.0) for m in methods]
            found = [(intervals or {}).get(m, {}).get(name) for m in methods] if metric == "rougeL" else []
            errors = None
            if found and all(found):
                errors = np.array([[v - lo, hi - v] for v, lo, hi in found]).T  # (2, methods)
            ax.bar(np.arange(len(methods)) + (k - 1.5) * width, values, width, label=label, yerr=errors, capsize=3)
        ax.set_xticks(np.arange(len(methods)), methods)
        ax.set_title(f"{name} tasks (macro average)" + ("; R-L with 95 % intervals" if intervals else ""))
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("score")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def learned_allocations(adapter_dir: Path) -> np.ndarray:
    """The eval-time task-skill allocation z = relax(Z / tau) of every module: (M, T, S)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    fields = {k: v for k, v in config.items() if k in OrchMoEConfig.__dataclass_fields__ and k != "peft_type"}
    router = SkillRouter(OrchMoEConfig(**fields))
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    allocations = []
    for key, logits in tensors.items():
        if key.endswith("skill_router.logits"):
            with torch.no_grad():
                router.logits.copy_(logits)
                allocations.append(router.allocation(stochastic=False).numpy())
    if not allocations:
        raise ValueError(f"{adapter_dir}: no OrchMoE allocation logits found.")
    return np.stack(allocations)


def allocation_figure(adapter_dir: Path, path: Path) -> float:
    """The allocation averaged over modules, coloured by its deviation from uniform (white = 1/S, so a flat
    allocation shows as a blank block), titled with the mean total-variation distance from uniform of the modules'
    rows (before averaging, so that modules pulling in opposite directions do not cancel); returns that distance."""
    z = learned_allocations(adapter_dir)  # (M, T, S)
    uniform = 1.0 / z.shape[-1]
    tv = float(distance_from_uniform(torch.from_numpy(z)))
    mean = z.mean(axis=0)  # (T, S)
    # at least +-1/(2S): deviations too small to matter stay white instead of being stretched over the colour range
    spread = max(float(np.abs(mean - uniform).max()), 0.5 * uniform)
    fig, ax = plt.subplots(figsize=(5.0 + 0.4 * mean.shape[1], 1.5 + 0.35 * mean.shape[0]))
    image = ax.imshow(mean, cmap="RdBu_r", aspect="auto", vmin=uniform - spread, vmax=uniform + spread)
    ax.set_xticks(range(mean.shape[1]), [str(s) for s in range(mean.shape[1])])
    ax.set_yticks(range(mean.shape[0]), [f"task {t}" for t in range(mean.shape[0])], fontsize=7)
    ax.set_xlabel("skill")
    title = f"task-skill allocation, mean over {z.shape[0]} modules (white = uniform 1/{z.shape[-1]})\n"
    ax.set_title(title + f"distance from uniform: mean TV {tv:.4f} (0 = OrchMoE is a LoRA of rank S*r)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return tv


def heatmap(matrix: np.ndarray, rows: list[str], cols: list[str], title: str, xlabel: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.0 + 0.4 * len(cols), 1.5 + 0.35 * len(rows)))
    image = ax.imshow(matrix, cmap="viridis", aspect="auto", vmin=0)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def loss_curves(logs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for method, log in logs.items():
        points = [(e["step"], e["loss"]) for e in log if "loss" in e]
        if points:
            ax.plot(*zip(*points, strict=True), label=method, marker=".")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (target tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def short(task: str) -> str:
    return task if len(task) <= 32 else task[:30] + ".."

"""The routers of one finished OrchMoE run, measured (``at_scale.py measure`` writes them to ``routers.json``): the
allocation over training and Z's gradient against the skills' (from the training log), how far apart the abstract
tasks' skill mixes are (from the adapter), and, on every test set, hard routing's scores beside soft routing's and
the NMI of the prompts' argmax abstract tasks against their tasks and families."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def family(task: str) -> str:
    """A task's family: the word after ``taskNNN_`` (scan, jeopardy, odd-man-out, stereoset, detoxifying-lms)."""
    return task.split("_")[1] if "_" in task else task


def log_measures(log: list[dict[str, Any]]) -> dict[str, Any]:
    """The allocation over training and Z's gradient against the skills', from the training log's entries."""
    keys = ("step", "allocation_tv", "grad_norm_allocation", "grad_norm_adapter", "abstract_tasks_used")
    series = [{k: e[k] for k in keys if k in e} for e in log if "allocation_tv" in e]
    ratios = [e["grad_norm_allocation"] / e["grad_norm_adapter"] for e in series
              if e.get("grad_norm_adapter")]  # fmt: skip
    return {
        "allocation_tv_first": series[0]["allocation_tv"] if series else None,
        "allocation_tv_last": series[-1]["allocation_tv"] if series else None,
        "grad_ratio_median": sorted(ratios)[len(ratios) // 2] if ratios else None,
        "series": series,
    }


def allocation_spread(adapter_dir: Path) -> dict[str, float]:
    """Whether the abstract tasks get different skill mixes: the total-variation distance between the eval-time
    allocation rows z_i and z_j of two abstract tasks, over every pair and module (0: every abstract task gets the
    same mix, so the Task Router's choice cannot change the adapter), its maximum, and the effective number of
    skills per row exp(H(z_i)) (S for a uniform row)."""
    import numpy as np

    from orchmoe.pipeline.plots import learned_allocations

    z = learned_allocations(adapter_dir)  # (M, T, S)
    i, j = np.triu_indices(z.shape[1], k=1)  # every pair of abstract tasks
    between = 0.5 * np.abs(z[:, i] - z[:, j]).sum(-1)  # (M, T(T-1)/2)
    return {
        "between_tasks_tv_mean": float(between.mean()),
        "between_tasks_tv_max": float(between.max()),
        "effective_skills": float(np.exp(-(z * np.log(np.where(z > 0, z, 1.0))).sum(-1)).mean()),  # 0 log 0 = 0
    }


def of_run(folder: Path, source: Path) -> dict[str, Any]:
    """Every router measure of one finished OrchMoE run: ``folder`` holds its kept files (log, soft-routed scores),
    ``source`` its adapter; each test set is generated again with hard routing (each prompt to its argmax abstract
    task: what the exported adapters serve), and the argmax abstract tasks give the NMI against tasks and families."""
    import numpy as np
    from serving import HardRouted
    from sklearn.metrics import normalized_mutual_info_score

    from orchmoe.pipeline import metrics
    from orchmoe.pipeline.common import make_selection
    from orchmoe.pipeline.evaluate import generate, load_trained

    cfg, loaded, model = load_trained(source)
    selection = make_selection(cfg)
    soft = json.loads((folder / "metrics.json").read_text())
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines() if line.strip()]
    result: dict[str, Any] = {**log_measures(log), "allocation_spread": allocation_spread(source / "adapter"),
                              "nmi": {}, "hard": {}, "soft": {}}  # fmt: skip
    sets = {"seen": selection.test, "held_out": selection.held_out, "unseen": selection.unseen}
    for name, examples in sets.items():
        if not examples:
            continue
        hard = HardRouted(model)
        rows, _ = generate(hard, loaded, examples, "lora", {}, cfg.eval_batch_size,
                           cfg.max_input_tokens, cfg.max_new_tokens, progress=False,
                           chat_template=cfg.chat_template)  # fmt: skip
        tasks = [r["task"] for r in rows]
        result["hard"][name] = metrics.score([r["prediction"] for r in rows], [r["references"] for r in rows],
                                             tasks)["macro"]  # fmt: skip
        result["soft"][name] = soft[name]["macro"]
        assigned = np.asarray(hard.weights).argmax(axis=1)  # the abstract task each prompt was sent to
        result["nmi"][name] = {
            "task": float(normalized_mutual_info_score(tasks, assigned)),
            "family": float(normalized_mutual_info_score([family(t) for t in tasks], assigned)),
            "abstract_tasks_used": len(set(assigned.tolist())),
        }
    return result

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


DISTANCES = ("allocation_tv", "mixing_distance")  # each allocation's log key (orchmoe.tuner.router)


def log_measures(log: list[dict[str, Any]]) -> dict[str, Any]:
    """The allocation over training and its gradient against the skills', from the training log's entries: the
    diagonal allocation's TV from uniform (``allocation_tv_first`` / ``_last``), or the mixing allocation's distance
    from the identity (``mixing_distance_first`` / ``_last``)."""
    key = next((k for k in DISTANCES if any(k in e for e in log)), DISTANCES[0])
    keys = ("step", key, "grad_norm_allocation", "grad_norm_adapter", "abstract_tasks_used")
    series = [{k: e[k] for k in keys if k in e} for e in log if key in e]
    ratios = [e["grad_norm_allocation"] / e["grad_norm_adapter"] for e in series
              if e.get("grad_norm_adapter")]  # fmt: skip
    return {
        f"{key}_first": series[0][key] if series else None,
        f"{key}_last": series[-1][key] if series else None,
        "grad_ratio_median": sorted(ratios)[len(ratios) // 2] if ratios else None,
        "series": series,
    }


def low_rank_norm(d: Any, gram_a: Any, gram_b: Any) -> float:
    """||B D A||_F from D (k, k) and the Gram matrices A A^T, B^T B (k, k)."""
    return float((d @ gram_a @ d.T @ gram_b).trace().clamp(min=0).sqrt())


def adapter_spread(model: Any) -> dict[str, float]:
    """How far apart the abstract tasks' adapters end: for each module, abstract task t's update is B op_t A (op_t:
    its operator under one-hot routing, diag(repeat(S z_t, r)) or M_t), and for every pair (t, u)

        ||B (op_t - op_u) A||_F / ((||B op_t A||_F + ||B op_u A||_F) / 2)

    averaged over pairs and modules (and its maximum); 0 when every abstract task gets the same adapter. Computed in
    the rank-S*r space: ||B D A||_F^2 = trace(D (A A^T) D^T (B^T B)), never forming an (out, in) matrix."""
    import torch

    from orchmoe.tuner.access import get_tuner

    tuner = get_tuner(model)
    adapter, n_tasks = tuner._adapter, tuner.peft_config[tuner._adapter].n_abstract_tasks
    ops = [tuner.skill_weights(torch.eye(n_tasks)[t : t + 1], stochastic=False) for t in range(n_tasks)]
    ratios = []
    with torch.no_grad():
        for name, layer in tuner.orchmoe_layers(adapter):
            a, b = layer.orchmoe_A[adapter].double(), layer.orchmoe_B[adapter].double()
            gram_a, gram_b = a @ a.T, b.T @ b  # (S*r, S*r) each
            allocation, eye = layer.orchmoe_skill_router[adapter], torch.eye(a.shape[0], dtype=a.dtype)
            dense = [allocation.apply(eye[None], layer.layer_weights(adapter, op[name]).double())[0].T for op in ops]
            sizes = [low_rank_norm(d, gram_a, gram_b) for d in dense]
            for t in range(n_tasks):
                for u in range(t + 1, n_tasks):
                    mean = (sizes[t] + sizes[u]) / 2
                    ratios.append(low_rank_norm(dense[t] - dense[u], gram_a, gram_b) / mean if mean > 0 else 0.0)
    return {"between_tasks_mean": sum(ratios) / len(ratios), "between_tasks_max": max(ratios)}


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
    result: dict[str, Any] = {**log_measures(log), "adapter_spread": adapter_spread(model),
                              "nmi": {}, "hard": {}, "soft": {}}  # fmt: skip
    if cfg.allocation == "diagonal":  # the skill mixes themselves (the mixing allocation has none)
        result["allocation_spread"] = allocation_spread(source / "adapter")
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

"""Scores as SNI's official evaluation computes them, and how well the Task Router recovers the true tasks.

ROUGE: ``rouge-score`` with ``use_stemmer=True``, the maximum over an example's references, times 100. Exact match
compares normalised strings (lower case, no punctuation, no articles, single spaces). Per task, then the macro
average over tasks.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from rouge_score import rouge_scorer
from sklearn.metrics import normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

ROUGE_TYPES = ("rouge1", "rougeL", "rougeLsum")
METRICS = ("rouge1", "rougeL", "rougeLsum", "exact_match")


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation used by SNI's exact match."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def score_example(prediction: str, references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1/L/Lsum F-measure and exact match of one prediction, max over references (0..100)."""
    if not references:
        raise ValueError("An example needs at least one reference to be scored.")
    scorer = _scorer()
    best = dict.fromkeys(METRICS, 0.0)
    for ref in references:
        scores = scorer.score(target=ref, prediction=prediction)
        for key in ROUGE_TYPES:
            best[key] = max(best[key], 100.0 * scores[key].fmeasure)
        best["exact_match"] = max(best["exact_match"], 100.0 * (normalize_answer(prediction) == normalize_answer(ref)))
    return best


def score(
    predictions: Sequence[str], references: Sequence[Sequence[str]], tasks: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Per-task means and their macro average: ``{"per_task": {task: {metric: v}}, "macro": {metric: v}}``."""
    if not len(predictions) == len(references) == len(tasks):
        raise ValueError("predictions, references and tasks must have the same length.")
    sums: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(METRICS, 0.0))
    counts: dict[str, int] = defaultdict(int)
    for pred, refs, task in zip(predictions, references, tasks, strict=True):
        for key, value in score_example(pred, refs).items():
            sums[task][key] += value
        counts[task] += 1
    per_task = {t: {k: v / counts[t] for k, v in sums[t].items()} for t in sorted(sums)}
    macro = {k: float(np.mean([m[k] for m in per_task.values()])) if per_task else 0.0 for k in METRICS}
    return {"per_task": per_task, "macro": macro}


def routing_agreement(task_weights: np.ndarray, true_tasks: Sequence[str]) -> dict[str, float]:
    """Purity and NMI of the argmax abstract task against the true task, and how many abstract tasks are used.

    purity = (1/N) sum_over_abstract_tasks max_over_true_tasks |overlap|: 1 when every abstract task holds a single
    true task (at most T/K with T abstract tasks for K equal-sized true tasks). consistency (inverse purity) = (1/N)
    sum_over_true_tasks max_over_abstract_tasks |overlap|: 1 when every true task is routed to one abstract task.
    NMI (arithmetic normalisation) is 1 for a perfect one-to-one match and 0 for an unrelated assignment; it is None
    (undefined) when the examples come from a single true task.
    """
    weights = np.asarray(task_weights)
    if weights.ndim != 2 or weights.shape[0] != len(true_tasks) or not len(true_tasks):
        raise ValueError("task_weights must be (N, T) with one row per true task label, N > 0.")
    assigned = weights.argmax(axis=1)
    table = contingency_matrix(list(true_tasks), assigned)  # (true tasks, abstract tasks used)
    return {
        "purity": float(table.max(axis=0).sum() / table.sum()),
        "consistency": float(table.max(axis=1).sum() / table.sum()),
        "nmi": float(normalized_mutual_info_score(list(true_tasks), assigned)) if len(set(true_tasks)) > 1 else None,
        "abstract_tasks_used": len(np.unique(assigned)),
        "collapsed": bool(len(np.unique(assigned)) == 1),
    }

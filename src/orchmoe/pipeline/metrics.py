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


BOOTSTRAP_SAMPLES = 2000


def example_scores(rows: Sequence[dict], metric: str = "rougeL") -> dict[tuple[str, str], float]:
    """{(task, id): the example's score} for prediction rows (``task``, ``id``, ``prediction``, ``references``)."""
    return {(r["task"], str(r["id"])): score_example(r["prediction"], r["references"])[metric] for r in rows}


def macro_interval(
    a: dict[tuple[str, str], float], b: dict[tuple[str, str], float] | None = None, samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0, level: float = 0.95,
) -> tuple[float, float, float]:  # fmt: skip
    """A macro score (the mean over tasks of per-task means), or with ``b`` the paired difference a - b, and its
    ``level`` percentile interval from a bootstrap over the test examples, resampled within tasks (as the macro
    averages them: every task keeps its count) and paired (the same examples for a and b): (value, low, high)."""
    keys = sorted(a) if b is None else sorted(set(a) & set(b))
    if b is not None and (len(keys) != len(a) or len(keys) != len(b)):
        raise ValueError("a paired interval needs the same test examples for both methods.")
    values = np.array([a[k] - (b[k] if b is not None else 0.0) for k in keys])  # (N,)
    tasks = np.array([k[0] for k in keys])
    rng = np.random.default_rng(seed)
    per_task, point = [], []
    for task in np.unique(tasks):
        v = values[tasks == task]  # (n_t,)
        point.append(v.mean())
        per_task.append(v[rng.integers(0, len(v), size=(samples, len(v)))].mean(axis=1))  # (samples,)
    macro = np.mean(per_task, axis=0)  # (samples,)
    tail = 100 * (1 - level) / 2
    return float(np.mean(point)), float(np.percentile(macro, tail)), float(np.percentile(macro, 100 - tail))

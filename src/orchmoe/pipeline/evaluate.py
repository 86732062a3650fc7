"""Greedy, batched generation (KV cache on) on the test sets; predictions, metrics and routing analysis."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data import Collator, Example, encode
from . import metrics
from .common import load_base, make_selection, read_run_config, write_json
from .config import RunConfig
from .methods import method_of

PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"
VAL_METRICS = "val_metrics.json"
EXTENDED_METRICS = "extended_metrics.json"


def load_trained(run: Path):
    """(run config, tokenizer, PeftModel in eval mode, loaded base) for a trained run directory."""
    cfg = read_run_config(run)
    adapter = run / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{run}: no trained adapter in {adapter}; train first (or --resume the run).")
    loaded = load_base(cfg)
    try:
        model = PeftModel.from_pretrained(loaded.model, adapter).eval()
    except (ValueError, RuntimeError, KeyError) as err:
        raise ValueError(f"{adapter}: cannot load this adapter into base model {cfg.model!r}: {err}") from err
    return cfg, loaded, model


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    loaded,
    examples: list[Example],
    method: str,
    task_index: dict[str, int],
    batch_size: int,
    max_input_tokens: int,
    max_new_tokens: int,
    desc: str = "eval",
    progress: bool = True,
    chat_template: bool = False,
) -> tuple[list[dict[str, Any]], np.ndarray | None]:
    """Greedy predictions (one dict per example) and, for OrchMoE, the abstract-task weights (N, T)."""
    tokenizer = loaded.tokenizer
    encoded, _ = encode(examples, tokenizer, max_input_tokens, max_target_tokens=1, chat_template=chat_template)
    collate = Collator(tokenizer.pad_token_id, loaded.is_encoder_decoder, generation=True)
    loader = DataLoader(encoded, batch_size=batch_size, collate_fn=collate)
    rows, weights = [], []
    for batch in tqdm(loader, desc=desc, disable=not progress, unit="batch"):
        kwargs = method_of(method).model_inputs(batch, task_index)
        out = model.generate(
            **kwargs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        routed = method_of(method).routing_weights(model, kwargs)  # what generate() used: eval mode, same prompts
        if routed is not None:
            weights.append(routed.float().cpu().numpy())
        new = out if loaded.is_encoder_decoder else out[:, batch["input_ids"].shape[1] :]
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        for task, index, text in zip(batch["task"], batch["index"], texts, strict=True):
            rows.append({"task": task, "id": index, "prediction": text.strip()})
    by_id = {(e.task, e.id): e for e in examples}
    for row in rows:
        row["references"] = list(by_id[(row["task"], row["id"])].references)
    return rows, (np.concatenate(weights) if weights else None)


def score_sets(
    cfg: RunConfig,
    loaded,
    model: torch.nn.Module,
    sets: dict[str, list[Example]],
    task_index: dict[str, int],
    progress: bool,
) -> tuple[dict[str, Any], list[str]]:
    """Generate on each named set; its metrics (and, for OrchMoE, routing analysis) and the prediction lines."""
    result: dict[str, Any] = {}
    lines = []
    for name, examples in sets.items():
        rows, weights = generate(
            model, loaded, examples, cfg.method, task_index, cfg.eval_batch_size, cfg.max_input_tokens,
            cfg.max_new_tokens, desc=f"eval {cfg.method} {name}", progress=progress, chat_template=cfg.chat_template,
        )  # fmt: skip
        scores = metrics.score([r["prediction"] for r in rows], [r["references"] for r in rows],
                               [r["task"] for r in rows])  # fmt: skip
        result[name] = scores
        if weights is not None:
            result[name]["routing"] = metrics.routing_agreement(weights, [r["task"] for r in rows])
            result[name]["task_weights_by_task"] = {
                task: weights[[r["task"] == task for r in rows]].mean(axis=0).round(4).tolist()
                for task in sorted({r["task"] for r in rows})
            }
        lines += [json.dumps({"set": name, **r}) + "\n" for r in rows]
    return result, lines


def evaluate_run(run: Path, unseen: bool = True, progress: bool = True) -> dict[str, Any]:
    """Evaluate a trained run on its seen-task test sets (and held-out and unseen tasks); write predictions and
    metrics."""
    run = Path(run)
    began = time.time()
    cfg, loaded, model = load_trained(run)
    selection = make_selection(cfg)
    sets = {"seen": selection.test}
    if unseen and selection.held_out:
        sets["held_out"] = selection.held_out
    if unseen and selection.unseen:
        sets["unseen"] = selection.unseen
    scores, lines = score_sets(cfg, loaded, model, sets, selection.task_index, progress)
    result: dict[str, Any] = {"method": cfg.method, "model": cfg.model, **scores}
    result["seconds"] = round(time.time() - began, 2)
    (run / PREDICTIONS).write_text("".join(lines))
    write_json(run / METRICS, result)
    return result


def validate_run(run: Path, n_val: int, progress: bool = True) -> dict[str, Any]:
    """Score a trained run on ``n_val`` validation instances per training task (never trained on, never tested on:
    the training sample does not depend on ``n_val``), for choosing hyper-parameters such as the learning rate.
    Written to ``val_metrics.json``; the test metrics are left alone."""
    run = Path(run)
    if n_val < 1:
        raise ValueError(f"n_val must be >= 1, got {n_val}.")
    cfg, loaded, model = load_trained(run)
    selection = make_selection(cfg, n_val=n_val)
    scores, _ = score_sets(cfg, loaded, model, {"val": selection.val}, selection.task_index, progress)
    result = {"method": cfg.method, "model": cfg.model, "n_val": n_val, **scores}
    write_json(run / VAL_METRICS, result)
    return result


def evaluate_extended(run: Path, n_val: int, n_extra: int, progress: bool = True) -> dict[str, Any]:
    """Score a trained run on a larger test set: each task's test instances plus at most ``n_extra`` more that were
    never trained on and are not among the first ``n_val`` validation instances (so a learning rate chosen on those
    is not tested on them). Written to ``extended_metrics.json``; the test metrics are left alone."""
    run = Path(run)
    if n_extra < 1:
        raise ValueError(f"n_extra must be >= 1, got {n_extra}.")
    cfg, loaded, model = load_trained(run)
    selection = make_selection(cfg, n_val=n_val, n_extra=n_extra)
    sets = {"seen": selection.test + selection.extra_test, "unseen": selection.unseen + selection.extra_unseen}
    scores, _ = score_sets(cfg, loaded, model, {k: v for k, v in sets.items() if v}, selection.task_index, progress)
    result = {"method": cfg.method, "model": cfg.model, "n_val": n_val, "n_extra": n_extra, **scores}
    result["n_examples"] = {k: len(v) for k, v in sets.items()}
    write_json(run / EXTENDED_METRICS, result)
    return result

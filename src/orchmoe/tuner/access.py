"""Public helpers that read an OrchMoE model, whether wrapped in a PeftModel or not."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from .model import OrchMoEModel, Routing


def get_tuner(model: nn.Module) -> OrchMoEModel:
    """The OrchMoEModel inside ``model`` (a PeftModel or the tuner itself)."""
    tuner = model if isinstance(model, OrchMoEModel) else getattr(model, "base_model", None)
    if not isinstance(tuner, OrchMoEModel):
        raise TypeError(f"Expected an OrchMoE PeftModel (from get_peft_model with OrchMoEConfig), got {type(model)}.")
    return tuner


def routing(model: nn.Module, batch: Mapping[str, Any]) -> Routing:
    """Per-example abstract-task weights (B, T) and per-module skill weights (B, S) for ``batch``, as at inference.

    ``batch`` holds ``input_ids`` (or ``inputs_embeds``) and optionally ``attention_mask`` and ``routing_mask``;
    other keys (labels, task names) are ignored.
    """
    keys = ("input_ids", "attention_mask", "routing_mask", "inputs_embeds")
    return get_tuner(model).routing(**{k: batch[k] for k in keys if k in batch})


def parameter_report(model: nn.Module) -> dict[str, int]:
    """Trainable parameters of the skills, the Task Router and the Skill Routers, their sum, and the base model's."""
    return get_tuner(model).parameter_counts()


def format_parameter_report(counts: Mapping[str, int]) -> str:
    """One line: the trainable parameters by kind, and what the routers add to the skills (a LoRA of rank S*r)."""
    share = 100.0 * counts["trainable"] / max(1, counts["trainable"] + counts["base"])
    extra = 100.0 * (counts["task_router"] + counts["skill_router"]) / max(1, counts["skills"])
    return (
        f"trainable params: {counts['trainable']:,} ({share:.4f}% of {counts['trainable'] + counts['base']:,}) = "
        f"skills {counts['skills']:,} + task router {counts['task_router']:,} + "
        f"skill routers {counts['skill_router']:,} (routers: +{extra:.2f}% over the skills)"
    )


__all__ = ["format_parameter_report", "get_tuner", "parameter_report", "routing"]

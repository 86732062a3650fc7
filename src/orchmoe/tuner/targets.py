"""Which modules OrchMoE may adapt: those whose batch dimension is the batch of examples.

OrchMoE gives each example its own skill weights, so an adapted module's input must be indexed by example (or by
example x beam). In a multimodal model the vision (or audio) tower and its projector run over images, not examples:
the number of images per example varies, so no per-example routing can be mapped onto their batch. Target names
given as suffixes (``["q_proj", "v_proj"]``, the usual form) therefore adapt the language model's modules of those
names and leave the towers' out, saying so once; ``"all-linear"`` adapts every linear layer of the language model and
leaves the towers out, saying so once; a target that names a tower module by its path, or a regex ``target_modules``
that matches one, is refused. The output head is not a target of any model, ``"all-linear"`` included (as in peft).
"""

from __future__ import annotations

from typing import Any

from peft.utils import INCLUDE_LINEAR_LAYERS_SHORTHAND, TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from .layer import linear_features

_TOWER_CONFIGS = ("vision_config", "audio_config")


def text_module_prefix(model: nn.Module) -> str | None:
    """The name of a multimodal model's language model (its per-example part); None for a text-only model."""
    config = getattr(model, "config", None)
    if not any(getattr(config, key, None) is not None for key in _TOWER_CONFIGS):
        return None
    decoder = model.get_decoder()
    for name, module in model.named_modules():
        if module is decoder:
            return name
    raise ValueError(f"OrchMoE could not locate the language model of {type(model).__name__} (get_decoder()).")


def check_per_example_batch(key: str, text_prefix: str | None) -> None:
    """Refuse a target outside the language model of a multimodal model (``text_prefix``), naming the way out."""
    if outside_language_model(key, text_prefix):
        raise ValueError(
            f"OrchMoE cannot adapt {key!r}: it is outside the language model, in a vision/audio tower or projector "
            "whose batch holds images rather than examples, so no example's routing can be assigned to it. Target "
            f"modules under {text_prefix!r} only: name them by suffix (e.g. ['q_proj', 'v_proj'], which leaves the "
            "towers' modules of those names out) or leave target_modules unset."
        )


def outside_language_model(key: str, text_prefix: str | None) -> bool:
    return text_prefix is not None and not key.startswith(text_prefix + ".")


def named_by_suffix(target_modules: Any, key: str) -> bool:
    """Whether ``key`` matches ``target_modules`` by a bare module name only (``"q_proj"``), not by a dotted path
    or a regex: a module a user named for the language model that a tower happens to share."""
    if isinstance(target_modules, str) or target_modules is None:
        return False
    return all("." not in t for t in target_modules if key == t or key.endswith(f".{t}"))


def default_target_modules(model: nn.Module) -> list[str]:
    """peft's LoRA defaults for ``model``'s type (e.g. ``["q_proj", "v_proj"]``); in a multimodal model, the
    modules of those names in its language model only, by full name. The defaults of OrchMoE and, in the harness, of
    every baseline."""
    prefix = text_module_prefix(model)
    text_config = getattr(model.config, "text_config", None) if prefix is not None else None
    model_type = getattr(text_config or model.config, "model_type", None)  # the language model's, e.g. gemma3_text
    names = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if names is None:
        raise ValueError(f"No default target modules for model type {model_type!r}; set target_modules.")
    if prefix is None:
        return list(names)
    return sorted(
        key
        for key, module in model.named_modules()
        if key.startswith(prefix + ".") and key.rsplit(".", 1)[-1] in names and isinstance(module, nn.Linear)
    )


def is_all_linear(target_modules: Any) -> bool:
    return isinstance(target_modules, str) and target_modules.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND


def language_model_linear_layers(model: nn.Module, prefix: str) -> tuple[list[str], list[str]]:
    """``"all-linear"`` in a multimodal model: (every linear layer of the language model under ``prefix``, by full
    name; the other linear layers, of the towers and projectors, which OrchMoE leaves out). The output head is in
    neither list: no ``all-linear`` adapts it."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inside, outside = [], []
    for key, module in model.named_modules():
        if module is head or linear_features(module) is None:
            continue
        key = key.removesuffix(".base_layer")  # a layer an adapter already wraps: the wrapper's name
        (inside if key.startswith(prefix + ".") else outside).append(key)
    return inside, outside

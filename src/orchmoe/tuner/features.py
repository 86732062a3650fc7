"""What the Task Router reads: the prompt's input token embeddings, or the hidden states of a frozen base layer.

DESIGN.md's router input: the base model's frozen input embeddings of the prompt tokens (``router_layer=0``), with
the option of the hidden states after its k-th layer (``router_layer=k``). Those come from a partial forward of the
base model's backbone (its encoder for an encoder-decoder) with every skill switched off, stopped by a forward hook
on layer k: the routing pass costs k layers of inference, never the whole model, and its hooks are removed in
``finally``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import nn


class _ReachedLayer(Exception):  # a control-flow signal, not an error
    """Raised by the forward hook on layer k to end the routing pass there, carrying that layer's output."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden


def input_embeddings(model: nn.Module) -> nn.Embedding:
    """The base model's input token embedding table, with an actionable error where it has none."""
    getter = getattr(model, "get_input_embeddings", None)
    embeddings = None
    if getter is not None:
        try:
            embeddings = getter()
        except NotImplementedError:
            embeddings = None
    if not isinstance(embeddings, nn.Embedding):
        raise ValueError(
            f"OrchMoE routes from the base model's input token embeddings, but {type(model).__name__} has no "
            "`get_input_embeddings()` returning an nn.Embedding. Use a transformers language model (decoder-only or "
            "encoder-decoder)."
        )
    return embeddings


def input_embedding_modules(model: nn.Module) -> list[nn.Module]:
    """Every module that embeds input tokens: the input embedding table and the modules sharing its weight (T5's
    encoder and decoder each hold their own ``embed_tokens`` tied to ``shared``)."""
    weight = input_embeddings(model).weight
    return [m for m in model.modules() if isinstance(m, nn.Embedding) and m.weight is weight]


def backbone_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The module that maps the prompt to hidden states (the encoder of an encoder-decoder, else the base model's
    backbone) and its list of layers."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        backbone = model.get_encoder()
    else:
        backbone = getattr(model, "base_model", model)
    lists = [child for child in backbone.children() if isinstance(child, nn.ModuleList)]
    if len(lists) != 1:
        raise ValueError(
            f"OrchMoE router_layer > 0 needs the base model's list of layers, but {type(backbone).__name__} has "
            f"{len(lists)} nn.ModuleList children. Use router_layer=0 (input embeddings) with this model."
        )
    return backbone, lists[0]


def check_router_layer(model: nn.Module, layer: int) -> tuple[nn.Module, nn.ModuleList]:
    """``backbone_layers(model)``, with an actionable error when it has no layer ``layer`` (1-based) to route from."""
    backbone, layers = backbone_layers(model)
    if not 1 <= layer <= len(layers):
        raise ValueError(
            f"OrchMoE router_layer must be in [0, {len(layers)}] for this model ({len(layers)} layers), got {layer}."
        )
    return backbone, layers


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode (no dropout) for the duration; each one's own mode restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def layer_hidden_states(
    model: nn.Module,
    layer: int,
    switch_off_skills: Callable[[], AbstractContextManager[None]],
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
) -> torch.Tensor:
    """Hidden states after the base model's ``layer``-th layer (1-based), frozen: (B, L, d).

    ``switch_off_skills`` is a context manager factory under which every OrchMoE layer computes the base output only.
    """
    backbone, layers = check_router_layer(model, layer)

    def stop(module: nn.Module, args: tuple, output: Any) -> None:
        raise _ReachedLayer(output[0] if isinstance(output, tuple) else output)

    handle = layers[layer - 1].register_forward_hook(stop)
    try:
        with torch.no_grad(), switch_off_skills(), _eval_mode(backbone):
            backbone(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds)
    except _ReachedLayer as reached:
        return reached.hidden  # (B, L, d)
    finally:
        handle.remove()
    raise RuntimeError(f"OrchMoE routing pass: layer {layer} of {type(backbone).__name__} never ran.")

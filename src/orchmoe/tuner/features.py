"""What the Task Router reads: the base model's frozen input token embeddings of the prompt."""

from __future__ import annotations

from torch import nn


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

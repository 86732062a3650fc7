"""The language-model head applied only where labels supervise.

A causal LM's loss reads the logits of the positions whose *next* token is supervised (an encoder-decoder's, of the
supervised decoder positions); every other logit is discarded. With a large vocabulary (Gemma 3: 262k tokens, a head
of 168M parameters against a 100M-parameter backbone in the 270M model) computing the head at every prompt token
costs more than the rest of the model. Here the model's own output head runs, unchanged, on the supervised
positions only: a forward pre-hook on ``model.get_output_embeddings()`` hands it the rows of its input at those flat
positions, so anything the model does after the head (Gemma's logit soft-capping, hooks on the head) still applies,
and the loss and its gradients equal those of the full computation::

    hidden (B, L, d) --select N supervised rows--> (N, d) --head--> logits (N, V)
    loss = sum_n CE(logits_n, target_n)

The selection is computed from the labels before the forward (one host sync for the count N, before any of the
forward's work is queued). Losses that need every logit (label smoothing over the vocabulary is fine; a loss reading
the prompt's logits is not) call the model as usual.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def supervised_positions(labels: torch.Tensor, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices into (B, L) of the positions whose logits the loss needs, and their target tokens: (N,), (N,).

    ``shift=True`` (causal LM): position t predicts label t+1. ``shift=False`` (encoder-decoder): position t predicts
    label t.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX) if shift else labels  # (B, L)
    index = (targets != IGNORE_INDEX).flatten().nonzero().squeeze(1)  # (N,): host sync for N
    return index, targets.flatten().index_select(0, index)


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside data-parallel wrappers (DistributedDataParallel and the like keep it as ``.module``)."""
    while not hasattr(model, "get_output_embeddings") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def output_head(model: nn.Module) -> nn.Module:
    model = unwrapped(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Module):
        raise ValueError(
            f"{type(model).__name__} has no output head (get_output_embeddings() is None): the head cannot be "
            "limited to supervised positions; compute the loss from the model's full logits instead."
        )
    return head


@contextmanager
def head_at(model: nn.Module, index: torch.Tensor) -> Iterator[None]:
    """Within the block, ``model``'s output head computes logits only at the flat positions ``index`` of its
    (B, L, d) input, so the model returns logits of shape (N, V)."""

    def select(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]  # (B, L, d)
        return (hidden.flatten(0, -2).index_select(0, index.to(hidden.device)), *args[1:])  # (N, d)

    handle = output_head(model).register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def supervised_logits(
    model: nn.Module, labels: torch.Tensor, is_encoder_decoder: bool, **inputs: Any
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Logits (N, V) of the supervised positions of ``labels`` (B, L), their targets (N,) and the model's output.

    ``inputs`` are the model's inputs without ``labels`` (an encoder-decoder gets ``decoder_input_ids`` made from
    the labels when they are not given). A causal LM must be called on the whole sequence (no ``logits_to_keep``).
    """
    if "logits_to_keep" in inputs:
        raise ValueError("supervised_logits selects the positions itself: do not pass logits_to_keep.")
    if is_encoder_decoder and inputs.get("decoder_input_ids") is None and inputs.get("decoder_inputs_embeds") is None:
        inner = unwrapped(model)
        base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
        inputs["decoder_input_ids"] = base.prepare_decoder_input_ids_from_labels(labels=labels)
    index, targets = supervised_positions(labels, shift=not is_encoder_decoder)
    with head_at(model, index):
        output = model(**inputs)
    logits = output.logits
    if logits.dim() != 2 or logits.shape[0] != index.numel():
        raise RuntimeError(
            f"{type(model).__name__} returned logits of shape {tuple(logits.shape)} although its output head was "
            f"given {index.numel()} positions: the model does not call get_output_embeddings() on its hidden states "
            "(a fused loss?). Compute the loss from the model's full logits instead."
        )
    return logits, targets, output


def supervised_loss_sum(
    model: nn.Module, labels: torch.Tensor, is_encoder_decoder: bool, **inputs: Any
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Summed cross-entropy over the supervised tokens, their number, and the model's output (logits (N, V))."""
    logits, targets, output = supervised_logits(model, labels, is_encoder_decoder, **inputs)
    loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    return loss, torch.tensor(targets.numel(), device=targets.device), output

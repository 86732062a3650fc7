"""Which tokens a call routes from: the prompt of each sequence, as generation will see it."""

from __future__ import annotations

from typing import Any

import torch


def causal_routing_mask(kwargs: dict, routing_mask: Any, training: bool) -> Any:
    """The prompt tokens of a causal LM call, so that training routes exactly as generation will (from the prompt).

    ``routing_mask`` when given; else, with ``labels``, the tokens before each sequence's first label other than -100
    (the prompt, as every completion-only collator masks it); else, in eval mode, all attended tokens (the input is
    the prompt, as in ``generate``). In training mode with neither, the call is refused: the routing would read the
    answer too. Packed rows (several sequences in one row, ``position_ids`` restarting) are refused, since a row gets
    one routing. Both checks are asynchronous device assertions (no host sync).
    """
    position_ids = kwargs.get("position_ids")
    if training and position_ids is not None and position_ids.dim() == 2 and position_ids.shape[1] > 1:
        restart = position_ids.diff(dim=-1) < 0  # (B, L-1)
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is not None and tuple(attention_mask.shape) == tuple(position_ids.shape):
            attended = attention_mask.bool()
            restart = restart & attended[:, 1:] & attended[:, :-1]  # padding's positions (e.g. TRL's 0s) don't count
        torch._assert_async(
            ~restart.any(),
            "OrchMoE routes each row from its prompt and cannot route packed rows (position_ids restart inside a "
            "row): turn packing off (SFTConfig(packing=False), no DataCollatorWithFlattening).",
        )
    if routing_mask is not None:
        return routing_mask
    labels = kwargs.get("labels")
    if labels is not None:
        prompt = (labels != -100).cumsum(dim=-1) == 0  # (B, L): before the first supervised token
        torch._assert_async(
            prompt.any(dim=-1).all(),
            "OrchMoE derives the prompt from labels (the tokens before the first label other than -100), and an "
            "example's labels supervise its first token: mask the prompt in labels with -100, or pass routing_mask.",
        )
        return prompt
    if training:
        raise ValueError(
            "OrchMoE needs the prompt of each training sequence, to route training as generation will: pass labels "
            "with the prompt masked to -100 (as completion-only collators do), or routing_mask (1 on prompt tokens). "
            "A trainer whose loss calls the model without labels (compute_loss_func, label smoothing): use "
            "orchmoe.OrchMoETrainer or orchmoe.OrchMoESFTTrainer, which pass routing_mask from the labels."
        )
    return None


def routing_tokens(
    shape: tuple[int, int], device: torch.device, attention_mask: Any, routing_mask: Any
) -> torch.Tensor:
    """The tokens to route from (B, L): ``attention_mask`` and ``routing_mask`` where given. An example with none
    fails with an asynchronous device assertion (no host sync)."""
    mask = torch.ones(shape, dtype=torch.bool, device=device)
    for mask_name, given in (("attention_mask", attention_mask), ("routing_mask", routing_mask)):
        if given is None:
            continue
        if tuple(given.shape) != shape:
            raise ValueError(
                f"OrchMoE: `{mask_name}` has shape {tuple(given.shape)} but the input has shape {shape}; it "
                "must mark the prompt tokens of each sequence (1 = route from this token)."
            )
        mask = mask & given.to(device=device).bool()
    torch._assert_async(mask.any(dim=1).all(), "OrchMoE: an example of the batch has no routing token (empty prompt).")
    return mask

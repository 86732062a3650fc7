"""What loading a saved OrchMoE adapter checks before peft copies its tensors: one clear error when it does not fit."""

from __future__ import annotations

from typing import Any

import torch


def check_adapter_fits(
    model_state: dict[str, torch.Tensor], adapter_state: dict[str, torch.Tensor], adapter_name: str, config: Any
) -> None:
    """Raise one clear error when a saved adapter does not fit the model it is loaded into."""
    expected = {
        k for k in model_state if "orchmoe_" in k and (f".{adapter_name}." in k or k.endswith(f".{adapter_name}"))
    }
    source = config.base_model_name_or_path or "an unknown base model"
    for key, value in adapter_state.items():
        if key in model_state and tuple(model_state[key].shape) != tuple(value.shape):
            raise ValueError(
                f"Cannot load this OrchMoE adapter: tensor {key!r} has shape {tuple(value.shape)} in the adapter but "
                f"{tuple(model_state[key].shape)} in the model. The adapter was trained on {source} (or with another "
                "n_skills / r / n_abstract_tasks); load it into a base model of the same architecture."
            )
    missing = sorted(expected - set(adapter_state))
    if missing:
        raise ValueError(
            f"Cannot load this OrchMoE adapter: {len(missing)} of the model's adapter tensors are absent from it "
            f"(first: {missing[0]!r}). The adapter was trained on {source} with other target modules."
        )

"""The adapted linear layer: a pool of S LoRA skills mixed per example (paper eq. 3).

    h = W0 x + scaling * sum_j alpha_j B_j A_j x = W0 x + scaling * B_cat op(w) A_cat x

computed as ONE low-rank product with a per-example operator between A_cat and B_cat (no loop over skills)::

    u  = x A_cat^T                      # (B, T_seq, S*r)
    u  = op(w) u                        # (B, T_seq, S*r): diag(repeat(alpha, r)) u, or the mixing matrix's product
    dh = scaling * u B_cat^T            # (B, T_seq, out)

so its cost is that of one LoRA of rank S*r plus an elementwise product (the diagonal allocation) or an
(S*r x S*r) product per token (the mixing allocation).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import OrchMoEConfig
from .router import ALLOCATIONS, TaskRouter
from .routing import RoutingSlot


class RoutingMissingError(RuntimeError):
    """An OrchMoE layer ran without per-example skill weights."""


def linear_features(base: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a layer OrchMoE can adapt: torch.nn.Linear (k-bit subclasses included) or
    transformers' Conv1D (GPT-2 style, weight stored (in, out)); None for anything else."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if isinstance(base, Conv1D):
        return base.weight.shape[0], base.weight.shape[1]
    return None


class OrchMoELayer(BaseTunerLayer):
    """A pool of S LoRA skills on one layer, with that layer's allocation Z. The first OrchMoE layer of each adapter
    also hosts the adapter's Task Router, so that peft saves, loads, renames, freezes, casts and deletes it with the
    adapter's other weights."""

    adapter_layer_names = ("orchmoe_A", "orchmoe_B", "orchmoe_skill_router", "orchmoe_task_router")
    other_param_names = ("r", "n_skills", "scaling", "orchmoe_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.n_skills: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.orchmoe_A = nn.ParameterDict()  # A_cat: (S*r, in)
        self.orchmoe_B = nn.ParameterDict()  # B_cat: (out, S*r)
        self.orchmoe_skill_router = nn.ModuleDict()  # this module's allocation: Z, or the mixing matrices
        self.orchmoe_task_router = nn.ModuleDict()  # only on the adapter's first layer
        self.orchmoe_dropout = nn.ModuleDict()
        self.routing_slot = RoutingSlot()  # replaced by the tuner's shared slot
        self.kwargs = kwargs
        features = linear_features(self.get_base_layer())
        if features is None:
            raise TypeError(
                f"OrchMoE adapts torch.nn.Linear and transformers Conv1D modules, got {type(base_layer).__name__}."
            )
        self.in_features, self.out_features = features

    def update_layer(self, adapter_name: str, config: OrchMoEConfig, inference_mode: bool = False) -> None:
        s, r = config.n_skills, config.r
        self.r[adapter_name], self.n_skills[adapter_name] = r, s
        self.scaling[adapter_name] = config.scaling
        self.orchmoe_A[adapter_name] = nn.Parameter(torch.empty(s * r, self.in_features))
        self.orchmoe_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, s * r))
        self.orchmoe_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.orchmoe_skill_router[adapter_name] = ALLOCATIONS[config.allocation](config)
        self.reset_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def host_task_router(self, adapter_name: str, embed_dim: int, config: OrchMoEConfig) -> None:
        """Create the adapter's Task Router on this layer (its first OrchMoE layer)."""
        self.orchmoe_task_router[adapter_name] = TaskRouter(embed_dim, config)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def reset_parameters(self, adapter_name: str, init_weights: bool) -> None:
        # Every skill's A is initialised as LoRA's (kaiming uniform over fan_in = in_features), B to zero.
        nn.init.kaiming_uniform_(self.orchmoe_A[adapter_name], a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(self.orchmoe_B[adapter_name])
        else:
            nn.init.kaiming_uniform_(self.orchmoe_B[adapter_name], a=math.sqrt(5))

    def layer_weights(self, adapter_name: str, op: torch.Tensor) -> torch.Tensor:
        """The allocation's output in the form this layer multiplies by: alpha (B', S) -> repeat(alpha, r) (B', S*r)
        for the diagonal allocation, the mixed matrices (B', S*r, S*r) as they are."""
        return self.orchmoe_skill_router[adapter_name].expand(op, self.r[adapter_name])

    def skill_delta(self, adapter_name: str, x: torch.Tensor, skill_weights: torch.Tensor) -> torch.Tensor:
        """scaling * B_cat op A_cat x for x (B, *, in) and the routing operator (B', ...) as ``mix`` or
        ``layer_weights`` give it, with B a multiple of B' (generate expands each example for beams /
        num_return_sequences with repeat_interleave)."""
        a, b = self.orchmoe_A[adapter_name], self.orchmoe_B[adapter_name]
        op = self.layer_weights(adapter_name, skill_weights)  # (B', S*r) or (B', S*r, S*r)
        batch = x.shape[0]
        if op.shape[0] != batch:
            if batch % op.shape[0]:
                raise ValueError(
                    f"OrchMoE skill weights are for {op.shape[0]} examples but the layer input has batch size "
                    f"{batch}, which is not a multiple of it."
                )
            op = op.repeat_interleave(batch // op.shape[0], dim=0)  # (B, ...)
        u = F.linear(self.orchmoe_dropout[adapter_name](x.to(a.dtype)), a)  # (B, T_seq, S*r)
        u = self.orchmoe_skill_router[adapter_name].apply(u, op.to(a.dtype))  # (B, T_seq, S*r)
        return F.linear(u, b) * self.scaling[adapter_name]  # (B, T_seq, out)


class Linear(nn.Module, OrchMoELayer):
    """An nn.Linear (or Conv1D) with an OrchMoE skill pool. Its skill weights for the call in progress come from the
    routing slot the tuner shares with every layer (``orchmoe.tuner.routing``), or as an explicit ``skill_weights``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: OrchMoEConfig, **kwargs: Any) -> None:
        super().__init__()
        OrchMoELayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(
        self, x: torch.Tensor, *args: Any, skill_weights: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        active = [name for name in self.active_adapters if name in self.orchmoe_A]
        if not active:
            return result
        if skill_weights is None:
            routing = self.routing_slot.get()
            skill_weights = None if routing is None else routing.for_layer(self)
        if skill_weights is None:
            raise RoutingMissingError(
                "An OrchMoE layer was called without routing. Call the model through the PeftModel returned by "
                "get_peft_model / PeftModel.from_pretrained (or OrchMoEModel), which routes from the prompt; for "
                "gradient checkpointing use model.gradient_checkpointing_enable() rather than wrapping layers in "
                "torch.utils.checkpoint yourself."
            )
        for name in active:
            result = result + self.skill_delta(name, x, skill_weights).to(result.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(
            "OrchMoE's update depends on each example's routing and cannot be merged into the base weights. Export "
            "one routing as a plain LoRA adapter (orchmoe.export_lora) and merge that instead."
        )

    def unmerge(self) -> None:
        raise NotImplementedError("OrchMoE layers are never merged.")

    def __repr__(self) -> str:
        return "orchmoe." + super().__repr__()

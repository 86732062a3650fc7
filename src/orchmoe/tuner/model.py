"""OrchMoEModel: injects OrchMoE layers into a transformers model and routes every call from the prompt.

One Task Router per model computes the abstract-task weights w (B, T) once per sequence; each adapted module turns w
into its skill weights alpha (B, S) with its own allocation Z (or one shared Z). The weights reach the layers as an
explicit ``skill_weights`` keyword argument, through forward pre-hooks that live exactly as long as one ``forward`` or
``generate`` call (removed in ``finally``). During ``generate`` the routing is computed from the prompt before the
prefill step and reused at every decoding step; the KV cache is left as the caller configured it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from .config import OrchMoEConfig
from .features import check_router_layer, input_embeddings, layer_hidden_states
from .layer import Linear, OrchMoELayer
from .router import SkillRouter, TaskRouter, routing_entropies


@dataclass
class Routing:
    """What the routers decided for a batch: abstract-task weights and every module's skill weights."""

    task_weights: torch.Tensor  # (B, T), rows sum to 1
    skill_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # module name -> (B, S)


@dataclass
class RoutingState:
    """Routing statistics of the last forward call (for the loss and the training log)."""

    task_weights: torch.Tensor  # (B, T)
    mi_loss: torch.Tensor  # scalar: mean_b H(w_b) - H(mean_b w)
    entropy_per_example: float
    entropy_marginal: float


class OrchMoEModel(BaseTuner):
    """The OrchMoE tuner (see ``orchmoe.tuner`` and DESIGN.md). Created by ``peft.get_peft_model``."""

    prefix: str = "orchmoe_"
    tuner_layer_cls = OrchMoELayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    uses_shared_state = True  # the Task Router (and a shared allocation) live on the tuner

    # ----------------------------------------------------------------------------------------------- injection
    def _pre_injection_hook(self, model: nn.Module, config: OrchMoEConfig, adapter_name: str) -> None:
        embeddings = input_embeddings(model)
        if config.router_layer > 0:
            check_router_layer(model, config.router_layer)  # at injection, not at the first forward
        if "orchmoe_task_router" not in self._modules:
            self.orchmoe_task_router = nn.ModuleDict()
            self.orchmoe_shared_skill_router = nn.ModuleDict()
        device = embeddings.weight.device
        self.orchmoe_task_router[adapter_name] = TaskRouter(embeddings.embedding_dim, config).to(device)
        if config.share_allocation:
            self.orchmoe_shared_skill_router[adapter_name] = SkillRouter(config).to(device)

    def _create_and_replace(
        self,
        config: OrchMoEConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        **optional_kwargs: Any,
    ) -> None:
        if isinstance(target, OrchMoELayer):
            target.update_layer(adapter_name, config)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise TypeError(
                f"Target module {target_name!r} is a {type(base).__name__}; OrchMoE adapts torch.nn.Linear modules "
                "only. Change `target_modules`."
            )
        new_module = Linear(target, adapter_name, config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    # ----------------------------------------------------------------------------------------------- routing
    @property
    def _adapter(self) -> str:
        active = self.active_adapters
        if len(active) != 1:
            raise ValueError(f"OrchMoE routes one active adapter at a time, got {active}.")
        return active[0]

    def orchmoe_layers(self) -> Iterator[tuple[str, OrchMoELayer]]:
        """(name, layer) of every OrchMoE layer, names relative to the wrapped model."""
        for name, module in self.model.named_modules():
            if isinstance(module, OrchMoELayer):
                yield name, module

    def task_weights(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        routing_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        deterministic: bool = False,
    ) -> torch.Tensor:
        """Abstract-task weights w (B, T) from the routing tokens (``routing_mask``, else ``attention_mask``).

        The router reads the input embeddings, or with ``router_layer=k`` the frozen base model's hidden states
        after layer k (a partial forward with every skill switched off).
        """
        if inputs_embeds is None and input_ids is None:
            raise ValueError(
                "OrchMoE routes from the prompt: pass `input_ids` (or `inputs_embeds`), or explicit "
                "`task_weights` of shape (batch, n_tasks)."
            )
        layer = self.peft_config[self._adapter].router_layer
        if layer > 0:
            inputs_embeds = layer_hidden_states(
                self.model, layer, self._skills_off, input_ids, attention_mask, inputs_embeds
            )  # (B, L, d)
        elif inputs_embeds is None:
            with torch.no_grad():
                inputs_embeds = input_embeddings(self.model)(input_ids)  # (B, L, d)
        embeds = inputs_embeds.detach()
        shape = tuple(embeds.shape[:2])
        mask = torch.ones(shape, dtype=torch.bool, device=embeds.device)
        for mask_name, given in (("attention_mask", attention_mask), ("routing_mask", routing_mask)):
            if given is None:
                continue
            if tuple(given.shape) != shape:
                raise ValueError(
                    f"OrchMoE: `{mask_name}` has shape {tuple(given.shape)} but the input has shape {shape}; it "
                    "must mark the prompt tokens of each sequence (1 = route from this token)."
                )
            mask = mask & given.to(device=embeds.device).bool()
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"OrchMoE: examples {empty} of the batch have no routing token (empty prompt).")
        return self.orchmoe_task_router[self._adapter](embeds, mask, deterministic=deterministic)  # (B, T)

    def skill_weights(self, task_weights: torch.Tensor, stochastic: bool) -> dict[str, torch.Tensor]:
        """Per-module skill weights alpha (B, S) for abstract-task weights w (B, T).

        All modules' allocations are relaxed in one vectorised call: z (M, T, S), or (M, B, T, S) with one noise
        draw per example, and alpha = S * w z (M, B, S).
        """
        adapter = self._adapter
        if adapter in self.orchmoe_shared_skill_router:
            alpha = self.orchmoe_shared_skill_router[adapter](task_weights, stochastic)  # (B, S)
            return {name: alpha for name, _ in self.orchmoe_layers()}
        routers = {
            name: layer.orchmoe_skill_router[adapter]
            for name, layer in self.orchmoe_layers()
            if adapter in layer.orchmoe_skill_router
        }
        if not routers:
            return {}
        first = next(iter(routers.values()))
        logits = torch.stack([r.logits for r in routers.values()])  # (M, T, S)
        alpha = first.mix(task_weights, stochastic, logits)  # (M, B, S)
        return dict(zip(routers, alpha.unbind(0), strict=True))

    def routing(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        routing_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **_: Any,
    ) -> Routing:
        """What the routers decide for a batch, as at inference (no Gumbel noise, running statistics)."""
        with torch.no_grad():
            w = self.task_weights(input_ids, attention_mask, routing_mask, inputs_embeds, deterministic=True)
            return Routing(task_weights=w, skill_weights=self.skill_weights(w, stochastic=False))

    @staticmethod
    def _inject_skill_weights(
        module: nn.Module, args: tuple, kwargs: dict, skill_weights: torch.Tensor
    ) -> tuple[tuple, dict]:
        kwargs["skill_weights"] = skill_weights
        return args, kwargs

    @contextmanager
    def _hooked(self, skill_weights: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Hand each named OrchMoE layer its ``skill_weights`` for the duration (hooks removed in finally)."""
        layers = dict(self.orchmoe_layers())
        handles = []
        try:
            for name, weights in skill_weights.items():
                hook = partial(self._inject_skill_weights, skill_weights=weights)
                handles.append(layers[name].register_forward_pre_hook(hook, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _skills_off(self) -> Any:
        """Every OrchMoE layer adds exactly nothing for the duration (zero skill weights): the frozen base model."""
        adapter = self._adapter
        zeros = {
            name: layer.orchmoe_A[adapter].new_zeros(1, layer.orchmoe_A[adapter].shape[0])  # (1, S*r)
            for name, layer in self.orchmoe_layers()
            if adapter in layer.orchmoe_A
        }
        return self._hooked(zeros)

    @contextmanager
    def _routed(self, args: tuple, kwargs: dict, routing_mask: torch.Tensor | None, task_weights: Any) -> Iterator:
        """Compute the routing of one call and hand it to every OrchMoE layer for the duration of the call."""
        layers = dict(self.orchmoe_layers())
        if not layers or all(layer.disable_adapters for layer in layers.values()):
            yield
            return
        if task_weights is None:
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            task_weights = self.task_weights(
                input_ids, kwargs.get("attention_mask"), routing_mask, kwargs.get("inputs_embeds")
            )
        elif task_weights.dim() != 2 or task_weights.shape[-1] != self.peft_config[self._adapter].n_tasks:
            raise ValueError(
                f"`task_weights` must have shape (batch, n_tasks={self.peft_config[self._adapter].n_tasks}), got "
                f"{tuple(task_weights.shape)}."
            )
        # one computation (one all_gather under data parallelism) serves the loss and the log
        per_example, marginal = routing_entropies(task_weights, global_batch=self.training)
        self.routing_state = RoutingState(
            task_weights=task_weights,
            mi_loss=per_example - marginal,  # = mutual_information_loss(task_weights)
            entropy_per_example=per_example.item(),
            entropy_marginal=marginal.item(),
        )
        alphas = self.skill_weights(task_weights, stochastic=self.training)
        adapter = self._adapter
        diags = {name: layers[name].layer_weights(adapter, alpha) for name, alpha in alphas.items()}  # once per call
        with self._hooked(diags):
            yield

    def forward(
        self, *args: Any, routing_mask: torch.Tensor | None = None, task_weights: Any = None, **kwargs: Any
    ) -> Any:
        """The wrapped model's forward, routed. In training mode with ``labels``, the router objective
        ``router_mi_weight * (mean_b H(w_b) - H(mean_b w))`` is added to ``loss`` (like Mixtral's aux loss)."""
        with self._routed(args, kwargs, routing_mask, task_weights):
            output = self.model(*args, **kwargs)
        weight = self.peft_config[self._adapter].router_mi_weight
        if self.training and weight > 0 and getattr(output, "loss", None) is not None:
            output.loss = output.loss + weight * self.routing_state.mi_loss
        return output

    def generate(
        self, *args: Any, routing_mask: torch.Tensor | None = None, task_weights: Any = None, **kwargs: Any
    ) -> Any:
        """The wrapped model's generate, routed once from the prompt; every decoding step reuses that routing."""
        with self._routed(args, kwargs, routing_mask, task_weights):
            return self.model.generate(*args, **kwargs)

    def router_aux_loss(self) -> torch.Tensor:
        """``router_mi_weight * mi_loss`` of the last forward call (for training loops that compute their own loss)."""
        return self.peft_config[self._adapter].router_mi_weight * self.routing_state.mi_loss

    # ----------------------------------------------------------------------------------------------- parameters
    def router_parameters(self) -> list[nn.Parameter]:
        """Router parameters (W_task, b, allocation logits Z): they get their own learning rate."""
        adapter = self._adapter
        params = list(self.orchmoe_task_router[adapter].parameters())
        if adapter in self.orchmoe_shared_skill_router:
            params += list(self.orchmoe_shared_skill_router[adapter].parameters())
        for _, layer in self.orchmoe_layers():
            if adapter in layer.orchmoe_skill_router:
                params += list(layer.orchmoe_skill_router[adapter].parameters())
        return params

    def parameter_counts(self) -> dict[str, int]:
        """Trainable-parameter report: skills, task router and skill routers counted separately."""
        adapter = self._adapter
        skills = sum(
            layer.orchmoe_A[adapter].numel() + layer.orchmoe_B[adapter].numel() for _, layer in self.orchmoe_layers()
        )
        task_router = sum(p.numel() for p in self.orchmoe_task_router[adapter].parameters() if p.requires_grad)
        skill_router = sum(p.numel() for p in self.router_parameters() if p.requires_grad) - task_router
        base = sum(p.numel() for name, p in self.model.named_parameters() if "orchmoe_" not in name)
        return {
            "skills": skills,
            "task_router": task_router,
            "skill_router": skill_router,
            "trainable": skills + task_router + skill_router,
            "base": base,
        }

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: OrchMoEConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        _check_adapter_fits(model.state_dict(), remapped, adapter_name, config)
        return remapped

    def _check_merge_allowed(self) -> None:
        raise ValueError(
            "OrchMoE routes per example and cannot be merged. Export one routing as a LoRA adapter "
            "(orchmoe.export_lora) and merge that."
        )


def _check_adapter_fits(
    model_state: Mapping[str, torch.Tensor],
    adapter_state: Mapping[str, torch.Tensor],
    adapter_name: str,
    config: OrchMoEConfig,
) -> None:
    """Raise one clear error when a saved adapter does not fit the model it is loaded into."""
    expected = {k for k in model_state if "orchmoe_" in k and f".{adapter_name}" in k}
    source = config.base_model_name_or_path or "an unknown base model"
    for key, value in adapter_state.items():
        if key in model_state and tuple(model_state[key].shape) != tuple(value.shape):
            raise ValueError(
                f"Cannot load this OrchMoE adapter: tensor {key!r} has shape {tuple(value.shape)} in the adapter but "
                f"{tuple(model_state[key].shape)} in the model. The adapter was trained on {source} (or with another "
                "n_skills / r / n_tasks); load it into a base model of the same architecture."
            )
    missing = sorted(expected - set(adapter_state))
    if missing:
        raise ValueError(
            f"Cannot load this OrchMoE adapter: {len(missing)} of the model's adapter tensors are absent from it "
            f"(first: {missing[0]!r}). The adapter was trained on {source} with other target modules."
        )

"""OrchMoEModel: injects OrchMoE layers into a transformers model and routes every call from the prompt.

How routing flows, once per ``forward`` or ``generate`` call:

1. The active adapter's Task Router (hosted by its first OrchMoE layer) reads the prompt (``routing_mask``, else
   ``attention_mask``) and gives abstract-task weights w (B, T).
2. Every OrchMoE layer's allocation turns w into its routing operator (skill weights alpha (B, S) for the paper's
   diagonal allocation Z, sum_t w_t M_t for the mixing one), all layers in one vectorised call, expanded once to the
   form the layer multiplies by.
3. The result is published in the routing slot shared by the layers (``orchmoe.tuner.routing``); it is held by the
   call, and in training by the call's autograd graph, so gradient checkpointing recomputes layers with the same
   routing; the model itself holds only a weak reference. ``generate`` routes from the prompt before prefill and
   every decoding step reuses that routing; the KV cache stays as the caller configured it.

No host synchronisation happens in a forward, and collectives (the Task Router's global-batch statistics under data
parallelism) only in training mode.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from .config import OrchMoEConfig
from .features import input_embedding_modules, input_embeddings
from .layer import Linear, OrchMoELayer, linear_features
from .loading import check_adapter_fits
from .parameters import count_by_kind
from .prompt import causal_routing_mask, routing_tokens
from .router import TaskRouter, routing_entropies
from .routing import CallRouting, RoutingSlot, RoutingState, hold_in_graph, last_hidden_module, republished
from .targets import (
    check_per_example_batch,
    default_target_modules,
    is_all_linear,
    language_model_linear_layers,
    named_by_suffix,
    outside_language_model,
    text_module_prefix,
)


@dataclass
class Routing:
    """What the routers decided for a batch: abstract-task weights and every module's skill weights."""

    task_weights: torch.Tensor  # (B, T), rows sum to 1
    # module name -> skill weights (B, S) (diagonal allocation) or mixed matrices (B, S*r, S*r) (mixing allocation)
    skill_weights: dict[str, torch.Tensor] = field(default_factory=dict)


class OrchMoEModel(BaseTuner):
    """The OrchMoE tuner (see ``orchmoe.tuner``). Created by ``peft.get_peft_model`` with an ``OrchMoEConfig``."""

    prefix: str = "orchmoe_"
    tuner_layer_cls = OrchMoELayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    # ----------------------------------------------------------------------------------------------- injection
    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """peft's injection, plus the adapter's Task Router on its first OrchMoE layer. Every way peft adds an adapter
        (``get_peft_model``, ``add_adapter``, ``load_adapter``, ``from_pretrained``) comes through here."""
        config: OrchMoEConfig = self.peft_config[adapter_name]
        self._router_dim = input_embeddings(model).embedding_dim
        if config.task_type not in ("CAUSAL_LM", "SEQ_2_SEQ_LM"):
            raise ValueError(
                f"OrchMoEConfig needs task_type='CAUSAL_LM' or 'SEQ_2_SEQ_LM' (got {config.task_type!r}): only then "
                "does the PeftModel that get_peft_model returns call OrchMoE's forward, which routes each call."
            )
        self._text_prefix = text_module_prefix(model)  # multimodal: only the language model is per-example
        self._left_out: list[str] = []
        if config.target_modules is None:
            config.target_modules = set(default_target_modules(model))
        elif is_all_linear(config.target_modules) and self._text_prefix is not None:
            # peft would expand it over the towers too (by names a tower shares, or by paths into it)
            config.target_modules, self._left_out = language_model_linear_layers(model, self._text_prefix)
            config.target_modules = set(config.target_modules)
        if "routing_slot" not in self.__dict__:
            self.routing_slot = RoutingSlot()
        self._task_router_pending = adapter_name  # the first layer created for this adapter hosts its Task Router
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        finally:
            self._task_router_pending = None
        if self._left_out:
            warnings.warn(
                f"OrchMoE adapts the language model only: {len(self._left_out)} modules of a vision/audio tower or "
                f"projector that target_modules names are left out (first: {self._left_out[0]!r}); their "
                "batch holds images, not examples.",
                stacklevel=3,
            )

    def _check_target_module_exists(self, config: OrchMoEConfig, key: str) -> Any:
        """peft's matching, except in a multimodal model: a module outside the language model that a target names by
        suffix is left out (and reported once by ``inject_adapter``); one named by path or regex is refused."""
        found = super()._check_target_module_exists(config, key)
        if not found or type(found).__name__ == "_ExcludedModule" or not outside_language_model(key, self._text_prefix):
            return found
        if named_by_suffix(config.target_modules, key):
            self._left_out.append(key)
            return False
        check_per_example_batch(key, self._text_prefix)  # raises
        return found

    def _create_and_replace(
        self,
        config: OrchMoEConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        check_per_example_batch(current_key, self._text_prefix)
        if isinstance(target, OrchMoELayer):
            target.update_layer(adapter_name, config)
            layer = target
        else:
            base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
            if linear_features(base) is None:
                raise TypeError(
                    f"Target module {current_key!r} is a {type(base).__name__}; OrchMoE adapts torch.nn.Linear and "
                    "transformers Conv1D modules only. Change `target_modules`."
                )
            layer = Linear(target, adapter_name, config)
            if adapter_name not in self.active_adapters:
                layer.requires_grad_(False)
            self._replace_module(parent, target_name, layer, target)
        layer.routing_slot = self.routing_slot
        if self._task_router_pending == adapter_name:
            layer.host_task_router(adapter_name, self._router_dim, config)
            if adapter_name not in self.active_adapters:
                layer.orchmoe_task_router[adapter_name].requires_grad_(False)
            self._task_router_pending = None

    # ----------------------------------------------------------------------------------------------- routing
    @property
    def _adapter(self) -> str:
        active = self.active_adapters
        if len(active) != 1:
            raise ValueError(f"OrchMoE routes one active adapter at a time, got {active}; call set_adapter(name).")
        return active[0]

    def orchmoe_layers(self, adapter: str | None = None) -> Iterator[tuple[str, OrchMoELayer]]:
        """(name, layer) of every OrchMoE layer (that has ``adapter``), names relative to the wrapped model."""
        for name, module in self.model.named_modules():
            if isinstance(module, OrchMoELayer) and (adapter is None or adapter in module.orchmoe_A):
                yield name, module

    def task_router(self, adapter: str | None = None) -> TaskRouter:
        """The Task Router of ``adapter`` (default: the active one)."""
        adapter = adapter or self._adapter
        for _, layer in self.orchmoe_layers(adapter):
            if adapter in layer.orchmoe_task_router:
                return layer.orchmoe_task_router[adapter]
        raise KeyError(f"OrchMoE adapter {adapter!r} has no Task Router; adapters: {list(self.peft_config)}.")

    def task_weights(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        routing_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        deterministic: bool = False,
    ) -> torch.Tensor:
        """Abstract-task weights w (B, T) from the routing tokens (``routing_mask``, else ``attention_mask``)."""
        if inputs_embeds is None and input_ids is None:
            raise ValueError(
                "OrchMoE routes from the prompt: pass `input_ids` (or `inputs_embeds`), or explicit "
                "`task_weights` of shape (batch, n_abstract_tasks)."
            )
        if inputs_embeds is None:
            with torch.no_grad():
                inputs_embeds = input_embeddings(self.model)(input_ids)  # (B, L, d)
        embeds = inputs_embeds.detach()
        mask = routing_tokens(tuple(embeds.shape[:2]), embeds.device, attention_mask, routing_mask)  # (B, L)
        return self.task_router()(embeds, mask, deterministic=deterministic)  # (B, T)

    def skill_weights(self, task_weights: torch.Tensor, stochastic: bool) -> dict[str, torch.Tensor]:
        """Per-module routing operators for abstract-task weights w (B, T): skill weights alpha (B, S) for the
        diagonal allocation, the mixed matrices sum_t w_t M_t (B, S*r, S*r) for the mixing one.

        All modules' allocations are computed in one vectorised call: for the diagonal, z (M, T, S) relaxed with one
        Gumbel draw per call for the whole batch while training, and alpha = S * w z (M, B, S).
        """
        adapter = self._adapter
        routers = {name: layer.orchmoe_skill_router[adapter] for name, layer in self.orchmoe_layers(adapter)}
        if not routers:
            return {}
        first = next(iter(routers.values()))
        weight = torch.stack([r.weight for r in routers.values()])  # (M, T, S) or (M, T, S*r, S*r)
        ops = first.mix(task_weights, stochastic, weight)  # (M, B, S) or (M, B, S*r, S*r)
        return dict(zip(routers, ops.unbind(0), strict=True))

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

    @property
    def _training(self) -> bool:
        """Whether calls route as in training: the wrapped model's mode, which ``model.train()`` / ``model.eval()``
        set (a model fresh from ``from_pretrained`` is in eval mode even where its new peft wrapper is not)."""
        return self.model.training

    def _call_routing(
        self, args: tuple, kwargs: dict, routing_mask: Any, task_weights: Any, training: bool
    ) -> CallRouting | None:
        """Route one call: task weights, then every layer's skill weights in the form it multiplies by. In training
        (``training``) with Gumbel noise and global-batch statistics, else as at inference."""
        if not self.active_adapters or all(layer.disable_adapters for _, layer in self.orchmoe_layers()):
            return None  # no adapter left, or disable_adapter(): the base model
        adapter = self._adapter
        n_tasks = self.peft_config[adapter].n_abstract_tasks
        if task_weights is None:
            if self.peft_config[adapter].task_type == "CAUSAL_LM":
                routing_mask = causal_routing_mask(kwargs, routing_mask, training)
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            task_weights = self.task_weights(
                input_ids, kwargs.get("attention_mask"), routing_mask, kwargs.get("inputs_embeds"), not training
            )
        elif task_weights.dim() != 2 or task_weights.shape[-1] != n_tasks:
            raise ValueError(
                f"`task_weights` must have shape (batch, n_abstract_tasks={n_tasks}), got {tuple(task_weights.shape)}."
            )
        # one computation (one all_gather under data parallelism, in training only) serves the loss and the log
        per_example, marginal = routing_entropies(task_weights, global_batch=training)
        state = RoutingState(task_weights, per_example - marginal, per_example.detach(), marginal.detach())
        layers = dict(self.orchmoe_layers(adapter))
        alphas = self.skill_weights(task_weights, stochastic=training)
        weights = {layers[name]: layers[name].layer_weights(adapter, alpha) for name, alpha in alphas.items()}
        return CallRouting(weights, state)

    @contextmanager
    def _held_by_graph(self, routing: CallRouting, kwargs: dict) -> Iterator[None]:
        """In training with autograd on, let the call's graph hold the routing (for checkpointed recomputation)."""
        if not (self._training and torch.is_grad_enabled()):
            yield
            return
        for key in ("inputs_embeds", "decoder_inputs_embeds"):
            if kwargs.get(key) is not None:
                kwargs[key] = hold_in_graph(kwargs[key], routing)
        handles = [
            module.register_forward_hook(lambda _m, _a, out: hold_in_graph(out, routing))
            for module in input_embedding_modules(self.model)
        ]
        last = last_hidden_module(self.model)
        if last is not None:
            slot = self.routing_slot
            handles.append(last.register_forward_hook(lambda _m, _a, out: republished(out, slot, routing)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def forward(
        self, *args: Any, routing_mask: torch.Tensor | None = None, task_weights: Any = None, **kwargs: Any
    ) -> Any:
        """The wrapped model's forward, routed. In training mode with ``labels``, the router objective
        ``router_mi_weight * (mean_b H(w_b) - H(mean_b w))`` is added to ``loss`` (like Mixtral's aux loss)."""
        routing = self._call_routing(args, kwargs, routing_mask, task_weights, self._training)
        if routing is None:
            return self.model(*args, **kwargs)
        self.routing_slot.set(routing)  # held by this frame for the call, then (in training) by its graph
        if self._training and torch.is_grad_enabled():
            self.routing_slot.set_for_loss(routing)  # the call whose router objective joins the loss
        with self._held_by_graph(routing, kwargs):
            output = self.model(*args, **kwargs)
        add = self.__dict__.get("add_router_loss_to_output", True)  # off: a trainer adds it (orchmoe.training)
        if add and self._training and getattr(output, "loss", None) is not None:
            output.loss = self.add_router_loss(output.loss, state=routing.state)  # this call's own objective
        return output

    def generate(
        self, *args: Any, routing_mask: torch.Tensor | None = None, task_weights: Any = None, **kwargs: Any
    ) -> Any:
        """The wrapped model's generate, routed once from the prompt as at inference, in train mode too (RL trainers
        sample in train mode): no Gumbel noise, the Task Router's running statistics. Every decoding step reuses that
        routing."""
        routing = self._call_routing(args, kwargs, routing_mask, task_weights, training=False)
        if routing is None:
            return self.model.generate(*args, **kwargs)
        self.routing_slot.set(routing)  # held by this frame for every decoding step
        return self.model.generate(*args, **kwargs)

    @property
    def routing_state(self) -> RoutingState:
        """Routing statistics of the latest training-mode forward with autograd on, between that forward and its
        backward (a no-grad call in between, such as a trainer's reference or metrics pass, does not replace it)."""
        routing = self.routing_slot.get_for_loss()
        if routing is None or routing.state is None:
            raise RuntimeError(
                "OrchMoE keeps no routing after a call: routing_state and router_aux_loss() are available between a "
                "training-mode forward and its backward. For the routing of a batch use orchmoe.routing."
            )
        if routing.backpropagated:
            raise RuntimeError(
                "OrchMoE: the latest training forward has already been backpropagated, so its router objective is "
                "spent; call router_aux_loss() right after the forward whose loss it joins, before any backward "
                "(loss = out.loss + orchmoe.get_tuner(model).router_aux_loss())."
            )
        return routing.state

    def router_aux_loss(self, state: RoutingState | None = None) -> torch.Tensor:
        """``router_mi_weight * mi_loss`` of the training call in progress (``routing_state``), or of ``state``
        (for loops that compute their own loss)."""
        state = self.routing_state if state is None else state
        return self.peft_config[self._adapter].router_mi_weight * state.mi_loss

    def add_router_loss(
        self, loss: torch.Tensor, accumulation_steps: int = 1, state: RoutingState | None = None
    ) -> torch.Tensor:
        """``loss`` plus the router objective of the training call in progress (or of ``state``), divided by
        ``accumulation_steps`` when ``loss`` is already a share of the optimizer step's loss. The one place the
        objective joins a loss: ``forward`` (with ``labels``), ``orchmoe.OrchMoETrainer`` and the harness."""
        if self.peft_config[self._adapter].router_mi_weight == 0:
            return loss
        return loss + self.router_aux_loss(state) / accumulation_steps

    # ----------------------------------------------------------------------------------------------- parameters
    def router_parameters_by_kind(self) -> dict[str, list[nn.Parameter]]:
        """The active adapter's router parameters, the objects themselves: ``task_router`` (W_task, b) and
        ``allocation`` (every layer's Z, or its mixing matrices). Optimizer groups, parameter counts and gradient
        norms select by these."""
        adapter = self._adapter
        allocation = [p for _, layer in self.orchmoe_layers(adapter)
                      for p in layer.orchmoe_skill_router[adapter].parameters()]  # fmt: skip
        return {"task_router": list(self.task_router(adapter).parameters()), "allocation": allocation}

    def router_parameters(self) -> list[nn.Parameter]:
        """Router parameters (W_task, b, every layer's allocation): they get their own learning rate."""
        return [p for params in self.router_parameters_by_kind().values() for p in params]

    def parameter_counts(self) -> dict[str, int]:
        """Trainable-parameter report: skills, task router and skill routers counted separately (trainable
        parameters, as peft's ``get_nb_trainable_parameters``), and the frozen rest."""
        counts = count_by_kind(self.model.parameters(), self.router_parameters_by_kind())
        skills, task_router, skill_router = counts["adapter"], counts["task_router"], counts["allocation"]
        return {
            "skills": skills,
            "task_router": task_router,
            "skill_router": skill_router,
            "trainable": skills + task_router + skill_router,
            "base": counts["base"],
        }

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """Checkpoint keys carry no adapter name, also below a module's depth (``orchmoe_task_router.<name>.proj.
        weight`` -> ``orchmoe_task_router.proj.weight``), so an adapter loads under any name."""
        return re.sub(rf"(\.orchmoe_\w+?)\.{re.escape(adapter_name)}(?=\.|$)", r"\1", key)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: OrchMoEConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_adapter_fits(model.state_dict(), remapped, adapter_name, config)
        return remapped

    def _check_merge_allowed(self) -> None:
        raise ValueError(
            "OrchMoE routes per example and cannot be merged into the base weights. Export one routing as a plain "
            "LoRA adapter (orchmoe.export_lora) and merge that."
        )

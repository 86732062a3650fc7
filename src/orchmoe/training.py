"""Train OrchMoE where users train: Hugging Face ``Trainer`` and TRL's ``SFTTrainer``, ``DPOTrainer``, ``GRPOTrainer``.

``OrchMoETrainerMixin`` adds to any ``Trainer`` subclass what OrchMoE needs beyond a peft method's defaults:

- the routers' own learning rate (``router_lr_multiplier`` of the adapter's config) in an optimizer group of their
  own, without weight decay;
- the router objective in the loss, also when the trainer computes its loss itself (TRL's SFTTrainer does);
- the Skill Router's relaxation schedules (``temperature_end``, ``noise_scale_end``) as a callback;
- the ``routing_mask`` column kept when a dataset has one, else derived from ``labels`` before the loss, so that a
  loss that calls the model without labels (``compute_loss_func``, label smoothing) routes from the prompt too;
- packing refused (a packed row holds several prompts but gets one routing).

``OrchMoETrainer`` also computes the training loss with the output head applied only where labels supervise
(``orchmoe.head``), for OrchMoE and any other model alike: the same loss and gradients as ``Trainer``'s, without the
prompt's logits (``supervised_head=False`` for losses that need every logit; ``compute_loss_func`` and label
smoothing take the full logits anyway). TRL's ``SFTTrainer`` has its own fused head for this.

``OrchMoETrainer`` is ``transformers.Trainer`` with it; ``OrchMoESFTTrainer``, ``OrchMoEDPOTrainer`` and
``OrchMoEGRPOTrainer`` are TRL's trainers with it (when TRL is installed). Plain TRL routes each sequence from its
prompt too (DPO and GRPO score completions with labels that mask the prompt; GRPO samples with ``generate``, which
routes from the prompt in train mode as at inference) but drops the router objective and the routers' learning
rate. For any other trainer: ``class MyTrainer(OrchMoETrainerMixin, TheirTrainer)``. Gradient
checkpointing, bf16/fp16 and ``torchrun`` / ``accelerate launch`` work as with LoRA.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from ._extras import require
from .head import supervised_loss_sum
from .tuner.access import get_tuner
from .tuner.model import OrchMoEModel
from .tuner.parameters import router_kinds
from .tuner.prompt import causal_routing_mask
from .tuner.router import SkillRouter


@dataclass(frozen=True)
class RelaxationSchedule:
    """The Skill Router's relaxation over training: the temperature geometrically from the config's ``temperature``
    to ``temperature_end``, the noise scale linearly from 1 to ``noise_scale_end`` (None: kept as configured)."""

    temperature_end: float | None = None
    noise_scale_end: float | None = None

    def __post_init__(self) -> None:
        if self.temperature_end is not None and self.temperature_end <= 0:
            raise ValueError(f"temperature_end must be > 0, got {self.temperature_end}.")
        if self.noise_scale_end is not None and self.noise_scale_end < 0:
            raise ValueError(f"noise_scale_end must be >= 0, got {self.noise_scale_end}.")

    @property
    def active(self) -> bool:
        return self.temperature_end is not None or self.noise_scale_end is not None

    def apply(self, model: nn.Module, temperature: float, step: int, total_steps: int) -> None:
        """Set ``model``'s relaxation for the optimizer step after ``step`` of ``total_steps`` steps done (the first
        step at progress 0, the last at 1), from the start ``temperature``: the one schedule every trainer runs."""
        if self.active:
            progress = min(1.0, step / max(1, total_steps - 1))
            set_relaxation(model, **self.at(temperature, progress))

    def at(self, temperature: float, progress: float) -> dict[str, float | None]:
        """The settings at ``progress`` in [0, 1] of training, from the start ``temperature``."""
        values: dict[str, float | None] = {"temperature": None, "noise_scale": None}
        if self.temperature_end is not None:
            values["temperature"] = temperature * (self.temperature_end / temperature) ** progress
        if self.noise_scale_end is not None:
            values["noise_scale"] = 1.0 + (self.noise_scale_end - 1.0) * progress
        return values


def set_relaxation(model: nn.Module, temperature: float | None = None, noise_scale: float | None = None) -> None:
    """Set the Gumbel temperature and/or noise scale of every Skill Router, and of the adapters' configs, so that a
    saved adapter records the values training ended with (evaluation uses its temperature)."""
    values = {k: v for k, v in {"temperature": temperature, "noise_scale": noise_scale}.items() if v is not None}
    tuner = get_tuner(model)
    for config in tuner.peft_config.values():
        for key, value in values.items():
            setattr(config, key, value)
    for module in tuner.modules():
        if isinstance(module, SkillRouter):
            for key, value in values.items():
                setattr(module, key, value)


def check_relaxed(model: nn.Module) -> None:
    """A relaxation schedule anneals the diagonal allocation's Gumbel-softmax; refuse it where there is none to anneal
    (the mixing allocation has no noise and no temperature), rather than train as if it applied."""
    if not any(isinstance(m, SkillRouter) for m in get_tuner(model).modules()):
        raise ValueError(
            "temperature_end / noise_scale_end anneal the Gumbel-softmax of OrchMoEConfig(allocation='diagonal'); "
            "this model's allocation is 'mixing', which has neither temperature nor noise: drop them, or build the "
            "adapter with allocation='diagonal'."
        )


def is_orchmoe(model: nn.Module) -> bool:
    return isinstance(getattr(model, "base_model", None), OrchMoEModel) or isinstance(model, OrchMoEModel)


def parameter_groups(
    model: nn.Module,
    routers: dict[str, list[nn.Parameter]],
    lr: float,
    weight_decay: float,
    router_lr_multiplier: float = 1.0,
    allocation_lr: float | None = None,
    decay_names: Iterable[str] | None = None,
) -> list[dict[str, Any]]:
    """Optimizer groups of any adapted model: trainable parameters at ``lr`` (weight decay on ``decay_names``, all
    of them when None), except the ``routers`` (by kind, e.g. ``OrchMoEModel.router_parameters_by_kind()``, selected
    by identity) at ``lr * router_lr_multiplier`` without decay, and the ``allocation`` kind at ``allocation_lr``
    when it is given (an absolute value, as mttl's ``module_logits_learning_rate``)."""
    kind = router_kinds(routers)
    decay = None if decay_names is None else set(decay_names)
    groups: dict[str, dict[str, Any]] = {
        "adapters": {"params": [], "lr": lr, "weight_decay": weight_decay},
        "adapters_no_decay": {"params": [], "lr": lr, "weight_decay": 0.0},
        "routers": {"params": [], "lr": lr * router_lr_multiplier, "weight_decay": 0.0},
        "allocation": {"params": [], "lr": allocation_lr, "weight_decay": 0.0},
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in kind:
            key = "allocation" if allocation_lr is not None and kind[id(p)] == "allocation" else "routers"
        else:
            key = "adapters" if decay is None or name in decay else "adapters_no_decay"
        groups[key]["params"].append(p)
    return [{**group, "name": key} for key, group in groups.items() if group["params"]]


def router_parameter_groups(
    model: nn.Module, lr: float, weight_decay: float, decay_names: Iterable[str] | None = None
) -> list[dict[str, Any]]:
    """:func:`parameter_groups` of an OrchMoE model, the routers at its config's ``router_lr_multiplier``."""
    tuner = get_tuner(model)
    multiplier = tuner.peft_config[tuner._adapter].router_lr_multiplier
    return parameter_groups(
        model, tuner.router_parameters_by_kind(), lr, weight_decay, multiplier, decay_names=decay_names
    )


class RelaxationCallback(TrainerCallback):
    """Runs a :class:`RelaxationSchedule` over a Trainer's steps."""

    def __init__(self, schedule: RelaxationSchedule) -> None:
        self.schedule = schedule
        self.start: float | None = None

    def on_step_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **_: Any) -> None:
        if model is None or not is_orchmoe(model):
            return
        tuner = get_tuner(model)
        if self.start is None:
            self.start = tuner.peft_config[tuner._adapter].temperature
        self.schedule.apply(model, self.start, state.global_step, state.max_steps)


class OrchMoETrainerMixin:
    """OrchMoE's needs on top of a ``transformers.Trainer`` subclass (see the module docstring)."""

    def __init__(
        self, *args: Any, temperature_end: float | None = None, noise_scale_end: float | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        if getattr(self.args, "packing", False) and is_orchmoe(self.model):
            raise ValueError(
                "OrchMoE routes each example from its own prompt, and a packed row holds several examples: set "
                "packing=False (SFTConfig(packing=False))."
            )
        schedule = RelaxationSchedule(temperature_end, noise_scale_end)
        if schedule.active and is_orchmoe(self.model):
            check_relaxed(self.model)
        if schedule.active:
            self.add_callback(RelaxationCallback(schedule))

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        if self.optimizer is not None or not is_orchmoe(self.model):
            return super().create_optimizer(*args, **kwargs)
        decay = self.get_decay_parameter_names(self.model)
        groups = router_parameter_groups(self.model, self.args.learning_rate, self.args.weight_decay, decay)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
        self.optimizer = optimizer_cls(
            [{k: v for k, v in g.items() if k != "name"} for g in groups], **optimizer_kwargs
        )
        return self.optimizer

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and "routing_mask" not in self._signature_columns:
            self._signature_columns.append("routing_mask")

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """The trainer's loss plus the router objective, added here once per micro-batch whether the trainer uses the
        model's loss (Trainer) or computes its own (TRL), and scaled as the trainer scales its loss under gradient
        accumulation. A causal LM's batch with ``labels`` gets its ``routing_mask`` (the prompt) from them first, so
        that losses computed from logits without labels (``compute_loss_func``, label smoothing) route alike."""
        unwrapped = self.accelerator.unwrap_model(model)
        if not (unwrapped.training and is_orchmoe(unwrapped)):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch=num_items_in_batch)
        inputs = with_routing_mask(unwrapped, inputs)
        tuner = get_tuner(unwrapped)
        tuner.add_router_loss_to_output = False
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch=num_items_in_batch)
        finally:
            tuner.add_router_loss_to_output = True
        loss, outputs = result if return_outputs else (result, None)
        steps = self.current_gradient_accumulation_steps if self._loss_is_a_share(num_items_in_batch) else 1
        loss = tuner.add_router_loss(loss, steps)
        return (loss, outputs) if return_outputs else loss

    def _loss_is_a_share(self, num_items_in_batch: Any) -> bool:
        """Whether the trainer's loss is already a share of the optimizer step's (so ``training_step`` does not
        divide it by the accumulation steps): ``Trainer.training_step``'s own rule."""
        declared = getattr(self, "loss_is_scaled_for_ga", None)  # TRL's trainers declare it (GRPO: True)
        if declared is not None:
            return bool(declared)
        return bool(self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
            self.compute_loss_func is not None
        )


def with_routing_mask(model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` of a causal LM with ``labels`` and no ``routing_mask``, plus the prompt the model would derive
    from those labels as ``routing_mask``; any other ``inputs`` as they are."""
    labels = inputs.get("labels")
    if labels is None or inputs.get("routing_mask") is not None or getattr(model.config, "is_encoder_decoder", False):
        return inputs
    return {**inputs, "routing_mask": causal_routing_mask(inputs, None, True)}


class SupervisedHeadMixin:
    """``Trainer.compute_loss`` in training with the output head on the supervised positions only (same loss, same
    normalisation over ``num_items_in_batch`` and processes, same gradients)."""

    def __init__(self, *args: Any, supervised_head: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.supervised_head = supervised_head

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        unwrapped = self.accelerator.unwrap_model(model)
        plain = self.label_smoother is None and self.compute_loss_func is None
        if not (self.supervised_head and plain and unwrapped.training and inputs.get("labels") is not None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch=num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        encoder_decoder = bool(getattr(unwrapped.config, "is_encoder_decoder", False))
        loss_sum, n_tokens, outputs = supervised_loss_sum(model, labels, encoder_decoder, **inputs)
        scaled = self.model_accepts_loss_kwargs and num_items_in_batch is not None  # as Trainer normalises it
        loss = loss_sum / (num_items_in_batch if scaled else n_tokens.clamp(min=1))
        if scaled and self.args.average_tokens_across_devices:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return (loss, outputs) if return_outputs else loss


class OrchMoETrainer(OrchMoETrainerMixin, SupervisedHeadMixin, Trainer):
    """``transformers.Trainer`` for OrchMoE models (and any other model): routers' lr, router loss, relaxation
    schedule, and the output head on supervised positions only."""


TRL_TRAINERS = {
    "OrchMoESFTTrainer": "SFTTrainer",
    "OrchMoEDPOTrainer": "DPOTrainer",
    "OrchMoEGRPOTrainer": "GRPOTrainer",
}


def __getattr__(name: str) -> Any:
    if name in TRL_TRAINERS:  # only when TRL is installed
        require("trl", f"orchmoe.{name}")
        import trl

        base = getattr(trl, TRL_TRAINERS[name])
        doc = f"TRL's {base.__name__} for OrchMoE (see orchmoe.training.OrchMoETrainerMixin)."
        trainer = type(name, (OrchMoETrainerMixin, base), {"__doc__": doc, "__module__": __name__})
        globals()[name] = trainer
        return trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

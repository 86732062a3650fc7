"""OrchMoE and its baselines (peft's own LoRA, Poly and MHR), sized to the same adapter-parameter count.

Parity: LoRA of rank R = S*r; OrchMoE, Poly and MHR with S skills of rank r. Router parameters are
counted and reported apart from adapter (skill) parameters. Poly/MHR get one extra task row, never trained, that is
set to the average of the trained rows to evaluate tasks never seen in training (as microsoft/mttl does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, PeftModel, PolyConfig, get_peft_model
from peft.tuners.poly.router import PolyRouter
from torch import nn

from ..training import RelaxationSchedule, parameter_groups
from ..tuner import OrchMoEConfig
from ..tuner.access import get_tuner
from ..tuner.parameters import count_by_kind, router_kinds
from ..tuner.router import Allocation
from ..tuner.targets import default_target_modules
from .config import RunConfig

PARITY_TOLERANCE = 0.02


def target_modules(model: nn.Module, cfg: RunConfig) -> list[str]:
    """``--target-modules``, else the tuner's defaults (the same for every method)."""
    return list(cfg.target_modules) if cfg.target_modules else default_target_modules(model)


class Method:
    """What one method does differently in the harness; everything else is shared. One instance per method."""

    name: str
    validated_lr: float  # the default learning rate, chosen on validation (benchmarks/LOG.md)

    def peft_config(self, targets: list[str], task_type: str, cfg: RunConfig, n_train_tasks: int):
        raise NotImplementedError

    def after_build(self, model: PeftModel, cfg: RunConfig) -> None:
        """Changes to a freshly built model (before any training step or checkpoint restore)."""

    def model_inputs(self, batch: dict[str, Any], task_index: dict[str, int]) -> dict[str, Any]:
        """The keyword arguments its model gets: never the task names."""
        return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}

    def routers(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        """Its router parameters by kind (``task_router``, ``allocation``), the objects themselves; the rest of the
        trainable parameters are adapters."""
        return {}

    def step_begin(self, model: nn.Module, cfg: RunConfig, step: int, total_steps: int) -> None:
        """Before the optimizer step after ``step`` of ``total_steps`` steps done."""

    def add_router_loss(self, model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
        """The training loss of a micro-batch with the method's router objective, if it has one."""
        return loss

    def routing_log(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """Routing statistics of the forward just run (before its backward), for the training log."""
        return None

    def log_state(self, model: nn.Module) -> dict[str, float]:
        """Numbers of the model's current state for a training-log entry (one host sync per entry)."""
        return {}

    def finish(self, model: PeftModel, n_train_tasks: int) -> None:
        """After the last step, before saving."""

    def routing_weights(self, model: PeftModel, kwargs: dict[str, Any]) -> torch.Tensor | None:
        """Abstract-task weights (B, T) of a batch of prompts, for the routing analysis; None: no routing."""
        return None


class LoRA(Method):
    name, validated_lr = "lora", 3e-3

    def peft_config(self, targets: list[str], task_type: str, cfg: RunConfig, n_train_tasks: int):
        return LoraConfig(r=cfg.n_skills * cfg.r, lora_alpha=cfg.lora_alpha, target_modules=targets,
                          task_type=task_type)  # fmt: skip


class Poly(Method):
    """peft's Poly (one head) or MHR (``n_splits`` heads): routed by the true task id; unseen tasks get an extra
    row, set to the average of the trained rows after training (as microsoft/mttl does)."""

    def __init__(self, name: str, validated_lr: float, multi_head: bool) -> None:
        self.name, self.validated_lr, self.multi_head = name, validated_lr, multi_head

    def peft_config(self, targets: list[str], task_type: str, cfg: RunConfig, n_train_tasks: int):
        return PolyConfig(r=cfg.r, n_skills=cfg.n_skills, n_splits=cfg.n_splits if self.multi_head else 1,
                          n_tasks=n_train_tasks + 1, target_modules=targets, task_type=task_type)  # fmt: skip

    def model_inputs(self, batch: dict[str, Any], task_index: dict[str, int]) -> dict[str, Any]:
        kwargs = super().model_inputs(batch, task_index)
        ids = [task_index.get(t, len(task_index)) for t in batch["task"]]  # unseen: the extra row
        kwargs["task_ids"] = torch.tensor(ids, device=batch["input_ids"].device)
        return kwargs

    def routers(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        return {"allocation": [p for m in model.modules() if isinstance(m, PolyRouter) for p in m.parameters()]}

    def finish(self, model: PeftModel, n_train_tasks: int) -> None:
        set_unseen_task_row(model, n_train_tasks)


class OrchMoE(Method):
    name, validated_lr = "orchmoe", 3e-3  # with the routers at 1x (benchmarks/LOG.md, `orchmoe-router1`)

    def peft_config(self, targets: list[str], task_type: str, cfg: RunConfig, n_train_tasks: int):
        return OrchMoEConfig(
            r=cfg.r, n_skills=cfg.n_skills, n_abstract_tasks=cfg.n_abstract_tasks, lora_alpha=cfg.lora_alpha,
            target_modules=targets, task_type=task_type, temperature=cfg.temperature, allocation=cfg.allocation,
            router_mi_weight=cfg.router_mi_weight, router_lr_multiplier=cfg.router_lr_multiplier,
        )  # fmt: skip

    def after_build(self, model: PeftModel, cfg: RunConfig) -> None:
        apply_ablations(model, cfg)

    def model_inputs(self, batch: dict[str, Any], task_index: dict[str, int]) -> dict[str, Any]:
        kwargs = super().model_inputs(batch, task_index)
        if "routing_mask" in batch:
            kwargs["routing_mask"] = batch["routing_mask"]
        return kwargs

    def routers(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        return get_tuner(model).router_parameters_by_kind()

    def step_begin(self, model: nn.Module, cfg: RunConfig, step: int, total_steps: int) -> None:
        RelaxationSchedule(cfg.temperature_end, cfg.noise_scale_end).apply(model, cfg.temperature, step, total_steps)

    def add_router_loss(self, model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
        return get_tuner(model).add_router_loss(loss)

    def routing_log(self, model: nn.Module) -> dict[str, torch.Tensor]:
        tuner = get_tuner(model)
        state = tuner.routing_state
        return {
            "aux": tuner.router_aux_loss().detach(),
            "assignment": state.task_weights.detach().argmax(-1),  # on the device: read at the next log entry
            "entropy_per_example": state.entropy_per_example,
            "entropy_marginal": state.entropy_marginal,
        }

    def routing_weights(self, model: PeftModel, kwargs: dict[str, Any]) -> torch.Tensor:
        return get_tuner(model).routing(**kwargs).task_weights

    def log_state(self, model: nn.Module) -> dict[str, float]:
        return allocation_distance(model)


def allocation_distance(model: nn.Module) -> dict[str, float]:
    """How far the learned allocation has moved from its LoRA-equivalent start (0 there: every abstract task gets the
    same operator, OrchMoE computes a LoRA of rank S*r), averaged over abstract tasks and modules, under the
    allocation's own log key: for the diagonal, ``allocation_tv``, the total-variation distance between each abstract
    task's eval-time skill distribution softmax(Z_i / tau) and 1/S; for the mixing one, ``mixing_distance``,
    ||M_t - I||_F / ||I||_F."""
    allocations = [m for m in model.modules() if isinstance(m, Allocation)]
    with torch.no_grad():
        weight = torch.stack([a.weight for a in allocations])  # (M, T, S) or (M, T, S*r, S*r)
        return {allocations[0].log_key: allocations[0].distance(weight).item()}


METHOD_OBJECTS: dict[str, Method] = {
    m.name: m for m in (OrchMoE(), LoRA(), Poly("poly", 1e-2, multi_head=False), Poly("mhr", 3e-3, multi_head=True))
}


def method_of(name: str) -> Method:
    return METHOD_OBJECTS[name]


def learning_rate(cfg: RunConfig) -> float:
    """``--lr``, or the method's validated learning rate."""
    return cfg.lr if cfg.lr is not None else method_of(cfg.method).validated_lr


def peft_config(method: str, model: nn.Module, cfg: RunConfig, n_train_tasks: int):
    task_type = "SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM"
    return method_of(method).peft_config(target_modules(model, cfg), task_type, cfg, n_train_tasks)


def build(method: str, base: nn.Module, cfg: RunConfig, n_train_tasks: int) -> PeftModel:
    model = get_peft_model(base, peft_config(method, base, cfg, n_train_tasks))
    method_of(method).after_build(model, cfg)
    return model


def apply_ablations(model: PeftModel, cfg: RunConfig) -> None:
    """The harness's router ablations, by freezing router parameters at the values that make them uniform.

    No Task Router: W_task = 0 and b = 0, so w = softmax(0) = 1/T for every prompt. No Skill Router: Z = 0 without
    training noise, so z = 1/S and every skill weight is S * 1/S = 1 (for the mixing allocation every M_t = I): the
    adapter is then a LoRA of rank S*r.
    """
    tuner = get_tuner(model)
    with torch.no_grad():
        if cfg.uniform_task_router:
            for p in tuner.task_router().parameters():
                p.zero_().requires_grad_(False)
        if cfg.uniform_skill_router:
            for module in tuner.modules():
                if isinstance(module, Allocation):
                    module.freeze_uniform()


def gradient_norms(method: Method, model: nn.Module) -> dict[str, torch.Tensor]:
    """L2 norm of the current gradients of each parameter kind (before clipping): {"grad_norm_<kind>": scalar}; a
    parameter that is no router of ``method`` is an adapter."""
    kinds = router_kinds(method.routers(model))
    squares: dict[str, list[torch.Tensor]] = {}
    for p in model.parameters():
        if p.grad is not None:
            squares.setdefault(kinds.get(id(p), "adapter"), []).append(p.grad.detach().float().square().sum())
    return {f"grad_norm_{kind}": torch.stack(values).sum().sqrt() for kind, values in squares.items()}


@dataclass
class ParamCounts:
    adapter: int  # the skills / LoRA matrices
    router: int  # task router + allocation logits (OrchMoE), task-skill logits (Poly/MHR)
    base: int

    @property
    def trainable(self) -> int:
        return self.adapter + self.router


def count_parameters(method: Method, model: nn.Module) -> ParamCounts:
    counts = count_by_kind(model.parameters(), method.routers(model))
    router = sum(v for k, v in counts.items() if k not in ("adapter", "base"))
    return ParamCounts(adapter=counts["adapter"], router=router, base=counts["base"])


def check_parity(counts: dict[str, ParamCounts]) -> None:
    """Every method's adapter parameters within 2% of LoRA's (or of the first method's)."""
    ref_name = "lora" if "lora" in counts else next(iter(counts))
    ref = counts[ref_name].adapter
    for name, c in counts.items():
        if abs(c.adapter - ref) > PARITY_TOLERANCE * ref:
            raise ValueError(
                f"Parameter parity broken: {name} has {c.adapter:,} adapter parameters, {ref_name} {ref:,} "
                f"(tolerance {PARITY_TOLERANCE:.0%}). Use --r and --n-skills with LoRA rank = S * r."
            )


def optimizer_groups(method: Method, model: nn.Module, cfg: RunConfig) -> list[dict]:
    """Adapters at the run's learning rate, routers at ``router_lr_multiplier`` times it (the task-skill logits at
    ``allocation_lr`` when given), without weight decay on routers: ``orchmoe.training.parameter_groups``."""
    lr = learning_rate(cfg)
    return parameter_groups(model, method.routers(model), lr, cfg.weight_decay, cfg.router_lr_multiplier,
                            cfg.allocation_lr)  # fmt: skip


def set_unseen_task_row(model: nn.Module, n_train_tasks: int) -> None:
    """Poly/MHR: the reserved last task row := the mean of the trained rows (logits), for unseen tasks."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, PolyRouter):
                logits = module.module_logits  # (n_tasks, n_splits * n_skills)
                logits[n_train_tasks] = logits[:n_train_tasks].mean(dim=0)

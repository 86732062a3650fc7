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
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from ..training import RelaxationSchedule, set_relaxation
from ..tuner import OrchMoEConfig
from ..tuner.access import get_tuner
from ..tuner.router import SkillRouter, distance_from_uniform
from .config import RunConfig

PARITY_TOLERANCE = 0.02


def target_modules(model: nn.Module, cfg: RunConfig) -> list[str]:
    if cfg.target_modules:
        return list(cfg.target_modules)
    model_type = model.config.model_type
    if model_type not in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        raise ValueError(f"No default target modules for model type {model_type!r}; pass --target-modules.")
    return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])


class Method:
    """What one method does differently in the harness; everything else is shared. One instance per method."""

    name: str
    # the learning rate its validation split chose on sni-10 (BENCHMARKS.md, "The learning-rate grid extended to
    # 1e-2": grid {1e-3, 3e-3, 1e-2}, validation ROUGE-L of the training tasks, Gemma 3 270M)
    validated_lr: float

    def peft_config(self, targets: list[str], task_type: str, cfg: RunConfig, n_train_tasks: int):
        raise NotImplementedError

    def after_build(self, model: PeftModel, cfg: RunConfig) -> None:
        """Changes to a freshly built model (before any training step or checkpoint restore)."""

    def model_inputs(self, batch: dict[str, Any], task_index: dict[str, int]) -> dict[str, Any]:
        """The keyword arguments its model gets: never the task names."""
        return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}

    def step_begin(self, model: nn.Module, cfg: RunConfig, progress: float) -> None:
        """Before the optimizer step at ``progress`` in [0, 1] of training."""

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
        return LoraConfig(r=cfg.n_skills * cfg.rank, lora_alpha=cfg.lora_alpha, target_modules=targets,
                          task_type=task_type)  # fmt: skip


class Poly(Method):
    """peft's Poly (one head) or MHR (``n_splits`` heads): routed by the true task id; unseen tasks get an extra
    row, set to the average of the trained rows after training (as microsoft/mttl does)."""

    def __init__(self, name: str, validated_lr: float, multi_head: bool) -> None:
        self.name, self.validated_lr, self.multi_head = name, validated_lr, multi_head

    def peft_config(self, targets: list[str], task_type: str, cfg: RunConfig, n_train_tasks: int):
        return PolyConfig(r=cfg.rank, n_skills=cfg.n_skills, n_splits=cfg.n_splits if self.multi_head else 1,
                          n_tasks=n_train_tasks + 1, target_modules=targets, task_type=task_type)  # fmt: skip

    def model_inputs(self, batch: dict[str, Any], task_index: dict[str, int]) -> dict[str, Any]:
        kwargs = super().model_inputs(batch, task_index)
        ids = [task_index.get(t, len(task_index)) for t in batch["task"]]  # unseen: the extra row
        kwargs["task_ids"] = torch.tensor(ids, device=batch["input_ids"].device)
        return kwargs

    def finish(self, model: PeftModel, n_train_tasks: int) -> None:
        set_unseen_task_row(model, n_train_tasks)


class OrchMoE(Method):
    name, validated_lr = "orchmoe", 3e-3  # with the routers at 1x (BENCHMARKS.md, `orchmoe-router1`)

    def peft_config(self, targets: list[str], task_type: str, cfg: RunConfig, n_train_tasks: int):
        return OrchMoEConfig(
            r=cfg.rank, n_skills=cfg.n_skills, n_abstract_tasks=cfg.n_abstract_tasks, lora_alpha=cfg.lora_alpha,
            target_modules=targets, task_type=task_type, temperature=cfg.temperature,
            router_mi_weight=cfg.router_mi_weight, router_lr_multiplier=cfg.router_lr_multiplier,
        )  # fmt: skip

    def after_build(self, model: PeftModel, cfg: RunConfig) -> None:
        apply_ablations(model, cfg)

    def model_inputs(self, batch: dict[str, Any], task_index: dict[str, int]) -> dict[str, Any]:
        kwargs = super().model_inputs(batch, task_index)
        if "routing_mask" in batch:
            kwargs["routing_mask"] = batch["routing_mask"]
        return kwargs

    def step_begin(self, model: nn.Module, cfg: RunConfig, progress: float) -> None:
        schedule = RelaxationSchedule(cfg.temperature_end, cfg.noise_scale_end)
        if schedule.active:
            set_relaxation(model, **schedule.at(cfg.temperature, progress))

    def routing_log(self, model: nn.Module) -> dict[str, torch.Tensor]:
        tuner = get_tuner(model)
        state = tuner.routing_state
        return {
            "aux": tuner.router_aux_loss(),
            "assignment": state.task_weights.detach().argmax(-1).cpu(),
            "entropy_per_example": state.entropy_per_example,
            "entropy_marginal": state.entropy_marginal,
        }

    def routing_weights(self, model: PeftModel, kwargs: dict[str, Any]) -> torch.Tensor:
        return get_tuner(model).routing(**kwargs).task_weights

    def log_state(self, model: nn.Module) -> dict[str, float]:
        return {"allocation_tv": allocation_distance(model)}


def allocation_distance(model: nn.Module) -> float:
    """How far the learned allocation is from uniform: the total-variation distance between each abstract task's
    eval-time skill distribution softmax(Z_i / tau) and 1/S, averaged over abstract tasks and modules (0: every
    abstract task gets the same, uniform skill mix, i.e. OrchMoE computes a LoRA of rank S*r)."""
    with torch.no_grad():
        z = torch.stack([m.allocation(stochastic=False) for m in model.modules() if isinstance(m, SkillRouter)])
        return distance_from_uniform(z).item()  # (M, T, S) -> scalar


METHOD_OBJECTS: dict[str, Method] = {
    m.name: m for m in (OrchMoE(), LoRA(), Poly("poly", 1e-2, multi_head=False), Poly("mhr", 3e-3, multi_head=True))
}


def method_of(name: str) -> Method:
    return METHOD_OBJECTS[name]


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
    training noise, so z = 1/S and every skill weight is S * 1/S = 1 (the adapter is then a LoRA of rank S*r).
    """
    tuner = get_tuner(model)
    with torch.no_grad():
        if cfg.uniform_task_router:
            for p in tuner.task_router().parameters():
                p.zero_().requires_grad_(False)
        if cfg.uniform_skill_router:
            for module in tuner.modules():
                if isinstance(module, SkillRouter):
                    module.logits.zero_().requires_grad_(False)
                    module.noise_scale = 0.0


def is_allocation_param(name: str) -> bool:
    """Task-skill logits: OrchMoE's allocation Z (per module or shared), Poly/MHR's module logits."""
    return "skill_router" in name or "poly_router" in name


def is_router_param(name: str) -> bool:
    return "orchmoe_task_router" in name or is_allocation_param(name)


def parameter_kind(name: str) -> str:
    """allocation (task-skill logits), task_router or adapter (skills / LoRA matrices)."""
    return "allocation" if is_allocation_param(name) else "task_router" if is_router_param(name) else "adapter"


def gradient_norms(model: nn.Module) -> dict[str, torch.Tensor]:
    """L2 norm of the current gradients of each parameter kind (before clipping): {"grad_norm_<kind>": scalar}."""
    squares: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            squares.setdefault(parameter_kind(name), []).append(p.grad.detach().float().square().sum())
    return {f"grad_norm_{kind}": torch.stack(values).sum().sqrt() for kind, values in squares.items()}


@dataclass
class ParamCounts:
    adapter: int  # the skills / LoRA matrices
    router: int  # task router + allocation logits (OrchMoE), task-skill logits (Poly/MHR)
    base: int

    @property
    def trainable(self) -> int:
        return self.adapter + self.router


def count_parameters(model: nn.Module) -> ParamCounts:
    adapter = router = base = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            base += p.numel()
        elif is_router_param(name):
            router += p.numel()
        else:
            adapter += p.numel()
    return ParamCounts(adapter, router, base)


def check_parity(counts: dict[str, ParamCounts]) -> None:
    """Every method's adapter parameters within 2% of LoRA's (or of the first method's)."""
    ref_name = "lora" if "lora" in counts else next(iter(counts))
    ref = counts[ref_name].adapter
    for name, c in counts.items():
        if abs(c.adapter - ref) > PARITY_TOLERANCE * ref:
            raise ValueError(
                f"Parameter parity broken: {name} has {c.adapter:,} adapter parameters, {ref_name} {ref:,} "
                f"(tolerance {PARITY_TOLERANCE:.0%}). Use --rank and --n-skills with LoRA rank = S * r."
            )


def optimizer_groups(
    model: nn.Module, lr: float, router_lr_multiplier: float, weight_decay: float, allocation_lr: float | None = None
) -> list[dict]:
    """Adapters at ``lr``; router parameters at ``lr * router_lr_multiplier``, except the task-skill logits at
    ``allocation_lr`` when it is given (an absolute value, as mttl's ``module_logits_learning_rate``). No weight decay
    on routers."""
    adapters, routers, allocation = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if allocation_lr is not None and is_allocation_param(name):
            allocation.append(p)
        else:
            (routers if is_router_param(name) else adapters).append(p)
    groups = [{"params": adapters, "lr": lr, "weight_decay": weight_decay, "name": "adapters"}]
    if routers:
        groups.append({"params": routers, "lr": lr * router_lr_multiplier, "weight_decay": 0.0, "name": "routers"})
    if allocation:
        groups.append({"params": allocation, "lr": allocation_lr, "weight_decay": 0.0, "name": "allocation"})
    return groups


def set_unseen_task_row(model: nn.Module, n_train_tasks: int) -> None:
    """Poly/MHR: the reserved last task row := the mean of the trained rows (logits), for unseen tasks."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "poly_router" in name and name.endswith("module_logits"):
                p[n_train_tasks] = p[:n_train_tasks].mean(dim=0)

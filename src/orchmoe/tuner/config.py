"""Configuration of the OrchMoE tuner (a peft config dataclass)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from ._registry import ORCHMOE_PEFT_TYPE

SkillRelaxation = Literal["gumbel_softmax", "gumbel_sigmoid"]
RouterNorm = Literal["batch", "layer", "none"]
RouterMode = Literal["learned", "uniform"]
Mixing = Literal["outputs", "parameters"]


@dataclass
class OrchMoEConfig(PeftConfig):
    """Configuration of an [`OrchMoEModel`]: a pool of LoRA skills, a Task Router and a Skill Router.

    At parameter parity, LoRA of rank ``R`` corresponds to ``n_skills * r == R``. With the default
    ``scale_by_skills=True`` and the scaling ``lora_alpha / (n_skills * r)``, uniform routing is exactly a LoRA of
    rank ``n_skills * r`` with scaling ``lora_alpha / (n_skills * r)``: routing can only add to LoRA.
    """

    r: int = field(default=2, metadata={"help": "LoRA rank of one skill."})
    n_skills: int = field(default=8, metadata={"help": "Number of LoRA skills S in each adapted module."})
    n_abstract_tasks: int = field(
        default=4,
        metadata={
            "help": "Number of abstract tasks T the Task Router infers from the prompt (not the number of real tasks, "
            "which OrchMoE never sees; peft's Poly calls those n_tasks)."
        },
    )
    lora_alpha: float = field(
        default=16.0, metadata={"help": "LoRA alpha; the skill output is scaled by lora_alpha / (n_skills * r)."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the input of the skills."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Names (or a regex) of the nn.Linear modules to adapt, e.g. ['q_proj', 'v_proj']. None picks "
            "peft's LoRA defaults for the model type."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names (or a regex) of modules never to adapt."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules besides the adapters to train and save (e.g. a new head)."}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "Initialise every skill's B to zero (the adapted model starts as the base)."}
    )
    temperature: float = field(
        default=1.0, metadata={"help": "Temperature tau of the Skill Router relaxation: softmax((Z + g) / tau)."}
    )
    allocation_init: float = field(
        default=1e-3,
        metadata={
            "help": "Z starts uniform in [-a, a]. 1e-3 (as Poly) starts every abstract task at a near-uniform skill "
            "mix; a value of order 1 gives each abstract task its own random skill mix from the first step."
        },
    )
    noise_scale: float = field(
        default=1.0,
        metadata={
            "help": "Scale of the Skill Router's training noise: softmax((Z + noise_scale * g) / tau). 1 is the plain "
            "Gumbel-softmax; 0 trains with the deterministic softmax(Z / tau) used at eval. Annealing it to 0 "
            "(RunConfig.noise_scale_end) ends training without noise and keeps Z's sharpness, which raising tau "
            "would flatten."
        },
    )
    noise_per_example: bool = field(
        default=False,
        metadata={
            "help": "Draw the Skill Router's Gumbel noise once per example instead of once per forward call for the "
            "whole batch. The expected training loss is the same; the noise in each step's gradient is averaged "
            "over the batch. Under data parallelism each process draws for its own examples, as with dropout."
        },
    )
    skill_relaxation: SkillRelaxation = field(
        default="gumbel_softmax",
        metadata={
            "help": "Relaxation of the task-skill allocation: 'gumbel_softmax' (each abstract task's row is a "
            "distribution over skills) or 'gumbel_sigmoid' (Poly's relaxed Bernoulli, rows normalised)."
        },
    )
    mixing: Mixing = field(
        default="outputs",
        metadata={
            "help": "'outputs' (paper eq. 3): dh = lora_alpha / (S*r) * sum_j alpha_j B_j A_j x, one rank-S*r product. "
            "'parameters' (Poly's way, DESIGN.md's option): dh = lora_alpha / r * (sum_j a_j B_j)(sum_j a_j A_j) x "
            "with skill weights a summing to 1 (never scaled by S): a per-example rank-r LoRA."
        },
    )
    scale_by_skills: bool = field(
        default=True,
        metadata={
            "help": "Multiply the per-example skill weights (rows summing to 1) by n_skills, so uniform routing is "
            "a LoRA of rank n_skills * r. Without it skills learn ~1/S^2 slower (DESIGN.md, measured pitfalls)."
        },
    )
    task_router: RouterMode = field(
        default="learned",
        metadata={"help": "'learned', or 'uniform': every example gets uniform abstract-task weights (ablation)."},
    )
    skill_router: RouterMode = field(
        default="learned",
        metadata={"help": "'learned', or 'uniform': a fixed uniform task-skill allocation, no noise (ablation)."},
    )
    router_attention: bool = field(
        default=True,
        metadata={"help": "Task Router: parameter-free self-attention with a residual over the prompt embeddings."},
    )
    router_layer: int = field(
        default=0,
        metadata={
            "help": "What the Task Router reads: 0 = the prompt's input token embeddings; k > 0 = the frozen base "
            "model's hidden states after its k-th layer (of the encoder for an encoder-decoder), from a partial "
            "forward of k layers with the skills switched off, once per training step or per generate call."
        },
    )
    router_norm: RouterNorm = field(
        default="batch",
        metadata={
            "help": "Task Router: normalisation of the pooled prompt vector. 'batch' centres it across examples (a "
            "BatchNorm without affine: batch statistics in training, running statistics at eval); 'layer' and "
            "'none' are ablations that collapse in practice."
        },
    )
    router_mi_weight: float = field(
        default=0.1,
        metadata={
            "help": "lambda of the router objective lambda * (mean_b H(w_b) - H(mean_b w)) (minus the mutual "
            "information between input and abstract task). Added to the loss when `labels` are passed in training "
            "mode; 0 switches it off."
        },
    )
    router_lr_multiplier: float = field(
        default=10.0,
        metadata={"help": "Learning rate of router parameters (W_task, allocation logits) relative to the skills'."},
    )

    @classmethod
    def check_kwargs(cls, **kwargs: object) -> dict[str, object]:
        """Configs saved before the rename call the number of abstract tasks ``n_tasks``."""
        if "n_tasks" in kwargs and "n_abstract_tasks" not in kwargs:
            kwargs["n_abstract_tasks"] = kwargs.pop("n_tasks")
        kwargs.pop("share_allocation", None)  # removed option (always one allocation per module)
        return super().check_kwargs(**kwargs)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ORCHMOE_PEFT_TYPE
        for name in ("r", "n_skills", "n_abstract_tasks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"OrchMoEConfig.{name} must be an integer >= 1, got {value!r}.")
        if self.temperature <= 0:
            raise ValueError(f"OrchMoEConfig.temperature must be > 0, got {self.temperature!r}.")
        if self.noise_scale < 0:
            raise ValueError(f"OrchMoEConfig.noise_scale must be >= 0, got {self.noise_scale!r}.")
        if not isinstance(self.router_layer, int) or isinstance(self.router_layer, bool) or self.router_layer < 0:
            raise ValueError(f"OrchMoEConfig.router_layer must be an integer >= 0, got {self.router_layer!r}.")
        if self.allocation_init < 0:
            raise ValueError(f"OrchMoEConfig.allocation_init must be >= 0, got {self.allocation_init!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"OrchMoEConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.router_mi_weight < 0:
            raise ValueError(f"OrchMoEConfig.router_mi_weight must be >= 0, got {self.router_mi_weight!r}.")
        if self.router_lr_multiplier <= 0:
            raise ValueError(f"OrchMoEConfig.router_lr_multiplier must be > 0, got {self.router_lr_multiplier!r}.")
        choices = {
            "skill_relaxation": SkillRelaxation,
            "router_norm": RouterNorm,
            "task_router": RouterMode,
            "skill_router": RouterMode,
            "mixing": Mixing,
        }
        for name, literal in choices.items():
            allowed = literal.__args__
            if getattr(self, name) not in allowed:
                raise ValueError(f"OrchMoEConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)

    @property
    def scaling(self) -> float:
        """LoRA scaling: lora_alpha / (n_skills * r) of the concatenated skills when mixing outputs, lora_alpha / r
        of the mixed rank-r skill when mixing parameters."""
        if self.mixing == "parameters":
            return self.lora_alpha / self.r
        return self.lora_alpha / (self.n_skills * self.r)

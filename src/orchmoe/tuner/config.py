"""Configuration of the OrchMoE tuner (a peft config dataclass)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig

from ._registry import ORCHMOE_PEFT_TYPE

# Options of earlier versions, each measured on SNI without a benefit and removed, with the value that every adapter
# keeps meaning: a saved config with that value loads, with another it is refused (its adapter computes differently).
REMOVED_OPTIONS: dict[str, object] = {
    "share_allocation": False,
    "allocation_init": None,  # any value: only the initialisation, not what a trained adapter computes
    "noise_per_example": None,  # training-time only
    "skill_relaxation": "gumbel_softmax",
    "mixing": "outputs",
    "scale_by_skills": True,
    "task_router": "learned",
    "skill_router": "learned",
    "router_attention": True,
    "router_layer": 0,
    "router_norm": "batch",
}


@dataclass
class OrchMoEConfig(PeftConfig):
    """Configuration of an [`OrchMoEModel`]: a pool of LoRA skills, a Task Router and a Skill Router.

    At parameter parity, LoRA of rank ``R`` corresponds to ``n_skills * r == R``. Skill weights are scaled by
    ``n_skills`` and skill outputs by ``lora_alpha / (n_skills * r)``, so uniform routing is exactly a LoRA of rank
    ``n_skills * r`` with scaling ``lora_alpha / (n_skills * r)``: routing can only add to LoRA.

    OrchMoE routes per example and cannot be merged into the base weights; ``orchmoe.export_lora`` writes one routing
    as a plain LoRA adapter, which can.
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
            "help": "Names (or a regex) of the nn.Linear or Conv1D modules to adapt, e.g. ['q_proj', 'v_proj']. None "
            "picks peft's LoRA defaults for the model type (in a multimodal model, in its language model only)."
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
    allocation: str = field(
        default="mixing",
        metadata={
            "help": "The Skill Router's allocation. 'mixing' (the default): a matrix M_t (S*r x S*r) per abstract "
            "task and module, initialised to the identity (exactly a LoRA of rank S*r at the start), no noise; it "
            "adds T*(S*r)^2 parameters per module (temperature and noise_scale do not apply). It had the higher "
            "validation ROUGE-L at every seed of the project's two at-scale protocols (BENCHMARKS.md). 'diagonal' "
            "(the paper's): a learned task-skill matrix Z (T x S), each abstract task reweighting the S skills, "
            "relaxed with Gumbel-softmax while training."
        },
    )
    temperature: float = field(
        default=1.0, metadata={"help": "Temperature tau of the Skill Router relaxation: softmax((Z + g) / tau)."}
    )
    noise_scale: float = field(
        default=1.0,
        metadata={
            "help": "Scale of the Skill Router's training noise: softmax((Z + noise_scale * g) / tau). 1 is the plain "
            "Gumbel-softmax; 0 trains with the deterministic softmax(Z / tau) used at eval. Annealing it to 0 during "
            "training (orchmoe.set_relaxation, run by the trainers' schedules) ends training without noise and "
            "keeps Z's sharpness, which raising tau would flatten."
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
        default=1.0,
        metadata={
            "help": "Learning rate of router parameters (W_task, b, allocation logits Z) relative to the skills', "
            "applied by orchmoe.OrchMoETrainer and the harness in an optimizer group without weight decay."
        },
    )

    @classmethod
    def check_kwargs(cls, **kwargs: object) -> dict[str, object]:
        """Saved configs of earlier versions: ``n_tasks`` was the number of abstract tasks, a config without
        ``allocation`` is the diagonal one (the default before), and options since removed load when they hold the
        value that is now fixed."""
        if "n_tasks" in kwargs and "n_abstract_tasks" not in kwargs:
            kwargs["n_abstract_tasks"] = kwargs.pop("n_tasks")
        kwargs.setdefault("allocation", "diagonal")  # saved before the option existed: the only allocation then
        for name, fixed in REMOVED_OPTIONS.items():
            if name in kwargs and (value := kwargs.pop(name)) != fixed and fixed is not None:
                raise ValueError(
                    f"This OrchMoE adapter was saved with {name}={value!r}, an option this version no longer has (it "
                    f"now always computes as {name}={fixed!r}); load it with the orchmoe version that trained it."
                )
        return super().check_kwargs(**kwargs)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ORCHMOE_PEFT_TYPE
        for name in ("r", "n_skills", "n_abstract_tasks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"OrchMoEConfig.{name} must be an integer >= 1, got {value!r}.")
        if self.allocation not in ("diagonal", "mixing"):
            raise ValueError(f"OrchMoEConfig.allocation must be 'diagonal' or 'mixing', got {self.allocation!r}.")
        if self.temperature <= 0:
            raise ValueError(f"OrchMoEConfig.temperature must be > 0, got {self.temperature!r}.")
        if self.noise_scale < 0:
            raise ValueError(f"OrchMoEConfig.noise_scale must be >= 0, got {self.noise_scale!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"OrchMoEConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.router_mi_weight < 0:
            raise ValueError(f"OrchMoEConfig.router_mi_weight must be >= 0, got {self.router_mi_weight!r}.")
        if self.router_lr_multiplier <= 0:
            raise ValueError(f"OrchMoEConfig.router_lr_multiplier must be > 0, got {self.router_lr_multiplier!r}.")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)

    @property
    def scaling(self) -> float:
        """LoRA scaling of the concatenated skills (a rank-S*r LoRA): lora_alpha / (n_skills * r)."""
        return self.lora_alpha / (self.n_skills * self.r)

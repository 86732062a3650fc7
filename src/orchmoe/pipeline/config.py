"""Run configuration: defaults < preset < config file (YAML/TOML) < command-line flags."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib
import yaml

METHODS = ("orchmoe", "lora", "poly", "mhr")


@dataclass
class RunConfig:
    """Everything one training + evaluation run depends on. Saved as ``config.json`` in the run directory."""

    method: str = field(default="orchmoe", metadata={"help": "orchmoe, lora, poly or mhr."})
    model: str = field(default="gemma3-270m", metadata={"help": "gemma3-270m, tiny-gemma3, tiny-t5, an HF id or path."})
    data_dir: str | None = field(default=None, metadata={"help": "SNI layout; None = the built-in suite."})
    data: str | None = field(
        default=None,
        metadata={"help": "Your own data: JSONL, CSV, Parquet or a datasets dir with prompt, completion (, task)."},
    )
    eval_data: str | None = field(default=None, metadata={"help": "A second file to evaluate on (with --data)."})
    eval_fraction: float = field(default=0.1, metadata={"help": "Held out of --data for evaluation (no --eval-data)."})
    chat_template: bool = field(default=False, metadata={"help": "Wrap prompts in the tokenizer's chat template."})
    split: str = field(default="default", metadata={"help": "Split folder under splits/."})
    seed: int = field(default=0, metadata={"help": "Seeds task choice, data order and initialisation."})
    n_tasks: int = field(default=10, metadata={"help": "Training tasks, chosen at random (seeded)."})
    n_unseen: int = field(default=2, metadata={"help": "Unseen tasks from the split's test list."})
    tasks: list[str] | None = field(default=None, metadata={"help": "Explicit training tasks (overrides n_tasks)."})
    held_out_tasks: list[str] | None = field(
        default=None,
        metadata={"help": "Training-split tasks never trained on, scored apart (unseen members of seen families)."},
    )
    n_train: int = field(default=48, metadata={"help": "Training instances per task."})
    n_test: int = field(default=10, metadata={"help": "Test instances per task (its first ones)."})
    n_test_unseen: int | None = field(
        default=None, metadata={"help": "Test instances per unseen or held-out task; None = n_test."}
    )
    k_shot: int = field(default=0, metadata={"help": "Positive examples in the prompt."})
    suite_instances: int = field(default=120, metadata={"help": "Instances per task of the built-in suite."})
    max_input_tokens: int = field(default=256, metadata={"help": "Prompt tokens kept (longer prompts truncated)."})
    max_target_tokens: int = field(default=32, metadata={"help": "Target tokens kept (longer targets truncated)."})
    max_new_tokens: int = field(default=24, metadata={"help": "Generation length at evaluation."})
    batch_size: int = field(default=8, metadata={"help": "Global training batch size (per optimizer step)."})
    grad_accum: int = field(default=1, metadata={"help": "Gradient accumulation steps."})
    eval_batch_size: int = field(default=16, metadata={"help": "Generation batch size."})
    epochs: float = field(default=1.0, metadata={"help": "Passes over the training data."})
    max_steps: int | None = field(default=None, metadata={"help": "Stop after this many optimizer steps."})
    lr: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the adapters; default: the method's own (OrchMoE, LoRA, MHR 3e-3, Poly 1e-2)."
        },
    )
    router_lr_multiplier: float = field(
        default=1.0,
        metadata={"help": "Learning rate of the routers relative to the adapters' (OrchMoE, Poly, MHR)."},
    )
    allocation_lr: float | None = field(
        default=None,
        metadata={
            "help": "Absolute lr of the task-skill logits (OrchMoE's Z, Poly/MHR's module logits), like mttl's "
            "module_logits_learning_rate; None = lr * router multiplier."
        },
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Linear warmup, fraction of the steps."})
    schedule: str = field(default="linear", metadata={"help": "linear (decay to 0) or constant."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (0 = off)."})
    n_skills: int = field(default=8, metadata={"help": "Skills S per module (OrchMoE, Poly, MHR)."})
    r: int = field(default=2, metadata={"help": "Rank r of one skill; LoRA gets rank S*r."})
    n_abstract_tasks: int = field(default=4, metadata={"help": "OrchMoE abstract tasks T."})
    n_splits: int = field(default=4, metadata={"help": "MHR heads (Poly has 1)."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha for LoRA and OrchMoE."})
    target_modules: list[str] | None = field(default=None, metadata={"help": "Adapted modules (default per model)."})
    temperature: float = field(default=1.0, metadata={"help": "OrchMoE Gumbel temperature (start)."})
    temperature_end: float | None = field(default=None, metadata={"help": "Anneal the temperature to this value."})
    noise_scale_end: float | None = field(
        default=None,
        metadata={
            "help": "OrchMoE: anneal the Gumbel noise scale linearly from 1 to this value (0: no noise at the end)."
        },
    )
    allocation: str = field(
        default="diagonal",
        metadata={
            "help": "OrchMoE task-skill allocation: diagonal (the paper's, so the default of --method orchmoe) or "
            "mixing (a matrix per abstract task; OrchMoEConfig's default, chosen by the project's validation)."
        },
    )
    router_mi_weight: float = field(default=0.1, metadata={"help": "OrchMoE router MI weight lambda."})
    uniform_task_router: bool = field(default=False, metadata={"help": "Ablation: fixed uniform task weights."})
    uniform_skill_router: bool = field(default=False, metadata={"help": "Ablation: fixed uniform allocation."})
    precision: str = field(
        default="fp32", metadata={"help": "fp32, bf16 or fp16 mixed precision (through accelerate; fp16 needs a GPU)."}
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    load_in_4bit: bool = field(default=False, metadata={"help": "A 4-bit NF4 base (bitsandbytes), QLoRA-style."})
    load_in_8bit: bool = field(default=False, metadata={"help": "An 8-bit base (bitsandbytes)."})
    checkpoint_every: int = field(default=0, metadata={"help": "Checkpoint every N optimizer steps (0 = never)."})
    log_every: int = field(default=5, metadata={"help": "Log every N optimizer steps."})
    nan_patience: int = field(default=5, metadata={"help": "Stop after this many consecutive non-finite losses."})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {METHODS}, got {self.method!r}.")
        for name in ("n_train", "n_test", "batch_size", "grad_accum", "eval_batch_size", "n_skills", "r"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}.")
        if self.n_test_unseen is not None and self.n_test_unseen < 1:
            raise ValueError(f"--n-test-unseen must be >= 1 (or unset), got {self.n_test_unseen}.")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"--batch-size {self.batch_size} must be a multiple of --grad-accum {self.grad_accum}.")
        if self.allocation not in ("diagonal", "mixing"):
            raise ValueError(f"--allocation must be diagonal or mixing, got {self.allocation!r}.")
        if self.allocation == "mixing" and (self.temperature_end is not None or self.noise_scale_end is not None):
            raise ValueError(
                "--temperature-end / --noise-scale-end anneal the diagonal allocation's Gumbel-softmax; --allocation "
                "mixing has neither temperature nor noise: drop them, or use --allocation diagonal."
            )
        if self.schedule not in ("linear", "constant"):
            raise ValueError(f"--schedule must be linear or constant, got {self.schedule!r}.")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}.")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"--precision must be fp32, bf16 or fp16, got {self.precision!r}.")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("--load-in-4bit and --load-in-8bit exclude each other.")
        if self.data is not None and self.data_dir is not None:
            raise ValueError("--data and --data-dir exclude each other: your own rows, or an SNI directory.")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}.")
        if self.noise_scale_end is not None and self.noise_scale_end < 0:
            raise ValueError(f"--noise-scale-end must be >= 0 (or unset), got {self.noise_scale_end}.")
        if self.allocation_lr is not None and self.allocation_lr <= 0:
            raise ValueError(f"--allocation-lr must be > 0 (or unset), got {self.allocation_lr}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> RunConfig:
        """A saved ``config.json``, also of earlier versions (their option names renamed)."""
        return cls(**upgrade(options))


RENAMED = {"rank": "r"}  # earlier versions' option names -> today's (the same meaning)


def upgrade(options: dict[str, Any]) -> dict[str, Any]:
    """Saved options with earlier versions' names renamed, so old runs load, resume and compare equal."""
    return {RENAMED.get(k, k): v for k, v in options.items()}


PRESETS: dict[str, dict[str, Any]] = {
    # the built-in demo: fits the README's 15-minute budget on a 2-core CPU with Gemma 3 270M
    "demo": {},
    # the paper's optimisation: AdamW, lr 5e-5, linear decay, one epoch
    "paper": {"lr": 5e-5, "schedule": "linear", "epochs": 1.0, "warmup_ratio": 0.0},
    "sni-10": {"n_tasks": 10, "n_unseen": 12, "n_train": 32, "n_test": 8, "max_input_tokens": 384},
    "sni-100": {"n_tasks": 100, "n_unseen": 12, "n_train": 16, "n_test": 4, "max_input_tokens": 384},
}

FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a YAML (.yaml/.yml), TOML (.toml) or JSON file; keys as the flags' names (- or _)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found.")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text) or {}
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot parse config file: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must map option names to values.")
    options = upgrade({str(k).replace("-", "_"): v for k, v in data.items()})
    unknown = sorted(set(options) - set(FIELDS) - {"preset"})
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {', '.join(unknown)}.")
    return options


def resolve(
    flags: dict[str, Any], config_file: str | Path | None = None, preset: str | None = None, **base: Any
) -> RunConfig:
    """defaults < ``base`` (the command's own defaults) < preset < config file < flags (None = not given)."""
    options: dict[str, Any] = dict(base)
    file_options = read_config_file(config_file) if config_file else {}
    preset = flags.get("preset") or file_options.pop("preset", None) or preset
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
        options.update(PRESETS[preset])
    options.update(file_options)
    options.update({k: v for k, v in flags.items() if v is not None and k in FIELDS})
    return RunConfig(**options)

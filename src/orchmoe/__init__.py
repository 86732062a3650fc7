"""orchmoe: multi-task parameter-efficient fine-tuning with routed LoRA skills (OrchMoE, arXiv 2401.10559).

``import orchmoe`` registers the method with peft, so ``get_peft_model(model, OrchMoEConfig(...))`` and
``PeftModel.from_pretrained(base, path)`` work as for peft's own methods.
"""

from .pipeline.export import export_lora
from .tuner import OrchMoEConfig, OrchMoEModel, Routing
from .tuner.access import format_parameter_report, get_tuner, parameter_report, routing

__version__ = "0.1.0"

_TRAINING = ("OrchMoESFTTrainer", "OrchMoETrainer", "OrchMoETrainerMixin", "RelaxationSchedule", "set_relaxation")


def __getattr__(name: str) -> object:
    """The Trainer integration (``orchmoe.training``) loads on first use: it imports transformers' Trainer."""
    if name in _TRAINING:
        from . import training

        return getattr(training, name)
    raise AttributeError(f"module 'orchmoe' has no attribute {name!r}")


__all__ = [
    *_TRAINING,
    "OrchMoEConfig",
    "OrchMoEModel",
    "Routing",
    "__version__",
    "export_lora",
    "format_parameter_report",
    "get_tuner",
    "parameter_report",
    "routing",
]

"""orchmoe: multi-task parameter-efficient fine-tuning with routed LoRA skills (OrchMoE, arXiv 2401.10559).

``import orchmoe`` loads the tuner only and registers the method with peft, so ``get_peft_model(model,
OrchMoEConfig(...))`` and ``PeftModel.from_pretrained(base, path)`` work as for peft's own methods. The export, the
Trainer integration and serving load on first use (``orchmoe.export_lora``, ``orchmoe.OrchMoETrainer``, ...).
"""

from importlib import import_module

from .tuner import OrchMoEConfig, OrchMoEModel, Routing
from .tuner.access import format_parameter_report, get_tuner, parameter_report, routing

__version__ = "0.1.0"

_LAZY = {  # name -> the module that defines it, imported on first use
    "export_lora": "export",
    **dict.fromkeys(
        (
            "OrchMoEDPOTrainer",
            "OrchMoEGRPOTrainer",
            "OrchMoESFTTrainer",
            "OrchMoETrainer",
            "OrchMoETrainerMixin",
            "RelaxationSchedule",
            "set_relaxation",
        ),
        "training",
    ),
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'orchmoe' has no attribute {name!r}")


__all__ = [
    *_LAZY,
    "OrchMoEConfig",
    "OrchMoEModel",
    "Routing",
    "__version__",
    "format_parameter_report",
    "get_tuner",
    "parameter_report",
    "routing",
]

"""The OrchMoE tuner, laid out like peft's own tuners, registered with peft on import."""

from peft.utils import register_peft_method

from ._registry import ORCHMOE_PEFT_TYPE
from .config import OrchMoEConfig
from .layer import Linear, OrchMoELayer, RoutingMissingError
from .model import OrchMoEModel, Routing, RoutingState
from .router import SkillRouter, TaskRouter

__all__ = [
    "ORCHMOE_PEFT_TYPE",
    "Linear",
    "OrchMoEConfig",
    "OrchMoELayer",
    "OrchMoEModel",
    "Routing",
    "RoutingMissingError",
    "RoutingState",
    "SkillRouter",
    "TaskRouter",
]

register_peft_method(name="orchmoe", config_cls=OrchMoEConfig, model_cls=OrchMoEModel)

"""Make ``ORCHMOE`` a member of peft's ``PeftType`` so ``peft.utils.register_peft_method`` accepts it.

peft's ``PeftType`` is a closed ``enum.Enum``; third-party methods have no public way to add a member. We add one
exactly as ``enum`` builds its own members (``_member_map_``, ``_value2member_map_``, ``_member_names_``), once, at
import time. Nothing else of peft or transformers is patched.
"""

from __future__ import annotations

from peft.utils import PeftType

NAME = "ORCHMOE"


def _add_peft_type(name: str) -> PeftType:
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


ORCHMOE_PEFT_TYPE: PeftType = _add_peft_type(NAME)

"""Parameter counts by kind, the routers selected by identity: one count for the tuner's report and the harness."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import nn


def router_kinds(routers: Mapping[str, list[nn.Parameter]]) -> dict[int, str]:
    """id(parameter) -> its router kind, for ``routers`` by kind (e.g. ``OrchMoEModel.router_parameters_by_kind()``)."""
    return {id(p): k for k, params in routers.items() for p in params}


def count_by_kind(parameters: Iterable[nn.Parameter], routers: Mapping[str, list[nn.Parameter]]) -> dict[str, int]:
    """Elements per kind: each router kind of ``routers`` (trainable ones), ``adapter`` (every other trainable
    parameter) and ``base`` (frozen parameters), each parameter counted once."""
    kind = router_kinds(routers)
    counts = dict.fromkeys(["adapter", *routers, "base"], 0)
    seen: set[int] = set()
    for p in parameters:
        if id(p) in seen:
            continue
        seen.add(id(p))
        counts[kind.get(id(p), "adapter") if p.requires_grad else "base"] += p.numel()
    return counts

"""Optimizer groups: adapters, routers and (optionally) the task-skill logits at their own learning rates."""

from __future__ import annotations

import pytest
import torch

from orchmoe import get_tuner
from orchmoe.models import tiny_model
from orchmoe.pipeline.config import RunConfig
from orchmoe.pipeline.methods import build, method_of, optimizer_groups

LR, MULT, ALLOC = 1e-3, 10.0, 0.1


@pytest.mark.parametrize(
    ("method", "allocation_lr", "expected"),
    [
        ("orchmoe", None, {"adapters": LR, "routers": LR * MULT}),
        ("orchmoe", ALLOC, {"adapters": LR, "routers": LR * MULT, "allocation": ALLOC}),
        ("poly", None, {"adapters": LR, "routers": LR * MULT}),
        ("poly", ALLOC, {"adapters": LR, "allocation": ALLOC}),  # Poly's only router parameters are its logits
        ("mhr", ALLOC, {"adapters": LR, "allocation": ALLOC}),
        ("lora", ALLOC, {"adapters": LR}),  # nothing to route: the value is ignored
    ],
)
def test_optimizer_groups(method: str, allocation_lr: float | None, expected: dict[str, float]) -> None:
    cfg = RunConfig(method=method, model="tiny-gemma3", n_skills=4, r=2, n_abstract_tasks=3, lr=LR,
                    router_lr_multiplier=MULT, weight_decay=0.01, allocation_lr=allocation_lr)  # fmt: skip
    model = build(method, tiny_model("tiny-gemma3", vocab_size=128, seed=0), cfg, n_train_tasks=3)
    groups = optimizer_groups(method_of(method), model, cfg)
    assert {g["name"]: g["lr"] for g in groups} == expected
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(names) and len(set(grouped)) == len(grouped)  # each trainable param once
    for group in groups:
        assert group["params"], group["name"]
        assert group["weight_decay"] == (0.01 if group["name"] == "adapters" else 0.0)
        in_group = [names[id(p)] for p in group["params"]]
        if group["name"] == "allocation":
            assert all("skill_router" in n or "poly_router" in n for n in in_group)
        if group["name"] == "routers" and allocation_lr is not None:
            assert all("orchmoe_task_router" in n for n in in_group)


def test_allocation_lr_must_be_positive() -> None:
    with pytest.raises(ValueError, match="--allocation-lr"):
        RunConfig(allocation_lr=0.0)


@pytest.mark.parametrize(("ablation", "frozen"), [("uniform_task_router", "orchmoe_task_router"),
                                                  ("uniform_skill_router", "orchmoe_skill_router")])  # fmt: skip
def test_router_ablations_route_uniformly_in_training_too(ablation: str, frozen: str) -> None:
    cfg = RunConfig(method="orchmoe", model="tiny-gemma3", n_skills=4, r=2, n_abstract_tasks=3, **{ablation: True})
    model = build("orchmoe", tiny_model("tiny-gemma3", vocab_size=128, seed=0), cfg, n_train_tasks=3).train()
    assert not any(p.requires_grad for n, p in model.named_parameters() if frozen in n)
    assert any(p.requires_grad for n, p in model.named_parameters() if "orchmoe_" in n and frozen not in n)
    tuner = get_tuner(model)
    ids = torch.randint(4, 128, (4, 6), generator=torch.Generator().manual_seed(0))
    w = tuner.task_weights(ids)
    if ablation == "uniform_task_router":
        assert torch.allclose(w, torch.full((4, 3), 1 / 3))
    else:  # every skill weight is S * 1/S = 1, Gumbel noise included: a LoRA of rank S*r
        for alpha in tuner.skill_weights(w, stochastic=True).values():
            assert torch.allclose(alpha, torch.ones(4, 4))

"""The fused OrchMoE linear against a naive loop over skills (paper eq. 3)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from orchmoe import OrchMoEConfig
from orchmoe.tuner import Linear, RoutingMissingError


def naive(layer: Linear, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """h = W0 x + scaling * sum_j alpha_j B_j A_j x, one skill at a time."""
    a, b = layer.orchmoe_A["default"], layer.orchmoe_B["default"]
    r, scaling = layer.r["default"], layer.scaling["default"]
    out = layer.base_layer(x)
    for j in range(layer.n_skills["default"]):
        a_j, b_j = a[j * r : (j + 1) * r], b[:, j * r : (j + 1) * r]  # (r, in), (out, r)
        out = out + scaling * alpha[:, j].view(-1, *([1] * (x.dim() - 1))) * (x @ a_j.T @ b_j.T)
    return out


@pytest.mark.parametrize(
    ("skills", "rank", "shape"),
    [(1, 1, (2, 5, 7)), (4, 2, (3, 5, 7)), (8, 3, (2, 1, 7)), (3, 4, (4, 7))],
)
def test_fused_layer_matches_per_skill_loop(skills: int, rank: int, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    config = OrchMoEConfig(allocation="diagonal", n_skills=skills, r=rank, target_modules=["lin"], init_weights=False)
    layer = Linear(nn.Linear(7, 6), "default", config)
    x = torch.randn(*shape)
    alpha = torch.rand(shape[0], skills) * skills
    fused = layer(x, skill_weights=alpha)
    assert torch.allclose(fused, naive(layer, x, alpha), atol=1e-5)


def test_layer_expands_routing_for_beams_and_rejects_bad_batches() -> None:
    torch.manual_seed(0)
    layer = Linear(
        nn.Linear(7, 6), "default", OrchMoEConfig(allocation="diagonal", n_skills=3, r=2, init_weights=False)
    )
    alpha = torch.rand(2, 3)
    x = torch.randn(4, 5, 7)  # each example expanded to two beams
    expected = naive(layer, x, alpha.repeat_interleave(2, dim=0))
    assert torch.allclose(layer(x, skill_weights=alpha), expected, atol=1e-5)
    with pytest.raises(ValueError, match="multiple"):
        layer(torch.randn(3, 5, 7), skill_weights=alpha)


def test_layer_without_routing_fails_loudly_and_cannot_merge() -> None:
    layer = Linear(nn.Linear(7, 6), "default", OrchMoEConfig(allocation="diagonal", n_skills=3, r=2))
    with pytest.raises(RoutingMissingError, match="without routing"):
        layer(torch.randn(2, 7))
    with pytest.raises(NotImplementedError, match="export"):
        layer.merge()


def test_uniform_routing_is_a_lora_of_rank_s_times_r() -> None:
    """With alpha = S * (1/S) = 1 for every skill, OrchMoE is LoRA of rank S*r with scaling lora_alpha/(S*r)."""
    torch.manual_seed(0)
    config = OrchMoEConfig(allocation="diagonal", n_skills=4, r=2, lora_alpha=8.0, init_weights=False)
    layer = Linear(nn.Linear(7, 6), "default", config)
    x = torch.randn(3, 5, 7)
    a, b = layer.orchmoe_A["default"], layer.orchmoe_B["default"]
    lora = layer.base_layer(x) + (8.0 / 8) * (x @ a.T @ b.T)
    assert torch.allclose(layer(x, skill_weights=torch.ones(3, 4)), lora, atol=1e-5)


def mixing_layer(skills: int = 3, rank: int = 2, tasks: int = 4) -> Linear:
    torch.manual_seed(0)
    config = OrchMoEConfig(n_skills=skills, r=rank, n_abstract_tasks=tasks, allocation="mixing", init_weights=False)
    layer = Linear(nn.Linear(7, 6), "default", config)
    with torch.no_grad():
        layer.orchmoe_skill_router["default"].matrices.normal_()
    return layer


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 1, 7), (4, 7)])
def test_mixing_layer_matches_a_loop_over_examples_and_abstract_tasks(shape: tuple[int, ...]) -> None:
    """h = W0 x + scaling * B_cat (sum_t w_t M_t) A_cat x, one example and one abstract task at a time."""
    layer = mixing_layer()
    allocation = layer.orchmoe_skill_router["default"]
    a, b, scaling = layer.orchmoe_A["default"], layer.orchmoe_B["default"], layer.scaling["default"]
    x, w = torch.randn(*shape), torch.rand(shape[0], 4).softmax(-1)
    expected = layer.base_layer(x).clone()
    for i in range(shape[0]):
        for t in range(4):
            expected[i] += scaling * w[i, t] * (x[i] @ a.T @ allocation.matrices[t].T @ b.T)
    assert torch.allclose(layer(x, skill_weights=allocation.mix(w, stochastic=True)), expected, atol=1e-5)


def test_mixing_layer_expands_routing_for_beams() -> None:
    layer = mixing_layer()
    op = layer.orchmoe_skill_router["default"].mix(torch.rand(2, 4).softmax(-1), stochastic=False)  # (2, 6, 6)
    x = torch.randn(4, 5, 7)  # each example expanded to two beams
    assert torch.allclose(layer(x, skill_weights=op), layer(x, skill_weights=op.repeat_interleave(2, dim=0)))
    with pytest.raises(ValueError, match="multiple"):
        layer(torch.randn(3, 5, 7), skill_weights=op)

"""Task Router and Skill Router in isolation."""

from __future__ import annotations

import pytest
import torch

from orchmoe import OrchMoEConfig
from orchmoe.tuner import SkillRouter, TaskRouter
from orchmoe.tuner.router import MixingAllocation, entropy, relax, routing_entropies


def test_task_router_attention_is_the_papers_formula() -> None:
    torch.manual_seed(0)
    router = TaskRouter(8, OrchMoEConfig(n_abstract_tasks=3)).eval()  # fresh running statistics: mean 0, var 1
    x = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.bool)
    attn = torch.softmax(x @ x.transpose(1, 2) / 8**0.5, dim=-1)
    expected = (attn @ x + x).mean(dim=1)  # X^ = softmax(X X^T / sqrt(d)) X + X, mean-pooled
    assert torch.allclose(router.pool(x, mask), expected, atol=1e-5)
    w = router(x, mask)
    centred = expected / (1 + router.norm.eps) ** 0.5
    assert torch.allclose(w, torch.softmax(router.proj(centred), dim=-1), atol=1e-6)


def test_task_router_batch_statistics_in_training_running_statistics_at_eval() -> None:
    torch.manual_seed(0)
    router = TaskRouter(8, OrchMoEConfig(n_abstract_tasks=3)).train()
    x, mask = torch.randn(6, 4, 8) + 5.0, torch.ones(6, 4)
    router(x, mask)
    assert router.norm.num_batches_tracked.item() == 1
    assert router.norm.running_mean.abs().sum() > 0
    # a single example in training falls back to the running statistics (BatchNorm cannot use a batch of one)
    alone = router(x[:1], mask[:1])
    router.eval()
    assert torch.allclose(alone, router(x[:1], mask[:1]))
    assert torch.allclose(router(x, mask)[2], router(x[2:3], mask[2:3])[0], atol=1e-6)


def test_task_router_with_centring_and_mi_discovers_tasks_from_nearly_parallel_prompts() -> None:
    """Prompts of two tasks sharing one dominant direction: the centring and the MI term separate them."""
    torch.manual_seed(0)
    common = torch.randn(16) * 50
    centres = [common + torch.randn(16) for _ in range(2)]
    labels = torch.arange(32) % 2
    x = torch.stack([centres[i] + 0.1 * torch.randn(16) for i in labels.tolist()])[:, None, :]  # (32, 1, 16)
    mask = torch.ones(32, 1)  # one token per prompt: the self-attention is the identity plus the residual
    router = TaskRouter(16, OrchMoEConfig(n_abstract_tasks=2)).train()
    opt = torch.optim.Adam(router.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        mutual_information_loss(router(x, mask)).backward()
        opt.step()
    assigned = router.eval()(x, mask).argmax(dim=-1)
    assert assigned[labels == 0].unique().numel() == 1 and assigned[labels == 1].unique().numel() == 1
    assert assigned[0] != assigned[1]


def test_skill_router_rows() -> None:
    torch.manual_seed(0)
    router = SkillRouter(OrchMoEConfig(n_abstract_tasks=3, n_skills=5))
    assert router.logits.abs().max() <= 1e-3  # Z starts near uniform, as Poly's module logits
    torch.nn.init.normal_(router.logits)
    for stochastic in (True, False):
        z = router.allocation(stochastic)
        assert z.shape == (3, 5) and torch.allclose(z.sum(-1), torch.ones(3), atol=1e-5)
        w = torch.softmax(torch.randn(4, 3), dim=-1)
        alpha = router.mix(w, stochastic)
        assert alpha.shape == (4, 5)
        assert torch.allclose(alpha.sum(-1), torch.full((4,), 5.0), atol=1e-4)  # scaled by S
        same = router.mix(w[:1].expand(4, 3), stochastic)  # one noise draw per call: equal weights, equal mixes
        assert torch.allclose(same, same[:1].expand(4, 5))


def test_noise_scale_interpolates_between_eval_and_full_noise() -> None:
    logits = torch.randn(3, 8, 5)  # (M, T, S)

    def deviation(scale: float) -> float:  # mean distance of the noisy allocation from the eval one
        torch.manual_seed(1)  # the same draws at every scale
        noisy = relax(logits, 1.0, stochastic=True, noise_scale=scale)
        return (noisy - relax(logits, 1.0, stochastic=False)).abs().mean().item()

    assert deviation(0.0) == 0.0
    assert 0.0 < deviation(0.1) < deviation(0.5) < deviation(1.0)


def test_low_temperature_sharpens_the_allocation() -> None:
    torch.manual_seed(0)
    sharp = SkillRouter(OrchMoEConfig(n_abstract_tasks=2, n_skills=4, temperature=0.05))
    soft = SkillRouter(OrchMoEConfig(n_abstract_tasks=2, n_skills=4, temperature=5.0))
    logits = torch.randn(2, 4)
    sharp.logits.data, soft.logits.data = logits.clone(), logits.clone()
    assert entropy(sharp.allocation(False)).mean() < entropy(soft.allocation(False)).mean()


def mutual_information_loss(task_weights: torch.Tensor) -> torch.Tensor:
    """The router objective as the tuner computes it: mean_b H(w_b) - H(mean_b w)."""
    per_example, marginal = routing_entropies(task_weights)
    return per_example - marginal


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        (torch.eye(3), -torch.log(torch.tensor(3.0))),  # confident and balanced: -log T
        (torch.tensor([[1.0, 0.0, 0.0]] * 3), torch.tensor(0.0)),  # confident, collapsed
        (torch.full((3, 3), 1 / 3), torch.tensor(0.0)),  # uniform: no information
    ],
)
def test_mutual_information_loss(weights: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.allclose(mutual_information_loss(weights), expected, atol=1e-4)


def test_mixing_allocation_starts_at_the_identity_for_every_prompt() -> None:
    """sum_t w_t I = I whatever w: a LoRA of rank S*r at the start, without noise in training."""
    allocation = MixingAllocation(OrchMoEConfig(n_skills=3, r=2, n_abstract_tasks=4, allocation="mixing"))
    w = torch.rand(5, 4).softmax(-1)
    assert torch.equal(allocation.mix(w, stochastic=True), torch.eye(6).expand(5, 6, 6))
    assert allocation.distance(allocation.matrices[None]).item() == 0.0
    assert allocation.matrices.numel() == 4 * 6 * 6  # T (S r)^2


def quadratic_pool(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The Task Router's pooling as first written, with the full (B, L, L) scores: the reference."""
    x = x.float()
    scores = torch.einsum("bid,bjd->bij", x, x) / x.shape[-1] ** 0.5
    scores = scores.masked_fill(~keep[:, None, :], torch.finfo(scores.dtype).min)
    x = torch.einsum("bij,bjd->bid", scores.softmax(dim=-1), x) + x
    w = keep.float()
    return torch.einsum("bld,bl->bd", x, w) / w.sum(dim=1, keepdim=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [None, 7])  # the whole prompt at once, or queries in chunks of a few
def test_task_router_pooling_equals_the_quadratic_formula_with_padding(
    dtype: torch.dtype, chunk: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchmoe.tuner import router as module

    if chunk is not None:
        monkeypatch.setattr(module, "ATTENTION_CHUNK", 3 * chunk * 11)  # B * queries * L: 7 queries a chunk
    torch.manual_seed(0)
    x = (torch.randn(3, 11, 16) * 3).to(dtype)
    keep = torch.ones(3, 11, dtype=torch.bool)
    keep[1, :4] = False  # left padding
    keep[2, 6:] = False  # right padding
    router = TaskRouter(16, OrchMoEConfig(n_abstract_tasks=3))
    torch.testing.assert_close(router.pool(x, keep), quadratic_pool(x, keep), atol=1e-5, rtol=1e-5)
    alone = router.pool(x[2:3, :6], keep[2:3, :6])  # padding changes nothing
    torch.testing.assert_close(alone, router.pool(x, keep)[2:3], atol=1e-5, rtol=1e-5)


def test_served_prompt_router_pools_as_the_tuner_does(tmp_path) -> None:
    from orchmoe.serving import PromptRouter

    torch.manual_seed(0)
    router = TaskRouter(16, OrchMoEConfig(n_abstract_tasks=3)).eval()
    served = PromptRouter(router, {"embed_scale": 1.0})
    x, keep = torch.randn(2, 9, 16), torch.ones(2, 9, dtype=torch.bool)
    keep[0, :3] = False
    pooled = quadratic_pool(x, keep) / (1 + router.norm.eps) ** 0.5  # fresh running statistics: mean 0, var 1
    torch.testing.assert_close(served(x, keep), torch.softmax(router.proj(pooled), dim=-1), atol=1e-6, rtol=1e-5)

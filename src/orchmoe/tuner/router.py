"""The two routers of OrchMoE: the Task Router (prompt -> abstract tasks) and the Skill Router (tasks -> skills).

Notation (DESIGN.md): B batch, L prompt length, d embedding size, T abstract tasks, S skills.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import OrchMoEConfig

EPS = 1e-9


def gather_batch(x: torch.Tensor) -> torch.Tensor:
    """The global batch under data parallelism (differentiable all_gather, as SyncBatchNorm does); else ``x``.

    Batch statistics of the Task Router (centring, the MI marginal) are then those of the global batch, so a
    data-parallel run trains as the single-process run with the same global batch would.
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(x.contiguous()), dim=0)  # (B_global, ...)
    return x


class TaskRouter(nn.Module):
    """Automatic Task Classification: a soft mix over T abstract tasks, inferred from the prompt alone.

    Paper (parameter-free self-attention with a residual, then a linear map)::

        X^ = softmax(X X^T / sqrt(d)) X + X                       # (B, L, d)
        w(X) = softmax(W_task pool(X^) + b)                        # (B, T)

    ``pool`` is a masked mean over the routing tokens (the prompt), followed by a centring of the pooled vector
    across examples (``router_norm="batch"``: a BatchNorm without affine, batch statistics while training, running
    statistics at eval, so an example's routing at eval never depends on the rest of its batch).
    """

    def __init__(self, embed_dim: int, config: OrchMoEConfig) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.attention = config.router_attention
        self.norm_kind = config.router_norm
        self.norm: nn.Module
        if config.router_norm == "batch":
            self.norm = nn.BatchNorm1d(embed_dim, affine=False)
        elif config.router_norm == "layer":
            self.norm = nn.LayerNorm(embed_dim, elementwise_affine=False)
        else:
            self.norm = nn.Identity()
        self.n_tasks = config.n_abstract_tasks
        self.uniform = config.task_router == "uniform"
        # W_task, b (absent in the uniform ablation: nothing to train, and nothing peft's set_adapter could unfreeze)
        self.proj = None if self.uniform else nn.Linear(embed_dim, config.n_abstract_tasks)

    def pool(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked self-attention with residual, then masked mean over tokens: (B, L, d), (B, L) -> (B, d)."""
        x = embeds.float()  # (B, L, d)
        keep = mask.bool()  # (B, L)
        if self.attention:
            scores = torch.einsum("bid,bjd->bij", x, x) / math.sqrt(self.embed_dim)  # (B, L, L)
            scores = scores.masked_fill(~keep[:, None, :], torch.finfo(scores.dtype).min)
            x = torch.einsum("bij,bjd->bid", scores.softmax(dim=-1), x) + x  # (B, L, d)
        weights = keep.to(x.dtype)  # (B, L)
        return torch.einsum("bld,bl->bd", x, weights) / weights.sum(dim=1, keepdim=True)  # (B, d)

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        """Abstract-task weights w, each row a distribution over the T abstract tasks: (B, T).

        ``deterministic=True`` routes as at eval (running statistics) whatever the module's mode.
        """
        if self.uniform:  # ablation: no Task Router
            return torch.full((embeds.shape[0], self.n_tasks), 1.0 / self.n_tasks, device=embeds.device)  # (B, T)
        pooled = self.pool(embeds, mask)  # (B, d), fp32 whatever the parameters' dtype
        if isinstance(self.norm, nn.BatchNorm1d):
            pooled = self._centre(pooled, deterministic)  # (B, d)
        else:
            pooled = self.norm(pooled)  # (B, d)
        logits = F.linear(pooled, self.proj.weight.float(), self.proj.bias.float())  # (B, T)
        return logits.softmax(dim=-1)  # (B, T)

    def _centre(self, pooled: torch.Tensor, deterministic: bool) -> torch.Tensor:
        """BatchNorm without affine: global-batch statistics in training (running statistics updated), running
        statistics at eval or for a batch of one: (B, d) -> (B, d)."""
        norm = self.norm
        train = self.training and not deterministic
        batch = gather_batch(pooled) if train else pooled  # (B_global, d)
        if train and batch.shape[0] > 1:
            mean, var = batch.mean(dim=0), batch.var(dim=0, unbiased=False)  # (d,), (d,)
            with torch.no_grad():
                n = batch.shape[0]
                stats = norm.running_mean.dtype
                norm.running_mean.lerp_(mean.detach().to(stats), norm.momentum)
                norm.running_var.lerp_((var.detach() * n / (n - 1)).to(stats), norm.momentum)
                norm.num_batches_tracked.add_(1)
        else:
            mean, var = norm.running_mean.float(), norm.running_var.float()
        return (pooled - mean) / torch.sqrt(var + norm.eps)


def relax(
    logits: torch.Tensor,
    relaxation: str,
    temperature: float,
    stochastic: bool,
    uniform: bool = False,
    draws: int = 0,
    noise_scale: float = 1.0,
) -> torch.Tensor:
    """Relaxed task-skill allocation of logits Z (..., T, S): rows sum to 1. Vectorised over leading dims, so all
    modules' allocations are one call.

    ``draws > 0`` (with ``stochastic``) takes that many independent noise draws, one per example, in a new dim
    before T: (..., draws, T, S). ``noise_scale`` multiplies the noise (0: the deterministic relaxation).
    """
    logits = logits.float()  # (..., T, S)
    if stochastic and draws > 0:
        logits = logits.unsqueeze(-3).expand(*logits.shape[:-2], draws, *logits.shape[-2:])  # (..., B, T, S)
    if uniform:  # ablation: no Skill Router
        return torch.full_like(logits, 1.0 / logits.shape[-1])
    softmax = relaxation == "gumbel_softmax"
    if stochastic:
        u = torch.rand_like(logits).clamp(EPS, 1.0 - EPS)
        noise = -torch.log(-torch.log(u)) if softmax else torch.log(u) - torch.log1p(-u)  # Gumbel / Logistic(0, 1)
        logits = logits + noise_scale * noise  # (..., T, S)
    if softmax:
        return (logits / temperature).softmax(dim=-1)  # (..., T, S)
    probs = torch.sigmoid(logits / temperature)  # (..., T, S)
    return probs / (probs.sum(dim=-1, keepdim=True) + EPS)


class SkillRouter(nn.Module):
    """Task-Skill Allocation: a learnable matrix Z (T x S), relaxed with Gumbel noise while training.

        z_i = softmax((Z_i + c g) / tau)   (training, g ~ Gumbel(0, 1))    z_i = softmax(Z_i / tau)   (eval)
        alpha = w^T z                                                     # (B, S), rows sum to 1
        alpha <- S * alpha                                   # if scale_by_skills (and mixing outputs)

    ``skill_relaxation="gumbel_sigmoid"`` uses Poly's relaxed Bernoulli instead, each row normalised to sum 1.
    The noise g is drawn once per call for the whole batch, or once per example with ``noise_per_example``;
    c is ``noise_scale`` (1 by default; annealed to 0, training ends on the deterministic eval relaxation).
    """

    def __init__(self, config: OrchMoEConfig) -> None:
        super().__init__()
        self.relaxation = config.skill_relaxation
        self.temperature = config.temperature
        # scaled by S when mixing outputs (uniform routing = LoRA of rank S*r); parameter mixing wants a convex mix
        self.scale = float(config.n_skills) if config.scale_by_skills and config.mixing == "outputs" else 1.0
        self.uniform = config.skill_router == "uniform"
        self.init_range = config.allocation_init
        self.per_example = config.noise_per_example
        self.noise_scale = config.noise_scale
        logits = torch.zeros(config.n_abstract_tasks, config.n_skills)  # Z: (T, S)
        if self.uniform:  # a buffer: nothing to train, and peft's set_adapter cannot turn it trainable
            self.register_buffer("logits", logits)
        else:
            self.logits = nn.Parameter(logits)
            self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.logits, -self.init_range, self.init_range)

    def relax(self, logits: torch.Tensor, stochastic: bool, draws: int = 0) -> torch.Tensor:
        """``relax`` with this router's settings (relaxation, temperature, ablation, noise scale)."""
        return relax(logits, self.relaxation, self.temperature, stochastic, self.uniform, draws, self.noise_scale)

    def allocation(self, stochastic: bool) -> torch.Tensor:
        """The relaxed allocation z: each abstract task's row sums to 1: (T, S)."""
        return self.relax(self.logits, stochastic)

    def mix(self, task_weights: torch.Tensor, stochastic: bool, logits: torch.Tensor | None = None) -> torch.Tensor:
        """alpha = scale * w z with this router's relaxation, for its own Z or for ``logits`` (..., T, S) relaxed
        alike (all modules' Z stacked: one vectorised call): (B, T) -> (..., B, S)."""
        logits = self.logits if logits is None else logits  # (..., T, S)
        w = task_weights.float()  # (B, T)
        if stochastic and self.per_example:
            z = self.relax(logits, True, draws=w.shape[0])  # (..., B, T, S)
            return self.scale * torch.einsum("bt,...bts->...bs", w, z)  # (..., B, S)
        z = self.relax(logits, stochastic)  # (..., T, S)
        return self.scale * torch.einsum("bt,...ts->...bs", w, z)  # (..., B, S)

    def forward(self, task_weights: torch.Tensor, stochastic: bool) -> torch.Tensor:
        """Per-example skill weights alpha from abstract-task weights w: (B, T) -> (B, S)."""
        return self.mix(task_weights, stochastic)  # (B, S)


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of distributions along the last dim: (..., K) -> (...)."""
    return -(p * (p + EPS).log()).sum(dim=-1)


def routing_entropies(task_weights: torch.Tensor, global_batch: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean_b H(w_b), H(mean_b w)) of a batch of abstract-task weights (B, T); with ``global_batch`` the marginal
    is over the global batch under data parallelism (training only: every process must take part)."""
    batch = gather_batch(task_weights) if global_batch else task_weights
    return entropy(task_weights).mean(), entropy(batch.mean(dim=0))


def mutual_information_loss(task_weights: torch.Tensor, global_batch: bool = False) -> torch.Tensor:
    """mean_b H(w_b) - H(mean_b w): minus the mutual information between example and abstract task.

    Minimising it makes each example's routing confident and the batch's use of abstract tasks balanced (as
    microsoft/mttl's MI loss plugins do).
    """
    per_example, marginal = routing_entropies(task_weights, global_batch)
    return per_example - marginal

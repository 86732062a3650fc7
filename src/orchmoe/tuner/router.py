"""The two routers of OrchMoE: the Task Router (prompt -> abstract tasks) and the Skill Router (tasks -> skills).

Notation: B batch, L prompt length, d embedding size, T abstract tasks, S skills.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import OrchMoEConfig

EPS = 1e-9
INIT_RANGE = 1e-3  # Z starts near uniform, as Poly's module logits


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


ATTENTION_CHUNK = 2**26  # scores held at once (B * queries * L), 256 MB in fp32, for a backend that materialises them


def self_attention(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """softmax(X X^T / sqrt(d)) X over the kept keys, in memory linear in L: (B, L, d), (B, L) -> (B, L, d).

    ``scaled_dot_product_attention`` with q = k = v = X as one head (its fused kernels never hold the L x L scores;
    on the CPU its flash kernel takes any head size); queries go in chunks, so that a backend that does hold the
    scores (the math fallback) holds at most ``ATTENTION_CHUNK`` of them. Queries of padding positions are computed
    like the others and left out by the caller's pooling."""
    batch, length, _ = x.shape
    q = kv = x[:, None]  # (B, 1, L, d): one head of width d
    mask = keep[:, None, None, :]  # (B, 1, 1, L): keys only
    step = max(1, ATTENTION_CHUNK // max(1, batch * length))
    out = [F.scaled_dot_product_attention(q[:, :, i : i + step], kv, kv, attn_mask=mask)  # (B, 1, C, d)
           for i in range(0, length, step)]  # fmt: skip
    return torch.cat(out, dim=2)[:, 0]  # (B, L, d)


class TaskRouter(nn.Module):
    """Automatic Task Classification: a soft mix over T abstract tasks, inferred from the prompt alone.

    Paper (parameter-free self-attention with a residual, then a linear map)::

        X^ = softmax(X X^T / sqrt(d)) X + X                       # (B, L, d)
        w(X) = softmax(W_task pool(X^) + b)                        # (B, T)

    ``pool`` is a masked mean over the routing tokens (the prompt), followed by a centring of the pooled vector
    across examples (a BatchNorm without affine: global-batch statistics while training, running statistics at eval,
    so an example's routing at eval never depends on the rest of its batch). Without the centring, prompts that share
    one dominant direction (as instruction prompts do) all land on the same abstract task. The router computes in fp32
    whatever its parameters' dtype.
    """

    def __init__(self, embed_dim: int, config: OrchMoEConfig) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.norm = nn.BatchNorm1d(embed_dim, affine=False)
        self.proj = nn.Linear(embed_dim, config.n_abstract_tasks)  # W_task, b

    def pool(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked self-attention with residual, then masked mean over tokens: (B, L, d), (B, L) -> (B, d)."""
        x = embeds.float()  # (B, L, d)
        keep = mask.bool()  # (B, L)
        x = self_attention(x, keep) + x  # (B, L, d)
        weights = keep.to(x.dtype)  # (B, L)
        return torch.einsum("bld,bl->bd", x, weights) / weights.sum(dim=1, keepdim=True)  # (B, d)

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        """Abstract-task weights w, each row a distribution over the T abstract tasks: (B, T).

        ``deterministic=True`` routes as at eval (running statistics) whatever the module's mode.
        """
        pooled = self._centre(self.pool(embeds, mask), deterministic)  # (B, d)
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


def relax(logits: torch.Tensor, temperature: float, stochastic: bool, noise_scale: float = 1.0) -> torch.Tensor:
    """Relaxed task-skill allocation of logits Z (..., T, S): softmax((Z + c g) / tau), g ~ Gumbel(0, 1) while
    training (``stochastic``), c = ``noise_scale``; rows sum to 1. Vectorised over leading dims, so all modules'
    allocations are one call."""
    logits = logits.float()  # (..., T, S)
    if stochastic and noise_scale > 0:
        u = torch.rand_like(logits).clamp(EPS, 1.0 - EPS)
        logits = logits - noise_scale * torch.log(-torch.log(u))  # + c * Gumbel(0, 1)
    return (logits / temperature).softmax(dim=-1)  # (..., T, S)


def distance_from_uniform(z: torch.Tensor) -> torch.Tensor:
    """Mean total-variation distance of allocation rows z (..., S) from the uniform 1/S: 0 when every abstract task
    gets the same, uniform skill mix (OrchMoE then computes a LoRA of rank S*r): (..., S) -> scalar."""
    return (0.5 * (z - 1.0 / z.shape[-1]).abs().sum(-1)).mean()


class Allocation(nn.Module):
    """The Skill Router's common form: one per adapted module, it turns abstract-task weights w (B, T) into the
    operator the module applies between A_cat and B_cat, dh = scaling * B_cat op(w) A_cat x. What differs between
    allocations lives in their subclasses: the paper's diagonal (:class:`SkillRouter`) and the mixing matrices
    (:class:`MixingAllocation`). Every module's allocation is computed in one vectorised call (``mix`` on the stacked
    ``weight`` of all modules)."""

    log_key = "allocation_distance"  # the training log's name for ``distance``

    @property
    def weight(self) -> nn.Parameter:
        """The learned parameter, stacked over modules for ``mix``."""
        raise NotImplementedError

    def mix(self, task_weights: torch.Tensor, stochastic: bool, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The routing operator of each example, for this module's ``weight`` or a stack of them (..., *weight)."""
        raise NotImplementedError

    def expand(self, op: torch.Tensor, r: int) -> torch.Tensor:
        """``mix``'s output in the form ``apply`` multiplies by (B', S*r) or (B', S*r, S*r)."""
        return op

    @staticmethod
    def apply(u: torch.Tensor, op: torch.Tensor) -> torch.Tensor:
        """u (B, *, S*r) -> op u per example: (B, *, S*r)."""
        raise NotImplementedError

    def distance(self, weight: torch.Tensor) -> torch.Tensor:
        """How far a stack of weights (M, *weight) has moved from its LoRA-equivalent start, 0 there: scalar."""
        raise NotImplementedError

    def freeze_uniform(self) -> None:
        """Fix the allocation where every prompt gets the same operator, the identity (an ablation)."""
        raise NotImplementedError


class SkillRouter(Allocation):
    """Task-Skill Allocation: a learnable matrix Z (T x S), relaxed with Gumbel noise while training.

        z_i = softmax((Z_i + c g) / tau)   (training, g ~ Gumbel(0, 1))    z_i = softmax(Z_i / tau)   (eval)
        alpha = S * w^T z                                                 # (B, S), rows sum to S
        op(w) = diag(repeat(alpha, r))                                    # (S*r, S*r)

    Scaling by S makes uniform routing exactly a LoRA of rank S*r (without it skills learn about 1/S^2 slower). The
    noise g is drawn once per call for the whole batch; c is ``noise_scale`` (1: the plain Gumbel-softmax; annealed
    to 0, training ends on the deterministic eval relaxation). Z starts in [-1e-3, 1e-3], near uniform, as Poly's.
    """

    log_key = "allocation_tv"

    def __init__(self, config: OrchMoEConfig) -> None:
        super().__init__()
        self.temperature = config.temperature
        self.noise_scale = config.noise_scale
        self.scale = float(config.n_skills)
        self.logits = nn.Parameter(torch.empty(config.n_abstract_tasks, config.n_skills))  # Z: (T, S)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.logits, -INIT_RANGE, INIT_RANGE)

    @property
    def weight(self) -> nn.Parameter:
        return self.logits

    def allocation(self, stochastic: bool) -> torch.Tensor:
        """The relaxed allocation z: each abstract task's row sums to 1: (T, S)."""
        return relax(self.logits, self.temperature, stochastic, self.noise_scale)

    def mix(self, task_weights: torch.Tensor, stochastic: bool, weight: torch.Tensor | None = None) -> torch.Tensor:
        """alpha = S * w z with this router's relaxation, for its own Z or for ``weight`` (..., T, S) relaxed alike
        (all modules' Z stacked: one vectorised call): (B, T) -> (..., B, S)."""
        logits = self.logits if weight is None else weight  # (..., T, S)
        z = relax(logits, self.temperature, stochastic, self.noise_scale)  # (..., T, S)
        return self.scale * torch.einsum("bt,...ts->...bs", task_weights.float(), z)  # (..., B, S)

    def expand(self, op: torch.Tensor, r: int) -> torch.Tensor:
        """alpha (B', S) -> repeat(alpha, r) (B', S*r); an already expanded (B', S*r) passes through."""
        return op if op.shape[-1] == self.logits.shape[-1] * r else op.repeat_interleave(r, dim=-1)

    @staticmethod
    def apply(u: torch.Tensor, op: torch.Tensor) -> torch.Tensor:
        return u * op.view(op.shape[0], *([1] * (u.dim() - 2)), op.shape[-1])  # (B, *, S*r)

    def distance(self, weight: torch.Tensor) -> torch.Tensor:
        """The mean TV distance of the eval-time rows softmax(Z_i / tau) from uniform."""
        return distance_from_uniform(relax(weight, self.temperature, stochastic=False))

    def freeze_uniform(self) -> None:
        """Z = 0 without training noise: z = 1/S and every skill weight S * 1/S = 1."""
        with torch.no_grad():
            self.logits.zero_().requires_grad_(False)
        self.noise_scale = 0.0


class MixingAllocation(Allocation):
    """The mixing allocation: a full matrix M_t (S*r x S*r) per abstract task, initialised to the identity, with no
    Gumbel noise::

        op(w) = sum_t w_t M_t                                   # (B, S*r, S*r)
        dh = scaling * B_cat op(w) A_cat x

    At initialisation op(w) = I for every prompt: exactly a LoRA of rank S*r, and the diagonal allocation at uniform
    Z. From the first step where B_cat is non-zero each M_t gets the gradient of its own abstract task's examples
    (w_t-weighted). The paper's allocation is the special case M_t = diag(repeat(S softmax(Z_t), r)). Its parameters:
    T (S r)^2 per module, ``T S r / (in + out)`` of the skills'."""

    log_key = "mixing_distance"

    def __init__(self, config: OrchMoEConfig) -> None:
        super().__init__()
        rank = config.n_skills * config.r
        self.matrices = nn.Parameter(torch.empty(config.n_abstract_tasks, rank, rank))  # M: (T, S*r, S*r)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.matrices.copy_(torch.eye(self.matrices.shape[-1]).expand_as(self.matrices))

    @property
    def weight(self) -> nn.Parameter:
        return self.matrices

    def mix(self, task_weights: torch.Tensor, stochastic: bool, weight: torch.Tensor | None = None) -> torch.Tensor:
        """op = sum_t w_t M_t: (B, T) -> (..., B, S*r, S*r) (no noise: ``stochastic`` changes nothing)."""
        matrices = self.matrices if weight is None else weight  # (..., T, S*r, S*r)
        return torch.einsum("bt,...tij->...bij", task_weights.float(), matrices.float())  # (..., B, S*r, S*r)

    @staticmethod
    def apply(u: torch.Tensor, op: torch.Tensor) -> torch.Tensor:
        return torch.einsum("b...j,bij->b...i", u, op)  # (B, *, S*r)

    def distance(self, weight: torch.Tensor) -> torch.Tensor:
        """The mean relative Frobenius distance of the M_t from the identity, ||M_t - I|| / ||I||."""
        eye = torch.eye(weight.shape[-1], device=weight.device)
        return ((weight.float() - eye).flatten(-2).norm(dim=-1) / eye.norm()).mean()

    def freeze_uniform(self) -> None:
        """Every M_t = I."""
        self.reset_parameters()
        self.matrices.requires_grad_(False)


ALLOCATIONS: dict[str, type[Allocation]] = {"diagonal": SkillRouter, "mixing": MixingAllocation}


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of distributions along the last dim: (..., K) -> (...)."""
    return -(p * (p + EPS).log()).sum(dim=-1)


def routing_entropies(task_weights: torch.Tensor, global_batch: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean_b H(w_b), H(mean_b w)) of a batch of abstract-task weights (B, T); with ``global_batch`` the marginal
    is over the global batch under data parallelism (training only: every process must take part)."""
    batch = gather_batch(task_weights) if global_batch else task_weights
    return entropy(task_weights).mean(), entropy(batch.mean(dim=0))

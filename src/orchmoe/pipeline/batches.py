"""The data order of a training run, fixed up front from the seed: a stream of seeded permutations of the examples
cut into full global batches, so a run resumed from a checkpoint sees exactly the batches an uninterrupted run would
have seen, on one process or many (``FixedBatches`` is a batch sampler accelerate can shard)."""

from __future__ import annotations

import math
import random

from torch.utils.data import Sampler

from .config import RunConfig


class FixedBatches(Sampler[list[int]]):
    """A precomputed list of batches (lists of example indices), as a batch sampler accelerate can shard."""

    def __init__(self, batches: list[list[int]], batch_size: int) -> None:
        self.batches, self.batch_size, self.drop_last = batches, batch_size, False

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def batch_order(n_examples: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """``steps`` full global batches from a stream of seeded permutations of the examples."""
    rng = random.Random(f"order:{seed}")
    stream: list[int] = []
    while len(stream) < steps * batch_size:
        perm = list(range(n_examples))
        rng.shuffle(perm)
        stream += perm
    return [stream[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def total_steps(cfg: RunConfig, n_examples: int) -> int:
    steps = max(1, math.ceil(cfg.epochs * n_examples / cfg.batch_size))
    return min(steps, cfg.max_steps) if cfg.max_steps else steps

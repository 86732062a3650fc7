"""Gradient norm of each optimizer group (adapters, routers) over the first steps of a run's training.

Checks whether clipping all parameters together (the harness's `max_grad_norm`) lets router gradients shrink the
adapters' step. Retrains the first steps of a finished run from its saved configuration: the same selection, batch
order, initialisation, AdamW groups and clipping (the lr schedule is not applied: every step is at the peak lr).

    python benchmarks/grad_norms.py runs/quality/lr-sweep/orchmoe-router1-lr0.003-seed0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from accelerate.utils import set_seed

from orchmoe.data import Collator, encode
from orchmoe.models import load_model
from orchmoe.pipeline.batches import batch_order, total_steps
from orchmoe.pipeline.common import make_selection, read_run_config
from orchmoe.pipeline.methods import build, method_of, optimizer_groups
from orchmoe.pipeline.trainer import lm_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run directory made by `orchmoe train` or benchmarks/quality.py")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()

    cfg = read_run_config(args.run)
    loaded = load_model(cfg.model, seed=cfg.seed)
    set_seed(cfg.seed)
    selection = make_selection(cfg)
    encoded, _ = encode(selection.train, loaded.tokenizer, cfg.max_input_tokens, cfg.max_target_tokens)
    model = build(cfg.method, loaded.model, cfg, len(selection.train_tasks))
    model.train()
    groups = optimizer_groups(method_of(cfg.method), model, cfg)
    optimizer = torch.optim.AdamW(groups)
    collate = Collator(loaded.tokenizer.pad_token_id, loaded.is_encoder_decoder)
    order = batch_order(len(encoded), cfg.batch_size, total_steps(cfg, len(encoded)), cfg.seed)
    for step, indices in enumerate(order[: args.steps]):
        batch = collate([encoded[i] for i in indices])
        kwargs = method_of(cfg.method).model_inputs(batch, selection.task_index)
        loss_sum, n_tokens = lm_loss(model, batch, kwargs, loaded.is_encoder_decoder)
        loss = loss_sum / n_tokens
        method_of(cfg.method).add_router_loss(model, loss).backward()
        norms = {
            g["name"]: torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in g["params"] if p.grad is not None]))
            for g in groups
        }
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        cells = " ".join(f"{name}={value.item():.3f}" for name, value in norms.items())
        print(f"step {step + 1} loss={loss.item():.3f} {cells} total={total.item():.3f}", flush=True)
        optimizer.step()
        optimizer.zero_grad()


if __name__ == "__main__":
    main()

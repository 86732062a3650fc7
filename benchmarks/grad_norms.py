"""Gradient norm of each optimizer group (adapters, routers) over the first steps of a sni-10 run.

Checks whether clipping all parameters together (the harness's `max_grad_norm`) lets router gradients shrink the
adapters' step. Trains as the harness does (same selection, batch order, AdamW groups, clipping at 1.0).

    python benchmarks/grad_norms.py --data-dir ../shared/sni --method orchmoe --lr 3e-3 --router-lr-multiplier 1
"""

from __future__ import annotations

import argparse

import torch
from accelerate.utils import set_seed

from orchmoe.data import Collator, encode
from orchmoe.models import load_model
from orchmoe.pipeline.common import make_selection, model_inputs
from orchmoe.pipeline.config import RunConfig
from orchmoe.pipeline.methods import build, optimizer_groups
from orchmoe.pipeline.trainer import batch_order, lm_loss
from orchmoe.tuner.access import get_tuner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--method", default="orchmoe", choices=["orchmoe", "poly", "mhr", "lora"])
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--router-lr-multiplier", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cfg = RunConfig(model=args.model, data_dir=args.data_dir, method=args.method, lr=args.lr, seed=args.seed,
                    router_lr_multiplier=args.router_lr_multiplier, n_test=5, max_input_tokens=192,
                    max_target_tokens=24)  # fmt: skip
    loaded = load_model(cfg.model, seed=cfg.seed)
    set_seed(cfg.seed)
    selection = make_selection(cfg)
    encoded, _ = encode(selection.train, loaded.tokenizer, cfg.max_input_tokens, cfg.max_target_tokens)
    model = build(cfg.method, loaded.model, cfg, len(selection.train_tasks))
    model.train()
    groups = optimizer_groups(model, cfg.lr, cfg.router_lr_multiplier, cfg.weight_decay, cfg.allocation_lr)
    optimizer = torch.optim.AdamW(groups)
    collate = Collator(loaded.tokenizer.pad_token_id, loaded.is_encoder_decoder)
    for step, indices in enumerate(batch_order(len(encoded), cfg.batch_size, args.steps, cfg.seed)[: args.steps]):
        batch = collate([encoded[i] for i in indices])
        kwargs = model_inputs(batch, cfg.method, selection.task_index, len(selection.task_index))
        loss_sum, n_tokens = lm_loss(model, batch, kwargs, loaded.is_encoder_decoder)
        loss = loss_sum / n_tokens
        aux = get_tuner(model).router_aux_loss() if cfg.method == "orchmoe" else torch.zeros(())
        (loss + aux).backward()
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

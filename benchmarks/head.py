"""What the output head costs in a training step: every logit (Trainer's default) against the supervised positions
only (``orchmoe.head``, what the harness and OrchMoETrainer compute), side by side in one process.

    python benchmarks/head.py                       # Gemma 3 270M, batch 8 x 300 tokens, 5 supervised per row
    python benchmarks/head.py --model tiny-gemma3   # seconds

Each repeat times, for LoRA and OrchMoE, one forward + backward of each loss in alternating order; medians over
repeats after a warm-up round. The two losses are printed too (they agree to float precision). Ends with
``RESULT full_over_supervised_lora=.. full_over_supervised_orchmoe=..``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import build_all, extra_inputs, make_batch, timed

from orchmoe import get_tuner
from orchmoe.head import supervised_loss_sum
from orchmoe.pipeline.config import RunConfig


def labels_for(batch: dict[str, torch.Tensor], supervised: int) -> torch.Tensor:
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -supervised:] = batch["input_ids"][:, -supervised:]
    return labels


def full_loss(model: torch.nn.Module, method: str, batch: dict[str, torch.Tensor], labels: torch.Tensor):
    """transformers' own loss: the model computes every logit and its cross-entropy (as Trainer calls it)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                 **extra_inputs(method, batch)).loss  # fmt: skip


def supervised_loss(model: torch.nn.Module, method: str, batch: dict[str, torch.Tensor], labels: torch.Tensor):
    loss, n, _ = supervised_loss_sum(model, labels, False, input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"], **extra_inputs(method, batch))  # fmt: skip
    return loss / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=300)
    parser.add_argument("--supervised", type=int, default=5, help="supervised tokens per row (the answer)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = RunConfig(model=args.model)
    probe = make_batch(10**9, 1, 1, 1, device)  # vocab read from the model below
    benches, _, base = build_all(args.model, cfg, ("lora", "orchmoe"), device, probe, target=1)
    get_tuner(benches["orchmoe"].model).add_router_loss_to_output = False  # the LM loss alone in both
    batch = make_batch(base.config.vocab_size, args.batch, args.length - args.supervised, args.supervised, device)
    labels = labels_for(batch, args.supervised)
    losses = {"full": full_loss, "supervised": supervised_loss}
    times: dict[tuple[str, str], list[float]] = {}
    values: dict[tuple[str, str], float] = {}
    for r in range(1 + args.repeats):
        order = [(m, k) for m in benches for k in losses]
        for method, kind in order if r % 2 == 0 else reversed(order):
            model = benches[method].model.train()

            def step(model=model, method=method, kind=kind) -> None:
                torch.manual_seed(0)  # the same Gumbel draw for both losses
                loss = losses[kind](model, method, batch, labels)
                loss.backward()
                values[(method, kind)] = loss.item()
                model.zero_grad(set_to_none=True)

            t = timed(step, device)
            if r > 0:
                times.setdefault((method, kind), []).append(t)
    print("| method | full logits (s) | supervised positions (s) | ratio | loss full | loss supervised |")
    print("|---|---|---|---|---|---|")
    ratios = {}
    for method in benches:
        full, sup = (statistics.median(times[(method, k)]) for k in losses)
        ratios[method] = full / sup
        print(f"| {method} | {full:.2f} | {sup:.2f} | {ratios[method]:.2f} | {values[(method, 'full')]:.5f} | "
              f"{values[(method, 'supervised')]:.5f} |")  # fmt: skip
    print(f"RESULT full_over_supervised_lora={ratios['lora']:.2f} full_over_supervised_orchmoe={ratios['orchmoe']:.2f}")


if __name__ == "__main__":
    main()

"""Does attention's backward return NaN on a left-padded batch whose length is 64 more than a multiple of 128?

    python benchmarks/sdpa_probe.py --device cuda --random-weights --out probe.json   # on a GPU, seconds
    python benchmarks/sdpa_probe.py --model tiny-gemma3 --device cpu --out probe.json  # the same code path

Why: on the first device session (2026-12-04, H200, torch 2.11.0+cu130) every bf16 families-gpu run diverged. Seed
0's LoRA and OrchMoE runs read ten non-finite losses up to step 152; in seed 0's first 400 batches exactly one is
192 tokens wide, step 142 (every other is 263 to 288), and seed 1's only one is step 335, its runs stopping at step
344. PyTorch issue 196678 reports NaN in cuDNN attention's backward on H100/H200 since torch 2.11 when an explicit
mask is passed, the length is 64 more than a multiple of 128, and a query row's log-sum-exp is very negative (a
fully masked row: the first positions of a left-padded row). Not reproducible on a CPU (no cuDNN there).

What it does: the model (its checkpoint, or with ``--random-weights`` its architecture from benchmarks/configs), one
forward and backward of a batch of 8 left-padded rows (row i padded by 8 i tokens; loss on the last 32 positions, as
training's batches are laid out), for each case of dtype (bf16, fp32) x width (192, 256) x attention backends (the
default choice, and every backend but cuDNN's). Records per case whether the loss is finite and how many parameters
got a non-finite gradient. Prediction written before any GPU run: on an affected GPU, only bf16 at width 192 with
the default backends has non-finite gradients.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from speed import load_base
from torch.nn.attention import SDPBackend, sdpa_kernel

BATCH, TARGET, PAD_STEP = 8, 32, 8
WIDTHS = (192, 256)
WITHOUT_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def left_padded(width: int, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Row i: 8 i padding tokens, then its tokens; positions counted from the first real token, as the collator does."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, min(vocab, 30000), (BATCH, width), generator=g)
    attention = torch.ones_like(ids)
    for i in range(BATCH):
        ids[i, : PAD_STEP * i] = 0
        attention[i, : PAD_STEP * i] = 0
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    batch = {"input_ids": ids, "attention_mask": attention, "position_ids": positions}
    return {k: v.to(device) for k, v in batch.items()}


def case(model: torch.nn.Module, batch: dict[str, torch.Tensor], default_backends: bool) -> dict[str, object]:
    """One forward and backward; the loss's finiteness and the parameters whose gradient is not finite."""
    model.zero_grad(set_to_none=True)
    context = contextlib.nullcontext() if default_backends else sdpa_kernel(WITHOUT_CUDNN)
    with context:
        logits = model(**batch, logits_to_keep=TARGET + 1).logits[:, :-1].float()  # (B, TARGET, V)
        loss = F.cross_entropy(logits.flatten(0, 1), batch["input_ids"][:, -TARGET:].flatten())
        loss.backward()
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    return {"loss_finite": bool(torch.isfinite(loss)), "nonfinite_grads": len(bad), "first": bad[:3]}


def probe(model_name: str, random_weights: bool, device: torch.device) -> dict[str, object]:
    cases, attention = [], None
    for dtype_name, dtype in DTYPES.items():
        model = load_base(model_name, random_weights, dtype).to(device).train()
        attention = model.config._attn_implementation  # as training loads it: sdpa unless the model says otherwise
        for width in WIDTHS:
            batch = left_padded(width, model.config.vocab_size, device)
            for default_backends in (True, False):
                result = case(model, batch, default_backends)
                cases.append({"dtype": dtype_name, "width": width,
                              "backends": "default" if default_backends else "no-cudnn", **result})  # fmt: skip
        del model
    cuda = device.type == "cuda"
    return {
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "attn_implementation": attention,
        "cases": cases,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--random-weights", action="store_true", help="the architecture only (benchmarks/configs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = probe(args.model, args.random_weights, torch.device(args.device))
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for c in result["cases"]:
        print(f"{c['dtype']} width {c['width']} {c['backends']}: loss finite {c['loss_finite']}, "
              f"non-finite gradients in {c['nonfinite_grads']} parameters")  # fmt: skip


if __name__ == "__main__":
    main()

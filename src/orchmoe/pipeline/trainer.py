"""Training loop on `accelerate`: one code path for the CPU, a GPU, or `accelerate launch` (DDP/FSDP/DeepSpeed).

The data order is fixed up front from the seed (a stream of seeded permutations cut into full global batches), so a
run resumed from a checkpoint sees exactly the batches an uninterrupted run would have seen. The loss is computed on
target tokens only: for decoder-only models the logits are materialised for the target columns alone
(``logits_to_keep``), never for the prompt.
"""

from __future__ import annotations

import inspect
import json
import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm
from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

from ..data import IGNORE_INDEX, Collator, encode
from ..training import RelaxationSchedule, set_relaxation
from ..tuner.access import get_tuner
from . import checkpoint
from .common import CONFIG_FILE, load_base, make_selection, model_inputs, prepare_run_dir, resolve_data_dir, write_json
from .config import RunConfig
from .methods import build, count_parameters, optimizer_groups, set_unseen_task_row

LOG_FILE = "train_log.jsonl"


def relaxation_at(cfg: RunConfig, progress: float) -> dict[str, float | None]:
    """The Skill Router's annealed settings at ``progress`` in [0, 1] of training (None: not annealed)."""
    return RelaxationSchedule(cfg.temperature_end, cfg.noise_scale_end).at(cfg.temperature, progress)


class TrainingDiverged(RuntimeError):
    pass


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


def lm_loss(model: torch.nn.Module, batch: dict[str, Any], kwargs: dict[str, Any], is_encoder_decoder: bool):
    """Summed cross-entropy over the target tokens of the batch, and their number."""
    labels = batch["labels"]
    if is_encoder_decoder:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        decoder_input_ids = base.prepare_decoder_input_ids_from_labels(labels=labels)
        logits = model(**kwargs, decoder_input_ids=decoder_input_ids).logits  # (B, T_tgt, V)
    else:
        width = int(batch["target_width"])
        logits = model(**kwargs, logits_to_keep=width + 1).logits[:, :-1]  # (B, T_tgt, V): target columns only
        labels = labels[:, -width:]
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (labels != IGNORE_INDEX).sum()


@dataclass
class TrainResult:
    steps: int
    seconds: float
    log: list[dict[str, Any]]


def _trackers() -> list[str]:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return []
    return ["tensorboard"]


def train(cfg: RunConfig, out: Path, resume: bool = False, overwrite: bool = False, progress: bool = True):
    """Train ``cfg.method`` and save the adapter in ``out/adapter``; returns a :class:`TrainResult`."""
    out = Path(out)
    if cfg.data is not None:  # a malformed row stops the run before anything in --out is touched
        make_selection(cfg)
    precision = {"fp32": "no"}.get(cfg.precision, cfg.precision)
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != precision:
        # an earlier run in this process (quality.py, tests) fixed another precision; the process group is kept
        AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        cpu=not torch.accelerator.is_available(),  # data-parallel on CPUs (gloo) needs this said explicitly
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=_trackers(),
        project_dir=str(out),
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        mixed_precision=precision,
    )
    main = accelerator.is_main_process
    if main:
        prepare_run_dir(out, overwrite=overwrite, resume=resume)
    accelerator.wait_for_everyone()
    cfg = resolve_data_dir(cfg, out)
    if resume and (out / CONFIG_FILE).is_file():
        saved = json.loads((out / CONFIG_FILE).read_text())
        if saved != cfg.to_dict():
            changed = sorted(k for k in saved if saved[k] != cfg.to_dict().get(k))
            raise ValueError(f"--resume with other settings than the run in {out}: {', '.join(changed)} differ.")
    if main:
        write_json(out / CONFIG_FILE, cfg.to_dict())

    loaded = load_base(cfg)
    # seed after loading: whatever loading drew (a first-time model conversion initialises weights) must not move
    # the adapter's initialisation or the Gumbel noise
    set_seed(cfg.seed)
    selection = make_selection(cfg)
    encoded, truncation = encode(
        selection.train, loaded.tokenizer, cfg.max_input_tokens, cfg.max_target_tokens, cfg.chat_template
    )
    task_index = selection.task_index
    model = build(cfg.method, loaded.model, cfg, len(selection.train_tasks))
    counts = count_parameters(model)
    model.train()
    if not loaded.is_encoder_decoder and "logits_to_keep" not in inspect.signature(loaded.model.forward).parameters:
        raise ValueError(f"{type(loaded.model).__name__} has no `logits_to_keep`; use a recent transformers model.")

    steps = total_steps(cfg, len(encoded))
    optimizer = torch.optim.AdamW(
        optimizer_groups(model, cfg.lr, cfg.router_lr_multiplier, cfg.weight_decay, cfg.allocation_lr)
    )
    warmup = int(cfg.warmup_ratio * steps)
    if cfg.schedule == "linear":
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, steps)
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup)

    start, log, pending = 0, [], {"window": [], "assignments": []}
    ckpt_root = out / "checkpoints"
    found = checkpoint.latest(ckpt_root) if resume else None
    if found is not None:
        state = checkpoint.load(found)
        set_peft_model_state_dict(model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = state["step"]
        log = [e for e in state["log"] if e["step"] <= start]
        pending = state["pending"]

    micro = cfg.batch_size // cfg.grad_accum
    batches = [
        b[i * micro : (i + 1) * micro]
        for b in batch_order(len(encoded), cfg.batch_size, steps, cfg.seed)[start:]
        for i in range(cfg.grad_accum)
    ]
    collate = Collator(loaded.tokenizer.pad_token_id, loaded.is_encoder_decoder)
    # its own generator: iterating must not draw from the global RNG that the Gumbel noise uses
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(encoded, batch_sampler=FixedBatches(batches, micro), collate_fn=collate, generator=generator)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    unwrapped = accelerator.unwrap_model(model)
    log_path = out / LOG_FILE
    if main:
        log_path.write_text("".join(json.dumps(e) + "\n" for e in log))  # on resume: up to the checkpoint
        accelerator.init_trackers("tensorboard", config={k: str(v) for k, v in cfg.to_dict().items()})
        summary = {
            "train_tasks": selection.train_tasks,
            "unseen_tasks": selection.unseen_tasks,
            "train_examples": len(encoded),
            "missing_from_split": selection.missing_from_split,
            "truncation": truncation.as_dict(),
            "parameters": counts.__dict__,
        }
        write_json(out / "data.json", summary)

    if found is not None:
        checkpoint.set_rng_state(state["rng"])  # after prepare(), right where the uninterrupted run stood
    bar = tqdm(total=steps, initial=start, desc=f"train {cfg.method}", disable=not (progress and main), unit="step")
    began, bad_streak, step = time.time(), 0, start
    window: list[tuple[float, float]] = pending["window"]  # losses since the last log entry
    assignments: list[torch.Tensor] = pending["assignments"]
    iterator = iter(loader)
    entropies: tuple[torch.Tensor, torch.Tensor] | None = None  # of the last OrchMoE forward
    for step in range(start + 1, steps + 1):
        if cfg.method == "orchmoe" and (cfg.temperature_end is not None or cfg.noise_scale_end is not None):
            set_relaxation(unwrapped, **relaxation_at(cfg, (step - 1) / max(1, steps - 1)))
        skipped = False
        for k in range(cfg.grad_accum):
            batch = next(iterator)
            sync = k == cfg.grad_accum - 1
            with nullcontext() if sync else accelerator.no_sync(model):
                kwargs = model_inputs(batch, cfg.method, task_index, len(task_index))
                loss_sum, n_tokens = lm_loss(model, batch, kwargs, loaded.is_encoder_decoder)
                # mean over the target tokens of the whole global micro-batch: data-parallel gradients (averaged
                # over processes) then equal single-process ones
                global_tokens = accelerator.reduce(n_tokens.to(accelerator.device), "sum").clamp(min=1)
                loss = loss_sum * accelerator.num_processes / global_tokens
                aux = torch.zeros(())
                if cfg.method == "orchmoe":
                    tuner = get_tuner(unwrapped)
                    aux = tuner.router_aux_loss()
                    state = tuner.routing_state  # of this forward (its graph is alive until backward)
                    entropies = (state.entropy_per_example, state.entropy_marginal)
                    assignments.append(state.task_weights.detach().argmax(-1).cpu())
                total = loss + aux
                finite = torch.isfinite(total.detach()).float()
                if accelerator.reduce(finite.to(accelerator.device), "sum").item() < accelerator.num_processes:
                    skipped = True  # every process skips together
                    continue
                accelerator.backward(total / cfg.grad_accum)
            window.append((accelerator.reduce(loss.detach(), "mean").item(), aux.item()))
        if skipped:
            bad_streak += 1
            optimizer.zero_grad()
        else:
            bad_streak = 0
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        scheduler.step()
        bar.update(1)
        if skipped or step % cfg.log_every == 0 or step == steps:
            entry = _log_entry(step, window, skipped, scheduler, began, cfg, assignments, entropies)
            log.append(entry)
            window, assignments = [], []
            bar.set_postfix(loss=f"{entry.get('loss', float('nan')):.3f}")
            if main:
                accelerator.log({k: v for k, v in entry.items() if isinstance(v, (int, float))}, step=step)
                with log_path.open("a") as f:
                    f.write(json.dumps(entry) + "\n")
                if entry.get("router_collapsed") and not any(e.get("router_collapsed") for e in log[:-1]):
                    warning = f"warning: step {step}: the Task Router sends every example to one abstract task"
                    tqdm.write(warning, file=sys.stderr)
        if bad_streak >= cfg.nan_patience:  # after the skipped step is logged
            raise TrainingDiverged(
                f"Loss was NaN/inf for {bad_streak} consecutive steps (up to step {step}); lower --lr."
            )
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < steps:
            accelerator.wait_for_everyone()
            if main:
                pending = {"window": window, "assignments": assignments}
                checkpoint.save(ckpt_root, step, _state(unwrapped, optimizer, scheduler, step, log, pending))
    bar.close()
    accelerator.wait_for_everyone()
    if main:
        if cfg.method in ("poly", "mhr"):
            set_unseen_task_row(unwrapped, len(task_index))
        unwrapped.save_pretrained(out / "adapter")
    accelerator.end_training()
    return TrainResult(steps=step, seconds=time.time() - began, log=log)


def _state(model, optimizer, scheduler, step: int, log: list[dict[str, Any]], pending: dict) -> dict[str, Any]:
    return {
        "step": step,
        "adapter": get_peft_model_state_dict(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": checkpoint.rng_state(),
        "log": log,
        "pending": pending,
    }


def _log_entry(step, window, skipped, scheduler, began, cfg, assignments, entropies) -> dict[str, Any]:
    entry: dict[str, Any] = {"step": step, "lr": scheduler.get_last_lr()[0], "seconds": round(time.time() - began, 2)}
    if window:
        entry["loss"] = sum(w[0] for w in window) / len(window)
        entry["router_loss"] = sum(w[1] for w in window) / len(window)
    if skipped:
        entry["skipped_nonfinite"] = True
    if cfg.method == "orchmoe":
        if entropies is not None:
            entry["entropy_per_example"] = entropies[0].item()  # of the last forward
            entry["entropy_marginal"] = entropies[1].item()
        if assignments and not cfg.uniform_task_router and cfg.n_abstract_tasks > 1:
            used = torch.cat(assignments).unique().numel()
            entry["abstract_tasks_used"] = used
            entry["router_collapsed"] = used == 1
    return entry

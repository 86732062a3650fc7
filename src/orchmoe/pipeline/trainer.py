"""Training loop on `accelerate`: one code path for the CPU, a GPU, or `accelerate launch` (DDP/FSDP/DeepSpeed).

The data order is fixed up front from the seed (``batches``: seeded permutations cut into full global batches), so a
run resumed from a checkpoint sees exactly the batches an uninterrupted run would have seen. The loss is computed on
target tokens only: the output head runs on the supervised positions alone (``orchmoe.head``), never on the prompt.

The host reads values from the device once per logged step (``log_step``): losses, routing statistics, gradient
norms and skipped steps stay on the device in between. A step whose loss or gradient norm is not finite is skipped by
the optimizer itself (fused AdamW reads a ``found_inf`` flag, as under a GradScaler), and the run stops with
``TrainingDiverged`` when the skipped streak read at a logged step reaches ``nan_patience``. The supervised head's
gather (a shape that depends on the labels) is the one read left inside a step.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

from ..data import Collator, encode
from ..head import supervised_loss_sum
from . import checkpoint
from .batches import FixedBatches, batch_order, total_steps
from .common import (
    CONFIG_FILE,
    TrainingDiverged,
    load_base,
    make_selection,
    prepare_run_dir,
    resolve_data_dir,
    stack_versions,
    write_json,
)
from .config import RunConfig
from .methods import Method, build, count_parameters, gradient_norms, learning_rate, method_of, optimizer_groups

LOG_FILE = "train_log.jsonl"


def lm_loss(model: torch.nn.Module, batch: dict[str, Any], kwargs: dict[str, Any], is_encoder_decoder: bool):
    """Summed cross-entropy over the target tokens of the batch, and their number; the output head runs on the
    supervised positions only (``orchmoe.head``), for every method alike."""
    loss, n_tokens, _ = supervised_loss_sum(model, batch["labels"], is_encoder_decoder, **kwargs)
    return loss, n_tokens


@dataclass
class TrainResult:
    steps: int
    seconds: float
    log: list[dict[str, Any]]
    resumed_from: int = 0  # the checkpoint's step a resumed run started after (0: from the start)


def _trackers() -> list[str]:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return []
    return ["tensorboard"]


def train(cfg: RunConfig, out: Path, resume: bool = False, overwrite: bool = False, progress: bool = True):
    """Train ``cfg.method`` and save the adapter in ``out/adapter``; returns a :class:`TrainResult`."""
    run = setup(cfg, Path(out), resume, overwrite)
    restore(run, resume)
    prepare(run)
    bar = tqdm(total=run.steps, initial=run.start, desc=f"train {cfg.method}", unit="step",
               disable=not (progress and run.main))  # fmt: skip
    began, bad_streak, step = time.time(), 0, run.start
    for step in range(run.start + 1, run.steps + 1):
        logged = step % cfg.log_every == 0 or step == run.steps
        train_step(run, step, logged=logged)
        bar.update(1)
        if logged:  # the host reads the device here only: once per logged step
            entry, skipped = log_step(run, step, began)
            bar.set_postfix(loss=f"{entry.get('loss', float('nan')):.3f}")
            for was_skipped in skipped:
                bad_streak = bad_streak + 1 if was_skipped else 0
            if bad_streak >= cfg.nan_patience:
                raise TrainingDiverged(
                    f"Loss was NaN/inf for {bad_streak} consecutive steps (up to step {step}); lower --lr."
                )
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < run.steps:
            save_checkpoint(run, step)
    bar.close()
    finish(run)
    return TrainResult(steps=step, seconds=time.time() - began, log=run.log, resumed_from=run.start)


@dataclass
class Run:
    """The state of one training run, shared by its steps."""

    cfg: RunConfig
    out: Path
    method: Method
    accelerator: Accelerator
    loaded: Any
    selection: Any
    encoded: list
    model: Any
    optimizer: Any
    scheduler: Any
    steps: int
    start: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)
    window: list[tuple[Any, Any]] = field(default_factory=list)  # (loss, router loss) since the last log entry
    assignments: list[torch.Tensor] = field(default_factory=list)  # argmax abstract tasks since the last entry
    skips: list[torch.Tensor] = field(default_factory=list)  # per step since the last entry: 1 when skipped
    routing: dict[str, torch.Tensor] | None = None  # routing statistics of the last forward
    grad_norms: dict[str, torch.Tensor] = field(default_factory=dict)  # of the last logged step, before clipping
    rng: Any = None  # the checkpoint's random state, restored after prepare()
    loader: Any = None
    unwrapped: Any = None

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def accelerator_for(cfg: RunConfig, out: Path) -> Accelerator:
    precision = {"fp32": "no"}.get(cfg.precision, cfg.precision)
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != precision:
        # an earlier run in this process (quality.py, tests) fixed another precision; the process group is kept
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        cpu=not torch.accelerator.is_available(),  # data-parallel on CPUs (gloo) needs this said explicitly
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=_trackers(),
        project_dir=str(out),
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        mixed_precision=precision,
    )


def setup(cfg: RunConfig, out: Path, resume: bool, overwrite: bool) -> Run:
    """The run directory, its recorded settings, the data, the model, the optimizer and its schedule."""
    if cfg.data is not None:  # a malformed row stops the run before anything in --out is touched
        make_selection(cfg)
    accelerator = accelerator_for(cfg, out)
    if accelerator.is_main_process:
        prepare_run_dir(out, overwrite=overwrite, resume=resume)
    accelerator.wait_for_everyone()
    cfg = resolve_data_dir(cfg, out)
    if resume and (out / CONFIG_FILE).is_file():
        saved = RunConfig.from_dict(json.loads((out / CONFIG_FILE).read_text())).to_dict()
        if saved != cfg.to_dict():
            changed = sorted(k for k in saved if saved[k] != cfg.to_dict().get(k))
            raise ValueError(f"--resume with other settings than the run in {out}: {', '.join(changed)} differ.")
    if accelerator.is_main_process:
        write_json(out / CONFIG_FILE, cfg.to_dict())
    loaded = load_base(cfg)
    # seed after loading: whatever loading drew (a first-time model conversion initialises weights) must not move
    # the adapter's initialisation or the Gumbel noise
    set_seed(cfg.seed)
    selection = make_selection(cfg)
    encoded, truncation = encode(
        selection.train, loaded.tokenizer, cfg.max_input_tokens, cfg.max_target_tokens, cfg.chat_template
    )
    method = method_of(cfg.method)
    model = build(cfg.method, loaded.model, cfg, len(selection.train_tasks))
    model.train()
    steps = total_steps(cfg, len(encoded))
    optimizer = torch.optim.AdamW(optimizer_groups(method, model, cfg), fused=True)  # skips a step on the device
    warmup = int(cfg.warmup_ratio * steps)
    if cfg.schedule == "linear":
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, steps)
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
    if accelerator.is_main_process:
        summary = {
            "train_tasks": selection.train_tasks,
            "unseen_tasks": selection.unseen_tasks,
            "held_out_tasks": selection.held_out_tasks,
            "train_examples": len(encoded),
            "missing_from_split": selection.missing_from_split,
            "truncation": truncation.as_dict(),
            "parameters": count_parameters(method, model).__dict__,
            "learning_rate": learning_rate(cfg),
            "versions": stack_versions(),
        }
        if resume and (out / "data.json").is_file():  # a run resumed on another stack says on which it started
            before = json.loads((out / "data.json").read_text())
            first = before.get("versions_at_start", before.get("versions"))
            if first and first != summary["versions"]:
                summary["versions_at_start"] = first
        write_json(out / "data.json", summary)
    return Run(cfg, out, method, accelerator, loaded, selection, encoded, model, optimizer,
               scheduler, steps)  # fmt: skip


def restore(run: Run, resume: bool) -> None:
    """With ``resume``, the last complete checkpoint: adapter, optimizer, schedule, log and pending statistics."""
    found = checkpoint.latest(run.out / "checkpoints") if resume else None
    if found is None:
        return
    state = checkpoint.load(found)
    set_peft_model_state_dict(run.model, state["adapter"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.start = state["step"]
    run.log = [e for e in state["log"] if e["step"] <= run.start]
    pending = state["pending"]
    run.window, run.assignments, run.skips = pending["window"], pending["assignments"], pending.get("skips", [])
    run.rng = state["rng"]


def prepare(run: Run) -> None:
    """The remaining batches in their fixed order, everything handed to accelerate, the log and trackers opened."""
    cfg = run.cfg
    micro = cfg.batch_size // cfg.grad_accum
    batches = [
        b[i * micro : (i + 1) * micro]
        for b in batch_order(len(run.encoded), cfg.batch_size, run.steps, cfg.seed)[run.start :]
        for i in range(cfg.grad_accum)
    ]
    collate = Collator(run.loaded.tokenizer.pad_token_id, run.loaded.is_encoder_decoder)
    # its own generator: iterating must not draw from the global RNG that the Gumbel noise uses
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(
        run.encoded, batch_sampler=FixedBatches(batches, micro), collate_fn=collate, generator=generator
    )
    run.model, run.optimizer, loader = run.accelerator.prepare(run.model, run.optimizer, loader)
    run.loader = iter(loader)
    run.unwrapped = run.accelerator.unwrap_model(run.model)
    if run.main:
        (run.out / LOG_FILE).write_text("".join(json.dumps(e) + "\n" for e in run.log))  # on resume: up to it
        run.accelerator.init_trackers("tensorboard", config={k: str(v) for k, v in cfg.to_dict().items()})
    if run.rng is not None:
        checkpoint.set_rng_state(run.rng)  # after prepare(), right where the uninterrupted run stood


def train_step(run: Run, step: int, logged: bool = False) -> None:
    """One optimizer step over ``grad_accum`` micro-batches, without reading the device from the host: a step whose
    loss or gradient norm is not finite on any process is skipped by the optimizer itself (fused AdamW's
    ``found_inf``), and recorded in ``run.skips``. A ``logged`` step keeps the gradient norms of each parameter
    kind (before clipping)."""
    cfg, accelerator, model = run.cfg, run.accelerator, run.model
    run.method.step_begin(run.unwrapped, cfg, step - 1, run.steps)
    nonfinite = torch.zeros((), device=accelerator.device)
    for k in range(cfg.grad_accum):
        batch = next(run.loader)
        with nullcontext() if k == cfg.grad_accum - 1 else accelerator.no_sync(model):
            kwargs = run.method.model_inputs(batch, run.selection.task_index)
            loss_sum, n_tokens = lm_loss(model, batch, kwargs, run.loaded.is_encoder_decoder)
            # mean over the target tokens of the whole global micro-batch: data-parallel gradients (averaged over
            # processes) then equal single-process ones
            global_tokens = accelerator.reduce(n_tokens.to(accelerator.device), "sum").clamp(min=1)
            loss = loss_sum * accelerator.num_processes / global_tokens
            routing = run.method.routing_log(run.unwrapped)  # of this forward (its graph is alive until backward)
            aux = torch.zeros((), device=loss.device) if routing is None else routing["aux"]
            if routing is not None:
                run.routing = routing
                run.assignments.append(routing["assignment"])
            total = run.method.add_router_loss(run.unwrapped, loss)
            nonfinite = nonfinite + (~torch.isfinite(total.detach())).float()
            accelerator.backward(total / cfg.grad_accum)
        run.window.append((loss.detach(), aux.detach()))  # read at the next log entry
    if logged:
        run.grad_norms = gradient_norms(run.method, run.unwrapped)
    # the total norm is read on the device even without clipping (a bound of inf scales nothing): a finite loss can
    # still give a non-finite gradient (an overflow in the backward), and one such update would make every weight NaN
    norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
    if norm is not None:  # DeepSpeed clips inside its own step and returns none
        nonfinite = nonfinite + (~torch.isfinite(norm.detach())).float().to(nonfinite.device)
    skip = (accelerator.reduce(nonfinite, "sum") > 0).float()  # every process skips together
    optimizer = getattr(run.optimizer, "optimizer", run.optimizer)  # accelerate's wrapper holds the fused AdamW
    optimizer.found_inf = skip  # read by the fused kernel: no update, no step count (fp16's GradScaler sets its own)
    run.optimizer.step()
    run.optimizer.zero_grad()
    run.skips.append(skip)
    run.scheduler.step()


def window_means(run: Run) -> tuple[float, float] | None:
    """Mean loss (averaged over processes) and router loss over the finite micro-batches of the log window, in one
    host read. An entry is (loss, router loss), tensors or, from an older checkpoint, numbers."""
    if not run.window:
        return None
    device = run.accelerator.device
    rows = torch.stack(
        [torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device) for v in w]) for w in run.window]
    )  # (N, 2) fmt: skip
    rows[:, 0] = run.accelerator.reduce(rows[:, 0].contiguous(), "mean")
    rows = rows.cpu()
    kept = rows[torch.isfinite(rows).all(dim=1)]
    return None if kept.numel() == 0 else (kept[:, 0].mean().item(), kept[:, 1].mean().item())


def log_step(run: Run, step: int, began: float) -> tuple[dict[str, Any], list[bool]]:
    """One entry of the training log (losses since the last entry, routing statistics, skipped steps), written and
    tracked; and, step by step since the last entry, whether it was skipped."""
    cfg = run.cfg
    entry: dict[str, Any] = {
        "step": step,
        "lr": run.scheduler.get_last_lr()[0],
        "seconds": round(time.time() - began, 2),
    }
    means = window_means(run)
    if means is not None:
        entry["loss"], entry["router_loss"] = means
    skipped = [flag > 0 for flag in torch.stack(run.skips).tolist()] if run.skips else []  # one host read
    if any(skipped):
        entry["skipped_nonfinite"] = sum(skipped)
    if run.routing is not None:
        entry["entropy_per_example"] = run.routing["entropy_per_example"].item()  # of the last forward
        entry["entropy_marginal"] = run.routing["entropy_marginal"].item()
    entry.update({k: v.item() for k, v in run.grad_norms.items()})
    entry.update(run.method.log_state(run.unwrapped))
    run.grad_norms = {}
    if run.assignments and not cfg.uniform_task_router and cfg.n_abstract_tasks > 1:
        used = torch.cat([a.to(run.accelerator.device) for a in run.assignments]).unique().numel()
        entry["abstract_tasks_used"] = used
        entry["router_collapsed"] = used == 1
    run.log.append(entry)
    run.window, run.assignments, run.skips = [], [], []
    if run.main:
        run.accelerator.log({k: v for k, v in entry.items() if isinstance(v, (int, float))}, step=step)
        with (run.out / LOG_FILE).open("a") as f:
            f.write(json.dumps(entry) + "\n")
        if entry.get("router_collapsed") and not any(e.get("router_collapsed") for e in run.log[:-1]):
            warning = f"warning: step {step}: the Task Router sends every example to one abstract task"
            tqdm.write(warning, file=sys.stderr)
    return entry, skipped


def save_checkpoint(run: Run, step: int) -> None:
    run.accelerator.wait_for_everyone()
    if run.main:
        pending = {"window": run.window, "assignments": run.assignments, "skips": run.skips}
        state = {
            "step": step,
            "adapter": get_peft_model_state_dict(run.unwrapped),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "rng": checkpoint.rng_state(),
            "log": run.log,
            "pending": pending,
        }
        checkpoint.save(run.out / "checkpoints", step, state)


def finish(run: Run) -> None:
    """The method's last touch (Poly/MHR: the unseen-task row), then the adapter saved by the main process; every
    process returns once it is on disk.

    Under `accelerate launch` the DistributedDataParallel wrapper is dropped before `end_training` destroys the
    process group: its Reducer must not hold the group's last reference. Freed last, with the GIL held, Gloo's
    destructor joins a worker thread that needs the GIL to free the last barrier's tensors: a deadlock, one rank of
    a 2-process run never exiting (gdb: ``~Reducer -> ~ProcessGroupGloo -> thread::join``)."""
    run.accelerator.wait_for_everyone()
    if run.main:
        run.method.finish(run.unwrapped, len(run.selection.task_index))
        run.unwrapped.save_pretrained(run.out / "adapter")
    run.accelerator.wait_for_everyone()
    run.model = None  # the wrapper (the adapted model stays in run.unwrapped)
    run.accelerator.free_memory()  # accelerate's references to it, and a garbage collection for its cycles
    run.accelerator.end_training()

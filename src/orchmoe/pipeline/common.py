"""Pieces shared by train, eval and compare: data resolution, run directories, model inputs."""

from __future__ import annotations

import json
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from ..data import Selection, select, write_suite
from ..data.files import file_selection
from .checkpoint import atomic_write_text
from .config import RunConfig

CONFIG_FILE = "config.json"


class RunDirError(RuntimeError):
    pass


class TrainingDiverged(RuntimeError):
    """The loss stayed non-finite for ``nan_patience`` steps."""


STACK = ("torch", "transformers", "peft", "trl", "accelerate")


def stack_versions() -> dict[str, str]:
    """The versions of the stack a result was produced with (recorded beside every result; "absent" when a package
    is not installed)."""
    found = {}
    for name in STACK:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def resolve_data_dir(cfg: RunConfig, out: Path) -> RunConfig:
    """Without --data-dir (or --data), write the built-in suite (deterministic from the seed) under ``out/suite``."""
    if cfg.data is not None:
        return cfg
    if cfg.data_dir is not None:
        if not Path(cfg.data_dir).is_dir():
            raise RunDirError(
                f"--data-dir {cfg.data_dir}: no such directory (expected the SNI layout: tasks/, splits/)."
            )
        return cfg
    suite = write_suite(out / "suite", seed=cfg.seed, n_instances=cfg.suite_instances)
    cfg.data_dir = str(suite)
    return cfg


def make_selection(cfg: RunConfig, n_val: int = 0, n_extra: int = 0) -> Selection:
    """The run's task selection; ``n_val`` > 0 adds validation instances, ``n_extra`` > 0 more test instances, neither
    changing the training sample."""
    if cfg.data is not None:
        return file_selection(cfg.data, cfg.eval_data, cfg.eval_fraction, cfg.seed)
    assert cfg.data_dir is not None
    return select(
        cfg.data_dir,
        n_tasks=cfg.n_tasks,
        n_train=cfg.n_train,
        n_test=cfg.n_test,
        n_test_unseen=cfg.n_test_unseen,
        seed=cfg.seed,
        n_unseen=cfg.n_unseen,
        split=cfg.split,
        k_shot=cfg.k_shot,
        tasks=cfg.tasks,
        held_out=cfg.held_out_tasks,
        n_val=n_val,
        n_extra=n_extra,
    )


def prepare_run_dir(out: Path, overwrite: bool, resume: bool) -> None:
    """An existing run directory is never clobbered without --overwrite (or continued without --resume)."""
    if out.exists() and any(out.iterdir()):
        if resume:
            return
        if not overwrite:
            raise RunDirError(f"{out} already exists and is not empty; pass --overwrite to replace it or --resume.")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=False, default=str) + "\n")


def read_run_config(run: Path) -> RunConfig:
    path = run / CONFIG_FILE
    if not path.is_file():
        raise RunDirError(f"{run}: not a run directory (no {CONFIG_FILE}); train one with `orchmoe train`.")
    return RunConfig.from_dict(json.loads(path.read_text()))


def load_base(cfg: RunConfig, seed: int | None = None):
    """The run's base model as training and evaluation both see it: quantized (``--load-in-4bit`` / ``-8bit``, then
    prepared as peft's ``prepare_model_for_kbit_training`` does) and with ``--gradient-checkpointing``."""
    from peft import prepare_model_for_kbit_training

    from ..models import load_model

    quantization = "4bit" if cfg.load_in_4bit else "8bit" if cfg.load_in_8bit else None
    loaded = load_model(cfg.model, seed=cfg.seed if seed is None else seed, quantization=quantization)
    checkpointing = {"use_reentrant": False}
    if quantization is not None:
        loaded.model = prepare_model_for_kbit_training(
            loaded.model, cfg.gradient_checkpointing, gradient_checkpointing_kwargs=checkpointing
        )
    elif cfg.gradient_checkpointing:
        loaded.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    return loaded

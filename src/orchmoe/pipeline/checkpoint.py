"""Atomic checkpoints with checksums: a checkpoint half-written when a process died is never loaded.

Layout: ``<run>/checkpoints/step-000040/{state.pt, MANIFEST.json}``. The directory is written under a temporary
name and renamed into place only after every file is flushed to disk and listed, with its sha256, in MANIFEST.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

MANIFEST = "MANIFEST.json"


class CheckpointError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers see the old content or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save(root: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` as checkpoint ``step`` atomically; keep the newest ``keep`` checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        torch.save(state, staging / "state.pt")
        with (staging / "state.pt").open("rb+") as f:
            os.fsync(f.fileno())
        manifest = {"step": step, "files": {"state.pt": _sha256(staging / "state.pt")}}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        with (staging / MANIFEST).open("rb+") as f:
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify(path: Path) -> bool:
    manifest = path / MANIFEST
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        return False
    return all((path / name).is_file() and _sha256(path / name) == digest for name, digest in files.items())


def latest(root: Path) -> Path | None:
    """The newest checkpoint that passes its checksums (broken or partial ones are skipped)."""
    if not root.is_dir():
        return None
    for path in sorted(root.glob("step-*"), reverse=True):
        if verify(path):
            return path
    return None


def load(path: Path) -> dict[str, Any]:
    if not verify(path):
        raise CheckpointError(f"{path}: checkpoint fails its checksums; it was not completely written.")
    return torch.load(path / "state.pt", map_location="cpu", weights_only=False)

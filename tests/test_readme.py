"""The README's Python blocks run as written, on a tiny Gemma 3 fresh from ``from_pretrained`` (eval mode, as a user's
model is), with only the names the README leaves to the reader defined."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import orchmoe
from orchmoe.serving import export_abstract_tasks
from tests.conftest import VOCAB, inputs, make_peft, prompt_labels

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def pretrained(tmp_path: Path, name: str) -> torch.nn.Module:
    """A tiny Gemma 3 saved and loaded back as a user loads theirs (``from_pretrained``: eval mode)."""
    path = tmp_path / name
    if not path.exists():
        orchmoe.models.tiny_model("tiny-gemma3", vocab_size=VOCAB).save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path)


def reader_names(block: str, tmp_path: Path) -> dict[str, object]:
    """What the README's reader brings to the block: a base model, a batch, paths."""
    batch = inputs(batch=3, length=9)
    names: dict[str, object] = {
        "base_model": pretrained(tmp_path, "base"),
        "other_base": pretrained(tmp_path, "base"),
        "base": pretrained(tmp_path, "base"),
        "ids": batch["input_ids"],
        "mask": batch["attention_mask"],
        "labels": prompt_labels(batch["input_ids"]),
        "prompt_ids": batch["input_ids"][:, :4],
        "prompt_mask": batch["attention_mask"][:, :4],
        "batch": batch,
        "path": str(tmp_path / "adapter"),
        "task_weights": torch.tensor([[1.0, 0.0, 0.0, 0.0]]),
    }
    if "served" in block:
        trained = make_peft("tiny-gemma3")
        export_abstract_tasks(trained, tmp_path / "served")
    return names


def test_the_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_a_readme_python_block_runs(block: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    names = reader_names(block, tmp_path)
    exec(compile(block, str(README), "exec"), names)  # the README's own code

"""The Python blocks of the README and of docs/ run as written, on a tiny Gemma 3 fresh from ``from_pretrained`` (eval
mode, as a user's model is), with only the names the page leaves to the reader defined."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import orchmoe
from orchmoe.serving import export_abstract_tasks
from tests.conftest import VOCAB, inputs, make_peft, prompt_labels

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FOUND = [(page, block) for page in PAGES for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)]


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


def test_the_readme_and_the_docs_have_python_blocks() -> None:
    pages = {page.name for page, _ in FOUND}
    assert {"README.md", "python-api.md", "serving.md"} <= pages


@pytest.mark.parametrize(("page", "block"), FOUND, ids=[f"{p.stem}-{i}" for i, (p, _) in enumerate(FOUND)])
def test_a_python_block_runs(page: Path, block: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    names = reader_names(block, tmp_path)
    exec(compile(block, str(page), "exec"), names)  # the page's own code

"""Exporting one routing as a plain peft LoRA adapter reproduces OrchMoE under that routing exactly."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

import orchmoe
from orchmoe.cli import main
from orchmoe.export import lora_from_routing
from orchmoe.models import tiny_model
from tests.conftest import VOCAB, inputs, make_peft

pytestmark = pytest.mark.usefixtures("allocation")  # the diagonal and the mixing allocation


def test_exported_lora_equals_the_routed_model(tmp_path) -> None:
    model = make_peft("tiny-gemma3").eval()  # 4 skills of rank 2, 3 abstract tasks
    rank = 4 * 2
    task_weights = torch.tensor([[0.2, 0.5, 0.3]])
    lora, weights = lora_from_routing(model, task_weights)
    assert lora.r == rank and all(a.shape[0] == rank for a, _ in weights.values())
    batch = inputs(batch=2)
    with torch.no_grad():
        routed = model(**batch, task_weights=task_weights.repeat(2, 1)).logits
    # orchmoe.export_lora writes that adapter as a directory that plain peft loads; the model is left as it was
    orchmoe.export_lora(model, task_weights, tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("tiny-gemma3", vocab_size=VOCAB, seed=0), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, routed, atol=1e-5, rtol=1e-4)
        assert torch.equal(model(**batch, task_weights=task_weights.repeat(2, 1)).logits, routed)


def test_export_from_any_adapter_directory(tmp_path) -> None:
    """`orchmoe export` on a directory written by save_pretrained (as Trainer and TRL write them), not a run."""
    model = make_peft("tiny-gemma3").eval()  # the char tokenizer's vocabulary: tiny-gemma3 as load_model builds it
    model.save_pretrained(tmp_path / "adapter")
    code = main(["export", str(tmp_path / "adapter"), "--abstract-task", "1", "--model", "tiny-gemma3",
                 "--out", str(tmp_path / "lora"), "--quiet"])  # fmt: skip
    assert code == 0
    loaded = PeftModel.from_pretrained(tiny_model("tiny-gemma3", vocab_size=VOCAB, seed=0), tmp_path / "lora").eval()
    batch = inputs(batch=2)
    with torch.no_grad():
        routed = model(**batch, task_weights=torch.tensor([[0.0, 1.0, 0.0]] * 2)).logits
        torch.testing.assert_close(loaded(**batch).logits, routed, atol=1e-5, rtol=1e-4)
    assert main(["export", str(tmp_path / "adapter"), "--task", "x", "--model", "tiny-gemma3",
                 "--out", str(tmp_path / "other"), "--quiet"]) == 2  # fmt: skip

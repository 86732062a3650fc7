"""The output head at supervised positions only: loss and gradients equal the full computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from orchmoe.head import supervised_logits, supervised_loss_sum, supervised_positions
from orchmoe.models import tiny_model
from tests.conftest import ARCHS, VOCAB, make_peft


def lora(arch: str) -> torch.nn.Module:
    task_type, targets = ARCHS[arch]
    torch.manual_seed(0)
    config = LoraConfig(r=8, target_modules=targets, task_type=task_type, init_lora_weights=False)
    return get_peft_model(tiny_model(arch, vocab_size=VOCAB, seed=0), config)


def batch(arch: str) -> dict[str, torch.Tensor]:
    """Left-padded prompts, right-padded targets of different lengths (as the harness collates them)."""
    g = torch.Generator().manual_seed(3)
    if arch == "tiny-t5":
        ids = torch.randint(4, VOCAB, (3, 7), generator=g)
        labels = torch.randint(4, VOCAB, (3, 5), generator=g)
        labels[0, 3:] = -100
        labels[2, 1:] = -100
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    ids = torch.randint(4, VOCAB, (3, 10), generator=g)
    attention = torch.ones_like(ids)
    attention[1, :2] = 0  # left padding
    labels = ids.clone()
    labels[:, :6] = -100  # the prompt
    labels[0, 8:] = -100  # a short target, then right padding
    labels[1, :2] = -100
    routing = (labels == -100) & attention.bool()
    routing[0, 6:] = False
    return {"input_ids": ids, "attention_mask": attention, "labels": labels, "routing_mask": routing.long()}


def full_loss(model: torch.nn.Module, arch: str, data: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The reference: every logit computed, then the supervised ones read."""
    inputs = {k: v for k, v in data.items() if k != "labels"}
    labels = data["labels"]
    if arch == "tiny-t5":
        inputs["decoder_input_ids"] = model.get_base_model().prepare_decoder_input_ids_from_labels(labels=labels)
        logits, targets = model(**inputs).logits, labels
    else:
        logits, targets = model(**inputs).logits[:, :-1], labels[:, 1:]
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    return loss, int((targets != -100).sum())


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out


CASES = [
    # (arch, method, gradient checkpointing)
    ("tiny-gemma3", "orchmoe", None),
    ("tiny-gemma3", "orchmoe", {"use_reentrant": True}),
    ("tiny-gemma3", "orchmoe", {"use_reentrant": False}),
    ("tiny-gemma3", "lora", None),
    ("tiny-t5", "orchmoe", None),
    ("tiny-t5", "orchmoe", {"use_reentrant": True}),
    ("tiny-t5", "lora", None),
]


@pytest.mark.parametrize(("arch", "method", "checkpointing"), CASES)
def test_supervised_head_equals_full_logits(arch: str, method: str, checkpointing: dict | None) -> None:
    model = make_peft(arch) if method == "orchmoe" else lora(arch)
    if checkpointing is not None:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        model.enable_input_require_grads()
    model.train()
    data = batch(arch)
    inputs = {k: v for k, v in data.items() if k != "labels"}

    torch.manual_seed(7)  # the same Gumbel draw in both calls
    reference, count = full_loss(model, arch, data)
    reference.backward()
    expected = grads(model)

    torch.manual_seed(7)
    loss, n_tokens, output = supervised_loss_sum(model, data["labels"], arch == "tiny-t5", **inputs)
    loss.backward()
    got = grads(model)

    assert output.logits.shape == (count, VOCAB)  # the head saw the supervised positions only
    assert int(n_tokens) == count
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    assert expected.keys() == got.keys() and len(got) > 0
    if method == "orchmoe":  # the routers are among the parameters whose gradients match
        assert any("orchmoe_task_router" in n for n in got) and any("skill_router" in n for n in got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_positions_shift_for_causal_lm_only() -> None:
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, -100, -100]])
    index, targets = supervised_positions(labels, shift=True)
    assert index.tolist() == [1, 2, 4] and targets.tolist() == [5, 6, 7]  # position t predicts label t + 1
    index, targets = supervised_positions(labels, shift=False)
    assert index.tolist() == [2, 3, 5] and targets.tolist() == [5, 6, 7]


def test_refuses_logits_to_keep() -> None:
    model = lora("tiny-gemma3")
    data = batch("tiny-gemma3")
    with pytest.raises(ValueError, match="logits_to_keep"):
        supervised_logits(model, data["labels"], False, input_ids=data["input_ids"], logits_to_keep=1)

"""The routing mechanism (``orchmoe.tuner.routing``): each call's routing reaches its own layers in forward and in
checkpointed recomputation, whatever ran in between, and nothing keeps it after its step."""

from __future__ import annotations

import weakref

import pytest
import torch
from peft import get_peft_model

import orchmoe
from orchmoe import OrchMoEConfig
from orchmoe.models import tiny_model
from tests.conftest import ARCHS, VOCAB, inputs, prompt_labels, seq2seq_extra


def model_for(arch: str, checkpointing: str | None) -> torch.nn.Module:
    """OrchMoE on a tiny ``arch``, routers spread so that two batches route differently; no Gumbel noise, so two
    models given the same calls compute the same."""
    task_type, targets = ARCHS[arch]
    base = tiny_model(arch, vocab_size=VOCAB, seed=0)
    if checkpointing is not None:
        base.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"}
        )
    config = OrchMoEConfig(n_abstract_tasks=3, n_skills=4, r=2, target_modules=targets, task_type=task_type,
                           init_weights=False, noise_scale=0.0)  # fmt: skip
    torch.manual_seed(0)
    model = get_peft_model(base, config).train()
    torch.manual_seed(1)
    for p in orchmoe.get_tuner(model).router_parameters():
        torch.nn.init.normal_(p, std=1.0)
    return model


def labelled(arch: str, seed: int) -> dict[str, torch.Tensor]:
    batch = {**inputs(batch=4, seed=seed), **seq2seq_extra(arch, 4)}
    batch["labels"] = batch["decoder_input_ids"] if arch == "tiny-t5" else prompt_labels(batch["input_ids"])
    return batch


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", ["reentrant", "non-reentrant", None])
def test_interleaved_forwards_each_backpropagate_their_own_routing(arch: str, checkpointing: str | None) -> None:
    """Forward A, forward B, backward B, backward A (as gradient accumulation over kept graphs does) equals A then B
    one at a time without checkpointing: a recomputed layer uses its own call's routing, not the last one."""
    a, b = labelled(arch, seed=0), labelled(arch, seed=1)
    reference = model_for(arch, None)
    reference(**a).loss.backward()
    reference(**b).loss.backward()
    model = model_for(arch, checkpointing)  # the same initial state
    tuner = orchmoe.get_tuner(model)
    loss_a = model(**a).loss
    weights_a = tuner.routing_state.task_weights.detach()
    loss_b = model(**b).loss
    assert not torch.allclose(weights_a, tuner.routing_state.task_weights, atol=1e-3)  # two different routings
    loss_b.backward()
    loss_a.backward()
    expected, got = grads(reference), grads(model)
    assert expected.keys() == got.keys() and any("orchmoe_task_router" in n for n in got)
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("checkpointing", ["reentrant", "non-reentrant", None])
def test_nothing_holds_a_routing_after_its_step(arch: str, checkpointing: str | None) -> None:
    """The model keeps a weak reference only: once backward has freed the graph the routing is gone, and no
    gradient collected from a reentrant recomputation is left behind."""
    model = model_for(arch, checkpointing)
    tuner = orchmoe.get_tuner(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(**labelled(arch, seed=0)).loss
    routing = tuner.routing_slot.get()
    assert routing is not None  # alive between forward and backward (router_aux_loss reads it)
    ref = weakref.ref(routing)
    del routing
    loss.backward()
    assert not ref().recomputed_grads  # every collected gradient was handed to the routers' graph
    del loss
    optimizer.step()
    assert ref() is None and tuner.routing_slot.get() is None
    with pytest.raises(RuntimeError, match="keeps no routing"):
        tuner.router_aux_loss()


def test_no_routing_outlives_generate_or_an_eval_forward(arch: str) -> None:
    model = model_for(arch, None).eval()
    tuner = orchmoe.get_tuner(model)
    with torch.no_grad():
        model.generate(**inputs(batch=3, seed=4), max_new_tokens=3, do_sample=False, pad_token_id=0)
        model(**{**inputs(batch=4), **seq2seq_extra(arch, 4)})
    assert tuner.routing_slot.get() is None

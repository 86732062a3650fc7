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


def assert_same_grads(reference: torch.nn.Module, model: torch.nn.Module) -> None:
    """The same parameters have gradients in both, the Task Router's among them, and they agree."""
    expected, got = grads(reference), grads(model)
    assert expected.keys() == got.keys() and any("orchmoe_task_router" in n for n in got)
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-5, rtol=1e-4), name


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
    assert_same_grads(reference, model)


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


def fused(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A loss that never calls the output head module: TRL's fused linear cross-entropy (``fused_lm_head``)."""
    return -model(**batch, fused_lm_head=True).log_probs.sum()


@pytest.mark.parametrize("checkpointing", ["reentrant", "non-reentrant"])
def test_a_fused_head_loss_backpropagates_its_own_routing(checkpointing: str) -> None:
    """Forward A, forward B, backward B, backward A with TRL's fused head (the output head module is never called)
    equals A then B without checkpointing."""
    add_fused_lm_head = pytest.importorskip("trl.trainer.utils").add_fused_lm_head  # not in a core install

    arch = "tiny-gemma3"
    a, b = labelled(arch, seed=0), labelled(arch, seed=1)
    reference, model = model_for(arch, None), model_for(arch, checkpointing)
    for m in (reference, model):
        add_fused_lm_head(m.get_base_model())
    fused(reference, a).backward()
    fused(reference, b).backward()
    loss_a = fused(model, a)
    loss_b = fused(model, b)
    loss_b.backward()
    loss_a.backward()
    assert_same_grads(reference, model)


def test_router_aux_loss_is_of_the_latest_training_forward_with_autograd_or_a_clear_error(arch: str) -> None:
    """A no-grad train-mode call (a trainer's reference or metrics pass) leaves router_aux_loss() to the call whose
    loss it joins; once that call is backpropagated, asking for it is an error that says what to do."""
    model = model_for(arch, None)
    tuner = orchmoe.get_tuner(model)
    out_a = model(**labelled(arch, seed=0))
    aux_a = tuner.router_aux_loss()
    with torch.no_grad():
        model(**labelled(arch, seed=1))
    assert torch.equal(tuner.router_aux_loss(), aux_a) and tuner.router_aux_loss().requires_grad
    out_b = model(**labelled(arch, seed=1))
    assert not torch.equal(tuner.router_aux_loss(), aux_a)  # B's, the latest forward with autograd
    out_b.loss.backward()
    with pytest.raises(RuntimeError, match=r"already been backpropagated.*before any backward"):
        tuner.router_aux_loss()
    (out_a.loss + aux_a).backward()  # A's objective, taken right after A's forward, is still good


def test_the_backward_probe_of_this_torch() -> None:
    """``orchmoe.tuner.routing._in_backward`` reads torch's private ``torch._C._current_graph_task_id``: -1 outside
    a backward, another value inside one. A torch upgrade that drops or changes it fails here, not silently."""
    from orchmoe.tuner.routing import _in_backward

    assert hasattr(torch._C, "_current_graph_task_id"), "torch dropped _current_graph_task_id: see routing.py"
    seen: list[bool] = []
    x = torch.ones(2, requires_grad=True)
    y = (x * 2).sum()
    y.grad_fn.register_hook(lambda *_: seen.append(_in_backward()))
    assert not _in_backward()
    y.backward()
    assert seen == [True] and not _in_backward()

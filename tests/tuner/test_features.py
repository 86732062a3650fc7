"""The Task Router's input: input embeddings, or the frozen base model's hidden states after layer k."""

from __future__ import annotations

import pytest
import torch

import orchmoe
from orchmoe.models import tiny_model
from orchmoe.tuner.features import backbone_layers, layer_hidden_states
from tests.conftest import VOCAB, inputs, make_peft, seq2seq_extra


def base_layer_output(arch: str, batch: dict, layer: int) -> torch.Tensor:
    """The output of layer ``layer`` of the plain base model (its encoder for T5), caught by a forward hook."""
    base = tiny_model(arch, vocab_size=VOCAB, seed=0).eval()
    backbone, layers = backbone_layers(base)
    caught = []
    handle = layers[layer - 1].register_forward_hook(
        lambda m, a, out: caught.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.no_grad():
            backbone(**batch)
    finally:
        handle.remove()
    return caught[0]


@pytest.mark.parametrize("layer", [1, 2])
def test_routing_pass_reads_the_frozen_base_layer(arch: str, layer: int) -> None:
    model = make_peft(arch, router_layer=layer).train()  # skills are not a no-op (init_weights=False)
    tuner = orchmoe.get_tuner(model)
    batch = inputs(batch=3, length=7)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    hidden = layer_hidden_states(tuner.model, layer, tuner._skills_off, ids, mask, None)
    torch.testing.assert_close(hidden, base_layer_output(arch, batch, layer))
    assert hidden.shape[:2] == (3, 7) and not hidden.requires_grad
    # every module's train/eval mode is restored and no hook is left behind
    assert all(m.training for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_router_layer_changes_the_routing_and_keeps_generation_exact(arch: str) -> None:
    batch = inputs(batch=4, length=6)
    embedding_routed = orchmoe.routing(make_peft(arch).eval(), batch).task_weights
    model = make_peft(arch, router_layer=1).eval()
    layer_routed = orchmoe.routing(model, batch).task_weights
    assert layer_routed.shape == embedding_routed.shape
    assert not torch.allclose(layer_routed, embedding_routed)
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = model.generate(**batch, use_cache=True, **kwargs)
        uncached = model.generate(**batch, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_router_layer_trains_the_router(arch: str) -> None:
    model = make_peft(arch, router_layer=1).train()
    batch = inputs()
    labels = batch["input_ids"] if arch == "tiny-gemma3" else seq2seq_extra(arch, 3)["decoder_input_ids"]
    model(**batch, **seq2seq_extra(arch, 3), labels=labels).loss.backward()
    proj = orchmoe.get_tuner(model).task_router().proj.weight
    assert proj.grad is not None and proj.grad.abs().sum() > 0


def test_router_layer_beyond_the_model_is_rejected_at_injection(arch: str) -> None:
    with pytest.raises(ValueError, match=r"router_layer must be in \[0, 2\]"):
        make_peft(arch, router_layer=3)

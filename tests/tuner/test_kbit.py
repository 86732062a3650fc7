"""QLoRA-style bases: bitsandbytes 4-bit (NF4) and 8-bit layers (its CPU backend), after peft's
``prepare_model_for_kbit_training`` with its defaults (gradient checkpointing on, reentrant), as users run LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, prepare_model_for_kbit_training

import orchmoe
from orchmoe import OrchMoEConfig
from tests.conftest import DEFAULTS, prompt_labels

bnb = pytest.importorskip("bitsandbytes")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Gemma3ForCausalLM, Gemma3TextConfig  # noqa: E402

QUANT = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}
LAYER = {"nf4": "Linear4bit", "int8": "Linear8bitLt"}


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)  # in_features >= 64: bitsandbytes' CPU 4-bit inference packs weights in blocks of 64
    config = Gemma3TextConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=3,
    )
    Gemma3ForCausalLM(config).save_pretrained(path)
    return path


def quantized(path: Path, quant: str) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(**QUANT[quant]))
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == LAYER[quant]
    return model


def config(method: str):
    if method == "lora":
        return LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return OrchMoEConfig(
        n_abstract_tasks=3, n_skills=4, r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", **DEFAULTS
    )


@pytest.mark.parametrize("method", ["orchmoe", "lora"])
@pytest.mark.parametrize("quant", sorted(QUANT))
@pytest.mark.usefixtures("allocation")
def test_kbit_recipe_trains_generates_saves_and_loads(saved_base: Path, tmp_path: Path, quant: str, method: str):
    model = get_peft_model(prepare_model_for_kbit_training(quantized(saved_base, quant)), config(method))
    assert model.base_model.model.is_gradient_checkpointing  # prepare_model_for_kbit_training's default
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(4, 128, (4, 10), generator=torch.Generator().manual_seed(0))
    model.train()
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=prompt_labels(ids)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    if method == "orchmoe":
        router = orchmoe.get_tuner(model).task_router().proj.weight
        assert router.requires_grad and not torch.equal(router, torch.zeros_like(router))
    model.eval()
    with torch.no_grad():
        cached = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        uncached = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0, use_cache=False)
        assert torch.equal(cached, uncached)
        model.save_pretrained(tmp_path)
        expected = model(input_ids=ids).logits
        model.load_adapter(tmp_path, adapter_name="reloaded")
        saved, reloaded = (get_peft_model_state_dict(model, adapter_name=name) for name in ("default", "reloaded"))
        assert saved.keys() == reloaded.keys() and all(torch.equal(saved[k], reloaded[k]) for k in saved)
        model.set_adapter("reloaded")
        if quant == "int8":  # on bitsandbytes' CPU backend, NF4 outputs move after load_adapter, LoRA's as well
            assert torch.equal(model(input_ids=ids).logits, expected)
        fresh = PeftModel.from_pretrained(quantized(saved_base, quant), tmp_path)  # and into a new base
        assert torch.isfinite(fresh(input_ids=ids).logits).all()

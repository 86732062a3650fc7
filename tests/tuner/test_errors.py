"""Every documented misuse ends in one clear error."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from orchmoe import OrchMoEConfig
from orchmoe.models import tiny_model
from tests.conftest import VOCAB, inputs, make_peft


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_abstract_tasks": 0}, "n_abstract_tasks"),
        ({"n_skills": 0}, "n_skills"),
        ({"r": 0}, "r must"),
        ({"r": 1.5}, "r must"),
        ({"temperature": 0.0}, "temperature"),
        ({"noise_scale": -0.5}, "noise_scale"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"router_mi_weight": -1.0}, "router_mi_weight"),
        ({"router_lr_multiplier": 0.0}, "router_lr_multiplier"),
    ],
)
def test_impossible_configs_are_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        OrchMoEConfig(**kwargs)


@pytest.mark.parametrize(
    ("saved", "loads"),
    [
        ({"n_tasks": 5}, True),  # the old name of n_abstract_tasks
        ({"share_allocation": False, "router_layer": 0, "mixing": "outputs", "allocation_init": 1.0}, True),
        ({"mixing": "parameters"}, False),  # an adapter that computes differently: refused
        ({"router_layer": 6}, False),
        ({"task_router": "uniform"}, False),
    ],
)
def test_configs_saved_by_earlier_versions(tmp_path, saved: dict, loads: bool) -> None:
    OrchMoEConfig(n_abstract_tasks=5, target_modules=["q"], task_type="CAUSAL_LM").save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    body = json.loads(path.read_text())
    body.pop("n_abstract_tasks")
    path.write_text(json.dumps({**body, "n_tasks": 5, **saved}))
    if loads:
        assert OrchMoEConfig.from_pretrained(tmp_path).n_abstract_tasks == 5  # as PeftModel.from_pretrained reads it
    else:
        with pytest.raises(ValueError, match=f"saved with {next(iter(saved))}="):
            OrchMoEConfig.from_pretrained(tmp_path)


def test_target_module_not_found() -> None:
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(
            tiny_model("tiny-gemma3", vocab_size=VOCAB),
            OrchMoEConfig(target_modules=["nope_proj"], task_type="CAUSAL_LM"),
        )


def test_non_linear_target_is_rejected() -> None:
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        get_peft_model(
            tiny_model("tiny-gemma3", vocab_size=VOCAB),
            OrchMoEConfig(target_modules=["embed_tokens"], task_type="CAUSAL_LM"),
        )


def test_missing_task_type_is_refused() -> None:
    """Without a task type, peft's plain PeftModel would call the base model and bypass the routing."""
    with pytest.raises(ValueError, match="task_type='CAUSAL_LM'"):
        get_peft_model(tiny_model("tiny-gemma3", vocab_size=VOCAB), OrchMoEConfig(target_modules=["q_proj"]))


def test_model_without_input_embeddings() -> None:
    class NoEmbeddings(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="input token embeddings"):
        get_peft_model(NoEmbeddings(), OrchMoEConfig(target_modules=["proj"]))


def test_routing_mask_shape_mismatch_and_empty_prompt() -> None:
    model = make_peft("tiny-gemma3")
    batch = inputs(batch=2, length=6)
    with pytest.raises(ValueError, match="routing_mask` has shape"):
        model(**batch, routing_mask=torch.ones(2, 5))
    empty = torch.ones(2, 6)
    empty[1] = 0
    # checked without a host sync: torch._assert_async raises here on the CPU (on a GPU, at the next sync)
    with pytest.raises(RuntimeError, match="no routing token"):
        model(**batch, routing_mask=empty)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"n_skills": 6}, "has shape"),  # same base, other skill count
        ({"target_modules": ["q_proj", "k_proj", "v_proj"]}, "absent"),  # other modules
    ],
)
def test_loading_an_adapter_into_a_model_of_another_shape(tmp_path, change: dict, match: str) -> None:
    make_peft("tiny-gemma3").save_pretrained(tmp_path / "a")
    other = make_peft("tiny-gemma3", **change)
    with pytest.raises(ValueError, match=match):
        other.load_adapter(tmp_path / "a", adapter_name="default")


def test_loading_an_adapter_into_another_base_model(tmp_path) -> None:
    make_peft("tiny-gemma3").save_pretrained(tmp_path)
    bigger = tiny_model("tiny-gemma3", vocab_size=VOCAB + 64)
    bigger_cfg = bigger.config
    bigger_cfg.hidden_size = 48
    base = type(bigger)(bigger_cfg)
    with pytest.raises(ValueError, match="Cannot load this OrchMoE adapter"):
        PeftModel.from_pretrained(base, tmp_path)

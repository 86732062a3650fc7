"""A served OrchMoE on a tiny Gemma 3 that vLLM's CPU build takes (head_dim 32: vLLM refuses 8), with a chat
template, exported with ``export_abstract_tasks``; and OrchMoE's own route of a prompt, to check the front against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerBase

import orchmoe
from orchmoe import OrchMoEConfig
from orchmoe.models import char_tokenizer
from orchmoe.serving import adapter_name, export_abstract_tasks

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")  # fmt: skip
PROMPTS = ["translate: hello", "sum 3 and 4", "is it positive?", "QUESTION: who", "odd one out: a b c 7",
           "jump twice", "zzzz", "The cat sat on"]  # fmt: skip


@dataclass
class Served:
    model: torch.nn.Module  # OrchMoE (peft), eval mode
    tokenizer: PreTrainedTokenizerBase
    base: Path  # the base model's directory, with its tokenizer
    served: Path  # export_abstract_tasks' directory


def build_served(root: Path) -> Served:
    tokenizer = char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
                              sliding_window=64, pad_token_id=0, eos_token_id=1, bos_token_id=3)  # fmt: skip
    base = Gemma3ForCausalLM(config).eval()
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    adapter = OrchMoEConfig(n_abstract_tasks=3, n_skills=4, r=2, target_modules=["q_proj", "v_proj"],
                            task_type="CAUSAL_LM", init_weights=False)  # fmt: skip
    model = get_peft_model(base, adapter)
    torch.manual_seed(1)
    for p in orchmoe.get_tuner(model).router_parameters():  # spread routers: prompts go to several abstract tasks
        torch.nn.init.normal_(p, std=1.0)
    model.eval()
    return Served(model, tokenizer, root / "base", export_abstract_tasks(model, root / "served"))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    return build_served(tmp_path_factory.mktemp("served"))


def orchmoe_route(served: Served, ids: list[int]) -> str:
    """The adapter of the abstract task OrchMoE itself weighs most for this prompt."""
    input_ids = torch.tensor([ids])
    weights = orchmoe.routing(served.model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)})
    return adapter_name(int(weights.task_weights.argmax()))


def chat_ids(served: Served, messages: list[dict]) -> list[int]:
    out = served.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

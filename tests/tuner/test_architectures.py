"""OrchMoE on tiny in-process models of many architectures, with peft's default target modules for each.

For every architecture: each example gets its own routing (an example alone equals the same example in a batch, in
forward and in beam search with several returned sequences), gradient checkpointing gives the gradients of a plain
run, generation with the KV cache equals generation without, and a saved adapter loads back exactly. The README's
table of architectures is this file's ``ARCHITECTURES``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers as tf
from peft import PeftModel, get_peft_model

import orchmoe
from orchmoe import OrchMoEConfig
from tests.conftest import prompt_labels

VOCAB = 96
SMALL = {"vocab_size": VOCAB, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
LLAMA_LIKE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


def gemma3_multimodal() -> tf.PreTrainedModel:
    text = tf.Gemma3TextConfig(**SMALL, **LLAMA_LIKE, num_key_value_heads=2, head_dim=8)
    vision = tf.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8
    )
    config = tf.Gemma3Config(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,
        image_token_index=95,
        boi_token_index=93,
        eoi_token_index=94,
    )
    return tf.Gemma3ForConditionalGeneration(config)


# name -> (model factory, task type); targets: peft's LoRA defaults for the model type (TARGETS where it has none)
ARCHITECTURES: dict[str, tuple[Callable[[], tf.PreTrainedModel], str]] = {
    "llama": (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL, **LLAMA_LIKE, num_key_value_heads=2)), "CAUSAL_LM"),
    "mistral": (
        lambda: tf.MistralForCausalLM(tf.MistralConfig(**SMALL, **LLAMA_LIKE, num_key_value_heads=2)),
        "CAUSAL_LM",
    ),
    "qwen2": (lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**SMALL, **LLAMA_LIKE, num_key_value_heads=2)), "CAUSAL_LM"),
    "phi3 (fused qkv_proj)": (
        lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**SMALL, **LLAMA_LIKE, num_key_value_heads=2)),
        "CAUSAL_LM",
    ),
    "gemma3": (
        lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**SMALL, **LLAMA_LIKE, num_key_value_heads=2, head_dim=8)),
        "CAUSAL_LM",
    ),
    "gpt2 (Conv1D)": (lambda: tf.GPT2LMHeadModel(tf.GPT2Config(**SMALL, n_embd=32, n_layer=2, n_head=4)), "CAUSAL_LM"),
    "gptj": (
        lambda: tf.GPTJForCausalLM(tf.GPTJConfig(**SMALL, n_embd=32, n_layer=2, n_head=4, rotary_dim=4)),
        "CAUSAL_LM",
    ),
    "gpt_neox": (lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**SMALL, **LLAMA_LIKE)), "CAUSAL_LM"),
    "opt": (
        lambda: tf.OPTForCausalLM(
            tf.OPTConfig(
                **SMALL, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32
            )
        ),
        "CAUSAL_LM",
    ),
    "bloom": (lambda: tf.BloomForCausalLM(tf.BloomConfig(**SMALL, hidden_size=32, n_layer=2, n_head=4)), "CAUSAL_LM"),
    "t5": (
        lambda: tf.T5ForConditionalGeneration(
            tf.T5Config(
                **SMALL,
                d_model=32,
                d_ff=64,
                d_kv=8,
                num_layers=2,
                num_heads=4,
                decoder_start_token_id=0,
                dropout_rate=0.0,
            )
        ),
        "SEQ_2_SEQ_LM",
    ),
    "bart": (
        lambda: tf.BartForConditionalGeneration(
            tf.BartConfig(
                **SMALL,
                d_model=32,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
                dropout=0.0,
                decoder_start_token_id=2,
            )
        ),
        "SEQ_2_SEQ_LM",
    ),
    "gemma3 multimodal (text part)": (gemma3_multimodal, "CAUSAL_LM"),
}


TARGETS = {"phi3 (fused qkv_proj)": ["qkv_proj"]}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    factory, task_type = ARCHITECTURES[name]
    torch.manual_seed(seed)
    base = factory().eval()
    config = OrchMoEConfig(
        n_abstract_tasks=3, n_skills=4, r=2, init_weights=False, task_type=task_type, target_modules=TARGETS.get(name)
    )
    model = get_peft_model(base, config)
    torch.manual_seed(seed + 1)
    for p in orchmoe.get_tuner(model).router_parameters():
        torch.nn.init.normal_(p)
    return model.eval()


def batch(name: str, size: int = 3, length: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (size, length), generator=g)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if ARCHITECTURES[name][1] == "SEQ_2_SEQ_LM":
        data["decoder_input_ids"] = torch.randint(3, 90, (size, 4), generator=g)
    return data


def labels_of(data: dict[str, torch.Tensor]) -> torch.Tensor:
    return data["decoder_input_ids"] if "decoder_input_ids" in data else prompt_labels(data["input_ids"])


@pytest.fixture(params=sorted(ARCHITECTURES))
def name(request: pytest.FixtureRequest) -> str:
    return request.param


def test_each_example_gets_its_own_routing(name: str) -> None:
    model = build(name)
    data = batch(name)
    with torch.no_grad():
        together = model(**data).logits
        for i in range(3):
            alone = model(**{k: v[i : i + 1] for k, v in data.items()}).logits
            assert torch.allclose(alone[0], together[i], atol=1e-5), i
        prompts = {k: v for k, v in data.items() if k != "decoder_input_ids"}
        kwargs = {"max_new_tokens": 4, "do_sample": False, "num_beams": 2, "num_return_sequences": 2, "pad_token_id": 0}
        beams = model.generate(**prompts, **kwargs)
        for i in range(3):
            alone = model.generate(**{k: v[i : i + 1] for k, v in prompts.items()}, **kwargs)
            assert torch.equal(alone, beams[2 * i : 2 * i + 2]), i
        assert torch.equal(model.generate(**prompts, **kwargs, use_cache=False), beams)


def test_gradient_checkpointing_matches_a_plain_step(name: str) -> None:
    plain, checkpointed = build(name).train(), build(name).train()
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    data = batch(name, size=4)
    grads = []
    for model in (plain, checkpointed):
        torch.manual_seed(3)
        model(**data, labels=labels_of(data)).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert any("orchmoe_task_router" in n and g.abs().sum() > 0 for n, g in grads[0].items())
    for n, g in grads[0].items():
        assert torch.allclose(g, grads[1][n], atol=1e-5, rtol=1e-4), n


def test_save_and_load(name: str, tmp_path: Path) -> None:
    model = build(name)
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(ARCHITECTURES[name][0]().eval(), tmp_path).eval()
    data = batch(name, seed=2)
    with torch.no_grad():
        assert torch.equal(model(**data).logits, loaded(**data).logits)


def test_vision_tower_is_left_out_by_default() -> None:
    """Without target_modules: the language model's modules of peft's default names (tests/tuner/test_multimodal.py
    has named targets, images, and what is refused)."""
    model = build("gemma3 multimodal (text part)")
    adapted = [n for n, _ in orchmoe.get_tuner(model).orchmoe_layers()]
    assert adapted and all(".language_model." in n for n in adapted)

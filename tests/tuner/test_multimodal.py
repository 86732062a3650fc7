"""OrchMoE on multimodal models (Gemma 3 and Qwen2-VL, tiny, built in-process): target names given as suffixes adapt
the language model and leave the towers out, saying so once; a tower module named by path or regex is refused; a
training step with images and labels routes from the prompt; generation with images is per-example."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as tf
from peft import LoraConfig, get_peft_model

import orchmoe
from orchmoe import OrchMoEConfig
from tests.tuner.test_architectures import SMALL, gemma3_multimodal

IMAGE, START, END = 95, 93, 94  # token ids of the image placeholder and the image's start / end


def qwen2_vl() -> tf.PreTrainedModel:
    text = tf.Qwen2VLTextConfig(**SMALL, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2,
                                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})  # fmt: skip
    vision = tf.Qwen2VLVisionConfig(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4,
                                    spatial_merge_size=2, temporal_patch_size=2, in_channels=3)  # fmt: skip
    config = tf.Qwen2VLConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_id=IMAGE,
                              video_token_id=91, vision_start_token_id=START, vision_end_token_id=END)  # fmt: skip
    return tf.Qwen2VLForConditionalGeneration(config)


# name -> (factory, suffix targets; the second name is one that only the vision tower has)
MODELS = {"gemma3": (gemma3_multimodal, ["q_proj", "v_proj"]), "qwen2-vl": (qwen2_vl, ["q_proj", "v_proj", "proj"])}


def images(name: str, n: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` prompts of 3 text tokens, one image (4 placeholder tokens between start and end) and 3 text tokens,
    with what each model's processor would add (pixels, token types, Qwen2-VL's grid)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(4, 90, (n, 6), generator=g)
    image = torch.tensor([START] + [IMAGE] * 4 + [END]).expand(n, -1)
    ids = torch.cat([text[:, :3], image, text[:, 3:]], dim=1)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if name == "gemma3":
        batch |= {"pixel_values": torch.randn(n, 3, 16, 16, generator=g), "token_type_ids": (ids == IMAGE).long()}
    else:  # 4x4 patches of 4 pixels, merged 2x2: 4 placeholder tokens per image
        batch |= {"pixel_values": torch.randn(n * 16, 96, generator=g), "image_grid_thw": torch.tensor([[1, 4, 4]] * n),
                  "mm_token_type_ids": (ids == IMAGE).long()}  # fmt: skip
    return batch


def example(name: str, batch: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Example ``i`` of ``batch`` alone (Qwen2-VL's pixels are patches, 16 per image)."""
    rows = slice(16 * i, 16 * (i + 1)) if name == "qwen2-vl" else slice(i, i + 1)
    return {k: v[rows] if k == "pixel_values" else v[i : i + 1] for k, v in batch.items()}


def wrapped(name: str, method: str = "orchmoe", targets: object = None) -> torch.nn.Module:
    factory, suffixes = MODELS[name]
    torch.manual_seed(0)
    base = factory().eval()
    targets = suffixes if targets is None else targets
    if method == "lora":
        return get_peft_model(base, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    config = OrchMoEConfig(n_abstract_tasks=3, n_skills=4, r=2, init_weights=False, target_modules=targets,
                           task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(base, config)
    torch.manual_seed(1)
    for p in orchmoe.get_tuner(model).router_parameters():
        torch.nn.init.normal_(p)  # routings that differ between examples
    return model


@pytest.mark.parametrize("name", MODELS)
def test_suffix_targets_adapt_the_language_model_and_say_so_once(name: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = wrapped(name)
    said = [str(w.message) for w in caught if "adapts the language model only" in str(w.message)]
    assert len(said) == 1 and ("vision_tower" in said[0] or ".visual." in said[0]), said
    adapted = [n for n, _ in orchmoe.get_tuner(model).orchmoe_layers()]
    assert len(adapted) == 4 and all(".language_model." in n for n in adapted)


@pytest.mark.parametrize(
    ("targets", "refused"),
    [
        (["vision_tower.encoder.layers.0.self_attn.q_proj", "v_proj"], True),  # a tower module by path
        (r".*self_attn\.q_proj", True),  # a regex that matches a tower module
        (r".*language_model.*self_attn\.(q|v)_proj", False),  # a regex of the language model's only
    ],
)
def test_a_tower_module_named_by_path_or_regex_is_refused(targets: object, refused: bool) -> None:
    if refused:
        with pytest.raises(ValueError, match="vision/audio tower"):
            wrapped("gemma3", targets=targets)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = wrapped("gemma3", targets=targets)
    assert not [w for w in caught if "adapts the language model only" in str(w.message)]
    assert len(list(orchmoe.get_tuner(model).orchmoe_layers())) == 4


@pytest.mark.parametrize("name", MODELS)
def test_a_train_step_with_images_and_labels_routes_from_the_prompt(name: str) -> None:
    model = wrapped(name).train()
    tuner = orchmoe.get_tuner(model)
    routed: list[list[int]] = []
    tuner.task_router().register_forward_hook(lambda _m, args, _o: routed.append(args[1].sum(dim=1).tolist()))
    batch = images(name)
    labels = batch["input_ids"].clone()
    labels[:, :-2] = -100  # the last two text tokens are the answer; the prompt holds the image
    loss = model(**batch, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and routed == [[10, 10, 10]]  # 12 tokens, the 10 of the prompt routed
    for layer_name, layer in tuner.orchmoe_layers():
        assert layer.orchmoe_A["default"].grad.abs().sum() > 0, layer_name
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tuner.task_router().parameters())


@pytest.mark.parametrize("method", ["orchmoe", "lora"])  # LoRA: the model itself is per-example here
@pytest.mark.parametrize("name", MODELS)
def test_generate_with_images_is_per_example(name: str, method: str) -> None:
    model = wrapped(name, method).eval()
    batch = images(name, seed=1)
    greedy = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        together = model.generate(**batch, **greedy)
        logits = model(**batch).logits
        for i in range(3):
            alone = example(name, batch, i)
            assert torch.equal(model.generate(**alone, **greedy), together[i : i + 1]), i
            torch.testing.assert_close(model(**alone).logits, logits[i : i + 1], rtol=1e-4, atol=1e-5)
    if method == "orchmoe":  # and the examples were routed apart
        weights = orchmoe.routing(model, batch).task_weights
        assert not torch.allclose(weights[0], weights[1], atol=1e-3)


@pytest.mark.parametrize("name", MODELS)
def test_all_linear_adapts_the_language_models_linear_layers_as_lora_does_and_leaves_the_towers_out(name: str) -> None:
    """peft's LoRA with ``all-linear`` (the control) adapts every linear layer but the output head, towers included;
    OrchMoE adapts exactly LoRA's layers inside the language model, and says once that it leaves the others out."""
    lora = wrapped(name, "lora", targets="all-linear")
    lora_layers = {n.removeprefix("base_model.model.") for n, m in lora.named_modules() if hasattr(m, "lora_A")
                   and "default" in m.lora_A}  # fmt: skip
    prefix = "model.language_model."
    assert any(not n.startswith(prefix) for n in lora_layers)  # LoRA adapts the towers: the control is not empty
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = wrapped(name, targets="all-linear")
    adapted = {n for n, _ in orchmoe.get_tuner(model).orchmoe_layers()}
    assert adapted == {n for n in lora_layers if n.startswith(prefix)} and len(adapted) >= 14
    said = [str(w.message) for w in caught if "adapts the language model only" in str(w.message)]
    assert len(said) == 1 and str(len(lora_layers) - len(adapted)) in said[0]
    batch = images(name)
    labels = batch["input_ids"].clone()
    labels[:, :-2] = -100
    model.train()
    model(**batch, labels=labels).loss.backward()  # trains, routed from the prompt
    layers = orchmoe.get_tuner(model).orchmoe_layers()
    assert all(layer.orchmoe_A["default"].grad.abs().sum() > 0 for _, layer in layers)

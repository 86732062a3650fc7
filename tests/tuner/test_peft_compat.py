"""The checks peft applies to every tuner (its tests/testing_common.py), written for a per-example-routed tuner.

Each runs on a decoder-only (tiny Gemma 3) and an encoder-decoder (tiny T5) model, with either allocation (the
paper's diagonal and the mixing one); where a check could pass for a wrong reason, a LoRA control runs the same code
and must pass too.
"""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

import orchmoe
from orchmoe import OrchMoEConfig
from orchmoe.models import tiny_model
from tests.conftest import ARCHS, DEFAULTS, VOCAB, inputs, make_peft, prompt_labels, seq2seq_extra

pytestmark = pytest.mark.usefixtures("allocation")
METHODS = ("orchmoe", "lora")


def config(method: str, arch: str, **overrides) -> OrchMoEConfig | LoraConfig:
    task_type, targets = ARCHS[arch]
    if method == "lora":
        return LoraConfig(r=8, target_modules=targets, task_type=task_type, init_lora_weights=False, **overrides)
    kwargs = {"n_abstract_tasks": 3, "n_skills": 4, "r": 2, "init_weights": False, **DEFAULTS, **overrides}
    return OrchMoEConfig(target_modules=targets, task_type=task_type, **kwargs)


def base(arch: str) -> torch.nn.Module:
    return tiny_model(arch, vocab_size=VOCAB, seed=0)


def batch_for(arch: str, batch: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    return {**inputs(batch=batch, seed=seed), **seq2seq_extra(arch, batch)}


def labelled(arch: str, batch: int = 4) -> dict[str, torch.Tensor]:
    data = batch_for(arch, batch)
    data["labels"] = data["decoder_input_ids"] if arch == "tiny-t5" else prompt_labels(data["input_ids"])
    return data


def logits(model: torch.nn.Module, arch: str, seed: int = 5) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch_for(arch, seed=seed)).logits


def trained(arch: str) -> torch.nn.Module:
    """An OrchMoE model after one training forward (running statistics moved), in eval mode."""
    model = make_peft(arch).train()
    model(**labelled(arch))
    return model.eval()


def router_state(model: torch.nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    router = orchmoe.get_tuner(model).task_router(adapter)
    return {k: v.clone() for k, v in router.state_dict().items()}


@pytest.mark.parametrize("safe_serialization", [True, False])
@pytest.mark.parametrize(("saved_as", "loaded_as"), [("default", "default"), ("default", "other"), ("mine", "x")])
def test_save_load_under_any_name(arch: str, tmp_path: Path, safe_serialization: bool, saved_as: str, loaded_as: str):
    model = trained(arch)
    if saved_as != "default":
        model.add_adapter(saved_as, config("orchmoe", arch))
        model.set_adapter(saved_as)
        model.train()
        model(**labelled(arch))
        model.eval()
    model.save_pretrained(tmp_path, selected_adapters=[saved_as], safe_serialization=safe_serialization)
    loaded = PeftModel.from_pretrained(
        base(arch), tmp_path / ("" if saved_as == "default" else saved_as), adapter_name=loaded_as
    ).eval()
    assert torch.equal(logits(model, arch), logits(loaded, arch))
    keys = [k for k in loaded.state_dict() if "orchmoe_" in k]
    assert keys and all(f".{loaded_as}" in k for k in keys)


def test_second_adapter_has_its_own_router_and_loading_leaves_the_first_alone(arch: str, tmp_path: Path) -> None:
    model = trained(arch)
    first = logits(model, arch)
    before = router_state(model, "default")
    other = trained(arch)
    torch.manual_seed(3)
    for p in orchmoe.get_tuner(other).router_parameters():
        torch.nn.init.normal_(p)
    other.save_pretrained(tmp_path)
    model.load_adapter(tmp_path, adapter_name="x")
    after = router_state(model, "default")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the default adapter's router is untouched
    assert torch.equal(logits(model, arch), first)
    model.set_adapter("x")
    assert torch.equal(logits(model, arch), logits(other, arch))
    model.add_adapter("fresh", config("orchmoe", arch))
    model.set_adapter("fresh")
    assert not torch.equal(logits(model, arch), first)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".fresh" in n for n in trainable)
    assert any("orchmoe_task_router.fresh" in n for n in trainable)


@pytest.mark.parametrize("method", METHODS)
def test_delete_active_inactive_and_last_adapter(method: str, arch: str) -> None:
    model = get_peft_model(base(arch), config(method, arch)).eval()
    model.add_adapter("second", config(method, arch))
    model.delete_adapter("second")  # the inactive one
    assert not [k for k in model.state_dict() if ".second" in k]
    model.add_adapter("second", config(method, arch))
    model.set_adapter("second")
    model.delete_adapter("second")  # the active one
    assert model.active_adapters == ["default"]
    assert not [k for k in model.state_dict() if ".second" in k]
    model.delete_adapter("default")  # none left: the tuner runs the base model (PeftModel itself needs an adapter)
    assert torch.equal(logits(model.base_model, arch), logits(base(arch).eval(), arch))


@pytest.mark.parametrize("is_trainable", [False, True])
def test_is_trainable_and_set_requires_grad_cover_the_router(arch: str, tmp_path: Path, is_trainable: bool) -> None:
    trained(arch).save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base(arch), tmp_path, is_trainable=is_trainable)
    router = [p for n, p in loaded.named_parameters() if "orchmoe_task_router" in n]
    assert router and all(p.requires_grad == is_trainable for p in router)
    loaded.base_model.set_requires_grad("default", requires_grad=not is_trainable)
    assert all(p.requires_grad != is_trainable for p in router)


@pytest.mark.parametrize("method", METHODS)
def test_a_step_changes_adapter_parameters_only(method: str, arch: str) -> None:
    model = get_peft_model(base(arch), config(method, arch)).train()
    before = {n: p.clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**labelled(arch)).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    prefix = "orchmoe_" if method == "orchmoe" else "lora_"
    assert changed and all(prefix in n for n in changed)
    if method == "orchmoe":
        assert any("orchmoe_task_router" in n for n in changed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_adapter_dtype_and_casting_after_wrapping(arch: str, dtype: torch.dtype) -> None:
    model = get_peft_model(base(arch).to(dtype), config("orchmoe", arch))
    adapter = {n: p.dtype for n, p in model.named_parameters() if "orchmoe_" in n}
    assert adapter and set(adapter.values()) == {torch.float32}  # peft's autocast_adapter_dtype=True
    model.train()
    assert torch.isfinite(model(**labelled(arch)).loss)
    cast = make_peft(arch).to(dtype).eval()  # .half() / .bfloat16() after wrapping: the router follows
    assert logits(cast, arch).dtype == dtype


def test_low_cpu_mem_usage_loading_equals_normal_loading(arch: str, tmp_path: Path) -> None:
    model = trained(arch)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base(arch), tmp_path, low_cpu_mem_usage=True).eval()
    assert torch.equal(logits(model, arch), logits(loaded, arch))
    fresh = get_peft_model(base(arch), config("orchmoe", arch), low_cpu_mem_usage=True)
    assert any(p.is_meta for n, p in fresh.named_parameters() if "orchmoe_task_router" in n)  # as peft's LoRA


@pytest.mark.parametrize("after", ["eval forward", "training step", "generate"])
def test_deepcopy_and_pickle_after_a_call(arch: str, after: str) -> None:
    model = trained(arch)
    if after == "training step":
        model.train()
        model(**labelled(arch)).loss.backward()
        model.eval()
    elif after == "generate":
        with torch.no_grad():
            model.generate(**inputs(batch=2), max_new_tokens=3, do_sample=False, pad_token_id=0)
    else:
        logits(model, arch)
    expected = logits(model, arch)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(logits(copied, arch), expected)
        slots = {id(m.routing_slot) for m in copied.modules() if hasattr(m, "routing_slot")}
        assert len(slots) == 1  # the copy's layers share one slot of their own
        assert orchmoe.get_tuner(copied).routing_slot is not orchmoe.get_tuner(model).routing_slot


def test_unload_gives_the_base_model_back(arch: str) -> None:
    unloaded = make_peft(arch).unload().eval()
    assert not any("orchmoe_" in n for n, _ in unloaded.named_parameters())
    assert torch.equal(logits(unloaded, arch), logits(base(arch).eval(), arch))


def test_torch_compile_matches_eager(arch: str) -> None:
    model = trained(arch)
    compiled = torch.compile(model, backend="aot_eager")
    assert torch.allclose(logits(compiled, arch), logits(model, arch), atol=1e-5)


def test_merge_is_refused_with_the_way_out(arch: str) -> None:
    with pytest.raises(ValueError, match=r"orchmoe\.export_lora"):
        make_peft(arch).merge_and_unload()


def gradients(model: torch.nn.Module, arch: str) -> dict[str, torch.Tensor]:
    model.zero_grad()
    torch.manual_seed(7)  # the same Gumbel noise and dropout for every variant
    model(**labelled(arch)).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(method: str, arch: str, reentrant: bool) -> None:
    plain = get_peft_model(base(arch), config(method, arch)).train()
    model = base(arch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant and method == "lora":
        model.enable_input_require_grads()  # what peft and prepare_model_for_kbit_training do for LoRA
    checkpointed = get_peft_model(model, config(method, arch)).train()
    checkpointed.load_state_dict(plain.state_dict())
    expected, got = gradients(plain, arch), gradients(checkpointed, arch)
    assert expected.keys() == got.keys()
    assert all(g.abs().sum() > 0 for g in expected.values())
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-5, rtol=1e-4), name
    if method == "orchmoe":
        assert orchmoe.get_tuner(checkpointed).routing_slot.get() is None


def fresh(method: str, arch: str, made_by: str, tmp_path: Path) -> torch.nn.Module:
    """A model as a user has it the minute it is made: base from ``from_pretrained`` (eval mode), no mode call."""
    base_path = tmp_path / "base"
    base(arch).save_pretrained(base_path)
    auto = AutoModelForSeq2SeqLM if arch == "tiny-t5" else AutoModelForCausalLM
    model = get_peft_model(auto.from_pretrained(base_path), config(method, arch))
    if made_by == "get_peft_model":
        return model
    model.save_pretrained(tmp_path / "adapter")
    return PeftModel.from_pretrained(auto.from_pretrained(base_path), tmp_path / "adapter")


def generated(model: torch.nn.Module, arch: str, *args: torch.Tensor, **kwargs) -> torch.Tensor:
    """peft's generate checks: keyword and positional inputs, greedy, scores returned."""
    batch = batch_for(arch)
    ids = batch["input_ids"]
    call = {"max_new_tokens": 3, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    if args == ("positional",):
        out = model.generate(ids, attention_mask=batch["attention_mask"], **call, **kwargs)
    else:
        out = model.generate(input_ids=ids, attention_mask=batch["attention_mask"], **call, **kwargs)
    return torch.stack(out.scores)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("made_by", ["get_peft_model", "from_pretrained"])
def test_a_fresh_model_runs_forward_and_generates_as_lora_does(method: str, arch: str, made_by: str, tmp_path: Path):
    model = fresh(method, arch, made_by, tmp_path)
    with torch.no_grad():
        out = model(**batch_for(arch))  # no labels: the input is the prompt (the base is in eval mode)
    assert out.logits.shape[0] == 3 and torch.isfinite(out.logits).all()
    if arch != "tiny-t5":  # peft's seq2seq generate takes keywords only
        assert torch.equal(generated(model, arch), generated(model, arch, "positional"))
    with model.disable_adapter():
        disabled = generated(model, arch)
    assert not torch.equal(disabled, generated(model, arch))  # the adapter is used outside the context
    model.to(torch.bfloat16)
    assert torch.isfinite(generated(model, arch)).all()  # half precision (peft's _test_generate_half_prec)


@pytest.mark.parametrize("method", METHODS)
def test_generate_routes_from_its_prompt_in_train_mode_as_in_eval_mode(method: str, arch: str) -> None:
    model = make_peft(arch) if method == "orchmoe" else get_peft_model(base(arch), config(method, arch))
    orchmoe_model = method == "orchmoe"
    if orchmoe_model:
        model.train()
        model(**labelled(arch))  # running statistics off their start, so that train-mode statistics would differ
    for module in model.modules():  # dropout off (modules and T5's attention): the modes may differ only by routing
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "dropout", None), float):
            module.dropout = 0.0
    model.eval()
    in_eval = generated(model, arch)
    model.train()
    with torch.no_grad():
        assert torch.equal(generated(model, arch), in_eval)  # no Gumbel noise, no batch statistics
        if orchmoe_model:  # while a training forward of the same batch routes with noise and batch statistics
            train_logits = model(**labelled(arch)).logits
    if orchmoe_model:
        model.eval()
        with torch.no_grad():
            assert not torch.equal(model(**labelled(arch)).logits, train_logits)

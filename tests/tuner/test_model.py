"""OrchMoE as a peft method on tiny Gemma-3-like and T5-like models."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import PeftType

import orchmoe
from orchmoe import OrchMoEConfig
from orchmoe.models import tiny_model
from tests.conftest import ARCHS, VOCAB, inputs, make_peft, prompt_labels, seq2seq_extra


def logits(model: torch.nn.Module, batch: dict, arch: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, **seq2seq_extra(arch, batch["input_ids"].shape[0])).logits


def test_registered_with_peft() -> None:
    assert PeftType("ORCHMOE") is orchmoe.OrchMoEConfig(target_modules=["q"]).peft_type
    model = make_peft("tiny-gemma3")
    assert isinstance(model, PeftModel)
    assert isinstance(model.base_model, orchmoe.OrchMoEModel)


def test_forward_backward_reaches_every_trainable_part(arch: str) -> None:
    model = make_peft(arch)
    model.train()
    batch = inputs()
    labels = prompt_labels(batch["input_ids"]) if arch == "tiny-gemma3" else seq2seq_extra(arch, 3)["decoder_input_ids"]
    out = model(**batch, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for part in ("orchmoe_A", "orchmoe_B", "orchmoe_skill_router", "orchmoe_task_router.default.proj.weight"):
        hit = [g for n, g in grads.items() if part in n]
        assert hit, part
        assert all(g is not None and g.abs().sum() > 0 for g in hit), part
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all("orchmoe_" not in n for n in frozen)


def test_routing_weights_are_distributions(arch: str) -> None:
    model = make_peft(arch, allocation="diagonal")
    model.eval()
    routing = orchmoe.routing(model, inputs(batch=5))
    w = routing.task_weights
    assert w.shape == (5, 3)
    assert (w >= 0).all() and torch.allclose(w.sum(-1), torch.ones(5))
    assert routing.skill_weights
    for alpha in routing.skill_weights.values():
        assert alpha.shape == (5, 4)
        # rows sum to 1, scaled by S = 4
        assert (alpha >= 0).all() and torch.allclose(alpha.sum(-1), torch.full((5,), 4.0))


def test_eval_output_independent_of_batch_and_padding(arch: str) -> None:
    model = make_peft(arch)
    model.train()
    for seed in range(3):  # move the BatchNorm running statistics away from their init
        model(**inputs(batch=4, seed=seed), **seq2seq_extra(arch, 4), routing_mask=torch.ones(4, 9))
    model.eval()
    lengths = [6, 9, 4]
    rows = [inputs(batch=1, length=n, seed=10 + i) for i, n in enumerate(lengths)]
    alone = [logits(model, row, arch)[0] for row in rows]
    width = max(lengths)
    for side in ("right", "left"):
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            n = lengths[i]
            sl = slice(0, n) if side == "right" else slice(width - n, width)
            ids[i, sl], mask[i, sl] = row["input_ids"][0], 1
        batch = {"input_ids": ids, "attention_mask": mask}
        w_batch = orchmoe.routing(model, batch).task_weights
        for i, row in enumerate(rows):
            assert torch.allclose(w_batch[i], orchmoe.routing(model, row).task_weights[0], atol=1e-6), (side, i)
        if arch == "tiny-gemma3":
            batch["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        out = logits(model, batch, arch)
        for i, n in enumerate(lengths):
            if arch == "tiny-t5":
                got = out[i]  # decoder positions: same decoder input for every row
            else:
                got = out[i, :n] if side == "right" else out[i, width - n :]
            assert torch.allclose(got, alone[i], atol=1e-5), (side, i)


def test_save_load_round_trip_is_exact(arch: str, tmp_path) -> None:
    model = make_peft(arch)
    model.train()
    model(**inputs(batch=4), **seq2seq_extra(arch, 4), routing_mask=torch.ones(4, 9))  # move the running statistics
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model(arch, vocab_size=VOCAB, seed=0), tmp_path).eval()
    batch = inputs(batch=3, seed=5)
    assert torch.equal(logits(model, batch, arch), logits(loaded, batch, arch))


def test_an_adapter_saved_before_the_allocation_option_loads_as_the_diagonal_it_is(tmp_path) -> None:
    """Versions with only the paper's allocation saved no ``allocation``; read as today's default (mixing), such an
    adapter would load with its allocation logits unused and every M_t = I: a silent wrong answer."""
    model = make_peft("tiny-gemma3", allocation="diagonal").eval()
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "allocation"}))
    loaded = PeftModel.from_pretrained(tiny_model("tiny-gemma3", vocab_size=VOCAB, seed=0), tmp_path).eval()
    assert loaded.peft_config["default"].allocation == "diagonal"
    batch = inputs(batch=3, seed=5)
    assert torch.equal(logits(model, batch, "tiny-gemma3"), logits(loaded, batch, "tiny-gemma3"))


def test_disabled_adapter_gives_base_output(arch: str) -> None:
    model = make_peft(arch).eval()
    base = tiny_model(arch, vocab_size=VOCAB, seed=0).eval()
    batch = inputs()
    with model.disable_adapter():
        disabled = logits(model, batch, arch)
    assert torch.equal(disabled, logits(base, batch, arch))
    assert not torch.allclose(logits(model, batch, arch), disabled)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_greedy_generate_with_cache_equals_without(arch: str, num_beams: int) -> None:
    model = make_peft(arch).eval()
    batch = inputs(batch=2, length=6)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "num_beams": num_beams, "pad_token_id": 0}
    with torch.no_grad():
        cached = model.generate(**batch, use_cache=True, **kwargs)
        uncached = model.generate(**batch, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_generate_routes_once_per_sequence_from_the_prompt() -> None:
    model = make_peft("tiny-gemma3").eval()
    router = orchmoe.get_tuner(model).task_router()
    calls = []
    handle = router.register_forward_hook(lambda m, a, out: calls.append(out.shape))
    try:
        with torch.no_grad():
            model.generate(**inputs(batch=2, length=5), max_new_tokens=7, do_sample=False, pad_token_id=0)
    finally:
        handle.remove()
    assert calls == [torch.Size([2, 3])]
    assert orchmoe.get_tuner(model).routing_slot.get() is None  # the model keeps no routing


def test_routing_mask_makes_training_routing_equal_generation_routing() -> None:
    model = make_peft("tiny-gemma3").eval()
    full = inputs(batch=2, length=10)
    prompt_len = 6
    routing_mask = torch.zeros_like(full["input_ids"])
    routing_mask[:, :prompt_len] = 1
    train_view = orchmoe.routing(model, {**full, "routing_mask": routing_mask}).task_weights
    prompt_only = {k: v[:, :prompt_len] for k, v in full.items()}
    assert torch.allclose(train_view, orchmoe.routing(model, prompt_only).task_weights, atol=1e-6)
    assert not torch.allclose(train_view, orchmoe.routing(model, full).task_weights)


def test_router_objective_is_added_to_the_loss_in_training() -> None:
    batch = inputs(batch=4)
    losses = {}
    for weight in (0.0, 0.5):
        model = make_peft("tiny-gemma3", router_mi_weight=weight).train()
        torch.manual_seed(0)
        losses[weight] = model(**batch, labels=prompt_labels(batch["input_ids"])).loss
    state = orchmoe.get_tuner(model).routing_state  # alive while the call's graph is
    assert state.mi_loss.requires_grad
    assert torch.allclose(losses[0.5], losses[0.0] + 0.5 * state.mi_loss)
    assert 0 <= state.entropy_per_example <= state.entropy_marginal + 1e-6


def test_gumbel_noise_only_in_training() -> None:
    model = make_peft("tiny-gemma3", allocation="diagonal")
    tuner = orchmoe.get_tuner(model)
    w = torch.full((2, 3), 1 / 3)  # two examples with the same abstract-task weights
    first, second = (tuner.skill_weights(w, stochastic=True) for _ in range(2))
    name = next(iter(first))
    assert not torch.allclose(first[name], second[name])
    assert torch.equal(first[name][0], first[name][1])  # one draw for the batch: both get the same noisy mix
    assert all(torch.allclose(a.sum(-1), torch.full((2,), 4.0)) for a in first.values())  # S = 4 skills
    det = [tuner.skill_weights(w, stochastic=False)[name] for _ in range(2)]
    assert torch.equal(det[0], det[1]) and torch.equal(det[0][0], det[0][1])


@pytest.mark.parametrize(("kind", "per_module"), [("diagonal", 3 * 4), ("mixing", 3 * (4 * 2) ** 2)])  # T S, T (S r)^2
def test_parameter_report_counts_skills_and_routers_separately(arch: str, kind: str, per_module: int) -> None:
    model = make_peft(arch, allocation=kind)
    counts = orchmoe.parameter_report(model)
    tuner = orchmoe.get_tuner(model)
    layers = list(tuner.orchmoe_layers())
    s, r, t = 4, 2, 3
    d = 32
    assert counts["skills"] == sum(s * r * (layer.in_features + layer.out_features) for _, layer in layers)
    assert counts["task_router"] == d * t + t
    assert counts["skill_router"] == len(layers) * per_module
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["trainable"] == trainable
    extra = 100 * (counts["task_router"] + counts["skill_router"]) / counts["skills"]
    assert f"(routers: +{extra:.2f}% over the skills)" in orchmoe.format_parameter_report(counts)


def test_explicit_task_weights_override_the_task_router() -> None:
    model = make_peft("tiny-gemma3").eval()
    batch = inputs(batch=2)
    one_hot = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    with torch.no_grad():
        a = model(**batch, task_weights=one_hot).logits
        b = model(**batch, task_weights=one_hot.flip(0)).logits
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="task_weights"):
        model(**batch, task_weights=torch.ones(2, 5))


@pytest.mark.parametrize(
    ("given", "prompt"),
    [
        ({"routing_mask": "explicit"}, [1, 1, 0, 0, 0, 0]),  # an explicit routing_mask wins
        ({"labels": [-100, -100, -100, 5, 6, -100]}, [1, 1, 1, 0, 0, 0]),  # before the first supervised label
        ({"labels": [-100, -100, 4, 5, 6, 7], "left_pad": 1}, [0, 1, 0, 0, 0, 0]),  # padding is never routed on
    ],
)
def test_training_routes_from_the_prompt_that_generation_sees(given: dict, prompt: list[int]) -> None:
    model = make_peft("tiny-gemma3").train()
    ids = inputs(batch=1, length=6)["input_ids"]
    mask = torch.ones(1, 6, dtype=torch.long)
    mask[:, : given.get("left_pad", 0)] = 0
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if "labels" in given:
        kwargs["labels"] = torch.tensor([given["labels"]])
    else:
        kwargs["routing_mask"] = torch.tensor([[1, 1, 0, 0, 0, 0]])
    output = model(**kwargs)  # its graph keeps the routing alive; a batch of one routes on running statistics
    routed = orchmoe.get_tuner(model).routing_state.task_weights
    expected = orchmoe.routing(model, {"input_ids": ids, "attention_mask": torch.tensor([prompt])}).task_weights
    assert torch.allclose(routed, expected, atol=1e-6)
    assert output.logits.requires_grad


@pytest.mark.parametrize(
    ("position_ids", "attention_mask"),
    [
        ([[0, 1, 2, 3, 4, 5]], None),
        ([[0, 1, 2, 3, 0, 0]], [[1, 1, 1, 1, 0, 0]]),  # right-padded, the padding at position 0 (TRL's collator)
        ([[0, 0, 0, 1, 2, 3]], [[0, 0, 1, 1, 1, 1]]),  # left-padded
    ],
)
def test_padded_position_ids_are_not_packed_rows(position_ids: list, attention_mask: list | None) -> None:
    model = make_peft("tiny-gemma3").train()
    ids = inputs(batch=1, length=6)["input_ids"]
    mask = torch.tensor(attention_mask) if attention_mask is not None else torch.ones_like(ids)
    labels = prompt_labels(ids).masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, position_ids=torch.tensor(position_ids), labels=labels)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "needs the prompt of each training sequence"),
        ({"labels": "all supervised"}, RuntimeError, "supervise its first token"),
        ({"labels": "prompt", "position_ids": [[0, 1, 2, 0, 1, 2]]}, RuntimeError, "packed rows"),
        (
            {"labels": "prompt", "position_ids": [[0, 1, 2, 0, 1, 2]], "attention_mask": [[1] * 6]},
            RuntimeError,
            "packed rows",
        ),  # a restart between attended tokens
    ],
)
def test_training_without_a_prompt_is_refused(kwargs: dict, error: type, match: str) -> None:
    model = make_peft("tiny-gemma3").train()
    ids = inputs(batch=1, length=6)["input_ids"]
    call = {"input_ids": ids}
    if kwargs.get("labels") == "all supervised":
        call["labels"] = ids
    elif kwargs.get("labels") == "prompt":
        call["labels"] = prompt_labels(ids)
    if "position_ids" in kwargs:
        call["position_ids"] = torch.tensor(kwargs["position_ids"])
    if "attention_mask" in kwargs:
        call["attention_mask"] = torch.tensor(kwargs["attention_mask"])
    with pytest.raises(error, match=match):
        model(**call)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # at eval the input is the prompt, as in generate


def at_start(arch: str, method: str) -> torch.nn.Module:
    """A model at its allocation's initialisation with random B (so that every output and gradient is non-trivial):
    the mixing matrices at I, Z at exactly 0 without noise (uniform), or a LoRA of rank S*r; the same A and B."""
    task_type, targets = ARCHS[arch]
    if method == "lora":
        config = LoraConfig(r=8, lora_alpha=8.0, target_modules=targets, task_type=task_type, init_lora_weights=False)
    else:
        config = OrchMoEConfig(n_abstract_tasks=3, n_skills=4, r=2, lora_alpha=8.0, target_modules=targets,
                               task_type=task_type, init_weights=False, allocation=method, noise_scale=0.0)  # fmt: skip
    torch.manual_seed(0)
    model = get_peft_model(tiny_model(arch, vocab_size=VOCAB, seed=0), config).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "skill_router.default.logits" in name:
                p.zero_()
            if "task_router" in name:
                p.normal_()  # prompts spread over the abstract tasks
    return model


def step(model: torch.nn.Module, arch: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Training logits and the gradients of A and B (keyed by module and side), from one training call."""
    batch = {**inputs(batch=4), **seq2seq_extra(arch, 4)}
    labels = batch["decoder_input_ids"] if arch == "tiny-t5" else prompt_labels(batch["input_ids"])
    torch.manual_seed(7)  # the same dropout for every model
    out = model(**batch, labels=labels)
    out.loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        for side in ("A", "B"):
            if f"orchmoe_{side}.default" in name or f"lora_{side}.default" in name:
                grads[(name.split(".orchmoe_")[0].split(".lora_")[0], side)] = p.grad
    return out.logits.detach(), grads


def test_at_initialisation_the_mixing_allocation_is_the_uniform_diagonal_and_a_lora(arch: str) -> None:
    mixing, diagonal, lora = (at_start(arch, m) for m in ("mixing", "diagonal", "lora"))
    with torch.no_grad():
        for name, p in mixing.named_parameters():
            for side in ("A", "B"):
                if f"orchmoe_{side}.default" in name:
                    diagonal.get_parameter(name).copy_(p)
                    lora.get_parameter(name.replace(f"orchmoe_{side}.default", f"lora_{side}.default.weight")).copy_(p)
    (got, got_grads), *others = (step(m, arch) for m in (mixing, diagonal, lora))
    assert got_grads and all(g.abs().sum() > 0 for g in got_grads.values())
    for expected, expected_grads in others:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        assert expected_grads.keys() == got_grads.keys()
        for key, grad in got_grads.items():
            torch.testing.assert_close(grad, expected_grads[key], atol=1e-5, rtol=1e-4, msg=str(key))
    # and at once each abstract task's matrix learns from its own examples' gradient
    matrices = [p for n, p in mixing.named_parameters() if "skill_router" in n]
    assert matrices and all(m.grad is not None and m.grad.abs().sum() > 0 for m in matrices)


@pytest.mark.parametrize("task", [0, 2])
def test_each_mixing_matrix_gets_the_gradient_of_its_own_abstract_task_only(task: int) -> None:
    model = make_peft("tiny-gemma3", allocation="mixing").train()
    batch = inputs(batch=4)
    hard = torch.nn.functional.one_hot(torch.full((4,), task), 3).float()
    model(**batch, labels=prompt_labels(batch["input_ids"]), task_weights=hard).loss.backward()
    for name, p in model.named_parameters():
        if "skill_router" in name:
            moved = p.grad.flatten(1).abs().sum(-1) > 0  # (T,)
            assert moved.tolist() == [t == task for t in range(3)], name

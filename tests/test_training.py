"""OrchMoE through Hugging Face's Trainer and TRL's SFTTrainer (orchmoe.training), and the examples that show how."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

import orchmoe
from orchmoe import OrchMoEConfig
from orchmoe.models import char_tokenizer, tiny_model
from orchmoe.training import RelaxationCallback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from _data import rows, tokenize  # noqa: E402

TOKENIZER = char_tokenizer()
COMMON = {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "save_strategy": "no",
          "report_to": [], "use_cpu": True, "logging_steps": 1}  # fmt: skip


def orchmoe_model(init_weights: bool = False, router_lr_multiplier: float = 1.0, **config: Any) -> torch.nn.Module:
    config = OrchMoEConfig(n_abstract_tasks=3, n_skills=4, r=2, target_modules=["q_proj", "v_proj"],
                           task_type="CAUSAL_LM", init_weights=init_weights,
                           router_lr_multiplier=router_lr_multiplier, **config)  # fmt: skip
    torch.manual_seed(0)
    return get_peft_model(tiny_model("tiny-gemma3", vocab_size=len(TOKENIZER), seed=0), config)


def tokenized(n: int = 12) -> list[dict[str, list[int]]]:
    return [tokenize(TOKENIZER, row) for row in rows(n)]


class RecordRoutingMasks:
    """The token masks the Task Router pooled over, call by call (a forward hook on the router)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.masks: list[torch.Tensor] = []
        orchmoe.get_tuner(model).task_router().register_forward_hook(self)

    def __call__(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.masks.append(args[1].detach().cpu())


def prompt_lengths(n: int) -> list[int]:
    return [len(TOKENIZER(row["prompt"], add_special_tokens=False)["input_ids"]) for row in rows(n)]


@pytest.mark.parametrize("trainer_cls", [Trainer, orchmoe.OrchMoETrainer])
def test_trainer_routes_training_from_the_prompt(tmp_path: Path, trainer_cls: type) -> None:
    """Trainer drops a routing_mask column it does not know; the prompt then comes from the masked labels."""
    model = orchmoe_model()
    record = RecordRoutingMasks(model)
    args = TrainingArguments(output_dir=str(tmp_path), **COMMON, gradient_checkpointing=True)
    collator = DataCollatorForSeq2Seq(TOKENIZER, label_pad_token_id=-100)
    trainer_cls(model=model, args=args, train_dataset=tokenized(), data_collator=collator).train()
    routed = sorted(int(n) for mask in record.masks for n in mask.sum(dim=1))  # the sampler shuffles
    assert routed == sorted(prompt_lengths(12))  # 3 steps of 4: each sequence routed on its prompt alone


def test_orchmoe_trainer_gives_routers_their_learning_rate_and_anneals(tmp_path: Path) -> None:
    model = orchmoe_model(router_lr_multiplier=4.0, allocation="diagonal")
    args = TrainingArguments(output_dir=str(tmp_path), **COMMON, weight_decay=0.1)
    collator = DataCollatorForSeq2Seq(TOKENIZER, label_pad_token_id=-100)
    trainer = orchmoe.OrchMoETrainer(model=model, args=args, train_dataset=tokenized(), data_collator=collator,
                                     temperature_end=4.0, noise_scale_end=0.0)  # fmt: skip
    trainer.train()
    groups = trainer.optimizer.param_groups
    routers = {id(p) for p in orchmoe.get_tuner(model).router_parameters()}
    router_groups = [g for g in groups if {id(p) for p in g["params"]} <= routers]
    assert len(router_groups) == 1 and {id(p) for p in router_groups[0]["params"]} == routers
    assert router_groups[0]["initial_lr"] == pytest.approx(1e-2 * 4.0)  # router_lr_multiplier
    assert router_groups[0]["weight_decay"] == 0.0
    assert any(g["weight_decay"] == 0.1 for g in groups)
    config = model.peft_config["default"]
    assert config.temperature == pytest.approx(4.0) and config.noise_scale == pytest.approx(0.0)


@pytest.mark.parametrize(("allocation", "refused"), [("diagonal", False), ("mixing", True)])
def test_a_relaxation_schedule_needs_an_allocation_that_relaxes(tmp_path: Path, allocation: str, refused: bool) -> None:
    model = orchmoe_model(allocation=allocation)
    args = TrainingArguments(output_dir=str(tmp_path), **COMMON)
    make = functools.partial(orchmoe.OrchMoETrainer, model=model, args=args, train_dataset=tokenized(),
                             data_collator=DataCollatorForSeq2Seq(TOKENIZER, label_pad_token_id=-100),
                             noise_scale_end=0.0)  # fmt: skip
    if refused:
        with pytest.raises(ValueError, match="allocation='diagonal'"):
            make()
    else:
        assert any(isinstance(c, RelaxationCallback) for c in make().callback_handler.callbacks)


def lora_model() -> torch.nn.Module:
    from peft import LoraConfig

    torch.manual_seed(0)
    config = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=False)
    return get_peft_model(tiny_model("tiny-gemma3", vocab_size=len(TOKENIZER), seed=0), config)


def trained_with_head(tmp_path: Path, method: str, supervised_head: bool, accumulation: int, checkpointing: bool):
    """(losses logged per step, trained adapter parameters, rows the output head computed per call)."""
    model = orchmoe_model() if method == "orchmoe" else lora_model()
    rows_seen: list[int] = []
    head = model.get_output_embeddings()
    head.register_forward_hook(lambda _m, _args, out: rows_seen.append(out.flatten(0, -2).shape[0]))
    common = {**COMMON, "per_device_train_batch_size": 4 // accumulation}
    args = TrainingArguments(output_dir=str(tmp_path), **common, gradient_accumulation_steps=accumulation,
                             gradient_checkpointing=checkpointing)  # fmt: skip
    collator = DataCollatorForSeq2Seq(TOKENIZER, label_pad_token_id=-100)
    trainer = orchmoe.OrchMoETrainer(model=model, args=args, train_dataset=tokenized(), data_collator=collator,
                                     supervised_head=supervised_head)  # fmt: skip
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses, params, rows_seen


@pytest.mark.parametrize(
    ("method", "accumulation", "checkpointing"),
    [("orchmoe", 1, False), ("orchmoe", 2, True), ("lora", 1, False), ("lora", 2, False)],
)
def test_orchmoe_trainer_head_on_supervised_positions_trains_as_full_logits(
    tmp_path: Path, method: str, accumulation: int, checkpointing: bool
) -> None:
    """OrchMoETrainer's training loss with the head on the supervised positions only: the same losses and the same
    trained parameters as with the full logits (supervised_head=False, Trainer's own compute_loss), for OrchMoE and
    for a LoRA control, with gradient accumulation; the head saw the supervised positions only."""
    full = trained_with_head(tmp_path / "full", method, False, accumulation, checkpointing)
    fast = trained_with_head(tmp_path / "fast", method, True, accumulation, checkpointing)
    assert len(fast[0]) == 3
    assert fast[0] == pytest.approx(full[0], rel=1e-4)
    for name, value in full[1].items():
        torch.testing.assert_close(fast[1][name], value, rtol=1e-4, atol=1e-5, msg=name)
    answers = [len(TOKENIZER(r["completion"], add_special_tokens=False)["input_ids"]) + 1 for r in rows(12)]
    assert sum(fast[2]) == sum(answers)  # each supervised token once (its answer and EOS), nothing of the prompt
    assert sum(full[2]) > 2 * sum(fast[2])


class StepRecord(TrainerCallback):
    """The micro-batches the trainer's loss received and the gradients before the optimizer step."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.batches: list[dict[str, torch.Tensor]] = []
        self.grads: dict[str, torch.Tensor] = {}
        self.model = model

    def on_pre_optimizer_step(self, *_: object, **__: object) -> None:
        self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}


class RecordingTrainer(orchmoe.OrchMoETrainer):
    def compute_loss(self, model, inputs, *args, **kwargs):
        self.record.batches.append({k: v.clone() for k, v in inputs.items()})
        return super().compute_loss(model, inputs, *args, **kwargs)


def one_step(tmp_path: Path, model: torch.nn.Module, batch: int, accumulation: int) -> StepRecord:
    record = StepRecord(model)
    common = {**COMMON, "max_steps": 1, "per_device_train_batch_size": batch}
    args = TrainingArguments(output_dir=str(tmp_path), **common, gradient_accumulation_steps=accumulation,
                             max_grad_norm=0.0)  # fmt: skip
    collator = DataCollatorForSeq2Seq(TOKENIZER, label_pad_token_id=-100)
    trainer = RecordingTrainer(model=model, args=args, train_dataset=tokenized(), data_collator=collator,
                               callbacks=[record])  # fmt: skip
    trainer.record = record
    trainer.train()
    return record


def replayed(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The gradients of one optimizer step over ``batches`` by hand: the language-model loss summed over every
    supervised token of the step over their count, plus each micro-batch's router objective over the count of
    micro-batches (what a step's loss is under gradient accumulation)."""
    model.train()
    tuner = orchmoe.get_tuner(model)
    tuner.add_router_loss_to_output = False
    tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    for b in batches:
        out = model(**b)
        n = int((b["labels"][:, 1:] != -100).sum())
        (out.loss * n / tokens + tuner.router_aux_loss() / len(batches)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["orchmoe", "lora"])
def test_gradient_accumulation_adds_the_router_objective_once_per_micro_batch_scaled_as_the_loss(
    tmp_path: Path, method: str
) -> None:
    """OrchMoETrainer, gradient accumulation 2: the step's gradients are the language-model loss over all the step's
    tokens plus each micro-batch's router objective / 2 (replayed by hand on the micro-batches it ran). LoRA, which
    has no batch statistics, equals one batch of twice the size; OrchMoE's Task Router centres over its micro-batch
    (as BatchNorm does) and the router objective's marginal is a micro-batch's, so there the unit is the micro-batch."""
    make = (lambda: orchmoe_model(noise_scale=0.0)) if method == "orchmoe" else lora_model
    accumulated = one_step(tmp_path / "ga2", make(), batch=2, accumulation=2)
    assert len(accumulated.batches) == 2
    if method == "lora":
        whole = one_step(tmp_path / "ga1", make(), batch=4, accumulation=1)
        expected = whole.grads
    else:
        expected = replayed(make(), accumulated.batches)
    assert expected.keys() == accumulated.grads.keys() and expected
    for name, grad in expected.items():
        torch.testing.assert_close(accumulated.grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def sft_dataset(n: int = 12) -> Dataset:
    return Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows(n)])


@pytest.mark.parametrize(("trainer_cls", "router_moves"), [(SFTTrainer, False), ("OrchMoESFTTrainer", True)])
def test_sft_trainer_routes_on_prompts_and_keeps_the_router_loss(tmp_path, trainer_cls, router_moves) -> None:
    """With every skill's B at zero, the language-model loss gives the Task Router no gradient in the first step:
    only the router objective moves it. TRL computes its own loss, so plain SFTTrainer drops that objective;
    OrchMoESFTTrainer adds it."""
    trainer_cls = getattr(orchmoe, trainer_cls) if isinstance(trainer_cls, str) else trainer_cls
    model = orchmoe_model(init_weights=True)
    record = RecordRoutingMasks(model)
    before = orchmoe.get_tuner(model).task_router().proj.weight.detach().clone()
    one_step = {**COMMON, "max_steps": 1}
    args = SFTConfig(output_dir=str(tmp_path), **one_step)  # TRL's defaults: gradient checkpointing, completion-only
    assert args.gradient_checkpointing and not args.packing
    trainer = trainer_cls(model=model, args=args, train_dataset=sft_dataset(), processing_class=TOKENIZER)
    trainer.train()
    moved = not torch.equal(orchmoe.get_tuner(model).task_router().proj.weight, before)
    assert moved == router_moves
    # TRL shuffles: compare the multiset of routed lengths with the prompts' (each routed on its prompt alone)
    routed = sorted(int(n) for mask in record.masks for n in mask.sum(dim=1))
    assert len(routed) == 4 and set(routed) <= set(prompt_lengths(12))


class RecordRoutes:
    """Every call's routing: tokens routed per sequence, whether as at inference (``deterministic``), with autograd."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: list[tuple[list[int], bool, bool]] = []
        router = orchmoe.get_tuner(model).task_router()
        router.register_forward_hook(self, with_kwargs=True)

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        routed = [int(n) for n in args[1].sum(dim=1)]
        self.calls.append((routed, bool(kwargs.get("deterministic", False)), torch.is_grad_enabled()))


def adapter_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}


RL_COMMON = {**COMMON, "max_steps": 2}
TRL_CASES = [("plain", "orchmoe"), ("OrchMoE", "orchmoe"), ("plain", "lora")]  # a LoRA control: the setup trains


def prompts_by_length(n: int) -> list[int]:
    return sorted(prompt_lengths(n))


@pytest.mark.parametrize(("trainer", "method"), TRL_CASES)
def test_dpo_routes_chosen_and_rejected_from_their_prompt(tmp_path: Path, trainer: str, method: str) -> None:
    """TRL's DPOTrainer scores chosen and rejected completions of a prompt in one batch: each of the 2B sequences
    is routed from its prompt alone, in training (with autograd); OrchMoEDPOTrainer adds the router objective, so
    the Task Router moves in the first step although every skill's B is zero (plain DPO drops it)."""
    model = orchmoe_model(init_weights=True) if method == "orchmoe" else lora_model()
    dataset = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["completion"], "rejected": " 0"} for r in rows(8)])
    cls = orchmoe.OrchMoEDPOTrainer if trainer == "OrchMoE" else DPOTrainer
    dpo = cls(model=model, args=DPOConfig(output_dir=str(tmp_path), **{**RL_COMMON, "max_steps": 1}),
              train_dataset=dataset, processing_class=TOKENIZER)  # fmt: skip
    before = adapter_params(dpo.model)
    record = RecordRoutes(dpo.model) if method == "orchmoe" else None
    dpo.train()
    moved = changed(before, dpo.model)
    if record is None:
        assert moved  # the LoRA control trains: the setup is sound
        return
    assert record.calls and all(grad and not deterministic for _, deterministic, grad in record.calls)
    (routed, _, _), *rest = record.calls
    assert not rest and len(routed) == 8  # one training forward: 4 chosen, then the same 4 prompts' rejected
    assert routed[:4] == routed[4:] and set(routed) <= set(prompt_lengths(8))  # each routed from its prompt
    router_moved = any("orchmoe_task_router" in n for n in moved)
    assert router_moved == (trainer == "OrchMoE")


@pytest.mark.parametrize(("trainer", "method"), TRL_CASES)
def test_grpo_samples_and_trains_routed_from_the_prompt(tmp_path: Path, trainer: str, method: str) -> None:
    """TRL's GRPOTrainer samples with generate in train mode (routed from the left-padded prompt, as at inference:
    no Gumbel noise, running statistics) and trains on prompt + completion (routed from the same prompt, with
    autograd)."""
    model = orchmoe_model() if method == "orchmoe" else lora_model()
    dataset = Dataset.from_list([{"prompt": r["prompt"]} for r in rows(8)])
    args = GRPOConfig(output_dir=str(tmp_path), **RL_COMMON, num_generations=2, max_completion_length=4)
    cls = orchmoe.OrchMoEGRPOTrainer if trainer == "OrchMoE" else GRPOTrainer
    grpo = cls(model=model, reward_funcs=lambda completions, **_: [float(len(set(c))) for c in completions],
               args=args, train_dataset=dataset, processing_class=TOKENIZER)  # fmt: skip
    before = adapter_params(grpo.model)
    record = RecordRoutes(grpo.model) if method == "orchmoe" else None
    grpo.train()
    if record is None:
        assert changed(before, grpo.model)
        return
    sampled = [lengths for lengths, deterministic, grad in record.calls if deterministic and not grad]
    trained = [lengths for lengths, deterministic, grad in record.calls if grad and not deterministic]
    assert len(sampled) == 2 and len(trained) == 2 and len(record.calls) == 4
    assert all(set(lengths) <= set(prompt_lengths(8)) for lengths in sampled + trained)
    flat = [sorted(n for lengths in calls for n in lengths) for calls in (sampled, trained)]
    assert flat[0] == flat[1]  # trained from the prompts it sampled from
    if trainer == "OrchMoE":
        groups = grpo.optimizer.param_groups
        assert any({id(p) for p in g["params"]} == set(map(id, orchmoe.get_tuner(model).router_parameters()))
                   for g in groups)  # fmt: skip


def smoothed_or_custom(kind: str) -> dict:
    if kind == "label_smoothing":
        return {"args": {"label_smoothing_factor": 0.1}}

    def loss_func(outputs, labels, num_items_in_batch=None):  # a user's own loss from the full logits
        logits = outputs.logits[:, :-1].flatten(0, 1)
        return torch.nn.functional.cross_entropy(logits, labels[:, 1:].flatten(), ignore_index=-100)

    return {"trainer": {"compute_loss_func": loss_func}}


@pytest.mark.parametrize("kind", ["compute_loss_func", "label_smoothing"])
@pytest.mark.parametrize(("trainer", "method"), TRL_CASES)
def test_sft_losses_from_logits_route_from_the_prompt(tmp_path: Path, kind: str, trainer: str, method: str) -> None:
    """SFTTrainer with compute_loss_func or label smoothing calls the model without labels: OrchMoESFTTrainer routes
    it from the prompt (derived from the labels first); plain SFTTrainer is refused with a message naming it."""
    model = orchmoe_model() if method == "orchmoe" else lora_model()
    extra = smoothed_or_custom(kind)
    args = SFTConfig(output_dir=str(tmp_path), **{**COMMON, "max_steps": 1}, **extra.get("args", {}))
    cls = orchmoe.OrchMoESFTTrainer if trainer == "OrchMoE" else SFTTrainer
    sft = cls(model=model, args=args, train_dataset=sft_dataset(), processing_class=TOKENIZER,
              **extra.get("trainer", {}))  # fmt: skip
    before = adapter_params(model)
    if method == "lora":
        sft.train()
        assert changed(before, model)
        return
    record = RecordRoutes(model)
    if trainer == "plain":
        with pytest.raises(ValueError, match="OrchMoESFTTrainer"):
            sft.train()
        return
    sft.train()
    trained = [lengths for lengths, _, grad in record.calls if grad]
    assert len(trained) == 1 and set(trained[0]) <= set(prompt_lengths(12)) and changed(before, model)


def test_sft_packing_is_refused(tmp_path: Path) -> None:
    args = SFTConfig(output_dir=str(tmp_path), **COMMON, packing=True)
    with pytest.raises(ValueError, match="packing=False"):
        orchmoe.OrchMoESFTTrainer(model=orchmoe_model(), args=args, train_dataset=sft_dataset(),
                                  processing_class=TOKENIZER)  # fmt: skip


EXAMPLES = [
    ["examples/trainer.py"],
    ["examples/trainer.py", "--bf16", "--gradient-checkpointing"],
    ["examples/trl_sft.py"],
    ["examples/dpo.py"],
    ["examples/grpo.py"],
    ["examples/qlora.py"],
]


@pytest.mark.parametrize("command", EXAMPLES, ids=" ".join)
def test_example_runs(tmp_path: Path, command: list[str]) -> None:
    result = subprocess.run([sys.executable, *command, "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "final loss" in result.stdout and (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_trainer_example_under_torchrun_with_two_processes(tmp_path: Path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(torchrun), "--nproc_per_node", "2", "examples/trainer.py", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("final loss") == 1  # printed by the main process only

"""Tokenize examples once (with explicit, counted truncation) and collate them into batches.

Decoder-only layout, one row per example (prompts left-padded, targets right-padded)::

    input_ids      [pad pad p1 p2 p3 | t1 t2 eos pad]
    attention_mask [ 0   0  1  1  1  |  1  1  1   0 ]
    routing_mask   [ 0   0  1  1  1  |  0  0  0   0 ]      route from the prompt only, as generation does
    labels         [-100 ...      -100 | t1 t2 eos -100]   loss on the target only

Every prompt ends at the same column, so the target tokens of the whole batch sit in the last ``target_width``
columns; the loss computes the output head at the supervised positions only (``orchmoe.head``), never the prompt's.
Encoder-decoder models get right-padded prompts as encoder input and the targets as labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from .sni import Example

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    example: Example
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]


@dataclass
class TruncationReport:
    total: int = 0
    prompts_truncated: int = 0
    targets_truncated: int = 0
    by_task: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "examples": self.total,
            "prompts_truncated": self.prompts_truncated,
            "targets_truncated": self.targets_truncated,
            "truncated_by_task": dict(sorted(self.by_task.items())),
        }


def _truncate_prompt(ids: list[int], limit: int) -> list[int]:
    """Keep the head (definition) and the tail (end of the input and 'Output:') of an over-long prompt."""
    tail = min(32, limit // 4)
    return ids[: limit - tail] + ids[len(ids) - tail :]


def encode(
    examples: list[Example],
    tokenizer: PreTrainedTokenizerBase,
    max_input_tokens: int,
    max_target_tokens: int,
    chat_template: bool = False,
) -> tuple[list[Encoded], TruncationReport]:
    """Tokenize prompts (with BOS if the tokenizer adds one; with ``chat_template``, as the user turn of the
    tokenizer's chat template, ready for the assistant's answer) and targets (' ' + target, then EOS)."""
    if max_input_tokens < 8 or max_target_tokens < 1:
        raise ValueError("max_input_tokens must be >= 8 and max_target_tokens >= 1.")
    empty = [e for e in examples if not e.prompt.strip()]
    if empty:
        raise ValueError(f"Example {empty[0].id} of task {empty[0].task} has an empty prompt.")
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat-template: this model's tokenizer has no chat template.")
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": e.prompt}], tokenize=False,
                                          add_generation_prompt=True)
            for e in examples
        ]  # fmt: skip
        prompts = tokenizer(texts, add_special_tokens=False)["input_ids"]  # the template writes its own BOS
    else:
        prompts = tokenizer([e.prompt for e in examples], add_special_tokens=True)["input_ids"]
    targets = tokenizer([" " + e.target for e in examples], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    report = TruncationReport(total=len(examples))
    out = []
    for example, prompt, target in zip(examples, prompts, targets, strict=True):
        cut = False
        if len(prompt) > max_input_tokens:
            prompt, cut = _truncate_prompt(prompt, max_input_tokens), True
            report.prompts_truncated += 1
        target = [*target, eos] if eos is not None else list(target)
        if len(target) > max_target_tokens:
            target, cut = target[:max_target_tokens], True
            report.targets_truncated += 1
        if cut:
            report.by_task[example.task] = report.by_task.get(example.task, 0) + 1
        out.append(Encoded(example, tuple(prompt), tuple(target)))
    return out, report


@dataclass
class Collator:
    """Batches of :class:`Encoded` for training (``generation=False``) or prompts only for ``generate``."""

    pad_token_id: int
    is_encoder_decoder: bool
    generation: bool = False

    def __call__(self, rows: list[Encoded]) -> dict[str, Any]:
        batch = self._encoder_decoder(rows) if self.is_encoder_decoder else self._decoder_only(rows)
        batch["task"] = [r.example.task for r in rows]  # analysis only: never fed to the model
        batch["index"] = [r.example.id for r in rows]
        return batch

    def _decoder_only(self, rows: list[Encoded]) -> dict[str, Any]:
        width_p = max(len(r.prompt_ids) for r in rows)
        width_t = 0 if self.generation else max(len(r.target_ids) for r in rows)
        n = len(rows)
        ids = torch.full((n, width_p + width_t), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        routing = torch.zeros_like(ids)
        labels = torch.full_like(ids, IGNORE_INDEX)
        for i, r in enumerate(rows):
            p, t = len(r.prompt_ids), len(r.target_ids)
            ids[i, width_p - p : width_p] = torch.tensor(r.prompt_ids)
            attention[i, width_p - p : width_p] = 1
            routing[i, width_p - p : width_p] = 1
            if not self.generation:
                ids[i, width_p : width_p + t] = torch.tensor(r.target_ids)
                attention[i, width_p : width_p + t] = 1
                labels[i, width_p : width_p + t] = torch.tensor(r.target_ids)
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": attention}
        if not self.generation:  # generate() derives the same positions from the attention mask
            position_ids = (attention.cumsum(-1) - 1).clamp(min=0)  # left padding does not shift positions
            batch.update(position_ids=position_ids, routing_mask=routing, labels=labels, target_width=width_t)
        return batch

    def _encoder_decoder(self, rows: list[Encoded]) -> dict[str, Any]:
        width_p = max(len(r.prompt_ids) for r in rows)
        n = len(rows)
        ids = torch.full((n, width_p), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r.prompt_ids)] = torch.tensor(r.prompt_ids)
            attention[i, : len(r.prompt_ids)] = 1
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": attention}
        if not self.generation:
            width_t = max(len(r.target_ids) for r in rows)
            labels = torch.full((n, width_t), IGNORE_INDEX, dtype=torch.long)
            for i, r in enumerate(rows):
                labels[i, : len(r.target_ids)] = torch.tensor(r.target_ids)
            batch["labels"] = labels
        return batch

"""A small prompt/completion data set for the examples (arithmetic and string tasks), as a user's own data would be."""

from __future__ import annotations

import random

TASKS = {
    "add": lambda r: (f"Add: {(a := r.randint(1, 50))} + {(b := r.randint(1, 50))} =", f" {a + b}"),
    "upper": lambda r: (f"Upper case: {(w := ''.join(r.choices('abcdefgh', k=5)))} ->", f" {w.upper()}"),
    "reverse": lambda r: (f"Reverse: {(w := ''.join(r.choices('abcdefgh', k=5)))} ->", f" {w[::-1]}"),
}


def rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` rows of {"prompt", "completion", "task"}, tasks interleaved."""
    r = random.Random(seed)
    names = list(TASKS)
    return [
        dict(zip(("prompt", "completion"), TASKS[names[i % 3]](r), strict=True), task=names[i % 3]) for i in range(n)
    ]


def tokenize(tokenizer, row: dict[str, str]) -> dict[str, list[int]]:
    """input_ids of prompt + completion + EOS, and labels with the prompt masked (-100): OrchMoE routes a training
    sequence from the tokens before its first label, exactly the prompt that generation will see."""
    prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    answer = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": prompt + answer, "attention_mask": [1] * (len(prompt) + len(answer)),
            "labels": [-100] * len(prompt) + answer}  # fmt: skip

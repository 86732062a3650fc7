"""Tokenization, truncation counts and the masks of both collators."""

from __future__ import annotations

import pytest
import torch

from orchmoe.data import IGNORE_INDEX, Collator, Example, encode
from orchmoe.models import char_tokenizer


def examples() -> list[Example]:
    return [
        Example("add", "a1", "Definition: Add.\n\nInput: 1 + 2\nOutput:", "3", ("3",)),
        Example("rev", "r1", "Definition: Reverse.\n\nInput: abc\nOutput:", "cba", ("cba",)),
    ]


@pytest.fixture
def tokenizer():
    return char_tokenizer()


def test_encode_appends_space_and_eos_and_counts_truncation(tokenizer) -> None:
    enc, report = encode(examples(), tokenizer, max_input_tokens=64, max_target_tokens=8)
    assert tokenizer.decode(enc[1].target_ids) == " cba" + tokenizer.eos_token
    assert report.prompts_truncated == 0 and report.targets_truncated == 0
    enc, report = encode(examples(), tokenizer, max_input_tokens=32, max_target_tokens=3)
    assert all(len(e.prompt_ids) == 32 for e in enc)
    assert tokenizer.decode(enc[0].prompt_ids).endswith("Output:")  # the tail is kept
    assert tokenizer.decode(enc[0].prompt_ids).startswith("Definition")  # and the head
    assert report.as_dict() == {
        "examples": 2,
        "prompts_truncated": 2,
        "targets_truncated": 1,
        "truncated_by_task": {"add": 1, "rev": 1},
    }


def test_encode_rejects_empty_prompts(tokenizer) -> None:
    with pytest.raises(ValueError, match="empty prompt"):
        encode([Example("t", "x", "  ", "y", ("y",))], tokenizer, 64, 8)


def test_decoder_only_masks(tokenizer) -> None:
    enc, _ = encode(examples(), tokenizer, 64, 8)
    batch = Collator(tokenizer.pad_token_id, is_encoder_decoder=False)(enc)
    ids, attn, route, labels = batch["input_ids"], batch["attention_mask"], batch["routing_mask"], batch["labels"]
    width_t = batch["target_width"]
    assert width_t == max(len(e.target_ids) for e in enc)
    for i, e in enumerate(enc):
        p, t = len(e.prompt_ids), len(e.target_ids)
        prompt_cols = ids.shape[1] - width_t
        assert ids[i, prompt_cols - p : prompt_cols].tolist() == list(e.prompt_ids)
        assert route[i].sum() == p and route[i, prompt_cols - p : prompt_cols].all()  # routing: prompt only
        assert (labels[i] != IGNORE_INDEX).sum() == t  # loss: target only
        assert labels[i, prompt_cols : prompt_cols + t].tolist() == list(e.target_ids)
        assert attn[i].sum() == p + t  # padding excluded
        assert (ids[i][attn[i] == 0] == tokenizer.pad_token_id).all()
        assert batch["position_ids"][i, prompt_cols - p] == 0
    assert batch["task"] == ["add", "rev"]
    gen = Collator(tokenizer.pad_token_id, is_encoder_decoder=False, generation=True)(enc)
    assert set(gen) == {"input_ids", "attention_mask", "task", "index"}
    assert gen["attention_mask"][:, -1].all()  # left-padded: every prompt ends at the last column


def test_encoder_decoder_masks(tokenizer) -> None:
    enc, _ = encode(examples(), tokenizer, 64, 8)
    batch = Collator(tokenizer.pad_token_id, is_encoder_decoder=True)(enc)
    for i, e in enumerate(enc):
        assert batch["attention_mask"][i].sum() == len(e.prompt_ids)
        assert batch["input_ids"][i, : len(e.prompt_ids)].tolist() == list(e.prompt_ids)
        assert batch["labels"][i][batch["labels"][i] != IGNORE_INDEX].tolist() == list(e.target_ids)
    assert "routing_mask" not in batch  # the encoder input is the prompt: the attention mask routes
    assert torch.equal(batch["input_ids"][:, 0], torch.tensor([e.prompt_ids[0] for e in enc]))

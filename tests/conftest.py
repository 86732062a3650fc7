"""Shared fixtures: tiny models built in-process from configs (no download); an empty results tree for the at-scale
benchmark."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

import orchmoe
from orchmoe import OrchMoEConfig
from orchmoe.models import tiny_model

VOCAB = 128
ARCHS = {
    # name -> (peft task type, target modules)
    "tiny-gemma3": ("CAUSAL_LM", ["q_proj", "v_proj"]),
    "tiny-t5": ("SEQ_2_SEQ_LM", ["q", "v"]),
}


# OrchMoEConfig options every test's OrchMoE model takes unless it names them; the `allocation` fixture runs a module's
# tests once per allocation (``pytestmark = pytest.mark.usefixtures("allocation")``)
DEFAULTS: dict[str, object] = {}


@pytest.fixture(params=["diagonal", "mixing"])
def allocation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(DEFAULTS, "allocation", request.param)
    return request.param


def make_peft(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny model of ``arch`` with OrchMoE injected; ``init_weights=False`` so skills are not a no-op; the router
    parameters (the allocation's included) drawn from N(0, 1) so that routing differs between examples."""
    task_type, targets = ARCHS[arch]
    kwargs = {"n_abstract_tasks": 3, "n_skills": 4, "r": 2, "target_modules": targets, "task_type": task_type}
    kwargs.update(DEFAULTS)
    kwargs["init_weights"] = False
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = get_peft_model(tiny_model(arch, vocab_size=VOCAB, seed=seed), OrchMoEConfig(**kwargs))
    torch.manual_seed(seed + 1)
    # give the task router a spread so that routing differs between examples
    for p in orchmoe.get_tuner(model).router_parameters():
        torch.nn.init.normal_(p, std=1.0)
    return model


def inputs(batch: int = 3, length: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def prompt_labels(input_ids: torch.Tensor, prompt: int = 3) -> torch.Tensor:
    """Causal-LM labels with the first ``prompt`` tokens masked (-100), as a completion-only collator makes them:
    OrchMoE routes a training sequence from the tokens before its first label."""
    labels = input_ids.clone()
    labels[:, :prompt] = -100
    return labels


def seq2seq_extra(arch: str, batch: int, length: int = 5) -> dict[str, torch.Tensor]:
    if arch != "tiny-t5":
        return {}
    g = torch.Generator().manual_seed(99)
    row = torch.randint(4, VOCAB, (1, length), generator=g)
    return {"decoder_input_ids": row.repeat(batch, 1)}  # the same decoder input for every example


@pytest.fixture(params=sorted(ARCHS))
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def peft_factory() -> Callable[..., torch.nn.Module]:
    return make_peft


@pytest.fixture
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty results tree in place of ``benchmarks/results/sni-full`` (``at_scale_store.RESULTS``); fill it with
    ``tests.at_scale_results.finish`` and ``scored``."""
    from tests.at_scale_results import at_scale_store

    monkeypatch.setattr(at_scale_store, "RESULTS", tmp_path)
    return tmp_path

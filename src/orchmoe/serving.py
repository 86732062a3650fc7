"""Serve OrchMoE with standard multi-LoRA inference: one LoRA per abstract task, routed by the Task Router alone.

For a fixed routing, OrchMoE's update is exactly a LoRA of rank S*r (``orchmoe.export_lora``). With hard routing (each
prompt to its most likely abstract task) a model is therefore T plain LoRA adapters plus a router:

    export_abstract_tasks(model, "served")     # served/abstract-task-<t>/ (peft LoRA), served/router.safetensors
    router = PromptRouter.from_pretrained("served")
    names = router.adapter_names(input_ids, attention_mask, base.get_input_embeddings())
    lora_model.generate(input_ids=..., attention_mask=..., adapter_names=names)   # peft's mixed-adapter batch

The router reads the prompt's input embeddings only: no layer of the model runs to route. The adapter directories
load in plain peft and transformers, without ``import orchmoe``; the router file is the Task Router's state dict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .export import export_lora
from .tuner.access import get_tuner
from .tuner.config import OrchMoEConfig
from .tuner.router import TaskRouter

ROUTER_FILE, ROUTER_CONFIG = "router.safetensors", "router.json"


def adapter_name(task: int) -> str:
    return f"abstract-task-{task}"


def export_abstract_tasks(model: nn.Module, out: str | Path) -> Path:
    """Write each of the T abstract tasks as a named LoRA adapter (``out/abstract-task-<t>``) and the Task Router
    (``out/router.safetensors`` and ``router.json``)."""
    out = Path(out)
    tuner = get_tuner(model)
    n_tasks = tuner.peft_config[tuner._adapter].n_abstract_tasks
    for task in range(n_tasks):
        export_lora(model, F.one_hot(torch.tensor([task]), n_tasks).float(), out / adapter_name(task))
    router = tuner.task_router()
    save_file({k: v.detach().contiguous() for k, v in router.state_dict().items()}, out / ROUTER_FILE)
    embeddings = tuner.model.get_input_embeddings()
    scale = getattr(embeddings, "embed_scale", 1.0)
    config = {"n_abstract_tasks": n_tasks, "embed_dim": router.embed_dim, "embed_scale": float(scale),
              "adapters": [adapter_name(t) for t in range(n_tasks)]}  # fmt: skip
    (out / ROUTER_CONFIG).write_text(json.dumps(config, indent=1))
    return out


class PromptRouter(nn.Module):
    """The Task Router on its own, as OrchMoE routes at eval: the raw embedding-table rows of the prompt, scaled as
    the model's embedding module scales them, to abstract-task weights (B, T)."""

    def __init__(self, router: TaskRouter, config: dict) -> None:
        super().__init__()
        self.router = router.eval()
        self.config = config

    @classmethod
    def from_pretrained(cls, path: str | Path) -> PromptRouter:
        path = Path(path)
        config = json.loads((path / ROUTER_CONFIG).read_text())
        router = TaskRouter(config["embed_dim"], OrchMoEConfig(n_abstract_tasks=config["n_abstract_tasks"]))
        router.load_state_dict(load_file(path / ROUTER_FILE))
        return cls(router, config)

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L, d) raw token embeddings (the table's rows), (B, L) prompt mask -> (B, T) abstract-task weights."""
        return self.router(embeds.float() * self.config["embed_scale"], mask, deterministic=True)  # (B, T)

    @torch.no_grad()
    def adapter_names(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, table: nn.Embedding) -> list[str]:
        """Each prompt's adapter: its most likely abstract task. ``table``: the base model's input embeddings."""
        weight = self.router.proj.weight
        embeds = F.embedding(input_ids.to(weight.device), table.weight.to(weight.device))  # (B, L, d), unscaled
        tasks = self(embeds, attention_mask.to(weight.device)).argmax(dim=-1).tolist()
        return [self.config["adapters"][t] for t in tasks]


def load_served(base: nn.Module, path: str | Path) -> nn.Module:
    """``base`` with every abstract task's LoRA adapter of ``path`` loaded (plain peft)."""
    from peft import PeftModel

    path = Path(path)
    names = json.loads((path / ROUTER_CONFIG).read_text())["adapters"]
    model = PeftModel.from_pretrained(base, path / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(path / name, adapter_name=name)
    return model.eval()


@torch.no_grad()
def generate_served(path: str | Path, base: nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int = 32):
    """Route ``prompts`` with the served router and generate them in one mixed batch of the served adapters:
    [(adapter name, completion)] in prompt order."""
    router = PromptRouter.from_pretrained(path)
    model = load_served(base, path)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left" if not base.config.is_encoder_decoder else side  # decoder-only: pad on the left
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    names = router.adapter_names(batch["input_ids"], batch["attention_mask"], base.get_input_embeddings())
    out = model.generate(**batch, adapter_names=names, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    new = out if base.config.is_encoder_decoder else out[:, batch["input_ids"].shape[1] :]
    return list(zip(names, tokenizer.batch_decode(new, skip_special_tokens=True), strict=True))

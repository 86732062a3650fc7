"""Export one OrchMoE routing as a standard PEFT LoRA adapter.

For a fixed routing, every adapted module computes scaling * B_cat op(w) A_cat x, with op(w) = diag(repeat(alpha, r))
for the paper's diagonal allocation (alpha = S w z) and sum_t w_t M_t for the mixing one: exactly a LoRA of rank S*r
with

    lora_A = op(w) A_cat                     # (S*r, in)
    lora_B = B_cat                           # (out, S*r)
    lora_alpha / (S*r) = OrchMoE's scaling

so vLLM / S-LoRA / LoRAX can serve it and ``merge_and_unload`` can merge it. The routing comes from one abstract task
(one-hot task weights), one prompt, or the average task weights of one task's test prompts (op is linear in w).
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import save_file

from .tuner import OrchMoEConfig
from .tuner.access import get_tuner


def lora_from_routing(model: PeftModel, task_weights: torch.Tensor) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """(LoraConfig, {module name: (lora_A, lora_B)}) equal to ``model`` routed by ``task_weights`` (1, T)."""
    tuner = get_tuner(model)
    adapter = tuner._adapter
    config: OrchMoEConfig = tuner.peft_config[adapter]
    ops = tuner.skill_weights(task_weights.float(), stochastic=False)  # module -> (1, S) or (1, S*r, S*r)
    weights = {}
    with torch.no_grad():
        for name, layer in tuner.orchmoe_layers():
            a, b = layer.orchmoe_A[adapter], layer.orchmoe_B[adapter]
            op = layer.layer_weights(adapter, ops[name]).to(a.dtype)  # (1, S*r) or (1, S*r, S*r)
            routed = layer.orchmoe_skill_router[adapter].apply(a.T[None], op)[0].T  # op A_cat: (S*r, in)
            weights[name] = routed.contiguous().clone(), b.detach().clone()  # (S*r, in), (out, S*r)
    lora = LoraConfig(
        r=config.n_skills * config.r,
        lora_alpha=config.lora_alpha,
        target_modules=sorted(weights),
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
    )
    return lora, weights


def export_lora(model: PeftModel, task_weights: torch.Tensor, out: str | Path) -> Path:
    """Write ``model`` (OrchMoE) routed by ``task_weights`` (1, T) as a standard peft LoRA adapter directory.

    The model is left as it is; the directory loads with plain peft (``PeftModel.from_pretrained``) and merges with
    ``merge_and_unload``.
    """
    lora, weights = lora_from_routing(model, task_weights)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lora.save_pretrained(out)
    tensors = {}
    for name, (a, b) in weights.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
    save_file(tensors, out / "adapter_model.safetensors")
    return out

"""Export one OrchMoE routing as a standard PEFT LoRA adapter.

For a fixed routing, every adapted module computes scaling * sum_j alpha_j B_j A_j x = scaling * B_cat diag(alpha
(x) 1_r) A_cat x: exactly a LoRA of rank S*r with

    lora_A = diag(repeat(alpha, r)) A_cat    # (S*r, in)
    lora_B = B_cat                           # (out, S*r)
    lora_alpha / (S*r) = OrchMoE's scaling

so vLLM / S-LoRA / LoRAX can serve it and ``merge_and_unload`` can merge it. The routing comes from one abstract task
(one-hot task weights), one prompt, or the average task weights of one task's test prompts (alpha is linear in w).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel

from ..models import load_model
from ..tuner import OrchMoEConfig
from ..tuner.access import get_tuner
from .common import CONFIG_FILE, make_selection
from .evaluate import load_trained
from .methods import method_of


def lora_from_routing(model: PeftModel, task_weights: torch.Tensor) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """(LoraConfig, {module name: (lora_A, lora_B)}) equal to ``model`` routed by ``task_weights`` (1, T)."""
    tuner = get_tuner(model)
    adapter = tuner._adapter
    config: OrchMoEConfig = tuner.peft_config[adapter]
    alphas = tuner.skill_weights(task_weights.float(), stochastic=False)  # module -> (1, S)
    weights = {}
    for name, layer in tuner.orchmoe_layers():
        a, b = layer.orchmoe_A[adapter], layer.orchmoe_B[adapter]
        diag = layer.layer_weights(adapter, alphas[name])[0].to(a.dtype)  # (S*r,)
        weights[name] = (diag[:, None] * a).detach().clone(), b.detach().clone()  # (S*r, in), (out, S*r)
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
    from safetensors.torch import save_file

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


def export_run(
    run: Path,
    out: Path,
    task: str | None = None,
    abstract_task: int | None = None,
    prompt: str | None = None,
    overwrite: bool = False,
    model_name: str | None = None,
    all_abstract_tasks: bool = False,
) -> Path:
    """Write one routing of the OrchMoE adapter in ``run`` as a plain LoRA adapter in ``out``.

    ``run`` is a directory of ``orchmoe train`` or any OrchMoE adapter directory (``save_pretrained``, Trainer and
    TRL outputs); for the latter the base model is ``model_name``, else the adapter config's
    ``base_model_name_or_path``. The routing: one abstract task, one prompt's, or (runs only) a task's average.
    """
    run, out = Path(run), Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it.")
    if (run / CONFIG_FILE).is_file() and (run / "adapter").is_dir():
        cfg, loaded, model = load_trained(run)
        if cfg.method != "orchmoe":
            raise ValueError(f"{run} was trained with --method {cfg.method}; only OrchMoE adapters can be exported.")
    else:
        cfg, (loaded, model) = None, load_adapter_dir(run, model_name)
    tuner = get_tuner(model)
    n_tasks = tuner.peft_config[tuner._adapter].n_abstract_tasks
    if out.exists():
        shutil.rmtree(out)
    if all_abstract_tasks:
        from ..serving import export_abstract_tasks

        return export_abstract_tasks(model, out)
    with torch.no_grad():
        if abstract_task is not None:
            if not 0 <= abstract_task < n_tasks:
                raise ValueError(f"--abstract-task must be in [0, {n_tasks - 1}], got {abstract_task}.")
            w = torch.nn.functional.one_hot(torch.tensor([abstract_task]), n_tasks).float()
        elif prompt is not None:
            enc = loaded.tokenizer([prompt], return_tensors="pt")
            w = tuner.routing(enc["input_ids"], enc["attention_mask"]).task_weights
        elif cfg is None:
            raise ValueError(f"--task needs a run directory of `orchmoe train` (its tasks); {run} is an adapter only.")
        else:
            w = task_routing(cfg, loaded, model, task)
    export_lora(model, w, out)
    (out / "routing.txt").write_text(f"task weights: {w[0].tolist()}\nsource: {run}\n")
    return out


def task_routing(cfg, loaded, model: PeftModel, task: str | None) -> torch.Tensor:
    """The average task weights (1, T) of one task's test prompts."""
    selection = make_selection(cfg)
    examples = [e for e in selection.test + selection.unseen if e.task == task]
    if not examples:
        known = ", ".join(selection.train_tasks + selection.unseen_tasks)
        raise ValueError(f"--task {task!r} is not among this run's tasks: {known}.")
    from ..data import Collator, encode

    encoded, _ = encode(examples, loaded.tokenizer, cfg.max_input_tokens, 1, cfg.chat_template)
    batch = Collator(loaded.tokenizer.pad_token_id, loaded.is_encoder_decoder, generation=True)(encoded)
    return method_of("orchmoe").routing_weights(model, method_of("orchmoe").model_inputs(batch, {})).mean(0, True)


def load_adapter_dir(path: Path, model_name: str | None):
    """(loaded base, PeftModel in eval mode) for an OrchMoE adapter directory."""
    from peft import PeftConfig

    import orchmoe  # noqa: F401  (registers the method with peft)

    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{path}: neither a run directory of `orchmoe train` nor an adapter directory (no adapter_config.json)."
        )
    config = PeftConfig.from_pretrained(str(path))
    if not isinstance(config, OrchMoEConfig):
        raise ValueError(f"{path} holds a {config.peft_type} adapter; only OrchMoE adapters can be exported.")
    name = model_name or config.base_model_name_or_path
    if not name:
        raise ValueError(f"{path}: the adapter names no base model; pass --model.")
    loaded = load_model(name)
    return loaded, PeftModel.from_pretrained(loaded.model, str(path)).eval()

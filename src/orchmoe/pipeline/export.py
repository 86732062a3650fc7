"""`orchmoe export`: one routing of a trained run or adapter directory as a plain peft LoRA adapter
(``orchmoe.export_lora``), or every abstract task for serving (``orchmoe.serving``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from peft import PeftModel

from ..export import export_lora
from ..models import load_model
from ..serving import export_abstract_tasks
from ..tuner import OrchMoEConfig
from ..tuner.access import get_tuner
from .common import CONFIG_FILE, make_selection
from .evaluate import load_trained
from .methods import method_of


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

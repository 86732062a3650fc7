"""OrchMoE with TRL's DPOTrainer: preference pairs, no task labels, each sequence routed from its prompt.

    python examples/dpo.py                      # tiny model, seconds on a CPU
    python examples/dpo.py --model gemma3-270m --steps 200

DPO scores the chosen and the rejected completion of each prompt with labels that mask the prompt, so OrchMoE
routes both from exactly that prompt, as generation will. ``orchmoe.OrchMoEDPOTrainer`` is TRL's DPOTrainer plus
what OrchMoE needs: the router objective (DPO computes its own loss, which would drop it) and the routers' learning
rate. With a peft model and no ``ref_model``, the reference is the base model (the adapter disabled), as for LoRA.
"""

from __future__ import annotations

import argparse

import torch
from _data import rows
from datasets import Dataset
from trl import DPOConfig

import orchmoe
from orchmoe.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-gemma3")
    parser.add_argument("--out", default="runs/example-dpo")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()

    loaded = load_model(args.model)
    pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": " I do not know."} for r in rows(48)]
    config = orchmoe.OrchMoEConfig(
        n_abstract_tasks=3, n_skills=4, r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    dpo = DPOConfig(  # TRL's defaults otherwise
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),
    )
    trainer = orchmoe.OrchMoEDPOTrainer(
        model=loaded.model,
        args=dpo,
        train_dataset=Dataset.from_list(pairs),
        processing_class=loaded.tokenizer,
        peft_config=config,
    )
    trainer.train()
    if trainer.is_world_process_zero():
        trainer.model.save_pretrained(f"{args.out}/adapter")
        print(orchmoe.format_parameter_report(orchmoe.parameter_report(trainer.model)))
        print(f"final loss {trainer.state.log_history[-2]['loss']:.3f}; adapter in {args.out}/adapter")


if __name__ == "__main__":
    main()

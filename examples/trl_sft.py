"""OrchMoE with TRL's SFTTrainer and a default SFTConfig (gradient checkpointing on, completion-only loss).

    python examples/trl_sft.py                      # tiny model, seconds on a CPU
    python examples/trl_sft.py --model gemma3-270m --steps 200

``orchmoe.OrchMoESFTTrainer`` is TRL's SFTTrainer plus what OrchMoE needs: the router loss (TRL computes its own
loss from the logits, so the model's addition would be lost), the routers' learning rate and, with packing, a clear
refusal (a packed row holds several prompts). TRL masks the prompt in the labels of a prompt/completion data set,
and the model routes each sequence from exactly that prompt, as generation does.
"""

from __future__ import annotations

import argparse

import torch
from _data import rows
from datasets import Dataset
from trl import SFTConfig

import orchmoe
from orchmoe.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-gemma3")
    parser.add_argument("--out", default="runs/example-trl")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()

    loaded = load_model(args.model)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows(48)])
    config = orchmoe.OrchMoEConfig(
        n_abstract_tasks=3, n_skills=4, r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    sft = SFTConfig(  # TRL's defaults otherwise: gradient checkpointing, completion-only loss, no packing
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),
    )
    trainer = orchmoe.OrchMoESFTTrainer(
        model=loaded.model, args=sft, train_dataset=dataset, processing_class=loaded.tokenizer, peft_config=config
    )
    trainer.train()
    if trainer.is_world_process_zero():
        trainer.model.save_pretrained(f"{args.out}/adapter")
        print(orchmoe.format_parameter_report(orchmoe.parameter_report(trainer.model)))
        print(f"final loss {trainer.state.log_history[-2]['loss']:.3f}; adapter in {args.out}/adapter")


if __name__ == "__main__":
    main()

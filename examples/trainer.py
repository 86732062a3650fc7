"""OrchMoE with Hugging Face's Trainer: routers at their own learning rate, the router loss.

    python examples/trainer.py                                  # tiny model, seconds on a CPU
    python examples/trainer.py --model gemma3-270m --bf16 --gradient-checkpointing --steps 200
    torchrun --nproc_per_node 2 examples/trainer.py             # two processes (DDP), same script

``orchmoe.OrchMoETrainer`` is ``transformers.Trainer`` plus what OrchMoE needs (``orchmoe.training``). Labels mask
the prompt with -100, so the model routes each training sequence from its prompt, as generation does.
"""

from __future__ import annotations

import argparse

import torch
from _data import rows, tokenize
from peft import get_peft_model
from transformers import DataCollatorForSeq2Seq, TrainingArguments

import orchmoe
from orchmoe.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-gemma3")
    parser.add_argument("--out", default="runs/example-trainer")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()

    loaded = load_model(args.model)
    tokenizer = loaded.tokenizer
    config = orchmoe.OrchMoEConfig(
        n_abstract_tasks=3, n_skills=4, r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    model = get_peft_model(loaded.model, config)
    print(orchmoe.format_parameter_report(orchmoe.parameter_report(model)))
    train = [tokenize(tokenizer, row) for row in rows(48)]
    training_args = TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = orchmoe.OrchMoETrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
    )
    trainer.train()
    if trainer.is_world_process_zero():
        model.save_pretrained(f"{args.out}/adapter")
        prompt = tokenizer(rows(1, seed=9)[0]["prompt"], return_tensors="pt").to(model.device)
        weights = orchmoe.routing(model, prompt).task_weights
        print(f"routing of a new prompt: {[round(w, 3) for w in weights[0].tolist()]}")
        print(f"final loss {trainer.state.log_history[-2]['loss']:.3f}; adapter in {args.out}/adapter")


if __name__ == "__main__":
    main()

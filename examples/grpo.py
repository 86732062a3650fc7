"""OrchMoE with TRL's GRPOTrainer: sampled completions scored by a reward, each routed from its prompt.

    python examples/grpo.py                      # tiny model, seconds on a CPU
    python examples/grpo.py --model gemma3-270m --steps 200

GRPO samples with ``generate`` in train mode; OrchMoE routes a ``generate`` call from its prompt as at inference
(no Gumbel noise, the Task Router's running statistics), then trains on prompt + completion routed from the same
prompt. ``orchmoe.OrchMoEGRPOTrainer`` is TRL's GRPOTrainer plus the router objective and the routers' learning
rate. The reward here is a toy one (does the completion start with the right answer of an addition).
"""

from __future__ import annotations

import argparse

import torch
from _data import rows
from datasets import Dataset
from trl import GRPOConfig

import orchmoe
from orchmoe.models import load_model


def reward(completions: list[str], answer: list[str], **_: object) -> list[float]:
    """1 when a completion starts with the expected answer, else 0."""
    return [float(c.strip().startswith(a.strip())) for c, a in zip(completions, answer, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-gemma3")
    parser.add_argument("--out", default="runs/example-grpo")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    loaded = load_model(args.model)
    prompts = Dataset.from_list([{"prompt": r["prompt"], "answer": r["completion"]} for r in rows(48)])
    config = orchmoe.OrchMoEConfig(
        n_abstract_tasks=3, n_skills=4, r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    grpo = GRPOConfig(  # TRL's defaults otherwise
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),
    )
    trainer = orchmoe.OrchMoEGRPOTrainer(
        model=loaded.model,
        reward_funcs=reward,
        args=grpo,
        train_dataset=prompts,
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

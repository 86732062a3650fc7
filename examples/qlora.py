"""QLoRA-style OrchMoE: a 4-bit (NF4) base, peft's prepare_model_for_kbit_training, then OrchMoE through Trainer.

    python examples/qlora.py                          # a tiny model written to a temporary folder, seconds on a CPU
    python examples/qlora.py --model PATH_OR_HUB_ID   # any causal LM that transformers loads

bitsandbytes runs on CUDA, and on the CPU through its CPU backend (how this example runs in the test suite).
prepare_model_for_kbit_training turns gradient checkpointing on (reentrant), which OrchMoE supports.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from _data import rows, tokenize
from peft import get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    DataCollatorForSeq2Seq,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    TrainingArguments,
)

import orchmoe
from orchmoe.models import char_tokenizer


def tiny_checkpoint(vocab_size: int) -> str:
    """A small Gemma 3 written to disk (in_features >= 64: bitsandbytes' CPU 4-bit kernels pack blocks of 64)."""
    path = tempfile.mkdtemp(prefix="orchmoe-qlora-")
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0)  # fmt: skip
    Gemma3ForCausalLM(config).save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a causal LM path or hub id (default: a tiny one)")
    parser.add_argument("--out", default="runs/example-qlora")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()

    if args.model is None:
        tokenizer = char_tokenizer()
        path = tiny_checkpoint(len(tokenizer))
    else:
        from transformers import AutoTokenizer

        path, tokenizer = args.model, AutoTokenizer.from_pretrained(args.model)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization)
    base = prepare_model_for_kbit_training(base)  # its defaults: fp32 norms, gradient checkpointing on
    config = orchmoe.OrchMoEConfig(
        n_abstract_tasks=3, n_skills=4, r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    model = get_peft_model(base, config)
    training_args = TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = orchmoe.OrchMoETrainer(
        model=model,
        args=training_args,
        train_dataset=[tokenize(tokenizer, row) for row in rows(48)],
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
    )
    trainer.train()
    model.save_pretrained(f"{args.out}/adapter")
    model.eval()
    prompt = tokenizer(rows(1, seed=9)[0]["prompt"], return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    print(f"generated {out.shape[1] - prompt['input_ids'].shape[1]} tokens with the KV cache on a 4-bit base")
    print(f"final loss {trainer.state.log_history[-2]['loss']:.3f}; adapter in {args.out}/adapter")


if __name__ == "__main__":
    main()

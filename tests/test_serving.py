"""Hard-routed serving: T plain LoRA adapters and the Task Router on its own, through peft's mixed-adapter batches."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import orchmoe
from orchmoe.cli import main
from orchmoe.models import char_tokenizer, tiny_model
from orchmoe.serving import PromptRouter, adapter_name, export_abstract_tasks, generate_served, load_served
from tests.conftest import VOCAB, inputs, make_peft, prompt_labels, seq2seq_extra

pytestmark = pytest.mark.usefixtures("allocation")  # the diagonal and the mixing allocation


def trained(arch: str) -> torch.nn.Module:
    model = make_peft(arch).train()
    batch = {**inputs(batch=6, seed=3), **seq2seq_extra(arch, 6)}
    labels = batch["decoder_input_ids"] if arch == "tiny-t5" else prompt_labels(batch["input_ids"])
    model(**batch, labels=labels)  # running statistics away from their init
    return model.eval()


def test_served_generation_equals_orchmoe_under_the_same_hard_routing(arch: str, tmp_path: Path) -> None:
    model = trained(arch)
    export_abstract_tasks(model, tmp_path)
    router = PromptRouter.from_pretrained(tmp_path)
    batch = inputs(batch=6, length=7, seed=3)  # a batch whose prompts go to all three abstract tasks
    table = model.get_base_model().get_input_embeddings()
    embeds = torch.nn.functional.embedding(batch["input_ids"], table.weight)
    soft = orchmoe.routing(model, batch).task_weights
    assert torch.allclose(router(embeds, batch["attention_mask"]), soft, atol=1e-5)  # no layer of the model ran
    names = router.adapter_names(batch["input_ids"], batch["attention_mask"], table)
    assert len(set(names)) == 3  # a mixed batch
    served = load_served(tiny_model(arch, vocab_size=VOCAB, seed=0), tmp_path)
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "use_cache": True}
    hard = torch.nn.functional.one_hot(soft.argmax(-1), soft.shape[-1]).float()
    with torch.no_grad():
        expected = model.generate(**batch, task_weights=hard, **kwargs)
        got = served.generate(**batch, adapter_names=names, **kwargs)
    assert torch.equal(got, expected)
    assert names == [adapter_name(int(t)) for t in soft.argmax(-1)]


def test_served_adapters_load_without_orchmoe(tmp_path: Path) -> None:
    export_abstract_tasks(trained("tiny-gemma3"), tmp_path)
    code = (
        "import sys, json, pathlib\n"
        "from peft import PeftModel\n"
        "from transformers import Gemma3ForCausalLM, Gemma3TextConfig\n"
        f"path = pathlib.Path({str(tmp_path)!r})\n"
        "base = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64,"
        " num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8))\n"
        "names = json.loads((path / 'router.json').read_text())['adapters']\n"
        "model = PeftModel.from_pretrained(base, path / names[0], adapter_name=names[0])\n"
        "[model.load_adapter(path / n, adapter_name=n) for n in names[1:]]\n"
        "assert 'orchmoe' not in sys.modules and len(model.peft_config) == 3\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("arch", ["tiny-gemma3"])
def test_cli_exports_every_abstract_task_and_generates(arch: str, tmp_path: Path, capsys) -> None:
    model = trained(arch)
    model.save_pretrained(tmp_path / "adapter")
    code = main(["export", str(tmp_path / "adapter"), "--all-abstract-tasks", "--model", arch,
                             "--out", str(tmp_path / "served"), "--quiet"])  # fmt: skip
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "served").iterdir() if p.is_dir()) == [adapter_name(t) for t in range(3)]
    assert (tmp_path / "served" / "router.safetensors").is_file()

    assert main(["generate", str(tmp_path / "served"), "--model", arch, "--prompt", "Add 2 and 3", "--prompt",
                 "Reverse abc", "--max-new-tokens", "3", "--quiet"]) == 0  # fmt: skip
    printed = capsys.readouterr().out.splitlines()  # a completion may hold a newline of its own
    assert sum(line.startswith("[abstract-task-") for line in printed) == 2


def test_served_left_padded_mixed_batch_equals_orchmoe_hard_routing(arch: str, tmp_path: Path) -> None:
    """``generate_served`` pads prompts of different lengths (on the left for a decoder) into one mixed batch; each
    completion equals OrchMoE's generate of that prompt alone under the same hard routing."""
    model = trained(arch)
    export_abstract_tasks(model, tmp_path)
    tokenizer = char_tokenizer()
    prompts = ["Add 2 and 3", "Reverse abc, please", "x", "Count the words in this one", "0 1 2"]
    served = generate_served(tmp_path, tiny_model(arch, vocab_size=VOCAB, seed=0), tokenizer, prompts, 4)
    assert len({name for name, _ in served}) >= 2  # a mixed batch
    for prompt, (name, text) in zip(prompts, served, strict=True):
        alone = tokenizer([prompt], return_tensors="pt")
        task = int(orchmoe.routing(model, alone).task_weights.argmax(-1))
        hard = torch.nn.functional.one_hot(torch.tensor([task]), 3).float()
        with torch.no_grad():
            out = model.generate(**alone, task_weights=hard, max_new_tokens=4, do_sample=False, pad_token_id=0)
        new = out if arch == "tiny-t5" else out[:, alone["input_ids"].shape[1] :]
        assert name == adapter_name(task)
        assert text == tokenizer.decode(new[0], skip_special_tokens=True), (prompt, name)

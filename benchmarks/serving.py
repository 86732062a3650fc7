"""Hard-routed serving (one LoRA per abstract task, orchmoe.serving) against OrchMoE's soft routing.

    python benchmarks/serving.py quality RUN [RUN ...]      # OrchMoE runs of `orchmoe train`, e.g. 3 seeds of sni-10
    python benchmarks/serving.py latency [--model gemma3-270m] [--batch 8] [--repeats 5]

quality: each run's test sets generated again with every prompt sent to its most likely abstract task only (what
the served LoRA adapters compute: tests/test_serving.py checks the two are equal), scored as the run's own
evaluation, beside the run's soft-routing scores (its metrics.json). latency: per-token decode with the KV cache at
one batch size, side by side in one process: the base model, one LoRA adapter (rank S*r), the T served adapters as a
mixed batch through peft's ``adapter_names``, and OrchMoE; medians over repeats in alternating order.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import orchmoe
from orchmoe.pipeline import metrics
from orchmoe.pipeline.common import make_selection
from orchmoe.pipeline.evaluate import generate, load_trained


class HardRouted:
    """An OrchMoE model whose generate sends each prompt to its argmax abstract task (one-hot task weights); the
    soft task weights it took the argmax of are appended to ``weights``."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.weights: list[list[float]] = []  # (N, T) over the calls

    def generate(self, **kwargs: Any) -> torch.Tensor:
        keys = ("input_ids", "attention_mask")
        w = orchmoe.routing(self.model, {k: kwargs[k] for k in keys if k in kwargs}).task_weights  # (B, T)
        self.weights.extend(w.float().tolist())
        hard = F.one_hot(w.argmax(dim=-1), w.shape[-1]).float()  # (B, T)
        return self.model.generate(**kwargs, task_weights=hard)


def quality(runs: list[Path]) -> dict[str, Any]:
    report: dict[str, Any] = {}
    for run in runs:
        cfg, loaded, model = load_trained(run)
        selection = make_selection(cfg)
        soft = json.loads((run / "metrics.json").read_text())
        report[str(run)] = {}
        for name, examples in (("seen", selection.test), ("unseen", selection.unseen)):
            rows, _ = generate(HardRouted(model), loaded, examples, "lora", {}, cfg.eval_batch_size,
                               cfg.max_input_tokens, cfg.max_new_tokens, progress=False,
                               chat_template=cfg.chat_template)  # fmt: skip
            scores = metrics.score([r["prediction"] for r in rows], [r["references"] for r in rows],
                                   [r["task"] for r in rows])["macro"]  # fmt: skip
            report[str(run)][name] = {"hard": scores["rougeL"], "soft": soft[name]["macro"]["rougeL"]}
            print(f"{run} {name}: R-L soft {soft[name]['macro']['rougeL']:.2f} hard {scores['rougeL']:.2f}", flush=True)
    runs_report = dict(report)
    for name in ("seen", "unseen"):
        diffs = [r[name]["hard"] - r[name]["soft"] for r in runs_report.values()]
        report[f"{name} hard minus soft"] = diffs
        spread = f" ± {statistics.stdev(diffs):.2f}" if len(diffs) > 1 else ""
        print(f"{name}: hard minus soft R-L {statistics.mean(diffs):+.2f}{spread} over {len(diffs)} runs")
    return report


def decode_time(generate_fn, new_tokens: int) -> float:
    """Seconds per decoded token: (time for new_tokens - time for 1 token) / (new_tokens - 1)."""
    times = []
    for n in (1, new_tokens):
        began = time.perf_counter()
        generate_fn(n)
        times.append(time.perf_counter() - began)
    return (times[1] - times[0]) / (new_tokens - 1)


@torch.no_grad()
def latency(model_name: str, batch: int, prompt: int, new_tokens: int, repeats: int) -> dict[str, float]:
    from peft import LoraConfig, get_peft_model

    from orchmoe.models import load_model
    from orchmoe.serving import export_abstract_tasks, load_served

    base = load_model(model_name).model.eval()
    targets = ["q_proj", "v_proj"]
    torch.manual_seed(0)
    config = orchmoe.OrchMoEConfig(n_abstract_tasks=4, n_skills=8, r=2, target_modules=targets, task_type="CAUSAL_LM",
                                   init_weights=False)  # fmt: skip
    routed = get_peft_model(copy.deepcopy(base), config).eval()
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, target_modules=targets, init_lora_weights=False))
    with tempfile.TemporaryDirectory() as served_dir:
        export_abstract_tasks(routed, served_dir)
        served = load_served(copy.deepcopy(base), served_dir)
    names = [f"abstract-task-{i % 4}" for i in range(batch)]  # a mixed batch: every adapter present
    vocab = min(base.config.vocab_size, 1000)
    ids = torch.randint(10, vocab, (batch, prompt), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    common = {"do_sample": False, "use_cache": True, "pad_token_id": 0}
    runs = {
        "base": lambda n: base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                        **common),
        "lora": lambda n: lora.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                        **common),
        "served (mixed batch)": lambda n: served.generate(input_ids=ids, attention_mask=mask, adapter_names=names,
                                                          max_new_tokens=n, min_new_tokens=n, **common),
        "orchmoe": lambda n: routed.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                             **common),
    }  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(repeats + 1):  # the first round warms up
        for name in list(runs) if r % 2 == 0 else reversed(list(runs)):
            t = decode_time(runs[name], new_tokens)
            if r:
                times[name].append(t)
    medians = {k: statistics.median(v) for k, v in times.items()}
    for name, t in medians.items():
        print(f"{name:22} {t * 1e3:8.2f} ms/token  x LoRA {t / medians['lora']:.3f}")
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    q = sub.add_parser("quality")
    q.add_argument("runs", type=Path, nargs="+")
    lat = sub.add_parser("latency")
    lat.add_argument("--model", default="gemma3-270m")
    lat.add_argument("--batch", type=int, default=8)
    lat.add_argument("--prompt", type=int, default=64)
    lat.add_argument("--new-tokens", type=int, default=16)
    lat.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write the report here (JSON)")
    args = parser.parse_args()
    if args.part == "quality":
        report = quality(args.runs)
    else:
        report = latency(args.model, args.batch, args.prompt, args.new_tokens, args.repeats)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

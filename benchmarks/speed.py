"""Speed and memory of OrchMoE against LoRA, Poly and MHR at parameter parity, side by side in one process.

    python benchmarks/speed.py                       # default model (Gemma 3 270M), ends with a RESULT line
    python benchmarks/speed.py --model tiny-gemma3   # seconds

Every method wraps a deep copy of the same base model and sees the same batch. Each repeat times every method once,
in an order that alternates between repeats, so drift of a noisy machine hits all methods alike; the figures are
medians over repeats after warm-up. Reported per method:

- train step: forward + backward + AdamW step, loss on the target columns only (as the trainer computes it);
- memory: on a GPU the peak allocated memory of a training step; on the CPU the bytes of the activations saved for
  backward (each storage once, frozen base weights excluded) plus trainable parameters, their gradients and AdamW
  state (the part that differs between methods);
- prefill latency and per-token decode latency of greedy generation with the KV cache, batch 1 and batch 8;
- the frozen base model, the floor no adapter can beat (forward only for the training step).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from orchmoe.models import load_model
from orchmoe.pipeline.common import stack_versions
from orchmoe.pipeline.config import RunConfig
from orchmoe.pipeline.methods import build, count_parameters, method_of

METHODS = ("base", "lora", "orchmoe", "orchmoe-mix", "poly", "mhr")
VARIANTS = {"orchmoe-mix": ("orchmoe", {"allocation": "mixing"})}  # a method with other settings: (method, changes)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def make_batch(vocab: int, batch: int, prompt: int, target: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, min(vocab, 30000), (batch, prompt + target), generator=g).to(device)
    routing = torch.zeros_like(ids)
    routing[:, :prompt] = 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "routing_mask": routing}


def extra_inputs(method: str, batch: dict[str, torch.Tensor], prompt_only: bool = False) -> dict[str, torch.Tensor]:
    n = batch["input_ids"].shape[0]
    if method.startswith("orchmoe") and not prompt_only:
        return {"routing_mask": batch["routing_mask"]}
    if method in ("poly", "mhr"):
        return {"task_ids": torch.arange(n, device=batch["input_ids"].device) % 10}
    return {}


class Bench:
    def __init__(self, method: str, model: torch.nn.Module, batch: dict[str, torch.Tensor], target: int) -> None:
        self.method, self.model, self.batch, self.target = method, model, batch, target
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-5) if params else None

    def loss(self) -> torch.Tensor:
        b = self.batch
        out = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                         logits_to_keep=self.target + 1, **extra_inputs(self.method, b))  # fmt: skip
        logits = out.logits[:, :-1].float()
        return F.cross_entropy(logits.flatten(0, 1), b["input_ids"][:, -self.target :].flatten())

    def train_step(self) -> None:
        if self.optimizer is None:  # the frozen base: forward only
            with torch.no_grad():
                self.loss()
            return
        self.model.train()
        self.loss().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train_memory(self, device: torch.device) -> int:
        """Bytes: GPU peak of one step, or (CPU) saved-for-backward tensors + params, grads and AdamW state."""
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            self.train_step()
            return torch.cuda.max_memory_allocated() - base
        storages: dict[int, int] = {}  # each storage once: a frozen weight is saved by every op that uses it

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return t

        self.model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self.loss()
        if self.optimizer is not None:
            loss.backward()
            self.optimizer.zero_grad(set_to_none=True)
        frozen = {p.untyped_storage().data_ptr() for p in self.model.parameters() if not p.requires_grad}
        saved = sum(n for ptr, n in storages.items() if ptr not in frozen)  # activations, not the base weights
        trainable = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.requires_grad)
        return saved + 4 * trainable  # params, grads, exp_avg, exp_avg_sq

    @torch.no_grad()
    def generate(self, batch_size: int, new_tokens: int, prompt: int) -> None:
        self.model.eval()
        ids = self.batch["input_ids"][:batch_size, :prompt]
        b = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        self.model.generate(**b, **extra_inputs(self.method, b, prompt_only=True), max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)  # fmt: skip


CONFIGS = Path(__file__).resolve().parent / "configs"  # architectures for --random-weights (no checkpoint needed)


def load_base(model_name: str, random_weights: bool, dtype: torch.dtype) -> torch.nn.Module:
    """The base model: its checkpoint, or (``random_weights``) its architecture from benchmarks/configs/NAME.json
    with random weights: speed does not depend on the weights' values."""
    if not random_weights:
        return load_model(model_name, dtype=dtype).model
    from transformers import AutoConfig, AutoModelForCausalLM

    name = "gemma-3-270m" if model_name == "gemma3-270m" else model_name
    path = CONFIGS / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"--random-weights: no architecture {path}; add the model's config.json there.")
    config = AutoConfig.for_model(**json.loads(path.read_text()))
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def build_all(model_name: str, cfg: RunConfig, methods: tuple[str, ...], device: torch.device, batch, target: int,
              random_weights: bool = False, dtype: torch.dtype = torch.float32):  # fmt: skip
    base = load_base(model_name, random_weights, dtype).to(device)
    benches, params = {}, {}
    for method in methods:
        model = copy.deepcopy(base).requires_grad_(False)  # the base stays frozen; adapters bring their own params
        if method != "base":
            name, changes = VARIANTS.get(method, (method, {}))
            model = build(name, model, dataclasses.replace(cfg, **changes), n_train_tasks=10)
            params[method] = count_parameters(method_of(name), model).__dict__
        benches[method] = Bench(method, model, batch, target)
    return benches, params, base


def measure(benches: dict[str, Bench], what: Callable[[Bench], None], repeats: int, warmup: int, device) -> dict:
    order = list(benches)
    times: dict[str, list[float]] = {m: [] for m in order}
    for r in range(warmup + repeats):
        for m in order if r % 2 == 0 else reversed(order):
            t = timed(lambda b=benches[m]: what(b), device)
            if r >= warmup:
                times[m].append(t)
    return {m: statistics.median(v) for m, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--target", type=int, default=16, help="target tokens (training) ")
    parser.add_argument("--new-tokens", type=int, default=16, help="generated tokens (decode)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--skills", type=int, default=8)
    parser.add_argument("--r", type=int, default=2)
    parser.add_argument("--abstract-tasks", type=int, default=4)
    parser.add_argument("--sweep", action="store_true", help="also step time / memory against S and T")
    parser.add_argument("--memory-only", action="store_true",
                        help="only the S / T sweep's memory (deterministic on the CPU; no timing)")  # fmt: skip
    parser.add_argument("--sweep-skills", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    parser.add_argument("--sweep-tasks", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/speed.json"))
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="base model (and activations)")
    parser.add_argument("--random-weights", action="store_true", help="the architecture only (benchmarks/configs)")
    parser.add_argument("--decode-batches", type=int, nargs=2, default=[1, 8], help="two decode batch sizes")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = RunConfig(
        model=args.model,
        n_skills=args.skills,
        r=args.r,
        n_abstract_tasks=args.abstract_tasks,
    )
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    vocab_probe = load_base(args.model, args.random_weights, dtype).config.vocab_size
    batch = make_batch(vocab_probe, args.batch, args.prompt, args.target, device)
    if args.memory_only:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": args.model, "sweep": sweep(args, device, batch)}, indent=1))
        return
    benches, params, _ = build_all(args.model, cfg, METHODS, device, batch, args.target, args.random_weights, dtype)

    report: dict = {"model": args.model, "device": str(device), "threads": torch.get_num_threads(),
                    "versions": stack_versions()}  # fmt: skip
    report.update(batch=args.batch, prompt=args.prompt, target=args.target, parameters=params, dtype=args.dtype)
    report["train_step_s"] = measure(benches, Bench.train_step, args.repeats, args.warmup, device)
    report["train_memory_bytes"] = {m: b.train_memory(device) for m, b in benches.items()}
    small, large = args.decode_batches
    for bs in (small, large):
        one = measure(benches, lambda b, bs=bs: b.generate(bs, 1, args.prompt), args.repeats, args.warmup, device)
        full = measure(benches, lambda b, bs=bs: b.generate(bs, args.new_tokens, args.prompt), args.repeats,
                       args.warmup, device)  # fmt: skip
        report[f"prefill_s_batch{bs}"] = one
        report[f"decode_s_per_token_batch{bs}"] = {m: (full[m] - one[m]) / (args.new_tokens - 1) for m in full}

    lora = report["train_step_s"]["lora"]
    print(f"\n{'method':11} {'train step':>11} {'x LoRA':>7} {'memory MB':>10} {'x LoRA':>7} "
          f"{f'decode b{small}':>10} {'x LoRA':>7} {f'decode b{large}':>10} {'x LoRA':>7}")  # fmt: skip
    for m in benches:
        t, mem = report["train_step_s"][m], report["train_memory_bytes"][m]
        d1, d8 = report[f"decode_s_per_token_batch{small}"][m], report[f"decode_s_per_token_batch{large}"][m]
        mem_ratio = mem / report["train_memory_bytes"]["lora"]
        print(f"{m:11} {t:10.3f}s {t / lora:7.3f} {mem / 2**20:10.1f} {mem_ratio:7.3f} "
              f"{d1 * 1e3:8.1f}ms {d1 / report[f'decode_s_per_token_batch{small}']['lora']:7.3f} {d8 * 1e3:8.1f}ms "
              f"{d8 / report[f'decode_s_per_token_batch{large}']['lora']:7.3f}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    if args.sweep:
        report["sweep"] = sweep(args, device, batch)
        args.out.write_text(json.dumps(report, indent=1))
    steps, decode = report["train_step_s"], report[f"decode_s_per_token_batch{small}"]
    print(f"RESULT train_step_ratio={steps['orchmoe'] / lora:.3f} decode_ratio={decode['orchmoe'] / decode['lora']:.3f}"
          f" mix_train_step_ratio={steps['orchmoe-mix'] / lora:.3f} "
          f"mix_decode_ratio={decode['orchmoe-mix'] / decode['lora']:.3f}")  # fmt: skip


def describe(method: str, result: dict) -> str:
    step = "" if result["step_s"] is None else f" {result['step_s']:.3f}s"
    return f"{method}{step} {result['memory_bytes'] / 2**20:.1f}MB"


def sweep(args: argparse.Namespace, device: torch.device, batch) -> dict:
    """OrchMoE step time and memory against S (fixed r) and T (fixed S), LoRA of rank S*r alongside."""
    results: dict = {"skills": {}, "tasks": {}}
    points = [("skills", "S", s, s, args.abstract_tasks) for s in args.sweep_skills]
    points += [("tasks", "T", t, args.skills, t) for t in args.sweep_tasks]
    for key, letter, x, n_skills, n_tasks in points:
        cfg = RunConfig(model=args.model, n_skills=n_skills, r=args.r, n_abstract_tasks=n_tasks)
        benches, _, _ = build_all(args.model, cfg, ("lora", "orchmoe"), device, batch, args.target)
        times = {} if args.memory_only else measure(benches, Bench.train_step, max(2, args.repeats // 2), 1, device)
        results[key][x] = {m: {"step_s": times.get(m), "memory_bytes": benches[m].train_memory(device)}
                           for m in benches}  # fmt: skip
        print(f"{letter}={x}: " + ", ".join(describe(m, v) for m, v in results[key][x].items()))
    plot_sweep(results, args.out.with_suffix(".png"))
    return results


def plot_sweep(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((axes[0], "skills", "skills S (rank r fixed; LoRA rank S*r)"),
                           (axes[1], "tasks", "abstract tasks T (S fixed)")):  # fmt: skip
        xs = sorted(results[key], key=int)
        timed = all(results[key][x]["lora"]["step_s"] is not None for x in xs)
        ax2 = ax.twinx() if timed else ax
        for m, style in (("lora", "--"), ("orchmoe", ":")):
            if timed:
                ax.plot([int(x) for x in xs], [results[key][x][m]["step_s"] for x in xs], marker="o", label=f"{m} step")
            ax2.plot([int(x) for x in xs], [results[key][x][m]["memory_bytes"] / 2**20 for x in xs], "k" + style,
                     marker="x", label=f"{m} memory")  # fmt: skip
        ax2.set_ylabel("training memory (MB)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label)
        if timed:
            ax.set_ylabel("train step (s)")
        ax.legend(loc="upper left", fontsize=8)
        ax2.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

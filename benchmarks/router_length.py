"""The Task Router against prompt length: peak memory and time of routing one prompt of 1k, 8k and 32k tokens, with
the pooling as first written (the full L x L scores, ``--quadratic``) and as the router computes it now (fused
attention, memory linear in L), each length in a fresh process.

    python benchmarks/router_length.py                 # both, 1k / 8k / 32k tokens, Gemma 3 270M's width (640)
    python benchmarks/router_length.py --lengths 512 --repeats 1

One thread, as ``orchmoe serve`` routes; random embeddings (time and memory do not depend on their values); the peak
is the process's resident-set growth over the call (``ru_maxrss``), the time the median of the repeats. Ends with a
RESULT line.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def quadratic_pool(x, keep):
    """The Task Router's pooling with the full (B, L, L) scores, as first written (orchmoe before 2026-12-07)."""
    import torch

    scores = torch.einsum("bid,bjd->bij", x, x) / x.shape[-1] ** 0.5  # (B, L, L)
    scores = scores.masked_fill(~keep[:, None, :], torch.finfo(scores.dtype).min)
    x = torch.einsum("bij,bjd->bid", scores.softmax(dim=-1), x) + x
    w = keep.float()
    return torch.einsum("bld,bl->bd", x, w) / w.sum(dim=1, keepdim=True)


def one(length: int, width: int, quadratic: bool, repeats: int) -> dict[str, float]:
    """Route one prompt of ``length`` tokens in this process: peak RSS growth (MB) and median seconds."""
    import torch

    from orchmoe import OrchMoEConfig
    from orchmoe.tuner.router import TaskRouter

    torch.set_num_threads(1)
    router = TaskRouter(width, OrchMoEConfig(n_abstract_tasks=4)).eval()
    x, keep = torch.randn(1, length, width), torch.ones(1, length, dtype=torch.bool)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            pooled = quadratic_pool(x, keep) if quadratic else router.pool(x, keep)
            router.proj(pooled)
            seconds.append(time.perf_counter() - start)
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # KiB -> MiB
    return {"peak_mb": round(peak, 1), "seconds": round(statistics.median(seconds), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 32768])
    parser.add_argument("--width", type=int, default=640, help="embedding size (Gemma 3 270M: 640)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # LENGTH MODE: one measurement, as JSON
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/router_length.json"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one(int(args.child[0]), args.width, args.child[1] == "quadratic", args.repeats)))
        return
    results: dict[str, dict[str, dict[str, float]]] = {}
    print(f"{'tokens':>7} {'mode':>10} {'peak MB':>9} {'seconds':>8}")
    for length in args.lengths:
        for mode in ("quadratic", "linear"):
            child = [sys.executable, __file__, "--child", str(length), mode, "--width", str(args.width), "--repeats",
                     str(args.repeats)]  # fmt: skip
            done = subprocess.run(child, capture_output=True, text=True, check=True)
            results.setdefault(str(length), {})[mode] = json.loads(done.stdout.strip().splitlines()[-1])
            r = results[str(length)][mode]
            print(f"{length:7d} {mode:>10} {r['peak_mb']:9.1f} {r['seconds']:8.3f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    longest = results[str(max(args.lengths))]
    ratio = longest["quadratic"]["peak_mb"] / max(longest["linear"]["peak_mb"], 0.1)
    quadratic, linear = longest["quadratic"], longest["linear"]
    print(f"RESULT tokens={max(args.lengths)} peak_mb_quadratic={quadratic['peak_mb']} "
          f"peak_mb_linear={linear['peak_mb']} memory_ratio={ratio:.1f} seconds_quadratic={quadratic['seconds']} "
          f"seconds_linear={linear['seconds']}")  # fmt: skip


if __name__ == "__main__":
    main()

"""The GPU benchmark in one command: speed side by side, and the SNI comparison at ten times the CPU's scale.

    python3 benchmarks/gpu.py --receive gpu-staging/call-K [--out DIR]    # on the GPU machine (see gpu_stage.py)
    python3 benchmarks/gpu.py --dry-run --out DIR                          # the same code path on the CPU, minutes

Runs offline on a bare single-GPU machine: what it needs beyond Python, torch, transformers, accelerate and peft
comes from the staging folder (benchmarks/gpu_stage.py), reassembled from pieces and checked against sha256 sums.
Writes its tables and logs under --out and prints a short summary last. Budget: 9 minutes of wall time.

Protocol, fixed before any run (BENCHMARKS.md records it with the results):
- speed (bf16, Gemma 3 270M architecture with random weights): frozen base, LoRA, OrchMoE, Poly, MHR in one process,
  training step and peak memory at batch 8 and 64, prefill, per-token decode at batch 1 and 32 with the KV cache;
  medians of 7 repeats after 2 warm-ups, with device synchronisation; ratios to LoRA.
- quality (bf16, Gemma 3 270M): sni-10 with 64 training instances per task for 5 epochs (400 optimizer steps, 10x the
  CPU benchmark's 40), each method at the learning rate its validation split picks from {1e-3, 3e-3, 1e-2} (seed 0),
  then seeds 0, 1, 2, tested on 8 + up to 20 more instances per task and 12 unseen tasks; sni-many: every training
  task of the data's split (at most 100), 64 instances each, at the sni-10 choice, seeds 0, 1, 2. Parity as on the
  CPU (LoRA rank 16; 8 skills of rank 2), routers at 1x. The four methods run as parallel processes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gpu_stage import sha256, stage  # noqa: E402

METHODS = ("orchmoe", "lora", "poly", "mhr")
# fmt: off
GPU = {
    "speed": [["--batch", "8"], ["--batch", "64"]],
    "speed_common": ["--device", "cuda", "--dtype", "bf16", "--random-weights", "--decode-batches", "1", "32",
                     "--repeats", "7", "--warmup", "2"],
    "quality": ["--model", "gemma3-270m", "--precision", "bf16", "--n-train", "64", "--epochs", "5", "--n-test", "8",
                "--n-unseen", "12", "--lrs", "1e-3", "3e-3", "1e-2", "--seeds", "0", "1", "2", "--n-extra", "20"],
    "many": ["--many-tasks", "100", "--many-train", "64", "--many-test", "2", "--many-seeds", "0", "1", "2"],
}
DRY = {
    "speed": [["--batch", "2"]],
    "speed_common": ["--model", "tiny-gemma3", "--device", "cpu", "--decode-batches", "1", "2", "--repeats", "1",
                     "--warmup", "1", "--new-tokens", "3", "--prompt", "8", "--target", "4"],
    "quality": ["--model", "tiny-gemma3", "--n-train", "2", "--epochs", "1", "--n-test", "1", "--n-unseen", "2",
                "--lrs", "1e-3", "--seeds", "0", "--n-extra", "1", "--max-new-tokens", "2", "--n-val", "1"],
    "many": ["--many-tasks", "3", "--many-train", "1", "--many-test", "1", "--many-seeds", "0"],
}
# fmt: on


def receive(folder: Path, staging: Path) -> None:
    """Keep a carried call folder's pieces in ``staging/received`` (ignored: it stays on the warm machine)."""
    received = staging / "received"
    received.mkdir(parents=True, exist_ok=True)
    for piece in folder.iterdir():
        shutil.copy(piece, received / piece.name)
    print(f"received {folder}: {len(list(received.iterdir()))} files in {received}")


def bootstrap(staging: Path, install: bool) -> Path:
    """Reassemble and check every staged file, install the wheels offline; returns the SNI directory."""
    received, whole = staging / "received", staging / "assembled"
    manifest = json.loads((received / "MANIFEST.json").read_text())
    missing = [p for f in manifest["files"].values() for p in f["pieces"] if not (received / p).is_file()]
    if missing:
        raise SystemExit(f"staging incomplete: {len(missing)} pieces missing (first {missing[0]}); carry every call.")
    for name, entry in manifest["files"].items():
        target = whole / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("wb") as out:
            for piece in entry["pieces"]:
                out.write((received / piece).read_bytes())
        if sha256(target) != entry["sha256"]:
            raise SystemExit(f"{name}: sha256 mismatch after reassembly; stage again.")
    wheels = sorted((whole / "wheels").glob("*.whl")) if (whole / "wheels").is_dir() else []
    if install and wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "-q", *map(str, wheels)], check=True
        )
    if install:
        editable = ["install", "--no-index", "--no-deps", "--no-build-isolation", "-q", "-e", str(HERE.parent)]
        subprocess.run([sys.executable, "-m", "pip", *editable], check=True)
        # convert the packaged GGUF once, before parallel processes would each start the conversion
        convert = "from orchmoe.models import default_model_path; default_model_path()"
        subprocess.run([sys.executable, "-c", convert], check=True)
    with tarfile.open(whole / "sni.tgz") as tar:
        tar.extractall(whole, filter="data")
    return whole / "sni"


def run(command: list[str], log: Path, timeout: float) -> int:
    with log.open("w") as f:
        try:
            done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=HERE.parent)
            return done.returncode
        except subprocess.TimeoutExpired:
            f.write(f"\nTIMEOUT after {timeout:.0f} s\n")
            return 124


def parallel(jobs: dict[str, list[str]], out: Path, timeout: float) -> dict[str, int]:
    with ThreadPoolExecutor(len(jobs)) as pool:
        codes = {name: pool.submit(run, cmd, out / f"{name}.log", timeout) for name, cmd in jobs.items()}
    return {name: code.result() for name, code in codes.items()}


def speed(settings: dict, out: Path, deadline: float) -> dict[str, int]:
    codes = {}
    for extra in settings["speed"]:
        name = "speed-b" + extra[1]
        command = [
            sys.executable,
            str(HERE / "speed.py"),
            *settings["speed_common"],
            *extra,
            "--out",
            str(out / f"{name}.json"),
        ]
        codes[name] = run(command, out / f"{name}.log", max(30.0, deadline - time.time()))
    return codes


def quality(settings: dict, data: Path, out: Path, deadline: float) -> dict[str, int]:
    """lr-sweep (4 methods in parallel, each in its own folder), then sni-many at each method's chosen lr."""
    script = [sys.executable, str(HERE / "quality.py"), "--data-dir", str(data)]
    sweep = {f"sweep-{m}": [*script, "--out", str(out / f"quality-{m}"), "--parts", "lr-sweep", "--sweep-methods", m,
                            *settings["quality"]] for m in METHODS}  # fmt: skip
    codes = parallel(sweep, out, 0.6 * max(60.0, deadline - time.time()))
    chosen = {m: lr for m in METHODS if (lr := chosen_lr(out, m)) is not None}
    many = {
        f"many-{m}": [*script, "--out", str(out / f"many-{m}"), "--parts", "sni-many", "--methods", m, "--lr", str(lr),
                      *settings["quality"], *settings["many"]]
        for m, lr in chosen.items()
    }  # fmt: skip
    if many:
        codes.update(parallel(many, out, max(30.0, deadline - time.time())))
    return codes


def chosen_lr(out: Path, method: str) -> float | None:
    """The lr ``method``'s sweep chose (its quality.json), None when the sweep did not finish."""
    report = out / f"quality-{method}" / "quality.json"
    return json.loads(report.read_text())["lr-sweep"]["chosen"][method] if report.is_file() else None


def allocation_distance(adapter: Path) -> float:
    """Mean total-variation distance from uniform of the learned allocation rows softmax(Z / tau), over modules and
    abstract tasks (0: Z never left uniform; 1 - 1/S: every row one-hot)."""
    from safetensors.torch import load_file

    config = json.loads((adapter / "adapter_config.json").read_text())
    rows = [z.float() / config["temperature"] for k, z in load_file(adapter / "adapter_model.safetensors").items()
            if "orchmoe_skill_router" in k]  # fmt: skip
    z = torch.stack(rows).softmax(dim=-1)  # (M, T, S)
    return 0.5 * (z - 1.0 / z.shape[-1]).abs().sum(dim=-1).mean().item()


def summary(out: Path, codes: dict[str, int]) -> str:
    status = ", ".join(f"{k} {'ok' if v == 0 else f'exit {v}'}" for k, v in codes.items())
    lines = [f"gpu benchmark in {out}: {status}"]
    for report in sorted(out.glob("speed-b*.json")):
        data = json.loads(report.read_text())
        lora = data["train_step_s"]["lora"]
        decode = {k: v for k, v in data.items() if k.startswith("decode_s_per_token_batch")}
        ratios = " ".join(
            f"{k.removeprefix('decode_s_per_token_')} {v['orchmoe'] / v['lora']:.3f}" for k, v in decode.items()
        )
        lines.append(
            f"{report.stem}: train step OrchMoE/LoRA {data['train_step_s']['orchmoe'] / lora:.3f}, "
            f"decode OrchMoE/LoRA {ratios}"
        )
    for m in METHODS:
        lr = chosen_lr(out, m)
        lines.append(f"lr-sweep {m}: chosen {lr if lr is not None else 'none (runs missing)'}")
    adapters = sorted((out / "quality-orchmoe").glob("**/adapter"))
    if adapters:
        distances = [allocation_distance(a) for a in adapters]
        lines.append(
            f"OrchMoE allocation distance from uniform (TV), {len(distances)} runs: "
            f"{statistics.mean(distances):.3f} (min {min(distances):.3f}, max {max(distances):.3f})"
        )
    lines.append(f"tables: {out}/quality-<method>/quality.md, {out}/many-<method>/quality.md; logs beside them")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--receive", type=Path, help="a carried call folder of gpu-staging")
    parser.add_argument("--staging", type=Path, default=Path("gpu-staging"))
    parser.add_argument("--out", type=Path, help="run the benchmark and write here")
    parser.add_argument("--data-dir", type=Path, help="an SNI-layout directory (default: the staged one)")
    parser.add_argument("--dry-run", action="store_true", help="tiny model, built-in suite, CPU: the same code path")
    parser.add_argument("--minutes", type=float, default=9.0, help="wall-time budget")
    args = parser.parse_args()
    began = time.time()
    deadline = began + 60 * args.minutes
    if args.dry_run:  # stage the built-in suite in pieces of 4 KiB, to go through reassembly as the GPU run does
        from orchmoe.data import write_suite

        args.out.mkdir(parents=True, exist_ok=True)
        suite = write_suite(args.out / "suite-source", seed=0, n_instances=12)
        manifest = stage(suite, args.staging, [], size=2**12)
        for k in range(1, len(manifest["calls"]) + 1):
            receive(args.staging / f"call-{k}", args.staging)
    elif args.receive is not None:
        receive(args.receive, args.staging)
    if args.out is None:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data_dir or bootstrap(args.staging, install=not args.dry_run)
    settings = DRY if args.dry_run else GPU
    codes = speed(settings, args.out, began + 0.25 * (deadline - began))
    codes.update(quality(settings, data, args.out, deadline - 15))
    text = summary(args.out, codes)
    (args.out / "summary.txt").write_text(text + "\n")
    print(text)
    if any(codes.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()

"""The GPU benchmark in one command: the SNI comparison at ten times the CPU's scale, and speed side by side.

    python3 benchmarks/gpu.py --receive gpu-staging/call-K     # on the GPU machine, each call (see gpu_stage.py)
    python3 benchmarks/gpu.py --out DIR                          # the next call, at once: the benchmark
    python3 benchmarks/gpu.py --dry-run --out DIR                # the same code path on the CPU, minutes

Runs offline on a bare single-GPU machine: what it needs beyond Python, torch, transformers, accelerate and peft
comes from the staging folder (benchmarks/gpu_stage.py), reassembled from pieces and checked against sha256 sums; the
call that brings the last piece installs it. Writes under --out the summary (printed last too), the at-scale report,
and the rest (results, parked checkpoints of runs cut off, logs) in one archive cut into 15 MiB parts: a device call
brings back 8 files of 16 MiB. Here, `python benchmarks/gpu.py --unpack DIR` puts a returned folder back into
benchmarks/results/sni-full/families-gpu, to commit. Budget: 9.5 minutes of wall time.

Protocol (benchmarks/LOG.md records it with the results; amended 2026-12-04 after the first device session, before any
run finished: fp32 instead of bf16, checkpoints parked across calls, at scale before speed):
- at scale (fp32, Gemma 3 270M; `at_scale.py --protocol families-gpu`, benchmarks/LOG.md "At scale on the GPU"): the
  families protocol of ../shared/sni-full at 10x its optimizer steps (2,600 of batch 8, one epoch, no example seen
  twice), each method at the lr the families protocol chose on validation, seeds 0, 1, 2; a seed's four methods run
  as parallel processes while MIN_WAVE seconds are left; a run cut off is parked at its last checkpoint (every 100
  steps) and resumed by the next call or session; runs finished in an earlier session, committed under
  benchmarks/results/sni-full/families-gpu/, are not repeated. Parity as on the CPU (LoRA rank 16; 8 skills of rank
  2), routers at 1x.
- speed, with the time left (at least SPEED_RESERVE; bf16, Gemma 3 270M architecture with random weights): frozen
  base, LoRA, OrchMoE, Poly, MHR in one process, training step and peak memory at batch 8 and 64, prefill, per-token
  decode at batch 1 and 32 with the KV cache; medians of 7 repeats after 2 warm-ups, with device synchronisation;
  ratios to LoRA.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gpu_stage import join, pieces, sha256, stage  # noqa: E402

METHODS = ("orchmoe", "lora", "poly", "mhr")
PROTOCOL = "families-gpu"
COMMITTED = HERE / "results" / "sni-full" / PROTOCOL  # the runs of earlier device sessions, as committed
ARCHIVE = "gpu-out.tgz"
SPEED_RESERVE = 300.0  # seconds speed needs at least: batch 8 did not finish in 106 s on 2026-12-04
MIN_WAVE = 120.0  # seconds: a wave started with less left loads and trains too little to reach a checkpoint
PART = 15 * 2**20  # the archive's parts: a file a device call brings back holds at most 16 MiB
PROBE_TIMEOUT = 120.0  # seconds for sdpa_probe.py (two model builds, eight forward and backward passes)
READY = "READY"  # in gpu-staging/assembled once everything is reassembled, checked and installed
RETURNED = ("summary.txt", "report.md")  # beside the archive's parts: what a device call brings back
# fmt: off
GPU = {
    "speed": [["--batch", "8"], ["--batch", "64"]],
    "speed_common": ["--device", "cuda", "--dtype", "bf16", "--random-weights", "--decode-batches", "1", "32",
                     "--repeats", "7", "--warmup", "2"],
    "at_scale": ["--model", "gemma3-270m"],
    "seeds": [0, 1, 2],
    "probe": ["--device", "cuda", "--random-weights"],
}
DRY = {
    "speed": [["--batch", "2"]],
    "speed_common": ["--model", "tiny-gemma3", "--device", "cpu", "--decode-batches", "1", "2", "--repeats", "1",
                     "--warmup", "1", "--new-tokens", "3", "--prompt", "8", "--target", "4"],
    "at_scale": ["--model", "tiny-gemma3"],  # and --config: the dry protocol on the built-in suite (dry_protocol)
    "seeds": [0, 1],
    "probe": ["--model", "tiny-gemma3", "--device", "cpu"],
}
# fmt: on


def receive(folder: Path, staging: Path) -> None:
    """Keep a carried call folder's pieces in ``staging/received`` (ignored: it stays on the warm machine)."""
    received = staging / "received"
    received.mkdir(parents=True, exist_ok=True)
    for piece in folder.iterdir():
        shutil.copy(piece, received / piece.name)
    print(f"received {folder}: {len(list(received.iterdir()))} files in {received}")


def missing_pieces(received: Path) -> list[str]:
    """The pieces the manifest names that have not been received (all of them, by name, before the manifest)."""
    if not (received / "MANIFEST.json").is_file():
        return ["MANIFEST.json"]
    manifest = json.loads((received / "MANIFEST.json").read_text())
    return [p for f in manifest["files"].values() for p in f["pieces"] if not (received / p).is_file()]


def bootstrap(staging: Path, install: bool) -> Path:
    """Reassemble and check every staged file, install the wheels offline (once: a marker file says it is done, so
    the benchmark's call, after the last receiving one, starts at once); returns the SNI directory."""
    received, whole = staging / "received", staging / "assembled"
    if (whole / READY).is_file():
        return whole / "sni"
    missing = missing_pieces(received)
    if missing:
        raise SystemExit(f"staging incomplete: {len(missing)} pieces missing (first {missing[0]}); carry every call.")
    manifest = json.loads((received / "MANIFEST.json").read_text())
    for name, entry in manifest["files"].items():
        target = join([received / piece for piece in entry["pieces"]], whole / name)
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
    (whole / READY).write_text("installed\n")
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


def sdpa_probe(settings: dict, out: Path) -> dict[str, int]:
    """benchmarks/sdpa_probe.py: whether attention's backward gives NaN on the batch shape that preceded the bf16
    divergence of 2026-12-04 (seconds; first, so that every session answers it)."""
    command = [sys.executable, str(HERE / "sdpa_probe.py"), *settings["probe"], "--out", str(out / "sdpa-probe.json")]
    return {"sdpa-probe": run(command, out / "sdpa-probe.log", PROBE_TIMEOUT)}


def speed(settings: dict, out: Path, deadline: float) -> dict[str, int]:
    codes = {}
    for k, extra in enumerate(settings["speed"]):
        name = "speed-b" + extra[1]
        share = (deadline - time.time()) / (len(settings["speed"]) - k)  # the time left, shared by what is left
        command = [
            sys.executable,
            str(HERE / "speed.py"),
            *settings["speed_common"],
            *extra,
            "--out",
            str(out / f"{name}.json"),
        ]
        codes[name] = run(command, out / f"{name}.log", max(30.0, share))
    return codes


def at_scale(settings: dict, data: Path, out: Path, work: Path, deadline: float) -> dict[str, int]:
    """families-gpu (at_scale.py) seed by seed, each seed's four methods as parallel processes, while at least
    MIN_WAVE seconds are left. Finished runs (the committed ones copied in first) are skipped; runs cut off by the
    deadline are parked (their last checkpoint under results/.../in-progress), so the next call, or the next session
    once they are committed, resumes them."""
    results = out / "results"
    if COMMITTED.is_dir():
        shutil.copytree(COMMITTED, results / PROTOCOL, dirs_exist_ok=True)
    script = [sys.executable, str(HERE / "at_scale.py"), "--protocol", PROTOCOL, "--results", str(results),
              *settings["at_scale"]]  # fmt: skip
    planned = subprocess.run([*script[:2], "plan", *script[2:]], capture_output=True, text=True, check=True).stdout
    todo = [line.split()[1] for line in planned.splitlines() if line.startswith("todo")]
    codes: dict[str, int] = {}
    for seed in settings["seeds"]:
        wave = [name for name in todo if name.endswith(f"-seed{seed}")]
        left = deadline - time.time()
        if not wave or left < MIN_WAVE:
            continue
        jobs = {name: [*script[:2], "run", *script[2:], "--data-dir", str(data), "--work", str(work),
                       "--only", name] for name in wave}  # fmt: skip
        codes.update(parallel(jobs, out, left))
    subprocess.run([*script[:2], "park", *script[2:], "--work", str(work)], check=True, capture_output=True)
    for log in (work / PROTOCOL).glob("*/train_log.jsonl"):  # how far a run cut off by the deadline got
        if not (results / PROTOCOL / log.parent.name / "metrics.json").is_file():
            (out / "unfinished" / log.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(log, out / "unfinished" / log.parent.name / log.name)
    report = subprocess.run([*script[:2], "report", *script[2:]], capture_output=True, text=True, check=True).stdout
    (out / "report.md").write_text(report)
    return codes


def pack(out: Path, part: int = PART) -> list[Path]:
    """Everything under ``out`` but the summary and the report in one archive cut into parts of at most ``part``
    bytes, ``gpu-out.tgz.000``, ...: a device call brings back at most 8 files of at most 16 MiB, none deeper than
    two folders. ``--unpack`` puts them back here."""
    archive = out / ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(out.iterdir()):
            if path.name not in RETURNED and path != archive:
                tar.add(path, arcname=path.name)
    parts = pieces(archive, out, part)
    archive.unlink()
    for path in out.iterdir():
        if path.name not in RETURNED and path not in parts:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return parts


def unpack(returned: Path, runs: Path, committed: Path = COMMITTED) -> Path:
    """The archive a device call brought back, put back here: ``results/families-gpu`` replaces the committed
    folder (it holds every committed run, copied in first, and parked runs' checkpoints, and no longer those of runs
    that finished since), the rest goes to ``runs`` (logs, speed reports; emptied first, so that nothing of an earlier
    return mixes in). Returns the results folder to commit."""
    shutil.rmtree(runs, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        archive = join(sorted(returned.glob(f"{ARCHIVE}.*")), Path(tmp) / ARCHIVE)
        with tarfile.open(archive) as tar:
            tar.extractall(runs, filter="data")
    if (runs / "results" / PROTOCOL).is_dir():
        shutil.rmtree(committed, ignore_errors=True)
        shutil.copytree(runs / "results" / PROTOCOL, committed)
    return committed


def dry_protocol(data: Path, out: Path) -> Path:
    """families-gpu's shape on the built-in suite, for --dry-run: three trained tasks, one held out, two unseen."""
    train = (data / "splits" / "default" / "train_tasks.txt").read_text().split()
    options = {"tasks": train[:3], "held_out_tasks": train[3:4], "n_unseen": 2, "n_train": 2, "n_test": 1,
               "epochs": 1.0, "batch_size": 2, "max_new_tokens": 2, "eval_batch_size": 2, "log_every": 1}  # fmt: skip
    path = out / "dry-protocol.json"
    path.write_text(json.dumps(options, indent=1))
    return path


def standing(report: str) -> list[str]:
    """The lines of at_scale's report that carry the verdict: how many runs finished, OrchMoE against each method."""
    lines = report.splitlines()
    kept = [line for line in lines if line.startswith("## ")]
    k = next((i for i, line in enumerate(lines) if line.startswith("OrchMoE minus each method")), None)
    if k is not None:  # its heading, a blank line, then the table up to the next blank line
        kept += [lines[k], *itertools.takewhile(bool, lines[k + 2 :])]
    return kept


def last_allocation_tv(log: Path) -> float | None:
    """The allocation's mean total-variation distance from uniform at a run's last logged step (0: Z never left
    uniform; 1 - 1/S: every row one-hot), from its training log."""
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return next((e["allocation_tv"] for e in reversed(entries) if "allocation_tv" in e), None)


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
    if (out / "sdpa-probe.json").is_file():
        cases = json.loads((out / "sdpa-probe.json").read_text())["cases"]
        bad = [f"{c['dtype']} width {c['width']} {c['backends']}" for c in cases if c["nonfinite_grads"]]
        lines.append(f"sdpa probe, non-finite gradients: {', '.join(bad) or 'none'} ({len(cases)} cases)")
    if (out / "report.md").is_file():
        lines += standing((out / "report.md").read_text())
    for log in sorted(out.glob("unfinished/*/train_log.jsonl")):
        last = json.loads(log.read_text().splitlines()[-1]) if log.read_text().strip() else {}
        lines.append(f"unfinished {log.parent.name}: step {last.get('step', 0)}, {last.get('seconds', 0):.0f} s")
    logs = sorted((out / "results" / PROTOCOL).glob("orchmoe-*/train_log.jsonl"))
    distances = [tv for log in logs if (tv := last_allocation_tv(log)) is not None]
    if distances:
        lines.append(
            f"OrchMoE allocation distance from uniform (TV), {len(distances)} runs: "
            f"{statistics.mean(distances):.3f} (min {min(distances):.3f}, max {max(distances):.3f})"
        )
    lines.append(f"tables: {out}/report.md; runs, logs: {out}/{ARCHIVE}.* (here: gpu.py --unpack DIR, then commit)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--receive", type=Path, help="a carried call folder of gpu-staging")
    parser.add_argument("--staging", type=Path, default=Path("gpu-staging"))
    parser.add_argument("--out", type=Path, help="run the benchmark and write here")
    parser.add_argument("--data-dir", type=Path, help="an SNI-layout directory (default: the staged one)")
    parser.add_argument("--work", type=Path, default=Path("runs/gpu-work"),
                        help="run directories (not under --out: only the kept results come back)")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="tiny model, built-in suite, CPU: the same code path")
    parser.add_argument("--unpack", type=Path, help="here: a returned folder (gpu-out.tgz.*) back into results")
    parser.add_argument("--minutes", type=float, default=9.5, help="wall-time budget")
    args = parser.parse_args()
    if args.unpack is not None:
        print(f"commit {unpack(args.unpack, args.work.parent / 'gpu-returned')}")
        return
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
        if not missing_pieces(args.staging / "received"):  # the last piece: install now, not in the benchmark's call
            print(f"ready: {bootstrap(args.staging, install=True)}")
    if args.out is None:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data_dir or bootstrap(args.staging, install=not args.dry_run)
    settings = DRY if args.dry_run else GPU
    if args.dry_run:
        settings = {**settings, "at_scale": [*settings["at_scale"], "--config", str(dry_protocol(data, args.out))]}
    # the probe (seconds), then the at-scale waves (the claim), speed once they leave time for it
    codes = sdpa_probe(settings, args.out)
    codes |= at_scale(settings, data, args.out, args.work, deadline - 30)
    if deadline - time.time() >= SPEED_RESERVE:
        codes.update(speed(settings, args.out, deadline - 15))
    text = summary(args.out, codes)
    (args.out / "summary.txt").write_text(text + "\n")
    pack(args.out)
    print(text)
    if any(codes.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()

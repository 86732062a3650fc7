"""Where the at-scale runs are kept: a finished run's files in ``benchmarks/results/sni-full/<protocol>/<run>/``,
an unfinished run parked there for a later session, a finished OrchMoE run's adapter until its routers are measured
(`benchmarks/at_scale.py` plans and runs them; its ``--results`` sets ``RESULTS``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import router_measures

RESULTS = Path(__file__).resolve().parent / "results" / "sni-full"
KEPT = ("config.json", "data.json", "metrics.json", "val_metrics.json", "train_log.jsonl")
ROUTERS = "routers.json"
PARKED = ("config.json", "data.json", "train_log.jsonl")  # with an unfinished run's last checkpoint
UNMEASURED = "adapter-to-measure"  # a finished OrchMoE run's adapter, kept until its routers are measured


def finished(protocol: str, name: str) -> Path | None:
    folder = RESULTS / protocol / name
    return folder if all((folder / f).is_file() for f in KEPT) else None


def copy_adapter(source: Path, target: Path) -> None:
    """A trained adapter's weights and config copied to ``target`` (replacing an earlier copy), without peft's empty
    model card."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("README.md"))


def park(protocol: str, work: Path) -> list[Path]:
    """Each unfinished run's last complete checkpoint, settings and log (and its adapter once trained), copied to its
    results folder; and the adapter of each finished OrchMoE run whose routers are not measured yet, so that a later
    session's ``measure`` finds it (and deletes it once measured)."""
    from orchmoe.pipeline import checkpoint

    parked = []
    for out in sorted((work / protocol).glob("*")):
        folder = RESULTS / protocol / out.name
        if finished(protocol, out.name):
            orchmoe = json.loads((folder / "config.json").read_text()).get("method") == "orchmoe"
            if orchmoe and not (folder / ROUTERS).is_file() and (out / "adapter").is_dir():
                copy_adapter(out / "adapter", folder / UNMEASURED)
                parked.append(folder / UNMEASURED)
            continue
        found = checkpoint.latest(out / "checkpoints")
        if found is None:
            continue
        target = folder / "in-progress"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(found, target / "checkpoints" / found.name)
        for name in PARKED:
            shutil.copy2(out / name, target / name)
        if (out / "adapter" / "adapter_config.json").is_file():  # trained, not yet scored: the next session scores it
            copy_adapter(out / "adapter", target / "adapter")
        parked.append(target)
    return parked


def unpark(protocol: str, name: str, out: Path) -> None:
    """A parked checkpoint restored into an empty run directory, to resume from."""
    parked = RESULTS / protocol / name / "in-progress"
    if parked.is_dir() and not (out / "config.json").is_file():
        shutil.copytree(parked, out, dirs_exist_ok=True)


def measure(protocol: str, work: Path) -> list[Path]:
    """routers.json for each finished OrchMoE run (remedies included) whose adapter is in ``work``, or kept by ``park``
    with its results (deleted once measured: adapters are not kept with the results)."""
    written = []
    for folder in sorted((RESULTS / protocol).glob("*")):
        out = work / protocol / folder.name
        config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        if config.get("method") != "orchmoe" or not finished(protocol, folder.name):
            continue
        if not (out / "adapter").is_dir() and (folder / UNMEASURED).is_dir():  # parked by an earlier session
            out.mkdir(parents=True, exist_ok=True)
            shutil.copytree(folder / UNMEASURED, out / "adapter", dirs_exist_ok=True)
            shutil.copy2(folder / "config.json", out / "config.json")
        if not (out / "adapter").is_dir():  # adapters are not kept with the results
            print(f"skip {folder.name}: no adapter in {out} (run it again to measure it)")
            continue
        if (folder / ROUTERS).is_file():  # measured: add the allocation's spread if an older measure lacks it
            kept = json.loads((folder / ROUTERS).read_text())
            if "allocation_spread" not in kept and config.get("allocation", "diagonal") == "diagonal":
                kept["allocation_spread"] = router_measures.allocation_spread(out / "adapter")
                (folder / ROUTERS).write_text(json.dumps(kept, indent=1) + "\n")
                written.append(folder / ROUTERS)
            continue
        (folder / ROUTERS).write_text(json.dumps(router_measures.of_run(folder, out), indent=1) + "\n")
        shutil.rmtree(folder / UNMEASURED, ignore_errors=True)
        written.append(folder / ROUTERS)
        print(f"measured {folder.name}", flush=True)
    return written

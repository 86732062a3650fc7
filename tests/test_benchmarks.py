"""The benchmark scripts run end to end on a tiny model (their figures live in BENCHMARKS.md and benchmarks/LOG.md,
not here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchmoe.data import write_suite

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from gpu import pack, summary, unpack  # noqa: E402
from gpu_stage import piece_size, subset  # noqa: E402


def script(name: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_speed_benchmark_prints_its_result_line(tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    done = script("speed.py", "--model", "tiny-gemma3", "--repeats", "2", "--warmup", "1", "--out", str(out))
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT train_step_ratio=") and "decode_ratio=" in last and "mix_decode_ratio=" in last
    report = json.loads(out.read_text())
    assert set(report["train_step_s"]) == {"base", "lora", "orchmoe", "orchmoe-mix", "poly", "mhr"}
    params = report["parameters"]
    assert params["orchmoe"]["adapter"] == params["lora"]["adapter"] == params["orchmoe-mix"]["adapter"]
    assert params["orchmoe-mix"]["router"] > params["orchmoe"]["router"]  # the mixing matrices
    assert report["versions"]["torch"] == torch.__version__


def test_memory_sweep_grows_with_the_skills_and_not_the_abstract_tasks(tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    script("speed.py", "--model", "tiny-gemma3", "--memory-only", "--sweep-skills", "2", "16", "--sweep-tasks", "1",
           "64", "--out", str(out))  # fmt: skip
    sweep = json.loads(out.read_text())["sweep"]
    memory = {k: {x: {m: r["memory_bytes"] for m, r in v.items()} for x, v in sweep[k].items()} for k in sweep}
    for method in ("lora", "orchmoe"):  # more skills = higher rank at parity: more parameters, wider activations
        assert memory["skills"]["16"][method] > memory["skills"]["2"][method]
    # T only adds T x S allocation logits per module and d x T task-router weights: a few kilobytes
    grown = memory["tasks"]["64"]["orchmoe"] - memory["tasks"]["1"]["orchmoe"]
    assert 0 < grown < 0.05 * memory["tasks"]["1"]["orchmoe"]
    assert memory["tasks"]["64"]["lora"] == memory["tasks"]["1"]["lora"]
    assert out.with_suffix(".png").is_file()


def quality(tmp_path: Path, *args: str) -> Path:
    """quality.py on a tiny built-in suite and a tiny model, 2 seeds; returns its output folder."""
    data = write_suite(tmp_path / "suite", seed=0, n_instances=12)
    out = tmp_path / "q"
    script("quality.py", "--data-dir", str(data), "--model", "tiny-gemma3", "--seeds", "0", "1", "--n-train", "2",
           "--n-test", "1", "--n-unseen", "2", "--epochs", "1", "--max-new-tokens", "2", "--out", str(out),
           *args)  # fmt: skip
    return out


def test_quality_benchmark_on_the_builtin_suite(tmp_path: Path) -> None:
    out = quality(tmp_path, "--parts", "sni-10", "sni-many", "ablations", "samples", "--methods", "orchmoe",
                  "orchmoe-tau4", "lora", "--many-tasks", "3", "--many-train", "1", "--many-test", "1", "--samples",
                  "1", "2")  # fmt: skip
    table = (out / "quality.md").read_text()
    assert "## sni-10 (2 seeds, mean ± std)" in table and "| orchmoe-tau4 |" in table and "±" in table
    routing = [line for line in table.splitlines() if line.count("|") == 7 and "±" in line]  # sni-10 routing rows
    assert [line.split(" | ")[0] for line in routing] == ["| orchmoe", "| orchmoe-tau4"]
    assert "## sni-many (one seed)" in table and "| orchmoe (tau 1) |" in table and "| lora, 1 per task |" in table
    # rows that are the same configuration share one run: tau 1 and tau 4 ablations, 2 per task = the sni-10 rows
    assert sorted(p.name for p in (out / "ablations").iterdir()) == [
        "no-skill-router-uniform-z", "no-task-router-uniform-w", "tau-0.5"]  # fmt: skip
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["lora-1", "orchmoe-1"]
    assert (out / "samples.png").stat().st_size > 1000
    report = json.loads((out / "quality.json").read_text())
    assert report["samples"]["orchmoe, 2 per task"] == report["sni-10"]["orchmoe"][0]["seen"]["rougeL"]


def test_quality_learning_rate_sweep_picks_on_validation(tmp_path: Path) -> None:
    out = quality(tmp_path, "--parts", "sni-10", "lr-sweep", "--methods", "lora", "--sweep-methods", "lora",
                  "--lrs", "1e-3", "1e-1", "--n-val", "2", "--n-extra", "3")  # fmt: skip
    report = json.loads((out / "quality.json").read_text())["lr-sweep"]
    val = report["validation_rougeL"]["lora"]
    best = max(val, key=val.__getitem__)
    assert report["chosen"]["lora"] == float(best) and len(report["test"][f"lora (lr {float(best):g})"]) == 2
    # lr 1e-3 is the sni-10 run itself: scored on validation in place, not trained again
    assert (out / "sni-10" / "lora-seed0" / "val_metrics.json").is_file()
    assert sorted(p.name for p in (out / "lr-sweep").iterdir())[0] == "lora-lr0.1-seed0"
    assert json.loads((out / "lr-sweep" / "lora-lr0.1-seed0" / "val_metrics.json").read_text())["n_val"] == 2
    assert "## Learning-rate sweep" in (out / "quality.md").read_text()
    # the chosen-lr runs re-scored on a larger test set: a superset of the test set, disjoint from validation
    run = out / ("sni-10/lora-seed0" if float(best) == 1e-3 else "lr-sweep/lora-lr0.1-seed0")
    extended = json.loads((run / "extended_metrics.json").read_text())
    sets = [json.loads(line)["set"] for line in (run / "predictions.jsonl").read_text().splitlines()]
    sizes = extended["n_examples"]
    assert sizes["seen"] > sets.count("seen") and sizes["unseen"] > sets.count("unseen")
    assert len(report["extended"][f"lora (lr {float(best):g})"]) == 2


def fake_run(root: Path, name: str, seed: int, seen: float, unseen: float) -> Path:
    run = root / name
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"seed": seed}))
    scores = {split: {"macro": {"rougeL": value}} for split, value in (("seen", seen), ("unseen", unseen))}
    (run / "extended_metrics.json").write_text(json.dumps(scores))
    return run


def test_paired_comparison_reports_per_seed_differences(tmp_path: Path) -> None:
    a = [fake_run(tmp_path, f"a{s}", s, seen, 30.0) for s, seen in enumerate((50.0, 40.0, 47.0))]
    b = [fake_run(tmp_path, f"b{s}", s, seen, 20.0 + s) for s, seen in enumerate((48.0, 44.0, 46.0))]
    done = script("paired.py", "--a", *map(str, a), "--b", *map(str, b))
    assert "| 1 | 40.00 | 44.00 | -4.00 |" in done.stdout
    last = done.stdout.strip().splitlines()[-1]
    assert last == "RESULT seen_diff=-0.33±3.21 seen_a_ahead=2/3 unseen_diff=+9.00±1.00 unseen_a_ahead=3/3"
    assert "| unseen | R-L | +9.00 ± 1.00 | 3/3 | +10.00, +9.00, +8.00 |" in done.stdout
    mismatched = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "paired.py"), "--a", *map(str, a[:2]),
                                 "--b", *map(str, b)], capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert mismatched.returncode != 0 and "same seeds" in mismatched.stderr


def test_gpu_benchmark_dry_run_goes_through_staging_speed_and_the_at_scale_waves(tmp_path: Path) -> None:
    """benchmarks/gpu.py --dry-run: the GPU command's code path on the CPU (tiny model, built-in suite), so that no
    GPU minute is spent on a typo: staging in pieces, reassembly with checksums, the attention probe, speed, the
    at-scale protocol seed by seed (four methods in parallel per seed), its report, the summary."""
    out, staging = tmp_path / "gpu", tmp_path / "staging"
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--dry-run", "--out", str(out), "--staging",
               str(staging), "--work", str(tmp_path / "work")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # run directories stay in --work; only the kept results come back under --out
    assert (tmp_path / "work" / "families-gpu" / "lora-lr0.003-seed0" / "adapter").is_dir()
    assert sorted(p.name for p in out.iterdir()) == ["gpu-out.tgz.000", "report.md", "summary.txt"]  # a call: 8
    committed = unpack(out, tmp_path / "returned", committed=tmp_path / "committed")
    back = tmp_path / "returned"
    assert not list(back.glob("**/adapter")) and not (back / "unfinished").exists()  # every run finished
    manifest = json.loads((staging / "MANIFEST.json").read_text())
    assert len(manifest["calls"]) > 1  # the data really went through several calls' pieces
    summary = (out / "summary.txt").read_text()
    assert done.stdout.strip().endswith(summary.strip().splitlines()[-1])  # the summary is printed last
    assert "train step OrchMoE/LoRA" in summary and "## families-gpu: 8 finished runs" in summary
    assert "| lora | 0, 1 |" in summary and "allocation distance from uniform (TV), 2 runs" in summary
    assert "sdpa probe, non-finite gradients: none (8 cases)" in summary  # the CPU has no cuDNN
    probe = json.loads((back / "sdpa-probe.json").read_text())
    assert {(c["dtype"], c["width"], c["backends"]) for c in probe["cases"]} == {
        (d, w, b) for d in ("bf16", "fp32") for w in (192, 256) for b in ("default", "no-cudnn")
    }
    for method, lr in (("orchmoe", "0.001"), ("lora", "0.003"), ("poly", "0.003"), ("mhr", "0.001")):
        for seed in (0, 1):
            kept = back / "results" / "families-gpu" / f"{method}-lr{lr}-seed{seed}"
            assert {"metrics.json", "val_metrics.json", "train_log.jsonl"} <= {p.name for p in kept.iterdir()}
    assert (back / "results" / "families-gpu" / "orchmoe-lr0.001-seed1" / "routers.json").is_file()
    returned = back / "results" / "families-gpu"
    assert sorted(p.name for p in committed.iterdir()) == sorted(p.name for p in returned.iterdir())


def test_gpu_archive_parts_fit_a_call_and_unpack_replaces_the_committed_runs(tmp_path: Path) -> None:
    """pack: one archive in parts of at most ``part`` bytes beside the summary and report; unpack: the returned
    results replace the committed folder, so a parked run that finished since loses its old checkpoint."""
    out = tmp_path / "out"
    run = out / "results" / "families-gpu" / "lora-lr0.003-seed0"
    (run / "in-progress" / "checkpoints").mkdir(parents=True)
    (run / "in-progress" / "checkpoints" / "state.pt").write_bytes(os.urandom(10240))  # incompressible
    (out / "speed-b8.json").write_text("{}")
    (out / "summary.txt").write_text("summary")
    (out / "report.md").write_text("report")
    parts = pack(out, part=4096)
    assert len(parts) > 1 and all(p.stat().st_size <= 4096 for p in parts)
    assert sorted(p.name for p in out.iterdir()) == sorted([p.name for p in parts] + ["report.md", "summary.txt"])
    committed = tmp_path / "committed"
    (committed / "lora-lr0.003-seed0" / "in-progress").mkdir(parents=True)  # parked before, since finished
    (committed / "orchmoe-lr0.001-seed0").mkdir()
    (committed / "orchmoe-lr0.001-seed0" / "metrics.json").write_text("{}")
    unpack(out, tmp_path / "returned", committed=committed)
    assert [p.name for p in committed.iterdir()] == ["lora-lr0.003-seed0"]  # the archive's copy is the whole truth
    assert (committed / "lora-lr0.003-seed0" / "in-progress" / "checkpoints" / "state.pt").stat().st_size == 10240
    assert (tmp_path / "returned" / "speed-b8.json").is_file()


def test_gpu_staging_keeps_only_the_protocols_tasks(tmp_path: Path) -> None:
    """gpu_stage.subset: the trained and held-out tasks the config names and the test split, the splits unchanged."""
    suite = write_suite(tmp_path / "suite", seed=0, n_instances=4)
    train = (suite / "splits" / "default" / "train_tasks.txt").read_text().split()
    test = (suite / "splits" / "default" / "test_tasks.txt").read_text().split()
    config = tmp_path / "protocol.json"
    config.write_text(json.dumps({"tasks": train[:2], "held_out_tasks": train[2:3]}))
    kept = subset(suite, config, tmp_path / "kept")
    assert sorted(p.stem for p in (kept / "tasks").glob("*.json")) == sorted(train[:3] + test)
    assert (kept / "splits" / "default" / "train_tasks.txt").read_text().split() == train


def test_serving_benchmark_on_a_tiny_run(tmp_path: Path) -> None:
    from orchmoe.cli import main

    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--model", "tiny-gemma3", "--max-steps", "2", "--n-train", "4",
                 "--n-test", "2", "--suite-instances", "16", "--max-new-tokens", "3", "--quiet"]) == 0  # fmt: skip
    assert main(["eval", str(run), "--quiet"]) == 0
    out = tmp_path / "quality.json"
    done = script("serving.py", "--out", str(out), "quality", str(run))
    report = json.loads(out.read_text())
    assert set(report[str(run)]) == {"seen", "unseen"} and len(report["seen hard minus soft"]) == 1
    assert "hard minus soft" in done.stdout
    done = script("serving.py", "latency", "--model", "tiny-gemma3", "--repeats", "1", "--batch", "4", "--prompt", "8",
                  "--new-tokens", "3")  # fmt: skip
    assert "served (mixed batch)" in done.stdout


def test_gpu_summary_says_how_far_a_run_cut_off_by_the_deadline_got(tmp_path: Path) -> None:
    log = tmp_path / "unfinished" / "orchmoe-lr0.001-seed1" / "train_log.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text(json.dumps({"step": 8, "seconds": 1.5}) + "\n" + json.dumps({"step": 96, "seconds": 12.4}) + "\n")
    text = summary(tmp_path, {"orchmoe-lr0.001-seed1": 124})
    assert "orchmoe-lr0.001-seed1 exit 124" in text and "unfinished orchmoe-lr0.001-seed1: step 96, 12 s" in text


@pytest.mark.parametrize(("tree_mib", "piece_mib"), [(1, 56), (21, 41), (54, 8)])
def test_gpu_pieces_leave_room_for_the_working_tree(tree_mib: int, piece_mib: int) -> None:
    """A device call carries the working tree beside its call folder, 64 MiB in all: pieces shrink as the tree grows."""
    assert piece_size(tree_mib * 2**20) == piece_mib * 2**20


def test_gpu_staging_refuses_a_tree_that_leaves_no_room() -> None:
    with pytest.raises(SystemExit, match="git rm --cached"):
        piece_size(60 * 2**20)


def test_router_length_benchmark_prints_its_result_line(tmp_path: Path) -> None:
    out = tmp_path / "router_length.json"
    done = script("router_length.py", "--lengths", "64", "256", "--width", "32", "--repeats", "1", "--out", str(out))
    assert done.stdout.strip().splitlines()[-1].startswith("RESULT tokens=256 peak_mb_quadratic=")
    results = json.loads(out.read_text())
    assert set(results) == {"64", "256"} and set(results["256"]) == {"quadratic", "linear"}


def test_head_benchmark_prints_its_result_line() -> None:
    done = script("head.py", "--model", "tiny-gemma3", "--length", "24", "--repeats", "1")
    assert done.stdout.strip().splitlines()[-1].startswith("RESULT full_over_supervised_lora=")

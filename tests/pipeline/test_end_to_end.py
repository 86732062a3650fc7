"""train -> eval -> compare -> export on a tiny model and two built-in tasks, through the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from orchmoe.cli import main
from orchmoe.models import tiny_model
from orchmoe.pipeline import checkpoint
from orchmoe.pipeline.evaluate import load_trained
from orchmoe.tuner import SkillRouter
from tests.conftest import VOCAB

TINY = [
    "--model", "tiny-gemma3", "--tasks", "suite001_addition", "suite003_reverse_word", "--n-train", "8",
    "--n-test", "2", "--n-unseen", "1", "--suite-instances", "16", "--batch-size", "4", "--max-new-tokens", "4",
    "--quiet",
]  # fmt: skip


def run(*argv: str) -> None:
    assert main(list(argv)) == 0


def test_train_eval_compare(tmp_path: Path) -> None:
    run("train", "--out", str(tmp_path / "r"), *TINY, "--max-steps", "3")
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "config.json", "train_log.jsonl"):
        assert (tmp_path / "r" / name).is_file(), name
    assert json.loads((tmp_path / "r" / "config.json").read_text())["max_steps"] == 3
    run("eval", str(tmp_path / "r"), "--quiet")
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert set(metrics["seen"]["per_task"]) == {"suite001_addition", "suite003_reverse_word"}
    assert len(metrics["unseen"]["per_task"]) == 1
    predictions = (tmp_path / "r" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 2 * 2 + 2
    run("compare", "--out", str(tmp_path / "c"), *TINY, "--max-steps", "2")
    results = json.loads((tmp_path / "c" / "results.json").read_text())
    assert list(results["methods"]) == ["orchmoe", "lora", "poly", "mhr"]
    adapters = {m: r["parameters"]["adapter"] for m, r in results["methods"].items()}
    assert len(set(adapters.values())) == 1  # parity
    report = (tmp_path / "c" / "results.md").read_text()
    assert "| orchmoe |" in report and "purity" in report
    # the first lines say what the run is, where the verdict is, and each difference to LoRA with its interval
    head = report.splitlines()[:12]
    assert "One seed (0) on the built-in suite" in head[2] and "BENCHMARKS.md" in head[2]
    for method in ("orchmoe", "poly", "mhr"):
        for split in ("seen", "unseen"):
            d = results["differences_to_lora"][method][split]
            assert d["low"] <= d["diff"] <= d["high"] and d["resolved"] == (not d["low"] <= 0 <= d["high"])
            line = next(x for x in head if x.startswith(f"- {method} minus LoRA, {split} ROUGE-L"))
            assert f"{d['diff']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]" in line and "at this test size" in line
    assert set(results["intervals"]) == {"orchmoe", "lora", "poly", "mhr"}
    for figure in ("rouge.png", "loss.png", "allocation.png", "routing.png"):
        assert (tmp_path / "c" / figure).stat().st_size > 1000


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--temperature", "4", "--temperature-end", "0.5"], {"temperature": 0.5, "noise_scale": 1.0}),
        (["--noise-scale-end", "0"], {"temperature": 1.0, "noise_scale": 0.0}),
    ],
)
def test_annealed_relaxation_is_the_one_saved_and_evaluated(
    tmp_path: Path, flags: list[str], expected: dict[str, float]
) -> None:
    run("train", "--out", str(tmp_path / "r"), *TINY, "--max-steps", "3", *flags)
    saved = json.loads((tmp_path / "r" / "adapter" / "adapter_config.json").read_text())
    assert {k: saved[k] for k in expected} == pytest.approx(expected)
    _, _, model = load_trained(tmp_path / "r")
    routers = [m for m in model.modules() if isinstance(m, SkillRouter)]
    assert routers and all({k: getattr(m, k) for k in expected} == pytest.approx(expected) for m in routers)


def test_existing_output_is_not_clobbered(tmp_path: Path, capsys) -> None:
    out = tmp_path / "r"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert main(["train", "--out", str(out), *TINY, "--max-steps", "1"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"
    run("train", "--out", str(out), *TINY, "--max-steps", "1", "--overwrite")
    assert not (out / "precious.txt").exists()


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("orchmoe", []),
        ("poly", []),
        ("orchmoe", ["--gradient-checkpointing"]),
        ("orchmoe", ["--precision", "bf16"]),
        ("orchmoe", ["--load-in-8bit", "--gradient-checkpointing"]),
    ],
)
def test_resume_from_a_checkpoint_gives_the_uninterrupted_adapter(
    tmp_path: Path, method: str, options, capsys: pytest.CaptureFixture
) -> None:
    args = [*TINY, "--method", method, "--epochs", "3", "--max-steps", "6", "--checkpoint-every", "3"]
    args += ["--grad-accum", "2", *options]
    run("train", "--out", str(tmp_path / "a"), *args)
    run("train", "--out", str(tmp_path / "b"), *args)
    # simulate a run that died after its step-3 checkpoint: only the checkpoint survives
    shutil.rmtree(tmp_path / "b" / "adapter")
    (tmp_path / "b" / "train_log.jsonl").unlink()
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-000003"]
    capsys.readouterr()
    run("train", "--out", str(tmp_path / "b"), *args, "--resume")
    assert "6 steps (resumed after step 3)" in capsys.readouterr().out  # it trained steps 4 to 6 only
    a = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    log_a = (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()
    log_b = (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in log_a]
    assert strip == [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in log_b]


def test_resume_starts_from_what_the_checkpoint_holds(tmp_path: Path) -> None:
    """A checkpoint whose adapter was changed gives another final adapter: the resumed run starts from it."""
    args = [*TINY, "--epochs", "3", "--max-steps", "6", "--checkpoint-every", "3"]
    run("train", "--out", str(tmp_path / "a"), *args)
    run("train", "--out", str(tmp_path / "b"), *args)
    shutil.rmtree(tmp_path / "b" / "adapter")
    found = checkpoint.latest(tmp_path / "b" / "checkpoints")
    state = checkpoint.load(found)
    state["adapter"] = {k: v + 0.5 if v.is_floating_point() else v for k, v in state["adapter"].items()}
    shutil.rmtree(found)
    checkpoint.save(tmp_path / "b" / "checkpoints", state["step"], state)  # a complete checkpoint, other weights
    run("train", "--out", str(tmp_path / "b"), *args, "--resume")
    a = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    weights = [k for k in a if a[k].is_floating_point()]
    assert a.keys() == b.keys() and len(weights) > 4
    assert all((a[k] - b[k]).abs().max() > 0.1 for k in weights)


def test_resume_refuses_other_settings(tmp_path: Path, capsys) -> None:
    run("train", "--out", str(tmp_path / "r"), *TINY, "--max-steps", "2")
    assert main(["train", "--out", str(tmp_path / "r"), *TINY, "--max-steps", "4", "--resume"]) == 2
    assert "max_steps" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_orchmoe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "r"
    run("train", "--out", str(out), *TINY, "--max-steps", "6", "--lr", "0.02")
    return out


@pytest.mark.parametrize("how", [["--abstract-task", "1"], ["--prompt", "Input: 3 + 4\nOutput:"], ["--task", "x"]])
def test_export_equals_orchmoe_for_that_routing(trained_orchmoe: Path, tmp_path: Path, how: list[str]) -> None:
    if how[0] == "--task":
        how = ["--task", "suite003_reverse_word"]
    run("export", str(trained_orchmoe), "--out", str(tmp_path / "lora"), *how)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16
    weights = [float(x) for x in (tmp_path / "lora" / "routing.txt").read_text().split("[")[1].split("]")[0].split(",")]
    task_weights = torch.tensor([weights])

    _, _, orchmoe_model = load_trained(trained_orchmoe)
    lora_model = PeftModel.from_pretrained(tiny_model("tiny-gemma3", vocab_size=VOCAB - 24), tmp_path / "lora")
    ids = torch.randint(4, VOCAB - 24, (3, 11))
    with torch.no_grad():
        expected = orchmoe_model(input_ids=ids, task_weights=task_weights.expand(3, -1)).logits
        got = lora_model.eval()(input_ids=ids).logits
        merged = lora_model.merge_and_unload()(input_ids=ids).logits
    assert not torch.allclose(expected, tiny_model("tiny-gemma3", vocab_size=VOCAB - 24)(input_ids=ids).logits)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(merged, expected, atol=1e-5)


def test_export_rejects_other_methods_and_unknown_tasks(tmp_path: Path, trained_orchmoe: Path, capsys) -> None:
    assert main(["export", str(trained_orchmoe), "--out", str(tmp_path / "x"), "--task", "nope"]) == 2
    assert "not among this run's tasks" in capsys.readouterr().err
    assert main(["export", str(trained_orchmoe), "--out", str(tmp_path / "y"), "--abstract-task", "9"]) == 2
    assert "--abstract-task must be in [0, 3]" in capsys.readouterr().err


def test_the_mixing_allocation_trains_through_the_cli_and_records_its_distance(tmp_path: Path) -> None:
    run("train", "--out", str(tmp_path / "r"), *TINY, "--max-steps", "4", "--log-every", "2", "--allocation", "mixing")
    saved = json.loads((tmp_path / "r" / "adapter" / "adapter_config.json").read_text())
    assert saved["allocation"] == "mixing"
    tensors = load_file(tmp_path / "r" / "adapter" / "adapter_model.safetensors")
    assert any(k.endswith("skill_router.matrices") for k in tensors) and not any("logits" in k for k in tensors)
    log = [json.loads(line) for line in (tmp_path / "r" / "train_log.jsonl").read_text().splitlines()]
    distances = [e["mixing_distance"] for e in log if "mixing_distance" in e]
    assert distances and distances[-1] > 0 and not any("allocation_tv" in e for e in log)
    data = json.loads((tmp_path / "r" / "data.json").read_text())
    assert set(data["versions"]) == {"torch", "transformers", "peft", "trl", "accelerate"}
    assert data["versions"]["torch"] == torch.__version__


def test_compare_intervals_on_a_tiny_models_predictions(tmp_path: Path) -> None:
    """On a tiny model's real predictions: a method that predicts what LoRA predicts (a zero difference by
    construction) is not resolved; one that predicts every reference (a planted difference) is, ahead."""
    from orchmoe.pipeline.compare import uncertainty

    run("train", "--out", str(tmp_path / "lora"), *TINY, "--method", "lora", "--max-steps", "2")
    run("eval", str(tmp_path / "lora"), "--quiet")
    rows = [json.loads(line) for line in (tmp_path / "lora" / "predictions.jsonl").read_text().splitlines()]
    for name, predict in (("same", lambda r: r["prediction"]), ("oracle", lambda r: r["references"][0])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "predictions.jsonl").write_text(
            "".join(json.dumps({**r, "prediction": predict(r)}) + "\n" for r in rows)
        )
    intervals, differences = uncertainty(tmp_path, ["lora", "same", "oracle"])
    for split in ("seen", "unseen"):
        same, oracle = differences["same"][split], differences["oracle"][split]
        assert same["diff"] == 0.0 and same["low"] <= 0.0 <= same["high"] and not same["resolved"]
        assert (
            oracle["resolved"]
            and oracle["low"] > 0
            and oracle["diff"] == pytest.approx(100.0 - intervals["lora"][split][0])
        )

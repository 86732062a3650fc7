"""What ``import orchmoe`` loads, and the one-line message for a missing extra (``orchmoe._extras``)."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

# the harness, Trainer, metrics, plotting and data libraries: none of them is the tuner's
NOT_LOADED = (
    "orchmoe.pipeline",
    "orchmoe.training",
    "orchmoe.serving",
    "orchmoe.export",
    "orchmoe.data",
    "orchmoe.models",
    "transformers.trainer",
    "rouge_score",
    "nltk",
    "sklearn",
    "matplotlib",
    "datasets",
    "trl",
)  # (peft itself imports bitsandbytes when it is installed)


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_import_orchmoe_loads_the_tuner_only() -> None:
    code = (
        "import json, sys; import orchmoe; "
        f"print(json.dumps([m for m in {list(NOT_LOADED)!r} if m in sys.modules])); "
        "print(json.dumps('orchmoe.tuner' in sys.modules))"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    loaded, tuner = (json.loads(line) for line in result.stdout.splitlines()[-2:])
    assert loaded == [] and tuner


@pytest.mark.parametrize(
    ("name", "module"),
    [("export_lora", "orchmoe.export"), ("OrchMoETrainer", "orchmoe.training"), ("set_relaxation", "orchmoe.training")],
)
def test_the_rest_loads_on_first_use(name: str, module: str) -> None:
    result = run_python(
        f"import sys, orchmoe; assert {module!r} not in sys.modules; obj = orchmoe.{name}; "
        f"assert {module!r} in sys.modules and obj is sys.modules[{module!r}].{name}; print('ok')"
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize(
    ("missing", "code", "extra"),
    [
        ("rouge_score", "from orchmoe.cli import main; raise SystemExit(main(['eval', 'run']))", "harness"),
        ("matplotlib", "import orchmoe.pipeline", "harness"),
        ("trl", "import orchmoe; orchmoe.OrchMoESFTTrainer", "trl"),
        (
            "bitsandbytes",
            "from orchmoe.models import load_model; load_model('tiny-gemma3', quantization='4bit')",
            "kbit",
        ),
    ],
)
def test_a_missing_extra_is_named_in_one_line(missing: str, code: str, extra: str) -> None:
    """As if ``missing`` were not installed (``sys.modules[name] = None`` makes ``find_spec`` find nothing)."""
    result = run_python(f"import sys; sys.modules[{missing!r}] = None; {code}")
    assert result.returncode != 0
    message = [line for line in result.stderr.splitlines() if f'pip install "orchmoe[{extra}]"' in line]
    assert len(message) == 1 and missing in message[0], result.stderr
    if code.startswith("from orchmoe.cli"):  # the command prints that line only, no traceback
        # bitsandbytes (imported by peft) logs at import on CPUs with AVX512-BF16 that `kernels` is not installed
        ours = [line for line in result.stderr.splitlines() if "kernels-community" not in line]
        assert result.returncode == 2 and ours == [message[0]], result.stderr


@pytest.mark.skipif(find_spec("rouge_score") is not None, reason="the harness is installed (`make test-wheel` has not)")
def test_the_command_of_a_core_install_names_the_harness_extra() -> None:
    """In an environment with the core requirements only (``make test-wheel``): the installed ``orchmoe`` command."""
    command = Path(sys.executable).parent / "orchmoe"
    result = subprocess.run([str(command), "compare"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().endswith('pip install "orchmoe[harness]"') and len(result.stderr.splitlines()) == 1

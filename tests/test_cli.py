"""The `orchmoe` command's errors: the project's own input errors in one line, real failures with their traceback."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from orchmoe import cli
from orchmoe.pipeline import evaluate
from orchmoe.pipeline.checkpoint import CheckpointError
from orchmoe.pipeline.common import RunDirError, TrainingDiverged


@pytest.mark.parametrize(
    ("error", "one_line"),
    [
        (ValueError("bad\nflag"), True),
        (RunDirError("not a run directory"), True),
        (CheckpointError("no valid checkpoint"), True),
        (TrainingDiverged("loss was NaN"), True),
        (RuntimeError("CUDA out of memory"), False),  # not the user's input: the traceback is the information
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
    ],
)
def test_errors_of_a_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, error: Exception, one_line: bool
) -> None:
    def fail(*_: object, **__: object) -> None:
        raise error

    monkeypatch.setattr(evaluate, "evaluate_run", fail)
    if one_line:
        assert cli.main(["eval", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("orchmoe eval: error: ") and " ".join(str(error).split()) in err
    else:
        with pytest.raises(type(error), match=str(error)):
            cli.main(["eval", str(tmp_path)])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "{served}", "--model", "m", "--vllm", "/no/such/vllm"], "no vLLM executable '/no/such/vllm'"),
        (["serve", "{empty}", "--model", "m", "--vllm", sys.executable], "has no router.json"),
    ],
)
def test_serve_names_what_is_missing_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str], message: str
) -> None:
    (tmp_path / "served").mkdir()
    (tmp_path / "empty").mkdir()
    argv = [a.format(served=tmp_path / "served", empty=tmp_path / "empty") for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("orchmoe serve: error: ") and message in err


def test_arguments_after_a_double_dash_are_for_serve_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli.main(["eval", str(tmp_path), "--", "--dtype", "float32"])
    assert "for `orchmoe serve` only" in capsys.readouterr().err

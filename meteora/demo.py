"""A short end-to-end run on the embedded default model (`python -m meteora`).

Loads SmolLM2-135M-Instruct, makes a few small PEFT LoRA adapters (random weights, cached), embeds
them as MeteoRA experts, generates an answer and prints which adapter each token used. The gates are
untrained here; `python -m meteora.train` is the real job.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path

import torch

from .adapters import TARGET_MODULES
from .base import cache_dir, load_base_model
from .model import from_adapters

log = logging.getLogger("meteora")

DEMO_ADAPTERS = {  # name: (rank, alpha, target modules)
    "attn_r8": (8, 16, ("q_proj", "k_proj", "v_proj", "o_proj")),
    "mlp_r16": (16, 16, ("gate_proj", "up_proj", "down_proj")),
    "all_r4": (4, 8, TARGET_MODULES),
}


def make_random_adapter(base_model, path: Path, r: int, alpha: float, targets, seed: int,
                        use_rslora: bool = False, dropout: float = 0.0, std: float = 0.5) -> Path:
    """Save a PEFT LoRA adapter for ``base_model`` (left untouched) with random non-zero A and B,
    entries ~ N(0, std^2 / fan_in). For demos and tests; real adapters come from training."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=use_rslora,
                        lora_dropout=dropout, task_type="CAUSAL_LM")
    peft_model = get_peft_model(copy.deepcopy(base_model), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (std / p.shape[1] ** 0.5))
    peft_model.save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m meteora", description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="Name three planets of the solar system and one fact about each.")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)

    started = time.perf_counter()
    base, tok = load_base_model()
    log.info("base model: SmolLM2-135M-Instruct (%.1f s)", time.perf_counter() - started)
    root = cache_dir() / "demo-adapters"
    adapters = {}
    for seed, (name, (rank, alpha, targets)) in enumerate(DEMO_ADAPTERS.items()):
        path = root / name
        if not (path / "adapter_config.json").is_file():
            make_random_adapter(base, path, rank, alpha, targets, seed=seed + 1, std=0.3)
        adapters[name] = path
    model = from_adapters(base, adapters, top_k=args.top_k, temperature=args.temperature).eval()
    log.info("MeteoRA: %d adapters in %d linears, top_k=%d, temperature=%g",
             len(adapters), len(model.meteora_layers()), model.top_k, model.temperature)

    ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    gen_started = time.perf_counter()
    with torch.no_grad(), model.trace_routing() as trace:
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    seconds = time.perf_counter() - gen_started
    new_tokens = out[0, ids.shape[1]:]
    print(f"\nprompt: {args.prompt}\nanswer: {tok.decode(new_tokens, skip_special_tokens=True)}\n")
    # Routing of position p decides the token generated at p + 1.
    weights = trace.token_adapter_weights()[ids.shape[1] - 1: ids.shape[1] - 1 + len(new_tokens)]
    names = model.adapter_names
    print(f"{'token':>16}  {'adapter (mean gate weight over 210 linears)':<44} " + " ".join(f"{n:>8}" for n in names))
    for token, w in zip(new_tokens.tolist(), weights):
        best = int(w.argmax())
        print(f"{tok.decode([token])!r:>16}  {names[best]:<10} {w[best]:.2f}{'':<29} " + " ".join(f"{v:8.2f}" for v in w.tolist()))
    usage = weights.argmax(-1).bincount(minlength=len(names))
    print("\ndominant adapter per token: " + ", ".join(f"{n} {c}" for n, c in zip(names, usage.tolist())))
    print(f"{len(new_tokens)} tokens in {seconds:.1f} s; total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
